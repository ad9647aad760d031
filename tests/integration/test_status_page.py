"""The status page in a browser, after a study went through ``dicom-ai serve``.

A chest radiograph from ``sample_studies/cxr01`` (with a patient name, ID and birth date planted
into it) is sent with DCMTK ``storescu`` to a real ``dicom-ai serve`` with its HTTP endpoint on a
free port and a token, and two destinations: Orthanc (delivered) and an address where nothing
listens (a dead letter after a 1 s retry horizon). Once the results are delivered and the dead
letter is dead, Debian's headless Chromium (npm ``playwright-core``, ``page/drive.mjs``) loads
``/?token=…`` and the test checks what it showed: the study UID and modality, the model, each
finding's label and probability from ``findings.json``, every SC thumbnail loaded, both
destinations, the dead letter with its reason, the disclaimer — and no patient identity, nothing
loaded from elsewhere, no error. Without the token the endpoint answers 401.

The screenshot goes to ``$STATUS_PAGE_SCREENSHOT`` (``docs/status-page.png`` for the docs) or the
test's temp dir. The serve, Orthanc, storescu and browser helpers are those of
``test_serve_orthanc.py`` and ``test_ohif.py``.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import socket
import subprocess
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pydicom
import pytest
from orthanc import NEEDS_ORTHANC_AND_DCMTK, end_with_this_process, free_port, start_orthanc
from test_ohif import CACHE, CHROMIUM, install_driver
from test_serve_orthanc import SAMPLES, Serve, dimse, wait_for

from dicom_ai import DISCLAIMER
from tests.identity import leaks

pytestmark = [
    pytest.mark.integration,
    NEEDS_ORTHANC_AND_DCMTK,
    pytest.mark.skipif(not CHROMIUM.exists() or shutil.which("npm") is None,
                       reason="/usr/bin/chromium and node/npm needed"),
]

DRIVER = Path(__file__).resolve().parent / "page" / "drive.mjs"
TOKEN = "status-page-test-token"
#: Bound on each browser step (launch, load, images) and on the whole driver process.
STEP_TIMEOUT_S = 30
BROWSER_KILL_S = 90
#: Bound on the wait for the study's results (quiet period, model loading, inference, export).
RESULT_TIMEOUT_S = 180.0


def planted_study(folder: Path) -> Path:
    """``cxr01`` with identity the page must never show (values from :mod:`tests.identity`)."""
    (source,) = sorted((SAMPLES / "cxr01").rglob("*.dcm"))
    ds = pydicom.dcmread(source)
    ds.PatientName, ds.PatientID, ds.PatientBirthDate = "Zzqx^Yyvw", "PID8675309", "19610704"
    folder.mkdir()
    ds.save_as(folder / source.name)
    return folder


def http_get(url: str, **headers: str) -> tuple[int, bytes]:
    request = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return int(response.status), bytes(response.read())
    except urllib.error.HTTPError as error:
        return int(error.code), bytes(error.read())


def raw_status(port: int, target: str) -> int:
    """The status of a GET of ``target`` sent exactly as written (no client normalization)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.putrequest("GET", target, skip_accept_encoding=True)
        connection.putheader("Authorization", f"Bearer {TOKEN}")
        connection.endheaders()
        return connection.getresponse().status
    finally:
        connection.close()


def settled(serve: Serve, study: str) -> bool:
    """The job is done, every result delivered to the PACS and dead for the closed port."""
    rows = serve.index("SELECT destination, state FROM outbound WHERE study_instance_uid = ?",
                       study)
    jobs = serve.index("SELECT state FROM jobs WHERE study_instance_uid = ?", study)
    return bool(rows) and jobs == [("done",)] and all(
        state == ("delivered" if dest == "pacs" else "dead") for dest, state in rows)


def browse(url: str, work: Path, screenshot: Path) -> dict[str, Any]:
    profile = work / "chromium-profile"
    profile.mkdir()
    plan = {"url": url, "chromium": str(CHROMIUM), "userDataDir": str(profile),
            "nodeModules": str(install_driver(CACHE)), "timeoutMs": STEP_TIMEOUT_S * 1000,
            "screenshot": str(screenshot)}
    plan_path, result_path = work / "plan.json", work / "seen.json"
    plan_path.write_text(json.dumps(plan))
    with (work / "drive.log").open("wb") as log:
        subprocess.run(["node", str(DRIVER), str(plan_path), str(result_path)], stdout=log,
                       stderr=subprocess.STDOUT, timeout=BROWSER_KILL_S, check=True,
                       preexec_fn=end_with_this_process)
    seen: dict[str, Any] = json.loads(result_path.read_text())
    return seen


