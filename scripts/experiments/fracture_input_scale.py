"""Would xr-fracture read small fractures better from a larger input at inference alone?

The networks were trained on 256×256 (aspect-padded) copies; they pool globally, so they run
at any size. On the FracAtlas valid split this prints, for the bundle's network at 256 (as
shipped), 320 and 384 px: image-level AUC of the bundle's image score and the top-box hit rate;
then the AUC of the mean of the 256 and 320 scores (fixed before measuring) against 256 alone,
with the paired bootstrap interval of the difference (2,000 resamples of images).

Usage: ``python scripts/experiments/fracture_input_scale.py [models/xr-fracture]``
"""

from __future__ import annotations

from fracture_image_score import paired_auc_gain, selection_line

from dicom_ai.train import fracture
from dicom_ai.train.metrics import binary_auc

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
        print(selection_line(f"{side} px", val, pred), flush=True)
    y = splits[SIZES[0]][1].labels
    mean = (scores[256] + scores[320]) / 2
    gain, lo, hi = paired_auc_gain(y, mean, scores[256])
    print(f"mean of 256 and 320 px: image AUC {binary_auc(y, mean):.4f}; minus 256 alone "
          f"{gain:+.4f} (95% CI {lo:+.4f} to {hi:+.4f})", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
