"""A misbehaving DICOM peer for the robustness tests: raw Upper Layer bytes over loopback, plus the
checks every test makes afterwards (nothing acknowledged lost, nothing half-written indexed, no
traceback, no identity in the log, the listener still serving).

The requests are built by hand — command sets element by element — so that a test can put any
byte into any field, as DICOM SCP attack tools do.
"""

from __future__ import annotations

import socket
import sqlite3
import struct
import time
from collections.abc import Iterable
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Self

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.pdu import A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import A_ASSOCIATE, MaximumLengthNotification
from pynetdicom.presentation import build_context

from dicom_ai.dicom.elements import top_level_values
from dicom_ai.service.requestor import associate
from dicom_ai.service.ul import PDU, PDUType, read_pdu

#: Identity planted in every instance the peers send; no log line may contain any of it.
IDENTITY = {"PatientName": "Zzqx^Yyvw", "PatientID": "PID-8675309",
            "PatientBirthDate": "19610704"}
STUDY = "1.2.826.0.1.3680043.8.498.77"
SERIES = STUDY + ".1"
CALLED = "DICOMAI"


def soon(seconds: float = 10.0) -> tuple[float, float]:
    """Read timeouts of the test's side: 5 s per read, ``seconds`` in all."""
    return 5.0, time.monotonic() + seconds


def ct_dataset(sop: str, *, pixels: int = 16) -> Dataset:
    """A CT instance carrying :data:`IDENTITY`, with ``pixels`` 16-bit pixels."""
    ds = Dataset()
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop
    ds.StudyInstanceUID = STUDY
    ds.SeriesInstanceUID = SERIES
    ds.Modality = "CT"
    ds.Manufacturer = "ACME"
    for key, value in IDENTITY.items():
        setattr(ds, key, value)
    side = max(2, int(pixels ** 0.5))
    ds.Rows = ds.Columns = side
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelRepresentation = 1
    ds.PixelData = (np.arange(side * side) % 4000).astype(np.int16).tobytes()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = sop
    return ds


def dataset_bytes(ds: Dataset) -> bytes:
    """The data set as a C-STORE carries it (Explicit VR Little Endian, no file meta)."""
    buf = BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    data = buf.getvalue()
    meta = pydicom.dcmread(BytesIO(data), stop_before_pixels=True).file_meta
    return data[132 + 12 + int(meta.FileMetaInformationGroupLength):]


def associate_rq(calling: str = "ABUSER", called: str = CALLED) -> bytes:
    """An A-ASSOCIATE-RQ proposing CT Image Storage, Explicit VR Little Endian, as context 1."""
    context = build_context(CTImageStorage, [ExplicitVRLittleEndian])
    context.context_id = 1
    maximum = MaximumLengthNotification()
    maximum.maximum_length_received = 16384
    primitive = A_ASSOCIATE()
    primitive.application_context_name = "1.2.840.10008.3.1.1.1"
    primitive.calling_ae_title = calling
    primitive.called_ae_title = called
    primitive.presentation_context_definition_list = [context]
    primitive.user_information = [maximum]
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(primitive)
    return bytes(pdu.encode())


def element(tag: int, value: bytes, length: int | None = None) -> bytes:
    """An Implicit VR Little Endian element; ``length`` overrides the true length (to lie)."""
    return struct.pack("<HHL", tag >> 16, tag & 0xFFFF,
                       len(value) if length is None else length) + value


#: The fields of a C-STORE-RQ command set (PS3.7 Table 9.3-1), in tag order, as valid values.
def store_fields(sop_instance: str, message_id: int = 1) -> dict[int, bytes]:
    def ui(uid: str) -> bytes:
        raw = uid.encode()
        return raw + b"\0" if len(raw) % 2 else raw

    return {
        0x00000002: ui(CTImageStorage),
        0x00000100: struct.pack("<H", 0x0001),
        0x00000110: struct.pack("<H", message_id),
        0x00000700: struct.pack("<H", 0),
        0x00000800: struct.pack("<H", 0x0000),
        0x00001000: ui(sop_instance),
        0x00001030: b"MOVER ",
        0x00001031: struct.pack("<H", 7),
    }


def command_set(fields: dict[int, bytes], lengths: dict[int, int] | None = None,
                group_length: int | None = None) -> bytes:
    """A command set from ``fields`` with Command Group Length first (true unless given)."""
    body = b"".join(element(tag, value, (lengths or {}).get(tag))
                    for tag, value in sorted(fields.items()))
    return element(0x00000000, struct.pack("<L", len(body) if group_length is None
                                           else group_length)) + body


