"""The service's SQLite index: one WAL database shared by the receiver, the worker and the exporter.

Every process opens its own connection; WAL lets the receiver keep writing while the worker and
the exporter read. The schema lives here so that every table is described in one place:

``instances``
    One row per received instance, inserted after its file is on disk (fsync'ed and renamed).
``studies``
    Assembly state per Study Instance UID: ``receiving`` until the quiet period passes, then
    ``complete``. ``generation`` counts re-openings (an instance arriving after completion).
``jobs``
    One processing job per study generation: ``queued`` → ``running`` → ``done`` / ``failed``;
    a queued job of an older generation becomes ``superseded`` when the study re-opens.
    ``lane`` (``fast`` / ``bulk``, :mod:`dicom_ai.service.lanes`) is set when it is queued;
    ``worker_pid`` names the worker process that claimed it last.
``outbound``
    One row per result object and destination: ``pending`` → ``delivered`` / ``dead``.
    ``pending_since`` (NULL: ``created_at``) starts the retry horizon; ``late`` is set once the
    delivery was reported late.
``metric_counters``, ``metric_histograms``
    Counters and histogram buckets of :mod:`dicom_ai.service.metrics`, written by the worker and
    the exporter in the transaction of what they count, so that ``/metrics`` shows the numbers of
    every process, monotonic across restarts and retention. ``jobs.modality`` names the modality
    of the study a finished job analysed.
``instance_facts``, ``study_expectations``, ``expected_instances``
    What study completion (:mod:`dicom_ai.service.studies`) read from each received instance
    (its completion class) and what a study is known to hold: counts from Number of Study/Series
    Related Instances, the instances a Key Object Selection manifest lists. Rows go with their
    instance or study (triggers).
``mpps``, ``mpps_studies``, ``mpps_instances``
    Modality Performed Procedure Steps (:mod:`dicom_ai.service.mpps`): state, the studies each
    step names, the instances of its Performed Series Sequence.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

Synchronous = Literal["NORMAL", "FULL"]

SCHEMA = """
CREATE TABLE IF NOT EXISTS instances (
    sop_instance_uid    TEXT PRIMARY KEY,
    study_instance_uid  TEXT NOT NULL,
    series_instance_uid TEXT NOT NULL,
    sop_class_uid       TEXT NOT NULL,
    path                TEXT NOT NULL,
    size                INTEGER NOT NULL,
    calling_aet         TEXT NOT NULL,
    received_at         REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS instances_by_study ON instances (study_instance_uid);
CREATE TABLE IF NOT EXISTS studies (
    study_instance_uid TEXT PRIMARY KEY,
    state              TEXT NOT NULL CHECK (state IN ('receiving', 'complete')),
    generation         INTEGER NOT NULL,
    instance_count     INTEGER NOT NULL,
    first_received     REAL NOT NULL,
    last_received      REAL NOT NULL,
    completed_at       REAL,
    opened_at          REAL,
    completed_rule     TEXT
);
CREATE TABLE IF NOT EXISTS jobs (
    id                 INTEGER PRIMARY KEY,
    study_instance_uid TEXT NOT NULL,
    generation         INTEGER NOT NULL,
    state              TEXT NOT NULL
                       CHECK (state IN ('queued', 'running', 'done', 'failed', 'superseded')),
    attempts           INTEGER NOT NULL DEFAULT 0,
    last_error         TEXT,
    outputs            INTEGER NOT NULL DEFAULT 0,
    created_at         REAL NOT NULL,
    started_at         REAL,
    finished_at        REAL,
    lane               TEXT NOT NULL DEFAULT 'bulk',
    worker_pid         INTEGER,
    UNIQUE (study_instance_uid, generation)
);
CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs (state);
CREATE TABLE IF NOT EXISTS outbound (
    id                 INTEGER PRIMARY KEY,
    job_id             INTEGER NOT NULL,
    study_instance_uid TEXT NOT NULL,
    sop_instance_uid   TEXT NOT NULL,
    sop_class_uid      TEXT NOT NULL,
    path               TEXT NOT NULL,
    destination        TEXT NOT NULL,
    state              TEXT NOT NULL CHECK (state IN ('pending', 'delivered', 'dead')),
    attempts           INTEGER NOT NULL DEFAULT 0,
    next_attempt_at    REAL NOT NULL,
    last_error         TEXT,
    created_at         REAL NOT NULL,
    delivered_at       REAL,
    pending_since      REAL,
    late               INTEGER NOT NULL DEFAULT 0,
    UNIQUE (sop_instance_uid, destination)
);
CREATE INDEX IF NOT EXISTS outbound_due ON outbound (state, next_attempt_at);
CREATE TABLE IF NOT EXISTS metric_counters (
    name  TEXT NOT NULL,
    label TEXT NOT NULL,
    value REAL NOT NULL,
    PRIMARY KEY (name, label)
);
CREATE TABLE IF NOT EXISTS metric_histograms (
    name  TEXT NOT NULL,
    label TEXT NOT NULL,
    le    REAL NOT NULL,
    count INTEGER NOT NULL,
    sum   REAL NOT NULL,
    PRIMARY KEY (name, label, le)
);
CREATE TABLE IF NOT EXISTS instance_facts (
    sop_instance_uid    TEXT PRIMARY KEY,
    study_instance_uid  TEXT NOT NULL,
    kind                TEXT NOT NULL CHECK (kind IN ('single', 'long', 'neutral'))
);
CREATE INDEX IF NOT EXISTS instance_facts_by_study ON instance_facts (study_instance_uid);
CREATE TABLE IF NOT EXISTS study_expectations (
    study_instance_uid TEXT NOT NULL,
    source             TEXT NOT NULL
                       CHECK (source IN ('study-instances', 'study-series', 'series-instances',
                                         'manifest')),
    source_key         TEXT NOT NULL,
    expected_count     INTEGER,
    consumed           INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (study_instance_uid, source, source_key)
);
CREATE TABLE IF NOT EXISTS expected_instances (
    study_instance_uid TEXT NOT NULL,
    source_key         TEXT NOT NULL,
    sop_instance_uid   TEXT NOT NULL,
    PRIMARY KEY (study_instance_uid, source_key, sop_instance_uid)
);
CREATE TABLE IF NOT EXISTS mpps (
    sop_instance_uid   TEXT PRIMARY KEY,
    status             TEXT NOT NULL
                       CHECK (status IN ('IN PROGRESS', 'COMPLETED', 'DISCONTINUED')),
    calling_aet        TEXT NOT NULL,
    created_at         REAL NOT NULL,
    updated_at         REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS mpps_studies (
    mpps_uid           TEXT NOT NULL,
    study_instance_uid TEXT NOT NULL,
    consumed           INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (mpps_uid, study_instance_uid)
);
CREATE INDEX IF NOT EXISTS mpps_studies_by_study ON mpps_studies (study_instance_uid);
CREATE TABLE IF NOT EXISTS mpps_instances (
    mpps_uid            TEXT NOT NULL,
    series_instance_uid TEXT NOT NULL,
    sop_instance_uid    TEXT NOT NULL,
    PRIMARY KEY (mpps_uid, sop_instance_uid)
);
CREATE TRIGGER IF NOT EXISTS instance_facts_go_with_instance AFTER DELETE ON instances
BEGIN
    DELETE FROM instance_facts WHERE sop_instance_uid = OLD.sop_instance_uid;
END;
CREATE TRIGGER IF NOT EXISTS expectations_go_with_study AFTER DELETE ON studies
BEGIN
    DELETE FROM study_expectations WHERE study_instance_uid = OLD.study_instance_uid;
    DELETE FROM expected_instances WHERE study_instance_uid = OLD.study_instance_uid;
    DELETE FROM mpps_studies WHERE study_instance_uid = OLD.study_instance_uid;
END;
CREATE TRIGGER IF NOT EXISTS mpps_parts_go_with_mpps AFTER DELETE ON mpps
BEGIN
    DELETE FROM mpps_studies WHERE mpps_uid = OLD.sop_instance_uid;
    DELETE FROM mpps_instances WHERE mpps_uid = OLD.sop_instance_uid;
END;
"""


def connect(path: Path, *, synchronous: Synchronous = "FULL",
            check_same_thread: bool = True) -> sqlite3.Connection:
    """Open (and create if needed) the index database in WAL mode.

    Parameters
    ----------
    path:
        The database file.
    synchronous:
        ``FULL`` fsyncs the WAL on every commit. The receiver uses ``NORMAL``: its files are
        fsync'ed before their row is written and the start-up scan re-indexes any file whose row
        a power cut lost, so the index commit need not pay a second fsync.
    check_same_thread:
        ``False`` when one connection is shared by threads under a lock.

    Returns
    -------
    sqlite3.Connection
        In autocommit mode; group writes with :func:`transaction`.
    """
    conn = sqlite3.connect(path, timeout=30.0, isolation_level=None,
                           check_same_thread=check_same_thread)
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(f"PRAGMA synchronous={synchronous}")
    conn.execute("PRAGMA busy_timeout=30000")
    conn.executescript(SCHEMA)
    _add_missing_columns(conn)
    return conn


#: Columns added to a table after its first release: (table, column, declaration).
_ADDED_COLUMNS = (("outbound", "pending_since", "REAL"),
                  ("outbound", "late", "INTEGER NOT NULL DEFAULT 0"),
                  ("studies", "opened_at", "REAL"),
                  ("studies", "completed_rule", "TEXT"),
                  ("jobs", "lane", "TEXT NOT NULL DEFAULT 'bulk'"),
                  ("jobs", "worker_pid", "INTEGER"),
                  ("jobs", "modality", "TEXT"))


def _add_missing_columns(conn: sqlite3.Connection) -> None:
    """Bring an index written by an earlier version up to :data:`SCHEMA`."""
    for table, column, declaration in _ADDED_COLUMNS:
        present = {str(r[1]) for r in conn.execute(f"PRAGMA table_info({table})")}
        if column not in present:
            with contextlib.suppress(sqlite3.OperationalError):  # another process was first
                conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} {declaration}")


@contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """Run a block as one write transaction (``BEGIN IMMEDIATE``), rolled back on error.

    ``IMMEDIATE`` takes the write lock up front, so two processes never both read a row as
    queued and then both claim it.
    """
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")
