"""Retention: which studies are finished, removing one without racing the listener, and audit
trails kept beyond their study for ``storage.audit_retention_days``."""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from pathlib import Path

import pytest
from test_spool import STUDY, encoded

from dicom_ai.service import audit, db
from dicom_ai.service import spool as spool_module
from dicom_ai.service.retention import SECONDS_PER_DAY, prune_audit, sweep
from dicom_ai.service.spool import Spool, parse_keys
from dicom_ai.service.studies import complete_quiet_studies, finished_before

DAY = SECONDS_PER_DAY


def received(spool: Spool, sop: str, now: float, study: str = STUDY) -> None:
    data = encoded(sop, study=study)
    spool.store([data], parse_keys(data), calling_aet="CT", now=now)


def processed(conn: sqlite3.Connection, study: str, *, job: str = "done",
              delivery: str | None = "delivered") -> None:
    """Complete the study, give its job ``job`` and one delivery in state ``delivery``."""
    complete_quiet_studies(conn, time.time() + 10 * DAY, 30.0)
    conn.execute("UPDATE jobs SET state = ? WHERE study_instance_uid = ?", (job, study))
    if delivery is not None:
        conn.execute("INSERT INTO outbound (job_id, study_instance_uid, sop_instance_uid, "
                     "sop_class_uid, path, destination, state, next_attempt_at, created_at) "
                     "VALUES (1, ?, ?, '1.2', 'outputs/x.dcm', 'pacs', ?, 0, 0)",
                     (study, f"{study}.9", delivery))


@pytest.mark.parametrize(("job", "delivery", "finished"), [
    ("done", "delivered", True),
    ("done", None, True),           # no destination configured
    ("failed", None, True),         # the failure is in the log and in `status` until then
    ("done", "pending", False),     # still being delivered
    ("done", "dead", False),        # waits for `dicom-ai retry`
    ("queued", None, False),
    ("running", None, False),
])
def test_finished_means_processed_and_delivered(tmp_path: Path, job: str,
                                               delivery: str | None, finished: bool) -> None:
    spool = Spool(tmp_path)
    received(spool, "1.2.3.1", now=1000.0)
    conn = db.connect(spool.db_path)
    processed(conn, STUDY, job=job, delivery=delivery)
    assert finished_before(conn, 1000.0 + DAY) == ([STUDY] if finished else [])
    # Not before the cutoff: the last instance arrived at t = 1000.
    assert finished_before(conn, 1000.0) == []


def test_a_study_still_receiving_is_kept(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    received(spool, "1.2.3.1", now=1000.0)
    conn = db.connect(spool.db_path)
    assert finished_before(conn, 1000.0 + 30 * DAY) == []


def test_sweep_removes_files_and_rows_and_the_study_can_arrive_again(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    other = "1.2.826.0.1.3680043.8.498.21"
    received(spool, "1.2.3.1", now=1000.0)
    received(spool, "1.2.3.2", now=1000.0)
    received(spool, "1.2.3.3", now=1000.0 + 6 * DAY, study=other)
    conn = db.connect(spool.db_path)
    processed(conn, STUDY)
    processed(conn, other)
    (spool.outputs / STUDY).mkdir()
    (spool.outputs / STUDY / "findings.json").write_text("{}")

    assert sweep(spool, conn, 1000.0 + 7.5 * DAY, retention_days=7.0) == 1
    assert not (spool.incoming / STUDY).exists() and not (spool.outputs / STUDY).exists()
    for table in ("instances", "studies", "jobs", "outbound"):
        assert conn.execute(f"SELECT COUNT(*) FROM {table} WHERE study_instance_uid = ?",
                            (STUDY,)).fetchone()[0] == 0
    # The younger study stays.
    assert (spool.incoming / other).is_dir()
    assert sweep(spool, conn, 1000.0 + 7.5 * DAY, retention_days=7.0) == 0
    # A late instance of the removed study is stored into a fresh directory and study row.
    received(spool, "1.2.3.4", now=1000.0 + 8 * DAY)
    assert (spool.incoming / STUDY).is_dir()
    assert tuple(conn.execute("SELECT state, generation, instance_count FROM studies "
                              "WHERE study_instance_uid = ?", (STUDY,)).fetchone()) == (
        "receiving", 1, 1)


def test_no_purge_while_an_instance_of_the_study_is_being_stored(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spool = Spool(tmp_path)
    received(spool, "1.2.3.1", now=1000.0)
    conn = db.connect(spool.db_path)
    processed(conn, STUDY)
    writing, release = threading.Event(), threading.Event()
    real_write = spool_module.write_all

    def slow_write(*args: object, **kwargs: object) -> int:
        writing.set()
        release.wait(10)
        return real_write(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(spool_module, "write_all", slow_write)
    store = threading.Thread(target=received, args=(spool, "1.2.3.2", 1000.0 + 0.5))
    store.start()
    assert writing.wait(10)
    assert spool.purge_study(STUDY, cutoff=1000.0 + 8 * DAY) is None
    release.set()
    store.join(10)
    # The new instance re-opened the study: it is no longer finished, and both files are there.
    assert len(list((spool.incoming / STUDY).rglob("*.dcm"))) == 2
    assert spool.purge_study(STUDY, cutoff=1000.0 + 8 * DAY) is None


def test_audit_trail_outlives_the_study_until_audit_retention_days(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    received(spool, "1.2.3.1", now=1000.0)
    conn = db.connect(spool.db_path)
    processed(conn, STUDY)
    trail = audit.audit_path(tmp_path, STUDY)
    assert audit.record(tmp_path, STUDY, "complete", now=1000.0, generation=1)
    os.utime(trail, (1000.0, 1000.0))
    # A trail of a study still in the index is kept whatever its age.
    still_here = "1.2.826.0.1.3680043.8.498.22"
    received(spool, "1.2.3.5", now=1000.0 + 9 * DAY, study=still_here)
    assert audit.record(tmp_path, still_here, "complete", generation=1)
    os.utime(audit.audit_path(tmp_path, still_here), (1000.0, 1000.0))

    now = 1000.0 + 7.5 * DAY
    assert sweep(spool, conn, now, retention_days=7.0, audit_retention_days=30.0) == 1
    assert not (spool.incoming / STUDY).exists()
    events = audit.read_events(tmp_path, STUDY)
    assert [e["event"] for e in events] == ["complete", "purged"]
    assert events[-1]["instances"] == 1
    os.utime(trail, (1000.0, 1000.0))

    assert prune_audit(tmp_path, conn, 1000.0 + 0.5) == 1
    assert not trail.exists()
    assert audit.audit_path(tmp_path, still_here).exists()


def test_audit_retention_zero_keeps_every_trail(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    received(spool, "1.2.3.1", now=1000.0)
    conn = db.connect(spool.db_path)
    processed(conn, STUDY)
    assert audit.record(tmp_path, STUDY, "complete", generation=1)
    os.utime(audit.audit_path(tmp_path, STUDY), (1000.0, 1000.0))
    assert sweep(spool, conn, 1000.0 + 3000 * DAY, retention_days=7.0) == 1
    assert [e["event"] for e in audit.read_events(tmp_path, STUDY)] == ["complete", "purged"]
