"""Which heatmap score should a further fracture box (beyond an image's top one) need?

For each candidate threshold, on the FracAtlas valid split: the further boxes (at most four
more, after NMS) of fractured and of normal images, how many hit a radiologist's box (IoU ≥ 0.25
or centre inside), and how many fractured images would be called "multiple fractures" against
how many truly have more than one box. The bundle's ``boxes.min_score`` was chosen from this
table, on the same split that chose the epochs and the operating point.

Usage: ``python scripts/experiments/fracture_box_rule.py [models/xr-fracture]``
"""

from __future__ import annotations

from dicom_ai.train import fracture

THRESHOLDS = (0.2, 0.3, 0.4, 0.5, 0.6)


def main() -> int:
    bundle, val = fracture.validation_experiment(__doc__.split("\n")[0])
    pred = fracture.predict(fracture.load_trained(bundle), val.images)
    truly_multiple = sum(len(b) > 1 for b in val.boxes)
    print(f"{bundle}: {len(val.labels)} images, {int(val.labels.sum())} fractured, "
          f"{truly_multiple} with more than one radiologist box")
    print("| min score | further boxes, fractured (hitting) | further boxes, normal | "
          "called multiple (truly multiple) |\n|---|---|---|---|")
    for t in THRESHOLDS:
        hits = extra = normal_extra = called = right = 0
        for i, boxes in enumerate(pred.boxes):
            rest = [b for b in boxes[1:] if b.score >= t][:4]
            if val.labels[i] == 1:
                extra += len(rest)
                hits += sum(fracture.box_hit(b, val.boxes[i]) for b in rest)
                called += bool(rest)
                right += bool(rest) and len(val.boxes[i]) > 1
            else:
                normal_extra += len(rest)
        print(f"| {t:g} | {extra} ({hits}) | {normal_extra} | {called} ({right}) |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
