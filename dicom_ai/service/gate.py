"""Inference steps aside while the listener is receiving.

On a small server the worker's CPU time slows reception even at the lowest priority (shared
caches and memory bandwidth, and on virtual machines the host's scheduling): on the 2-core
reference VM a study being analysed cut the C-STORE rate by about a third. So the listener
stamps a shared clock at every C-STORE, and the worker, before each network layer it runs,
pauses while that stamp is recent. A pause lasts at most ``worker.reception_pause_s``; after one,
inference runs at least :data:`MIN_RUN_S` before it may pause again, so a PACS that sends without
a break slows the analysis but cannot stop it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Protocol

#: A C-STORE within this many seconds means "receiving" (one instance every 200 ms or faster).
RECENT_S = 0.2
#: Seconds of inference guaranteed after each pause.
MIN_RUN_S = 0.5
#: How often a paused worker looks at the clock again.
POLL_S = 0.01


class SharedClock(Protocol):
    """A ``multiprocessing.Value('d')``: seconds on the system-wide monotonic clock."""

    value: float


def stamp(clock: SharedClock) -> None:
    """Record that an instance is arriving now (listener side)."""
    clock.value = time.monotonic()


class ReceptionGate:
    """A forward pre-hook for every module that pauses inference during reception.

    Parameters
    ----------
    clock:
        Stamped by the listener at each C-STORE.
    max_pause_s:
        Longest single pause.
    now:
        The monotonic clock, replaceable in tests.
    sleep:
        Replaceable in tests.
    """

    def __init__(self, clock: SharedClock, max_pause_s: float, *,
                 now: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.clock = clock
        self.max_pause_s = max_pause_s
        self._now = now
        self._sleep = sleep
        self._run_until = 0.0

    def receiving(self) -> bool:
        """True when an instance arrived within :data:`RECENT_S`."""
        return self._now() - self.clock.value < RECENT_S

    def __call__(self, _module: Any, _inputs: Any) -> None:
        start = self._now()
        if start < self._run_until or not self.receiving():
            return
        while self.receiving() and self._now() - start < self.max_pause_s:
            self._sleep(POLL_S)
        self._run_until = self._now() + MIN_RUN_S
