"""Would xr-fracture read small fractures better from a larger input at inference alone?

The networks were trained on 256×256 (aspect-padded) copies; they pool globally, so they run
at any size. On the FracAtlas valid split this prints, for the bundle's network at 256 (as
shipped), 320 and 384 px: image-level AUC of the bundle's image score and the top-box hit rate;
then the AUC of the mean of the 256 and 320 scores (fixed before measuring) against 256 alone,
with the paired bootstrap interval of the difference (2,000 resamples of images).

Usage: ``python scripts/experiments/fracture_input_scale.py [models/xr-fracture]``
"""

from __future__ import annotations

from functools import partial

import numpy as np
from fracture_image_score import auc_gain

from dicom_ai.train import fracture
from dicom_ai.train.metrics import binary_auc, bootstrap_ci

SIZES = (256, 320, 384)


def main() -> int:
    splits = {side: fracture.validation_experiment(__doc__.split("\n")[0], (side, side))
              for side in SIZES}
    bundle = splits[SIZES[0]][0]
    net = fracture.load_trained(bundle)
    weight = fracture.bundle_spec(bundle).peak_weight
    scores = {}
    for side, (_bundle, val) in splits.items():
        pred = fracture.predict(net, val.images, peak_weight=weight)
        scores[side] = pred.scores
        auc, hits, _peak_auc = fracture.selection_score(val, pred)
        print(f"{side} px: image AUC {auc:.4f}, top box on a radiologist's box {hits:.3f} of "
              f"{int(val.labels.sum())} fractured images", flush=True)
    y = splits[SIZES[0]][1].labels
    mean = (scores[256] + scores[320]) / 2
    lo, hi = bootstrap_ci(partial(auc_gain, y, mean, scores[256]), len(y), resamples=2000)
    print(f"mean of 256 and 320 px: image AUC {binary_auc(y, mean):.4f}; minus 256 alone "
          f"{auc_gain(y, mean, scores[256], np.arange(len(y))):+.4f} "
          f"(95% CI {lo:+.4f} to {hi:+.4f})", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