def test_status_page_in_chromium_after_a_study(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    folder = planted_study(tmp_path / "study")
    study = str(pydicom.dcmread(next(folder.glob("*.dcm")), stop_before_pixels=True)
                .StudyInstanceUID)
    http_port = free_port()
    closed = {"name": "archive", "kind": "dimse", "ae_title": "ARCHIVE", "host": "127.0.0.1",
              "port": free_port()}
    with start_orthanc(tmp_path / "pacs") as pacs:
        (tmp_path / "serve").mkdir()
        serve = Serve(tmp_path / "serve", [dimse(pacs), closed], initial_backoff_s=0.2,
                      max_backoff_s=0.5, retry_horizon_s=1.0)
        # The environment overrides whatever [http] the shared config writer puts in the file.
        monkeypatch.setenv("DICOM_AI_HTTP_BIND_ADDRESS", "127.0.0.1")
        monkeypatch.setenv("DICOM_AI_HTTP_PORT", str(http_port))
        monkeypatch.setenv("DICOM_AI_HTTP_TOKEN", TOKEN)
        try:
            serve.start()

            def http_up() -> bool:
                with socket.socket() as s:
                    return s.connect_ex(("127.0.0.1", http_port)) == 0

            wait_for("the HTTP endpoint", http_up, timeout=30, every=0.1)
            serve.storescu(folder)
            wait_for("results delivered and the dead letter dead",
                     lambda: settled(serve, study), timeout=RESULT_TIMEOUT_S)
            base = f"http://127.0.0.1:{http_port}"
            assert http_get(f"{base}/")[0] == 401
            assert http_get(f"{base}/?token=wrong")[0] == 401
            status, body = http_get(f"{base}/", Authorization=f"Bearer {TOKEN}")
            assert status == 200 and study.encode() in body
            for target in ("/thumbnails/../index.sqlite.png", "/thumbnails/%2e%2e/%2e%2e.png",
                           f"/thumbnails/{study}/..%2F..%2Findex.sqlite.png",
                           f"/thumbnails/{study}/../../index.png"):
                assert raw_status(http_port, target) in (400, 404), target
            shot = Path(os.environ.get("STATUS_PAGE_SCREENSHOT") or tmp_path / "status-page.png")
            seen = browse(f"{base}/?token={TOKEN}", tmp_path, shot)
        finally:
            serve.stop()
        reasons = {r[0] for r in serve.index("SELECT last_error FROM outbound WHERE "
                                             "state = 'dead'")}
    document = json.loads((serve.storage / "outputs" / study / "findings.json").read_text())

    assert "fatal" not in seen, seen.get("fatal")
    assert seen["status"] == 200 and seen["title"] == "dicom-ai status"
    assert (seen["errors"], seen["failed"], seen["foreign"]) == ([], [], [])
    text = seen["text"]
    assert DISCLAIMER in text
    # innerText puts a tab between the cells of a table row.
    assert f"Study {study} complete" in text
    assert "\nCR\t1\t" in text  # modality, instances
    assert leaks(text) == [] and leaks(seen["html"]) == []
    scs = []
    for result in document["results"]:
        assert result["model"]["name"] in text and result["status"] in text
        for finding in result["findings"]:
            row = f"\n{finding['label']}\t"
            if "probability" in finding:
                row += f"{finding['probability']:.3f}\t"
            assert row in text, row
        scs += [n[3:-4] for n in result["outputs"] if n.startswith("sc-")]
    assert scs, document
    shown = {img["src"]: img for img in seen["images"]}
    for sop in scs:
        img = shown[f"/thumbnails/{study}/{sop}.png"]
        assert img["complete"] and img["naturalWidth"] > 0 and img["naturalHeight"] > 0, img
        assert max(img["naturalWidth"], img["naturalHeight"]) <= 256, img
    assert "pacs" in text and "archive" in text and "failing" in text
    assert reasons and all(r in text for r in reasons), reasons
    assert Path(seen["screenshot"]).stat().st_size > 10_000
