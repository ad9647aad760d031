"""The training loop: weighted cross-entropy, AdamW with cosine decay, batch augmentation,
validation AUC after every epoch, early stopping, a wall-clock budget, and a checkpoint after
every epoch from which an interrupted run resumes."""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from torch import nn

from dicom_ai.train.augment import AugmentConfig, augment
from dicom_ai.train.datasets import ImageSet
from dicom_ai.train.metrics import binary_auc, macro_auc


@dataclass(frozen=True)
class LoopConfig:
    """Optimisation settings of one run."""

    epochs: int
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 1e-4
    patience: int = 6
    max_minutes: float = 45.0
    seed: int = 0
    label_smoothing: float = 0.0
    #: Class weights ∝ (1 / frequency) ** power: 1 balances the classes fully, 0.5 half-way.
    class_weight_power: float = 1.0
    #: Classes whose mean one-vs-rest AUC selects the best epoch (the score a task is judged
    #: by, e.g. ISIC 2017's melanoma + seborrheic keratosis); empty: :func:`validation_auc`.
    select_classes: tuple[int, ...] = ()


@dataclass
class History:
    """What happened per epoch (for the model card) and the best epoch."""

    epochs: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = -1
    best_auc: float = float("-inf")
    seconds: float = 0.0
    stopped: str = ""


def learning_rate(progress: float, max_lr: float, warmup: float = 0.1) -> float:
    """Linear warm-up to ``max_lr`` over the first ``warmup`` of training, then cosine decay to
    0 at ``progress`` = 1."""
    p = min(max(progress, 0.0), 1.0)
    if p < warmup:
        return max_lr * p / warmup
    return max_lr * 0.5 * (1.0 + math.cos(math.pi * (p - warmup) / (1.0 - warmup)))


def device() -> torch.device:
    """CUDA when torch sees a GPU, else CPU.

    On a GPU, cuDNN is held to deterministic convolution algorithms: a resumed run must repeat
    the updates of an uninterrupted one there too.
    """
    if torch.cuda.is_available():
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
        return torch.device("cuda")
    return torch.device("cpu")


def global_rng_state() -> dict[str, Any]:
    """torch's global generators, for a checkpoint: the CPU one and, where torch sees a GPU,
    CUDA's (dropout on the GPU draws from that one, not from the CPU's)."""
    state: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_global_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`global_rng_state` returned (CUDA's only where a GPU is seen)."""
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def class_weights(labels: npt.NDArray[np.int64], n_classes: int,
                  power: float = 1.0) -> torch.Tensor:
    """Loss weights ∝ (1 / class frequency) ** ``power``, normalised to mean 1.

    With ``power`` 1 each class contributes equally to the loss whatever its prevalence
    (pneumonia is 3× normal in Kermany); a smaller power corrects less, which keeps the argmax
    of a many-class model from favouring rare classes.
    """
    counts = np.bincount(labels, minlength=n_classes).astype(np.float64)
    w = (counts.sum() / (n_classes * np.maximum(counts, 1.0))) ** power
    return torch.tensor(w / w.mean(), dtype=torch.float32)


def validation_auc(labels: npt.NDArray[np.int64], probs: npt.NDArray[np.float64],
                   select_classes: tuple[int, ...] = ()) -> float:
    """AUC used for model selection: the mean one-vs-rest AUC of ``select_classes`` when given,
    else P(positive) for two classes and macro one-vs-rest otherwise."""
    if select_classes:
        return float(np.mean([binary_auc((labels == c).astype(np.int64), probs[:, c])
                              for c in select_classes]))
    if probs.shape[1] == 2:
        return binary_auc(labels, probs[:, 1])
    return macro_auc(labels, probs)


@torch.no_grad()
def predict_logits(net: nn.Module, images: npt.NDArray[np.float16], *,
                   batch_size: int = 64) -> npt.NDArray[np.float64]:
    """Logits of ``net`` (in eval mode) for cached N×C×H×W images."""
    net.eval()
    dev = next(net.parameters()).device
    out = []
    for start in range(0, len(images), batch_size):
        x = torch.from_numpy(images[start:start + batch_size].astype(np.float32)).to(dev)
        out.append(net(x).double().cpu().numpy())
    return np.concatenate(out)


#: Version of the checkpoint layout; a checkpoint of another version is refused.
CHECKPOINT_VERSION = 3


class CheckpointMismatch(ValueError):
    """A checkpoint was written by a run with other settings or other training data."""


def write_checkpoint(path: Path, state: dict[str, Any], settings: dict[str, Any]) -> None:
    """Save ``state`` at ``path`` atomically, with the layout version and the ``settings`` of
    the run (what :func:`read_checkpoint` must find to resume from it)."""
    # Written next to its final name and renamed over it, so a run cut off mid-save leaves the
    # previous epoch's checkpoint intact.
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save({**state, "version": CHECKPOINT_VERSION, "settings": settings}, tmp)
    os.replace(tmp, path)


def read_checkpoint(path: Path, settings: dict[str, Any]) -> dict[str, Any]:
    """The state :func:`write_checkpoint` saved at ``path`` by a run with these ``settings``.

    Raises
    ------
    CheckpointMismatch
        The checkpoint is of another layout version, or its run had other settings (another
        configuration, data set size, augmentation …): resuming from it would silently mix two
        runs.
    """
    state: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=True)
    if state.get("version") != CHECKPOINT_VERSION:
        raise CheckpointMismatch(f"{path}: checkpoint version {state.get('version')!r}, "
                                 f"expected {CHECKPOINT_VERSION}; delete it to start over")
    if state["settings"] != settings:
        raise CheckpointMismatch(f"{path}: written by a run with other settings or another "
                                 f"training set; delete it to start over")
    return state


