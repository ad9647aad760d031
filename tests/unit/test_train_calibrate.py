"""Temperature scaling and operating points against hand-worked values."""

from __future__ import annotations

import numpy as np
import pytest

from dicom_ai.train.calibrate import (
    below,
    fit_temperature,
    threshold_for_sensitivity,
    youden_threshold,
)


def test_fit_temperature_recovers_known_scale() -> None:
    # Binary logits 0 vs z for z = ±2 with true P(class 1 | z) = sigmoid(z / 2): the NLL-optimal
    # temperature is 2. Build exact frequencies: for z=+2, p = sigmoid(1) ≈ 0.731 of 1000 cases.
    p = 1.0 / (1.0 + np.exp(-1.0))
    n_pos = round(1000 * p)
    logits = np.array([[0.0, 2.0]] * 1000 + [[0.0, -2.0]] * 1000)
    labels = np.array([1] * n_pos + [0] * (1000 - n_pos) + [0] * n_pos + [1] * (1000 - n_pos))
    assert fit_temperature(logits, labels) == pytest.approx(2.0, rel=0.01)


def test_threshold_for_sensitivity_is_highest_keeping_target() -> None:
    labels = np.array([1] * 10 + [0] * 3)
    scores = np.array([0.95, 0.9, 0.85, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.5, 0.9])
    # 0.95 × 10 = 9.5 → need 10 positives → the lowest positive score, 0.2, then midway to
    # the next lower score (0.1).
    assert threshold_for_sensitivity(labels, scores, 0.95) == pytest.approx(0.15)
    # 0.8 × 10 = 8 positives → 8th highest positive score = 0.4; next lower score 0.3.
    t = threshold_for_sensitivity(labels, scores, 0.8)
    assert t == pytest.approx(0.35)
    assert ((scores >= t) & (labels == 1)).sum() == 8


def test_youden_threshold() -> None:
    labels = np.array([0, 0, 0, 1, 1, 1])
    scores = np.array([0.1, 0.2, 0.6, 0.5, 0.7, 0.9])
    # t=0.7: sens 2/3, spec 1 → J 0.667; t=0.5: sens 1, spec 2/3 → J 0.667; t=0.6: sens 2/3,
    # spec 2/3. Highest score on the tie: 0.7, then midway to the next lower score, 0.6.
    assert youden_threshold(labels, scores) == pytest.approx(0.65)


def test_below() -> None:
    assert below(0.5, np.array([0.9, 0.5, 0.3, 0.1])) == pytest.approx(0.4)
    assert below(0.1, np.array([0.9, 0.1])) == 0.1
