"""Classification metrics: AUC (binary and one-vs-rest macro), bootstrap confidence intervals,
sensitivity/specificity at a threshold, confusion matrix and expected calibration error."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from scipy.stats import rankdata

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]


def binary_auc(labels: npt.NDArray[np.integer], scores: npt.NDArray[np.floating]) -> float:
    """Area under the ROC curve of ``scores`` for ``labels`` ∈ {0, 1} (ties count one half).

    Computed as the Mann–Whitney statistic from average ranks,
    ``(Σ rank(positive) − P(P+1)/2) / (P·N)``, which is fast enough for thousands of bootstrap
    resamples.

    Raises
    ------
    ValueError
        If only one class is present.
    """
    y = np.asarray(labels).astype(bool)
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError("AUC needs both classes")
    ranks = rankdata(np.asarray(scores, dtype=np.float64))
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def macro_auc(labels: npt.NDArray[np.integer], probs: npt.NDArray[np.floating]) -> float:
    """One-vs-rest AUC averaged over classes, as the MedMNIST evaluator computes it.

    ``probs`` is N×K; a class absent from ``labels`` is skipped (its AUC is undefined).
    """
    y = np.asarray(labels).astype(np.int64)
    aucs = [binary_auc(y == k, probs[:, k]) for k in range(probs.shape[1])
            if 0 < int((y == k).sum()) < len(y)]
    return float(np.mean(aucs))


def bootstrap_ci(metric: Callable[[IntArray], float], n: int, *, resamples: int = 1000,
                 level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of ``metric(index)`` over resampled case indices.

    ``metric`` receives an index array of length ``n`` drawn with replacement; resamples on
    which it raises ``ValueError`` (e.g. one class missing) are skipped.
    """
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(resamples):
        idx = rng.integers(0, n, size=n)
        try:
            values.append(metric(idx))
        except ValueError:
            continue
    tail = (1.0 - level) / 2.0 * 100.0
    lo, hi = np.percentile(values, [tail, 100.0 - tail])
    return float(lo), float(hi)


def confusion_matrix(labels: npt.NDArray[np.integer], predicted: npt.NDArray[np.integer],
                     n_classes: int) -> IntArray:
    """K×K counts, rows = true class, columns = predicted class."""
    out = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(out, (np.asarray(labels, dtype=np.int64), np.asarray(predicted, dtype=np.int64)), 1)
    return out


@dataclass(frozen=True)
class OperatingPoint:
    """Binary decision ``score >= threshold`` and how it performs."""

    threshold: float
    sensitivity: float
    specificity: float
    tp: int
    fn: int
    tn: int
    fp: int


def operating_point(labels: npt.NDArray[np.integer], scores: npt.NDArray[np.floating],
                    threshold: float) -> OperatingPoint:
    """Sensitivity and specificity of ``scores >= threshold`` against ``labels`` ∈ {0, 1}."""
    y = np.asarray(labels).astype(bool)
    pos = np.asarray(scores) >= threshold
    tp, fn = int((pos & y).sum()), int((~pos & y).sum())
    tn, fp = int((~pos & ~y).sum()), int((pos & ~y).sum())
    sens = tp / (tp + fn) if tp + fn else float("nan")
    spec = tn / (tn + fp) if tn + fp else float("nan")
    return OperatingPoint(threshold, sens, spec, tp, fn, tn, fp)


def reliability_bins(confidence: npt.NDArray[np.floating], correct: npt.NDArray[np.bool_],
                     n_bins: int = 15) -> tuple[FloatArray, FloatArray, IntArray]:
    """Equal-width confidence bins on [0, 1]: mean confidence, accuracy and count per bin
    (NaN for an empty bin). Bin b holds confidences in (b/n, (b+1)/n]; 0 goes into bin 0."""
    conf = np.asarray(confidence, dtype=np.float64)
    hit = np.asarray(correct, dtype=np.float64)
    b = np.clip(np.ceil(conf * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
    counts = np.bincount(b, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.bincount(b, weights=conf, minlength=n_bins) / counts
        accuracy = np.bincount(b, weights=hit, minlength=n_bins) / counts
    return mean_conf, accuracy, counts


def expected_calibration_error(probs: npt.NDArray[np.floating],
                               labels: npt.NDArray[np.integer], n_bins: int = 15) -> float:
    """Top-label ECE (Guo et al. 2017): Σ_b |B_b|/N · |accuracy(B_b) − confidence(B_b)|.

    ``probs`` is N×K (rows sum to 1).
    """
    p = np.asarray(probs, dtype=np.float64)
    conf = p.max(axis=1)
    correct = p.argmax(axis=1) == np.asarray(labels)
    mean_conf, accuracy, counts = reliability_bins(conf, correct, n_bins)
    filled = counts > 0
    gaps = np.abs(accuracy[filled] - mean_conf[filled]) * counts[filled]
    return float(gaps.sum() / len(p))
