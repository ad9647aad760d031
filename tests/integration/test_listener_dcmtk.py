"""The listener's own Upper Layer acceptor against DCMTK, a second independent implementation:
C-ECHO, C-STORE fragmented over small PDUs, rejection, and TLS with and without a client
certificate (``echoscu``/``storescu`` ``+tls``)."""

from __future__ import annotations

import os
import shutil
import subprocess
import tarfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pydicom
import pytest

from dicom_ai.config import Settings, TLSSettings
from dicom_ai.service.scp import Listener, start_scp
from dicom_ai.service.spool import Spool

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not (shutil.which("storescu") and shutil.which("echoscu")),
                       reason="needs DCMTK (apt: dcmtk)"),
]

CT_ARCHIVE = (Path(__file__).resolve().parents[3] / "shared" / "data" / "ct"
              / "lung_pet_ct_dx_A0002.tar.xz")
Started = tuple[Listener, Spool, int]


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[Callable[[Settings], Started]]:
    running: list[Started] = []

    def start(settings: Settings) -> Started:
        settings.scp.port = 0
        settings.storage.minimum_free_mb = 1
        spool = Spool(tmp_path / f"spool{len(running)}")
        server = start_scp(settings, spool)
        running.append((server, spool, int(server.server_address[1])))
        return running[-1]

    yield start
    for server, spool, _ in running:
        server.stop()
        spool.close()


def dcmtk(tool: str, port: int, *options: str, files: Sequence[Path] = (),
          called: str = "DICOMAI") -> subprocess.CompletedProcess[str]:
    return subprocess.run([tool, "-aet", "MODALITY", "-aec", called, *options, "127.0.0.1",
                           str(port), *map(str, files)], capture_output=True, text=True,
                          timeout=120, env=dict(os.environ, TCP_NODELAY="1"))


@pytest.fixture(scope="module")
def ct_slices(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    if not CT_ARCHIVE.is_file():
        pytest.skip("../shared/data/ct not present")
    out = tmp_path_factory.mktemp("ct")
    with tarfile.open(CT_ARCHIVE) as tar:
        tar.extractall(out, filter="data")
    return sorted(out.rglob("*.dcm"))[:5]


def test_echo_and_store_over_small_pdus(listener: Callable[[Settings], Started],
                                        ct_slices: list[Path]) -> None:
    settings = Settings()
    # 512×512×2-byte slices travel in about 33 PDUs each: fragment reassembly is exercised.
    settings.scp.maximum_pdu_size = 16384
    _, spool, port = listener(settings)
    assert dcmtk("echoscu", port).returncode == 0
    result = dcmtk("storescu", port, files=ct_slices)
    assert result.returncode == 0, result.stderr
    for path in ct_slices:
        ds = pydicom.dcmread(path)
        stored = spool.incoming / ds.StudyInstanceUID / ds.SeriesInstanceUID / (
            f"{ds.SOPInstanceUID}.dcm")
        back = pydicom.dcmread(stored)
        assert back.PixelData == ds.PixelData
        assert back.file_meta.SourceApplicationEntityTitle == "MODALITY"


def test_storescu_to_another_ae_title_is_rejected(listener: Callable[[Settings], Started],
                                                  ct_slices: list[Path]) -> None:
    _, spool, port = listener(Settings())
    result = dcmtk("storescu", port, files=ct_slices[:1], called="ELSEWHERE")
    assert result.returncode != 0
    assert "Called AE Title Not Recognized" in result.stdout + result.stderr
    assert not any(spool.incoming.iterdir())


def test_mutual_tls_with_dcmtk(listener: Callable[[Settings], Started], certs: Path,
                               ct_slices: list[Path]) -> None:
    settings = Settings()
    settings.scp.tls = TLSSettings(
        enabled=True, certificate=str(certs / "server.crt"), private_key=str(certs / "server.key"),
        ca_certificates=str(certs / "ca.crt"), require_client_cert=True)
    _, spool, port = listener(settings)
    trust = ["+cf", str(certs / "ca.crt")]
    with_cert = ["+tls", str(certs / "client.key"), str(certs / "client.crt"), *trust]
    assert dcmtk("echoscu", port, *with_cert).returncode == 0
    result = dcmtk("storescu", port, *with_cert, files=ct_slices[:1])
    assert result.returncode == 0, result.stderr
    assert len(list(spool.incoming.rglob("*.dcm"))) == 1
    # Without a client certificate the handshake fails and nothing is stored.
    anonymous = dcmtk("storescu", port, "+tla", *trust, files=ct_slices[1:2])
    assert anonymous.returncode != 0
    assert "Association Request Failed" in anonymous.stderr
    assert len(list(spool.incoming.rglob("*.dcm"))) == 1
