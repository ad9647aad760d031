"""Start-up recovery: everything a crash left unfinished is resumed before the listener opens."""

from __future__ import annotations

from pathlib import Path

from test_spool import encoded

from dicom_ai.config import Settings
from dicom_ai.service import db
from dicom_ai.service.server import Service
from dicom_ai.service.spool import Spool, parse_keys


def test_recover_indexes_requeues_and_queues(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    conn = db.connect(spool.db_path)
    # A study completed before the crash whose job was never written.
    conn.execute("INSERT INTO studies VALUES ('1.1', 'complete', 1, 1, 0, 0, 10)")
    # A job the dead worker was running.
    conn.execute("INSERT INTO studies VALUES ('2.2', 'complete', 1, 1, 0, 0, 10)")
    conn.execute("INSERT INTO jobs (study_instance_uid, generation, state, attempts, created_at) "
                 "VALUES ('2.2', 1, 'running', 1, 10)")
    # An instance renamed into place but not indexed.
    data = encoded("1.2.3.200")
    target = spool.instance_path(parse_keys(data))
    target.parent.mkdir(parents=True)
    target.write_bytes(data)

    settings = Settings()
    settings.storage.directory = str(tmp_path)
    Service(settings).recover(spool)

    assert [tuple(r) for r in conn.execute(
        "SELECT study_instance_uid, state, attempts FROM jobs ORDER BY study_instance_uid")] == [
        ("1.1", "queued", 0), ("2.2", "queued", 1)]
    assert conn.execute("SELECT sop_instance_uid FROM instances").fetchone()[0] == "1.2.3.200"
    assert conn.execute("SELECT state FROM studies WHERE study_instance_uid = ?",
                        (parse_keys(data).study_instance_uid,)).fetchone()[0] == "receiving"
