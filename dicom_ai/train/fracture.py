"""Train, evaluate and package ``xr-fracture`` on FracAtlas (../shared/data/fracture/fracatlas).

Data: the FracAtlas train split (574 fractured, 505 region-matched normal radiographs of hand,
leg, hip and shoulder) for training and its valid split (82 + 76) for model selection,
calibration, the operating point and every reported figure; the test split is withheld. Each
JPEG goes through :func:`dicom_ai.imaging.xray.presentation_from_8bit` and
:func:`dicom_ai.imaging.xray.model_input` with ``aspect="pad"`` — the path an 8-bit
MONOCHROME2 DX takes at inference — and its fracture boxes (normalized cx, cy, w, h) are
mapped into the padded input with :func:`dicom_ai.imaging.resize.content_box`.

Recipe: :class:`~dicom_ai.inference.fracture_net.FractureNet` from scratch; loss = binary
cross-entropy of the image logit + CenterNet focal loss of the centre heatmap + L1 of the log
box size at box centres; flips, rotation, zoom, shift, gamma/contrast/brightness (boxes follow
the geometric transform); AdamW with warm-up and cosine decay over a wall-clock budget; the
epoch with the best validation score (image AUC + top-box hit rate) is kept. A checkpoint
after every epoch lets a cut-off run resume where it stopped (``train --resume``). The
bundle's image score is the mean of the image logit and the highest heatmap logit
(:data:`~dicom_ai.train.recipes.FRACTURE_PEAK_WEIGHT`); its temperature and operating point
are fitted to that score.

``pretrain`` trains the network's encoder with SimCLR (:mod:`dicom_ai.train.contrastive`) on
:func:`pretraining_images`, for the transfer learning that
``scripts/experiments/fracture_pretraining.py`` measures.

Usage::

    python -m dicom_ai.train.fracture --threads 2 pretrain --out PT/encoder.pt
    python -m dicom_ai.train.fracture train --out models/xr-fracture --minutes 65
    python -m dicom_ai.train.fracture evaluate models/xr-fracture
"""

from __future__ import annotations

import argparse
import copy
import csv
import dataclasses
import hashlib
import json
import math
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from dicom_ai.imaging import xray
from dicom_ai.imaging.resize import content_box
from dicom_ai.inference.ensemble import LogitEnsemble, network_of
from dicom_ai.inference.fracture_net import STRIDE, Box, decode_boxes, image_score, iou
from dicom_ai.inference.input_fit import FeatureTap, fit_statistics, mahalanobis
from dicom_ai.inference.spec import FractureSpec, parse_fracture
from dicom_ai.train import contrastive
from dicom_ai.train.augment import AugmentConfig, affine_matrices, intensity
from dicom_ai.train.calibrate import fit_temperature, threshold_for_sensitivity
from dicom_ai.train.loop import (
    LoopConfig,
    device,
    global_rng_state,
    learning_rate,
    read_checkpoint,
    set_global_rng_state,
    write_checkpoint,
)
from dicom_ai.train.metrics import binary_auc, bootstrap_ci, expected_calibration_error
from dicom_ai.train.recipes import FRACTURE_MIN_SENSITIVITY, FRACTURE_PEAK_WEIGHT, XR_FRACTURE
from dicom_ai.train.run import build_network, checkpoint_path, member_network

FloatArray = npt.NDArray[np.float32]

RECIPE = XR_FRACTURE
NAME = RECIPE.name
DATA_SUBDIR = Path("fracture") / "fracatlas"
#: Chest radiographs the encoder is pretrained on besides FracAtlas.
KERMANY_SUBDIR = Path("cxr") / "kermany224"
SIZE = RECIPE.size
CACHE_VERSION = "1"
#: A top box hits when it overlaps a radiologist's box by this IoU, or its centre lies inside.
HIT_IOU = 0.25
BOOTSTRAP_RESAMPLES = 2000
#: Loss weights of the heatmap and the size regression next to the image-level BCE.
HEAT_WEIGHT = 1.0
SIZE_WEIGHT = 0.5
#: Percentile of validation input-fit distances above which an image is not judged.
INPUT_FIT_PERCENTILE = 99.5


@dataclass(frozen=True)
class FractureSet:
    """Normalized images (N×1×H×W float16), labels (1 = fracture), boxes in input pixels
    (x0, y0, x1, y1 per row), regions, file names, source shapes and content boxes."""

    images: npt.NDArray[np.float16]
    labels: npt.NDArray[np.int64]
    boxes: tuple[FloatArray, ...]
    regions: tuple[str, ...]
    names: tuple[str, ...]


def boxes_in_input(rows: Sequence[dict[str, str]], source_hw: tuple[int, int],
                   size: tuple[int, int]) -> FloatArray:
    """Normalized YOLO boxes (cx, cy, w, h of the source) → k×4 (x0, y0, x1, y1) in the
    aspect-padded model input."""
    top, left, nh, nw = content_box(source_hw, size, aspect="pad")
    out = np.zeros((len(rows), 4), dtype=np.float32)
    for i, r in enumerate(rows):
        cx, cy, w, h = (float(r[k]) for k in ("cx", "cy", "w", "h"))
        out[i] = (left + (cx - w / 2) * nw, top + (cy - h / 2) * nh,
                  left + (cx + w / 2) * nw, top + (cy + h / 2) * nh)
    return out


