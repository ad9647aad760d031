"""Orthanc as a real PACS for integration tests: its own process, a JSON config in a temp dir.

``TCP_NODELAY=1`` is set in its environment (without it DCMTK-based peers stall at ≈21
instances/s). Orthanc is up when ``GET /system`` answers; :func:`start_orthanc` waits for that.
Usable by every integration test::

    with start_orthanc(tmp_path, modalities={"DICOMAI": ("DICOMAI", "127.0.0.1", 11112)}) as pacs:
        pacs.post("/modalities/DICOMAI/store", {"Resources": [study_id], "Synchronous": True})
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


def end_with_this_process() -> None:
    """``preexec_fn`` for test peers: Linux sends them SIGTERM when the test process dies, so an
    interrupted test run leaves no server behind."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def orthanc_available() -> bool:
    """True when the ``Orthanc`` executable is installed."""
    return shutil.which("Orthanc") is not None


#: The mark of a test that stores into Orthanc with DCMTK or has serve deliver to it.
NEEDS_ORTHANC_AND_DCMTK = pytest.mark.skipif(
    not (orthanc_available() and shutil.which("storescu")),
    reason="needs Orthanc and DCMTK (apt: orthanc dcmtk)")


@dataclass
class Orthanc:
    """A running Orthanc: its DICOM AE and its REST API."""

    aet: str
    dicom_port: int
    http_port: int
    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        return f"{self.url}/dicom-web"

    def request(self, method: str, path: str, body: Any = None, timeout: float = 60.0) -> Any:
        """Call the REST API; JSON in and out."""
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=timeout) as rsp:
            payload = rsp.read()
        return json.loads(payload) if payload else None

    def get(self, path: str) -> Any:
        return self.request("GET", path)

    def get_text(self, path: str) -> str:
        """A plain-text resource, e.g. ``/instances/{id}/metadata/SopClassUid``."""
        with urllib.request.urlopen(self.url + path, timeout=60) as rsp:
            return str(rsp.read().decode())

    def post(self, path: str, body: Any, timeout: float = 120.0) -> Any:
        return self.request("POST", path, body, timeout)

    def upload(self, path: Path) -> dict[str, Any]:
        """Store one DICOM file through REST (``POST /instances``)."""
        req = urllib.request.Request(self.url + "/instances", data=path.read_bytes(),
                                     method="POST",
                                     headers={"Content-Type": "application/dicom"})
        with urllib.request.urlopen(req, timeout=60) as rsp:
            result: dict[str, Any] = json.loads(rsp.read())
        return result

    def study_id(self, study_instance_uid: str) -> str | None:
        """Orthanc's identifier of a study, or None if it does not hold it."""
        found = self.post("/tools/find", {"Level": "Study",
                                          "Query": {"StudyInstanceUID": study_instance_uid}})
        return str(found[0]) if found else None

    def instances_by_sop_class(self, study_instance_uid: str) -> dict[str, list[str]]:
        """SOP Class UID → SOP Instance UIDs of every instance of a study."""
        found = self.post("/tools/find", {"Level": "Instance", "Expand": True,
                                          "Query": {"StudyInstanceUID": study_instance_uid}})
        out: dict[str, list[str]] = {}
        for instance in found:
            sop_class = self.get_text(f"/instances/{instance['ID']}/metadata/SopClassUid")
            out.setdefault(str(sop_class), []).append(
                instance["MainDicomTags"]["SOPInstanceUID"])
        return out


def _wait_up(orthanc: Orthanc, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if orthanc.process.poll() is not None:
            raise RuntimeError(f"Orthanc exited: {orthanc.log_path.read_text()[-2000:]}")
        try:
            orthanc.get("/system")
            return
        except (urllib.error.URLError, ConnectionError):
            time.sleep(0.05)
    raise TimeoutError("Orthanc did not answer GET /system")


@contextmanager
def start_orthanc(workdir: Path, *, aet: str = "ORTHANC",
                  modalities: Mapping[str, tuple[str, str, int]] | None = None,
                  dicom_port: int | None = None, allow_unknown_callers: bool = True,
                  dicomweb: bool = True,
                  extra: Mapping[str, Any] | None = None) -> Iterator[Orthanc]:
    """Run Orthanc with its storage in ``workdir``; stopped on exit.

    Parameters
    ----------
    workdir:
        Holds the config, the database, the storage and ``orthanc.log``.
    aet:
        Orthanc's AE title.
    modalities:
        ``DicomModalities``: name → (AE title, host, port).
    dicom_port:
        A fixed DICOM port (to restart a PACS where peers expect it); a free one by default.
    allow_unknown_callers:
        False makes Orthanc refuse associations from AE titles not in ``modalities``.
    dicomweb:
        Load the DICOMweb plugin (STOW-RS at ``/dicom-web``).
    extra:
        More configuration keys.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    dicom_port, http_port = dicom_port or free_port(), free_port()
    config: dict[str, Any] = {
        "Name": "dicom-ai-test",
        "DicomAet": aet,
        "DicomPort": dicom_port,
        "HttpPort": http_port,
        "StorageDirectory": str(workdir / "storage"),
        "IndexDirectory": str(workdir / "index"),
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "DicomModalities": {k: list(v) for k, v in (modalities or {}).items()},
        "DicomAlwaysAllowStore": allow_unknown_callers,
        "DicomAlwaysAllowEcho": allow_unknown_callers,
        "DicomCheckModalityHost": False,
        "StableAge": 1,
        "Plugins": [str(DICOMWEB_PLUGIN)] if dicomweb and DICOMWEB_PLUGIN.exists() else [],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
    }
    config.update(extra or {})
    config_path = workdir / "orthanc.json"
    config_path.write_text(json.dumps(config, indent=2))
    log_path = workdir / "orthanc.log"
    env = dict(os.environ, TCP_NODELAY="1")
    with log_path.open("wb") as log:
        process = subprocess.Popen(["Orthanc", str(config_path)], stdout=log,
                                   stderr=subprocess.STDOUT, env=env, cwd=workdir,
                                   preexec_fn=end_with_this_process)
    orthanc = Orthanc(aet, dicom_port, http_port, process, log_path)
    try:
        _wait_up(orthanc, timeout=30.0)
        yield orthanc
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
