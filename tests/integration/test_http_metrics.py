"""``/metrics``, ``/healthz`` and ``/readyz`` of the real ``dicom-ai serve`` after a study went
through: DCMTK ``storescu`` as the modality, Orthanc as the PACS (the helpers of
``test_serve_orthanc``), the numbers read back in the Prometheus text format.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from orthanc import NEEDS_ORTHANC_AND_DCMTK, start_orthanc
from prometheus_client.parser import text_string_to_metric_families
from test_serve_orthanc import (
    SAMPLES,
    SR_PREFIX,
    Serve,
    delivered,
    dimse,
    results_in_pacs,
    study_uid,
    wait_for,
)

pytestmark = [
    pytest.mark.integration,
    NEEDS_ORTHANC_AND_DCMTK,
]


def fetch(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as rsp:
            return rsp.status, rsp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError:
        return 0, ""


def answer_if_ok(url: str) -> str | None:
    status, body = fetch(url)
    return body if status == 200 else None


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_metrics_and_probes_after_a_study_went_through(tmp_path: Path) -> None:
    folder = SAMPLES / "cxr01"
    sent = len(list(folder.rglob("*.dcm")))
    uid = study_uid(folder)
    with start_orthanc(tmp_path / "pacs") as pacs:
        (tmp_path / "serve").mkdir()
        serve = Serve(tmp_path / "serve", [dimse(pacs)])
        base = f"http://127.0.0.1:{serve.http_port}"
        try:
            serve.start()
            wait_for("/healthz", lambda: fetch(base + "/healthz")[0] == 200, timeout=30)
            # Ready once the children run (the listener accepts already).
            ready: dict[str, Any] = json.loads(wait_for(
                "/readyz 200", lambda: answer_if_ok(base + "/readyz"), timeout=60))
            names = {c["name"] for c in ready["checks"]}
            assert {"storage", "listener", "exporter", "destinations/pacs"} <= names
            assert any(n.startswith("worker") for n in names), names

            serve.storescu(folder)
            wait_for("SR and SC in the PACS", lambda: results_in_pacs(pacs, uid))
            queued = wait_for("every result delivered", lambda: delivered(serve, uid))

            status, text = fetch(base + "/metrics")
            assert status == 200
            got = samples(text)
            srs = serve.index("SELECT COUNT(*) FROM outbound WHERE sop_class_uid LIKE ?",
                              SR_PREFIX + "%")[0][0]
            modality = serve.index("SELECT modality FROM jobs WHERE study_instance_uid = ?",
                                   uid)[0][0]
        finally:
            serve.stop()
    assert modality in {"CR", "DX"}
    assert got["dicom_ai_instances_received_total", ()] == sent
    assert got["dicom_ai_studies_completed_total", (("modality", modality),)] >= 1
    assert got["dicom_ai_inference_seconds_count", (("model", "cxr-pneumonia"),)] >= 1
    assert got["dicom_ai_inference_seconds_sum", (("model", "cxr-pneumonia"),)] > 0
    assert got["dicom_ai_deliveries_delivered_total", (("destination", "pacs"),)] == queued
    assert got["dicom_ai_delivery_attempts_total", (("destination", "pacs"),)] >= queued
    assert got["dicom_ai_deliveries_dead_total", (("destination", "pacs"),)] == 0
    assert got["dicom_ai_end_to_end_seconds_count", (("modality", modality),)] == srs
    assert got["dicom_ai_end_to_end_seconds_sum", (("modality", modality),)] > 0
    assert got["dicom_ai_associations_accepted_total", ()] >= 1
    assert got["dicom_ai_associations_open", ()] == 0
    assert got["dicom_ai_queue_depth", (("queue", "delivery"),)] == 0
    assert got["dicom_ai_spool_free_bytes", ()] > 0
    assert got["dicom_ai_index_up", ()] == 1
    done = sum(v for (name, labels), v in got.items()
               if name == "dicom_ai_jobs" and ("state", "done") in labels)
    assert done == 1
    if shutil.which("promtool"):
        # Prometheus' own lint of names, types and help on the whole scrape.
        lint = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True,
                              text=True, timeout=60, check=False)
        assert lint.returncode == 0 and not lint.stdout.strip(), lint.stdout + lint.stderr