def pdata(value: bytes, *, command: bool, last: bool = True, context_id: int = 1) -> bytes:
    """One P-DATA-TF PDU carrying one PDV."""
    item = struct.pack(">LBB", len(value) + 2, context_id, (1 if command else 0)
                       | (2 if last else 0)) + value
    return struct.pack(">BxL", PDUType.P_DATA_TF, len(item)) + item


def fragments(data: bytes, size: int = 16000) -> Iterable[bytes]:
    """``data`` as data set P-DATA PDUs of at most ``size`` bytes each."""
    for start in range(0, len(data), size):
        yield pdata(data[start:start + size], command=False,
                    last=start + size >= len(data))


class RawAssociation:
    """A raw connection to the listener, associated as CT storage SCU.

    Parameters
    ----------
    port:
        The listener's port.
    calling:
        Our calling AE title.
    """

    def __init__(self, port: int, calling: str = "ABUSER") -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.sock.sendall(associate_rq(calling))
        answer = self.read()
        if answer.type != PDUType.A_ASSOCIATE_AC:
            raise AssertionError(f"association not accepted: PDU type {answer.type}")

    def read(self, seconds: float = 10.0) -> PDU:
        return read_pdu(self.sock, 1 << 20, soon(seconds))

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


def response_status(pdu: PDU) -> int | None:
    """The Status of a DIMSE response in a P-DATA-TF, or None for any other PDU."""
    if pdu.type != PDUType.P_DATA_TF:
        return None
    body = bytes(pdu.body)[6:]  # one PDV: length (4), context (1), control (1)
    values = top_level_values(body, (0x00000900,), implicit_vr=True, little_endian=True)
    return int(struct.unpack("<H", values[0x00000900])[0])


@dataclass
class Outcome:
    """What a peer was told about one instance: acknowledged (status 0) or not."""

    sop_instance_uid: str
    acknowledged: bool


def store_with_pynetdicom(port: int, sops: Iterable[str], calling: str = "MODALITY",
                          pixels: int = 16) -> list[Outcome]:
    """A well-behaved modality (pynetdicom SCU): stores each instance, reports what it was told."""
    ae = AE(ae_title=calling)
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    assoc = associate(ae, "127.0.0.1", port, ae_title=CALLED)
    outcomes: list[Outcome] = []
    if not assoc.is_established:
        return [Outcome(sop, False) for sop in sops]
    try:
        for sop in sops:
            try:
                rsp = assoc.send_c_store(ct_dataset(sop, pixels=pixels))
            except (OSError, RuntimeError):
                outcomes.append(Outcome(sop, False))
                continue
            outcomes.append(Outcome(sop, getattr(rsp, "Status", None) == 0x0000))
    finally:
        if assoc.is_established:
            assoc.release()
    return outcomes


def indexed(root: Path) -> dict[str, Path]:
    """SOP Instance UID → file of every indexed instance under ``storage.directory``."""
    conn = sqlite3.connect(root / "index.sqlite")
    try:
        return {str(r[0]): root / str(r[1])
                for r in conn.execute("SELECT sop_instance_uid, path FROM instances")}
    finally:
        conn.close()


def assert_consistent(root: Path, acknowledged: Iterable[str] = ()) -> None:
    """Every acknowledged instance is indexed; every indexed file is whole; no file in
    ``incoming/`` lacks a row; no partial file is left in ``tmp/``."""
    rows = indexed(root)
    missing = set(acknowledged) - set(rows)
    assert not missing, f"acknowledged but not indexed: {sorted(missing)}"
    for sop, path in rows.items():
        ds = pydicom.dcmread(path)
        assert ds.SOPInstanceUID == sop
        assert len(ds.PixelData) == ds.Rows * ds.Columns * 2
    on_disk = set((root / "incoming").rglob("*.dcm"))
    assert on_disk == set(rows.values()), "files in incoming/ without an index row"
    assert not list((root / "tmp").iterdir()), "partial files left in tmp/"


def assert_clean_log(text: str) -> None:
    """No traceback and none of :data:`IDENTITY` in captured log text."""
    assert "Traceback" not in text
    for value in IDENTITY.values():
        assert value not in text
        assert value.replace("^", " ") not in text
