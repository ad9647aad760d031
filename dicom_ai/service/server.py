"""``dicom-ai serve``: start-up recovery, then the listener, the assembler, the worker and exporter.

Process layout::

    dicom-ai serve            listener (a thread per association), assembler, retention sweeper;
                              its main thread supervises the children
      ├─ worker process       models loaded once; runs jobs (SCHED_IDLE: reception comes first)
      └─ exporter process     C-STORE SCU / STOW-RS deliveries

On start, the storage directory is locked (one service per directory: a second one exits with one
line), then everything unfinished is resumed before the listener opens: whole instances on disk
without an index row are indexed, jobs a dead worker left ``running`` are re-queued, complete
studies without a job get one, and pending deliveries simply stay due. Only then do the listener,
the worker and the exporter start. A child process that dies is restarted (its interrupted job
re-queued first); a child never outlives the service, even one killed with SIGKILL
(:mod:`dicom_ai.service.process`).
"""

from __future__ import annotations

import errno
import fcntl
import logging
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable
from multiprocessing.context import SpawnProcess
from pathlib import Path
from types import FrameType

from dicom_ai.config import Settings
from dicom_ai.service import db, studies
from dicom_ai.service.export import exporter_main
from dicom_ai.service.retention import Sweeper
from dicom_ai.service.scp import FreeBytes, Listener, disk_free_bytes, start_scp
from dicom_ai.service.spool import Spool
from dicom_ai.service.worker import Processor, pipeline_processor, requeue_interrupted, worker_main

log = logging.getLogger(__name__)

#: A child that dies is restarted, but not more often than this, so a crash loop stays visible in
#: the log instead of spinning the CPU.
RESTART_INTERVAL_S = 5.0

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
        Builds the study processor inside the worker process (the real pipeline by default); it
        must be a module-level function because the worker is a spawned process.
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
        self._stop_children = self._ctx.Event()
        self._stopping = threading.Event()
        self._children: dict[str, SpawnProcess] = {}
        self._started_at: dict[str, float] = {}

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
        if name == "worker":
            proc = self._ctx.Process(target=worker_main, name="dicom-ai-worker", args=(
                self.settings, self._stop_children, parent, self.processor_factory))
        else:
            proc = self._ctx.Process(target=exporter_main, name="dicom-ai-exporter",
                                     args=(self.settings, self._stop_children, parent))
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
            if name == "worker":
                conn = db.connect(self.root / "index.sqlite")
                try:
                    requeue_interrupted(conn, self.settings.worker.max_attempts, time.time())
                finally:
                    conn.close()
            self._start_child(name)

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
        for name in ("worker", "exporter"):
            self._start_child(name)
        assembler = studies.Assembler(spool.db_path, self.settings.studies.quiet_period_s)
        assembler.start()
        sweeper = None
        if self.settings.storage.retention_days > 0:
            sweeper = Sweeper(spool, self.settings.storage.retention_days)
            sweeper.start()
        while not self._stopping.wait(1.0):
            self._supervise()
        listener.stop()
        assembler.stop()
        if sweeper is not None:
            sweeper.stop()
            sweeper.join(timeout=30)
        self._stop_children.set()
        for name, proc in self._children.items():
            proc.join(timeout=30)
            if proc.is_alive():
                log.warning("%s did not stop in time; terminating", name)
                proc.terminate()
                proc.join(timeout=5)
        if not self._children["worker"].is_alive():
            conn = db.connect(spool.db_path)
            try:
                if requeue_interrupted(conn, self.settings.worker.max_attempts, time.time(),
                                       by_shutdown=True):
                    log.info("the job interrupted by the stop is queued again")
            finally:
                conn.close()
        assembler.join(timeout=5)
