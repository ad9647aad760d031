"""The listener, end to end over loopback with a pynetdicom SCU in the test process: durable
before acknowledged, failure statuses, negotiation rules, allow-list, TLS and mutual TLS."""

from __future__ import annotations

import csv
import logging
import socket
import sqlite3
import ssl
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import (
    Comprehensive3DSRStorage,
    ComprehensiveSRStorage,
    CTImageStorage,
    ExplicitVRLittleEndian,
    GrayscaleSoftcopyPresentationStateStorage,
    KeyObjectSelectionDocumentStorage,
    MRImageStorage,
    SecondaryCaptureImageStorage,
    SegmentationStorage,
)
from pynetdicom import AE
from pynetdicom.association import Association
from test_spool import STUDY, encoded

from dicom_ai.config import DestinationSettings, Settings, TLSSettings
from dicom_ai.service import requestor
from dicom_ai.service.association import StoreRequest
from dicom_ai.service.export import Delivery, DimseSender
from dicom_ai.service.scp import (
    STORAGE_SOP_CLASSES,
    TRANSFER_SYNTAXES,
    VERIFICATION,
    FreeBytes,
    Listener,
    StoreHandler,
    disk_free_bytes,
    start_scp,
)
from dicom_ai.service.spool import Spool
from dicom_ai.service.ul import (
    RELEASE_RP,
    AbortReason,
    PDUType,
    PeerClosed,
    abort_pdu,
    read_pdu,
)


@dataclass
class Running:
    server: Listener
    spool: Spool
    port: int


StartSCP = Callable[..., Running]


@pytest.fixture
def scp_factory(tmp_path: Path) -> Iterator[StartSCP]:
    started: list[Running] = []

    def start(settings: Settings | None = None, free: FreeBytes = disk_free_bytes) -> Running:
        settings = settings or Settings()
        settings.scp.port = 0
        settings.storage.minimum_free_mb = 1
        spool = Spool(tmp_path / f"spool{len(started)}")
        server = start_scp(settings, spool, free_bytes=free)
        running = Running(server, spool, int(server.server_address[1]))
        started.append(running)
        return running

    yield start
    for running in started:
        running.server.stop()
        running.spool.close()


def associate(port: int, *, calling: str = "MODALITY", called: str = "DICOMAI",
              contexts: tuple[str, ...] = (CTImageStorage, VERIFICATION),
              tls: tuple[ssl.SSLContext, str] | None = None) -> Association:
    ae = AE(ae_title=calling)
    for uid in contexts:
        ae.add_requested_context(uid, ExplicitVRLittleEndian)
    return requestor.associate(ae, "127.0.0.1", port, ae_title=called, tls_args=tls)


def ct(sop: str, **attrs: Any) -> Dataset:
    return pydicom.dcmread(BytesIO(encoded(sop, **attrs)))


def soon() -> tuple[float, float]:
    """Read timeouts for the test's side: 5 s per read, 10 s in all."""
    return 5.0, time.monotonic() + 10.0


def receive(handler: StoreHandler, request: StoreRequest,
            fragments: list[memoryview] | list[bytes]) -> int:
    """Hand ``fragments`` to the handler as an association does; the status it answers."""
    incoming = handler(request)
    for fragment in fragments:
        incoming.add(memoryview(fragment))
    return incoming.finish().status


def test_store_is_on_disk_and_indexed_when_acknowledged(
        scp_factory: StartSCP, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="dicom_ai.service")
    running = scp_factory()
    assoc = associate(running.port)
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0x0000
    rsp = assoc.send_c_store(ct("1.2.3.100"))
    assert rsp.Status == 0x0000
    path = running.spool.incoming / STUDY / "1.2.826.0.1.3680043.8.498.10.1" / "1.2.3.100.dcm"
    assert path.is_file()
    conn = sqlite3.connect(running.spool.db_path)
    assert conn.execute("SELECT calling_aet FROM instances WHERE sop_instance_uid = '1.2.3.100'"
                        ).fetchone() == ("MODALITY",)
    assoc.release()
    summary = "association from MODALITY ended: 1 instances stored, 0 refused"
    deadline = time.monotonic() + 5
    while summary not in caplog.text and time.monotonic() < deadline:
        time.sleep(0.05)
    assert summary in caplog.text


