"""Calibration and operating points, fitted on validation predictions."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F


def fit_temperature(logits: npt.NDArray[np.floating], labels: npt.NDArray[np.integer]) -> float:
    """Temperature T > 0 minimising the negative log-likelihood of ``softmax(logits / T)``
    (Guo et al. 2017), by L-BFGS on log T so T stays positive."""
    z = torch.as_tensor(np.asarray(logits), dtype=torch.float64)
    y = torch.as_tensor(np.asarray(labels), dtype=torch.int64)
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.5, max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(z / log_t.exp(), y)
        loss.backward()  # type: ignore[no-untyped-call]
        return loss

    opt.step(closure)  # type: ignore[no-untyped-call]
    return float(log_t.detach().exp().item())


def below(threshold: float, scores: npt.NDArray[np.floating]) -> float:
    """Midway between ``threshold`` and the highest score below it (``threshold`` itself when
    none is lower).

    Every threshold in that gap makes the same decisions on the scores at hand; the midpoint
    keeps a case that scored exactly ``threshold`` positive when its probability is recomputed
    in float32 at inference.
    """
    s = np.asarray(scores, dtype=np.float64)
    lower = s[s < threshold]
    return float((threshold + lower.max()) / 2.0) if len(lower) else float(threshold)


def threshold_for_sensitivity(labels: npt.NDArray[np.integer], scores: npt.NDArray[np.floating],
                              min_sensitivity: float) -> float:
    """A threshold t, the highest up to rounding, such that ``scores >= t`` has sensitivity
    ≥ ``min_sensitivity``.

    With positives' scores sorted descending s_1 ≥ s_2 ≥ …, the k-th highest, k =
    ⌈min_sensitivity · P⌉, is the highest such threshold (every higher one catches fewer than k
    positives); the result is :func:`below` s_k.
    """
    pos = np.sort(np.asarray(scores, dtype=np.float64)[np.asarray(labels) == 1])[::-1]
    if len(pos) == 0:
        raise ValueError("no positive cases")
    k = int(np.ceil(min_sensitivity * len(pos) - 1e-9))
    return below(float(pos[max(k, 1) - 1]), scores)


def youden_threshold(labels: npt.NDArray[np.integer], scores: npt.NDArray[np.floating]) -> float:
    """Threshold maximising Youden's J = sensitivity + specificity − 1 over the observed scores
    (decision ``score >= t``); the highest such score on ties, then :func:`below` it."""
    y = np.asarray(labels).astype(bool)
    s = np.asarray(scores, dtype=np.float64)
    if y.all() or not y.any():
        raise ValueError("Youden's J needs both classes")
    candidates = np.unique(s)[::-1]
    best_t, best_j = float(candidates[0]), -np.inf
    for t in candidates:
        pred = s >= t
        j = (pred & y).sum() / y.sum() + (~pred & ~y).sum() / (~y).sum() - 1.0
        if j > best_j + 1e-12:
            best_t, best_j = float(t), float(j)
    return below(best_t, s)
