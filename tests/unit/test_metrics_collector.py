"""Metrics stored in the index and read at scrape time: counters and histogram buckets written in
the worker's and exporter's transactions, the scrape-time state (jobs by state and lane, queues,
dead letters, spool), and the listener's in-memory counters over a real association."""

from __future__ import annotations

import math
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
import yaml
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from pydicom.uid import ComprehensiveSRStorage, CTImageStorage, ExplicitVRLittleEndian
from pynetdicom import AE
from test_export import Flaky
from test_spool import encoded

from dicom_ai.config import ExportSettings, Settings
from dicom_ai.service import db, metrics
from dicom_ai.service.export import Exporter, due_deliveries, record_results
from dicom_ai.service.metrics import (
    END_TO_END_BUCKETS,
    INFERENCE_BUCKETS,
    IndexCollector,
    add_count,
    cumulative_buckets,
    observe,
    record_job,
    refusal_reason,
)
from dicom_ai.service.requestor import associate
from dicom_ai.service.scp import disk_free_bytes, start_scp
from dicom_ai.service.server import Service
from dicom_ai.service.spool import Spool

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(collector: IndexCollector) -> Samples:
    """Every sample of one scrape through the Prometheus text format, as a scraper reads it."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    text = generate_latest(registry).decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[name, tuple(sorted(labels.items()))]


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "storage"


@pytest.fixture
def conn(root: Path) -> Iterator[sqlite3.Connection]:
    root.mkdir()
    connection = db.connect(root / "index.sqlite")
    yield connection
    connection.close()


def collector(root: Path, destinations: tuple[str, ...] = ("pacs",)) -> IndexCollector:
    return IndexCollector(root, destinations=list(destinations), minimum_free_bytes=1 << 20,
                          free_bytes=disk_free_bytes)


def add_job(conn: sqlite3.Connection, uid: str, state: str, *, lane: str = "bulk",
            created_at: float = 0.0) -> int:
    return int(conn.execute(
        "INSERT INTO jobs (study_instance_uid, generation, state, created_at, lane) "
        "VALUES (?, 1, ?, ?, ?) RETURNING id", (uid, state, created_at, lane)).fetchone()[0])


def add_study(conn: sqlite3.Connection, uid: str, last_received: float,
              state: str = "complete") -> None:
    conn.execute("INSERT INTO studies (study_instance_uid, state, generation, instance_count, "
                 "first_received, last_received) VALUES (?, ?, 1, 1, ?, ?)",
                 (uid, state, last_received, last_received))


def add_outbound(conn: sqlite3.Connection, job_id: int, uid: str, sop: str, sop_class: str, *,
                 destination: str = "pacs", created_at: float = 0.0) -> None:
    conn.execute("INSERT INTO outbound (job_id, study_instance_uid, sop_instance_uid, "
                 "sop_class_uid, path, destination, state, next_attempt_at, created_at) "
                 "VALUES (?, ?, ?, ?, ?, ?, 'pending', 0, ?)",
                 (job_id, uid, sop, sop_class, f"outputs/{uid}/{sop}.dcm", destination,
                  created_at))


def test_observations_land_in_their_bucket_and_buckets_are_cumulative(
        conn: sqlite3.Connection, root: Path) -> None:
    # A bound is inclusive (Prometheus' le); past the last finite bound is +Inf.
    for seconds in (0.05, 0.1, 0.3, 7.0, 9999.0):
        observe(conn, "inference_seconds", "cxr-pneumonia", seconds)
    observe(conn, "inference_seconds", "fundus-dr", 1.0)
    samples = scrape(collector(root))
    bucket = "dicom_ai_inference_seconds_bucket"
    assert value(samples, bucket, model="cxr-pneumonia", le="0.1") == 2
    assert value(samples, bucket, model="cxr-pneumonia", le="0.25") == 2
    assert value(samples, bucket, model="cxr-pneumonia", le="0.5") == 3
    assert value(samples, bucket, model="cxr-pneumonia", le="10.0") == 4
    assert value(samples, bucket, model="cxr-pneumonia", le="500.0") == 4
    assert value(samples, bucket, model="cxr-pneumonia", le="+Inf") == 5
    assert value(samples, "dicom_ai_inference_seconds_count", model="cxr-pneumonia") == 5
    assert math.isclose(value(samples, "dicom_ai_inference_seconds_sum",
                              model="cxr-pneumonia"), 0.05 + 0.1 + 0.3 + 7.0 + 9999.0)
    assert value(samples, "dicom_ai_inference_seconds_count", model="fundus-dr") == 1
    # Every label carries every bound, so quantiles over labels line up.
    les = {dict(k[1])["le"] for k in samples if k[0] == bucket and
           dict(k[1])["model"] == "fundus-dr"}
    assert len(les) == len(INFERENCE_BUCKETS)


def test_buckets_of_an_earlier_version_stay_their_own_bucket() -> None:
    buckets, total = cumulative_buckets((1.0, math.inf), {1.0: (2, 1.0), 3.0: (1, 3.0)})
    assert buckets == [("1.0", 2.0), ("3.0", 3.0), ("+Inf", 3.0)]
    assert total == 4.0


def test_unknown_names_are_refused(conn: sqlite3.Connection) -> None:
    with pytest.raises(ValueError, match="unknown counter"):
        add_count(conn, "nonsense", "x")
    with pytest.raises(ValueError, match="unknown histogram"):
        observe(conn, "nonsense", "x", 1.0)


def test_finished_job_counts_inference_per_model_and_the_completed_study(
        conn: sqlite3.Connection, root: Path) -> None:
    done = add_job(conn, "1.2.3", "done")
    superseded = add_job(conn, "1.2.4", "superseded")
    with db.transaction(conn):
        record_job(conn, done, "CR", {"cxr-pneumonia": 1.5, "xr-fracture": 0.4}, done=True)
    with db.transaction(conn):
        record_job(conn, superseded, "CR", {"cxr-pneumonia": 2.0}, done=False)
    assert conn.execute("SELECT modality FROM jobs WHERE id = ?", (done,)).fetchone()[0] == "CR"
    samples = scrape(collector(root))
    assert value(samples, "dicom_ai_studies_completed_total", modality="CR") == 1
    assert value(samples, "dicom_ai_inference_seconds_count", model="cxr-pneumonia") == 2
    assert value(samples, "dicom_ai_inference_seconds_sum", model="cxr-pneumonia") == 3.5
    assert value(samples, "dicom_ai_inference_seconds_count", model="xr-fracture") == 1


def test_a_rolled_back_job_counts_nothing(conn: sqlite3.Connection, root: Path) -> None:
    job = add_job(conn, "1.2.3", "done")
    with pytest.raises(RuntimeError), db.transaction(conn):
        record_job(conn, job, "CT", {"ct-lung": 30.0}, done=True)
        raise RuntimeError("the worker's transaction failed after counting")
    samples = scrape(collector(root))
    assert ("dicom_ai_studies_completed_total", (("modality", "CT"),)) not in samples
    assert ("dicom_ai_inference_seconds_count", (("model", "ct-lung"),)) not in samples


def test_deliveries_count_tries_outcomes_late_dead_and_end_to_end(
        conn: sqlite3.Connection, root: Path) -> None:
    now = 10_000.0
    job = add_job(conn, "1.2.3", "done")
    conn.execute("UPDATE jobs SET modality = 'CR' WHERE id = ?", (job,))
    add_study(conn, "1.2.3", last_received=now - 42.0)
    add_outbound(conn, job, "1.2.3", "1.2.3.1", ComprehensiveSRStorage, created_at=now)
    add_outbound(conn, job, "1.2.3", "1.2.3.2", CTImageStorage, created_at=now)
    settings = ExportSettings(initial_backoff_s=1.0, late_after_s=5.0, retry_horizon_s=20.0)
    flaky = Flaky({"1.2.3.1": None, "1.2.3.2": "association rejected: no"})
    exporter = Exporter(conn, root, {"pacs": flaky}, settings)
    exporter.run_once(now)          # SR stored (end-to-end 42 s), SC refused
    exporter.run_once(now + 6.0)    # SC refused again, now late
    exporter.run_once(now + 30.0)   # SC refused past the horizon: dead
    samples = scrape(collector(root, ("pacs", "archive")))
    assert value(samples, "dicom_ai_delivery_attempts_total", destination="pacs") == 4
    assert value(samples, "dicom_ai_deliveries_delivered_total", destination="pacs") == 1
    assert value(samples, "dicom_ai_delivery_failures_total", destination="pacs") == 3
    assert value(samples, "dicom_ai_deliveries_late_total", destination="pacs") == 1
    assert value(samples, "dicom_ai_deliveries_dead_total", destination="pacs") == 1
    # A configured destination without deliveries is there with zeros.
    assert value(samples, "dicom_ai_delivery_attempts_total", destination="archive") == 0
    assert value(samples, "dicom_ai_dead_letters", destination="pacs") == 1
    assert value(samples, "dicom_ai_end_to_end_seconds_count", modality="CR") == 1
    assert value(samples, "dicom_ai_end_to_end_seconds_sum", modality="CR") == 42.0
    assert value(samples, "dicom_ai_end_to_end_seconds_bucket", modality="CR", le="45.0") == 1
    assert value(samples, "dicom_ai_end_to_end_seconds_bucket", modality="CR", le="30.0") == 0
    assert len({dict(k[1])["le"] for k in samples
                if k[0] == "dicom_ai_end_to_end_seconds_bucket"}) == len(END_TO_END_BUCKETS)


def test_counters_survive_retention_deleting_the_rows(conn: sqlite3.Connection,
                                                      root: Path) -> None:
    job = add_job(conn, "1.2.3", "done")
    add_study(conn, "1.2.3", last_received=0.0)
    add_outbound(conn, job, "1.2.3", "1.2.3.1", ComprehensiveSRStorage)
    with db.transaction(conn):
        record_job(conn, job, "DX", {"cxr-pneumonia": 1.0}, done=True)
    items = due_deliveries(conn, root, time.time())
    record_results(conn, items, {items[0].id: None}, ExportSettings(), time.time())
    before = scrape(collector(root))
    for table in ("outbound", "jobs", "studies"):
        conn.execute(f"DELETE FROM {table}")
    after = scrape(collector(root))
    for name, labels in (("dicom_ai_studies_completed_total", {"modality": "DX"}),
                         ("dicom_ai_deliveries_delivered_total", {"destination": "pacs"}),
                         ("dicom_ai_end_to_end_seconds_count", {"modality": "DX"}),
                         ("dicom_ai_inference_seconds_count", {"model": "cxr-pneumonia"})):
        assert value(after, name, **labels) == value(before, name, **labels) == 1


def test_state_gauges_jobs_by_state_and_lane_queues_and_spool(conn: sqlite3.Connection,
                                                              root: Path) -> None:
    now = time.time()
    add_job(conn, "1.1", "queued", lane="fast", created_at=now - 100.0)
    add_job(conn, "1.2", "queued", lane="bulk", created_at=now - 10.0)
    add_job(conn, "1.3", "running", lane="bulk")
    add_job(conn, "1.4", "failed", lane="bulk")
    add_study(conn, "1.5", now, state="receiving")
    add_outbound(conn, 1, "1.1", "1.1.1", CTImageStorage, created_at=now - 50.0)
    add_outbound(conn, 1, "1.1", "1.1.2", CTImageStorage, destination="archive",
                 created_at=now - 5.0)
    conn.execute("INSERT INTO instances VALUES ('1.5.1', '1.5', '1.5.0', ?, 'x', 1000, 'M', 0)",
                 (CTImageStorage,))
    samples = scrape(collector(root, ("pacs", "archive")))
    assert value(samples, "dicom_ai_jobs", state="queued", lane="fast") == 1
    assert value(samples, "dicom_ai_jobs", state="queued", lane="bulk") == 1
    assert value(samples, "dicom_ai_jobs", state="running", lane="bulk") == 1
    assert value(samples, "dicom_ai_jobs", state="failed", lane="bulk") == 1
    assert value(samples, "dicom_ai_jobs", state="done", lane="fast") == 0
    assert value(samples, "dicom_ai_queue_depth", queue="processing") == 2
    assert value(samples, "dicom_ai_queue_depth", queue="assembly") == 1
    assert value(samples, "dicom_ai_queue_depth", queue="delivery") == 2
    assert 99.0 <= value(samples, "dicom_ai_queue_oldest_age_seconds", queue="processing") < 200
    assert 49.0 <= value(samples, "dicom_ai_queue_oldest_age_seconds", queue="delivery") < 150
    assert value(samples, "dicom_ai_deliveries_pending", destination="pacs") == 1
    assert value(samples, "dicom_ai_deliveries_pending", destination="archive") == 1
    assert value(samples, "dicom_ai_dead_letters", destination="pacs") == 0
    assert value(samples, "dicom_ai_spool_instances") == 1
    assert value(samples, "dicom_ai_spool_instances_bytes") == 1000
    assert value(samples, "dicom_ai_spool_minimum_free_bytes") == 1 << 20
    assert value(samples, "dicom_ai_spool_free_bytes") == pytest.approx(
        disk_free_bytes(root), rel=0.01)
    assert value(samples, "dicom_ai_index_up") == 1
    assert value(samples, "dicom_ai_build_info", version=metrics.__version__) == 1


def test_an_unreadable_index_is_reported_not_raised(tmp_path: Path) -> None:
    root = tmp_path / "storage"
    (root / "index.sqlite").mkdir(parents=True)  # a directory where the database should be
    samples = scrape(collector(root))
    assert value(samples, "dicom_ai_index_up") == 0
    assert ("dicom_ai_jobs", (("lane", "bulk"), ("state", "queued"))) not in samples
    assert value(samples, "dicom_ai_spool_free_bytes") > 0


@pytest.mark.parametrize(("status", "comment", "reason"), [
    (0xA700, "out of resources: disk almost full", "disk_low"),
    (0xA700, "out of resources: disk full", "disk_full"),
    (0xA700, "out of resources: data set too large", "too_large"),
    (0xA700, "", "out_of_resources"),
    (0xA900, "SOP Class UID differs from the request", "sop_class_mismatch"),
    (0xC000, "anything a peer sent", "cannot_understand"),
    (0x0122, "", "sop_class_not_supported"),
    (0x0110, "local storage error", "processing_failure"),
    (0xFE00, "", "other"),
])
def test_refusal_reasons_are_a_fixed_set(status: int, comment: str, reason: str) -> None:
    assert refusal_reason(status, comment) == reason


def count(metric: str, **labels: str) -> float:
    """A main-process instrument's sample now (0 before its first count)."""
    registry = CollectorRegistry()
    for collector in metrics.MAIN_PROCESS_METRICS:
        registry.register(collector)
    return registry.get_sample_value(metric, labels) or 0.0


