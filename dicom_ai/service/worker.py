"""The processing worker: jobs from the SQLite table, run through the same pipeline as replay.

It runs as its own process (started by :mod:`dicom_ai.service.server`), so model inference never
holds the listener's GIL, and at a lower CPU priority, so reception keeps pace while a model runs.
Models are loaded once per process. A job is claimed (``queued`` → ``running``, attempts + 1), its
study's files are processed, every result object is written durably under
``outputs/<study>/``, and then — in one transaction — the job is marked ``done`` and one outbound
row per object and destination is queued. A crash anywhere before that transaction leaves the job
``running``; the next start re-queues it, and the re-run writes the same objects (deterministic
UIDs) again. A job that keeps crashing its process fails for good after ``worker.max_attempts``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from multiprocessing.synchronize import Event as EventType
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset

from dicom_ai.config import Settings
from dicom_ai.logs import log_failure, safe_error_text
from dicom_ai.results.writer import encode as encode  # re-exported: tests encode with it
from dicom_ai.results.writer import write_results
from dicom_ai.service import db
from dicom_ai.service.process import child_setup, lowest_priority, orphaned
from dicom_ai.service.spool import Spool, study_paths

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProcessedStudy:
    """What processing one study produced: objects to send and the findings document."""

    datasets: list[Dataset]
    findings: dict[str, Any] | None = None


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


@dataclass
class JobReport:
    """Outcome of :meth:`Worker.run_once` for logs and tests."""

    job: Job
    state: str
    outputs: list[Path] = field(default_factory=list)
    error: str | None = None


def claim_job(conn: sqlite3.Connection, now: float) -> Job | None:
    """Take the oldest queued job: mark it running and count the attempt."""
    with db.transaction(conn):
        row = conn.execute(
            "UPDATE jobs SET state = 'running', attempts = attempts + 1, started_at = ? "
            "WHERE id = (SELECT id FROM jobs WHERE state = 'queued' ORDER BY id LIMIT 1) "
            "RETURNING id, study_instance_uid, generation, attempts", (now,)).fetchone()
    return None if row is None else Job(int(row[0]), str(row[1]), int(row[2]), int(row[3]))


def requeue_interrupted(conn: sqlite3.Connection, max_attempts: int, now: float, *,
                        by_shutdown: bool = False) -> int:
    """Jobs left ``running`` by a dead worker: back to ``queued``, or ``failed`` when out of tries.

    Call only while no worker runs. Returns the number of jobs re-queued.

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
    """
    with db.transaction(conn):
        if by_shutdown:
            return conn.execute("UPDATE jobs SET state = 'queued', attempts = attempts - 1 "
                                "WHERE state = 'running'").rowcount
        conn.execute("UPDATE jobs SET state = 'failed', finished_at = ?, last_error = "
                     "'worker stopped during processing too often' "
                     "WHERE state = 'running' AND attempts >= ?", (now, max_attempts))
        return conn.execute("UPDATE jobs SET state = 'queued' WHERE state = 'running'").rowcount


class Worker:
    """Runs jobs one at a time.

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
    """

    def __init__(self, conn: sqlite3.Connection, spool: Spool, processor: Processor, *,
                 destinations: Sequence[str], max_attempts: int) -> None:
        self.conn = conn
        self.spool = spool
        self.processor = processor
        self.destinations = list(destinations)
        self.max_attempts = max_attempts

    def run_once(self) -> JobReport | None:
        """Claim and run one job; None when the queue is empty."""
        job = claim_job(self.conn, time.time())
        if job is None:
            return None
        paths = study_paths(self.conn, self.spool.root, job.study_instance_uid)
        log.info("job %d: study %s generation %d, %d instances (attempt %d)", job.id,
                 job.study_instance_uid, job.generation, len(paths), job.attempts)
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
        log.info("job %d %s: %d result objects", job.id, state, len(outputs))
        return JobReport(job, state, outputs)

    def _fail(self, job: Job, error: str) -> JobReport:
        with db.transaction(self.conn) as conn:
            state = "failed" if job.attempts >= self.max_attempts else "queued"
            conn.execute("UPDATE jobs SET state = ?, last_error = ?, finished_at = ? "
                         "WHERE id = ?", (state, error, time.time(), job.id))
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
    log.info("models loaded: %s", ", ".join(f"{m.name} {m.version}" for m in models) or "none")

    def process(paths: Sequence[Path]) -> ProcessedStudy:
        datasets: list[Dataset] = []
        documents: list[dict[str, Any]] = []
        for study in collect(paths).studies:
            outcome = run_study(study, models, settings)
            datasets.extend(outcome.datasets)
            documents.append(outcome.findings_document())
        return ProcessedStudy(datasets, documents[0] if len(documents) == 1 else None)

    return process


def worker_main(settings: Settings, stop: EventType, parent_pid: int,
                processor_factory: Callable[[Settings], Processor] = pipeline_processor) -> None:
    """Entry point of the worker process: load models once, then run jobs until ``stop``.

    The process runs at the lowest CPU priority (:func:`~dicom_ai.service.process.lowest_priority`):
    reception never waits for a model, and the model is never paused. It exits by itself when
    the service that started it is gone.
    """
    child_setup(settings, parent_pid, "worker")
    log.info("worker at %s", lowest_priority())
    if settings.inference.num_threads == 0:
        # torch would take every core; leave one to the listener and the exporter.
        settings = dataclasses.replace(settings, inference=dataclasses.replace(
            settings.inference, num_threads=max(1, (os.cpu_count() or 1) - 1)))
    spool = Spool(Path(settings.storage.directory))
    conn = db.connect(spool.db_path)
    worker = Worker(conn, spool, processor_factory(settings),
                    destinations=[d.name for d in settings.export.destinations],
                    max_attempts=settings.worker.max_attempts)
    while not stop.is_set() and not orphaned(parent_pid):
        if worker.run_once() is None:
            stop.wait(settings.worker.poll_interval_s)
