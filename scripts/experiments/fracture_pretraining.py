"""Does self-supervised pretraining on every training radiograph help ``xr-fracture``?

Transfer learning without downloadable weights: the fracture network's encoder (stem and four
stages of :class:`~dicom_ai.inference.fracture_net.FractureNet`) is first trained with SimCLR
(Chen et al., ICML 2020), without labels, on every radiograph the project may train on — the
FracAtlas train split (1,079) and the Kermany chest radiographs' train split (5,216) — each
normalized by the fracture task's own path (8-bit presentation, aspect-preserving pad to
256 px). No validation image is used. Two random views of each radiograph (zoom into 1/2.2
to all of it, shift, rotation, both flips, gamma, contrast and brightness), sampled at
:data:`VIEW_SIDE` px to keep it affordable on a CPU; NT-Xent at temperature
:data:`TEMPERATURE` on a 2-layer projection of the pooled deepest features (the mean and max
the classifier reads); AdamW, warm-up and cosine decay. It checkpoints after every epoch and
``--resume`` continues a cut-off run.

``finetune`` then trains the recipe's seeds 2 and 3 exactly as the recipe does (157 epochs,
same loss, augmentation, learning rate and epoch choice), their encoders started from the
pretrained weights and the decoder and heads from the seed's random initialisation.
``compare`` scores them on the FracAtlas valid split with the bundle's image score (its peak
weight) against the shipped bundle's seeds 2 and 3, which the same recipe trained from scratch
on the same CPU: image AUC and top-box hit rate of each network and of each pair (mean
logits), and the paired bootstrap interval (2,000 resamples of images) of the pairs' AUC
difference. Every network's epoch was chosen on this split, as the recipe chooses it, so both
arms lean equally optimistic.

Fixed before measuring: pretraining enters the recipe (every member retrained from it) if the
pretrained pair's image AUC is above the from-scratch pair's and its top-box hit rate is not
below it. The interval is reported, not required, as for the recipe's other choices. If it
does, the pretrained pair alone becomes xr-fracture 1.5.0 (the recipe: pretraining, then two
members, seeds 2 and 3) if its image AUC is also above the shipped four networks' and its
top-box hit rate not below theirs; seeds 0 and 1 retrained from the pretraining can follow as
further members by ``fracture_more_members.py``'s rule. That second rule was written after
seed 2's per-epoch validation log had been seen, before seed 3 was trained and before any pair
was scored.

Usage (pretraining about 27 minutes on 2 threads, each fine-tuned seed about 40)::

    python scripts/experiments/fracture_pretraining.py contrastive PT/simclr.pt
    python scripts/experiments/fracture_pretraining.py finetune PT/simclr.pt PT/seeds
    python scripts/experiments/fracture_pretraining.py compare PT/seeds [models/xr-fracture]
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import hashlib
import json
import time
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from fracture_image_score import paired_auc_gain, selection_line
from PIL import Image
from torch import nn

from dicom_ai.imaging import xray
from dicom_ai.inference.ensemble import LogitEnsemble
from dicom_ai.inference.fracture_net import FractureNet
from dicom_ai.train import fracture
from dicom_ai.train.augment import AugmentConfig, affine_matrices, intensity
from dicom_ai.train.commands import DEFAULT_CACHE, DEFAULT_DATA
from dicom_ai.train.loop import learning_rate
from dicom_ai.train.run import build_network

KERMANY = Path("cxr") / "kermany224"
#: The seeds fine-tuned, and the shipped members trained from scratch with them on the CPU.
SEEDS = (2, 3)
VIEW_SIDE = 160
TEMPERATURE = 0.2
BATCH = 128
LR = 1e-3
#: Zoom up to 2.2x shows 1/2.2 of the radiograph's side: SimCLR's crops, as an affine map.
VIEWS = AugmentConfig(rotate_deg=20.0, scale=(1.0, 2.2), translate=0.25, hflip=True,
                      vflip=True, brightness=0.15, contrast=(0.6, 1.4), gamma=(0.6, 1.6))
ENCODER = ("stem.", "stages.")


class Encoder(nn.Module):
    """A FractureNet's stem and stages, their deepest features pooled as the classifier pools
    them (mean and max), then the SimCLR projection."""

    def __init__(self, net: FractureNet) -> None:
        super().__init__()
        self.stem = net.stem
        self.stages = net.stages
        width = int(net.classifier[1].in_features)
        self.projection = nn.Sequential(nn.Linear(width, width), nn.ReLU(),
                                        nn.Linear(width, 128))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.stem(x)
        for stage in self.stages:
            y = stage(y)
        pooled = torch.cat([y.mean(dim=(2, 3)), y.amax(dim=(2, 3))], dim=1)
        return F.normalize(self.projection(pooled), dim=1)


def kermany_images(data: Path, cache: Path) -> npt.NDArray[np.float16]:
    """The Kermany train split through the fracture task's normalization (cached)."""
    root = data / KERMANY
    with (root / "labels.csv").open(newline="") as fh:
        paths = sorted(r["path"] for r in csv.DictReader(fh) if r["split"] == "train")
    tag = hashlib.sha1(f"{root.resolve()}|{fracture.SIZE}|{len(paths)}".encode()).hexdigest()
    out = cache / f"kermany-train-fracture-input-{tag[:12]}.npy"
    if out.exists():
        return np.load(out)
    stack = []
    for p in paths:
        with Image.open(root / p) as im:
            gray = np.asarray(im.convert("L"), dtype=np.uint8)
        stack.append(xray.model_input(xray.presentation_from_8bit(gray), fracture.SIZE,
                                      aspect="pad"))
    images = np.stack(stack).astype(np.float16)
    cache.mkdir(parents=True, exist_ok=True)
    np.save(out, images)
    return images