def cached_inputs(root: Path, paths: Sequence[str], size: tuple[int, int],
                  cache: Path) -> npt.NDArray[np.float16]:
    """8-bit radiographs ``root / path`` as the model reads them (N×1×H×W float16), through
    the path of an 8-bit MONOCHROME2 DX; kept in the ``cache`` file after the first call."""
    if cache.exists():
        cached: npt.NDArray[np.float16] = np.load(cache)
        return cached
    stack = []
    for p in paths:
        with Image.open(root / p) as im:
            gray = np.asarray(im.convert("L"), dtype=np.uint8)
        stack.append(xray.model_input(xray.presentation_from_8bit(gray), size, aspect="pad"))
    images = np.stack(stack).astype(np.float16)
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.save(cache, images)
    return images


def load_split(root: Path, split: str, size: tuple[int, int], cache_dir: Path) -> FractureSet:
    """One FracAtlas split normalized to ``size`` (cached as float16 under ``cache_dir``)."""
    with (root / "labels.csv").open(newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["split"] == split]
    if not rows:
        raise FileNotFoundError(f"no {split!r} rows in {root / 'labels.csv'}")
    with (root / "boxes.csv").open(newline="") as fh:
        by_path: dict[str, list[dict[str, str]]] = {}
        for b in csv.DictReader(fh):
            by_path.setdefault(b["path"], []).append(b)
    rows.sort(key=lambda r: r["path"])
    tag = hashlib.sha1(f"{CACHE_VERSION}|{root.resolve()}|{split}|{size}".encode()).hexdigest()
    cache = cache_dir / f"fracatlas-{split}-{size[0]}x{size[1]}-{tag[:12]}.npy"
    images = cached_inputs(root, [r["path"] for r in rows], size, cache)
    boxes = tuple(boxes_in_input(by_path.get(r["path"], []),
                                 (int(r["height"]), int(r["width"])), size) for r in rows)
    labels = np.array([1 if r["label"] == "fracture" else 0 for r in rows], dtype=np.int64)
    return FractureSet(images, labels, boxes, tuple(r["region"] for r in rows),
                       tuple(r["path"] for r in rows))


def pretraining_images(data_dir: Path, cache_dir: Path) -> npt.NDArray[np.float16]:
    """Every training radiograph of the project through this task's normalization, for
    :func:`dicom_ai.train.contrastive.pretrain`: the FracAtlas train split, then the Kermany
    chest radiographs' train split (cached as float16 under ``cache_dir``). No validation
    image."""
    root = data_dir / KERMANY_SUBDIR
    with (root / "labels.csv").open(newline="") as fh:
        paths = sorted(r["path"] for r in csv.DictReader(fh) if r["split"] == "train")
    tag = hashlib.sha1(f"{root.resolve()}|{SIZE}|{len(paths)}".encode()).hexdigest()
    cache = cache_dir / f"kermany-train-fracture-input-{tag[:12]}.npy"
    return np.concatenate([load_split(data_dir / DATA_SUBDIR, "train", SIZE, cache_dir).images,
                           cached_inputs(root, paths, SIZE, cache)])


def transform_boxes(boxes: FloatArray, theta: torch.Tensor, size: tuple[int, int]) -> FloatArray:
    """Boxes through the augmentation: ``theta`` maps output to input grid coordinates
    (:func:`torch.nn.functional.affine_grid`), so corners go through its inverse.

    Returns the axis-aligned box around the four transformed corners, for boxes whose centre
    stays inside the image (the others are dropped).
    """
    if len(boxes) == 0:
        return boxes
    h, w = size
    a = theta[:, :2].double().numpy()
    t = theta[:, 2].double().numpy()
    inv = np.linalg.inv(a)
    out = []
    for x0, y0, x1, y1 in boxes.astype(np.float64):
        corners = np.array([[x0, y0], [x1, y0], [x0, y1], [x1, y1]])
        grid = np.stack([2 * corners[:, 0] / w - 1, 2 * corners[:, 1] / h - 1], axis=1)
        moved = (grid - t) @ inv.T
        px = (moved[:, 0] + 1) * w / 2
        py = (moved[:, 1] + 1) * h / 2
        cx, cy = px.mean(), py.mean()
        if 0 <= cx < w and 0 <= cy < h:
            out.append((px.min(), py.min(), px.max(), py.max()))
    return np.array(out, dtype=np.float32).reshape(-1, 4)


