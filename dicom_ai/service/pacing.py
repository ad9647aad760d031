"""Reception first: the worker process is paused while instances arrive.

On a small server the worker's CPU time slows reception even at the lowest scheduling priority
(shared caches and memory bandwidth, and on a virtual machine the host's scheduling). So the
listener stamps a shared clock at every C-STORE, and a :class:`Pacer` thread in the service
process stops the worker (``SIGSTOP``) while that stamp is recent and continues it (``SIGCONT``)
as soon as reception has been quiet for :data:`RECENT_S`. A pause lasts at most
``worker.reception_pause_s``, and after one the worker runs at least :data:`MIN_RUN_S`, so a PACS
that sends without a break slows the analysis but cannot stop it. A signal pauses every phase of
the analysis alike — network layers and whole-volume SimpleITK calls.

The worker is never stopped inside an index transaction: it holds the shared ``critical`` lock
around each one, and the pacer sends ``SIGSTOP`` only while holding that lock itself, keeping it
until the kernel reports the worker stopped. Linux only (``/proc``); elsewhere nothing is paused.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

log = logging.getLogger(__name__)

#: A C-STORE within this many seconds means "receiving".
RECENT_S = 0.2
#: Seconds the worker runs after each pause before it may be paused again: with the default
#: 5 s pauses, a sender that never stops leaves the analysis a sixth of the CPU time.
MIN_RUN_S = 1.0
#: How often the pacer looks at the clock.
POLL_S = 0.01
#: How long the pacer waits for the kernel to report the worker stopped.
STOP_CONFIRM_S = 0.5


class SharedClock(Protocol):
    """A ``multiprocessing.Value('d')``: seconds on the system-wide monotonic clock."""

    value: float


class Lock(Protocol):
    """A ``multiprocessing.Lock``."""

    def acquire(self, block: bool = ..., timeout: float = ...) -> bool: ...

    def release(self) -> None: ...


def stamp(clock: SharedClock) -> None:
    """Record that an instance is arriving now (listener side)."""
    clock.value = time.monotonic()


def supported() -> bool:
    """True where processes can be paused and their state read (Linux)."""
    return sys.platform.startswith("linux") and hasattr(signal, "SIGSTOP")


def is_stopped(pid: int) -> bool:
    """True when the kernel reports ``pid`` stopped (state T in ``/proc/<pid>/stat``)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    # The command name in parentheses may hold spaces; the state follows the last ")".
    return stat.rpartition(")")[2].split()[0] == "T"


class Pacer(threading.Thread):
    """Pauses the worker while instances arrive.

    Parameters
    ----------
    clock:
        Stamped by the listener at each C-STORE.
    critical:
        Held by the worker around index transactions.
    worker_pid:
        The current worker's PID, or ``None`` while there is none (it is restarted with a new
        PID after a crash).
    max_pause_s:
        Longest single pause.
    """

    def __init__(self, clock: SharedClock, critical: Lock, worker_pid: Callable[[], int | None],
                 max_pause_s: float) -> None:
        super().__init__(name="pacer", daemon=True)
        self.clock = clock
        self.critical = critical
        self.worker_pid = worker_pid
        self.max_pause_s = max_pause_s
        self._stop_event = threading.Event()
        self._paused: int | None = None
        self._paused_at = 0.0
        self._run_until = 0.0
        #: Pauses so far and their total length, for the log line at the end.
        self.pauses = 0
        self.paused_s = 0.0

    def stop(self) -> None:
        """Stop pacing and let the worker run (call before stopping the worker)."""
        self._stop_event.set()
        if self.ident is not None:
            self.join()
        self._resume(time.monotonic())
        if self.pauses:
            log.info("worker paused %d times for reception, %.1f s in all", self.pauses,
                     self.paused_s)

    def run(self) -> None:
        while not self._stop_event.wait(POLL_S):
            self.step(time.monotonic())

    def step(self, now: float) -> None:
        """One look at the clock: pause, continue or leave the worker as it is."""
        receiving = now - self.clock.value < RECENT_S
        if self._paused is not None:
            if (not receiving or now - self._paused_at >= self.max_pause_s
                    or self._paused != self.worker_pid()):
                self._resume(now)
        elif receiving and now >= self._run_until:
            # Only now is the worker looked up: the poll runs 100 times a second.
            pid = self.worker_pid()
            if pid is not None:
                self._pause(pid, now)

    def _pause(self, pid: int, now: float) -> None:
        if not self.critical.acquire(False):
            return  # inside an index transaction; try again at the next poll
        try:
            os.kill(pid, signal.SIGSTOP)
            self._paused, self._paused_at = pid, now
            deadline = time.monotonic() + STOP_CONFIRM_S
            while not is_stopped(pid) and time.monotonic() < deadline:
                time.sleep(0.001)
        except ProcessLookupError:
            pass  # the worker just exited; the supervisor restarts it
        finally:
            self.critical.release()

    def _resume(self, now: float) -> None:
        if self._paused is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(self._paused, signal.SIGCONT)
        self.pauses += 1
        self.paused_s += now - self._paused_at
        self._paused = None
        self._run_until = now + MIN_RUN_S