def test_listener_counts_received_refused_and_associations(tmp_path: Path) -> None:
    settings = Settings()
    settings.scp.port = 0
    settings.storage.minimum_free_mb = 1
    spool = Spool(tmp_path / "spool")
    listener = start_scp(settings, spool)
    port = int(listener.server_address[1])

    received = count("dicom_ai_instances_received_total")
    refused = count("dicom_ai_instances_refused_total", reason="cannot_understand")
    accepted = count("dicom_ai_associations_accepted_total")
    rejected = count("dicom_ai_associations_rejected_total", reason="called_ae_not_recognised")
    try:
        ae = AE(ae_title="MODALITY")
        ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
        assoc = associate(ae, "127.0.0.1", port, ae_title="DICOMAI")
        assert assoc.is_established
        assert count("dicom_ai_associations_open") >= 1
        for n in (1, 2):
            ds = pydicom.dcmread(BytesIO(encoded(f"1.2.826.0.1.3680043.8.498.{n}")))
            assert assoc.send_c_store(ds).Status == 0x0000
        # Without its Study Instance UID (a filing key) the instance is refused with 0xC000.
        broken = pydicom.dcmread(BytesIO(encoded("1.2.826.0.1.3680043.8.498.3",
                                                 StudyInstanceUID=None)))
        assert assoc.send_c_store(broken).Status == 0xC000
        assoc.release()
        wrong = associate(ae, "127.0.0.1", port, ae_title="SOMEONE")
        assert wrong.is_rejected
    finally:
        listener.stop()
        spool.close()
    assert count("dicom_ai_instances_received_total") - received == 2
    assert count("dicom_ai_instances_refused_total", reason="cannot_understand") - refused == 1
    assert count("dicom_ai_associations_accepted_total") - accepted == 1
    assert count("dicom_ai_associations_rejected_total",
                 reason="called_ae_not_recognised") - rejected == 1
    assert count("dicom_ai_associations_open") == 0