def targets(boxes: Sequence[FloatArray], size: tuple[int, int],
            stride: int = STRIDE) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CenterNet targets of a batch: heatmap (N×1×h×w, a Gaussian of σ = max(1, (w + h)/6)
    cells at each box centre, element-wise max where they overlap), log sizes (N×2×h×w) and
    the mask of centre cells (N×1×h×w) where the size is supervised."""
    gh, gw = size[0] // stride, size[1] // stride
    n = len(boxes)
    heat = np.zeros((n, 1, gh, gw), dtype=np.float32)
    log_size = np.zeros((n, 2, gh, gw), dtype=np.float32)
    mask = np.zeros((n, 1, gh, gw), dtype=np.float32)
    yy, xx = np.mgrid[0:gh, 0:gw]
    for i, bs in enumerate(boxes):
        for x0, y0, x1, y1 in bs:
            bw, bh = max((x1 - x0) / stride, 0.5), max((y1 - y0) / stride, 0.5)
            cx, cy = (x0 + x1) / 2 / stride - 0.5, (y0 + y1) / 2 / stride - 0.5
            c, r = int(np.clip(round(cx), 0, gw - 1)), int(np.clip(round(cy), 0, gh - 1))
            sigma = max(1.0, (bw + bh) / 6.0)
            g = np.exp(-((xx - c) ** 2 + (yy - r) ** 2) / (2 * sigma**2))
            heat[i, 0] = np.maximum(heat[i, 0], g)
            log_size[i, :, r, c] = (math.log(bw), math.log(bh))
            mask[i, 0, r, c] = 1.0
    return torch.from_numpy(heat), torch.from_numpy(log_size), torch.from_numpy(mask)


def focal_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """CenterNet's penalty-reduced focal loss (α = 2, β = 4), summed and divided by the
    number of centres (at least 1)."""
    p = torch.sigmoid(logits).clamp(1e-4, 1 - 1e-4)
    pos = target.eq(1.0).float()
    pos_loss = -torch.log(p) * (1 - p) ** 2 * pos
    neg_loss = -torch.log(1 - p) * p**2 * (1 - target) ** 4 * (1 - pos)
    return (pos_loss.sum() + neg_loss.sum()) / pos.sum().clamp(min=1.0)


def loss_terms(outputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor], labels: torch.Tensor,
               heat_t: torch.Tensor, size_t: torch.Tensor,
               mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """The three losses of one batch."""
    logit, heat, size = outputs
    cls = F.binary_cross_entropy_with_logits(logit[:, 0], labels.float())
    hm = focal_loss(heat, heat_t)
    sz = (F.l1_loss(size, size_t, reduction="none") * mask).sum() / mask.sum().clamp(min=1.0)
    return {"cls": cls, "heat": hm, "size": sz}


def augmented_batch(data: FractureSet, idx: npt.NDArray[np.int64], aug: AugmentConfig,
                    gen: torch.Generator) -> tuple[torch.Tensor, list[FloatArray]]:
    """Augmented images of ``idx`` and their transformed boxes."""
    x = torch.from_numpy(data.images[idx].astype(np.float32))
    theta = affine_matrices(len(idx), aug, gen).to(x.dtype)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    warped = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    size = (x.shape[2], x.shape[3])
    boxes = [transform_boxes(data.boxes[i], theta[k], size) for k, i in enumerate(idx)]
    return intensity(warped, aug, gen), boxes


@dataclass
class Predictions:
    """What the network says about a set: image scores (logits of "any fracture",
    :func:`~dicom_ai.inference.fracture_net.image_score`), heatmaps and decoded boxes."""

    scores: npt.NDArray[np.float64]
    heat: FloatArray
    boxes: list[list[Box]]


@torch.no_grad()
def predict(net: nn.Module, images: npt.NDArray[np.float16], batch_size: int = 32, *,
            peak_weight: float = 0.0) -> Predictions:
    """Un-augmented predictions, image scores with the heatmap peak weighted ``peak_weight``
    (training selects on the classifier alone, 0); boxes are every heatmap peak (top 10),
    highest first."""
    net.eval()
    dev = next(net.parameters()).device
    scores: list[npt.NDArray[np.float64]] = []
    heats: list[FloatArray] = []
    boxes: list[list[Box]] = []
    for s in range(0, len(images), batch_size):
        x = torch.from_numpy(images[s:s + batch_size].astype(np.float32)).to(dev)
        logit, heat, size = net(x)
        prob = torch.sigmoid(heat).cpu().numpy()
        sz = size.cpu().numpy()
        scores.append(image_score(logit, heat, peak_weight).cpu().numpy())
        heats.append(prob[:, 0])
        boxes.extend(decode_boxes(prob[k, 0], sz[k]) for k in range(len(x)))
    return Predictions(np.concatenate(scores), np.concatenate(heats).astype(np.float32), boxes)


def box_hit(box: Box, truth: FloatArray) -> bool:
    """The box overlaps one of the ``truth`` boxes by IoU ≥ :data:`HIT_IOU` or its centre lies
    inside one."""
    cx, cy = box.center
    for x0, y0, x1, y1 in truth:
        if iou(box, Box(float(x0), float(y0), float(x1), float(y1), 1.0)) >= HIT_IOU or \
                (x0 <= cx <= x1 and y0 <= cy <= y1):
            return True
    return False


def heat_share_inside(heat: FloatArray, truth: FloatArray, stride: int = STRIDE) -> float:
    """Share of heatmap mass in cells whose centre lies inside one of the ``truth`` boxes."""
    gh, gw = heat.shape
    cy = (np.arange(gh) + 0.5) * stride
    cx = (np.arange(gw) + 0.5) * stride
    inside = np.zeros((gh, gw), dtype=bool)
    for x0, y0, x1, y1 in truth:
        inside |= ((cy >= y0) & (cy <= y1))[:, None] & ((cx >= x0) & (cx <= x1))[None, :]
    total = float(heat.sum())
    return float(heat[inside].sum()) / total if total > 0 else 0.0


def _proportion(values: npt.NDArray[np.float64], seed: int) -> dict[str, Any]:
    ci = bootstrap_ci(lambda i: float(values[i].mean()), len(values),
                      resamples=BOOTSTRAP_RESAMPLES, seed=seed)
    return {"value": round(float(values.mean()), 4), "ci95": [round(v, 4) for v in ci],
            "n": len(values)}


def quality(data: FractureSet, pred: Predictions, *, temperature: float = 1.0,
            threshold: float | None = None) -> dict[str, Any]:
    """Image AUC, top-box hit rate and heatmap share inside the boxes, with 95 % bootstrap
    CIs; with a ``threshold``, the operating point and the hit rate of boxes actually
    reported (an image judged negative reports none)."""
    y = data.labels
    p = 1.0 / (1.0 + np.exp(-pred.scores / temperature))
    auc_ci = bootstrap_ci(lambda i: binary_auc(y[i], p[i]), len(y),
                          resamples=BOOTSTRAP_RESAMPLES)
    frac = np.flatnonzero(y == 1)
    hits = np.array([bool(pred.boxes[i]) and box_hit(pred.boxes[i][0], data.boxes[i])
                     for i in frac], dtype=np.float64)
    share = np.array([heat_share_inside(pred.heat[i], data.boxes[i]) for i in frac])
    area = np.array([heat_share_inside(np.ones_like(pred.heat[i]), data.boxes[i])
                     for i in frac])
    out: dict[str, Any] = {
        "split": "valid", "n": len(y), "fractured": int(y.sum()),
        "auc": round(binary_auc(y, p), 4), "auc_ci95": [round(v, 4) for v in auc_ci],
        "top_box_hit": _proportion(hits, 1),
        "heat_share_in_boxes": _proportion(share, 2),
        "box_area_share": round(float(area.mean()), 4),
        "ece": round(expected_calibration_error(np.stack([1 - p, p], axis=1), y), 4),
    }
    if threshold is not None:
        pos = p >= threshold
        sens = pos[y == 1].astype(np.float64)
        spec = (~pos[y == 0]).astype(np.float64)
        out["operating_point"] = {
            "threshold": round(threshold, 6), "sensitivity": _proportion(sens, 3),
            "specificity": _proportion(spec, 4),
            "accuracy": round(float((pos == (y == 1)).mean()), 4)}
        out["reported_top_box_hit"] = _proportion(hits * pos[frac], 5)
    return out


def top_box_hits(data: FractureSet, pred: Predictions) -> npt.NDArray[np.bool_]:
    """For each fractured image of ``data`` in order, whether its top box hits a radiologist's
    box (:func:`box_hit`); an image without a box misses."""
    frac = np.flatnonzero(data.labels == 1)
    return np.array([bool(pred.boxes[i]) and box_hit(pred.boxes[i][0], data.boxes[i])
                     for i in frac], dtype=bool)


def selection_score(data: FractureSet, pred: Predictions) -> tuple[float, float, float]:
    """Validation AUC and top-box hit rate (model selection uses their sum), and for the
    record the AUC of the highest heatmap peak as an image score."""
    peak = pred.heat.reshape(len(pred.heat), -1).max(axis=1)
    return (binary_auc(data.labels, pred.scores), float(np.mean(top_box_hits(data, pred))),
            binary_auc(data.labels, peak))


@dataclass
class TrainState:
    """Everything a resumed run needs (saved after every epoch)."""

    epoch: int = 0
    seconds: float = 0.0
    best_score: float = float("-inf")
    best_epoch: int = -1
    history: list[dict[str, float]] = field(default_factory=list)


def save_checkpoint(path: Path, net: nn.Module, opt: torch.optim.Optimizer, gen: torch.Generator,
                    state: TrainState, best: dict[str, torch.Tensor],
                    settings: dict[str, Any]) -> None:
    """Write the resumable state atomically (a cut-off mid-write leaves the previous one)."""
    write_checkpoint(path, {"net": net.state_dict(), "opt": opt.state_dict(),
                            "gen": gen.get_state(), "rng": global_rng_state(),
                            "state": dataclasses.asdict(state), "best": best}, settings)


def load_checkpoint(path: Path, net: nn.Module, opt: torch.optim.Optimizer,
                    gen: torch.Generator, settings: dict[str, Any]
                    ) -> tuple[TrainState, dict[str, torch.Tensor]]:
    """Restore network, optimiser and generator from :func:`save_checkpoint` of a run with
    these ``settings``."""
    ck = read_checkpoint(path, settings)
    net.load_state_dict(ck["net"])
    opt.load_state_dict(ck["opt"])
    gen.set_state(ck["gen"])
    # Dropout draws from torch's global generators.
    set_global_rng_state(ck["rng"])
    return TrainState(**ck["state"]), ck["best"]


def train(net: nn.Module, train_set: FractureSet, val_set: FractureSet, cfg: LoopConfig, *,
          checkpoint: Path, resume: bool = False, aug: AugmentConfig = RECIPE.augment,
          log: Callable[[str], None] = print) -> TrainState:
    """Train ``net`` in place until ``cfg.max_minutes`` of training (summed over resumed runs)
    or ``cfg.epochs`` are spent; on return it holds the best validation epoch's weights.

    The learning-rate schedule runs on the larger of the fraction of epochs and the fraction
    of the time budget done, so a slow machine still anneals.

    Raises
    ------
    ~dicom_ai.train.loop.CheckpointMismatch
        Resuming from a checkpoint of a run with another ``cfg``, augmentation, input size or
        training-set size.
    """
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    dev = device()
    net.to(dev)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    state, best = TrainState(), copy.deepcopy(net.state_dict())
    size = (train_set.images.shape[2], train_set.images.shape[3])
    settings = {"config": dataclasses.asdict(cfg), "augment": dataclasses.asdict(aug),
                "size": list(size), "n_train": len(train_set.labels)}
    if resume and checkpoint.exists():
        state, best = load_checkpoint(checkpoint, net, opt, gen, settings)
        log(f"resumed after epoch {state.epoch} ({state.seconds / 60:.1f} min spent)")
    budget = cfg.max_minutes * 60.0
    steps = max(1, len(train_set.labels) // cfg.batch_size)
    while state.epoch < cfg.epochs and state.seconds < budget:
        t0 = time.monotonic()
        net.train()
        order = torch.randperm(len(train_set.labels), generator=gen).numpy()
        sums = {"cls": 0.0, "heat": 0.0, "size": 0.0}
        lr, done = cfg.lr, 0
        for b in range(steps):
            spent = state.seconds + time.monotonic() - t0
            progress = max((state.epoch + b / steps) / cfg.epochs, spent / budget)
            if progress >= 1.0:
                break
            lr = learning_rate(progress, cfg.lr, warmup=0.05)
            for group in opt.param_groups:
                group["lr"] = lr
            idx = order[b * cfg.batch_size:(b + 1) * cfg.batch_size]
            x, boxes = augmented_batch(train_set, idx, aug, gen)
            heat_t, size_t, mask = targets(boxes, size)
            terms = loss_terms(net(x.to(dev)), torch.from_numpy(train_set.labels[idx]).to(dev),
                               heat_t.to(dev), size_t.to(dev), mask.to(dev))
            loss = terms["cls"] + HEAT_WEIGHT * terms["heat"] + SIZE_WEIGHT * terms["size"]
            opt.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            opt.step()
            for k, v in terms.items():
                sums[k] += float(v.item())
            done += 1
        sums = {k: v / max(done, 1) for k, v in sums.items()}
        auc, hit, peak_auc = selection_score(val_set, predict(net, val_set.images))
        state.epoch += 1
        state.seconds += time.monotonic() - t0
        score = auc + hit
        improved = score > state.best_score
        if improved:
            state.best_score, state.best_epoch = score, state.epoch
            best = copy.deepcopy(net.state_dict())
        state.history.append({"epoch": state.epoch, **{f"loss_{k}": round(v, 4)
                                                       for k, v in sums.items()},
                              "val_auc": round(auc, 4), "val_top_box_hit": round(hit, 4),
                              "val_peak_auc": round(peak_auc, 4),
                              "lr": lr, "minutes": round(state.seconds / 60, 2)})
        save_checkpoint(checkpoint, net, opt, gen, state, best, settings)
        log(f"epoch {state.epoch:3d} cls {sums['cls']:.3f} heat {sums['heat']:.3f} "
            f"size {sums['size']:.3f} val_auc {auc:.4f} top_box_hit {hit:.3f} "
            f"peak_auc {peak_auc:.4f}"
            f"{' *' if improved else ''} lr {lr:.2e} {time.monotonic() - t0:.0f}s "
            f"({state.seconds / 60:.1f} min)")
    net.load_state_dict(best)
    log(f"best epoch {state.best_epoch} (score {state.best_score:.4f}) after "
        f"{state.epoch} epochs, {state.seconds / 60:.1f} min")
    return state


def dicom_ai_block(temperature: float, threshold: float,
                   fit_threshold: float | None = None) -> dict[str, Any]:
    """The ``dicom_ai`` block of ``configs/metadata.json``: the recipe's, with the fitted
    temperature and threshold (and the input-fit check when ``fit_threshold`` is given)."""
    block = copy.deepcopy(RECIPE.dicom_ai)
    block["temperature"] = round(temperature, 6)
    block["decision"]["threshold"] = round(threshold, 6)
    if fit_threshold is not None:
        block["input_fit"] = {"kind": "mahalanobis", "layer": list(RECIPE.bundle_feature_layers),
                              "stats": "models/input_fit.pt",
                              "threshold": round(fit_threshold, 4),
                              "criterion": f"{INPUT_FIT_PERCENTILE:g}th percentile of "
                                           "validation scores"}
    return block


def metadata(temperature: float, threshold: float, eval_metrics: dict[str, Any],
             fit_threshold: float | None = None) -> dict[str, Any]:
    """``configs/metadata.json`` of the bundle."""
    import monai

    import dicom_ai
    from dicom_ai.train.package import META_SCHEMA

    return {
        "schema": META_SCHEMA,
        "name": NAME,
        "version": RECIPE.version,
        "changelog": dict(RECIPE.changelog),
        "monai_version": monai.__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": np.__version__,
        "required_packages_version": {"dicom-ai": dicom_ai.__version__},
        "task": RECIPE.description,
        "description": f"Fracture detection on limb radiographs. {dicom_ai.DISCLAIMER}. "
                       "Research use only.",
        "authors": "dicom-ai contributors",
        "copyright": "Copyright (c) dicom-ai contributors; weights trained on CC BY 4.0 data "
                     "(FracAtlas)",
        "data_source": "FracAtlas (Abedeen I. et al., Scientific Data 10, 521 (2023), "
                       "doi:10.1038/s41597-023-02432-4; data doi:10.6084/m9.figshare.22363012), "
                       "official fracture train/valid split with region-matched normals. "
                       "CC BY 4.0.",
        "data_type": "jpeg (musculoskeletal radiographs, three hospitals in Bangladesh)",
        "image_classes": "magnitude",
        "label_classes": "fracture",
        "pred_classes": "fracture",
        "eval_metrics": eval_metrics,
        "intended_use": "Research and engineering tests of PACS integration only. "
                        f"{dicom_ai.DISCLAIMER}; not for clinical use.",
        "references": ["Abedeen I. et al. FracAtlas: A Dataset for Fracture Classification, "
                       "Localization and Segmentation of Musculoskeletal Radiographs. "
                       "Scientific Data 10, 521 (2023).",
                       "Zhou X, Wang D, Krähenbühl P. Objects as Points. arXiv:1904.07850."],
        "network_data_format": {
            "inputs": {"image": {
                "type": "image", "format": "magnitude", "modality": "CR/DX", "num_channels": 1,
                "spatial_shape": list(SIZE), "dtype": "float32", "value_range": [0, 1],
                "is_patch_data": False, "channel_def": {"0": "image"}}},
            "outputs": {"pred": {
                "type": "tuple", "format": "image logit, centre-heatmap logits, log box size",
                "num_channels": 4, "spatial_shape": [SIZE[0] // STRIDE, SIZE[1] // STRIDE],
                "dtype": "float32", "value_range": [], "is_patch_data": False,
                "channel_def": {"0": "fracture (image)", "1": "fracture centre",
                                "2": "log width", "3": "log height"}}},
        },
        "dicom_ai": dicom_ai_block(temperature, threshold, fit_threshold),
    }


def training_records(bundle: Path) -> list[dict[str, Any]]:
    """The training record of each network of ``bundle`` (``docs/training.json``, as
    :func:`write_weights` writes it), in seed order."""
    record: dict[str, Any] = json.loads((bundle / "docs" / "training.json").read_text())
    return list(record["members"]) if "members" in record else [record]


def load_trained(bundle: Path) -> nn.Module:
    """The bundle's network with its weights, in eval mode: the recipe's network, or the
    ensemble of as many of them as its training records list. That count may differ from the
    recipe's ``members``: a bundle of other seeds or an earlier release loads for comparison."""
    shape = dataclasses.replace(RECIPE, members=len(training_records(bundle)))
    net = build_network(shape.bundle_network_def)
    net.load_state_dict(torch.load(bundle / "models" / "model.pt", map_location="cpu",
                                   weights_only=True))
    return net.eval()


