"""The DICOM listener: C-ECHO and C-STORE, durable before acknowledged.

The C-STORE handler runs in pynetdicom's association thread and does the least it can: check free
disk, parse the few filing attributes from the encoded bytes (no pixel decoding), write the bytes
as received (fsync, rename, fsync dir), index them, and only then answer 0x0000. Models run in the
worker process, never here.
"""

from __future__ import annotations

import errno
import logging
import shutil
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path

from pydicom.dataset import Dataset
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
from pynetdicom import AE, evt
from pynetdicom.events import Event, EventHandlerType
from pynetdicom.transport import ThreadedAssociationServer

from dicom_ai.config import Settings
from dicom_ai.dicom.errors import DicomInputError
from dicom_ai.service.spool import Spool, parse_keys
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


def _failure(status: int, comment: str) -> Dataset:
    rsp = Dataset()
    rsp.Status = status
    # Error Comment is LO: at most 64 characters.
    rsp.ErrorComment = comment[:64]
    return rsp


class StoreHandler:
    """C-STORE and C-ECHO handlers bound to one spool.

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
    """

    def __init__(self, spool: Spool, *, minimum_free_mb: int, own_manufacturer: str,
                 free_bytes: FreeBytes = disk_free_bytes) -> None:
        self.spool = spool
        self.minimum_free = minimum_free_mb * 1024 * 1024
        self.own_manufacturer = own_manufacturer
        self.free_bytes = free_bytes
        # Per association (by id): [stored, refused], for one summary line when it ends.
        self._tally: dict[int, list[int]] = {}
        self._tally_lock = threading.Lock()

    def on_echo(self, event: Event) -> int:
        """C-ECHO: always success."""
        return SUCCESS

    def on_store(self, event: Event) -> int | Dataset:
        """C-STORE: store durably, then answer; a failure status with a short comment otherwise."""
        rsp = self._store(event)
        stored = rsp == SUCCESS
        with self._tally_lock:
            tally = self._tally.setdefault(id(event.assoc), [0, 0])
            tally[0 if stored else 1] += 1
        return rsp

    def on_closed(self, event: Event) -> None:
        """Association released or aborted: one log line with what it brought."""
        with self._tally_lock:
            stored, refused = self._tally.pop(id(event.assoc), [0, 0])
        if stored or refused:
            log.info("association from %s ended: %d instances stored, %d refused",
                     str(event.assoc.requestor.ae_title).strip(), stored, refused)

    def _store(self, event: Event) -> int | Dataset:
        data: bytes = event.encoded_dataset()
        if self.free_bytes(self.spool.root) - len(data) < self.minimum_free:
            log.warning("C-STORE refused: free disk below storage.minimum_free_mb")
            return _failure(OUT_OF_RESOURCES, "out of resources: disk almost full")
        try:
            keys = parse_keys(data)
        except DicomInputError as exc:
            log.warning("C-STORE from %s refused: %s", event.assoc.requestor.ae_title, exc.reason)
            return _failure(CANNOT_UNDERSTAND, exc.reason)
        if keys.sop_class_uid != event.request.AffectedSOPClassUID:
            return _failure(SOP_CLASS_MISMATCH, "SOP Class UID differs from the request")
        if (keys.sop_class_uid == SecondaryCaptureImageStorage
                and keys.manufacturer == self.own_manufacturer):
            log.info("C-STORE of our own result %s acknowledged and discarded",
                     keys.sop_instance_uid)
            return SUCCESS
        calling = str(event.assoc.requestor.ae_title).strip()
        try:
            stored = self.spool.store([data], keys, calling_aet=calling)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                return _failure(OUT_OF_RESOURCES, "out of resources: disk full")
            log.error("C-STORE %s not stored: %s", keys.sop_instance_uid, exc.strerror)
            return _failure(PROCESSING_FAILURE, "local storage error")
        except sqlite3.Error as exc:
            log.error("C-STORE %s not indexed: %s", keys.sop_instance_uid, exc)
            return _failure(PROCESSING_FAILURE, "local index error")
        log.debug("stored %s (%s)", keys.sop_instance_uid, "new" if stored.new else "again")
        return SUCCESS


def build_ae(settings: Settings) -> AE:
    """The application entity of ``scp``: contexts, limits and the calling-AE allow-list."""
    scp = settings.scp
    ae = AE(ae_title=scp.ae_title)
    for sop_class in STORAGE_SOP_CLASSES:
        ae.add_supported_context(sop_class, list(TRANSFER_SYNTAXES))
    ae.add_supported_context(VERIFICATION, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    ae.maximum_associations = scp.maximum_associations
    ae.maximum_pdu_size = scp.maximum_pdu_size
    ae.network_timeout = scp.network_timeout
    # A caller addressing another AE title has been misconfigured; refuse it ("called AE title
    # not recognized") rather than file its images under the wrong service.
    ae.require_called_aet = True
    # Unknown callers get A-ASSOCIATE-RJ, permanent, reason 3 "calling AE title not recognized".
    ae.require_calling_aet = list(scp.allowed_calling_aets)
    return ae


def start_scp(settings: Settings, spool: Spool, *,
              free_bytes: FreeBytes = disk_free_bytes) -> ThreadedAssociationServer:
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
    ThreadedAssociationServer
        Call ``shutdown()`` to stop.
    """
    handler = StoreHandler(spool, minimum_free_mb=settings.storage.minimum_free_mb,
                           own_manufacturer=settings.output.manufacturer,
                           free_bytes=free_bytes)
    ae = build_ae(settings)
    tls = settings.scp.tls
    handlers: list[EventHandlerType] = [
        (evt.EVT_C_STORE, handler.on_store),
        (evt.EVT_C_ECHO, handler.on_echo),
        (evt.EVT_REJECTED, _log_rejected),
        (evt.EVT_RELEASED, handler.on_closed),
        (evt.EVT_ABORTED, handler.on_closed),
    ]
    server = ae.start_server(
        (settings.scp.bind_address, settings.scp.port), block=False, evt_handlers=handlers,
        ssl_context=server_context(tls) if tls.enabled else None)
    assert server is not None  # start_server returns the server when block=False
    log.info("listening as %s on %s:%d%s", settings.scp.ae_title, settings.scp.bind_address,
             settings.scp.port, " (TLS)" if tls.enabled else "")
    return server


def _log_rejected(event: Event) -> None:
    log.warning("association from %s rejected", event.assoc.requestor.ae_title)
