"""Do two more xr-fracture members (seeds 2 and 3, the recipe's full schedule on the CPU) help?

1.2.0's second member added +0.013 image AUC over the first; this asks whether a third and
fourth add more. ``MORE`` is a bundle trained with the unchanged recipe from seed 2
(``python -m dicom_ai.train.fracture --threads 2 train --seed 2 --out MORE``: seeds 2 and 3,
157 epochs each, about 42 min a member on 2 threads of the development VM). On the FracAtlas
valid split, with the bundle's image score (its peak weight): image AUC and top-box hit rate of
each new member, of the new pair, of the shipped bundle and of all four networks averaged, and
the paired bootstrap interval (2,000 resamples of images) of the four's AUC minus the
shipped's. Every member's epoch was chosen on this split, as the recipe chooses it, so every
line leans equally optimistic.

Fixed before measuring: the four networks become xr-fracture 1.4.0 (recipe ``members=4``) if
their image AUC is above the shipped bundle's and their top-box hit rate is not below it. The
interval is reported, not required, as for 1.2.0's second member. A first rule (AUC above,
top-box hit at least 0.50) was dropped after a dry run with two 1-epoch networks passed it:
near-random members barely move the mean logit's ranking (AUC +0.001) but cost boxes (0.707 to
0.659).

Usage: ``python scripts/experiments/fracture_more_members.py [models/xr-fracture] --more MORE``
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from fracture_image_score import paired_auc_gain, selection_line

from dicom_ai.inference.ensemble import LogitEnsemble
from dicom_ai.train import fracture
from dicom_ai.train.commands import DEFAULT_CACHE, DEFAULT_DATA


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("bundle", nargs="?", default=Path("models/xr-fracture"), type=Path)
    parser.add_argument("--more", required=True, type=Path, help="bundle of further seeds")
    parser.add_argument("--data", default=DEFAULT_DATA, type=Path)
    parser.add_argument("--cache", default=DEFAULT_CACHE, type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    val = fracture.load_split(args.data / fracture.DATA_SUBDIR, "valid", fracture.SIZE,
                              args.cache)
    weight = fracture.bundle_spec(args.bundle).peak_weight
    shipped = fracture.load_trained(args.bundle)
    old = fracture.member_networks(shipped)
    new = fracture.member_networks(fracture.load_trained(args.more))
    seeds = [r["loop"]["seed"] for r in fracture.training_records(args.more)]
    candidates: list[tuple[str, torch.nn.Module]] = [
        *((f"seed {seed} alone", net) for seed, net in zip(seeds, new, strict=True)),
        (f"seeds {seeds} averaged", LogitEnsemble(new)),
        ("shipped", shipped),
        (f"all {len(old) + len(new)} averaged", LogitEnsemble([*old, *new]))]
    preds = {}
    for name, net in candidates:
        preds[name] = fracture.predict(net.eval(), val.images, peak_weight=weight)
        print(selection_line(name, val, preds[name]), flush=True)
    four, base = preds[candidates[-1][0]], preds["shipped"]
    gain, lo, hi = paired_auc_gain(val.labels, four.scores, base.scores)
    auc, hit, _ = fracture.selection_score(val, four)
    base_auc, base_hit, _ = fracture.selection_score(val, base)
    adopt = auc > base_auc and hit >= base_hit
    print(f"{candidates[-1][0]} minus shipped: image AUC {gain:+.4f} (95% CI {lo:+.4f} to "
          f"{hi:+.4f}); rule: {'adopt' if adopt else 'keep the shipped bundle'}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
