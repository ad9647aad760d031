"""The training loop on a tiny separable problem: it learns, keeps the best epoch, stops."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from dicom_ai.train.augment import AugmentConfig
from dicom_ai.train.datasets import ImageSet
from dicom_ai.train.loop import (
    CheckpointMismatch,
    LoopConfig,
    class_weights,
    fit,
    learning_rate,
    predict_logits,
)
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


class _Interrupted(Exception):
    pass


def test_fit_resumes_from_checkpoint_as_if_never_interrupted(tmp_path: Path) -> None:
    train, val = _images(128, 5), _images(32, 6)
    cfg = LoopConfig(epochs=4, batch_size=16, lr=1e-2, patience=10)
    aug = AugmentConfig(rotate_deg=20.0, hflip=True, brightness=0.1)
    torch.manual_seed(0)
    whole = _net()
    uninterrupted = fit(whole, train, val, 2, aug, cfg, lambda _line: None)

    def cut_after_two(line: str) -> None:
        if line.startswith("epoch   2/"):
            raise _Interrupted

    checkpoint = tmp_path / "ckpt" / "run.pt"
    torch.manual_seed(0)
    with pytest.raises(_Interrupted):
        fit(_net(), train, val, 2, aug, cfg, cut_after_two, checkpoint=checkpoint)
    assert checkpoint.exists()
    # A fresh process: another initialisation, restored from the checkpoint.
    torch.manual_seed(123)
    resumed_net = _net()
    lines: list[str] = []
    resumed = fit(resumed_net, train, val, 2, aug, cfg, lines.append, checkpoint=checkpoint)
    assert lines[0].startswith("resumed from") and "after epoch 2" in lines[0]
    assert sum(line.startswith("epoch") for line in lines) == 2
    # Same batches, augmentations and learning rates; multi-threaded CPU reductions may differ
    # in the last bits between runs, a wrong resume (other batches or augmentations) by far more.
    assert [e["val_auc"] for e in resumed.epochs] == \
        pytest.approx([e["val_auc"] for e in uninterrupted.epochs], abs=1e-6)
    assert resumed.best_epoch == uninterrupted.best_epoch
    assert resumed.stopped == uninterrupted.stopped == "all 4 epochs"
    for key, value in whole.state_dict().items():
        assert torch.allclose(value, resumed_net.state_dict()[key], rtol=1e-5, atol=1e-6), key
    # A finished run's checkpoint resumes to the same best weights without training again.
    again = _net()
    lines.clear()
    fit(again, train, val, 2, aug, cfg, lines.append, checkpoint=checkpoint)
    assert not any(line.startswith("epoch") for line in lines)
    for key, value in resumed_net.state_dict().items():
        assert torch.equal(value, again.state_dict()[key]), key


def test_fit_refuses_a_checkpoint_of_other_settings(tmp_path: Path) -> None:
    train, val = _images(64, 7), _images(32, 8)
    checkpoint = tmp_path / "run.pt"
    fit(_net(), train, val, 2, AugmentConfig(), LoopConfig(epochs=1, batch_size=16),
        lambda _line: None, checkpoint=checkpoint)
    with pytest.raises(CheckpointMismatch, match="other settings"):
        fit(_net(), train, val, 2, AugmentConfig(), LoopConfig(epochs=2, batch_size=16),
            lambda _line: None, checkpoint=checkpoint)


def test_validation_auc_of_selected_classes_is_their_mean_one_vs_rest_auc() -> None:
    from dicom_ai.train.loop import validation_auc

    labels = np.array([0, 0, 1, 1, 2, 2], dtype=np.int64)
    # Class 0 perfectly ranked, class 2 inverted; class 1 would be 1.0 but is not selected.
    probs = np.array([[0.9, 0.0, 0.1], [0.8, 0.0, 0.2], [0.1, 0.8, 0.9], [0.2, 0.8, 0.8],
                      [0.1, 0.2, 0.0], [0.2, 0.3, 0.05]])
    auc0 = binary_auc((labels == 0).astype(np.int64), probs[:, 0])
    auc2 = binary_auc((labels == 2).astype(np.int64), probs[:, 2])
    assert auc0 == 1.0 and auc2 == 0.0
    assert validation_auc(labels, probs, (0, 2)) == pytest.approx(0.5)
    assert validation_auc(labels, probs) != pytest.approx(0.5)
