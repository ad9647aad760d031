"""What does averaging xr-fracture's members add over its first member alone?

On the FracAtlas valid split: image-level AUC and top-box hit rate (top box on a radiologist's
box, fractured images) of member 0 alone and of the shipped ensemble, and the paired bootstrap
of their differences (2,000 resamples of images; fractured images for the hit rate). Every
member's epoch was chosen on this same split, so both sides are equally optimistic.

Usage: ``python scripts/experiments/fracture_ensemble_gain.py [models/xr-fracture]``
"""

from __future__ import annotations

import numpy as np

from dicom_ai.inference.ensemble import LogitEnsemble
from dicom_ai.train import fracture
from dicom_ai.train.metrics import binary_auc

RESAMPLES = 2000


def main() -> int:
    bundle, val = fracture.validation_experiment(__doc__.split("\n")[0])
    ensemble = fracture.load_trained(bundle)
    if not isinstance(ensemble, LogitEnsemble):
        raise SystemExit(f"{bundle} holds one network, not an ensemble")
    first = ensemble.members[0]
    y = val.labels
    logits, hits = {}, {}
    for name, net in (("member 0", first.eval()), ("ensemble", ensemble)):
        pred = fracture.predict(net, val.images)
        logits[name] = pred.scores
        hits[name] = np.array([bool(b) and fracture.box_hit(b[0], val.boxes[i])
                               for i, b in enumerate(pred.boxes)])
        print(f"{name}: AUC {binary_auc(y, pred.scores):.4f}, top-box hit "
              f"{hits[name][y == 1].mean():.4f}")
    rng = np.random.default_rng(0)
    pos = np.flatnonzero(y == 1)
    d_auc, d_hit = [], []
    for _ in range(RESAMPLES):
        i = rng.integers(0, len(y), len(y))
        if y[i].min() == y[i].max():
            continue
        d_auc.append(binary_auc(y[i], logits["ensemble"][i]) -
                     binary_auc(y[i], logits["member 0"][i]))
        j = rng.choice(pos, len(pos))
        d_hit.append(hits["ensemble"][j].mean() - hits["member 0"][j].mean())
    auc_lo, auc_hi = np.percentile(d_auc, [2.5, 97.5])
    hit_lo, hit_hi = np.percentile(d_hit, [2.5, 97.5])
    print(f"ensemble - member 0: AUC {np.mean(d_auc):+.4f} (95% CI {auc_lo:+.4f} to "
          f"{auc_hi:+.4f}; higher in {np.mean(np.array(d_auc) > 0):.0%} of resamples), "
          f"top-box hit {np.mean(d_hit):+.4f} ({hit_lo:+.4f} to {hit_hi:+.4f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