def member_networks(net: nn.Module) -> list[nn.Module]:
    """The networks whose logits ``net`` averages: its members, or itself."""
    return list(net.members) if isinstance(net, LogitEnsemble) else [net]


def export(bundle: Path, train_set: FractureSet, val_set: FractureSet,
           log: Callable[[str], None] = print) -> dict[str, Any]:
    """Calibrate (temperature on the image score), choose the operating point on valid, fit
    the input-fit statistics on the training images' features, measure, and write
    ``models/input_fit.pt``, ``configs/metadata.json`` and ``configs/inference.json``."""
    net = load_trained(bundle)
    with FeatureTap(net, RECIPE.bundle_feature_layers) as tap:
        pred = predict(net, val_set.images, peak_weight=FRACTURE_PEAK_WEIGHT)
    val_features = tap.features
    with FeatureTap(net, RECIPE.bundle_feature_layers) as tap:
        predict(net, train_set.images)
    stats = fit_statistics(tap.features.double().numpy())
    fit_threshold = float(np.percentile(mahalanobis(val_features, stats),
                                        INPUT_FIT_PERCENTILE))
    torch.save(stats, bundle / "models" / "input_fit.pt")
    two = np.stack([np.zeros_like(pred.scores), pred.scores], axis=1)
    temperature = fit_temperature(two, val_set.labels)
    p = 1.0 / (1.0 + np.exp(-pred.scores / temperature))
    threshold = threshold_for_sensitivity(val_set.labels, p, FRACTURE_MIN_SENSITIVITY)
    metrics = quality(val_set, pred, temperature=temperature, threshold=threshold)
    (bundle / "configs").mkdir(parents=True, exist_ok=True)
    (bundle / "configs" / "metadata.json").write_text(
        json.dumps(metadata(temperature, threshold, metrics, fit_threshold), indent=2) + "\n")
    (bundle / "configs" / "inference.json").write_text(json.dumps(
        {"imports": RECIPE.bundle_imports("$import dicom_ai.inference.fracture_net"),
         "network_def": RECIPE.bundle_network_def}, indent=2) + "\n")
    log(f"{NAME}: temperature {temperature:.3f}, threshold {threshold:.4f}, input-fit "
        f"threshold {fit_threshold:.2f}")
    return metrics


