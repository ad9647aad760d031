"""The processing worker: jobs from the SQLite table, run through the same pipeline as replay.

The service runs several worker processes (started by :mod:`dicom_ai.service.server`, planned by
:func:`dicom_ai.service.lanes.plan_workers`), so model inference never holds the listener's GIL
and a chest X-ray never waits for a CT; each at a lower CPU priority and off the listener's CPU
(``worker.priority``, ``worker.listener_core``), so reception keeps pace while a model runs.
Models are loaded once per process. A job is claimed atomically across the processes
(``queued`` → ``running``, attempts + 1, the claiming process's PID recorded; fast lane first,
:func:`claim_job`), its study's files are processed, every result object is written durably under
``outputs/<study>/``, and then — in one transaction — the job is marked ``done`` and one outbound
row per object and destination is queued. A crash anywhere before that transaction leaves the job
``running``; the service re-queues it when it restarts that worker, or at its next start, and the
re-run writes the same objects (deterministic UIDs) again. A job that keeps crashing its process
fails for good after ``worker.max_attempts``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset

from dicom_ai.config import Settings
from dicom_ai.logs import log_failure, safe_error_text
from dicom_ai.results.writer import encode as encode  # re-exported: tests encode with it
from dicom_ai.results.writer import write_results
from dicom_ai.service import audit, db, metrics
from dicom_ai.service.lanes import BULK, BULK_AGING_S, FAST, LANES, WorkerPlan
from dicom_ai.service.process import child_setup, leave_listener_a_core, orphaned, set_priority
from dicom_ai.service.spool import Spool, study_paths

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProcessedStudy:
    """What processing one study produced: objects to send and the findings document."""

    datasets: list[Dataset]
    findings: dict[str, Any] | None = None
    #: For the metrics: modality of the analysed series ("+"-joined, "" unknown) and the seconds
    #: each model spent on the study.
    modality: str = ""
    inference_seconds: dict[str, float] = field(default_factory=dict)


#: Processes the files of one study. The service uses :func:`pipeline_processor`; tests inject
#: their own.
Processor = Callable[[Sequence[Path]], ProcessedStudy]


@dataclass(frozen=True)
class Job:
    """A claimed job."""

    id: int
    study_instance_uid: str
    generation: int
    attempts: int
    lane: str


@dataclass
class JobReport:
    """Outcome of :meth:`Worker.run_once` for logs and tests."""

    job: Job
    state: str
    outputs: list[Path] = field(default_factory=list)
    error: str | None = None


def claim_job(conn: sqlite3.Connection, now: float, *, lanes: Sequence[str] = LANES,
              worker_pid: int | None = None) -> Job | None:
    """Take the next queued job of ``lanes``: mark it running, count the attempt, note the worker.

    Fast-lane jobs come first, each lane in queue order; a bulk job queued for longer than
    :data:`~dicom_ai.service.lanes.BULK_AGING_S` ranks with the fast ones, so a stream of
    single-image studies cannot starve a CT. The choice and the update are one statement inside
    ``BEGIN IMMEDIATE`` (:func:`~dicom_ai.service.db.transaction`), which holds the index's write
    lock: two worker processes never claim the same job.

    Parameters
    ----------
    conn:
        Connection to the index.
    now:
        Epoch seconds.
    lanes:
        Lanes this worker serves.
    worker_pid:
        Recorded in ``jobs.worker_pid`` so the service re-queues exactly this worker's job when
        it dies; the calling process's PID by default.
    """
    marks = ", ".join("?" * len(lanes))
    with db.transaction(conn):
        row = conn.execute(
            "UPDATE jobs SET state = 'running', attempts = attempts + 1, started_at = ?, "
            "worker_pid = ? WHERE id = (SELECT id FROM jobs "
            f"WHERE state = 'queued' AND lane IN ({marks}) "
            "ORDER BY (lane = ? OR created_at <= ?) DESC, id LIMIT 1) "
            "RETURNING id, study_instance_uid, generation, attempts, lane",
            (now, os.getpid() if worker_pid is None else worker_pid, *lanes, FAST,
             now - BULK_AGING_S)).fetchone()
    if row is None:
        return None
    return Job(int(row[0]), str(row[1]), int(row[2]), int(row[3]), str(row[4]))


def requeue_interrupted(conn: sqlite3.Connection, max_attempts: int, now: float, *,
                        by_shutdown: bool = False, worker_pid: int | None = None) -> int:
    """Jobs left ``running`` by a dead worker: back to ``queued``, or ``failed`` when out of tries.

    Call only while the worker concerned does not run (``worker_pid``), or while none runs.
    Returns the number of jobs re-queued.

    Parameters
    ----------
    conn:
        Connection to the index.
    max_attempts:
        ``worker.max_attempts``.
    now:
        Time stamp for jobs that fail.
    by_shutdown:
        The service stopped the worker itself (SIGTERM, a restart for maintenance): the attempt
        is given back, since the study did not cause the interruption. A worker that died on
        its own, or with a killed service, keeps the attempt counted: the study may be the cause.
    worker_pid:
        Only the job of this (dead) worker process; None: every running job.
    """
    # "? IS NULL" makes the PID filter optional within one statement.
    which = "state = 'running' AND (? IS NULL OR worker_pid = ?)"
    pid = (worker_pid, worker_pid)
    with db.transaction(conn):
        if by_shutdown:
            return conn.execute("UPDATE jobs SET state = 'queued', attempts = attempts - 1 "
                                f"WHERE {which}", pid).rowcount
        conn.execute("UPDATE jobs SET state = 'failed', finished_at = ?, last_error = "
                     "'worker stopped during processing too often' "
                     f"WHERE {which} AND attempts >= ?", (now, *pid, max_attempts))
        return conn.execute(f"UPDATE jobs SET state = 'queued' WHERE {which}", pid).rowcount


@dataclass(frozen=True)
class OverdueJob:
    """A job running for longer than ``worker.job_timeout_s``."""

    id: int
    study_instance_uid: str
    attempts: int
    worker_pid: int


def overdue_jobs(conn: sqlite3.Connection, now: float, timeout_s: float) -> list[OverdueJob]:
    """Jobs ``running`` since before ``now - timeout_s``, oldest first."""
    rows = conn.execute("SELECT id, study_instance_uid, attempts, worker_pid FROM jobs "
                        "WHERE state = 'running' AND worker_pid IS NOT NULL AND started_at < ? "
                        "ORDER BY started_at",
                        (now - timeout_s,)).fetchall()
    return [OverdueJob(int(r[0]), str(r[1]), int(r[2]), int(r[3])) for r in rows]


def fail_timed_out(conn: sqlite3.Connection, job: OverdueJob, timeout_s: float, now: float, *,
                   audit_root: Path) -> bool:
    """Fail ``job`` for good once its worker has been killed: no retry, since a study that hung
    its worker once would hang each attempt for ``timeout_s`` again.

    Returns
    -------
    bool
        False when the job was no longer running (its worker finished it before the kill).
    """
    reason = (f"analysis ran past worker.job_timeout_s ({timeout_s:g} s); the worker was "
              "stopped")
    with db.transaction(conn):
        failed = conn.execute("UPDATE jobs SET state = 'failed', last_error = ?, finished_at = ? "
                              "WHERE id = ? AND state = 'running'",
                              (reason, now, job.id)).rowcount
    if failed:
        audit.record(audit_root, job.study_instance_uid, "failed", job_id=job.id,
                     attempt=job.attempts, reason=reason, final=True)
    return bool(failed)


class Worker:
    """Runs jobs one at a time, from the lanes it serves.

    Parameters
    ----------
    conn:
        Connection to the index.
    spool:
        Gives the storage layout (``outputs/``, ``tmp/``) and durable directory creation.
    processor:
        Turns a study's files into result objects.
    destinations:
        Names of the configured export destinations; each output is queued for each.
    max_attempts:
        Tries per job before it is ``failed``.
    lanes:
        Lanes it claims from (:data:`~dicom_ai.service.lanes.LANES`: all).
    """

    def __init__(self, conn: sqlite3.Connection, spool: Spool, processor: Processor, *,
                 destinations: Sequence[str], max_attempts: int,
                 lanes: Sequence[str] = LANES) -> None:
        self.conn = conn
        self.spool = spool
        self.processor = processor
        self.destinations = list(destinations)
        self.max_attempts = max_attempts
        self.lanes = tuple(lanes)

    def run_once(self) -> JobReport | None:
        """Claim and run one job; None when no job of its lanes is queued."""
        job = claim_job(self.conn, time.time(), lanes=self.lanes)
        if job is None:
            return None
        paths = study_paths(self.conn, self.spool.root, job.study_instance_uid)
        log.info("job %d (%s lane): study %s generation %d, %d instances (attempt %d)", job.id,
                 job.lane, job.study_instance_uid, job.generation, len(paths), job.attempts)
        audit.record(self.spool.root, job.study_instance_uid, "job_started", job_id=job.id,
                     generation=job.generation, attempt=job.attempts, instances=len(paths))
        try:
            processed = self.processor(paths)
            outputs = self._write_outputs(job, processed)
        except Exception as exc:
            log_failure(log, f"job {job.id} failed", exc)
            return self._fail(job, safe_error_text(exc))
        return self._finish(job, processed, outputs)

    def _write_outputs(self, job: Job, processed: ProcessedStudy) -> list[Path]:
        out_dir = self.spool.outputs / job.study_instance_uid
        self.spool.ensure_dir(out_dir)
        return write_results(out_dir, processed.datasets, processed.findings,
                             tmp_dir=self.spool.tmp)

    def _finish(self, job: Job, processed: ProcessedStudy, outputs: list[Path]) -> JobReport:
        now = time.time()
        with db.transaction(self.conn) as conn:
            current = conn.execute("SELECT generation FROM studies WHERE study_instance_uid = ?",
                                   (job.study_instance_uid,)).fetchone()
            if current is not None and int(current[0]) > job.generation:
                # The study re-opened while this job ran; the newer job's results replace these.
                conn.execute("UPDATE jobs SET state = 'superseded', finished_at = ?, outputs = ? "
                             "WHERE id = ?", (now, len(outputs), job.id))
                state = "superseded"
            else:
                conn.execute("UPDATE jobs SET state = 'done', finished_at = ?, outputs = ?, "
                             "last_error = NULL WHERE id = ?", (now, len(outputs), job.id))
                for ds, path in zip(processed.datasets, outputs, strict=True):
                    for dest in self.destinations:
                        # A result already queued or delivered (same deterministic UID) stays as
                        # it is; a dead-lettered one gets a fresh set of attempts.
                        conn.execute(
                            "INSERT INTO outbound (job_id, study_instance_uid, sop_instance_uid, "
                            "sop_class_uid, path, destination, state, next_attempt_at, "
                            "created_at) VALUES (?, ?, ?, ?, ?, ?, 'pending', ?, ?) "
                            "ON CONFLICT (sop_instance_uid, destination) DO UPDATE SET "
                            "state = 'pending', attempts = 0, next_attempt_at = excluded."
                            "next_attempt_at, pending_since = excluded.created_at, late = 0, "
                            "job_id = excluded.job_id WHERE state = 'dead'",
                            (job.id, str(ds.StudyInstanceUID), str(ds.SOPInstanceUID),
                             str(ds.SOPClassUID), str(path.relative_to(self.spool.root)), dest,
                             now, now))
                state = "done"
                # Before the commit, so that the trail has it before the exporter's first "sent".
                audit.analysed(self.spool.root, job.study_instance_uid, job_id=job.id,
                               generation=job.generation, datasets=processed.datasets,
                               findings=processed.findings)
            metrics.record_job(conn, job.id, processed.modality, processed.inference_seconds,
                               done=state == "done")
        log.info("job %d %s: %d result objects", job.id, state, len(outputs))
        if state == "superseded":
            audit.record(self.spool.root, job.study_instance_uid, "superseded", job_id=job.id,
                         generation=job.generation)
        return JobReport(job, state, outputs)

    def _fail(self, job: Job, error: str) -> JobReport:
        with db.transaction(self.conn) as conn:
            state = "failed" if job.attempts >= self.max_attempts else "queued"
            conn.execute("UPDATE jobs SET state = ?, last_error = ?, finished_at = ? "
                         "WHERE id = ?", (state, error, time.time(), job.id))
        audit.record(self.spool.root, job.study_instance_uid, "failed", job_id=job.id,
                     attempt=job.attempts, reason=error, final=state == "failed")
        return JobReport(job, state, error=error)


def pipeline_processor(settings: Settings) -> Processor:
    """The real processor: group the study's files and run :func:`dicom_ai.pipeline.run_study`.

    Loads every model bundle once (in the calling process).
    """
    from dicom_ai.dicom.collect import collect
    from dicom_ai.pipeline import load_models, run_study

    models, problems = load_models(settings.inference)
    for problem in problems:
        log.warning("model not loaded: %s", problem)
    if not models:
        log.error("no usable model bundle under %s: studies will be received but produce no "
                  "results", settings.inference.models_dir)
    log.info("models loaded: %s", ", ".join(m.info.label for m in models) or "none")

    def process(paths: Sequence[Path]) -> ProcessedStudy:
        datasets: list[Dataset] = []
        documents: list[dict[str, Any]] = []
        modalities: set[str] = set()
        seconds: dict[str, float] = {}
        for study in collect(paths).studies:
            outcome = run_study(study, models, settings)
            datasets.extend(outcome.datasets)
            documents.append(outcome.findings_document())
            modalities |= ({r.series.modality for r in outcome.results}
                           or {s.modality for s in study.series})
            for model, spent in outcome.inference_seconds.items():
                seconds[model] = seconds.get(model, 0.0) + spent
        return ProcessedStudy(datasets, documents[0] if len(documents) == 1 else None,
                              modality="+".join(sorted(m for m in modalities if m)),
                              inference_seconds=seconds)

    return process


def worker_main(settings: Settings, parent_pid: int,
                processor_factory: Callable[[Settings], Processor] = pipeline_processor,
                plan: WorkerPlan | None = None) -> None:
    """Entry point of a worker process: load models once, then run jobs until SIGTERM.

    The process lowers its CPU priority (``worker.priority``,
    :func:`~dicom_ai.service.process.set_priority`) and, with ``worker.listener_core``, a worker
    that takes bulk jobs keeps off one CPU (:func:`~dicom_ai.service.process.leave_listener_a_core`)
    before torch starts its threads: reception never waits for a model, and the model is never
    paused. The fast-lane-only worker may run anywhere: its jobs last seconds. It exits by
    itself when the service that started it is gone.

    Parameters
    ----------
    settings:
        All settings.
    parent_pid:
        The service's PID.
    processor_factory:
        Builds the processor (once, in this process).
    plan:
        Its place in the pool (lanes, threads); None: one worker serving every lane.
    """
    plan = plan or WorkerPlan("worker", LANES, settings.inference.num_threads)
    stop = child_setup(settings, parent_pid, plan.name)
    if not settings.worker.listener_core:
        where = "every CPU (worker.listener_core = false)"
    elif BULK not in plan.lanes:
        # A fast job is a second or two: confined beside the CT worker it would take twice as
        # long (measured: 4.6 s instead of 2.6 s from queue to result beside the sample CT on
        # 2 CPUs), while its weight at SCHED_BATCH nice 10 barely touches reception.
        where = "every CPU (fast lane: its jobs are short)"
    else:
        where = leave_listener_a_core()
    log.info("%s: lanes %s, %s, on %s, %d torch threads", plan.name, "+".join(plan.lanes),
             set_priority(settings.worker.priority), where, plan.num_threads)
    if plan.num_threads > 0:
        settings = dataclasses.replace(settings, inference=dataclasses.replace(
            settings.inference, num_threads=plan.num_threads))
    spool = Spool(Path(settings.storage.directory))
    conn = db.connect(spool.db_path)
    worker = Worker(conn, spool, processor_factory(settings),
                    destinations=[d.name for d in settings.export.destinations],
                    max_attempts=settings.worker.max_attempts, lanes=plan.lanes)
    while not stop.is_set() and not orphaned(parent_pid):
        if worker.run_once() is None:
            stop.wait(settings.worker.poll_interval_s)
