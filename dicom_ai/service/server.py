"""``dicom-ai serve``: start-up recovery, then the listener, the assembler, the worker and exporter.

Process layout::

    dicom-ai serve            listener (a thread per association), assembler, retention sweeper,
                              pacer (pauses the worker while instances arrive), supervisor
      ├─ worker process       models loaded once; runs jobs (nice 10)
      └─ exporter process     C-STORE SCU / STOW-RS deliveries

On start, before the listener opens, everything unfinished is resumed: whole instances on disk
without an index row are indexed, jobs a dead worker left ``running`` are re-queued, complete
studies without a job get one, and pending deliveries simply stay due. A child process that dies is
restarted by the supervisor (its interrupted job re-queued first).
"""

from __future__ import annotations

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
from dicom_ai.service import db, pacing, studies
from dicom_ai.service.export import exporter_main
from dicom_ai.service.pacing import Pacer
from dicom_ai.service.retention import Sweeper
from dicom_ai.service.scp import FreeBytes, disk_free_bytes, start_scp
from dicom_ai.service.spool import Spool
from dicom_ai.service.worker import Processor, pipeline_processor, requeue_interrupted, worker_main

log = logging.getLogger(__name__)

#: A child that dies is restarted, but not more often than this, so a crash loop stays visible in
#: the log instead of spinning the CPU.
RESTART_INTERVAL_S = 5.0


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
        # The listener stamps it at every C-STORE; the pacer pauses the worker while it is recent,
        # never while the worker holds `critical` (an index transaction).
        self._reception = self._ctx.Value("d", 0.0, lock=False)
        self._critical = self._ctx.Lock()
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
                self.settings, self._stop_children, parent, self.processor_factory,
                self._critical))
        else:
            proc = self._ctx.Process(target=exporter_main, name="dicom-ai-exporter",
                                     args=(self.settings, self._stop_children, parent))
        proc.start()
        self._children[name] = proc
        self._started_at[name] = time.monotonic()
        log.info("%s process started (pid %s)", name, proc.pid)

    def _worker_pid(self) -> int | None:
        worker = self._children.get("worker")
        return worker.pid if worker is not None and worker.is_alive() else None

    def _supervise(self) -> None:
        while not self._stopping.wait(1.0):
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
        """Recover, start everything, and serve until SIGTERM or SIGINT; returns the exit code."""
        spool = Spool(self.root)
        self.recover(spool)
        for name in ("worker", "exporter"):
            self._start_child(name)
        assembler = studies.Assembler(spool.db_path, self.settings.studies.quiet_period_s)
        assembler.start()
        sweeper = None
        if self.settings.storage.retention_days > 0:
            sweeper = Sweeper(spool, self.settings.storage.retention_days)
            sweeper.start()
        listener = start_scp(self.settings, spool, free_bytes=self.free_bytes,
                             reception=self._reception)
        pacer = None
        if self.settings.worker.reception_pause_s > 0 and pacing.supported():
            pacer = Pacer(self._reception, self._critical, self._worker_pid,
                          self.settings.worker.reception_pause_s)
            pacer.start()
        supervisor = threading.Thread(target=self._supervise, name="supervisor", daemon=True)
        supervisor.start()

        def request_stop(signum: int, _frame: FrameType | None) -> None:
            log.info("signal %d: stopping", signum)
            self._stopping.set()

        signal.signal(signal.SIGTERM, request_stop)
        signal.signal(signal.SIGINT, request_stop)
        while not self._stopping.wait(1.0):
            pass
        listener.stop()
        if pacer is not None:
            pacer.stop()
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
        spool.close()
        log.info("stopped")
        return 0
