"""Does fine-tuning xr-fracture's networks at 320 px help, where running them at 320 alone hurt?

``fracture_input_scale.py`` found the 256-px networks worse at 320 px (AUC 0.8249 against
0.8358): a network has to be trained at the size it reads. A full schedule at 320 px is many
CPU hours; this asks the cheaper question first: a short fine-tune of each shipped member at
320 px (AdamW at a tenth of the recipe's learning rate, 5 % warm-up then cosine over
``--minutes`` per member, the recipe's augmentation and loss, the epoch kept by the training
loop's own rule: classifier AUC + top-box hit on valid). Fixed before measuring: the members'
budgets, the learning rate, and the comparison printed — the fine-tuned members averaged with
the bundle's image score at 320 px against the bundle as shipped at 256 px, image AUC with the
paired bootstrap interval of the difference (2,000 resamples) and the top-box hit rate.

Each member checkpoints after every epoch under ``--cache``/checkpoints; ``--resume``
continues a cut-off run within its budget.

Usage: ``python scripts/experiments/fracture_finetune_320.py [models/xr-fracture]
[--minutes 33] [--threads 2] [--resume]``
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
from pathlib import Path

import numpy as np
import torch
from fracture_image_score import paired_auc_gain, selection_line

from dicom_ai.inference.ensemble import LogitEnsemble
from dicom_ai.train import fracture
from dicom_ai.train.commands import DEFAULT_CACHE, DEFAULT_DATA

SIDE = 320
#: A tenth of the recipe's peak learning rate: the members are trained, only their input size
#: changes.
LR_FRACTION = 0.1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("bundle", nargs="?", default=Path("models/xr-fracture"), type=Path)
    parser.add_argument("--data", default=DEFAULT_DATA, type=Path)
    parser.add_argument("--cache", default=DEFAULT_CACHE, type=Path)
    parser.add_argument("--minutes", type=float, default=33.0, help="budget per member")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    root = args.data / fracture.DATA_SUBDIR
    size = (SIDE, SIDE)
    train_set = fracture.load_split(root, "train", size, args.cache)
    val = fracture.load_split(root, "valid", size, args.cache)
    val_256 = fracture.load_split(root, "valid", fracture.SIZE, args.cache)
    shipped = fracture.load_trained(args.bundle)
    weight = fracture.bundle_spec(args.bundle).peak_weight
    if not isinstance(shipped, LogitEnsemble):
        raise SystemExit(f"{args.bundle}: expected an ensemble of members")
    if not np.array_equal(val.labels, val_256.labels):
        raise SystemExit("the valid split differs between sizes")

    tuned = []
    for k, member in enumerate(shipped.members):
        net = copy.deepcopy(member)
        cfg = dataclasses.replace(fracture.RECIPE.loop, lr=fracture.RECIPE.loop.lr * LR_FRACTION,
                                  max_minutes=args.minutes, seed=fracture.RECIPE.loop.seed + k)
        print(f"member {k}: fine-tune at {SIDE} px, lr {cfg.lr:g}, {args.minutes:g} min",
              flush=True)
        checkpoint = args.cache / "checkpoints" / f"xr-fracture-ft{SIDE}-member{k}.pt"
        fracture.train(net, train_set, val, cfg, checkpoint=checkpoint, resume=args.resume,
                       log=lambda line: print(line, flush=True))
        tuned.append(net.cpu().eval())

    base = fracture.predict(shipped, val_256.images, peak_weight=weight)
    plain = fracture.predict(shipped, val.images, peak_weight=weight)
    new = fracture.predict(LogitEnsemble(tuned).eval(), val.images, peak_weight=weight)
    for name, data, pred in (("shipped at 256 px", val_256, base),
                             (f"shipped at {SIDE} px", val, plain),
                             (f"fine-tuned at {SIDE} px", val, new)):
        print(selection_line(name, data, pred), flush=True)
    gain, lo, hi = paired_auc_gain(val.labels, new.scores, base.scores)
    print(f"fine-tuned at {SIDE} px minus shipped at 256 px: image AUC {gain:+.4f} "
          f"(95% CI {lo:+.4f} to {hi:+.4f})", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