def views(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """One random view of each image, sampled at :data:`VIEW_SIDE` px."""
    theta = affine_matrices(len(x), VIEWS, gen).to(x.dtype)
    grid = F.affine_grid(theta, [len(x), x.shape[1], VIEW_SIDE, VIEW_SIDE], align_corners=False)
    warped = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return intensity(warped, VIEWS, gen)


def nt_xent(z: torch.Tensor) -> torch.Tensor:
    """SimCLR's loss for 2N unit embeddings, rows k and k + N the two views of one image."""
    n = len(z) // 2
    sim = z @ z.T / TEMPERATURE
    sim.fill_diagonal_(float("-inf"))
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(n)])
    return F.cross_entropy(sim, target)


def contrastive(args: argparse.Namespace) -> None:
    root = args.data / fracture.DATA_SUBDIR
    images = np.concatenate([fracture.load_split(root, "train", fracture.SIZE, args.cache).images,
                             kermany_images(args.data, args.cache)])
    print(f"contrastive pretraining on {len(images)} radiographs, {args.epochs} epochs",
          flush=True)
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    net = build_network(fracture.RECIPE.network_def)
    if not isinstance(net, FractureNet):
        raise SystemExit(f"{fracture.NAME}'s network is not a FractureNet")
    enc = Encoder(net)
    opt = torch.optim.AdamW(enc.parameters(), lr=LR, weight_decay=1e-4)
    steps = len(images) // BATCH
    checkpoint = args.cache / "checkpoints" / "xr-fracture-simclr.pt"
    start = 0
    if args.resume and checkpoint.exists():
        ck = torch.load(checkpoint, weights_only=True)
        enc.load_state_dict(ck["enc"])
        opt.load_state_dict(ck["opt"])
        gen.set_state(ck["gen"])
        start = int(ck["epoch"])
        print(f"resumed after epoch {start}", flush=True)
    enc.train()
    for epoch in range(start, args.epochs):
        t0 = time.monotonic()
        order = torch.randperm(len(images), generator=gen).numpy()
        total = 0.0
        for b in range(steps):
            lr = learning_rate((epoch + b / steps) / args.epochs, LR, warmup=0.05)
            for group in opt.param_groups:
                group["lr"] = lr
            x = torch.from_numpy(images[np.sort(order[b * BATCH:(b + 1) * BATCH])]
                                 .astype(np.float32))
            loss = nt_xent(enc(torch.cat([views(x, gen), views(x, gen)])))
            opt.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            opt.step()
            total += float(loss.item())
        checkpoint.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"enc": enc.state_dict(), "opt": opt.state_dict(), "gen": gen.get_state(),
                    "epoch": epoch + 1}, checkpoint.with_suffix(".tmp"))
        checkpoint.with_suffix(".tmp").replace(checkpoint)
        print(f"epoch {epoch + 1}/{args.epochs} nt-xent {total / steps:.4f} "
              f"{time.monotonic() - t0:.0f}s", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: v for k, v in enc.state_dict().items() if k.startswith(ENCODER)}, args.out)


