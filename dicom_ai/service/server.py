"""``dicom-ai serve``: start-up recovery, then the listener, assembler, workers and exporter.

Process layout::

    dicom-ai serve            listener (a thread per association), assembler, retention sweeper;
                              its main thread supervises the children
      ├─ worker-1 … worker-N  models loaded once per process; run jobs (worker-1 the fast lane
      │                       only when N ≥ 2; SCHED_BATCH nice 10, off the listener's CPU)
      └─ exporter process     C-STORE SCU / STOW-RS deliveries, never in a worker's way

The pool (``worker.processes``, sized from the machine by default) and the lanes are described in
:mod:`dicom_ai.service.lanes`.

On start, the storage directory is locked (one service per directory: a second one exits with one
line), then everything unfinished is resumed before the listener opens: whole instances on disk
without an index row are indexed, jobs a dead worker left ``running`` are re-queued, complete
studies without a job get one, and pending deliveries simply stay due. Only then do the listener,
the workers and the exporter start. A child process that dies is restarted (a worker's
interrupted job re-queued first: that worker's only, the others keep running theirs); a child
never outlives the service, even one killed with SIGKILL (:mod:`dicom_ai.service.process`).
"""

from __future__ import annotations

import errno
import fcntl
import logging
import multiprocessing
import os
import signal
import sqlite3
import threading
import time
from collections.abc import Callable
from multiprocessing.context import SpawnProcess
from pathlib import Path
from types import FrameType

from dicom_ai.config import Settings
from dicom_ai.service import db, metrics, page, studies
from dicom_ai.service.export import exporter_main
from dicom_ai.service.http import start_endpoint
from dicom_ai.service.lanes import WorkerPlan, available_memory, default_processes, plan_workers
from dicom_ai.service.process import usable_cpus
from dicom_ai.service.retention import Sweeper
from dicom_ai.service.scp import FreeBytes, Listener, disk_free_bytes, start_scp
from dicom_ai.service.spool import Spool
from dicom_ai.service.worker import (
    Processor,
    fail_timed_out,
    overdue_jobs,
    pipeline_processor,
    requeue_interrupted,
    worker_main,
)

log = logging.getLogger(__name__)

#: A child that dies is restarted, but not more often than this, so a crash loop stays visible in
#: the log instead of spinning the CPU.
RESTART_INTERVAL_S = 5.0

#: Seconds the children have, together, to finish their current work when the service stops.
STOP_TIMEOUT_S = 30.0

#: The lock file in ``storage.directory`` held by the running service.
LOCK_NAME = "serve.lock"


class ServiceError(Exception):
    """The service cannot start; the message is one line for the operator."""


