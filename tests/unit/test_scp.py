"""The listener, end to end over loopback with a pynetdicom SCU in the test process: durable
before acknowledged, failure statuses, negotiation rules, allow-list, TLS and mutual TLS."""

from __future__ import annotations

import csv
import logging
import sqlite3
import ssl
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    MRImageStorage,
    SecondaryCaptureImageStorage,
)
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.transport import ThreadedAssociationServer
from test_spool import STUDY, encoded

from dicom_ai.config import DestinationSettings, Settings, TLSSettings
from dicom_ai.service.export import Delivery, DimseSender
from dicom_ai.service.scp import (
    STORAGE_SOP_CLASSES,
    TRANSFER_SYNTAXES,
    VERIFICATION,
    FreeBytes,
    StoreHandler,
    disk_free_bytes,
    start_scp,
)
from dicom_ai.service.spool import Spool


@dataclass
class Running:
    server: ThreadedAssociationServer
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
        running.server.shutdown()
        running.spool.close()


def associate(port: int, *, calling: str = "MODALITY", called: str = "DICOMAI",
              contexts: tuple[str, ...] = (CTImageStorage, VERIFICATION),
              tls: tuple[ssl.SSLContext, str] | None = None) -> Association:
    ae = AE(ae_title=calling)
    for uid in contexts:
        ae.add_requested_context(uid, ExplicitVRLittleEndian)
    return ae.associate("127.0.0.1", port, ae_title=called, tls_args=tls)


def ct(sop: str, **attrs: Any) -> Dataset:
    from io import BytesIO

    return pydicom.dcmread(BytesIO(encoded(sop, **attrs)))


def test_store_is_on_disk_and_indexed_when_acknowledged(
        scp_factory: StartSCP, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="dicom_ai.service.scp")
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

    class Event:
        """The parts of a pynetdicom C-STORE event the handler reads."""

        class assoc:
            class requestor:
                ae_title = "CT1"

        class request:
            AffectedSOPClassUID = CTImageStorage

        def __init__(self, payload: bytes) -> None:
            self.payload = payload

        def encoded_dataset(self) -> bytes:
            return self.payload

    handler = StoreHandler(spool, minimum_free_mb=0, own_manufacturer="dicom-ai")
    assert handler.on_store(Event(data)) == 0x0000  # type: ignore[arg-type]
    conn = sqlite3.connect(spool.db_path)
    (rel,) = conn.execute("SELECT path FROM instances").fetchone()
    assert (tmp_path / rel).read_bytes() == data

    rsp = handler.on_store(Event(b"\x00" * 128 + b"DICM" + b"\x01" * 64))  # type: ignore[arg-type]
    assert isinstance(rsp, Dataset)
    assert 0xC000 <= rsp.Status <= 0xCFFF
    assert conn.execute("SELECT COUNT(*) FROM instances").fetchone() == (1,)


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


def test_own_secondary_capture_is_acknowledged_and_discarded(
        scp_factory: StartSCP) -> None:
    running = scp_factory()
    assoc = associate(running.port, contexts=(SecondaryCaptureImageStorage,))
    ours = ct("1.2.3.105", SOPClassUID=SecondaryCaptureImageStorage, Manufacturer="dicom-ai")
    ours.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    assert assoc.send_c_store(ours).Status == 0x0000
    assert not any(running.spool.incoming.iterdir())
    assoc.release()


def test_unsupported_sop_class_is_refused_at_negotiation(scp_factory: StartSCP) -> None:
    running = scp_factory()
    assoc = associate(running.port, contexts=(CTImageStorage, MRImageStorage))
    assert assoc.is_established
    assert [cx.abstract_syntax for cx in assoc.accepted_contexts] == [CTImageStorage]
    assert [cx.abstract_syntax for cx in assoc.rejected_contexts] == [MRImageStorage]
    assoc.release()


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


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A test CA, a server certificate for 127.0.0.1 and a client certificate, all signed by it."""
    d = tmp_path_factory.mktemp("certs")
    key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True)

    run("req", "-x509", *key, "-days", "2", "-keyout", "ca.key", "-out", "ca.crt",
        "-subj", "/CN=dicom-ai test CA")
    for name in ("server", "client"):
        run("req", *key, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}")
        (d / f"{name}.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
            "-CAcreateserial", "-days", "2", "-out", f"{name}.crt", "-extfile", f"{name}.ext")
    return d


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
    assoc = ae.associate("127.0.0.1", running.port, ae_title="DICOMAI")
    assert assoc.is_established
    for ts, ds in datasets.items():
        assert assoc.send_c_store(ds).Status == 0x0000, ts
        stored = (running.spool.incoming / ds.StudyInstanceUID / ds.SeriesInstanceUID
                  / f"{ds.SOPInstanceUID}.dcm")
        assert pydicom.dcmread(stored, stop_before_pixels=True).file_meta.TransferSyntaxUID == ts
    assoc.release()
