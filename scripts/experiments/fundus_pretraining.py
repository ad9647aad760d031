"""Does pretraining on the project's other images help ``fundus-dr``, judged on validation
images no choice was made on?

Transfer learning without downloadable weights: the fundus network (the recipe's ResNet at
28×28×3) is first trained on the union of the other tasks' **training** images and labels —
ISIC 2017 dermoscopy (melanoma / nevus / seborrheic keratosis), Kermany chest radiographs
(normal / pneumonia, the patient-disjoint training part) and FracAtlas radiographs (fracture /
none) — as one 7-class problem, each image normalized by its own task's inference path at
28×28 (radiographs repeated over the three channels), with the fundus recipe's augmentation.
No fundus image is used. Its weights (all but the classifier) then start the fundus recipe.

``pretrain OUT.pt`` writes those weights; ``contrastive OUT.pt`` writes self-supervised
ones instead (SimCLR on the same images plus the fundus training images, no labels).
``fundus_selection_rules.py snapshots DIR --init OUT.pt`` trains the fine-tuning arm with
the recipe's seeds and keeps every epoch; ``fundus_selection_rules.py snapshots DIR`` the
from-scratch arm. ``compare SCRATCH
PRETRAINED`` replays the recipe's best-epoch rule on stratified halves of the official
validation split — epoch chosen on one half, scored on the other — for every seed of both
arms, and prints the held-out macro AUC of each arm (one seed on average, and the ensemble of
its seeds' mean logits) and the paired difference, half by half.

Caveat: RetinaMNIST carries no patient identity, so two halves may share a patient; that
favours neither arm.

Usage (pretraining about 15 minutes on one core; each arm about 4 minutes per seed)::

    python scripts/experiments/fundus_pretraining.py pretrain PT/pretrained.pt
    python scripts/experiments/fundus_pretraining.py contrastive PT/simclr.pt --threads 2
    python scripts/experiments/fundus_selection_rules.py snapshots PT/pre --init PT/pretrained.pt
    python scripts/experiments/fundus_selection_rules.py snapshots PT/scratch
    python scripts/experiments/fundus_pretraining.py compare PT/scratch PT/pre
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch
from fundus_selection_rules import best_epoch, epoch_probs, stratified_halves

from dicom_ai.inference.runner import calibrated_softmax as softmax
from dicom_ai.train import fracture
from dicom_ai.train.augment import augment
from dicom_ai.train.datasets import ImageSet
from dicom_ai.train.loop import fit
from dicom_ai.train.metrics import macro_auc
from dicom_ai.train.recipes import RECIPES
from dicom_ai.train.run import build_network, load_splits

RECIPE = RECIPES["fundus-dr"]
#: The other tasks' label sets, concatenated in this order into 7 classes.
SOURCES = ("derm-lesion", "cxr-pneumonia", "xr-fracture")
#: The contrastive views: stronger zoom, shift and colour changes than the fundus recipe's.
VIEWS = dataclasses.replace(RECIPE.augment, scale=(0.7, 1.3), translate=0.12, brightness=0.2,
                            contrast=(0.6, 1.4), saturation=(0.5, 1.5))
PRETRAIN_LOOP = dataclasses.replace(RECIPE.loop, epochs=15, batch_size=64, patience=16,
                                    max_minutes=40.0)

Probs = npt.NDArray[np.float64]


def at_fundus_size(images: npt.NDArray[np.float16]) -> npt.NDArray[np.float16]:
    """N×C×H×W in [0, 1] → N×3×28×28 by area averaging, one channel repeated to three."""
    x = torch.nn.functional.interpolate(torch.from_numpy(images.astype(np.float32)),
                                        size=RECIPE.size, mode="area")
    return x.expand(-1, 3, -1, -1).numpy().astype(np.float16)


def source_sets(data: Path, cache: Path) -> tuple[ImageSet, ImageSet]:
    """The other tasks' train and validation images at the fundus input, labels offset so
    that each task has its own classes."""
    parts = [load_splits(dataclasses.replace(RECIPES[name], size=RECIPE.size), data, cache)
             for name in SOURCES[:2]]
    root = data / fracture.DATA_SUBDIR
    frac = [fracture.load_split(root, split, fracture.SIZE, cache) for split in ("train", "valid")]
    parts.append((ImageSet(frac[0].images, frac[0].labels.astype(np.int64), (), ()),
                  ImageSet(frac[1].images, frac[1].labels.astype(np.int64), (), ())))
    offsets = np.cumsum([0] + [int(train.labels.max()) + 1 for train, _ in parts])
    out = []
    for k in (0, 1):
        y = np.concatenate([sets[k].labels + offsets[i] for i, sets in enumerate(parts)])
        names = tuple(str(i) for i in range(len(y)))
        out.append(ImageSet(np.concatenate([at_fundus_size(sets[k].images) for sets in parts]),
                            y, names, names))
    return out[0], out[1]


def pretrain(data: Path, cache: Path, out: Path) -> None:
    train, val = source_sets(data, cache)
    n_classes = int(train.labels.max()) + 1
    print(f"pretraining on {len(train.labels)} images, {n_classes} classes "
          f"(per class {np.bincount(train.labels).tolist()}); selection on "
          f"{len(val.labels)} of their validation images", flush=True)
    net = build_network({**RECIPE.network_def, "num_classes": n_classes})
    fit(net, train, val, n_classes, RECIPE.augment, PRETRAIN_LOOP)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: v for k, v in net.state_dict().items() if not k.startswith("fc.")}, out)


def contrastive(data: Path, cache: Path, out: Path, epochs: int, seed: int = 0) -> None:
    """SimCLR (Chen et al., ICML 2020) without labels on the other tasks' training images and
    the fundus training images: two augmented views of each image, NT-Xent loss (temperature
    0.5) on a 2-layer projection of the pooled features, AdamW with cosine decay."""
    train, _ = source_sets(data, cache)
    fundus_train, _ = load_splits(RECIPE, data, cache)
    images = np.concatenate([train.images, fundus_train.images])
    print(f"contrastive pretraining on {len(images)} unlabelled images", flush=True)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    net = build_network(RECIPE.network_def)
    width = int(RECIPE.network_def["block_inplanes"][-1])
    net.fc = torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.ReLU(),
                                 torch.nn.Linear(width, 128))
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=1e-4)
    batch = 256
    steps = epochs * (len(images) // batch)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    net.train()
    for epoch in range(epochs):
        order = torch.randperm(len(images), generator=gen).numpy()
        total = 0.0
        for b in range(len(images) // batch):
            x = torch.from_numpy(images[np.sort(order[b * batch:(b + 1) * batch])]
                                 .astype(np.float32))
            z = torch.nn.functional.normalize(
                net(torch.cat([augment(x, VIEWS, gen), augment(x, VIEWS, gen)])), dim=1)
            sim = z @ z.T / 0.5
            sim.fill_diagonal_(float("-inf"))
            n = len(x)
            target = torch.cat([torch.arange(n, 2 * n), torch.arange(n)])
            loss = torch.nn.functional.cross_entropy(sim, target)
            opt.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            opt.step()
            sched.step()
            total += loss.item()
        print(f"epoch {epoch + 1}/{epochs} nt-xent {total / (len(images) // batch):.4f}",
              flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: v for k, v in net.state_dict().items() if not k.startswith("fc.")}, out)


def arm(folder: Path, val: ImageSet) -> list[list[Probs]]:
    """Per seed of ``folder``, the validation probabilities after each epoch."""
    return [epoch_probs(torch.load(f, weights_only=True), val)
            for f in sorted(folder.glob("seed*.pt"))]


def compare(scratch: Path, pretrained: Path, val: ImageSet, splits: int) -> None:
    arms = {"scratch": arm(scratch, val), "pretrained": arm(pretrained, val)}
    y = val.labels
    rng = np.random.default_rng(0)
    single: dict[str, list[float]] = {a: [] for a in arms}
    ensemble: dict[str, list[float]] = {a: [] for a in arms}
    for _ in range(splits):
        for select, held in (stratified_halves(y, rng)[::d] for d in (1, -1)):
            for name, runs in arms.items():
                chosen = [p[best_epoch(p, y, select, RECIPE.loop.patience)][held] for p in runs]
                single[name].append(float(np.mean([macro_auc(y[held], c) for c in chosen])))
                ensemble[name].append(macro_auc(y[held],
                                                softmax(np.mean(np.log(chosen), axis=0))))
    print(f"held-out-half macro AUC, {2 * splits} halves; seeds: "
          + ", ".join(f"{a} {len(r)}" for a, r in arms.items()))
    for what, scores in (("one seed (mean)", single), ("ensemble of the seeds", ensemble)):
        a, b = np.array(scores["scratch"]), np.array(scores["pretrained"])
        d = b - a
        lo, hi = np.percentile(d, [2.5, 97.5])
        print(f"{what}: scratch {a.mean():.4f}, pretrained {b.mean():.4f}; pretrained - "
              f"scratch {d.mean():+.4f} (2.5-97.5 % of halves {lo:+.4f} to {hi:+.4f}; "
              f"higher on {float((d > 0).mean()):.2f} of halves)", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("command", choices=["pretrain", "contrastive", "compare"])
    ap.add_argument("paths", type=Path, nargs="+",
                    help="pretrain, contrastive: OUT.pt; compare: SCRATCH_DIR PRETRAINED_DIR")
    ap.add_argument("--epochs", type=int, default=8, help="contrastive: epochs")
    ap.add_argument("--splits", type=int, default=100)
    ap.add_argument("--data", type=Path, default=Path("../shared/data"))
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "dicom-ai")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.command == "pretrain":
        pretrain(args.data, args.cache, args.paths[0])
    elif args.command == "contrastive":
        contrastive(args.data, args.cache, args.paths[0], args.epochs)
    else:
        _, val = load_splits(RECIPE, args.data, args.cache)
        compare(args.paths[0], args.paths[1], val, args.splits)


if __name__ == "__main__":
    main()