def lock_storage(root: Path) -> int:
    """Take the exclusive lock on a storage directory; returns the open lock file descriptor.

    ``flock`` on ``serve.lock``: the kernel drops it when the holder dies, however it dies, so a
    killed service never blocks the next one. The holder's PID is written into the file for the
    message a second service prints.

    Raises
    ------
    ServiceError
        Another process holds the lock, or the directory cannot be used.
    """
    try:
        root.mkdir(parents=True, exist_ok=True)
        fd = os.open(root / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise ServiceError(f"storage directory {root}: {exc.strerror}") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise ServiceError(f"storage directory {root} is in use by another dicom-ai serve "
                               f"(pid {holder})") from exc
        raise ServiceError(f"storage directory {root}: cannot lock ({exc.strerror})") from exc
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


class Service:
    """The running service.

    Parameters
    ----------
    settings:
        All settings.
    processor_factory:
        Builds the study processor inside each worker process (the real pipeline by default); it
        must be a module-level function because the workers are spawned processes.
    free_bytes:
        Free-space probe for the listener.
    """

    def __init__(self, settings: Settings, *,
                 processor_factory: Callable[[Settings], Processor] = pipeline_processor,
                 free_bytes: FreeBytes = disk_free_bytes) -> None:
        self.settings = settings
        self.processor_factory = processor_factory
        self.free_bytes = free_bytes
        self.root = Path(settings.storage.directory)
        self._ctx = multiprocessing.get_context("spawn")
        self._stopping = threading.Event()
        self._children: dict[str, SpawnProcess] = {}
        self._started_at: dict[str, float] = {}
        cpus = len(usable_cpus())
        processes = settings.worker.processes or default_processes(cpus, available_memory())
        self.workers: dict[str, WorkerPlan] = {
            plan.name: plan
            for plan in plan_workers(processes, cpus, settings.inference.num_threads)}

    def recover(self, spool: Spool) -> None:
        """Resume what a previous run left unfinished (call before anything else runs)."""
        indexed = spool.reindex()
        conn = db.connect(spool.db_path)
        try:
            now = time.time()
            requeued = requeue_interrupted(conn, self.settings.worker.max_attempts, now)
            queued = studies.queue_unprocessed(conn, now)
            pending = conn.execute("SELECT COUNT(*) FROM outbound WHERE state = 'pending'"
                                   ).fetchone()[0]
        finally:
            conn.close()
        log.info("start-up: %d instances indexed from disk, %d interrupted jobs re-queued, "
                 "%d complete studies queued, %d deliveries pending", indexed, requeued, queued,
                 pending)

    def _start_child(self, name: str) -> None:
        parent = os.getpid()
        if name in self.workers:
            proc = self._ctx.Process(target=worker_main, name=f"dicom-ai-{name}", args=(
                self.settings, parent, self.processor_factory,
                self.workers[name]))
        else:
            proc = self._ctx.Process(target=exporter_main, name="dicom-ai-exporter",
                                     args=(self.settings, parent))
        proc.start()
        self._children[name] = proc
        self._started_at[name] = time.monotonic()
        log.info("%s process started (pid %s)", name, proc.pid)

    def _supervise(self) -> None:
        """Restart a child that died (called from the main thread only: see
        :func:`~dicom_ai.service.process.die_with_parent`)."""
        for name, proc in list(self._children.items()):
            if proc.is_alive() or self._stopping.is_set():
                continue
            if time.monotonic() - self._started_at[name] < RESTART_INTERVAL_S:
                continue
            log.error("%s process exited with code %s; restarting", name, proc.exitcode)
            metrics.child_restarted(name)
            if name in self.workers:
                self._requeue_of(proc)
            self._start_child(name)

    def _stop_overdue(self, conn: sqlite3.Connection) -> None:
        """Kill each worker whose job has run past ``worker.job_timeout_s``, fail that job for
        good and start a fresh worker (main thread only, like :meth:`_supervise`).

        The worker is killed before its job is failed, so that it cannot finish the job over the
        failure; should it have finished in between, the job stays done, and one it claimed since
        is queued again with its attempt given back.
        """
        timeout_s = self.settings.worker.job_timeout_s
        by_pid = {proc.pid: name for name, proc in self._children.items()
                  if name in self.workers and proc.is_alive()}
        for job in overdue_jobs(conn, time.time(), timeout_s):
            name = by_pid.pop(job.worker_pid, None)
            if name is None:  # a dead worker's job: _supervise re-queues it
                continue
            proc = self._children[name]
            proc.kill()
            proc.join(timeout=30)
            if fail_timed_out(conn, job, timeout_s, time.time(), audit_root=self.root):
                log.error("job %d ran past worker.job_timeout_s (%g s): %s killed, the study "
                          "failed; restarting it", job.id, timeout_s, name)
            requeue_interrupted(conn, self.settings.worker.max_attempts, time.time(),
                                by_shutdown=True, worker_pid=job.worker_pid)
            metrics.child_restarted(name)
            self._start_child(name)

    def _requeue_of(self, proc: SpawnProcess, *, by_shutdown: bool = False) -> int:
        """Re-queue the job a dead worker process was running (the others keep theirs)."""
        conn = db.connect(self.root / "index.sqlite")
        try:
            return requeue_interrupted(conn, self.settings.worker.max_attempts, time.time(),
                                       by_shutdown=by_shutdown, worker_pid=proc.pid)
        finally:
            conn.close()

    def stop_children(self) -> None:
        """Ask every child to stop (SIGTERM) and wait for them under one deadline.

        They finish their current study or delivery round side by side; one still running at the
        deadline is killed (its job is re-queued by the caller).
        """
        for proc in self._children.values():
            if proc.is_alive():
                proc.terminate()
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for name, proc in self._children.items():
            proc.join(timeout=max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                log.warning("%s did not stop in time; killing it", name)
                proc.kill()
                proc.join(timeout=5)

    def run(self) -> int:
        """Lock, recover, start everything, and serve until SIGTERM or SIGINT.

        Returns
        -------
        int
            The exit code.

        Raises
        ------
        ServiceError
            The storage directory is in use or the port cannot be opened; nothing was started.
        """
        lock = lock_storage(self.root)

        # Installed before anything starts: a stop asked for while the listener already
        # accepts but the children are still starting (a slow spawn) is a clean stop, not
        # Python's default SIGTERM death.
        def request_stop(signum: int, _frame: FrameType | None) -> None:
            log.info("signal %d: stopping", signum)
            self._stopping.set()

        signal.signal(signal.SIGTERM, request_stop)
        signal.signal(signal.SIGINT, request_stop)
        try:
            return self._run()
        finally:
            os.close(lock)

    def _run(self) -> int:
        spool = Spool(self.root)
        try:
            self.recover(spool)
            try:
                listener = start_scp(self.settings, spool, free_bytes=self.free_bytes)
            except OSError as exc:
                scp = self.settings.scp
                raise ServiceError(f"cannot listen on {scp.bind_address}:{scp.port}: "
                                   f"{exc.strerror or exc}") from exc
            self._serve(spool, listener)
        finally:
            spool.close()
        log.info("stopped")
        return 0

    def _serve(self, spool: Spool, listener: Listener) -> None:
        log.info("%d worker processes: %s", len(self.workers), ", ".join(
            f"{p.name} ({'+'.join(p.lanes)})" for p in self.workers.values()))
        for name in (*self.workers, "exporter"):
            self._start_child(name)
        endpoint = start_endpoint(self.settings, listener=listener, children=self._children,
                                  lock_path=self.root / LOCK_NAME, free_bytes=self.free_bytes)
        if endpoint is not None:  # the status page at / (dicom_ai.service.page)
            endpoint.add_route("/", page.handler(self.root, token=self.settings.http.token or None))
        assembler = studies.Assembler(spool.db_path,
                                      studies.CompletionRules.from_settings(self.settings.studies))
        assembler.start()
        sweeper = None
        if self.settings.storage.retention_days > 0:
            sweeper = Sweeper(spool, self.settings.storage.retention_days,
                              audit_retention_days=self.settings.storage.audit_retention_days)
            sweeper.start()
        watch = db.connect(spool.db_path)
        try:
            while not self._stopping.wait(1.0):
                self._stop_overdue(watch)
                self._supervise()
        finally:
            watch.close()
        # First: a stopping service is not ready, and probes should see that at once.
        if endpoint is not None:
            endpoint.stop()
        listener.stop()
        assembler.stop()
        if sweeper is not None:
            sweeper.stop()
            sweeper.join(timeout=30)
        self.stop_children()
        requeued = sum(self._requeue_of(proc, by_shutdown=True)
                       for name, proc in self._children.items()
                       if name in self.workers and not proc.is_alive())
        if requeued:
            log.info("%d jobs interrupted by the stop are queued again", requeued)
        assembler.join(timeout=5)
