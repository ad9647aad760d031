"""Would averaging a shipped model over flipped copies of each image (test-time augmentation)
score better on validation than the single pass the pipeline runs?

The fracture, dermoscopy and fundus recipes train with horizontal and vertical flips, so a
flipped image is one the network has learned to read. For each bundle the
script scores the validation split once as shipped and once with the outputs averaged over the
flips its recipe trains with (class logits averaged; for fractures the centre heatmap and box
sizes are flipped back and averaged before the boxes are decoded), and prints the paired
bootstrap interval of the difference. The weights, epoch and calibration were chosen on this
same split without flips, so the comparison favours neither side by selection; it is still one
split of 120–400 images.

Usage: ``python scripts/experiments/flip_averaging.py xr-fracture derm-lesion fundus-dr``
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from dicom_ai.inference.fracture_net import decode_boxes, image_score
from dicom_ai.inference.runner import calibrated_softmax as softmax
from dicom_ai.train import fracture
from dicom_ai.train.augment import AugmentConfig
from dicom_ai.train.loop import predict_logits, validation_auc
from dicom_ai.train.metrics import binary_auc, macro_auc
from dicom_ai.train.recipes import RECIPES
from dicom_ai.train.run import build_network, load_splits

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
MODELS = ("xr-fracture", "derm-lesion", "fundus-dr")


def flips(aug: AugmentConfig) -> list[tuple[int, ...]]:
    """Image axes (N×C×H×W) flipped by each pass: the identity, then each flip ``aug`` trains
    with and, with both, their combination."""
    axes = [a for a, on in (((3,), aug.hflip), ((2,), aug.vflip)) if on]
    return [(), *axes, *([(2, 3)] if len(axes) == 2 else [])]


def flip(x: torch.Tensor, axes: tuple[int, ...]) -> torch.Tensor:
    return torch.flip(x, axes) if axes else x


def paired_difference(score: Callable[[IntArray], tuple[float, float]], n: int,
                      resamples: int = 2000) -> tuple[float, float, float]:
    """``score(index)`` gives (plain, flipped); the mean and 95 % interval of flipped − plain
    over images resampled with replacement."""
    rng = np.random.default_rng(0)
    diffs = []
    for _ in range(resamples):
        idx = rng.integers(0, n, size=n)
        try:
            plain, flipped = score(idx)
        except ValueError:
            continue
        diffs.append(flipped - plain)
    lo, hi = np.percentile(diffs, [2.5, 97.5])
    return float(np.mean(diffs)), float(lo), float(hi)


def classifier(name: str, data: Path, cache: Path) -> None:
    recipe = RECIPES[name]
    _, val = load_splits(recipe, data, cache)
    net = build_network(recipe.network_def)
    net.load_state_dict(torch.load(Path("models") / name / "models" / "model.pt",
                                   weights_only=True))
    images = torch.from_numpy(val.images)
    passes = [predict_logits(net, flip(images, axes).numpy()) for axes in flips(recipe.augment)]
    plain, flipped = softmax(passes[0]), softmax(np.mean(passes, axis=0))
    select = recipe.loop.select_classes
    y = val.labels

    def score(i: IntArray) -> tuple[float, float]:
        return (validation_auc(y[i], plain[i], select), validation_auc(y[i], flipped[i], select))

    what = f"mean AUC of classes {select}" if select else "macro AUC"
    d, lo, hi = paired_difference(score, len(y))
    print(f"{name}: {len(y)} validation images, {len(passes)} passes; {what} "
          f"{score(np.arange(len(y)))[0]:.4f} plain, {score(np.arange(len(y)))[1]:.4f} "
          f"flip-averaged; difference {d:+.4f} (95% CI {lo:+.4f} to {hi:+.4f}); macro AUC "
          f"{macro_auc(y, plain):.4f} -> {macro_auc(y, flipped):.4f}", flush=True)


@torch.no_grad()
def fracture_passes(net: nn.Module, images: npt.NDArray[np.float16],
                    flips: Sequence[tuple[int, ...]], peak_weight: float) -> fracture.Predictions:
    """Image scores (``image_score`` at ``peak_weight``), heatmaps and boxes averaged over
    ``flips`` (maps flipped back first)."""
    net.eval()
    logits, heats, sizes = [], [], []
    for s in range(0, len(images), 32):
        x = torch.from_numpy(images[s:s + 32].astype(np.float32))
        per_flip = []
        for axes in flips:
            logit, heat, size = net(flip(x, axes))
            # A flip is its own inverse: flipping the maps again puts them on the input grid.
            per_flip.append((image_score(logit, heat, peak_weight),
                             flip(torch.sigmoid(heat), axes), flip(size, axes)))
        logits.append(torch.stack([p[0] for p in per_flip]).mean(0).numpy())
        heats.append(torch.stack([p[1] for p in per_flip]).mean(0)[:, 0].numpy())
        sizes.append(torch.stack([p[2] for p in per_flip]).mean(0).numpy())
    heat, size = np.concatenate(heats), np.concatenate(sizes)
    return fracture.Predictions(np.concatenate(logits), heat.astype(np.float32),
                                [decode_boxes(heat[k], size[k]) for k in range(len(heat))])


def fracture_model(data: Path, cache: Path) -> None:
    val = fracture.load_split(data / fracture.DATA_SUBDIR, "valid", fracture.SIZE, cache)
    bundle = Path("models") / fracture.NAME
    net = fracture.load_trained(bundle)
    weight = fracture.bundle_spec(bundle).peak_weight
    passes = flips(fracture.RECIPE.augment)
    plain = fracture_passes(net, val.images, passes[:1], weight)
    flipped = fracture_passes(net, val.images, passes, weight)
    y = val.labels
    frac = np.flatnonzero(y == 1)

    def auc(i: IntArray) -> tuple[float, float]:
        return (binary_auc(y[i], plain.scores[i]),
                binary_auc(y[i], flipped.scores[i]))

    def hits(pred: fracture.Predictions) -> FloatArray:
        return np.array([bool(pred.boxes[i]) and fracture.box_hit(pred.boxes[i][0],
                                                                   val.boxes[i])
                         for i in frac], dtype=np.float64)

    hit_plain, hit_flipped = hits(plain), hits(flipped)

    def hit(i: IntArray) -> tuple[float, float]:
        return float(hit_plain[i].mean()), float(hit_flipped[i].mean())

    d, lo, hi = paired_difference(auc, len(y))
    print(f"xr-fracture: {len(y)} validation images, {len(passes)} passes; image AUC "
          f"{auc(np.arange(len(y)))[0]:.4f} plain, {auc(np.arange(len(y)))[1]:.4f} "
          f"flip-averaged; difference {d:+.4f} (95% CI {lo:+.4f} to {hi:+.4f})", flush=True)
    d, lo, hi = paired_difference(hit, len(frac))
    print(f"xr-fracture: top box hits a radiologist's box on {hit_plain.mean():.3f} plain, "
          f"{hit_flipped.mean():.3f} flip-averaged of {len(frac)} fractured images; difference "
          f"{d:+.3f} (95% CI {lo:+.3f} to {hi:+.3f})", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+", choices=MODELS)
    ap.add_argument("--data", type=Path, default=Path("../shared/data"))
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "dicom-ai")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    for name in args.models:
        if name == fracture.NAME:
            fracture_model(args.data, args.cache)
        else:
            classifier(name, args.data, args.cache)


if __name__ == "__main__":
    main()
