"""Upper Layer framing, DIMSE response encoding and the Part 10 header, checked against bytes worked
out from PS3.5/PS3.7/PS3.8 and against pynetdicom's and pydicom's decoders."""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
import zlib
from io import BytesIO

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ImplicitVRLittleEndian,
)
from pynetdicom.dimse_messages import C_ECHO_RQ as C_ECHO_RQ_MESSAGE
from pynetdicom.dimse_messages import C_STORE_RQ as C_STORE_RQ_MESSAGE
from pynetdicom.dimse_primitives import C_ECHO, C_STORE
from pynetdicom.dsutils import decode

from dicom_ai import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from dicom_ai.dicom.errors import MissingAttributeError
from dicom_ai.service.dimse import (
    C_STORE_RQ,
    Command,
    Response,
    decode_command,
)
from dicom_ai.service.spool import parse_dataset_keys, part10_header
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


def pdv(context_id: int, control: int, data: bytes) -> bytes:
    return struct.pack(">LBB", len(data) + 2, context_id, control) + data


def test_split_pdata_reads_each_value_and_its_control_bits() -> None:
    body = pdv(1, 0x03, b"cmd") + pdv(3, 0x00, b"data1") + pdv(3, 0x02, b"")
    values = split_pdata(memoryview(body))
    assert [(v.context_id, v.is_command, v.is_last, bytes(v.fragment)) for v in values] == [
        (1, True, True, b"cmd"), (3, False, False, b"data1"), (3, False, True, b"")]


@pytest.mark.parametrize("body", [
    b"",                                         # no PDV at all
    struct.pack(">LBB", 10, 1, 0x03) + b"abc",   # item longer than the PDU
    struct.pack(">LB", 1, 1),                    # item too short for its control byte
])
def test_split_pdata_refuses_malformed_items(body: bytes) -> None:
    with pytest.raises(ProtocolError) as exc:
        split_pdata(memoryview(body))
    assert exc.value.reason == AbortReason.INVALID_PDU_PARAMETER_VALUE


def soon() -> tuple[float, float]:
    """Read timeouts for tests: 5 s per read, 10 s in all."""
    return 5.0, time.monotonic() + 10.0


def test_read_pdu_frames_and_bounds_the_stream() -> None:
    a, b = socket.socketpair()
    with a, b:
        b.sendall(bytes((0x04, 0)) + struct.pack(">L", 5) + b"hello")
        pdu = read_pdu(a, 100, soon())
        assert pdu.type == PDUType.P_DATA_TF and bytes(pdu.body) == b"hello"
        b.sendall(bytes((0x04, 0)) + struct.pack(">L", 101))
        with pytest.raises(ProtocolError) as exc:
            read_pdu(a, 100, soon())
        assert exc.value.reason == AbortReason.INVALID_PDU_PARAMETER_VALUE
    c, d = socket.socketpair()
    with c, d:
        d.sendall(bytes((0x09, 0)) + struct.pack(">L", 0))
        with pytest.raises(ProtocolError) as exc:
            read_pdu(c, 100, soon())
        assert exc.value.reason == AbortReason.UNRECOGNIZED_PDU
        d.sendall(bytes((0x04, 0)) + struct.pack(">L", 4) + b"ab")
        d.close()
        with pytest.raises(PeerClosed):
            read_pdu(c, 100, soon())


def test_read_pdu_stops_a_trickling_peer_at_the_deadline() -> None:
    """Each byte arrives well within the per-read timeout; the overall deadline still ends it."""
    a, b = socket.socketpair()
    with a, b:
        b.sendall(bytes((0x04, 0)) + struct.pack(">L", 1000))

        def trickle() -> None:
            with contextlib.suppress(OSError):
                for _ in range(40):
                    b.sendall(b"x")
                    time.sleep(0.05)

        sender = threading.Thread(target=trickle)
        sender.start()
        started = time.monotonic()
        with pytest.raises(DeadlineExceeded):
            read_pdu(a, 2000, (1.0, started + 0.5))
        assert time.monotonic() - started < 1.0
        sender.join()
    c, d = socket.socketpair()
    with c, d, pytest.raises(TimeoutError) as idle:
        read_pdu(c, 100, (0.2, time.monotonic() + 10))
    assert not isinstance(idle.value, DeadlineExceeded)


def test_fixed_form_pdus() -> None:
    # PS3.8 §9.3.7 and §9.3.8: type, reserved, length 4, then 4 bytes.
    assert bytes((0x06, 0, 0, 0, 0, 4, 0, 0, 0, 0)) == RELEASE_RP
    # Source 2 (service provider), reason 2 (unexpected PDU).
    assert abort_pdu(AbortReason.UNEXPECTED_PDU) == bytes((0x07, 0, 0, 0, 0, 4, 0, 0, 2, 2))


def test_store_response_decodes_as_pynetdicom_reads_it() -> None:
    rsp = Response(C_STORE_RQ, 7, CTImageStorage, 0xC000, sop_instance_uid="1.2.3",
                   error_comment="odd")
    encoded = rsp.encode()
    ds = decode(BytesIO(encoded), True, True)
    assert ds.CommandField == 0x8001
    assert ds.MessageIDBeingRespondedTo == 7
    assert ds.AffectedSOPClassUID == CTImageStorage
    assert ds.AffectedSOPInstanceUID == "1.2.3"
    assert ds.Status == 0xC000
    assert ds.ErrorComment == "odd"
    assert ds.CommandDataSetType == 0x0101
    # Command Group Length counts the bytes after its own element (12 bytes).
    assert ds.CommandGroupLength == len(encoded) - 12
    # Odd-length values are padded: UI with NUL, LO with a space (PS3.5 §6.2).
    assert b"1.2.3\x00" in encoded and b"odd " in encoded


