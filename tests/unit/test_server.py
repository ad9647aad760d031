"""Start-up: the storage lock, a port in use, and recovery of everything a crash left unfinished."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
from test_spool import encoded

from dicom_ai.config import Settings
from dicom_ai.service import db
from dicom_ai.service.server import Service, ServiceError, lock_storage
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


def test_second_service_on_the_same_storage_is_refused(tmp_path: Path) -> None:
    first = lock_storage(tmp_path)
    try:
        with pytest.raises(ServiceError, match=f"in use by another dicom-ai serve \\(pid "
                                               f"{os.getpid()}\\)"):
            lock_storage(tmp_path)
    finally:
        os.close(first)
    # The kernel drops the lock with its holder: the next one gets it.
    os.close(lock_storage(tmp_path))


def test_port_in_use_is_one_error_and_starts_nothing(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        settings = Settings()
        settings.storage.directory = str(tmp_path)
        settings.scp.port = taken.getsockname()[1]
        service = Service(settings)
        with pytest.raises(ServiceError, match=r"cannot listen on 127\.0\.0\.1:"):
            service.run()
    assert service._children == {}
    # The storage lock was given back.
    os.close(lock_storage(tmp_path))