def fit(net: nn.Module, train: ImageSet, val: ImageSet, n_classes: int, aug: AugmentConfig,
        cfg: LoopConfig, log: Callable[[str], None] = print, *,
        checkpoint: Path | None = None) -> History:
    """Train ``net`` in place; on return it holds the weights of the best validation epoch.

    Stops after ``cfg.epochs`` epochs, after ``cfg.patience`` epochs without a better
    validation AUC, or when ``cfg.max_minutes`` are spent. Progress through the learning-rate
    schedule is the larger of the fraction of steps and the fraction of the time budget done,
    so a run cut short by a busy machine still anneals instead of stopping at a high rate.

    With ``checkpoint``, the network, optimizer, random generators, history and best weights
    are saved there after every epoch, and a run that finds the file resumes after the last
    saved epoch (a partial epoch is redone) with the time already spent counted against the
    budget. A resumed run makes the same updates as an uninterrupted one.

    Raises
    ------
    CheckpointMismatch
        ``checkpoint`` exists but was written with another ``cfg`` or training-set size.
    """
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    dev = device()
    net.to(dev)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = max(1, len(train.labels) // cfg.batch_size)
    total_steps = cfg.epochs * steps_per_epoch
    budget = cfg.max_minutes * 60.0
    weights = class_weights(train.labels, n_classes, cfg.class_weight_power).to(dev)
    history = History()
    best_state = copy.deepcopy(net.state_dict())
    first_epoch, spent = 0, 0.0
    settings = {"config": dataclasses.asdict(cfg), "n_train": len(train.labels)}
    if checkpoint is not None and checkpoint.exists():
        saved = read_checkpoint(checkpoint, settings)
        net.load_state_dict(saved["net"])
        opt.load_state_dict(saved["optimizer"])
        gen.set_state(saved["generator"])
        set_global_rng_state(saved["rng"])
        best_state = saved["best"]
        history = History(**saved["history"])
        first_epoch, spent = len(history.epochs), float(saved["spent"])
        log(f"resumed from {checkpoint} after epoch {first_epoch} ({spent / 60:.1f} min spent)")
    start = time.monotonic() - spent
    for epoch in range(first_epoch, cfg.epochs):
        if history.stopped:
            break
        t0 = time.monotonic()
        net.train()
        order = torch.randperm(len(train.labels), generator=gen).numpy()
        total, seen = 0.0, 0
        lr = cfg.lr
        # Drop the last partial batch: a batch of one breaks BatchNorm.
        for b in range(steps_per_epoch):
            step = epoch * steps_per_epoch + b
            progress = max(step / total_steps, (time.monotonic() - start) / budget)
            if progress >= 1.0:
                break
            lr = learning_rate(progress, cfg.lr)
            for group in opt.param_groups:
                group["lr"] = lr
            idx = np.sort(order[b * cfg.batch_size:(b + 1) * cfg.batch_size])
            x = augment(torch.from_numpy(train.images[idx].astype(np.float32)), aug, gen)
            y = torch.from_numpy(train.labels[idx])
            loss = F.cross_entropy(net(x.to(dev)), y.to(dev), weight=weights,
                                   label_smoothing=cfg.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            opt.step()
            total += loss.item() * len(idx)
            seen += len(idx)
        logits = predict_logits(net, val.images)
        probs = torch.softmax(torch.from_numpy(logits), dim=1).numpy()
        auc = validation_auc(val.labels, probs, cfg.select_classes)
        val_loss = float(F.cross_entropy(torch.from_numpy(logits),
                                         torch.from_numpy(val.labels)))
        elapsed = time.monotonic() - t0
        history.epochs.append({"epoch": epoch + 1, "train_loss": total / max(seen, 1),
                               "val_loss": val_loss, "val_auc": auc, "seconds": elapsed})
        improved = auc > history.best_auc
        if improved:
            history.best_auc, history.best_epoch = auc, epoch + 1
            best_state = copy.deepcopy(net.state_dict())
        if epoch + 1 - history.best_epoch >= cfg.patience:
            history.stopped = f"early stop: no better val AUC for {cfg.patience} epochs"
        elif time.monotonic() - start >= budget:
            history.stopped = f"time budget of {cfg.max_minutes:g} min reached"
        elif epoch + 1 == cfg.epochs:
            history.stopped = f"all {cfg.epochs} epochs"
        if checkpoint is not None:
            write_checkpoint(checkpoint, {
                "spent": time.monotonic() - start, "net": net.state_dict(),
                "optimizer": opt.state_dict(), "generator": gen.get_state(),
                "rng": global_rng_state(), "best": best_state,
                "history": dataclasses.asdict(history)}, settings)
        log(f"epoch {epoch + 1:3d}/{cfg.epochs} train_loss {history.epochs[-1]['train_loss']:.4f}"
            f" val_loss {val_loss:.4f} val_auc {auc:.4f}{' *' if improved else ''}"
            f" lr {lr:.2e} {elapsed:.0f}s")
    history.seconds = time.monotonic() - start
    net.load_state_dict(best_state)
    log(f"best epoch {history.best_epoch} val_auc {history.best_auc:.4f} "
        f"({history.stopped}; {history.seconds / 60:.1f} min)")
    return history