def test_response_is_fragmented_to_the_peer_maximum() -> None:
    command = Response(C_STORE_RQ, 1, CTImageStorage, 0, sop_instance_uid="1.2").encode()
    whole = list(command_pdus(5, command, 0))
    assert len(whole) == 1
    assert whole[0][:2] == b"\x04\x00" and whole[0][10:12] == bytes((5, 0x03))
    parts = list(command_pdus(5, command, 26))
    fragments = [split_pdata(memoryview(p)[6:])[0] for p in parts]
    assert all(len(p) - 6 <= 26 for p in parts)
    assert b"".join(bytes(f.fragment) for f in fragments) == command
    assert [f.is_last for f in fragments] == [False] * (len(parts) - 1) + [True]
    assert all(f.is_command and f.context_id == 5 for f in fragments)


def pynetdicom_command(primitive: C_STORE | C_ECHO) -> bytes:
    """The command set pynetdicom sends for ``primitive``."""
    message = C_STORE_RQ_MESSAGE() if isinstance(primitive, C_STORE) else C_ECHO_RQ_MESSAGE()
    message.primitive_to_message(primitive)
    parts = [pdv[1:] for pdata in message.encode_msg(1, 0)
             for _, pdv in pdata.presentation_data_value_list if pdv[0] & 0x01]
    return b"".join(parts)


def test_requests_as_pynetdicom_encodes_them() -> None:
    store = C_STORE()
    store.MessageID = 7
    store.AffectedSOPClassUID = CTImageStorage
    store.AffectedSOPInstanceUID = "1.2.345"
    store.Priority = 2
    store.DataSet = BytesIO(b"\x00" * 8)
    command = decode_command([memoryview(pynetdicom_command(store))])
    assert command == Command(C_STORE_RQ, 7, CTImageStorage, "1.2.345", has_dataset=True)
    echo = C_ECHO()
    echo.MessageID = 9
    echo.AffectedSOPClassUID = "1.2.840.10008.1.1"
    command = decode_command([memoryview(pynetdicom_command(echo))])
    assert command == Command(0x0030, 9, "1.2.840.10008.1.1", "", has_dataset=False)


@pytest.mark.parametrize("garbage", [b"\x01\x02\x03",
                                     # a group 0000 element, but no Command Field
                                     struct.pack("<HHL", 0, 0x0110, 2) + b"\x01\x00"])
def test_decode_command_refuses_garbage(garbage: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode_command([memoryview(garbage)])


def test_part10_header_is_read_back_by_pydicom() -> None:
    # "1.2.345" is odd-length and "MODALITY1" too: both must come back unpadded.
    data = part10_header(CTImageStorage, "1.2.345", ImplicitVRLittleEndian, "MODALITY1")
    assert data[:128] == bytes(128) and data[128:132] == b"DICM"
    meta = pydicom.dcmread(BytesIO(data)).file_meta
    assert meta.MediaStorageSOPClassUID == CTImageStorage
    assert meta.MediaStorageSOPInstanceUID == "1.2.345"
    assert meta.TransferSyntaxUID == ImplicitVRLittleEndian
    assert meta.ImplementationClassUID == IMPLEMENTATION_CLASS_UID
    assert meta.ImplementationVersionName == IMPLEMENTATION_VERSION_NAME
    assert meta.SourceApplicationEntityTitle == "MODALITY1"
    assert meta.FileMetaInformationVersion == b"\x00\x01"
    assert meta.FileMetaInformationGroupLength == len(data) - 132 - 12
    assert b"SourceApplication" not in part10_header(CTImageStorage, "1.2", ImplicitVRLittleEndian,
                                                     "")


def dataset_bytes(syntax: str) -> bytes:
    ds = Dataset()
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = "1.2.3.4"
    ds.Manufacturer = "ACME"
    ds.StudyInstanceUID = "1.2.3"
    ds.SeriesInstanceUID = "1.2.3.1"
    ds.Rows = 2
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = syntax
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    meta = pydicom.dcmread(BytesIO(buffer.getvalue()), stop_before_pixels=True).file_meta
    return buffer.getvalue()[132 + 12 + meta.FileMetaInformationGroupLength:]


@pytest.mark.parametrize("syntax", [ImplicitVRLittleEndian, ExplicitVRBigEndian,
                                    DeflatedExplicitVRLittleEndian])
def test_dataset_keys_in_every_byte_order_and_deflated(syntax: str) -> None:
    data = dataset_bytes(syntax)
    if syntax == DeflatedExplicitVRLittleEndian:
        # Really deflated: the raw bytes do not show the UID.
        assert b"1.2.3.4" not in data
        assert b"1.2.3.4" in zlib.decompress(data, -zlib.MAX_WBITS)
    keys = parse_dataset_keys(data, syntax)
    assert (keys.study_instance_uid, keys.series_instance_uid, keys.sop_instance_uid,
            keys.sop_class_uid, keys.manufacturer) == (
        "1.2.3", "1.2.3.1", "1.2.3.4", CTImageStorage, "ACME")


def test_dataset_keys_from_a_prefix_that_stops_short() -> None:
    data = dataset_bytes(ImplicitVRLittleEndian)
    cut = data.index(b"1.2.3.1")  # inside Series Instance UID's value
    with pytest.raises(MissingAttributeError):
        parse_dataset_keys(data[:cut - 8], ImplicitVRLittleEndian)
