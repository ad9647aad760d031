"""The DICOM listener: C-ECHO and C-STORE, durable before acknowledged.

The C-STORE handler runs in the association's thread (:mod:`dicom_ai.service.association`) and
does the least it can: check free disk, parse the few filing attributes from the encoded bytes (no
pixel decoding), write the bytes as received (fsync, rename, fsync dir), index them, and only then
answer 0x0000. Models run in the worker process, never here.
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
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydicom.uid import (
    HTJ2K,
    JPEG2000,
    ComputedRadiographyImageStorage,
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
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
    OphthalmicPhotography8BitImageStorage,
    OphthalmicPhotography16BitImageStorage,
    RLELossless,
    SecondaryCaptureImageStorage,
    VLPhotographicImageStorage,
)
from pynetdicom.presentation import PresentationContext, build_context

from dicom_ai.config import SCPSettings, Settings
from dicom_ai.dicom.errors import DicomInputError
from dicom_ai.service.association import (
    ARTIM_TIMEOUT,
    AcceptorPolicy,
    Association,
    StoreFunction,
    StoreRequest,
    StoreStatus,
)
from dicom_ai.service.pacing import SharedClock, stamp
from dicom_ai.service.spool import InstanceKeys, Spool, parse_dataset_keys, part10_header
from dicom_ai.service.tls import server_context

log = logging.getLogger(__name__)

#: The image SOP classes our models read; any other storage context is rejected at negotiation.
STORAGE_SOP_CLASSES: tuple[str, ...] = (
    CTImageStorage,
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
    OphthalmicPhotography8BitImageStorage,
    OphthalmicPhotography16BitImageStorage,
    VLPhotographicImageStorage,
    SecondaryCaptureImageStorage,
)

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
#: PS3.4 Table B.2-1: "Refused: Out of Resources".
OUT_OF_RESOURCES = 0xA700
#: "Error: Data Set does not match SOP Class".
SOP_CLASS_MISMATCH = 0xA900
#: "Error: Cannot understand".
CANNOT_UNDERSTAND = 0xC000
#: PS3.7 C.4: "Processing failure" — an unexpected local error (e.g. the disk failed).
PROCESSING_FAILURE = 0x0110

FreeBytes = Callable[[Path], int]


def disk_free_bytes(path: Path) -> int:
    """Free bytes available on the file system holding ``path``."""
    return shutil.disk_usage(path).free


#: Seconds between two free-space queries to the file system (see ``StoreHandler.reserve``).
FREE_SPACE_REFRESH_S = 1.0

#: The filing keys sit in the first few kilobytes of a data set; this much is parsed first.
KEYS_PREFIX = 64 * 1024


def _parse_keys(request: StoreRequest) -> InstanceKeys:
    """The filing keys of a received data set: from its first :data:`KEYS_PREFIX` bytes, or from
    all of it when they do not lie there (a header longer than that)."""
    head = bytearray()
    for fragment in request.dataset:
        head += fragment[:KEYS_PREFIX - len(head)]
        if len(head) == KEYS_PREFIX:
            break
    try:
        return parse_dataset_keys(bytes(head), request.transfer_syntax)
    except DicomInputError:
        if len(head) == sum(len(f) for f in request.dataset):
            raise
    return parse_dataset_keys(b"".join(request.dataset), request.transfer_syntax)


class StoreHandler:
    """Stores one C-STORE durably and says what to answer.

    Parameters
    ----------
    spool:
        Where instances go.
    minimum_free_mb:
        Below this much free disk (after the instance), C-STORE answers 0xA700.
    own_manufacturer:
        ``output.manufacturer``: Secondary Captures carrying it are our own results, routed back
        by a PACS; they are acknowledged and discarded so that a routing rule cannot loop.
    free_bytes:
        Free-space probe, replaceable in tests.
    reception:
        Stamped at every C-STORE, so that the worker is paused (:mod:`.pacing`).
    """

    def __init__(self, spool: Spool, *, minimum_free_mb: int, own_manufacturer: str,
                 free_bytes: FreeBytes = disk_free_bytes,
                 reception: SharedClock | None = None) -> None:
        self.spool = spool
        self.minimum_free = minimum_free_mb * 1024 * 1024
        self.own_manufacturer = own_manufacturer
        self.free_bytes = free_bytes
        self.reception = reception
        self._free_lock = threading.Lock()
        self._free = 0
        self._free_measured_at = -FREE_SPACE_REFRESH_S

    def __call__(self, request: StoreRequest) -> StoreStatus:
        """Store ``request`` (file fsync'ed, renamed, indexed) or say why not."""
        if self.reception is not None:
            stamp(self.reception)
        if not self.reserve(sum(len(f) for f in request.dataset)):
            log.warning("C-STORE refused: free disk below storage.minimum_free_mb")
            return StoreStatus(OUT_OF_RESOURCES, "out of resources: disk almost full")
        try:
            keys = _parse_keys(request)
        except DicomInputError as exc:
            log.warning("C-STORE from %s refused: %s", request.calling_aet, exc.reason)
            return StoreStatus(CANNOT_UNDERSTAND, exc.reason)
        if keys.sop_class_uid != request.sop_class_uid:
            return StoreStatus(SOP_CLASS_MISMATCH, "SOP Class UID differs from the request")
        if (keys.sop_class_uid == SecondaryCaptureImageStorage
                and keys.manufacturer == self.own_manufacturer):
            log.info("C-STORE of our own result %s acknowledged and discarded",
                     keys.sop_instance_uid)
            return StoreStatus(SUCCESS)
        # The file meta names the instance the data set holds (the request should agree).
        header = part10_header(keys.sop_class_uid, keys.sop_instance_uid,
                               request.transfer_syntax, request.calling_aet)
        try:
            stored = self.spool.store([header, *request.dataset], keys,
                                      calling_aet=request.calling_aet)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                return StoreStatus(OUT_OF_RESOURCES, "out of resources: disk full")
            log.error("C-STORE %s not stored: %s", keys.sop_instance_uid, exc.strerror)
            return StoreStatus(PROCESSING_FAILURE, "local storage error")
        except sqlite3.Error as exc:
            log.error("C-STORE %s not indexed: %s", keys.sop_instance_uid, exc)
            return StoreStatus(PROCESSING_FAILURE, "local index error")
        log.debug("stored %s (%s)", keys.sop_instance_uid, "new" if stored.new else "again")
        return StoreStatus(SUCCESS)

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


def supported_contexts() -> list[PresentationContext]:
    """Our presentation contexts: each storage class with every syntax we decode, plus C-ECHO."""
    contexts = [build_context(sop_class, list(TRANSFER_SYNTAXES))
                for sop_class in STORAGE_SOP_CLASSES]
    contexts.append(build_context(VERIFICATION, [ExplicitVRLittleEndian, ImplicitVRLittleEndian]))
    return contexts


def acceptor_policy(scp: SCPSettings) -> AcceptorPolicy:
    """What the listener accepts, from the ``scp`` settings."""
    return AcceptorPolicy(
        ae_title=scp.ae_title, contexts=supported_contexts(),
        allowed_calling_aets=frozenset(a.strip() for a in scp.allowed_calling_aets),
        maximum_pdu_size=scp.maximum_pdu_size, network_timeout=scp.network_timeout,
        slots=threading.BoundedSemaphore(scp.maximum_associations))


#: Seconds a stopping service lets open associations finish before cutting them off.
SHUTDOWN_GRACE_S = 10.0


class Listener(socketserver.ThreadingTCPServer):
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

    daemon_threads = True
    allow_reuse_address = True
    # Connections arriving while an association is being set up queue in the kernel.
    request_queue_size = 64

    def __init__(self, address: tuple[str, int], policy: AcceptorPolicy, store: StoreFunction,
                 tls: ssl.SSLContext | None = None) -> None:
        super().__init__(address, socketserver.BaseRequestHandler, bind_and_activate=True)
        self.policy = policy
        self.store = store
        self.tls = tls
        self._thread: threading.Thread | None = None
        self._active: dict[threading.Thread, socket.socket] = {}
        self._active_lock = threading.Lock()

    def finish_request(self, request: Any, client_address: Any) -> None:
        sock: socket.socket = request
        # Each C-STORE-RSP is one small segment the sender waits for; Nagle would delay it.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.tls is not None:
            sock.settimeout(self.policy.network_timeout)
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

    def shutdown_request(self, request: Any) -> None:
        # Association.run() closes its (possibly TLS-wrapped) socket itself.
        pass

    def start(self) -> None:
        """Accept connections in a background thread."""
        self._thread = threading.Thread(target=self.serve_forever, name="scp-listener",
                                        daemon=True)
        self._thread.start()

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
              free_bytes: FreeBytes = disk_free_bytes,
              reception: SharedClock | None = None) -> Listener:
    """Start listening in background threads.

    Parameters
    ----------
    settings:
        Uses ``scp``, ``storage.minimum_free_mb`` and ``output.manufacturer``.
    spool:
        Where received instances go.
    free_bytes:
        Free-space probe, replaceable in tests.
    reception:
        Stamped at every C-STORE (see :class:`StoreHandler`).

    Returns
    -------
    Listener
        Call ``stop()`` to stop.
    """
    handler = StoreHandler(spool, minimum_free_mb=settings.storage.minimum_free_mb,
                           own_manufacturer=settings.output.manufacturer,
                           free_bytes=free_bytes, reception=reception)
    tls = settings.scp.tls
    listener = Listener((settings.scp.bind_address, settings.scp.port),
                        acceptor_policy(settings.scp), handler,
                        server_context(tls) if tls.enabled else None)
    listener.start()
    log.info("listening as %s on %s:%d%s", settings.scp.ae_title, settings.scp.bind_address,
             listener.server_address[1], " (TLS)" if tls.enabled else "")
    return listener
