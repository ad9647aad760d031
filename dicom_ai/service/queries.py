"""The index read for operators: what ``dicom-ai status`` and the status web page show.

One place for these SELECTs, so that the text report and the page never disagree about what a
state or a count means. Every row holds only UIDs, AE titles or destination names, counts, states,
epoch times and error reasons — the index holds no patient identity.
"""

from __future__ import annotations

import sqlite3
from typing import NamedTuple

#: Job states in their order of life (:mod:`dicom_ai.service.db`).
JOB_STATES = ("queued", "running", "done", "failed", "superseded")
#: Outbound (delivery) states.
OUTBOUND_STATES = ("pending", "delivered", "dead")


class StudyRow(NamedTuple):
    """A study as assembled, with the state of its latest job (``None``: no job yet)."""

    study_instance_uid: str
    state: str
    generation: int
    instance_count: int
    first_received: float
    last_received: float
    completed_at: float | None
    job_state: str | None
    job_finished_at: float | None


class JobRow(NamedTuple):
    """A processing job."""

    id: int
    study_instance_uid: str
    generation: int
    state: str
    attempts: int
    outputs: int
    last_error: str | None


class DestinationRow(NamedTuple):
    """Deliveries to one destination, counted by state.

    ``retrying`` counts pending rows with at least one failed try, ``late`` those reported late,
    ``oldest_pending`` is when the longest-waiting pending delivery started (``None``: none).
    """

    destination: str
    pending: int
    delivered: int
    dead: int
    retrying: int
    late: int
    oldest_pending: float | None
    last_delivered: float | None


class OutboundRow(NamedTuple):
    """One delivery of one result object to one destination."""

    destination: str
    study_instance_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    attempts: int
    next_attempt_at: float
    last_error: str | None
    pending_since: float


class SeriesFile(NamedTuple):
    """One received instance of a series (its path relative to ``storage.directory``)."""

    series_instance_uid: str
    path: str


def study_count(conn: sqlite3.Connection) -> int:
    """How many studies the index holds."""
    return int(conn.execute("SELECT COUNT(*) FROM studies").fetchone()[0])


def recent_studies(conn: sqlite3.Connection, limit: int) -> list[StudyRow]:
    """The ``limit`` studies whose last instance arrived most recently, newest first."""
    rows = conn.execute(
        "SELECT s.study_instance_uid, s.state, s.generation, s.instance_count, "
        "s.first_received, s.last_received, s.completed_at, j.state, j.finished_at "
        "FROM studies s LEFT JOIN jobs j ON j.id = "
        " (SELECT id FROM jobs WHERE study_instance_uid = s.study_instance_uid "
        "  ORDER BY generation DESC, id DESC LIMIT 1) "
        "ORDER BY s.last_received DESC LIMIT ?", (limit,)).fetchall()
    return [StudyRow(*r) for r in rows]


def job_counts(conn: sqlite3.Connection) -> dict[str, int]:
    """Jobs by state; every state of :data:`JOB_STATES` is a key (0 when none)."""
    counts = dict.fromkeys(JOB_STATES, 0)
    for state, n in conn.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state"):
        counts[str(state)] = int(n)
    return counts


def job_counts_by_lane(conn: sqlite3.Connection) -> dict[str, dict[str, int]]:
    """Jobs by lane and state (every state of :data:`JOB_STATES` a key of each lane); one lane,
    ``""``, when the index predates lanes."""
    columns = {str(r[1]) for r in conn.execute("PRAGMA table_info(jobs)")}
    lane = "lane" if "lane" in columns else "''"
    counts: dict[str, dict[str, int]] = {}
    for name, state, n in conn.execute(
            f"SELECT {lane}, state, COUNT(*) FROM jobs GROUP BY 1, 2 ORDER BY 1"):
        counts.setdefault(str(name), dict.fromkeys(JOB_STATES, 0))[str(state)] = int(n)
    return counts


def open_jobs(conn: sqlite3.Connection, limit: int) -> list[JobRow]:
    """Queued, running and failed jobs, newest first."""
    rows = conn.execute(
        "SELECT id, study_instance_uid, generation, state, attempts, outputs, last_error "
        "FROM jobs WHERE state IN ('queued', 'running', 'failed') ORDER BY id DESC LIMIT ?",
        (limit,)).fetchall()
    return [JobRow(*r) for r in rows]


def destinations(conn: sqlite3.Connection) -> list[DestinationRow]:
    """Deliveries counted by state per destination, by destination name."""
    rows = conn.execute(
        "SELECT destination, SUM(state = 'pending'), SUM(state = 'delivered'), "
        "SUM(state = 'dead'), SUM(state = 'pending' AND attempts > 0), "
        "SUM(state = 'pending' AND late), "
        "MIN(CASE WHEN state = 'pending' THEN COALESCE(pending_since, created_at) END), "
        "MAX(delivered_at) "
        "FROM outbound GROUP BY destination ORDER BY destination").fetchall()
    return [DestinationRow(*r) for r in rows]


_OUTBOUND = ("SELECT destination, study_instance_uid, sop_instance_uid, sop_class_uid, attempts, "
             "next_attempt_at, last_error, COALESCE(pending_since, created_at) FROM outbound ")


def dead_letters(conn: sqlite3.Connection, limit: int) -> list[OutboundRow]:
    """Deliveries given up (``dead``), newest first; ``last_error`` is why."""
    rows = conn.execute(_OUTBOUND + "WHERE state = 'dead' ORDER BY id DESC LIMIT ?",
                        (limit,)).fetchall()
    return [OutboundRow(*r) for r in rows]


def retrying(conn: sqlite3.Connection, limit: int) -> list[OutboundRow]:
    """Pending deliveries that failed at least once, oldest first."""
    rows = conn.execute(_OUTBOUND + "WHERE state = 'pending' AND attempts > 0 ORDER BY id "
                        "LIMIT ?", (limit,)).fetchall()
    return [OutboundRow(*r) for r in rows]


def series_files(conn: sqlite3.Connection, study_instance_uid: str,
                 limit: int) -> list[SeriesFile]:
    """One received instance per series of a study (the first by path), by Series Instance UID."""
    rows = conn.execute(
        "SELECT series_instance_uid, MIN(path) FROM instances WHERE study_instance_uid = ? "
        "GROUP BY series_instance_uid ORDER BY series_instance_uid LIMIT ?",
        (study_instance_uid, limit)).fetchall()
    return [SeriesFile(*r) for r in rows]


__all__ = ["JOB_STATES", "OUTBOUND_STATES", "DestinationRow", "JobRow", "OutboundRow",
           "SeriesFile", "StudyRow", "dead_letters", "destinations", "job_counts",
           "job_counts_by_lane", "open_jobs",
           "recent_studies", "retrying", "series_files", "study_count"]