def test_a_scrape_neither_waits_for_a_writer_nor_sees_its_uncommitted_rows(
        conn: sqlite3.Connection, root: Path) -> None:
    add_job(conn, "1.1", "done", lane="fast")
    conn.execute("BEGIN IMMEDIATE")  # the worker in the middle of a transaction
    try:
        add_job(conn, "1.2", "done", lane="fast")
        started = time.monotonic()
        samples = scrape(collector(root))
        assert time.monotonic() - started < metrics.READ_TIMEOUT_S
        assert value(samples, "dicom_ai_jobs", state="done", lane="fast") == 1
    finally:
        conn.execute("COMMIT")
    assert value(scrape(collector(root)), "dicom_ai_jobs", state="done", lane="fast") == 2


def test_a_missing_index_is_not_created_by_a_scrape(tmp_path: Path) -> None:
    samples = scrape(collector(tmp_path))
    assert value(samples, "dicom_ai_index_up") == 0
    assert not (tmp_path / "index.sqlite").exists()


PROMETHEUS = Path(__file__).resolve().parents[2] / "deploy" / "prometheus"
RULES = PROMETHEUS / "dicom-ai-alerts.yml"
needs_promtool = pytest.mark.skipif(shutil.which("promtool") is None,
                                    reason="promtool not installed (apt: prometheus)")


