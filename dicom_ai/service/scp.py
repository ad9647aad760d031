"""The DICOM listener: C-ECHO and C-STORE, durable before acknowledged; MPPS N-CREATE/N-SET.

The C-STORE handler runs in the association's thread (:mod:`dicom_ai.service.association`) and
does the least it can: check free disk, parse the few filing attributes from the encoded bytes (no
pixel decoding), write the bytes as received (fsync, rename, fsync dir), index them, and only then
answer 0x0000. A data set is kept in memory up to :data:`SPOOL_AFTER` bytes and beyond that
written to its temporary file as it arrives, so a large one costs no more memory than a small
one; one over ``scp.maximum_message_mb`` is refused. Every storage SOP class is accepted (a PACS
forwarding a study sends SR, KOS, presentation states, segmentations…) and stored; which series a
model analyses is the pipeline's decision. Our own results coming back are acknowledged and
dropped, never stored or analysed again. Models run in the worker process, never here.
Modality Performed Procedure Steps are served by :mod:`dicom_ai.service.mpps`.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import shutil
import socket
import socketserver
import sqlite3
import ssl
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydicom.uid import (
    HTJ2K,
    JPEG2000,
    Comprehensive3DSRStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
    SecondaryCaptureImageStorage,
    SegmentationStorage,
)
from pynetdicom import AllStoragePresentationContexts
from pynetdicom.presentation import PresentationContext, build_context

from dicom_ai.config import SCPSettings, Settings
from dicom_ai.dicom.errors import DicomInputError
from dicom_ai.service import audit
from dicom_ai.service.association import (
    ARTIM_TIMEOUT,
    PROCESSING_FAILURE,
    AcceptorPolicy,
    Association,
    Slots,
    StoreFunction,
    StoreRequest,
    StoreStatus,
    error_site,
)
from dicom_ai.service.mpps import MPPS_SOP_CLASS, MppsHandler, NormalizedFunction
from dicom_ai.service.spool import (
    InstanceKeys,
    PartialInstance,
    Spool,
    parse_dataset_keys,
    part10_header,
)
from dicom_ai.service.tcp import BoundedThreadingTCPServer
from dicom_ai.service.tls import server_context

log = logging.getLogger(__name__)

#: The classes of what the pipeline writes (:mod:`dicom_ai.results`).
OWN_RESULT_CLASSES = frozenset({Comprehensive3DSRStorage, SecondaryCaptureImageStorage,
                                SegmentationStorage})

#: Every storage SOP class pynetdicom knows (PS3.4 Annex B, GG, …): a study can hold any of them.
STORAGE_SOP_CLASSES: tuple[str, ...] = tuple(
    str(cx.abstract_syntax) for cx in AllStoragePresentationContexts)

#: Transfer syntaxes the pixel decoders installed with dicom-ai can read (pydicom native,
#: python-gdcm, pylibjpeg-openjpeg, pyjpegls). Accepting one we cannot decode would turn a clean
#: negotiation refusal into a late processing failure. The order is our preference within a
#: proposed context: uncompressed, then lossless, then lossy — never asking a sender to compress
#: an image lossily for us.
TRANSFER_SYNTAXES: tuple[str, ...] = (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEG2000Lossless,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    RLELossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLSNearLossless,
    JPEG2000,
    HTJ2K,
)

#: Verification SOP Class (C-ECHO).
VERIFICATION = "1.2.840.10008.1.1"

SUCCESS = 0x0000
#: PS3.4 Table B.2-1: "Refused: Out of Resources" — disk full or almost, data set too large.
OUT_OF_RESOURCES = 0xA700
#: "Error: Data Set does not match SOP Class".
SOP_CLASS_MISMATCH = 0xA900
#: "Error: Cannot understand".
CANNOT_UNDERSTAND = 0xC000

#: SQLite's primary result code for "database or disk is full".
_SQLITE_FULL = 13

FreeBytes = Callable[[Path], int]


def disk_free_bytes(path: Path) -> int:
    """Free bytes available on the file system holding ``path``."""
    return shutil.disk_usage(path).free


#: Seconds between two free-space queries to the file system (see ``StoreHandler.reserve``).
FREE_SPACE_REFRESH_S = 1.0

#: The filing keys sit in the first few kilobytes of a data set; this much is parsed first.
KEYS_PREFIX = 64 * 1024
#: A data set is held in memory up to this size (one write of it all, the common case); past it,
#: it goes to its temporary file as it arrives. Its filing keys must lie within this much.
SPOOL_AFTER = 4 * 1024 * 1024


def _parse_keys(fragments: list[memoryview], transfer_syntax: str) -> InstanceKeys:
    """The filing keys of a data set's first fragments: from their first :data:`KEYS_PREFIX`
    bytes, or from all of them when the keys do not lie there (a header longer than that)."""
    head = bytearray()
    for fragment in fragments:
        head += fragment[:KEYS_PREFIX - len(head)]
        if len(head) == KEYS_PREFIX:
            break
    try:
        return parse_dataset_keys(bytes(head), transfer_syntax)
    except DicomInputError:
        if len(head) == sum(len(f) for f in fragments):
            raise
    return parse_dataset_keys(b"".join(fragments), transfer_syntax)


def _is_disk_full(exc: sqlite3.Error) -> bool:
    return (getattr(exc, "sqlite_errorcode", 0) & 0xFF) == _SQLITE_FULL


class StoreHandler:
    """Receives C-STOREs: one :class:`IncomingInstance` per data set, stored durably at its end.

    Parameters
    ----------
    spool:
        Where instances go.
    minimum_free_mb:
        Below this much free disk (after the instance), C-STORE answers 0xA700.
    own_manufacturer:
        ``output.manufacturer``: SRs, Secondary Captures and segmentations carrying it are our
        own results, routed back by a PACS; they are acknowledged and dropped, so that a routing
        rule cannot loop. An image of another class is analysed whatever its manufacturer (a
        test or teaching file may well name us).
    maximum_message_mb:
        ``scp.maximum_message_mb``: a larger data set is refused with 0xA700.
    free_bytes:
        Free-space probe, replaceable in tests.
    """

    def __init__(self, spool: Spool, *, minimum_free_mb: int, own_manufacturer: str,
                 maximum_message_mb: int = SCPSettings.maximum_message_mb,
                 free_bytes: FreeBytes = disk_free_bytes) -> None:
        self.spool = spool
        self.minimum_free = minimum_free_mb * 1024 * 1024
        self.own_manufacturer = own_manufacturer
        self.maximum_message = maximum_message_mb * 1024 * 1024
        self.free_bytes = free_bytes
        self._free_lock = threading.Lock()
        self._free = 0
        self._free_measured_at = -FREE_SPACE_REFRESH_S

    def __call__(self, request: StoreRequest) -> IncomingInstance:
        """Receive the data set of ``request``."""
        return IncomingInstance(self, request)

    def reserve(self, size: int) -> bool:
        """Whether ``size`` more bytes leave ``storage.minimum_free_mb`` free.

        The file system is asked at most every :data:`FREE_SPACE_REFRESH_S`; in between, what
        we store is subtracted from its last answer, so the estimate only errs low.
        """
        with self._free_lock:
            now = time.monotonic()
            if now - self._free_measured_at >= FREE_SPACE_REFRESH_S:
                self._free = self.free_bytes(self.spool.root)
                self._free_measured_at = now
            if self._free - size < self.minimum_free:
                return False
            self._free -= size
            return True


#: Answers of :class:`IncomingInstance`.
_LOW_DISK = StoreStatus(OUT_OF_RESOURCES, "out of resources: disk almost full")
_DISK_FULL = StoreStatus(OUT_OF_RESOURCES, "out of resources: disk full")
_TOO_LARGE = StoreStatus(OUT_OF_RESOURCES, "out of resources: data set too large")


class IncomingInstance:
    """The data set of one C-STORE while it arrives (an ``IncomingData``), then its storage.

    Fragments are kept until :data:`SPOOL_AFTER` bytes have arrived; then the filing keys are read,
    the file is opened in ``tmp/`` and everything that follows is appended as it comes. A refusal
    decided early (too large, disk low, keys unreadable) drops the rest of the data set as it
    arrives and is answered at its end.
    """

    def __init__(self, handler: StoreHandler, request: StoreRequest) -> None:
        self.handler = handler
        self.request = request
        self.size = 0
        self._fragments: list[memoryview] = []
        self._part: PartialInstance | None = None
        self._refusal: StoreStatus | None = None

    def add(self, fragment: memoryview) -> None:
        """Take the next fragment of the data set."""
        if self._refusal is not None:
            return
        self.size += len(fragment)
        if self.size > self.handler.maximum_message:
            log.warning("C-STORE from %s refused: data set over scp.maximum_message_mb",
                        self.request.calling_aet)
            self._refuse(_TOO_LARGE)
        elif self._part is not None:
            self._append([fragment])
        else:
            self._fragments.append(fragment)
            if self.size >= SPOOL_AFTER:
                self._spool()

    def finish(self) -> StoreStatus:
        """Store the whole data set (durable and indexed) or say why not."""
        if self._refusal is not None:
            return self._refusal
        if self._part is None:
            if not self.handler.reserve(self.size):
                log.warning("C-STORE refused: free disk below storage.minimum_free_mb")
                return _LOW_DISK
            keys_or_status = self._keys()
            if isinstance(keys_or_status, StoreStatus):
                return keys_or_status
            return self._store(lambda: self.handler.spool.store(
                [self._header(keys_or_status), *self._fragments], keys_or_status,
                calling_aet=self.request.calling_aet), keys_or_status)
        part = self._part
        self._part = None
        return self._store(part.commit, part.keys)

    def discard(self) -> None:
        """The association ended mid-data-set: remove what was written."""
        self._fragments = []
        if self._part is not None:
            self._part.discard()
            self._part = None

    def _keys(self) -> InstanceKeys | StoreStatus:
        """The filing keys, or the status refusing the instance (which is then not stored)."""
        request = self.request
        try:
            keys = _parse_keys(self._fragments, request.transfer_syntax)
        except DicomInputError as exc:
            log.warning("C-STORE from %s refused: %s", request.calling_aet, exc.reason)
            return StoreStatus(CANNOT_UNDERSTAND, exc.reason)
        if keys.sop_class_uid != request.sop_class_uid:
            return StoreStatus(SOP_CLASS_MISMATCH, "SOP Class UID differs from the request")
        if (keys.manufacturer == self.handler.own_manufacturer
                and keys.sop_class_uid in OWN_RESULT_CLASSES):
            log.info("C-STORE of our own result %s acknowledged and discarded",
                     keys.sop_instance_uid)
            return StoreStatus(SUCCESS)
        return keys

    def _header(self, keys: InstanceKeys) -> bytes:
        # The file meta names the instance the data set holds (the request should agree).
        return part10_header(keys.sop_class_uid, keys.sop_instance_uid,
                             self.request.transfer_syntax, self.request.calling_aet)

    def _spool(self) -> None:
        """Past :data:`SPOOL_AFTER`: open the file, write what came so far, keep appending."""
        keys_or_status = self._keys()
        if isinstance(keys_or_status, StoreStatus):
            self._refuse(keys_or_status)
            return
        try:
            part = self.handler.spool.begin(keys_or_status, calling_aet=self.request.calling_aet)
        except OSError as exc:
            self._refuse(self._storage_error(exc, keys_or_status))
            return
        self._part = part
        fragments, self._fragments = self._fragments, []
        self._append([self._header(keys_or_status), *fragments])

    def _append(self, chunks: list[bytes | memoryview]) -> None:
        part = self._part
        if part is None:  # pragma: no cover - only called with a part open
            return
        if not self.handler.reserve(sum(len(c) for c in chunks)):
            log.warning("C-STORE refused: free disk below storage.minimum_free_mb")
            self._refuse(_LOW_DISK)
            return
        try:
            part.write(chunks)
        except OSError as exc:
            self._refuse(self._storage_error(exc, part.keys))

    def _refuse(self, status: StoreStatus) -> None:
        self.discard()
        self._refusal = status

    def _store(self, store: Callable[[], object], keys: InstanceKeys) -> StoreStatus:
        try:
            stored = store()
        except OSError as exc:
            return self._storage_error(exc, keys)
        except sqlite3.Error as exc:
            if _is_disk_full(exc):
                log.error("C-STORE %s not indexed: disk full", keys.sop_instance_uid)
                return _DISK_FULL
            log.error("C-STORE %s not indexed: %s", keys.sop_instance_uid, type(exc).__name__)
            return StoreStatus(PROCESSING_FAILURE, "local index error")
        log.debug("stored %s", keys.sop_instance_uid)
        audit.received(self.handler.spool.root, keys, calling_aet=self.request.calling_aet,
                       transfer_syntax=self.request.transfer_syntax,
                       new=getattr(stored, "new", True))
        return StoreStatus(SUCCESS)

    @staticmethod
    def _storage_error(exc: OSError, keys: InstanceKeys) -> StoreStatus:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            log.error("C-STORE %s not stored: disk full", keys.sop_instance_uid)
            return _DISK_FULL
        log.error("C-STORE %s not stored: %s", keys.sop_instance_uid, exc.strerror)
        return StoreStatus(PROCESSING_FAILURE, "local storage error")


def supported_contexts(*, mpps: bool = False) -> list[PresentationContext]:
    """Our presentation contexts: each storage class with every syntax we decode, plus C-ECHO,
    plus Modality Performed Procedure Step when ``mpps``.

    Storage classes no model reads are accepted with the same syntaxes: they are stored as sent,
    and a syntax we could not decode does not matter for them.
    """
    contexts = [build_context(sop_class, list(TRANSFER_SYNTAXES))
                for sop_class in STORAGE_SOP_CLASSES]
    contexts.append(build_context(VERIFICATION, [ExplicitVRLittleEndian, ImplicitVRLittleEndian]))
    if mpps:
        contexts.append(build_context(MPPS_SOP_CLASS,
                                      [ExplicitVRLittleEndian, ImplicitVRLittleEndian]))
    return contexts


def acceptor_policy(scp: SCPSettings, *,
                    normalized: NormalizedFunction | None = None) -> AcceptorPolicy:
    """What the listener accepts, from the ``scp`` settings; ``normalized`` serves MPPS."""
    return AcceptorPolicy(
        normalized=normalized,
        ae_title=scp.ae_title, contexts=supported_contexts(mpps=normalized is not None),
        allowed_calling_aets=frozenset(a.strip() for a in scp.allowed_calling_aets),
        maximum_pdu_size=scp.maximum_pdu_size, network_timeout=scp.network_timeout,
        request_timeout=scp.request_timeout_s, association_deadline=scp.association_deadline_s,
        slots=Slots(scp.maximum_associations, scp.maximum_associations_per_ae))


#: Seconds a stopping service lets open associations finish before cutting them off.
SHUTDOWN_GRACE_S = 10.0
#: Open connections (each a thread) per association slot: those beyond are closed at once, so a
#: flood of connections that never associate cannot exhaust threads or memory. Each waits at
#: most ``scp.request_timeout_s`` for its A-ASSOCIATE-RQ.
CONNECTIONS_PER_SLOT = 4
#: Seconds between two log lines about connections closed for the limit above.
_REFUSAL_LOG_INTERVAL_S = 10.0


class Listener(BoundedThreadingTCPServer):
    """The TCP listener: one thread and one :class:`Association` per connection.

    Parameters
    ----------
    address:
        Bind address and port (0 picks a free port; see ``server_address``).
    policy:
        What associations may do.
    store:
        Stores each received instance.
    tls:
        Wraps each connection in TLS when given; the handshake runs in the connection's thread.
    """

    # Connections arriving while an association is being set up queue in the kernel.
    request_queue_size = 64

    def __init__(self, address: tuple[str, int], policy: AcceptorPolicy, store: StoreFunction,
                 tls: ssl.SSLContext | None = None) -> None:
        super().__init__(address, socketserver.BaseRequestHandler,
                         max_connections=CONNECTIONS_PER_SLOT * policy.slots.total)
        self.policy = policy
        self.store = store
        self.tls = tls
        self._thread: threading.Thread | None = None
        self._active: dict[threading.Thread, socket.socket] = {}
        self._active_lock = threading.Lock()
        self._closed_for_limit = 0
        self._limit_logged_at = -_REFUSAL_LOG_INTERVAL_S

    def connection_refused(self, client_address: Any) -> None:
        self._closed_for_limit += 1
        now = time.monotonic()
        if now - self._limit_logged_at >= _REFUSAL_LOG_INTERVAL_S:
            self._limit_logged_at = now
            log.warning("connection from %s closed: %d connections open (%d closed so far)",
                        client_address[0], CONNECTIONS_PER_SLOT * self.policy.slots.total,
                        self._closed_for_limit)

    def finish_request(self, request: Any, client_address: Any) -> None:
        sock: socket.socket = request
        # Each C-STORE-RSP is one small segment the sender waits for; Nagle would delay it.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.tls is not None:
            # The handshake comes before the A-ASSOCIATE-RQ and shares its time.
            sock.settimeout(min(self.policy.network_timeout, self.policy.request_timeout))
            try:
                sock = self.tls.wrap_socket(sock, server_side=True)
            except (ssl.SSLError, OSError) as exc:
                log.warning("TLS handshake with %s failed: %s", client_address[0],
                            getattr(exc, "reason", None) or type(exc).__name__)
                sock.close()
                return
        with self._active_lock:
            self._active[threading.current_thread()] = sock
        try:
            Association(sock, self.policy, self.store).run()
        finally:
            with self._active_lock:
                del self._active[threading.current_thread()]

    def handle_error(self, request: Any, client_address: Any) -> None:
        # socketserver would print a traceback to stderr; ours names the error's kind and place.
        exc = sys.exception()
        log.error("connection from %s failed: %s", client_address[0],
                  error_site(exc) if exc is not None else "unknown error")

    def shutdown_request(self, request: Any) -> None:
        # Association.run() closes its (possibly TLS-wrapped) socket itself.
        pass

    def start(self) -> None:
        """Accept connections in a background thread."""
        self._thread = threading.Thread(target=self.serve_forever, name="scp-listener",
                                        daemon=True)
        self._thread.start()

    @property
    def accepting(self) -> bool:
        """Whether the accept loop runs on an open socket (``/healthz``, ``/readyz``)."""
        return self._thread is not None and self._thread.is_alive() and self.fileno() != -1

    def stop(self, grace_s: float = SHUTDOWN_GRACE_S) -> None:
        """Stop accepting, let open associations finish for ``grace_s``, then cut them off.

        A connection cut off mid-transfer loses nothing acknowledged: an instance being stored
        is stored (its response is what fails), and the sender sends the rest again later.
        """
        self.shutdown()
        self.server_close()
        if self._thread is not None:
            self._thread.join()
        deadline = time.monotonic() + grace_s
        for thread in self._snapshot():
            thread.join(max(0.0, deadline - time.monotonic()))
        for thread, sock in self._snapshot().items():
            log.warning("service stopping: association cut off after %.0f s", grace_s)
            with contextlib.suppress(OSError):
                # The plain socket call, also on a TLS socket: it wakes the blocked reader
                # without unwrapping TLS under that thread's feet.
                socket.socket.shutdown(sock, socket.SHUT_RDWR)
            thread.join(ARTIM_TIMEOUT)

    def _snapshot(self) -> dict[threading.Thread, socket.socket]:
        with self._active_lock:
            return dict(self._active)


def start_scp(settings: Settings, spool: Spool, *,
              free_bytes: FreeBytes = disk_free_bytes) -> Listener:
    """Start listening in background threads.

    Parameters
    ----------
    settings:
        Uses ``scp``, ``storage.minimum_free_mb`` and ``output.manufacturer``.
    spool:
        Where received instances go.
    free_bytes:
        Free-space probe, replaceable in tests.

    Returns
    -------
    Listener
        Call ``stop()`` to stop.
    """
    handler = StoreHandler(spool, minimum_free_mb=settings.storage.minimum_free_mb,
                           own_manufacturer=settings.output.manufacturer,
                           maximum_message_mb=settings.scp.maximum_message_mb,
                           free_bytes=free_bytes)
    tls = settings.scp.tls
    listener = Listener((settings.scp.bind_address, settings.scp.port),
                        acceptor_policy(settings.scp, normalized=MppsHandler(spool.db_path)),
                        handler,
                        server_context(tls) if tls.enabled else None)
    listener.start()
    log.info("listening as %s on %s:%d%s", settings.scp.ae_title, settings.scp.bind_address,
             listener.server_address[1], " (TLS)" if tls.enabled else "")
    return listener
