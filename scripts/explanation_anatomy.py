"""How much of each model's Grad-CAM lies over the anatomy it should explain, on validation images.

For ``cxr-pneumonia`` (Kermany validation split carved by :func:`dicom_ai.train.run.load_splits`)
the anatomy is the estimated lung fields (:func:`dicom_ai.imaging.anatomy.lung_fields`); for
``fundus-dr`` (RetinaMNIST validation split) the camera's field of view; for ``derm-lesion``
(ISIC 2017 validation split) the estimated lesion
(:func:`dicom_ai.imaging.dermoscopy.lesion_mask`, a proxy: the data has no lesion masks). For
every image the
Grad-CAM of the class the product explains is computed exactly as the product does
(:func:`dicom_ai.inference.runner.gradcam` on the bundle's layers) and the script prints, over
the images:

- ``share``: the mean share of the map's mass inside the anatomy, unrestricted (what the model
  drew on) and after :func:`dicom_ai.imaging.anatomy.restrict` (what is displayed; 1 by
  construction, printed as a check of the restriction);
- ``area``: the mean share of the image the anatomy covers, i.e. the share a map spread
  evenly would have: an unrestricted share near it means the map does not prefer the anatomy;
- ``shown_empty``: the share of images with a non-zero map whose restricted map is empty (no
  evidence at all inside the anatomy, so the reader sees no map);
- ``peak``: the share of images whose hottest pixel lies inside the anatomy;
- ``all_zero_maps``: images whose map is zero everywhere (Grad-CAM of a class the image gives
  no evidence for, e.g. "pneumonia" on many normal films); they are left out of the means;
- ``bottom15``: the mean share of the map's mass in the lowest 15 % of rows (the film's lower
  margin, where the chest X-ray maps looked hottest while MONAI's default post-processing
  inverted them);
- for the chest X-ray, how many images had both lungs found in the image (the rest use the
  anatomical prior for one or both); for dermoscopy, ``lesion_found``, the share of images
  whose lesion was found rather than replaced by the central disk.

Usage::

    python scripts/explanation_anatomy.py [--models models] [--data ../shared/data]
        [--limit N] [--threads 1]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from dicom_ai.imaging.anatomy import explained_anatomy, lung_fields, restrict, share_inside
from dicom_ai.inference.bundle import load_bundle
from dicom_ai.inference.classify import classification_spec, explained_class
from dicom_ai.inference.runner import calibrated_softmax, gradcam, predict_logits
from dicom_ai.train.commands import DEFAULT_CACHE
from dicom_ai.train.recipes import RECIPES
from dicom_ai.train.run import load_splits

MODELS = ("cxr-pneumonia", "fundus-dr", "derm-lesion")
#: The film's lower margin: this share of the rows at the bottom of the image.
BOTTOM_SHARE = 0.15


def measure(name: str, models: Path, data: Path, cache: Path, limit: int | None
            ) -> dict[str, Any]:
    """The figures of one model over its validation images (see the module docstring)."""
    bundle = load_bundle(models / name, device=torch.device("cpu"))
    block = bundle.dicom_ai
    size = tuple(int(v) for v in block["preprocessing"]["size"])
    # The validation split of the recipe, at the size the shipped bundle reads.
    recipe = dataclasses.replace(RECIPES[name], size=(size[0], size[1]))
    _, val = load_splits(recipe, data, cache)
    images = np.asarray(val.images, dtype=np.float32)
    labels = np.asarray(val.labels)
    if limit is not None:
        # A seeded random subset: the split is in file order, normal films first.
        keep = np.sort(np.random.default_rng(0).permutation(len(labels))[:limit])
        images, labels = images[keep], labels[keep]
    logits = predict_logits(bundle, list(images), batch_size=32, amp=False)
    probs = calibrated_softmax(logits, float(block.get("temperature", 1.0)))
    spec = classification_spec(bundle)
    rows: list[dict[str, float]] = []
    for image, p, label in zip(images, probs, labels, strict=True):
        cam = gradcam(bundle, image, explained_class(spec, p.astype(np.float32)),
                      spec.gradcam_layers)
        mask = explained_anatomy(block["input"], image)
        if mask is None:
            raise ValueError(f"{name}: no anatomy defined for input {block['input']!r}")
        shown = restrict(cam, mask)
        h = cam.shape[0]
        bottom = np.zeros(cam.shape, dtype=bool)
        bottom[h - max(1, round(BOTTOM_SHARE * h)):] = True
        peak = np.unravel_index(int(np.argmax(cam)), cam.shape)
        rows.append({
            "label": float(label), "share": share_inside(cam, mask),
            "share_shown": share_inside(shown, mask), "area": float(mask.mean()),
            "shown_empty": float(not shown.any()) if cam.max() > 0 else float("nan"),
            "peak": float(mask[peak]) if cam.max() > 0 else float("nan"),
            "bottom15": share_inside(cam, bottom),
            "both_lungs": float(lung_fields(image[0]).from_image == 2)
            if block["input"] == "xray" else float("nan"),
            "lesion_found": _lesion_found(image)
            if block["input"] == "dermoscopy" else float("nan")})
    return summarise(name, rows, spec.gradcam_layers)


def _lesion_found(image: npt.NDArray[np.float32]) -> float:
    # Imported here: only the dermoscopy model needs it.
    from dicom_ai.imaging.dermoscopy import lesion_mask

    return float(lesion_mask(image).found)


def summarise(name: str, rows: Sequence[dict[str, float]],
              layers: Sequence[str]) -> dict[str, Any]:
    """Means over all images and per true class (images with an all-zero map are left out of
    the share means and counted)."""
    def means(subset: Sequence[dict[str, float]]) -> dict[str, float]:
        out = {"images": float(len(subset))}
        for key in ("share", "share_shown", "area", "shown_empty", "peak", "bottom15",
                    "both_lungs", "lesion_found"):
            values = np.array([r[key] for r in subset], dtype=np.float64)
            out[key] = float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")
        out["all_zero_maps"] = float(sum(1 for r in subset if not np.isfinite(r["share"])))
        return out

    classes = sorted({int(r["label"]) for r in rows})
    labels = list(RECIPES[name].labels)
    return {"model": name, "layers": list(layers), "all": means(rows),
            "by_class": {labels[c]: means([r for r in rows if int(r["label"]) == c])
                         for c in classes}}


def main(argv: Sequence[str] | None = None) -> int:
    """Print the figures of each model as JSON lines."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="models")
    parser.add_argument("--data", default="../shared/data")
    parser.add_argument("--cache", default=str(DEFAULT_CACHE),
                        help="normalized image cache of dicom-ai train")
    parser.add_argument("--limit", type=int,
                        help="only N validation images (a seeded random subset)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--model", action="append", choices=MODELS,
                        help="measure only this model (repeatable)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    for name in args.model or MODELS:
        result = measure(name, Path(args.models), Path(args.data), Path(args.cache), args.limit)
        print(json.dumps(result, indent=1), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