def populated_exposition(conn: sqlite3.Connection, root: Path) -> str:
    """/metrics text with a sample in every family (stored, state and listener metrics)."""
    job = add_job(conn, "1.2.3", "done")
    add_study(conn, "1.2.3", last_received=0.0)
    add_outbound(conn, job, "1.2.3", "1.2.3.1", ComprehensiveSRStorage)
    with db.transaction(conn):
        record_job(conn, job, "CR", {"cxr-pneumonia": 1.0}, done=True)
    items = due_deliveries(conn, root, time.time())
    record_results(conn, items, {items[0].id: None}, ExportSettings(), time.time())
    metrics.store_answered(0xA700, "out of resources: disk almost full")
    metrics.association_rejected(0x01, 0x01, 0x03)
    registry = CollectorRegistry(auto_describe=False)
    for listener_metric in metrics.MAIN_PROCESS_METRICS:
        registry.register(listener_metric)
    registry.register(collector(root))
    return generate_latest(registry).decode()


@needs_promtool
def test_exposition_passes_promtools_naming_lint(conn: sqlite3.Connection, root: Path) -> None:
    text = populated_exposition(conn, root)
    done = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True,
                          text=True, timeout=60, check=False)
    assert done.returncode == 0 and not done.stdout.strip(), done.stdout + done.stderr


