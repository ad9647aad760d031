"""Which image score ranks xr-fracture's validation images best: the classifier's logit, the
highest centre-heatmap logit, or a weighted mean of the two?

For each member of the bundle and for the bundle's network (members averaged), on the FracAtlas
valid split: image-level AUC of ``fracture_net.image_score`` at peak weights 0 (classifier
alone), 0.25, 0.5, 0.75 and 1 (peak alone), and the paired bootstrap interval (2,000
resamples of images) of the 0.5 score's AUC minus the classifier's. Every member's epoch was
chosen on this split by the classifier's AUC plus the top-box hit rate, which favours the
classifier's side of the comparison.

Usage: ``python scripts/experiments/fracture_image_score.py [models/xr-fracture]``
"""

from __future__ import annotations

from functools import partial

import numpy as np
import numpy.typing as npt

from dicom_ai.inference.ensemble import LogitEnsemble
from dicom_ai.train import fracture
from dicom_ai.train.metrics import binary_auc, bootstrap_ci

WEIGHTS = (0.0, 0.25, 0.5, 0.75, 1.0)


def auc_gain(y: npt.NDArray[np.int64], a: npt.NDArray[np.float64], b: npt.NDArray[np.float64],
             i: npt.NDArray[np.int64]) -> float:
    """AUC of scores ``a`` minus that of ``b`` on the images ``i``."""
    return binary_auc(y[i], a[i]) - binary_auc(y[i], b[i])


def paired_auc_gain(y: npt.NDArray[np.int64], a: npt.NDArray[np.float64],
                    b: npt.NDArray[np.float64]) -> tuple[float, float, float]:
    """AUC of scores ``a`` minus that of ``b`` on every image, with the 95 % interval of the
    paired bootstrap (2,000 resamples of images)."""
    lo, hi = bootstrap_ci(partial(auc_gain, y, a, b), len(y), resamples=2000)
    return auc_gain(y, a, b, np.arange(len(y))), lo, hi


def selection_line(name: str, data: fracture.FractureSet, pred: fracture.Predictions) -> str:
    """``name``'s image AUC and top-box hit rate (:func:`fracture.selection_score`)."""
    auc, hits, _peak_auc = fracture.selection_score(data, pred)
    return (f"{name}: image AUC {auc:.4f}, top box on a radiologist's box {hits:.3f} of "
            f"{int(data.labels.sum())} fractured images")


def main() -> int:
    bundle, val = fracture.validation_experiment(__doc__.split("\n")[0])
    net = fracture.load_trained(bundle)
    members = list(net.members) if isinstance(net, LogitEnsemble) else []
    y = val.labels
    for name, model in [*((f"member {k}", m) for k, m in enumerate(members)), ("bundle", net)]:
        scores = {w: fracture.predict(model, val.images, peak_weight=w).scores
                  for w in WEIGHTS}
        aucs = ", ".join(f"w={w:g} {binary_auc(y, s):.4f}" for w, s in scores.items())
        gain, lo, hi = paired_auc_gain(y, scores[0.5], scores[0.0])
        print(f"{name}: AUC {aucs}; w=0.5 - w=0: {gain:+.4f} (95% CI {lo:+.4f} to "
              f"{hi:+.4f})", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