def format_quality(m: dict[str, Any]) -> str:
    """The evaluation printout."""
    def ci(d: dict[str, Any]) -> str:
        return f"{d['value']:.3f} (95% CI {d['ci95'][0]:.3f}-{d['ci95'][1]:.3f}, n={d['n']})"

    lines = [f"{NAME} on FracAtlas {m['split']}: {m['n']} images, {m['fractured']} fractured",
             f"image-level AUC {m['auc']:.3f} (95% CI {m['auc_ci95'][0]:.3f}-"
             f"{m['auc_ci95'][1]:.3f})",
             f"top box hits a radiologist's box (IoU >= {HIT_IOU:g} or centre inside), "
             f"fractured images: {ci(m['top_box_hit'])}",
             f"heatmap mass inside the radiologists' boxes: {ci(m['heat_share_in_boxes'])} "
             f"(the boxes cover {m['box_area_share']:.3f} of the image)",
             f"ECE (calibrated) {m['ece']:.3f}"]
    if "operating_point" in m:
        op = m["operating_point"]
        lines += [f"operating point p >= {op['threshold']:.4f}: sensitivity "
                  f"{ci(op['sensitivity'])}, specificity {ci(op['specificity'])}, accuracy "
                  f"{op['accuracy']:.3f}",
                  f"top box reported and hitting (image judged positive), fractured images: "
                  f"{ci(m['reported_top_box_hit'])}"]
    return "\n".join(lines)