def finetune(args: argparse.Namespace) -> None:
    root = args.data / fracture.DATA_SUBDIR
    train_set = fracture.load_split(root, "train", fracture.SIZE, args.cache)
    val = fracture.load_split(root, "valid", fracture.SIZE, args.cache)
    encoder = torch.load(args.pretrained, weights_only=True)
    args.out.mkdir(parents=True, exist_ok=True)
    for seed in args.seeds:
        cfg = dataclasses.replace(fracture.RECIPE.loop, seed=seed)
        torch.manual_seed(seed)
        net = build_network(fracture.RECIPE.network_def)
        missing, unexpected = net.load_state_dict(encoder, strict=False)
        if unexpected or any(k.startswith(ENCODER) for k in missing):
            raise SystemExit(f"{args.pretrained}: not a FractureNet encoder")
        print(f"seed {seed}: encoder from {args.pretrained}", flush=True)
        state = fracture.train(
            net, train_set, val, cfg, resume=args.resume,
            checkpoint=args.cache / "checkpoints" / f"xr-fracture-simclr-seed{seed}.pt",
            log=lambda line: print(line, flush=True))
        torch.save(net.cpu().state_dict(), args.out / f"seed{seed}.pt")
        (args.out / f"seed{seed}.json").write_text(
            json.dumps(dataclasses.asdict(state), indent=1) + "\n")


def compare(args: argparse.Namespace) -> None:
    val = fracture.load_split(args.data / fracture.DATA_SUBDIR, "valid", fracture.SIZE,
                              args.cache)
    weight = fracture.bundle_spec(args.bundle).peak_weight
    shipped = fracture.member_networks(fracture.load_trained(args.bundle))
    seeds = [r["loop"]["seed"] for r in fracture.training_records(args.bundle)]
    scratch = [shipped[seeds.index(s)] for s in SEEDS]
    tuned = []
    for s in SEEDS:
        net = build_network(fracture.RECIPE.network_def)
        net.load_state_dict(torch.load(args.seeds / f"seed{s}.pt", weights_only=True))
        tuned.append(net)
    scores = {}
    for arm, nets in (("from scratch", scratch), ("pretrained", tuned)):
        for s, net in zip(SEEDS, nets, strict=True):
            pred = fracture.predict(net, val.images, peak_weight=weight)
            print(selection_line(f"seed {s}, {arm}", val, pred), flush=True)
        pred = fracture.predict(LogitEnsemble(nets).eval(), val.images, peak_weight=weight)
        print(selection_line(f"seeds {SEEDS[0]}-{SEEDS[1]}, {arm}", val, pred), flush=True)
        scores[arm] = pred.scores
    pred = fracture.predict(LogitEnsemble(shipped).eval(), val.images, peak_weight=weight)
    print(selection_line(f"shipped, seeds {seeds}", val, pred), flush=True)
    scores["shipped"] = pred.scores
    for other in ("from scratch", "shipped"):
        gain, lo, hi = paired_auc_gain(val.labels, scores["pretrained"], scores[other])
        print(f"pretrained pair - {other}: image AUC {gain:+.4f} "
              f"(95% CI {lo:+.4f} to {hi:+.4f})", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=DEFAULT_DATA, type=Path)
    parser.add_argument("--cache", default=DEFAULT_CACHE, type=Path)
    parser.add_argument("--threads", type=int, default=2)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("contrastive")
    p.add_argument("out", type=Path)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--resume", action="store_true")
    p = sub.add_parser("finetune")
    p.add_argument("pretrained", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    p.add_argument("--resume", action="store_true")
    p = sub.add_parser("compare")
    p.add_argument("seeds", type=Path)
    p.add_argument("bundle", nargs="?", default=Path("models/xr-fracture"), type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    {"contrastive": contrastive, "finetune": finetune, "compare": compare}[args.command](args)


if __name__ == "__main__":
    main()
