"""The training loop on a tiny separable problem: it learns, keeps the best epoch, stops."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from dicom_ai.train.augment import AugmentConfig
from dicom_ai.train.datasets import ImageSet
from dicom_ai.train.loop import LoopConfig, class_weights, fit, learning_rate, predict_logits
from dicom_ai.train.metrics import binary_auc


def _images(n: int, seed: int) -> ImageSet:
    # Class 1 images are bright, class 0 dark: separable by the mean.
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, size=n).astype(np.int64)
    images = (rng.uniform(0.0, 0.4, size=(n, 1, 8, 8)) + 0.5 * labels[:, None, None, None])
    names = tuple(str(i) for i in range(n))
    return ImageSet(images.astype(np.float16), labels, names, names)


def _net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(4, 2))


def test_class_weights_balance_classes() -> None:
    w = class_weights(np.array([0, 1, 1, 1], dtype=np.int64), 2)
    # Inverse frequencies 4/2·(1/1) = 2 and 4/(2·3) = 2/3, normalised to mean 1: 1.5 and 0.5.
    assert w.tolist() == pytest.approx([1.5, 0.5])


def test_fit_learns_and_restores_best_epoch() -> None:
    torch.manual_seed(0)
    net = _net()
    val = _images(64, 2)
    lines: list[str] = []
    history = fit(net, _images(256, 1), val, 2, AugmentConfig(),
                  LoopConfig(epochs=6, batch_size=32, lr=1e-2, patience=3), lines.append)
    assert history.best_auc > 0.95
    assert len(history.epochs) <= 6 and lines[-1].startswith("best epoch")
    assert sum(line.startswith("epoch") for line in lines) == len(history.epochs)
    logits = predict_logits(net, val.images)
    probs = torch.softmax(torch.from_numpy(logits), 1)[:, 1].numpy()
    assert binary_auc(val.labels, probs) == pytest.approx(history.best_auc)


def test_fit_stops_early_without_improvement() -> None:
    torch.manual_seed(0)
    val = _images(32, 4)
    history = fit(_net(), _images(64, 3), val, 2, AugmentConfig(),
                  LoopConfig(epochs=50, batch_size=16, lr=0.0, patience=2))
    # lr 0: nothing changes, so the first epoch stays best and training stops two epochs later.
    assert history.best_epoch == 1
    assert len(history.epochs) == 3
    assert history.stopped.startswith("early stop")


def test_learning_rate_schedule_by_hand() -> None:
    assert learning_rate(0.0, 1.0) == 0.0
    assert learning_rate(0.05, 1.0) == pytest.approx(0.5)      # half-way through warm-up
    assert learning_rate(0.1, 1.0) == pytest.approx(1.0)       # peak
    assert learning_rate(0.55, 1.0) == pytest.approx(0.5)      # cosine half-way: (1 + cos π/2)/2
    assert learning_rate(1.0, 1.0) == pytest.approx(0.0)
    assert learning_rate(1.5, 2.0) == pytest.approx(0.0)
