"""Worker: outputs written before the job is done, one outbound row per object and destination,
failed attempts, interrupted jobs re-queued, supersession when the study re-opened; lanes (fast
before bulk, the reserved fast worker, aging), claims atomic across processes, the pool plan and
the workers' CPU priority."""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import sqlite3
from collections.abc import Sequence
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Event
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import Comprehensive3DSRStorage, SecondaryCaptureImageStorage

from dicom_ai.dicom.errors import SeriesGeometryError
from dicom_ai.service import db
from dicom_ai.service.lanes import (
    BULK,
    BULK_AGING_S,
    FAST,
    WORKER_MEMORY_BYTES,
    WorkerPlan,
    default_processes,
    lane_for,
    plan_workers,
    study_lane,
)
from dicom_ai.service.process import leave_listener_a_core, set_priority, usable_cpus
from dicom_ai.service.spool import Spool
from dicom_ai.service.studies import complete_quiet_studies, record_arrival
from dicom_ai.service.worker import ProcessedStudy, Worker, claim_job, requeue_interrupted

STUDY = "1.2.826.0.1.3680043.8.498.30"


def result(sop: str, sop_class: str) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop
    ds.StudyInstanceUID = STUDY
    ds.SeriesInstanceUID = sop + ".0"
    return ds


class Recorder:
    """A processor that returns fixed objects and records what it was given."""

    def __init__(self, datasets: list[Dataset], error: Exception | None = None) -> None:
        self.datasets = datasets
        self.error = error
        self.calls: list[list[Path]] = []

    def __call__(self, paths: Sequence[Path]) -> ProcessedStudy:
        self.calls.append(list(paths))
        if self.error is not None:
            raise self.error
        return ProcessedStudy(self.datasets, {"study_instance_uid": STUDY})


def one(conn: sqlite3.Connection, sql: str) -> tuple[object, ...]:
    return tuple(conn.execute(sql).fetchone())


def setup(tmp_path: Path) -> tuple[Spool, sqlite3.Connection]:
    spool = Spool(tmp_path)
    conn = db.connect(spool.db_path)
    with db.transaction(conn):
        record_arrival(conn, STUDY, 100.0, new_instance=True)
        conn.execute("INSERT INTO instances VALUES ('1.2.3', ?, '1.2', '1.2.840.10008.5.1.4.1.1.2',"
                     " 'incoming/x/1.2.3.dcm', 10, 'CT1', 100.0)", (STUDY,))
    complete_quiet_studies(conn, 200.0, 30.0)
    return spool, conn


def test_job_writes_outputs_then_queues_each_for_each_destination(tmp_path: Path) -> None:
    spool, conn = setup(tmp_path)
    processor = Recorder([result("1.2.9.1", SecondaryCaptureImageStorage),
                          result("1.2.9.2", Comprehensive3DSRStorage)])
    worker = Worker(conn, spool, processor, destinations=["pacs", "web"], max_attempts=3)
    report = worker.run_once()
    assert report is not None and report.state == "done"
    assert processor.calls == [[tmp_path / "incoming/x/1.2.3.dcm"]]
    out = tmp_path / "outputs" / STUDY
    # The names replay writes too (dicom_ai.results.writer), which findings.json lists.
    assert pydicom.dcmread(out / "sr-1.2.9.2.dcm").SOPClassUID == Comprehensive3DSRStorage
    assert json.loads((out / "findings.json").read_text()) == {"study_instance_uid": STUDY}
    rows = conn.execute("SELECT sop_instance_uid, destination, state, path FROM outbound "
                        "ORDER BY sop_instance_uid, destination").fetchall()
    assert [tuple(r) for r in rows] == [
        ("1.2.9.1", "pacs", "pending", f"outputs/{STUDY}/sc-1.2.9.1.dcm"),
        ("1.2.9.1", "web", "pending", f"outputs/{STUDY}/sc-1.2.9.1.dcm"),
        ("1.2.9.2", "pacs", "pending", f"outputs/{STUDY}/sr-1.2.9.2.dcm"),
        ("1.2.9.2", "web", "pending", f"outputs/{STUDY}/sr-1.2.9.2.dcm")]
    assert one(conn, "SELECT state, attempts, outputs FROM jobs") == ("done", 1, 2)
    assert worker.run_once() is None


