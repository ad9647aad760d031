"""The reception gate: inference pauses while instances arrive, boundedly."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dicom_ai.service.gate import MIN_RUN_S, RECENT_S, ReceptionGate, stamp


@dataclass
class Clock:
    value: float = 0.0


class FakeTime:
    """A monotonic clock that advances only when the gate sleeps, while a sender keeps stamping
    ``clock`` until ``sending_until``."""

    def __init__(self, clock: Clock, sending_until: float) -> None:
        self.t = 100.0
        self.clock = clock
        self.sending_until = sending_until
        self.slept = 0.0

    def now(self) -> float:
        return self.t

    def sleep(self, seconds: float) -> None:
        self.t += seconds
        self.slept += seconds
        if self.t < self.sending_until:
            self.clock.value = self.t


def test_no_pause_when_nothing_arrives() -> None:
    clock = Clock(value=100.0 - RECENT_S - 0.01)
    time = FakeTime(clock, sending_until=0.0)
    ReceptionGate(clock, 2.0, now=time.now, sleep=time.sleep)(None, ())
    assert time.slept == 0.0


def test_pause_lasts_while_instances_arrive() -> None:
    clock = Clock(value=100.0)
    time = FakeTime(clock, sending_until=100.5)
    ReceptionGate(clock, 2.0, now=time.now, sleep=time.sleep)(None, ())
    # Until the last stamp (≈100.5) is RECENT_S old.
    assert 0.5 + RECENT_S - 0.02 <= time.slept <= 0.5 + RECENT_S + 0.02


def test_a_sender_that_never_stops_slows_inference_but_cannot_stop_it() -> None:
    clock = Clock(value=100.0)
    time = FakeTime(clock, sending_until=10_000.0)
    gate = ReceptionGate(clock, 2.0, now=time.now, sleep=time.sleep)
    gate(None, ())
    assert abs(time.slept - 2.0) < 0.02
    # Right after a pause, inference runs for MIN_RUN_S without pausing.
    time.t += MIN_RUN_S / 2
    clock.value = time.t
    gate(None, ())
    assert abs(time.slept - 2.0) < 0.02
    time.t += MIN_RUN_S
    clock.value = time.t
    gate(None, ())
    assert abs(time.slept - 4.0) < 0.04


def test_gate_is_a_valid_forward_pre_hook() -> None:
    clock = Clock()
    stamp(clock)
    clock.value -= 10.0  # the last instance arrived long ago
    layer = torch.nn.Linear(2, 1)
    layer.register_forward_pre_hook(ReceptionGate(clock, 2.0))
    assert layer(torch.zeros(1, 2)).shape == (1, 1)
