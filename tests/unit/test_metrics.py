"""Metrics against values worked out by hand."""

from __future__ import annotations

import numpy as np
import pytest

from dicom_ai.train.metrics import (
    binary_auc,
    bootstrap_ci,
    confusion_matrix,
    expected_calibration_error,
    macro_auc,
    operating_point,
    reliability_bins,
)


def test_binary_auc_counts_pairs() -> None:
    # Positives 0.8, 0.4; negatives 0.5, 0.1: pairs (0.8>0.5, 0.8>0.1, 0.4<0.5, 0.4>0.1) → 3/4.
    assert binary_auc(np.array([1, 1, 0, 0]), np.array([0.8, 0.4, 0.5, 0.1])) == 0.75


def test_binary_auc_ties_count_half() -> None:
    assert binary_auc(np.array([1, 0]), np.array([0.5, 0.5])) == 0.5


def test_binary_auc_needs_both_classes() -> None:
    with pytest.raises(ValueError):
        binary_auc(np.array([1, 1]), np.array([0.2, 0.3]))


def test_macro_auc_averages_one_vs_rest() -> None:
    labels = np.array([0, 1, 2, 2])
    probs = np.array([[0.8, 0.1, 0.1],   # class 0 perfectly ranked → AUC 1
                      [0.1, 0.8, 0.1],   # class 1 perfectly ranked → AUC 1
                      [0.1, 0.1, 0.8],
                      [0.3, 0.6, 0.1]])  # class 2 scores 0.8, 0.1 vs 0.1, 0.1:
    # pairs (0.8>0.1, 0.8>0.1, 0.1=0.1 half, 0.1=0.1 half) → 3/4; class 1: 0.8 vs 0.1,0.1,0.6 → 1
    assert macro_auc(labels, probs) == pytest.approx((1.0 + 1.0 + 0.75) / 3)


def test_macro_auc_skips_absent_class() -> None:
    labels = np.array([0, 0, 1, 1])
    probs = np.array([[0.9, 0.1, 0.0], [0.8, 0.2, 0.0], [0.2, 0.8, 0.0], [0.1, 0.9, 0.0]])
    assert macro_auc(labels, probs) == 1.0


def test_confusion_matrix_rows_are_truth() -> None:
    cm = confusion_matrix(np.array([0, 0, 1, 1, 1]), np.array([0, 1, 1, 1, 0]), 2)
    assert cm.tolist() == [[1, 1], [1, 2]]


def test_operating_point() -> None:
    op = operating_point(np.array([1, 1, 1, 0, 0]), np.array([0.9, 0.5, 0.2, 0.6, 0.1]), 0.5)
    assert (op.tp, op.fn, op.tn, op.fp) == (2, 1, 1, 1)
    assert op.sensitivity == pytest.approx(2 / 3)
    assert op.specificity == 0.5


def test_reliability_bins_edges() -> None:
    conf, acc, counts = reliability_bins(np.array([0.0, 0.5, 0.51, 1.0]),
                                         np.array([True, False, True, True]), n_bins=2)
    # (0, 0.5] holds 0.0 and 0.5; (0.5, 1] holds 0.51 and 1.0.
    assert counts.tolist() == [2, 2]
    assert conf.tolist() == pytest.approx([0.25, 0.755])
    assert acc.tolist() == [0.5, 1.0]


def test_ece_by_hand() -> None:
    probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.4, 0.6], [0.3, 0.7]])
    labels = np.array([0, 1, 1, 0])
    # Two bins: (0.5, 1] gets all four top-label confidences? No — 0.9, 0.9, 0.6, 0.7 all
    # in (0.5, 1]: mean confidence 0.775, accuracy 2/4 → ECE 0.275.
    assert expected_calibration_error(probs, labels, n_bins=2) == pytest.approx(0.275)
    # 10 bins: 0.9 bin (2 cases, acc 0.5, gap 0.4), 0.6 bin (acc 1, gap 0.4), 0.7 bin (acc 0,
    # gap 0.7): (2·0.4 + 0.4 + 0.7) / 4 = 0.475.
    assert expected_calibration_error(probs, labels, n_bins=10) == pytest.approx(0.475)


def test_bootstrap_ci_of_constant_is_degenerate() -> None:
    lo, hi = bootstrap_ci(lambda i: 0.7, 50, resamples=100)
    assert lo == hi == 0.7


def test_bootstrap_ci_of_mean_brackets_estimate() -> None:
    x = np.random.default_rng(1).normal(size=400)
    lo, hi = bootstrap_ci(lambda i: float(x[i].mean()), len(x), resamples=500)
    # Standard error ≈ 1/sqrt(400) = 0.05 → 95 % half-width ≈ 0.098.
    assert lo < x.mean() < hi
    assert hi - lo == pytest.approx(2 * 1.96 * x.std() / 20, rel=0.2)
