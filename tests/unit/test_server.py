"""Start-up: the storage lock, a port in use, recovery of everything a crash left unfinished; the
worker pool: its plan, and a dead worker restarted with only its own job re-queued."""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
from test_spool import encoded

from dicom_ai.config import Settings
from dicom_ai.service import db
from dicom_ai.service.lanes import BULK, FAST
from dicom_ai.service.process import usable_cpus
from dicom_ai.service.server import Service, ServiceError, lock_storage
from dicom_ai.service.spool import Spool, parse_keys
from dicom_ai.service.worker import ProcessedStudy, Processor


def test_recover_indexes_requeues_and_queues(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    conn = db.connect(spool.db_path)
    # A study completed before the crash whose job was never written.
    insert_study = ("INSERT INTO studies (study_instance_uid, state, generation, instance_count, "
                    "first_received, last_received, completed_at) "
                    "VALUES (?, 'complete', 1, 1, 0, 0, 10)")
    conn.execute(insert_study, ("1.1",))
    # A job the dead worker was running.
    conn.execute(insert_study, ("2.2",))
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


def test_the_pool_has_a_fast_lane_worker_beside_the_others(tmp_path: Path) -> None:
    settings = Settings()
    settings.storage.directory = str(tmp_path)
    settings.worker.processes = 3
    workers = Service(settings).workers
    assert {name: plan.lanes for name, plan in workers.items()} == {
        "worker-1": (FAST,), "worker-2": (FAST, BULK), "worker-3": (FAST, BULK)}
    settings.worker.processes = 0
    assert len(Service(settings).workers) >= 1


def held_processor(settings: Settings) -> Processor:
    """Each call notes its process in ``held/`` and waits for ``release`` (at most 60 s)."""
    root = Path(settings.storage.directory)

    def process(paths: Sequence[Path]) -> ProcessedStudy:
        (root / "held").mkdir(exist_ok=True)
        (root / "held" / f"{os.getpid()}-{time.monotonic_ns()}").touch()
        deadline = time.monotonic() + 60
        while not (root / "release").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        return ProcessedStudy([])

    return process


def wait_for(check: Callable[[], bool], what: str, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_a_dead_worker_is_restarted_and_only_its_job_requeued(tmp_path: Path) -> None:
    settings = Settings()
    settings.storage.directory = str(tmp_path)
    settings.worker.processes = 2
    settings.worker.poll_interval_s = 0.1
    conn = db.connect(Spool(tmp_path).db_path)

    def queue(study: str, lane: str) -> None:
        conn.execute("INSERT INTO jobs (study_instance_uid, generation, state, created_at, lane) "
                     "VALUES (?, 1, 'queued', ?, ?)", (study, time.time(), lane))

    def held() -> int:
        return len(list((tmp_path / "held").glob("*"))) if (tmp_path / "held").exists() else 0

    service = Service(settings, processor_factory=held_processor)

    def jobs() -> dict[str, tuple[str, int, int | None]]:
        return {r[0]: (r[1], r[2], r[3]) for r in conn.execute(
            "SELECT lane, state, attempts, worker_pid FROM jobs")}

    try:
        for name in service.workers:
            service._start_child(name)
        pids = {name: proc.pid for name, proc in service._children.items()}
        # A CT first: only worker-2 may take it; then a CXR, for the idle fast-lane worker.
        queue("1.2.3.2", BULK)
        wait_for(lambda: held() == 1, "the bulk job to be held")
        queue("1.2.3.1", FAST)
        wait_for(lambda: held() == 2, "both jobs to be held")
        # Only the worker that takes CTs keeps off the listener's CPU.
        cpus = set(usable_cpus())
        assert os.sched_getaffinity(pids["worker-1"]) == cpus
        assert os.sched_getaffinity(pids["worker-2"]) == (
            cpus - {min(cpus)} if len(cpus) > 1 else cpus)
        assert jobs() == {FAST: ("running", 1, pids["worker-1"]),
                          BULK: ("running", 1, pids["worker-2"])}
        os.kill(pids["worker-2"], signal.SIGKILL)
        service._children["worker-2"].join(timeout=30)
        service._started_at["worker-2"] -= 60  # past the restart interval
        service._supervise()
        new_pid = service._children["worker-2"].pid
        assert new_pid != pids["worker-2"]
        wait_for(lambda: jobs()[BULK] == ("running", 2, new_pid), "the bulk job re-claimed")
        # The fast job was never touched.
        assert jobs()[FAST] == ("running", 1, pids["worker-1"])
        (tmp_path / "release").touch()
        wait_for(lambda: {s for s, _, _ in jobs().values()} == {"done"}, "both jobs done")
    finally:
        service.stop_children()
    assert jobs() == {FAST: ("done", 1, pids["worker-1"]), BULK: ("done", 2, new_pid)}


def test_a_job_past_its_time_limit_fails_and_its_worker_is_replaced(tmp_path: Path) -> None:
    """A hung analysis (a call that never returns) is stopped at ``worker.job_timeout_s``:
    its study fails for good with the reason, and a fresh worker takes the next study."""
    settings = Settings()
    settings.storage.directory = str(tmp_path)
    settings.worker.processes = 1
    settings.worker.poll_interval_s = 0.1
    settings.worker.job_timeout_s = 0.5
    conn = db.connect(Spool(tmp_path).db_path)
    service = Service(settings, processor_factory=held_processor)

    def job(study: str) -> tuple[str, int, str | None]:
        row = conn.execute("SELECT state, attempts, last_error FROM jobs "
                           "WHERE study_instance_uid = ?", (study,)).fetchone()
        return row[0], row[1], row[2]

    try:
        (name,) = service.workers
        service._start_child(name)
        first = service._children[name].pid
        conn.execute("INSERT INTO jobs (study_instance_uid, generation, state, created_at) "
                     "VALUES ('1.2.3.1', 1, 'queued', ?)", (time.time(),))
        wait_for(lambda: job("1.2.3.1")[0] == "running", "the job to be claimed")
        # Not yet past the limit: nothing is touched.
        service._stop_overdue(conn)
        assert service._children[name].pid == first
        time.sleep(0.6)
        service._stop_overdue(conn)
        assert job("1.2.3.1") == (
            "failed", 1, "analysis ran past worker.job_timeout_s (0.5 s); the worker was stopped")
        assert first is not None and not Path(f"/proc/{first}").exists()
        second = service._children[name].pid
        assert second not in (None, first)
        trail = [json.loads(line) for line in
                 (tmp_path / "audit" / "1.2.3.1.jsonl").read_text().splitlines()]
        assert [(e["event"], e.get("final")) for e in trail] == [("job_started", None),
                                                                 ("failed", True)]
        (tmp_path / "release").touch()
        conn.execute("INSERT INTO jobs (study_instance_uid, generation, state, created_at) "
                     "VALUES ('1.2.3.2', 1, 'queued', ?)", (time.time(),))
        wait_for(lambda: job("1.2.3.2")[0] == "done", "the next job done by the fresh worker")
    finally:
        service.stop_children()
    assert job("1.2.3.1")[0] == "failed"


def ready_processor(settings: Settings) -> Processor:
    """Notes its process in ``ready/`` once loaded (the worker is then idle in its poll loop)."""
    ready = Path(settings.storage.directory) / "ready"
    ready.mkdir(exist_ok=True)
    (ready / str(os.getpid())).touch()

    def process(paths: Sequence[Path]) -> ProcessedStudy:
        return ProcessedStudy([])

    return process


def test_children_stop_on_sigterm_and_a_killed_child_cannot_block_the_stop(
        tmp_path: Path) -> None:
    """systemd's KillMode=control-group and ``docker stop`` signal every process of the group:
    each child then stops by itself (exit code 0, not death by signal). A child killed while
    idle (SIGKILL, the OOM killer) shares no lock with the service, so the service's stop of
    the others still returns at once (a multiprocessing.Event waited on by a killed child
    made it block for ever)."""
    settings = Settings()
    settings.storage.directory = str(tmp_path)
    settings.worker.processes = 2
    settings.worker.poll_interval_s = 0.1
    service = Service(settings, processor_factory=ready_processor)
    try:
        for name in (*service.workers, "exporter"):
            service._start_child(name)
        children = dict(service._children)
        wait_for(lambda: len(list((tmp_path / "ready").glob("*"))) == 2
                 if (tmp_path / "ready").exists() else False, "both workers loaded")
        killed, signalled = children["worker-1"], children["worker-2"]
        assert killed.pid is not None and signalled.pid is not None
        os.kill(killed.pid, signal.SIGKILL)
        killed.join(timeout=30)
        os.kill(signalled.pid, signal.SIGTERM)
        signalled.join(timeout=30)
        assert (killed.exitcode, signalled.exitcode) == (-signal.SIGKILL, 0)
        started = time.monotonic()
        service.stop_children()
        assert time.monotonic() - started < 20
        assert children["exporter"].exitcode == 0
    finally:
        for proc in service._children.values():
            if proc.is_alive():
                proc.kill()