def test_failing_job_is_retried_then_failed_with_reason(tmp_path: Path) -> None:
    spool, conn = setup(tmp_path)
    processor = Recorder([], SeriesGeometryError("duplicate slice positions"))
    worker = Worker(conn, spool, processor, destinations=["pacs"], max_attempts=2)
    first = worker.run_once()
    assert first is not None and first.state == "queued"
    second = worker.run_once()
    assert second is not None and second.state == "failed"
    assert one(conn, "SELECT state, attempts, last_error FROM jobs") == \
        ("failed", 2, "duplicate slice positions")
    assert worker.run_once() is None


def test_unexpected_error_keeps_only_type_and_place(tmp_path: Path,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    spool, conn = setup(tmp_path)
    processor = Recorder([], RuntimeError("Doe^Jane 19700101"))
    caplog.set_level(logging.DEBUG)
    Worker(conn, spool, processor, destinations=[], max_attempts=1).run_once()
    error = conn.execute("SELECT last_error FROM jobs").fetchone()[0]
    assert error.startswith("RuntimeError at test_worker.py:")
    assert "job 1 failed: RuntimeError at test_worker.py:" in caplog.text
    assert "Doe^Jane" not in caplog.text and "19700101" not in caplog.text


def test_interrupted_job_is_requeued_or_failed_when_out_of_attempts(tmp_path: Path) -> None:
    _, conn = setup(tmp_path)
    conn.execute("UPDATE jobs SET state = 'running', attempts = 1")
    assert requeue_interrupted(conn, 3, 300.0) == 1
    assert one(conn, "SELECT state FROM jobs") == ("queued",)
    conn.execute("UPDATE jobs SET state = 'running', attempts = 3")
    assert requeue_interrupted(conn, 3, 300.0) == 0
    assert one(conn, "SELECT state FROM jobs") == ("failed",)


def test_a_stop_of_the_service_gives_the_attempt_back(tmp_path: Path) -> None:
    _, conn = setup(tmp_path)
    conn.execute("UPDATE jobs SET state = 'running', attempts = 3")
    assert requeue_interrupted(conn, 3, 300.0, by_shutdown=True) == 1
    assert one(conn, "SELECT state, attempts FROM jobs") == ("queued", 2)


def test_job_of_a_reopened_study_is_superseded_and_not_exported(tmp_path: Path) -> None:
    spool, conn = setup(tmp_path)

    def reopen_while_running(paths: Sequence[Path]) -> ProcessedStudy:
        with db.transaction(conn):
            record_arrival(conn, STUDY, 250.0, new_instance=True)
        return ProcessedStudy([result("1.2.9.3", SecondaryCaptureImageStorage)])

    report = Worker(conn, spool, reopen_while_running, destinations=["pacs"],
                    max_attempts=3).run_once()
    assert report is not None and report.state == "superseded"
    assert one(conn, "SELECT COUNT(*) FROM outbound") == (0,)


@pytest.mark.parametrize(("previous", "after"), [("dead", "pending"), ("delivered", "delivered")])
def test_rerun_revives_dead_letters_but_not_deliveries(tmp_path: Path, previous: str,
                                                      after: str) -> None:
    spool, conn = setup(tmp_path)
    worker = Worker(conn, spool, Recorder([result("1.2.9.4", SecondaryCaptureImageStorage)]),
                    destinations=["pacs"], max_attempts=3)
    worker.run_once()
    conn.execute("UPDATE outbound SET state = ?, attempts = 6", (previous,))
    conn.execute("UPDATE jobs SET state = 'queued'")
    worker.run_once()
    assert one(conn, "SELECT state FROM outbound") == (after,)


CR = "1.2.840.10008.5.1.4.1.1.1"
CT = "1.2.840.10008.5.1.4.1.1.2"
DERMOSCOPY = "1.2.840.10008.5.1.4.1.1.77.1.7"
ENHANCED_CT = "1.2.840.10008.5.1.4.1.1.2.1"


def queue(conn: sqlite3.Connection, study: str, lane: str, created_at: float) -> int:
    row = conn.execute("INSERT INTO jobs (study_instance_uid, generation, state, created_at, lane) "
                       "VALUES (?, 1, 'queued', ?, ?) RETURNING id",
                       (study, created_at, lane)).fetchone()
    return int(row[0])


@pytest.mark.parametrize(("modalities", "classes", "count", "lane"), [
    ((), [CR], 1, FAST),
    (("CR",), [CR], 2, FAST),
    (("DMS",), [DERMOSCOPY], 1, FAST),
    ((), [CR], 8, FAST),
    ((), [CR], 9, BULK),  # more images than a single-image study has
    ((), [CT], 1, BULK),  # a CT localizer alone is still a CT
    ((), [CR, ENHANCED_CT], 2, BULK),
    (("CT",), [CR], 1, BULK),  # e.g. a CT screen capture filed as CR
    ((), [], 0, BULK),
    ((), ["1.2.3.4"], 1, BULK),  # unknown SOP class
])
def test_lane_for(modalities: tuple[str, ...], classes: list[str], count: int,
                  lane: str) -> None:
    assert lane_for(modalities, classes, count) == lane


def test_study_lane_reads_the_indexed_instances(tmp_path: Path) -> None:
    conn = db.connect(tmp_path / "index.sqlite")
    for i, (study, sop_class) in enumerate([("1.1", CR), ("1.2", CT), ("1.2", CT)]):
        conn.execute("INSERT INTO instances VALUES (?, ?, '9', ?, 'x', 1, 'A', 0)",
                     (f"5.{i}", study, sop_class))
    assert (study_lane(conn, "1.1"), study_lane(conn, "1.2"), study_lane(conn, "1.3")) == \
        (FAST, BULK, BULK)


def test_fast_jobs_are_claimed_before_earlier_bulk_jobs(tmp_path: Path) -> None:
    conn = db.connect(tmp_path / "index.sqlite")
    ct = queue(conn, "1.1", BULK, 100.0)
    cxr = queue(conn, "1.2", FAST, 101.0)
    ct2 = queue(conn, "1.3", BULK, 102.0)
    cxr2 = queue(conn, "1.4", FAST, 103.0)
    claimed = [claim_job(conn, 110.0, worker_pid=7) for _ in range(5)]
    assert [job.id if job else None for job in claimed] == [cxr, cxr2, ct, ct2, None]
    assert [job.lane for job in claimed if job] == [FAST, FAST, BULK, BULK]
    assert one(conn, "SELECT COUNT(DISTINCT worker_pid), MIN(worker_pid) FROM jobs") == (1, 7)


def test_a_bulk_job_waiting_long_ranks_with_the_fast_ones(tmp_path: Path) -> None:
    conn = db.connect(tmp_path / "index.sqlite")
    ct = queue(conn, "1.1", BULK, 100.0)
    cxr = queue(conn, "1.2", FAST, 100.0 + BULK_AGING_S)
    job = claim_job(conn, 100.0 + BULK_AGING_S + 1)
    assert job is not None and job.id == ct
    job = claim_job(conn, 100.0 + BULK_AGING_S + 1)
    assert job is not None and job.id == cxr


def test_the_reserved_fast_worker_never_claims_a_bulk_job(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    conn = db.connect(spool.db_path)
    # Queued in 1970: long past the aging that ranks a bulk job with the fast ones.
    ct = queue(conn, "1.1", BULK, 100.0)
    processor = Recorder([])
    fast_only = Worker(conn, spool, processor, destinations=[], max_attempts=3, lanes=[FAST])
    assert fast_only.run_once() is None
    cxr = queue(conn, "1.2", FAST, 101.0)
    report = fast_only.run_once()
    assert report is not None and report.job.id == cxr and report.state == "done"
    assert fast_only.run_once() is None
    assert one(conn, f"SELECT state, attempts FROM jobs WHERE id = {ct}") == ("queued", 0)
    assert len(processor.calls) == 1


def claim_all(db_path: Path, ready: Event, start: Event, mine: Event, other: Event,
              out: Queue[list[int]]) -> None:
    """One of two racing processes: claim until the queue is empty, report the ids.

    After its first claim it waits for the other's first, so both are in the race for sure.
    """
    conn = db.connect(db_path)
    ready.set()
    start.wait(60)
    ids: list[int] = []
    for _ in range(1000):
        job = claim_job(conn, 1000.0)
        if job is None:
            break
        ids.append(job.id)
        if len(ids) == 1:
            mine.set()
            other.wait(60)
    out.put(ids)


def test_two_processes_never_claim_the_same_job(tmp_path: Path) -> None:
    db_path = tmp_path / "index.sqlite"
    conn = db.connect(db_path)
    with db.transaction(conn):
        for i in range(300):
            queue(conn, f"1.{i}", FAST if i % 3 else BULK, float(i))
    ctx = multiprocessing.get_context("spawn")
    start, out = ctx.Event(), ctx.Queue()
    ready, first = [ctx.Event(), ctx.Event()], [ctx.Event(), ctx.Event()]
    procs = [ctx.Process(target=claim_all,
                         args=(db_path, ready[i], start, first[i], first[1 - i], out))
             for i in range(2)]
    for proc in procs:
        proc.start()
    assert all(r.wait(60) for r in ready)
    start.set()
    claimed = [out.get(timeout=120) for _ in procs]
    for proc in procs:
        proc.join(timeout=30)
    assert sorted(claimed[0] + claimed[1]) == list(range(1, 301))
    assert not set(claimed[0]) & set(claimed[1])
    assert one(conn, "SELECT MIN(attempts), MAX(attempts), COUNT(DISTINCT worker_pid) "
                     "FROM jobs") == (1, 1, 2)


def test_requeue_of_one_dead_worker_leaves_the_others_jobs_running(tmp_path: Path) -> None:
    conn = db.connect(tmp_path / "index.sqlite")
    queue(conn, "1.1", BULK, 100.0)
    queue(conn, "1.2", FAST, 101.0)
    claim_job(conn, 110.0, worker_pid=11)
    claim_job(conn, 110.0, worker_pid=22)
    assert requeue_interrupted(conn, 3, 120.0, worker_pid=22) == 1
    assert [tuple(r) for r in conn.execute(
        "SELECT study_instance_uid, state, worker_pid FROM jobs ORDER BY id")] == [
        ("1.1", "queued", 22), ("1.2", "running", 11)]


def test_an_index_of_an_earlier_version_gets_the_lane_columns(tmp_path: Path) -> None:
    path = tmp_path / "index.sqlite"
    old = sqlite3.connect(path)
    old.execute("CREATE TABLE jobs (id INTEGER PRIMARY KEY, study_instance_uid TEXT NOT NULL, "
                "generation INTEGER NOT NULL, state TEXT NOT NULL, attempts INTEGER NOT NULL "
                "DEFAULT 0, last_error TEXT, outputs INTEGER NOT NULL DEFAULT 0, created_at REAL "
                "NOT NULL, started_at REAL, finished_at REAL, "
                "UNIQUE (study_instance_uid, generation))")
    old.execute("INSERT INTO jobs (study_instance_uid, generation, state, created_at) "
                "VALUES ('1.1', 1, 'queued', 5)")
    old.commit()
    old.close()
    conn = db.connect(path)
    # A job queued before lanes existed is bulk: it may be a CT, and bulk never blocks the
    # reserved fast worker.
    assert one(conn, "SELECT lane, worker_pid FROM jobs") == (BULK, None)


@pytest.mark.parametrize(("cpus", "memory", "processes"), [
    (1, None, 2), (2, None, 2), (3, None, 2), (4, None, 3), (16, None, 4),
    (16, 3 * WORKER_MEMORY_BYTES, 3), (1, WORKER_MEMORY_BYTES, 1),
    (4, WORKER_MEMORY_BYTES // 2, 1)])
def test_default_processes(cpus: int, memory: int | None, processes: int) -> None:
    assert default_processes(cpus, memory) == processes


def test_plan_reserves_a_fast_worker_and_divides_the_cpus() -> None:
    assert plan_workers(1, 1) == [WorkerPlan("worker-1", (FAST, BULK), 1)]
    assert plan_workers(1, 4) == [WorkerPlan("worker-1", (FAST, BULK), 3)]
    assert plan_workers(3, 8) == [WorkerPlan("worker-1", (FAST,), 3),
                                  WorkerPlan("worker-2", (FAST, BULK), 3),
                                  WorkerPlan("worker-3", (FAST, BULK), 3)]
    assert [p.num_threads for p in plan_workers(2, 2, num_threads=4)] == [4, 4]
    with pytest.raises(ValueError, match="at least one"):
        plan_workers(0, 2)


def report_scheduling(policy: str, out: Queue[tuple[int, int, list[int], str]]) -> None:
    applied = set_priority(policy)
    where = leave_listener_a_core()
    out.put((os.sched_getscheduler(0), os.nice(0), sorted(os.sched_getaffinity(0)),
             f"{applied}; {where}"))


@pytest.mark.parametrize(("policy", "scheduler", "least_nice"), [
    ("batch", os.SCHED_BATCH, 10), ("idle", os.SCHED_IDLE, 0), ("normal", os.SCHED_OTHER, 0)])
def test_worker_priority_and_affinity(policy: str, scheduler: int, least_nice: int) -> None:
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    # In a child: a process cannot raise its own priority back.
    proc = ctx.Process(target=report_scheduling, args=(policy, out))
    proc.start()
    got_scheduler, got_nice, cpus, text = out.get(timeout=60)
    proc.join(timeout=30)
    # The tests may themselves run under nice; a child never becomes nicer than that.
    assert (got_scheduler, got_nice) == (scheduler, max(least_nice, os.nice(0))), text
    mine = usable_cpus()
    assert cpus == (mine[1:] if len(mine) > 1 else mine), text