@needs_promtool
def test_alert_rules_are_valid_and_their_unit_tests_pass() -> None:
    for command in (["promtool", "check", "rules", RULES.name],
                    ["promtool", "test", "rules", "dicom-ai-alerts.test.yml"]):
        done = subprocess.run(command, cwd=PROMETHEUS, capture_output=True, text=True,
                              timeout=120, check=False)
        assert done.returncode == 0, done.stdout + done.stderr


def test_every_metric_an_alert_uses_is_exposed_and_every_alert_documented(
        conn: sqlite3.Connection, root: Path) -> None:
    exposed = {family.name for family in text_string_to_metric_families(
        populated_exposition(conn, root))} | {"dicom_ai_ready"}  # the endpoint's health gauge
    rules = yaml.safe_load(RULES.read_text())["groups"][0]["rules"]
    operations = (PROMETHEUS.parents[1] / "docs" / "operations.md").read_text()
    for rule in rules:
        for name in re.findall(r"\bdicom_ai_\w+", rule["expr"]):
            family = re.sub(r"_(total|bucket|count|sum)$", "", name)
            assert family in exposed, (rule["alert"], name)
        assert f"`{rule['alert']}`" in operations, rule["alert"]


def test_the_supervisor_counts_a_restarted_child(tmp_path: Path) -> None:
    settings = Settings()
    settings.storage.directory = str(tmp_path)
    settings.worker.poll_interval_s = 0.1
    db.connect(tmp_path / "index.sqlite").close()
    service = Service(settings)
    before = count("dicom_ai_child_restarts_total", process="exporter")
    try:
        service._start_child("exporter")
        first = service._children["exporter"]
        assert first.pid is not None
        os.kill(first.pid, signal.SIGKILL)
        first.join(timeout=30)
        service._started_at["exporter"] -= 60  # past the restart interval
        service._supervise()
        assert service._children["exporter"].pid != first.pid
    finally:
        service.stop_children()
    assert count("dicom_ai_child_restarts_total", process="exporter") - before == 1