def test_handler_stores_before_it_returns(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    data = encoded("1.2.3.101")
    meta = pydicom.dcmread(BytesIO(data), stop_before_pixels=True).file_meta
    offset = 132 + 12 + meta.FileMetaInformationGroupLength
    dataset = memoryview(data)[offset:]
    # Fragments as a sender might cut them, the first one ending inside the header.
    request = StoreRequest("CT1", CTImageStorage, "1.2.3.101", meta.TransferSyntaxUID)
    handler = StoreHandler(spool, minimum_free_mb=0, own_manufacturer="dicom-ai")
    assert receive(handler, request, [dataset[:100], dataset[100:]]) == 0x0000
    conn = sqlite3.connect(spool.db_path)
    (rel,) = conn.execute("SELECT path FROM instances").fetchone()
    stored = (tmp_path / rel).read_bytes()
    assert stored.endswith(bytes(dataset))
    written = pydicom.dcmread(BytesIO(stored))
    assert written.file_meta.SourceApplicationEntityTitle == "CT1"
    assert written.SOPInstanceUID == "1.2.3.101"

    garbage = StoreRequest("CT1", CTImageStorage, "1.2.3.999", ExplicitVRLittleEndian)
    assert 0xC000 <= receive(handler, garbage, [b"\x01" * 64]) <= 0xCFFF
    assert conn.execute("SELECT COUNT(*) FROM instances").fetchone() == (1,)


def test_keys_beyond_the_parsed_prefix_are_found(tmp_path: Path) -> None:
    """A header longer than the prefix parsed first (a big private sequence before the UIDs)."""
    from dicom_ai.service.scp import KEYS_PREFIX

    big = Dataset()
    big.add_new(0x00091010, "LO", "owner")
    big.add_new(0x00091011, "OB", b"\x00" * (KEYS_PREFIX + 1000))
    ds = ct("1.2.3.109")
    ds.update(big)
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    data = buffer.getvalue()
    offset = 132 + 12 + ds.file_meta.FileMetaInformationGroupLength
    request = StoreRequest("CT1", CTImageStorage, "1.2.3.109", ExplicitVRLittleEndian)
    handler = StoreHandler(Spool(tmp_path), minimum_free_mb=0, own_manufacturer="dicom-ai")
    assert receive(handler, request, [memoryview(data)[offset:]]) == 0x0000


def test_low_disk_answers_out_of_resources(scp_factory: StartSCP) -> None:
    running = scp_factory(free=lambda _path: 1024 * 1024)
    assoc = associate(running.port)
    rsp = assoc.send_c_store(ct("1.2.3.102"))
    assert rsp.Status == 0xA700
    assert "out of resources" in rsp.ErrorComment
    assert not any(running.spool.incoming.iterdir())
    assoc.release()


def test_unusable_dataset_answers_cannot_understand(scp_factory: StartSCP) -> None:
    running = scp_factory()
    assoc = associate(running.port)
    rsp = assoc.send_c_store(ct("1.2.3.103", SeriesInstanceUID=None))
    assert 0xC000 <= rsp.Status <= 0xCFFF
    assert rsp.ErrorComment == "SeriesInstanceUID is missing"
    rsp = assoc.send_c_store(ct("1.2.3.104", study="1.2.3/../../x"))
    assert 0xC000 <= rsp.Status <= 0xCFFF
    assoc.release()


def test_own_results_are_acknowledged_and_discarded(scp_factory: StartSCP) -> None:
    """Our SC, SR and SEG forwarded back by a PACS: acknowledged (so the PACS is content), never
    stored, so never analysed again. An image of another class naming us as its manufacturer
    (a teaching file, our own sample studies) is an input like any other."""
    running = scp_factory()
    classes = (SecondaryCaptureImageStorage, Comprehensive3DSRStorage, SegmentationStorage)
    image = "1.2.840.10008.5.1.4.1.1.77.1.7"  # Dermoscopic Photography Image Storage
    assoc = associate(running.port, contexts=(*classes, image))
    for n, sop_class in enumerate((*classes, image)):
        ours = ct(f"1.2.3.105{n}", SOPClassUID=sop_class, Manufacturer="dicom-ai")
        ours.file_meta.MediaStorageSOPClassUID = sop_class
        assert assoc.send_c_store(ours).Status == 0x0000
    assoc.release()
    conn = sqlite3.connect(running.spool.db_path)
    assert [r[0] for r in conn.execute("SELECT sop_class_uid FROM instances")] == [image]


def test_every_storage_class_a_study_holds_is_stored(scp_factory: StartSCP) -> None:
    """A PACS forwarding a whole study sends SR, KOS, presentation states, SEG and other
    modalities besides the images: all are stored; a class that is not storage is refused."""
    running = scp_factory()
    study_find = "1.2.840.10008.5.1.4.1.2.2.1"
    others = (ComprehensiveSRStorage, KeyObjectSelectionDocumentStorage,
              GrayscaleSoftcopyPresentationStateStorage, SegmentationStorage, MRImageStorage)
    assoc = associate(running.port, contexts=(*others, study_find))
    assert assoc.is_established
    assert {cx.abstract_syntax for cx in assoc.accepted_contexts} == set(others)
    assert [cx.abstract_syntax for cx in assoc.rejected_contexts] == [study_find]
    for n, sop_class in enumerate(others):
        ds = ct(f"1.2.3.106{n}", SOPClassUID=sop_class)
        ds.file_meta.MediaStorageSOPClassUID = sop_class
        assert assoc.send_c_store(ds).Status == 0x0000, sop_class
    assoc.release()
    conn = sqlite3.connect(running.spool.db_path)
    assert {r[0] for r in conn.execute("SELECT sop_class_uid FROM instances")} == set(others)


def test_wrong_called_ae_title_is_rejected(scp_factory: StartSCP) -> None:
    running = scp_factory()
    assoc = associate(running.port, called="SOMEONE_ELSE")
    assert assoc.is_rejected


def test_unknown_calling_ae_title_gets_the_proper_rejection(
        scp_factory: StartSCP, tmp_path: Path) -> None:
    settings = Settings()
    settings.scp.allowed_calling_aets = ["PACS"]
    running = scp_factory(settings)
    dest = DestinationSettings(name="us", ae_title="DICOMAI", host="127.0.0.1", port=running.port)
    path = tmp_path / "ct.dcm"
    path.write_bytes(encoded("1.2.3.106"))
    item = Delivery(1, path, "1.2.3.106", CTImageStorage, "us", 0)
    # Rejected (permanent), source service user, reason 3: calling AE title not recognised.
    assert DimseSender(dest, "INTRUDER").send([item]) == {
        1: "association rejected: Calling AE title not recognised"}
    assert DimseSender(dest, "PACS").send([item]) == {1: None}


def client_tls(certs: Path, *, with_cert: bool) -> tuple[ssl.SSLContext, str]:
    from dicom_ai.service.tls import client_context

    tls = TLSSettings(enabled=True, ca_certificates=str(certs / "ca.crt"))
    if with_cert:
        tls.certificate, tls.private_key = str(certs / "client.crt"), str(certs / "client.key")
    return client_context(tls), "127.0.0.1"


def tls_settings(certs: Path, *, mutual: bool) -> Settings:
    settings = Settings()
    settings.scp.tls = TLSSettings(enabled=True, certificate=str(certs / "server.crt"),
                                   private_key=str(certs / "server.key"),
                                   ca_certificates=str(certs / "ca.crt") if mutual else "",
                                   require_client_cert=mutual)
    return settings


def test_tls_listener(scp_factory: StartSCP, certs: Path) -> None:
    running = scp_factory(tls_settings(certs, mutual=False))
    assoc = associate(running.port, tls=client_tls(certs, with_cert=False))
    assert assoc.is_established
    assert assoc.send_c_store(ct("1.2.3.107")).Status == 0x0000
    assoc.release()
    assert not associate(running.port).is_established


def test_mutual_tls_requires_a_client_certificate(scp_factory: StartSCP,
                                                  certs: Path) -> None:
    running = scp_factory(tls_settings(certs, mutual=True))
    assert not associate(running.port, tls=client_tls(certs, with_cert=False)).is_established
    assoc = associate(running.port, tls=client_tls(certs, with_cert=True))
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0x0000
    assoc.release()


def test_dimse_sender_over_mutual_tls(scp_factory: StartSCP, certs: Path, tmp_path: Path) -> None:
    running = scp_factory(tls_settings(certs, mutual=True))
    path = tmp_path / "ct.dcm"
    path.write_bytes(encoded("1.2.3.108"))
    item = Delivery(1, path, "1.2.3.108", CTImageStorage, "us", 0)
    tls = TLSSettings(enabled=True, ca_certificates=str(certs / "ca.crt"),
                      certificate=str(certs / "client.crt"), private_key=str(certs / "client.key"))
    dest = DestinationSettings(name="us", ae_title="DICOMAI", host="127.0.0.1", port=running.port,
                               tls=tls)
    assert DimseSender(dest, "PACS").send([item]) == {1: None}
    assert (running.spool.incoming / STUDY).is_dir()


CORPUS = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "dicom"


def corpus_file_per_transfer_syntax() -> dict[str, Path]:
    """One readable corpus file of an accepted SOP class for each transfer syntax we accept."""
    chosen: dict[str, Path] = {}
    with (CORPUS / "INDEX.tsv").open() as fh:
        for row in csv.DictReader(fh, delimiter="\t"):
            if row["status"] != "ok" or "edge-case" in row["flags"]:
                continue
            if row["ts"] in TRANSFER_SYNTAXES and row["ts"] not in chosen:
                ds = pydicom.dcmread(CORPUS / row["path"], stop_before_pixels=True)
                if ds.SOPClassUID in STORAGE_SOP_CLASSES and all(
                        ds.get(k) for k in ("StudyInstanceUID", "SeriesInstanceUID")):
                    chosen[row["ts"]] = CORPUS / row["path"]
    return chosen


@pytest.mark.skipif(not (CORPUS / "INDEX.tsv").is_file(), reason="../shared/data not present")
def test_compressed_and_uncompressed_syntaxes_are_stored_as_sent(scp_factory: StartSCP) -> None:
    running = scp_factory()
    files = corpus_file_per_transfer_syntax()
    # Implicit/explicit LE, big endian, JPEG baseline/extended/lossless SV1, JPEG 2000, RLE.
    assert len(files) >= 9
    ae = AE(ae_title="MODALITY")
    datasets = {ts: pydicom.dcmread(path) for ts, path in files.items()}
    for ts, ds in datasets.items():
        ae.add_requested_context(ds.SOPClassUID, ts)
    assoc = requestor.associate(ae, "127.0.0.1", running.port, ae_title="DICOMAI")
    assert assoc.is_established
    for ts, ds in datasets.items():
        assert assoc.send_c_store(ds).Status == 0x0000, ts
        stored = (running.spool.incoming / ds.StudyInstanceUID / ds.SeriesInstanceUID
                  / f"{ds.SOPInstanceUID}.dcm")
        assert pydicom.dcmread(stored, stop_before_pixels=True).file_meta.TransferSyntaxUID == ts
    assoc.release()


def associate_rq(calling: str = "MODALITY", called: str = "DICOMAI") -> bytes:
    """An A-ASSOCIATE-RQ proposing CT (context 1), encoded with pynetdicom's PDU classes."""
    from pynetdicom.pdu import A_ASSOCIATE_RQ
    from pynetdicom.pdu_primitives import A_ASSOCIATE, MaximumLengthNotification
    from pynetdicom.presentation import build_context

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
    return pdu.encode()


def raw_association(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.sendall(associate_rq())
    assert read_pdu(sock, 1 << 16, soon()).type == PDUType.A_ASSOCIATE_AC
    return sock


def test_protocol_violations_are_aborted_and_the_listener_carries_on(
        scp_factory: StartSCP) -> None:
    running = scp_factory()
    # Not DICOM at all.
    with socket.create_connection(("127.0.0.1", running.port), timeout=5) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\n\r\n")
        assert read_pdu(sock, 64, soon()).raw == abort_pdu(AbortReason.UNRECOGNIZED_PDU)
    # Data on a presentation context that was never accepted.
    with raw_association(running.port) as sock:
        sock.sendall(b"\x04\x00" + struct.pack(">L", 8) + struct.pack(">LBB", 4, 99, 3) + b"xx")
        assert read_pdu(sock, 64, soon()).raw == abort_pdu(AbortReason.UNEXPECTED_PDU_PARAMETER)
    # A second A-ASSOCIATE-RQ inside an association.
    with raw_association(running.port) as sock:
        sock.sendall(associate_rq())
        assert read_pdu(sock, 64, soon()).raw == abort_pdu(AbortReason.UNEXPECTED_PDU)
    # A release is answered.
    with raw_association(running.port) as sock:
        sock.sendall(b"\x05\x00" + struct.pack(">L", 4) + bytes(4))
        assert read_pdu(sock, 64, soon()).raw == RELEASE_RP
    assoc = associate(running.port)
    assert assoc.send_c_store(ct("1.2.3.110")).Status == 0x0000
    assoc.release()


def test_associations_beyond_the_limit_are_rejected_transiently(
        scp_factory: StartSCP) -> None:
    settings = Settings()
    settings.scp.maximum_associations = 1
    running = scp_factory(settings)
    with raw_association(running.port):
        with socket.create_connection(("127.0.0.1", running.port), timeout=5) as second:
            second.sendall(associate_rq())
            rj = read_pdu(second, 64, soon())
        # A-ASSOCIATE-RJ: result 2 (transient), source 3 (presentation), reason 2 (local limit).
        assert rj.type == PDUType.A_ASSOCIATE_RJ and bytes(rj.body)[1:] == bytes((2, 3, 2))
    deadline = time.monotonic() + 5
    while not (assoc := associate(running.port)).is_established:
        assert time.monotonic() < deadline, "the slot was not given back"
    assoc.release()


def test_rejections_name_the_reason(scp_factory: StartSCP) -> None:
    settings = Settings()
    settings.scp.allowed_calling_aets = ["PACS"]
    running = scp_factory(settings)
    for calling, called, reason in [("INTRUDER", "DICOMAI", 3), ("PACS", "ELSEWHERE", 7)]:
        with socket.create_connection(("127.0.0.1", running.port), timeout=5) as sock:
            sock.sendall(associate_rq(calling, called))
            rj = read_pdu(sock, 64, soon())
        # Permanent (1), service user (1), calling (3) or called (7) AE title not recognised.
        assert rj.type == PDUType.A_ASSOCIATE_RJ and bytes(rj.body)[1:] == bytes((1, 1, reason))


def test_idle_association_is_aborted(scp_factory: StartSCP) -> None:
    settings = Settings()
    settings.scp.network_timeout = 0.5
    running = scp_factory(settings)
    with raw_association(running.port) as sock:
        assert read_pdu(sock, 64, soon()).raw == abort_pdu(AbortReason.NOT_SPECIFIED)


def test_stop_cuts_off_an_association_left_open(scp_factory: StartSCP) -> None:
    running = scp_factory()
    with raw_association(running.port) as sock:
        started = time.monotonic()
        running.server.stop(grace_s=0.2)
        assert time.monotonic() - started < 5
        # The connection is closed under the idle requestor; nothing else arrives.
        with pytest.raises(PeerClosed):
            read_pdu(sock, 64, soon())


def test_free_space_is_asked_once_a_second_and_counted_down_between(tmp_path: Path) -> None:
    calls: list[Path] = []

    def free(path: Path) -> int:
        calls.append(path)
        return 10 * 1024 * 1024

    handler = StoreHandler(Spool(tmp_path), minimum_free_mb=8, own_manufacturer="dicom-ai",
                           free_bytes=free)
    mib = 1024 * 1024
    assert handler.reserve(mib)       # 10 MiB free, 9 left after
    assert not handler.reserve(2 * mib)  # 7 would be left: under the 8 MiB minimum
    assert handler.reserve(mib)       # 8 left
    assert len(calls) == 1


def test_one_calling_ae_cannot_take_every_slot(scp_factory: StartSCP) -> None:
    """A peer holding its share of slots idle is rejected beyond it; a modality still stores."""
    settings = Settings()
    settings.scp.maximum_associations = 3
    settings.scp.maximum_associations_per_ae = 2
    running = scp_factory(settings)
    with raw_association(running.port), raw_association(running.port):
        with socket.create_connection(("127.0.0.1", running.port), timeout=5) as third:
            third.sendall(associate_rq())
            rj = read_pdu(third, 64, soon())
        assert rj.type == PDUType.A_ASSOCIATE_RJ and bytes(rj.body)[1:] == bytes((2, 3, 2))
        assoc = associate(running.port, calling="CT1")
        assert assoc.is_established
        assert assoc.send_c_store(ct("1.2.3.120")).Status == 0x0000
        assoc.release()


def large_ct(sop: str, pixel_bytes: int) -> Dataset:
    ds = ct(sop)
    side = int((pixel_bytes // 2) ** 0.5)
    ds.Rows = ds.Columns = side
    ds.PixelData = bytes(range(256)) * (side * side * 2 // 256) + bytes(side * side * 2 % 256)
    return ds


def test_large_data_set_is_streamed_to_disk_and_stored_whole(scp_factory: StartSCP) -> None:
    from dicom_ai.service.scp import SPOOL_AFTER

    running = scp_factory()
    ds = large_ct("1.2.3.121", 3 * SPOOL_AFTER)
    assoc = associate(running.port)
    assert assoc.send_c_store(ds).Status == 0x0000
    assoc.release()
    stored = pydicom.dcmread(running.spool.incoming / STUDY / ds.SeriesInstanceUID
                             / "1.2.3.121.dcm")
    assert stored.PixelData == ds.PixelData
    assert not any(running.spool.tmp.iterdir())


def test_data_set_over_the_maximum_is_refused_and_leaves_nothing(scp_factory: StartSCP) -> None:
    settings = Settings()
    settings.scp.maximum_message_mb = 5
    running = scp_factory(settings)
    assoc = associate(running.port)
    rsp = assoc.send_c_store(large_ct("1.2.3.122", 6 * 1024 * 1024))
    assert rsp.Status == 0xA700 and "too large" in rsp.ErrorComment
    # The association goes on: the next instance is stored.
    assert assoc.send_c_store(ct("1.2.3.123")).Status == 0x0000
    assoc.release()
    conn = sqlite3.connect(running.spool.db_path)
    assert [r[0] for r in conn.execute("SELECT sop_instance_uid FROM instances")] == ["1.2.3.123"]
    assert not any(running.spool.tmp.iterdir())


def test_index_full_answers_out_of_resources_and_leaves_no_file(
        scp_factory: StartSCP, monkeypatch: pytest.MonkeyPatch) -> None:
    """The file is written but its index row cannot be: nothing may remain that a restart would
    index, because the sender was told the store failed."""
    running = scp_factory()

    def full(*_args: object, **_kwargs: object) -> list[bool]:
        exc = sqlite3.OperationalError("database or disk is full")
        exc.sqlite_errorcode = 13  # type: ignore[attr-defined]
        raise exc

    monkeypatch.setattr(running.spool, "_index_rows", full)
    assoc = associate(running.port)
    rsp = assoc.send_c_store(ct("1.2.3.124"))
    assert rsp.Status == 0xA700 and "disk full" in rsp.ErrorComment
    assoc.release()
    assert not list(running.spool.incoming.rglob("*.dcm"))
    monkeypatch.undo()
    assert running.spool.reindex() == 0


def test_internal_error_answers_a_failure_without_its_text(
        scp_factory: StartSCP, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    running = scp_factory()

    def broken(*_args: object, **_kwargs: object) -> None:
        raise ValueError("Doe^Jane 19610704")

    monkeypatch.setattr(running.spool, "store", broken)
    assoc = associate(running.port)
    assert assoc.send_c_store(ct("1.2.3.125")).Status == 0x0110
    monkeypatch.undo()
    assert assoc.send_c_store(ct("1.2.3.126")).Status == 0x0000
    assoc.release()
    assert "internal error: ValueError at test_scp.py" in caplog.text
    assert "Doe" not in caplog.text and "Traceback" not in caplog.text
