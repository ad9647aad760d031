"""Does self-supervised pretraining on every training radiograph help ``xr-fracture``?

Transfer learning without downloadable weights: the fracture network's encoder (stem and four
stages of :class:`~dicom_ai.inference.fracture_net.FractureNet`) is first trained with SimCLR
(:mod:`dicom_ai.train.contrastive`), without labels, on every radiograph the project may train
on — the FracAtlas train split (1,079) and the Kermany chest radiographs' train split (5,216),
each through the fracture task's own normalization
(:func:`dicom_ai.train.fracture.pretraining_images`); no validation image. That is
``python -m dicom_ai.train.fracture --threads 2 pretrain --out PT/simclr.pt``: 20 epochs,
70-76 s each on 2 threads of the development VM (24 min), NT-Xent 5.24 after the first epoch
and 2.92 after the last; sha256 of the weights 2a84130192c9…, kept as
``models/xr-fracture/pretraining/encoder.pt``.

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

Result (2026-12-07, 2 CPU threads, 50.5 and 50.7 min a seed; log
``models/xr-fracture/docs/pretraining-experiment.log``): image AUC / top box, seed 2 0.784 /
0.695 from scratch and 0.847 / 0.683 pretrained, seed 3 0.810 / 0.671 and 0.851 / 0.659, the
pairs 0.826 / 0.683 and **0.856 / 0.683**; pretrained pair minus from-scratch pair +0.030 (95 %
CI −0.007 to +0.067), minus the shipped four networks (0.838 / 0.720) +0.019 (−0.015 to
+0.053). The first rule passed (AUC above, top box equal); the second did not (top box 0.683
below the four's 0.720), so 1.4.0 stays shipped and seeds 0 and 1 are to be retrained from the
pretraining.

``four`` then judges the four networks of the recipe's seeds 0-3, all fine-tuned from the same
pretrained encoder, averaged as the bundle averages its members, against the shipped four
(1.4.0, from scratch): each seed alone, the four averaged, and the paired bootstrap interval
of the four's AUC minus the shipped's. Fixed on 2026-12-07 before seeds 0 and 1 had finished
training or been scored, by ``fracture_more_members.py``'s rule: the four pretrained networks
become xr-fracture 1.5.0 (the recipe's warm start: the encoder, then ``members=4``) if their
image AUC is above the shipped four's and their top-box hit rate not below theirs; the
interval is reported, not required. Nothing else is a candidate (not the pretrained pair, not
a mix of pretrained and from-scratch networks).

Result (2026-12-07; seeds 0 and 1 on 1 CPU thread each, side by side after seed 0's first 13
epochs on 2, 109 and 90 min, seed 0's including about 25 min stopped; best epochs 132 and 86;
log ``models/xr-fracture/docs/pretraining-experiment.log``): image AUC / top box, seed 0 0.833 /
0.707, seed 1 0.829 / 0.707, **the four pretrained 0.856 / 0.707** against the shipped four's
0.838 / 0.720; AUC +0.018 (95 % CI −0.011 to +0.048). The rule failed on the top box (58 of 82
fractured images against 59), so 1.4.0 stays shipped. Printed since, for the record (the rule
unchanged): the top-box difference −0.012 (95 % CI −0.086 to +0.061, paired bootstrap over the
fractured images), the two disagreeing on 11 films (5 hit by the four only, 6 by 1.4.0 only).

Usage (each fine-tuned seed about 50 minutes on 2 threads)::

    python -m dicom_ai.train.fracture --threads 2 pretrain --out PT/simclr.pt
    python scripts/experiments/fracture_pretraining.py finetune PT/simclr.pt PT/seeds
    python scripts/experiments/fracture_pretraining.py compare PT/seeds [models/xr-fracture]
    python scripts/experiments/fracture_pretraining.py finetune PT/simclr.pt PT/seeds --seeds 0 1
    python scripts/experiments/fracture_pretraining.py four PT/seeds [models/xr-fracture]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch
from fracture_image_score import paired_auc_gain, selection_line

from dicom_ai.inference.ensemble import LogitEnsemble
from dicom_ai.train import fracture
from dicom_ai.train.commands import DEFAULT_CACHE, DEFAULT_DATA
from dicom_ai.train.contrastive import FRACTURE_ENCODER
from dicom_ai.train.metrics import binary_auc, bootstrap_ci
from dicom_ai.train.run import build_network, load_warm_start

#: The seeds fine-tuned, and the shipped members trained from scratch with them on the CPU.
SEEDS = (2, 3)


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
        load_warm_start(net, FRACTURE_ENCODER, encoder)
        print(f"seed {seed}: encoder from {args.pretrained}", flush=True)
        state = fracture.train(
            net, train_set, val, cfg, resume=args.resume,
            checkpoint=args.cache / "checkpoints" / f"xr-fracture-simclr-seed{seed}.pt",
            log=lambda line: print(line, flush=True))
        torch.save(net.cpu().state_dict(), args.out / f"seed{seed}.pt")
        (args.out / f"seed{seed}.json").write_text(
            json.dumps(dataclasses.asdict(state), indent=1) + "\n")


def fine_tuned(seeds_dir: Path, seeds: tuple[int, ...]) -> list[torch.nn.Module]:
    """The networks ``finetune`` wrote for ``seeds``."""
    nets = []
    for s in seeds:
        net = build_network(fracture.RECIPE.network_def)
        net.load_state_dict(torch.load(seeds_dir / f"seed{s}.pt", weights_only=True))
        nets.append(net)
    return nets


def compare(args: argparse.Namespace) -> None:
    val = fracture.load_split(args.data / fracture.DATA_SUBDIR, "valid", fracture.SIZE,
                              args.cache)
    weight = fracture.bundle_spec(args.bundle).peak_weight
    shipped = fracture.member_networks(fracture.load_trained(args.bundle))
    seeds = [r["loop"]["seed"] for r in fracture.training_records(args.bundle)]
    scratch = [shipped[seeds.index(s)] for s in SEEDS]
    tuned = fine_tuned(args.seeds, SEEDS)
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


def four(args: argparse.Namespace) -> None:
    val = fracture.load_split(args.data / fracture.DATA_SUBDIR, "valid", fracture.SIZE,
                              args.cache)
    weight = fracture.bundle_spec(args.bundle).peak_weight
    seeds = fracture.RECIPE.member_seeds
    tuned = fine_tuned(args.seeds, seeds)
    for s, net in zip(seeds, tuned, strict=True):
        print(selection_line(f"seed {s}, pretrained", val,
                             fracture.predict(net, val.images, peak_weight=weight)), flush=True)
    pred = fracture.predict(LogitEnsemble(tuned).eval(), val.images, peak_weight=weight)
    print(selection_line(f"seeds {list(seeds)}, pretrained", val, pred), flush=True)
    base = fracture.predict(fracture.load_trained(args.bundle), val.images, peak_weight=weight)
    print(selection_line("shipped", val, base), flush=True)
    gain, lo, hi = paired_auc_gain(val.labels, pred.scores, base.scores)
    print(f"pretrained four - shipped: image AUC {gain:+.4f} (95% CI {lo:+.4f} to {hi:+.4f})")
    # The rule's two figures, as fracture.selection_score computes them.
    auc, base_auc = binary_auc(val.labels, pred.scores), binary_auc(val.labels, base.scores)
    hits, base_hits = fracture.top_box_hits(val, pred), fracture.top_box_hits(val, base)
    passed = auc > base_auc and hits.mean() >= base_hits.mean()
    print(f"rule (AUC above {base_auc:.4f}, top box not below {base_hits.mean():.3f}): "
          f"{'passed' if passed else 'failed'}")
    lo, hi = bootstrap_ci(lambda i: float(hits[i].mean() - base_hits[i].mean()), len(hits),
                          resamples=2000)
    print(f"top box, pretrained four - shipped: {hits.mean() - base_hits.mean():+.3f} "
          f"(95% CI {lo:+.3f} to {hi:+.3f}); fractured images hit by the four only "
          f"{int((hits & ~base_hits).sum())}, by the shipped only "
          f"{int((base_hits & ~hits).sum())}, by both {int((hits & base_hits).sum())}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=DEFAULT_DATA, type=Path)
    parser.add_argument("--cache", default=DEFAULT_CACHE, type=Path)
    parser.add_argument("--threads", type=int, default=2)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("finetune")
    p.add_argument("pretrained", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    p.add_argument("--resume", action="store_true")
    p = sub.add_parser("compare")
    p.add_argument("seeds", type=Path)
    p.add_argument("bundle", nargs="?", default=Path("models/xr-fracture"), type=Path)
    p = sub.add_parser("four")
    p.add_argument("seeds", type=Path)
    p.add_argument("bundle", nargs="?", default=Path("models/xr-fracture"), type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    {"finetune": finetune, "compare": compare, "four": four}[args.command](args)


if __name__ == "__main__":
    main()
