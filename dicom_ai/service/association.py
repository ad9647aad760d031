"""One accepted association: negotiation (PS3.8 §7.1), then C-ECHO and C-STORE until release.

The listener runs one :class:`Association` per TCP connection, in its own thread, with blocking
reads. pynetdicom supplies the association codecs — A-ASSOCIATE PDUs and presentation context
negotiation — but not its acceptor engine: that engine hands every PDU between two polling
threads that sleep a millisecond per turn, and on this project's reference machine it reaches
about a third of DCMTK ``storescp``'s rate before a single byte is written to disk (see
``benchmarks/cstore_receive.py``). Here a C-STORE costs one thread's reads, the durable write and
one response.

The service is synchronous (no asynchronous operations window is granted), so a requestor sends one
request at a time and waits for its response.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

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
from dicom_ai.service.dimse import (
    C_ECHO_RQ,
    C_STORE_RQ,
    Command,
    Response,
    decode_command,
)
from dicom_ai.service.ul import (
    RELEASE_RP,
    AbortReason,
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

#: PS3.7 C.4: "Refused: SOP Class not supported" (the context does not carry this class).
SOP_CLASS_NOT_SUPPORTED = 0x0122


@dataclass(frozen=True)
class Rejection:
    """A-ASSOCIATE-RJ parameters (PS3.8 Table 9-21) and why, for the log."""

    result: int
    source: int
    diagnostic: int
    why: str


@dataclass(frozen=True)
class StoreRequest:
    """A C-STORE as the storage handler sees it.

    ``dataset`` is the data set exactly as sent (no file meta), as the fragments received.
    """

    calling_aet: str
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: str
    dataset: Sequence[bytes | memoryview]


@dataclass(frozen=True)
class StoreStatus:
    """The C-STORE-RSP status and, for failures, an Error Comment (LO, ≤ 64 characters)."""

    status: int
    comment: str = ""


StoreFunction = Callable[[StoreRequest], StoreStatus]


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
    slots:
        Concurrent associations; a request beyond them is rejected (transient, local limit).
    """

    ae_title: str
    contexts: list[PresentationContext]
    allowed_calling_aets: frozenset[str]
    maximum_pdu_size: int
    network_timeout: float
    slots: threading.BoundedSemaphore = field(compare=False)

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
    """A DIMSE request being received: its command set, then its data set fragments."""

    context_id: int
    command: Command
    dataset: list[memoryview] = field(default_factory=list)


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

    def run(self) -> None:
        """Negotiate, then serve requests; never raises for anything the peer does."""
        self.sock.settimeout(self.policy.network_timeout)
        holds_slot = False
        # Whether we sent the association's last PDU (RJ, RP or A-ABORT) and the requestor is
        # to close the connection.
        last_word = True
        try:
            rq = self._read_request()
            holds_slot = self.policy.slots.acquire(blocking=False)
            rejection = self.policy.check(rq) or (
                None if holds_slot else Rejection(0x02, 0x03, 0x02, "local limit exceeded"))
            if rejection is not None:
                self._reject(rejection)
                return
            self._accept(rq)
            last_word = self._serve()
        except ProtocolError as exc:
            log.warning("association from %s aborted: %s", self.calling_aet or "?", exc)
            self._send_quietly(abort_pdu(exc.reason))
        except TimeoutError:
            log.warning("association from %s idle for %.0f s: aborted", self.calling_aet or "?",
                        self.policy.network_timeout)
            self._send_quietly(abort_pdu(AbortReason.NOT_SPECIFIED))
        except (PeerClosed, OSError) as exc:
            last_word = False
            log.info("association from %s: connection lost (%s)", self.calling_aet or "?",
                     type(exc).__name__)
        finally:
            if holds_slot:
                self.policy.slots.release()
            if self.stored or self.refused:
                log.info("association from %s ended: %d instances stored, %d refused",
                         self.calling_aet, self.stored, self.refused)
            if last_word:
                self._await_peer_close()
            self.sock.close()

    def _await_peer_close(self) -> None:
        """Let the requestor close the connection (PS3.8 §9.2, state Sta13 with ARTIM).

        Closing first could reset the connection before the peer has read our last PDU; a peer
        that never closes is cut off when ARTIM expires.
        """
        with contextlib.suppress(OSError):
            self.sock.settimeout(ARTIM_TIMEOUT)
            while self.sock.recv(4096):
                pass

    def _read_request(self) -> A_ASSOCIATE_RQ:
        pdu = read_pdu(self.sock, MAX_ASSOCIATE_RQ)
        if pdu.type != PDUType.A_ASSOCIATE_RQ:
            raise ProtocolError(f"expected A-ASSOCIATE-RQ, got PDU type 0x{pdu.type:02x}",
                                AbortReason.UNEXPECTED_PDU)
        rq = A_ASSOCIATE_RQ()
        try:
            rq.decode(bytes(pdu.raw))
        except Exception as exc:  # pynetdicom's decoders raise anything on malformed input
            raise ProtocolError(f"malformed A-ASSOCIATE-RQ ({type(exc).__name__})",
                                AbortReason.INVALID_PDU_PARAMETER_VALUE) from exc
        self.calling_aet = rq.calling_ae_title.strip()
        return rq

    def _reject(self, rejection: Rejection) -> None:
        primitive = A_ASSOCIATE()
        primitive.result = rejection.result
        primitive.result_source = rejection.source
        primitive.diagnostic = rejection.diagnostic
        rj = A_ASSOCIATE_RJ()
        rj.from_primitive(primitive)
        log.warning("association from %s rejected: %s", self.calling_aet, rejection.why)
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
        message: _Message | None = None
        while True:
            pdu = read_pdu(self.sock, limit)
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
                    if pdv.is_last:
                        message = _Message(pdv.context_id, decode_command(pending))
                        pending = []
                        if not message.command.has_dataset:
                            self._dispatch(message)
                            message = None
                elif message is None:
                    raise ProtocolError("data set fragment without a command",
                                        AbortReason.UNEXPECTED_PDU)
                else:
                    message.dataset.append(pdv.fragment)
                    if pdv.is_last:
                        self._dispatch(message)
                        message = None

    def _dispatch(self, message: _Message) -> None:
        command = message.command
        context = self.contexts[message.context_id]
        if command.command_field == C_ECHO_RQ:
            rsp = Response(C_ECHO_RQ, command.message_id, str(context.abstract_syntax), 0x0000)
        elif command.command_field == C_STORE_RQ:
            outcome = self._store(message, context)
            if outcome.status == 0x0000:
                self.stored += 1
            else:
                self.refused += 1
            rsp = Response(C_STORE_RQ, command.message_id, command.affected_sop_class_uid,
                           outcome.status, sop_instance_uid=command.affected_sop_instance_uid,
                           error_comment=outcome.comment)
        else:
            # Only Storage and Verification contexts are ever accepted.
            raise ProtocolError(f"DIMSE command 0x{command.command_field:04x} is not served "
                                "here", AbortReason.UNEXPECTED_PDU_PARAMETER)
        for pdu in command_pdus(message.context_id, rsp.encode(), self.peer_max_pdu):
            self.sock.sendall(pdu)

    def _store(self, message: _Message, context: PresentationContext) -> StoreStatus:
        command = message.command
        if command.affected_sop_class_uid != context.abstract_syntax:
            return StoreStatus(SOP_CLASS_NOT_SUPPORTED,
                               "SOP Class differs from the presentation context")
        return self.store(StoreRequest(
            calling_aet=self.calling_aet, sop_class_uid=command.affected_sop_class_uid,
            sop_instance_uid=command.affected_sop_instance_uid,
            transfer_syntax=str(context.transfer_syntax[0]), dataset=message.dataset))

    def _send_quietly(self, data: bytes) -> None:
        # A failure means the peer is gone; there is nobody left to tell.
        with contextlib.suppress(OSError):
            self.sock.sendall(data)