def bundle_spec(bundle: Path) -> FractureSpec:
    """The parsed ``dicom_ai`` block of the bundle directory ``bundle``.

    Raises
    ------
    SpecError
        The block is not a valid fracture block (every problem listed).
    """
    return parse_fracture(json.loads((bundle / "configs" / "metadata.json").read_text()
                                     )["dicom_ai"])


def evaluate_bundle(bundle: Path, data_dir: Path, cache_dir: Path) -> dict[str, Any]:
    """Recompute the validation figures of a bundle with its own image score, calibration and
    threshold (:func:`bundle_spec`)."""
    spec = bundle_spec(bundle)
    val = load_split(data_dir / DATA_SUBDIR, "valid", SIZE, cache_dir)
    pred = predict(load_trained(bundle), val.images, peak_weight=spec.peak_weight)
    return quality(val, pred, temperature=spec.temperature,
                   threshold=float(spec.decision.threshold or 0.0))


def validation_experiment(description: str, size: tuple[int, int] = SIZE
                          ) -> tuple[Path, FractureSet]:
    """The command line of a ``scripts/experiments`` study of a fracture bundle on the valid
    split (``[bundle] [--data D] [--cache C]``, one torch thread): the bundle and the split,
    normalized to ``size`` (the recipe's by default)."""
    from dicom_ai.train.commands import DEFAULT_CACHE, DEFAULT_DATA

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("bundle", nargs="?", default=f"models/{NAME}", type=Path)
    parser.add_argument("--data", default=DEFAULT_DATA, type=Path)
    parser.add_argument("--cache", default=DEFAULT_CACHE, type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    return args.bundle, load_split(args.data / DATA_SUBDIR, "valid", size, args.cache)


def command_pretrain(args: argparse.Namespace) -> int:
    """``pretrain``: SimCLR on :func:`pretraining_images`, the encoder weights to ``--out``."""
    torch.set_num_threads(args.threads)
    images = pretraining_images(Path(args.data), Path(args.cache))
    cfg = contrastive.ContrastiveConfig(epochs=args.epochs)
    print(f"{NAME}: contrastive pretraining on {len(images)} radiographs, {cfg.epochs} epochs",
          flush=True)
    state = contrastive.pretrain(RECIPE.network_def, images, cfg,
                                 checkpoint=Path(args.cache) / "checkpoints" / f"{NAME}-simclr.pt",
                                 resume=args.resume, log=lambda line: print(line, flush=True))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, out)
    print(f"{out}: sha256 {hashlib.sha256(out.read_bytes()).hexdigest()}")
    return 0


