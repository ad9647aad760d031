"""Study assembly: completion after the quiet period, re-opening, supersession, queueing."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from dicom_ai.service import db
from dicom_ai.service.studies import complete_quiet_studies, queue_unprocessed, record_arrival

STUDY = "1.2.826.0.1.3680043.8.498.20"


def arrive(conn: sqlite3.Connection, now: float, *, new: bool = True) -> None:
    with db.transaction(conn):
        record_arrival(conn, STUDY, now, new_instance=new)


def study_row(conn: sqlite3.Connection) -> tuple[str, int, int]:
    row = conn.execute("SELECT state, generation, instance_count FROM studies").fetchone()
    return str(row[0]), int(row[1]), int(row[2])


def jobs(conn: sqlite3.Connection) -> list[tuple[int, str]]:
    return [(int(r[0]), str(r[1])) for r in
            conn.execute("SELECT generation, state FROM jobs ORDER BY id")]


def test_complete_after_quiet_period(tmp_path: Path) -> None:
    conn = db.connect(tmp_path / "i.sqlite")
    arrive(conn, 100.0)
    arrive(conn, 110.0)
    # Quiet period 30 s from the last instance (t = 110): not complete at 139.9, complete at 140.
    assert complete_quiet_studies(conn, 139.9, 30.0) == []
    assert complete_quiet_studies(conn, 140.0, 30.0) == [(STUDY, 1)]
    assert study_row(conn) == ("complete", 1, 2)
    assert jobs(conn) == [(1, "queued")]
    assert complete_quiet_studies(conn, 500.0, 30.0) == []


def test_new_instance_reopens_and_supersedes_queued_job(tmp_path: Path) -> None:
    conn = db.connect(tmp_path / "i.sqlite")
    arrive(conn, 100.0)
    complete_quiet_studies(conn, 130.0, 30.0)
    arrive(conn, 135.0)
    assert study_row(conn) == ("receiving", 2, 2)
    assert jobs(conn) == [(1, "superseded")]
    assert complete_quiet_studies(conn, 165.0, 30.0) == [(STUDY, 2)]
    assert jobs(conn) == [(1, "superseded"), (2, "queued")]


def test_resent_instance_does_not_reopen(tmp_path: Path) -> None:
    conn = db.connect(tmp_path / "i.sqlite")
    arrive(conn, 100.0)
    complete_quiet_studies(conn, 130.0, 30.0)
    arrive(conn, 140.0, new=False)
    assert study_row(conn) == ("complete", 1, 1)
    assert jobs(conn) == [(1, "queued")]


def test_running_job_is_not_superseded_by_reopening(tmp_path: Path) -> None:
    conn = db.connect(tmp_path / "i.sqlite")
    arrive(conn, 100.0)
    complete_quiet_studies(conn, 130.0, 30.0)
    conn.execute("UPDATE jobs SET state = 'running'")
    arrive(conn, 131.0)
    # The worker decides when the running job ends (see test_worker); the queue is not touched.
    assert jobs(conn) == [(1, "running")]


def test_queue_unprocessed_fills_the_gap_left_by_a_crash(tmp_path: Path) -> None:
    conn = db.connect(tmp_path / "i.sqlite")
    arrive(conn, 100.0)
    complete_quiet_studies(conn, 130.0, 30.0)
    conn.execute("DELETE FROM jobs")
    assert queue_unprocessed(conn, 200.0) == 1
    assert jobs(conn) == [(1, "queued")]
    assert queue_unprocessed(conn, 201.0) == 0
