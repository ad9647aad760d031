"""The pacer: the worker is stopped while instances arrive, boundedly, and never inside an index
transaction. A real child process stands in for the worker."""

from __future__ import annotations

import multiprocessing
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest

from dicom_ai.service.pacing import MIN_RUN_S, RECENT_S, Pacer, is_stopped, stamp, supported

pytestmark = pytest.mark.skipif(not supported(), reason="pausing processes needs Linux")


@dataclass
class Clock:
    value: float = 0.0


@pytest.fixture
def busy_child() -> Iterator[int]:
    child = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        yield child.pid
    finally:
        child.kill()
        child.wait()


def wait_until(condition: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def test_paused_while_receiving_then_continued(busy_child: int) -> None:
    clock, lock = Clock(), multiprocessing.Lock()
    pacer = Pacer(clock, lock, lambda: busy_child, max_pause_s=5.0)
    pacer.start()
    try:
        assert not is_stopped(busy_child)
        stamp(clock)
        assert wait_until(lambda: is_stopped(busy_child), timeout=1.0)
        # Reception goes quiet: continued about RECENT_S after the last stamp.
        assert wait_until(lambda: not is_stopped(busy_child), timeout=RECENT_S + 1.0)
    finally:
        pacer.stop()
    assert not is_stopped(busy_child)
    assert pacer.pauses == 1


def test_pauses_are_bounded_under_endless_reception(busy_child: int) -> None:
    clock, lock = Clock(), multiprocessing.Lock()
    pacer = Pacer(clock, lock, lambda: busy_child, max_pause_s=0.3)
    now = 1000.0
    clock.value = now
    pacer.step(now)  # pause
    assert is_stopped(busy_child)
    clock.value = now + 0.29
    pacer.step(now + 0.29)
    assert is_stopped(busy_child)
    clock.value = now + 0.31
    pacer.step(now + 0.31)  # the longest pause is over
    assert wait_until(lambda: not is_stopped(busy_child))
    clock.value = now + 0.31 + MIN_RUN_S / 2
    pacer.step(now + 0.31 + MIN_RUN_S / 2)  # still in its guaranteed run
    assert not is_stopped(busy_child)
    clock.value = now + 0.32 + MIN_RUN_S
    pacer.step(now + 0.32 + MIN_RUN_S)
    assert is_stopped(busy_child)
    pacer.stop()
    assert wait_until(lambda: not is_stopped(busy_child))


def test_never_paused_inside_an_index_transaction(busy_child: int) -> None:
    clock, lock = Clock(), multiprocessing.Lock()
    pacer = Pacer(clock, lock, lambda: busy_child, max_pause_s=5.0)
    with lock:  # the worker is in a transaction
        clock.value = 1000.0
        pacer.step(1000.0)
        assert not is_stopped(busy_child)
    pacer.step(1000.01)
    assert is_stopped(busy_child)
    pacer.stop()
    assert wait_until(lambda: not is_stopped(busy_child))


def test_a_worker_that_went_away_is_not_waited_for() -> None:
    clock, lock = Clock(), multiprocessing.Lock()
    pacer = Pacer(clock, lock, lambda: None, max_pause_s=5.0)
    clock.value = 1000.0
    pacer.step(1000.0)
    pacer.stop()
    assert pacer.pauses == 0