def command_train(args: argparse.Namespace) -> int:
    """``train``: fit (or resume), write the weights, then export the bundle."""
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    root = Path(args.data) / DATA_SUBDIR
    cache = Path(args.cache)
    train_set = load_split(root, "train", SIZE, cache)
    val_set = load_split(root, "valid", SIZE, cache)
    print(f"{NAME}: train {len(train_set.labels)} ({int(train_set.labels.sum())} fractured), "
          f"valid {len(val_set.labels)} ({int(val_set.labels.sum())}); input {SIZE}",
          flush=True)
    cfg = dataclasses.replace(RECIPE.loop, max_minutes=args.minutes, epochs=args.epochs,
                              seed=args.seed)
    machine = (f"{platform.processor() or platform.machine()}, {args.threads} threads, "
               f"{torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu'}")
    nets: list[nn.Module] = []
    records: list[dict[str, Any]] = []
    init = Path(args.init) if args.init else None

    def log(line: str) -> None:
        print(line, flush=True)

    for k in range(RECIPE.members):
        member_cfg, net = member_network(RECIPE, cfg, k, init, log)
        state = train(net, train_set, val_set, member_cfg,
                      checkpoint=checkpoint_path(RECIPE, cache, k), resume=args.resume, log=log)
        nets.append(net.cpu())
        records.append({
            "recipe": NAME, "loop": dataclasses.asdict(member_cfg),
            "augment": dataclasses.asdict(RECIPE.augment),
            "size": list(SIZE), "network_def": RECIPE.network_def,
            "warm_start": dataclasses.asdict(RECIPE.warm_start) if RECIPE.warm_start else None,
            "train_images": len(train_set.labels), "val_images": len(val_set.labels),
            "state": dataclasses.asdict(state),
            "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "machine": machine})
    write_weights(out, nets, records)
    print(format_quality(export(out, train_set, val_set)), flush=True)
    return 0


def write_weights(out: Path, nets: Sequence[nn.Module], records: Sequence[dict[str, Any]]
                  ) -> None:
    """``models/model.pt`` of the bundle's network from its members' networks (in seed order),
    and ``docs/training.json`` from their training records (one, or ``{"members": [...]}``)."""
    if len(nets) != RECIPE.members or len(records) != RECIPE.members:
        raise ValueError(f"{NAME} has {RECIPE.members} member(s), got {len(nets)} network(s) "
                         f"and {len(records)} record(s)")
    (out / "models").mkdir(parents=True, exist_ok=True)
    (out / "docs").mkdir(parents=True, exist_ok=True)
    torch.save(network_of(nets).state_dict(), out / "models" / "model.pt")
    record = records[0] if RECIPE.members == 1 else {"recipe": NAME, "members": list(records)}
    (out / "docs" / "training.json").write_text(json.dumps(record, indent=1) + "\n")


def command_ensemble(args: argparse.Namespace) -> int:
    """``ensemble``: the bundle's weights from bundles whose networks, in order, were trained
    with the recipe's member seeds (e.g. each trained on its own GPU, or an earlier release's
    members followed by the new seeds'), then ``export``."""
    torch.set_num_threads(args.threads)
    nets: list[nn.Module] = []
    records: list[dict[str, Any]] = []
    for member in map(Path, args.members):
        nets += member_networks(load_trained(member))
        records += training_records(member)
    seeds = [r["loop"]["seed"] for r in records]
    expected = list(RECIPE.member_seeds)
    if seeds != expected:
        raise SystemExit(f"{NAME}: members were trained with seeds {seeds}, the recipe's are "
                         f"{expected}")
    out = Path(args.out)
    write_weights(out, nets, records)
    root, cache = Path(args.data) / DATA_SUBDIR, Path(args.cache)
    print(format_quality(export(out, load_split(root, "train", SIZE, cache),
                                load_split(root, "valid", SIZE, cache))))
    return 0


def command_export(args: argparse.Namespace) -> int:
    """``export``: recalibrate and rewrite the configs from the bundle's weights."""
    torch.set_num_threads(args.threads)
    root, cache = Path(args.data) / DATA_SUBDIR, Path(args.cache)
    print(format_quality(export(Path(args.out), load_split(root, "train", SIZE, cache),
                                load_split(root, "valid", SIZE, cache))))
    return 0


def command_evaluate(args: argparse.Namespace) -> int:
    """``evaluate``: print the validation figures of a bundle."""
    torch.set_num_threads(args.threads)
    print(format_quality(evaluate_bundle(Path(args.bundle), Path(args.data), Path(args.cache))))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Command line of ``python -m dicom_ai.train.fracture``."""
    from dicom_ai.train.commands import DEFAULT_CACHE, DEFAULT_DATA

    parser = argparse.ArgumentParser(prog="fracture", description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="data root")
    parser.add_argument("--cache", default=str(DEFAULT_CACHE), help="scratch dir (image cache, "
                                                                     "checkpoint)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pretrain", help="self-supervised pretraining of the encoder (the "
                                         "weights the recipe's warm start names)")
    p.add_argument("--out", required=True, help="where the encoder weights go")
    p.add_argument("--epochs", type=int, default=contrastive.ContrastiveConfig.epochs)
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint")
    p.set_defaults(func=command_pretrain)
    t = sub.add_parser("train", help="train (or resume) and write the bundle")
    t.add_argument("--out", default=f"models/{NAME}")
    t.add_argument("--minutes", type=float, default=RECIPE.loop.max_minutes,
                   help="training wall-clock budget, summed over resumed runs")
    t.add_argument("--epochs", type=int, default=RECIPE.loop.epochs)
    t.add_argument("--seed", type=int, default=RECIPE.loop.seed,
                   help="seed of initialisation, batch order and augmentation")
    t.add_argument("--resume", action="store_true", help="continue from the checkpoint")
    t.add_argument("--init", help="weights a warm-started recipe begins from (checked against "
                                  "the recipe's SHA-256)")
    t.set_defaults(func=command_train)
    m = sub.add_parser("ensemble", help="the bundle from bundles holding its members (seed "
                                         "order), then export")
    m.add_argument("members", nargs="+", help="bundle directories holding the members")
    m.add_argument("--out", default=f"models/{NAME}")
    m.set_defaults(func=command_ensemble)
    x = sub.add_parser("export", help="recalibrate and rewrite the configs")
    x.add_argument("--out", default=f"models/{NAME}")
    x.set_defaults(func=command_export)
    e = sub.add_parser("evaluate", help="validation figures of a bundle")
    e.add_argument("bundle", nargs="?", default=f"models/{NAME}")
    e.set_defaults(func=command_evaluate)
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
