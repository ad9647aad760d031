"""Study assembly: a study is complete after a quiet period without a new instance.

DICOM has no "end of study" message, so completeness is a timeout: ``studies.quiet_period_s``
(30 s by default — long enough for the pause between series of one modality push and for a PACS
forwarding a study over several associations, short enough that results arrive within a minute of
the last image). Completing a study queues a job for its current *generation*.

An instance with a new SOP Instance UID arriving after completion re-opens the study: the
generation goes up, a still-queued job of the older generation is marked ``superseded``, and after
the next quiet period a new job processes the whole study again. Result UIDs are derived from the
source SOP Instance UIDs, so the new SR has new UIDs (a new SR series) beside the earlier one, while
objects whose inputs did not change (e.g. the SC of an unchanged image) keep their UIDs and are not
sent twice.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from pathlib import Path

from dicom_ai.logs import log_failure
from dicom_ai.service import db

log = logging.getLogger(__name__)


def record_arrival(conn: sqlite3.Connection, study_instance_uid: str, now: float, *,
                   new_instance: bool) -> None:
    """Note an instance's arrival; call inside the transaction that indexes the instance.

    Parameters
    ----------
    conn:
        Connection with an open write transaction.
    study_instance_uid:
        The instance's study.
    now:
        Arrival time, epoch seconds.
    new_instance:
        False when the SOP Instance UID was already indexed: a re-sent instance extends the
        quiet period of a study still receiving but does not re-open a completed one.
    """
    added = 1 if new_instance else 0
    (generation,) = conn.execute(
        "INSERT INTO studies (study_instance_uid, state, generation, instance_count, "
        "first_received, last_received) VALUES (?, 'receiving', 1, ?, ?, ?) "
        "ON CONFLICT (study_instance_uid) DO UPDATE SET "
        "  last_received = excluded.last_received, "
        "  instance_count = instance_count + excluded.instance_count, "
        "  generation = generation + (state = 'complete' AND excluded.instance_count > 0), "
        "  state = CASE WHEN excluded.instance_count > 0 THEN 'receiving' ELSE state END, "
        "  completed_at = CASE WHEN excluded.instance_count > 0 THEN NULL ELSE completed_at END "
        "RETURNING generation",
        (study_instance_uid, added, now, now)).fetchone()
    # Only a study that has been re-opened (generation > 1) can hold a job of an older one.
    if new_instance and generation > 1:
        conn.execute(
            "UPDATE jobs SET state = 'superseded', finished_at = ? "
            "WHERE study_instance_uid = ? AND state = 'queued' AND generation < "
            "(SELECT generation FROM studies WHERE study_instance_uid = ?)",
            (now, study_instance_uid, study_instance_uid))


def complete_quiet_studies(conn: sqlite3.Connection, now: float,
                           quiet_period_s: float) -> list[tuple[str, int]]:
    """Mark studies quiet for ``quiet_period_s`` as complete and queue a job for each.

    Returns
    -------
    list of (study_instance_uid, generation)
        The studies completed by this call.
    """
    with db.transaction(conn):
        rows = conn.execute(
            "SELECT study_instance_uid, generation FROM studies "
            "WHERE state = 'receiving' AND last_received <= ?",
            (now - quiet_period_s,)).fetchall()
        for uid, generation in rows:
            conn.execute("UPDATE studies SET state = 'complete', completed_at = ? "
                         "WHERE study_instance_uid = ?", (now, uid))
            _queue_job(conn, uid, generation, now)
    return [(str(uid), int(gen)) for uid, gen in rows]


def queue_unprocessed(conn: sqlite3.Connection, now: float) -> int:
    """Queue a job for every complete study whose current generation has none (start-up check).

    Returns
    -------
    int
        The number of jobs queued.
    """
    with db.transaction(conn):
        rows = conn.execute(
            "SELECT s.study_instance_uid, s.generation FROM studies s "
            "WHERE s.state = 'complete' AND NOT EXISTS (SELECT 1 FROM jobs j "
            "WHERE j.study_instance_uid = s.study_instance_uid "
            "AND j.generation = s.generation)").fetchall()
        for uid, generation in rows:
            _queue_job(conn, uid, generation, now)
    return len(rows)


def _queue_job(conn: sqlite3.Connection, study_instance_uid: str, generation: int,
               now: float) -> None:
    conn.execute("INSERT INTO jobs (study_instance_uid, generation, state, created_at) "
                 "VALUES (?, ?, 'queued', ?) ON CONFLICT DO NOTHING",
                 (study_instance_uid, generation, now))


def finished_before(conn: sqlite3.Connection, cutoff: float,
                    study_instance_uid: str | None = None) -> list[str]:
    """Studies whose work is over and whose last instance arrived before ``cutoff``.

    Finished means: complete, the job of its current generation ``done`` or ``failed``, no job
    queued or running, and no delivery ``pending`` or ``dead`` (a dead letter waits for the
    operator's ``dicom-ai retry``).

    Parameters
    ----------
    conn:
        Connection to the index.
    cutoff:
        Epoch seconds.
    study_instance_uid:
        Check only this study.
    """
    rows = conn.execute(
        "SELECT s.study_instance_uid FROM studies s "
        "WHERE s.state = 'complete' AND s.last_received < ? "
        "AND (? IS NULL OR s.study_instance_uid = ?) "
        "AND EXISTS (SELECT 1 FROM jobs j WHERE j.study_instance_uid = s.study_instance_uid "
        "  AND j.generation = s.generation AND j.state IN ('done', 'failed')) "
        "AND NOT EXISTS (SELECT 1 FROM jobs j WHERE j.study_instance_uid = s.study_instance_uid "
        "  AND j.state IN ('queued', 'running')) "
        "AND NOT EXISTS (SELECT 1 FROM outbound o "
        "  WHERE o.study_instance_uid = s.study_instance_uid AND o.state IN ('pending', 'dead'))",
        (cutoff, study_instance_uid, study_instance_uid)).fetchall()
    return [str(r[0]) for r in rows]


class Assembler(threading.Thread):
    """Background thread that completes quiet studies.

    Parameters
    ----------
    db_path:
        The index database.
    quiet_period_s:
        Seconds without a new instance after which a study is complete.
    """

    def __init__(self, db_path: Path, quiet_period_s: float) -> None:
        super().__init__(name="study-assembler", daemon=True)
        self._db_path = db_path
        self._quiet = quiet_period_s
        self._stop_event = threading.Event()
        # Checking four times per quiet period bounds the extra delay to a quarter of it.
        self._tick = min(1.0, max(0.05, quiet_period_s / 4))

    def stop(self) -> None:
        """Ask the thread to finish; it exits within one tick."""
        self._stop_event.set()

    def run(self) -> None:
        conn = db.connect(self._db_path)
        try:
            while not self._stop_event.wait(self._tick):
                try:
                    completed = complete_quiet_studies(conn, time.time(), self._quiet)
                except sqlite3.Error as exc:
                    # A busy or failing index must not end assembly for good; try next tick.
                    log_failure(log, "study assembly failed; retrying", exc)
                    continue
                for uid, generation in completed:
                    log.info("study %s complete (generation %d); job queued", uid, generation)
        finally:
            conn.close()
