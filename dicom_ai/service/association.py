"""One accepted association: negotiation (PS3.8 §7.1), then C-ECHO, C-STORE and (MPPS)
N-CREATE/N-SET until release.

The listener runs one :class:`Association` per TCP connection, in its own thread, with blocking
reads. pynetdicom supplies the association codecs — A-ASSOCIATE PDUs and presentation context
negotiation — but not its acceptor engine: that engine hands every PDU between two polling
threads that sleep a millisecond per turn, and on this project's reference machine it reaches
about a third of DCMTK ``storescp``'s rate before a single byte is written to disk (see
``benchmarks/cstore_receive.py``). Here a C-STORE costs one thread's reads, the durable write and
one response.

The service is synchronous (no asynchronous operations window is granted), so a requestor sends one
request at a time and waits for its response.

What one peer can hold is bounded (the policy of ``docs/conformance-statement.md``): a slot among
``scp.maximum_associations`` and at most ``scp.maximum_associations_per_ae`` per calling AE title;
``scp.request_timeout_s`` to send its A-ASSOCIATE-RQ; ``scp.network_timeout`` between two reads;
``scp.association_deadline_s`` in all, however slowly it trickles; a data set streamed to disk as
it arrives and at most ``scp.maximum_message_mb`` of it. Whatever goes wrong — the peer, or an
error of ours — the association ends with an A-ABORT or a failure status and a log line that names
the kind of error, never a value from the wire.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from pydicom.uid import UID
from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RJ, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    ImplementationVersionNameNotification,
    MaximumLengthNotification,
    SCP_SCU_RoleSelectionNegotiation,
)
from pynetdicom.presentation import PresentationContext, negotiate_as_acceptor

from dicom_ai import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from dicom_ai.dicom.uid import is_valid_uid
from dicom_ai.service import metrics
from dicom_ai.service.dimse import (
    C_ECHO_RQ,
    C_STORE_RQ,
    N_CREATE_RQ,
    N_SET_RQ,
    Command,
    Response,
    decode_command,
)
from dicom_ai.service.mpps import DataSetBuffer, NormalizedFunction, NormalizedRequest
from dicom_ai.service.ul import (
    RELEASE_RP,
    AbortReason,
    DeadlineExceeded,
    PDUType,
    PeerClosed,
    ProtocolError,
    abort_pdu,
    command_pdus,
    read_pdu,
    split_pdata,
)

log = logging.getLogger(__name__)

#: PS3.7 Annex A.2.1: the only application context name of DICOM.
APPLICATION_CONTEXT_NAME = "1.2.840.10008.3.1.1.1"
#: An A-ASSOCIATE-RQ larger than this is refused: 128 contexts of 16 syntaxes fit with room.
MAX_ASSOCIATE_RQ = 1 << 20
#: Seconds the requestor has to close the connection after our last PDU (the ARTIM timer).
ARTIM_TIMEOUT = 5.0
#: What a PDU may carry when we announce "unlimited" (0): bounds the memory a peer can claim.
UNLIMITED_PDU_CAP = 64 << 20

#: A command set is a few hundred bytes; one longer than this is not a command set.
MAX_COMMAND_BYTES = 64 * 1024

#: PS3.7 C.4: "Refused: SOP Class not supported" (the context does not carry this class).
SOP_CLASS_NOT_SUPPORTED = 0x0122
#: PS3.4 B.2.3: "Error: Cannot understand".
CANNOT_UNDERSTAND = 0xC000
#: PS3.7 C.4: "Processing failure": an error of ours.
PROCESSING_FAILURE = 0x0110


@dataclass(frozen=True)
class Rejection:
    """A-ASSOCIATE-RJ parameters (PS3.8 Table 9-21) and why, for the log."""

    result: int
    source: int
    diagnostic: int
    why: str


@dataclass(frozen=True)
class StoreRequest:
    """A C-STORE as the storage handler sees it when its command set has arrived."""

    calling_aet: str
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: str


@dataclass(frozen=True)
class StoreStatus:
    """The C-STORE-RSP status and, for failures, an Error Comment (LO, ≤ 64 characters)."""

    status: int
    comment: str = ""


class IncomingData(Protocol):
    """Where the data set of one C-STORE goes while it arrives (the data set exactly as sent,
    no file meta). Exactly one of :meth:`finish` and :meth:`discard` is called at the end."""

    def add(self, fragment: memoryview) -> None:
        """Take the next fragment; the view stays valid (each PDU has its own buffer)."""

    def finish(self) -> StoreStatus:
        """The last fragment has arrived: store (durably, indexed) or refuse; the status to send."""

    def discard(self) -> None:
        """The association ended before the last fragment: leave nothing behind."""


#: Called when a C-STORE's command set has arrived; receives its data set.
StoreFunction = Callable[[StoreRequest], IncomingData]


@dataclass
class Refusal:
    """:class:`IncomingData` that keeps nothing and answers ``status`` at the end."""

    status: StoreStatus

    def add(self, fragment: memoryview) -> None:
        """Drop the fragment."""

    def finish(self) -> StoreStatus:
        """The refusal."""
        return self.status

    def discard(self) -> None:
        """Nothing kept, nothing to remove."""


class Slots:
    """Association slots: at most ``total`` at once, at most ``per_ae`` per calling AE title.

    Parameters
    ----------
    total:
        ``scp.maximum_associations``.
    per_ae:
        ``scp.maximum_associations_per_ae``.
    """

    def __init__(self, total: int, per_ae: int) -> None:
        self.total = total
        self.per_ae = per_ae
        self._lock = threading.Lock()
        self._held: Counter[str] = Counter()

    def acquire(self, calling_aet: str) -> str | None:
        """Take a slot for ``calling_aet``; ``None`` when taken, else why not (for the log)."""
        with self._lock:
            if self._held.total() >= self.total:
                return "local limit exceeded: every association slot is taken"
            if self._held[calling_aet] >= self.per_ae:
                return (f"local limit exceeded: {self.per_ae} associations from this AE title "
                        "are open")
            self._held[calling_aet] += 1
            return None

    def release(self, calling_aet: str) -> None:
        """Give back a slot of ``calling_aet``."""
        with self._lock:
            self._held[calling_aet] -= 1
            if not self._held[calling_aet]:
                del self._held[calling_aet]


@dataclass(frozen=True)
class AcceptorPolicy:
    """What the listener accepts; built once from ``scp`` settings.

    Parameters
    ----------
    ae_title:
        Our AE title; a request addressed to another is rejected.
    contexts:
        Supported presentation contexts (abstract syntax with its transfer syntaxes).
    allowed_calling_aets:
        Callers allowed to associate; empty allows any.
    maximum_pdu_size:
        Largest P-DATA-TF variable field we receive (0: unlimited).
    network_timeout:
        Seconds without data before an association is aborted.
    request_timeout:
        Seconds from the connection to the whole A-ASSOCIATE-RQ.
    association_deadline:
        Seconds from the connection to the end of the association, whatever the peer sends.
    slots:
        Concurrent associations, in all and per calling AE title; a request beyond them is
        rejected (transient, local limit).
    normalized:
        Serves N-CREATE and N-SET (the MPPS SCP); ``None`` when its context is not offered.
    """

    ae_title: str
    contexts: list[PresentationContext]
    allowed_calling_aets: frozenset[str]
    maximum_pdu_size: int
    network_timeout: float
    request_timeout: float
    association_deadline: float
    slots: Slots = field(compare=False)
    normalized: NormalizedFunction | None = field(default=None, compare=False)

    def check(self, rq: A_ASSOCIATE_RQ) -> Rejection | None:
        """The rejection an A-ASSOCIATE-RQ earns from its header alone, or ``None``."""
        calling = rq.calling_ae_title.strip()
        if rq.protocol_version != 1:
            return Rejection(0x01, 0x02, 0x02, "protocol version not supported")
        if rq.application_context_name != APPLICATION_CONTEXT_NAME:
            return Rejection(0x01, 0x01, 0x02, "application context name not supported")
        if self.allowed_calling_aets and calling not in self.allowed_calling_aets:
            return Rejection(0x01, 0x01, 0x03, "calling AE title not recognised")
        if rq.called_ae_title.strip() != self.ae_title:
            return Rejection(0x01, 0x01, 0x07, "called AE title not recognised")
        return None


@dataclass
class _Message:
    """A DIMSE request being received: its command set, then its data set (C-STORE: into
    ``data``; N-CREATE/N-SET: into ``buffer``; any other command's data set is dropped)."""

    context_id: int
    command: Command
    data: IncomingData | None = None
    buffer: DataSetBuffer | None = None


class Association:
    """Serve one connection from A-ASSOCIATE-RQ to release, abort or timeout.

    Parameters
    ----------
    sock:
        The accepted connection (TLS already wrapped, handshake done).
    policy:
        What we accept.
    store:
        Stores one instance durably and returns the status to answer.
    """

    def __init__(self, sock: socket.socket, policy: AcceptorPolicy, store: StoreFunction) -> None:
        self.sock = sock
        self.policy = policy
        self.store = store
        self.calling_aet = ""
        self.contexts: dict[int, PresentationContext] = {}
        self.peer_max_pdu = 0
        self.stored = 0
        self.refused = 0
        started = time.monotonic()
        #: Until the A-ASSOCIATE-RQ is read, then until the association must end.
        self.deadline = started + policy.request_timeout
        self._end_by = started + policy.association_deadline
        self._message: _Message | None = None

    def run(self) -> None:
        """Negotiate, then serve requests; never raises, whatever the peer does or we fail at."""
        slot: str | None = None
        # Whether we sent the association's last PDU (RJ, RP or A-ABORT) and the requestor is
        # to close the connection.
        last_word = True
        try:
            rq = self._read_request()
            rejection = self.policy.check(rq)
            if rejection is None:
                refused = self.policy.slots.acquire(self.calling_aet)
                if refused is None:
                    slot = self.calling_aet
                    metrics.association_opened()
                else:
                    rejection = Rejection(0x02, 0x03, 0x02, refused)
            if rejection is not None:
                self._reject(rejection)
                return
            self.deadline = self._end_by
            self._accept(rq)
            last_word = self._serve()
        except ProtocolError as exc:
            log.warning("association from %s aborted: %s", self.calling_aet or "?", exc)
            self._send_quietly(abort_pdu(exc.reason))
        except DeadlineExceeded as exc:
            log.warning("association from %s aborted: %s", self.calling_aet or "?", exc)
            self._send_quietly(abort_pdu(AbortReason.NOT_SPECIFIED))
        except TimeoutError:
            log.warning("association from %s idle for %.0f s: aborted", self.calling_aet or "?",
                        self.policy.network_timeout)
            self._send_quietly(abort_pdu(AbortReason.NOT_SPECIFIED))
        except (PeerClosed, OSError) as exc:
            last_word = False
            log.info("association from %s: connection lost (%s)", self.calling_aet or "?",
                     type(exc).__name__)
        except Exception as exc:
            # An error of ours: its kind and place, never its text (it may quote wire values).
            log.error("association from %s aborted after an internal error: %s",
                      self.calling_aet or "?", error_site(exc))
            self._send_quietly(abort_pdu(AbortReason.NOT_SPECIFIED))
        finally:
            if self._message is not None and self._message.data is not None:
                self._discard(self._message.data)
            if slot is not None:
                self.policy.slots.release(slot)
                metrics.association_closed()
            if self.stored or self.refused:
                log.info("association from %s ended: %d instances stored, %d refused",
                         self.calling_aet, self.stored, self.refused)
            if last_word:
                self._await_peer_close()
            self.sock.close()

    def _await_peer_close(self) -> None:
        """Let the requestor close the connection (PS3.8 §9.2, state Sta13 with ARTIM).

        Closing first could reset the connection before the peer has read our last PDU; a peer
        that never closes, or keeps sending, is cut off when ARTIM expires.
        """
        end = time.monotonic() + ARTIM_TIMEOUT
        with contextlib.suppress(OSError):
            while (left := end - time.monotonic()) > 0:
                self.sock.settimeout(left)
                if not self.sock.recv(4096):
                    break

    def _read_request(self) -> A_ASSOCIATE_RQ:
        pdu = read_pdu(self.sock, MAX_ASSOCIATE_RQ, self._timeouts())
        if pdu.type != PDUType.A_ASSOCIATE_RQ:
            raise ProtocolError(f"expected A-ASSOCIATE-RQ, got PDU type 0x{pdu.type:02x}",
                                AbortReason.UNEXPECTED_PDU)
        rq = A_ASSOCIATE_RQ()
        try:
            rq.decode(bytes(pdu.raw))
            calling = rq.calling_ae_title.strip()
        except Exception as exc:  # pynetdicom's decoders raise anything on malformed input
            raise ProtocolError(f"malformed A-ASSOCIATE-RQ ({type(exc).__name__})",
                                AbortReason.INVALID_PDU_PARAMETER_VALUE) from exc
        # The title goes into logs and the index: printable ASCII only (PS3.5 AE: no controls).
        self.calling_aet = calling if calling.isascii() and calling.isprintable() else "?"
        return rq

    def _timeouts(self) -> tuple[float, float]:
        return self.policy.network_timeout, self.deadline

    def _reject(self, rejection: Rejection) -> None:
        primitive = A_ASSOCIATE()
        primitive.result = rejection.result
        primitive.result_source = rejection.source
        primitive.diagnostic = rejection.diagnostic
        rj = A_ASSOCIATE_RJ()
        rj.from_primitive(primitive)
        log.warning("association from %s rejected: %s", self.calling_aet, rejection.why)
        metrics.association_rejected(rejection.result, rejection.source, rejection.diagnostic)
        self._send_quietly(rj.encode())

    def _accept(self, rq: A_ASSOCIATE_RQ) -> None:
        request = rq.to_primitive()
        self.peer_max_pdu = request.maximum_length_received or 0
        roles = {item.sop_class_uid: (item.scu_role, item.scp_role)
                 for item in request.user_information
                 if isinstance(item, SCP_SCU_RoleSelectionNegotiation)
                 and item.sop_class_uid is not None}
        results, role_items = negotiate_as_acceptor(
            request.presentation_context_definition_list, self.policy.contexts, roles)
        self.contexts = {int(cx.context_id): cx for cx in results
                         if cx.result == 0x00 and cx.context_id is not None}
        maximum = MaximumLengthNotification()
        maximum.maximum_length_received = self.policy.maximum_pdu_size
        implementation = ImplementationClassUIDNotification()
        implementation.implementation_class_uid = UID(IMPLEMENTATION_CLASS_UID)
        version = ImplementationVersionNameNotification()
        version.implementation_version_name = IMPLEMENTATION_VERSION_NAME
        primitive = A_ASSOCIATE()
        primitive.application_context_name = UID(APPLICATION_CONTEXT_NAME)
        primitive.calling_ae_title = request.calling_ae_title
        primitive.called_ae_title = request.called_ae_title
        primitive.result = 0x00
        primitive.result_source = 0x01
        primitive.presentation_context_definition_results_list = results
        primitive.user_information = [maximum, implementation, version, *role_items]
        ac = A_ASSOCIATE_AC()
        ac.from_primitive(primitive)
        self.sock.sendall(ac.encode())
        log.debug("association from %s accepted: %d of %d contexts", self.calling_aet,
                  len(self.contexts), len(results))

    def _serve(self) -> bool:
        """Serve DIMSE requests until release (returns ``True``) or a peer abort (``False``)."""
        limit = self.policy.maximum_pdu_size or UNLIMITED_PDU_CAP
        pending: list[memoryview] = []
        pending_size = 0
        while True:
            pdu = read_pdu(self.sock, limit, self._timeouts())
            if pdu.type == PDUType.A_RELEASE_RQ:
                self.sock.sendall(RELEASE_RP)
                return True
            if pdu.type == PDUType.A_ABORT:
                log.info("association from %s aborted by the peer", self.calling_aet)
                return False
            if pdu.type != PDUType.P_DATA_TF:
                raise ProtocolError(f"unexpected PDU type 0x{pdu.type:02x}",
                                    AbortReason.UNEXPECTED_PDU)
            for pdv in split_pdata(pdu.body):
                message = self._message
                if pdv.context_id not in self.contexts:
                    raise ProtocolError(f"PDV on presentation context {pdv.context_id}, which "
                                        "was not accepted", AbortReason.UNEXPECTED_PDU_PARAMETER)
                if message is not None and pdv.context_id != message.context_id:
                    raise ProtocolError("data set fragment on another presentation context",
                                        AbortReason.UNEXPECTED_PDU_PARAMETER)
                if pdv.is_command:
                    if message is not None:
                        raise ProtocolError("command received before the previous data set "
                                            "ended", AbortReason.UNEXPECTED_PDU)
                    pending.append(pdv.fragment)
                    pending_size += len(pdv.fragment)
                    if pending_size > MAX_COMMAND_BYTES:
                        raise ProtocolError("command set longer than any DIMSE command",
                                            AbortReason.INVALID_PDU_PARAMETER_VALUE)
                    if pdv.is_last:
                        message = _Message(pdv.context_id, decode_command(pending))
                        pending, pending_size = [], 0
                        if not message.command.has_dataset:
                            self._dispatch(message)
                        else:
                            if message.command.command_field == C_STORE_RQ:
                                message.data = self._begin_store(message)
                            elif message.command.command_field in (N_CREATE_RQ, N_SET_RQ):
                                message.buffer = DataSetBuffer()
                            self._message = message
                elif message is None:
                    raise ProtocolError("data set fragment without a command",
                                        AbortReason.UNEXPECTED_PDU)
                else:
                    if message.data is not None:
                        message.data.add(pdv.fragment)
                    elif message.buffer is not None:
                        message.buffer.add(pdv.fragment)
                    if pdv.is_last:
                        self._message = None
                        self._dispatch(message)

    def _dispatch(self, message: _Message) -> None:
        command = message.command
        context = self.contexts[message.context_id]
        if command.command_field == C_ECHO_RQ:
            rsp = Response(C_ECHO_RQ, command.message_id, str(context.abstract_syntax), 0x0000)
        elif command.command_field == C_STORE_RQ:
            outcome = self._finish_store(message.data)
            metrics.store_answered(outcome.status, outcome.comment)
            if outcome.status == 0x0000:
                self.stored += 1
            else:
                self.refused += 1
            # Echoed only when they are UIDs: the response must never fail to encode after
            # the instance was stored (both are optional in a C-STORE-RSP, PS3.7 9.3.1.2).
            rsp = Response(C_STORE_RQ, command.message_id, _echo(command.affected_sop_class_uid),
                           outcome.status, sop_instance_uid=_echo(
                               command.affected_sop_instance_uid),
                           error_comment=outcome.comment)
        elif (command.command_field in (N_CREATE_RQ, N_SET_RQ)
              and self.policy.normalized is not None):
            rsp = self._normalized(message, str(context.transfer_syntax[0]))
        else:
            # Only Storage, Verification and (with a handler) MPPS contexts are accepted.
            raise ProtocolError(f"DIMSE command 0x{command.command_field:04x} is not served "
                                "here", AbortReason.UNEXPECTED_PDU_PARAMETER)
        for pdu in command_pdus(message.context_id, rsp.encode(), self.peer_max_pdu):
            self.sock.sendall(pdu)

    def _normalized(self, message: _Message, transfer_syntax: str) -> Response:
        """Answer an N-CREATE (Affected SOP UIDs) or N-SET (Requested SOP UIDs)."""
        command = message.command
        creating = command.command_field == N_CREATE_RQ
        sop_class = (command.affected_sop_class_uid if creating
                     else command.requested_sop_class_uid)
        handler = self.policy.normalized
        if handler is None:  # pragma: no cover - dispatched only with a handler
            raise ProtocolError("N-CREATE/N-SET without a handler",
                                AbortReason.UNEXPECTED_PDU_PARAMETER)
        result = handler(NormalizedRequest(
            calling_aet=self.calling_aet, command_field=command.command_field,
            sop_class_uid=sop_class,
            sop_instance_uid=(command.affected_sop_instance_uid if creating
                              else command.requested_sop_instance_uid),
            transfer_syntax=transfer_syntax), message.buffer)
        return Response(command.command_field, command.message_id, _echo(sop_class),
                        result.status, sop_instance_uid=result.sop_instance_uid,
                        error_comment=result.comment, error_id=result.error_id)

    def _begin_store(self, message: _Message) -> IncomingData:
        """Where the data set of a C-STORE goes: the store function, or a refusal."""
        command = message.command
        context = self.contexts[message.context_id]
        if not (is_valid_uid(command.affected_sop_class_uid)
                and is_valid_uid(command.affected_sop_instance_uid)):
            return Refusal(StoreStatus(CANNOT_UNDERSTAND,
                                       "Affected SOP Class/Instance UID is not a UID"))
        if command.affected_sop_class_uid != context.abstract_syntax:
            return Refusal(StoreStatus(SOP_CLASS_NOT_SUPPORTED,
                                       "SOP Class differs from the presentation context"))
        return self.store(StoreRequest(
            calling_aet=self.calling_aet, sop_class_uid=command.affected_sop_class_uid,
            sop_instance_uid=command.affected_sop_instance_uid,
            transfer_syntax=str(context.transfer_syntax[0])))

    def _finish_store(self, data: IncomingData | None) -> StoreStatus:
        """Store the received data set; an error of ours becomes a failure status, and the
        instance is then not kept (never stored but unacknowledged)."""
        if data is None:  # pragma: no cover - set for every C-STORE with a data set
            return StoreStatus(PROCESSING_FAILURE, "no data set")
        try:
            return data.finish()
        except Exception as exc:
            log.error("C-STORE from %s failed after an internal error: %s", self.calling_aet,
                      error_site(exc))
            self._discard(data)
            return StoreStatus(PROCESSING_FAILURE, "internal error")

    def _discard(self, data: IncomingData) -> None:
        try:
            data.discard()
        except Exception as exc:
            log.error("a partly received data set could not be removed: %s", error_site(exc))

    def _send_quietly(self, data: bytes) -> None:
        # A failure means the peer is gone; there is nobody left to tell.
        with contextlib.suppress(OSError):
            self.sock.sendall(data)



def _echo(uid: str) -> str:
    return uid if is_valid_uid(uid) else ""


def error_site(exc: BaseException) -> str:
    """An exception's type and the place it was raised (file:line), without its message.

    The message of a third-party exception can quote the value that caused it — for a DICOM
    listener, possibly patient data.
    """
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return type(exc).__name__
    last = frames[-1]
    return f"{type(exc).__name__} at {last.filename.rsplit('/', 1)[-1]}:{last.lineno}"
