"""Does the DICOM path score the validation images as ``dicom-ai evaluate`` does?

The held-out test images are scored through ``dicom-ai replay`` of DICOM objects and its
``findings.json``, while every validation figure in the model cards comes from cached arrays
(``dicom-ai evaluate``). The two paths share the normalization functions, but only the DICOM
path decodes a transfer syntax, applies the Modality LUT, the VOI window and the photometric
interpretation, routes the series by its SOP class and body part, and runs the input-fit check,
which can refuse an image outright. A difference there would move the held-out figures and no
validation number would show it.

For each model the script wraps every validation image as DICOM the way a modality sends it
(``scripts/build_sample_studies.py`` writes the objects; the encodings cycle over the variants
below), replays the folder with every shipped bundle loaded, exactly as ``dicom-ai replay``
does, and reads the probabilities back from ``findings.json``. It prints, per model, how many
images the DICOM path scored, the validation AUC by both paths with the paired bootstrap
interval of their difference, and the largest probability difference per encoding; for
fractures also the reported top box on a radiologist's box, measured in source pixels from
``bbox_px`` as the held-out scoring reads it.

Usage: ``python scripts/experiments/dicom_path_validation.py xr-fracture derm-lesion fundus-dr``
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from pydicom.uid import (
    UID,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLSLossless,
    RLELossless,
)

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import build_sample_studies as samples

from dicom_ai.config import Settings, load_settings
from dicom_ai.inference.bundle import Bundle
from dicom_ai.inference.fracture_net import Box
from dicom_ai.inference.runner import calibrated_softmax
from dicom_ai.inference.spec import ClassificationSpec, FractureSpec
from dicom_ai.pipeline import load_models
from dicom_ai.replay import replay
from dicom_ai.train import fracture
from dicom_ai.train.datasets import ImageSet
from dicom_ai.train.loop import predict_logits, validation_auc
from dicom_ai.train.metrics import binary_auc, bootstrap_ci
from dicom_ai.train.recipes import Recipe
from dicom_ai.train.run import bundle_recipe, load_splits

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
MODELS = ("xr-fracture", "derm-lesion", "fundus-dr", "cxr-pneumonia")
RESAMPLES = 2000

#: Radiograph encodings: (photometric, bits stored, VOI window present, transfer syntax). The
#: 12-bit ones stretch the 8-bit source onto the stored range; MONOCHROME1 is stored inverted.
XRAY_ENCODINGS: tuple[tuple[str, int, bool, UID], ...] = (
    ("MONOCHROME2", 8, False, ExplicitVRLittleEndian),
    ("MONOCHROME2", 12, True, RLELossless),
    ("MONOCHROME1", 12, True, JPEGLSLossless),
    ("MONOCHROME1", 12, False, JPEG2000Lossless),
)
#: Colour encodings: RGB as stored, JPEG baseline (YBR_FULL_422, quality 95, lossy) and RLE.
COLOUR_ENCODINGS: tuple[UID, ...] = (ExplicitVRLittleEndian, JPEGBaseline8Bit, RLELossless)
#: FracAtlas regions as a modality's Body Part Examined; "mixed" films show several.
BODY_PART = {"hand": "HAND", "leg": "LEG", "hip": "HIP", "shoulder": "SHOULDER",
             "mixed": "EXTREMITY"}


@dataclass(frozen=True)
class Scored:
    """The two paths' probabilities of one model's validation split.

    ``dicom`` is NaN where the DICOM path gave no result; ``encoding`` names each image's."""

    labels: IntArray
    array: FloatArray
    dicom: FloatArray
    encoding: tuple[str, ...]
    #: Why each image the DICOM path did not score was left out (status and reason).
    unscored: dict[str, str]


def study_key(prefix: str, i: int) -> str:
    """A study key whose last two digits, which the builder puts in the study time's minutes,
    stay below 60."""
    return f"{prefix}{i // 60:02d}{i % 60:02d}"


def study_uid(key: str) -> str:
    return str(samples.derived_uid(key, "study"))


def model_findings(out: Path, key: str, model: str) -> tuple[list[dict[str, Any]], str]:
    """The findings ``model`` wrote for study ``key``, and its status with its reason."""
    path = out / study_uid(key) / "findings.json"
    if not path.exists():
        return [], "no findings.json"
    for result in json.loads(path.read_text())["results"]:
        if result["model"]["name"] == model:
            status = result["status"]
            return (result["findings"] if status == "ok" else []), \
                f"{status}: {result.get('reason', '')}".rstrip(": ")
    return [], "not routed to the model"


@dataclass(frozen=True)
class Shipped:
    """Every bundle under ``models/``, loaded once with the default settings."""

    bundles: list[Bundle]
    settings: Settings

    def replay(self, folder: Path, out: Path) -> None:
        """``dicom-ai replay folder --out out`` with every shipped bundle."""
        replay(folder, out, self.bundles, self.settings, progress=False)

    def named(self, name: str) -> Bundle:
        return next(b for b in self.bundles if b.name == name)


def report(name: str, what: str, s: Scored, auc: Callable[[IntArray, FloatArray], float],
           images: str = "validation images") -> None:
    """Print the comparison; AUCs over the images both paths scored."""
    ok = np.flatnonzero(~np.isnan(s.dicom if s.dicom.ndim == 1 else s.dicom[:, 0]))
    print(f"{name}: {len(s.labels)} {images}, {len(ok)} scored through DICOM "
          f"({len(s.unscored)} not)")
    for key, why in sorted(s.unscored.items()):
        print(f"  not scored: {key}: {why}")
    if not len(ok):
        return
    y = s.labels[ok]
    a, d = s.array[ok], s.dicom[ok]

    def both(i: IntArray) -> tuple[float, float]:
        return auc(y[i], a[i]), auc(y[i], d[i])

    lo, hi = bootstrap_ci(lambda i: both(i)[1] - both(i)[0], len(ok), resamples=RESAMPLES)
    full = both(np.arange(len(ok)))
    print(f"  {what}: arrays {full[0]:.4f}, DICOM {full[1]:.4f}, difference "
          f"{full[1] - full[0]:+.4f} (95% CI {lo:+.4f} to {hi:+.4f}); arrays on all "
          f"{len(s.labels)}: {auc(s.labels, s.array):.4f}")
    gap = np.abs(d - a).reshape(len(ok), -1).max(axis=1)
    for enc in sorted(set(s.encoding)):
        sel = np.array([s.encoding[i] == enc for i in ok])
        if sel.any():
            print(f"  {enc}: {int(sel.sum())} images, |p DICOM - p arrays| max "
                  f"{gap[sel].max():.2e}, median {np.median(gap[sel]):.2e}")


def fracture_model(shipped: Shipped, data: Path, cache: Path, work: Path) -> None:
    root = data / fracture.DATA_SUBDIR
    val = fracture.load_split(root, "valid", fracture.SIZE, cache)
    with (root / "labels.csv").open(newline="") as fh:
        rows = {r["path"]: r for r in csv.DictReader(fh)}
    folder, out = work / "in", work / "out"
    keys, encodings = [], []
    for i, path in enumerate(val.names):
        row = rows[path]
        photometric, bits, window, syntax = XRAY_ENCODINGS[i % len(XRAY_ENCODINGS)]
        key = study_key("FXVAL", i)
        film = samples.FractureXRay(key, path, BODY_PART[row["region"]], photometric, bits,
                                    window, syntax, label=row["label"], split="valid")
        samples.write(samples.fracture_xray(film, data), folder / key.lower() / "1.dcm")
        keys.append(key)
        encodings.append(xray_encoding(photometric, bits, window, syntax))
    shipped.replay(folder, out)

    bundle = shipped.named(fracture.NAME)
    spec = bundle.spec
    assert isinstance(spec, FractureSpec)
    pred = fracture.predict(bundle.network, val.images, peak_weight=spec.peak_weight)
    array_p = 1.0 / (1.0 + np.exp(-pred.scores / spec.temperature))
    threshold = float(spec.decision.threshold or 0.0)
    array_q = fracture.quality(val, pred, temperature=spec.temperature, threshold=threshold)

    dicom_p = np.full(len(keys), np.nan)
    top_hit = np.zeros(len(keys), dtype=bool)
    unscored = {}
    for i, key in enumerate(keys):
        findings, status = model_findings(out, key, fracture.NAME)
        image = [f for f in findings if f["label"] == "fracture" and "bbox_px" not in f]
        if not image:
            unscored[key] = f"{val.names[i]} ({status})"
            continue
        dicom_p[i] = image[0]["probability"]
        boxes = [f for f in findings if f["label"] == "fracture" and "bbox_px" in f]
        if boxes and val.labels[i] == 1:
            row = rows[val.names[i]]
            gt = np.array(samples.fracatlas_boxes_px(data, val.names[i], int(row["height"]),
                                                     int(row["width"])), dtype=np.float32)
            top = max(boxes, key=lambda f: f["probability"])
            c0, r0, c1, r1 = (float(v) for v in top["bbox_px"])
            top_hit[i] = fracture.box_hit(Box(c0, r0, c1, r1, top["probability"]), gt)
    scored = Scored(val.labels, array_p, dicom_p, tuple(encodings), unscored)
    report(fracture.NAME, "image-level AUC", scored, binary_auc)
    frac = np.flatnonzero((val.labels == 1) & ~np.isnan(dicom_p))
    print(f"  reported top box on a radiologist's box, fractured images: arrays "
          f"{array_q['reported_top_box_hit']['value']:.4f} (all {int(val.labels.sum())}), "
          f"DICOM {top_hit[frac].mean():.4f} ({len(frac)} scored)")
    positive = (dicom_p >= threshold)[~np.isnan(dicom_p)]
    same = positive == (array_p >= threshold)[~np.isnan(dicom_p)]
    print(f"  decision at the operating point {threshold:.4f}: same on {int(same.sum())} of "
          f"{len(same)} images")


def chest_xrays(names: Sequence[str], labels: Sequence[str], root: str
                ) -> list[samples.ChestXRay]:
    """One CR or DX object per Kermany image under ``root``, cycling over the sample studies'
    four encodings (CR, DX for presentation and for processing, both photometrics) where the
    folder records the original size DX needs, else over :data:`XRAY_ENCODINGS` as CR."""
    out = []
    for i, (name, label) in enumerate(zip(names, labels, strict=True)):
        key = study_key("CXVAL", i)
        if root == "cxr/kermany_fullres_subset":
            template = samples.CHEST_XRAYS[i % len(samples.CHEST_XRAYS)]
            out.append(samples.ChestXRay(
                key, name, label, template.modality, template.presentation_intent,
                template.photometric, template.bits_stored, template.window,
                template.transfer_syntax, root=root))
        else:
            photometric, bits, window, syntax = XRAY_ENCODINGS[i % len(XRAY_ENCODINGS)]
            out.append(samples.ChestXRay(key, name, label, "CR", "", photometric, bits, window,
                                         syntax, root=root))
    return out


def xray_encoding(photometric: str, bits: int, window: bool, syntax: UID) -> str:
    """How a radiograph was encoded, as the report names it."""
    return f"{photometric} {bits}-bit{' VOI' if window else ''} {syntax.name}"


def encoding_name(spec: samples.ChestXRay) -> str:
    """:func:`xray_encoding` of a chest film, after its modality and presentation intent."""
    kind = f"{spec.modality} {spec.presentation_intent}".strip()
    encoding = xray_encoding(spec.photometric, spec.bits_stored, spec.window,
                             spec.transfer_syntax)
    return f"{kind} {encoding}"


def classification_model(shipped: Shipped, name: str, data: Path, cache: Path, work: Path
                         ) -> None:
    bundle = shipped.named(name)
    spec = bundle.spec
    assert isinstance(spec, ClassificationSpec)
    recipe = bundle_recipe(bundle.metadata)
    train, val = load_splits(recipe, data, cache)
    if name == "cxr-pneumonia":
        chest_subsets(shipped, bundle, spec, recipe, (train, val), data, work)
    array_p = calibrated_softmax(predict_logits(bundle.network, val.images), spec.temperature)
    folder, out = work / "in", work / "out"
    keys, encodings = [], []
    if name == "cxr-pneumonia":
        films = chest_xrays([f"train/{n}" for n in val.names],
                            [n.split("/")[0] for n in val.names], "cxr/kermany224")
        for film in films:
            samples.write(samples.chest_xray(film, data), folder / film.key.lower() / "1.dcm")
            keys.append(film.key)
            encodings.append(encoding_name(film))
    elif name == "fundus-dr":
        with np.load(data / "fundus" / "retinamnist28_trainval.npz") as npz:
            images, labels = npz["val_images"], npz["val_labels"].ravel()
        for i in range(len(labels)):
            syntax = COLOUR_ENCODINGS[i % len(COLOUR_ENCODINGS)]
            key = study_key("FUVAL", i)
            spec_i = samples.Fundus(key, i, int(labels[i]), "", syntax)
            samples.write(samples.fundus_photo(spec_i, images, labels),
                          folder / key.lower() / "1.dcm")
            keys.append(key)
            encodings.append(syntax.name)
    else:
        for i, path in enumerate(val.names):
            syntax = COLOUR_ENCODINGS[i % len(COLOUR_ENCODINGS)]
            key = study_key("DMVAL", i)
            label = recipe.labels[int(val.labels[i])]
            spec_d = samples.Dermoscopy(key, path, label, syntax, split="val")
            samples.write(samples.dermoscopy_image(spec_d, data), folder / key.lower() / "1.dcm")
            keys.append(key)
            encodings.append(syntax.name)
    shipped.replay(folder, out)

    dicom_p, unscored = read_probabilities(out, keys, name, recipe.labels, val.names)
    report(name, auc_name(recipe.labels, recipe.loop.select_classes),
           Scored(val.labels, array_p, dicom_p, tuple(encodings), unscored),
           lambda y, p: validation_auc(y, p, recipe.loop.select_classes))


def auc_name(labels: Sequence[str], select: Sequence[int]) -> str:
    """What :func:`~dicom_ai.train.loop.validation_auc` computes for these classes."""
    if select:
        return f"mean one-vs-rest AUC of {[labels[c] for c in select]}"
    return f"AUC of {labels[1]}" if len(labels) == 2 else "macro one-vs-rest AUC"


def read_probabilities(out: Path, keys: Sequence[str], model: str, labels: Sequence[str],
                       names: Sequence[str]) -> tuple[FloatArray, dict[str, str]]:
    """Each study's class probabilities from ``findings.json`` (NaN rows where the model gave
    none) and why those were not scored."""
    probs = np.full((len(keys), len(labels)), np.nan)
    unscored = {}
    for i, key in enumerate(keys):
        findings, status = model_findings(out, key, model)
        by_label = {f["label"]: f["probability"] for f in findings}
        if not all(lab in by_label for lab in labels):
            unscored[key] = f"{names[i]} ({status})"
            continue
        probs[i] = [by_label[lab] for lab in labels]
    return probs, unscored


def chest_subsets(shipped: Shipped, bundle: Bundle, spec: ClassificationSpec, recipe: Recipe,
                  splits: tuple[ImageSet, ImageSet], data: Path, work: Path) -> None:
    """The 120 Kermany films kept near their original resolution (longest side ≤ 1024) through
    DICOM, against the 224-px copies of the same films (in ``splits``, train and validation)
    the model trains and validates on: the held-out films may come at either size."""
    root = "cxr/kermany_fullres_subset"
    with (data / root / "labels.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    index = {n: (part, k) for part in splits for k, n in enumerate(part.names)}
    # The subset names its films under train/, the 224-px split by class folder.
    copies = [index[r["path"].removeprefix("train/")] for r in rows]
    films = chest_xrays([r["path"] for r in rows], [r["label"] for r in rows], root)
    folder, out = work / "fullres" / "in", work / "fullres" / "out"
    for film in films:
        samples.write(samples.chest_xray(film, data), folder / film.key.lower() / "1.dcm")
    shipped.replay(folder, out)
    small = np.stack([part.images[k] for part, k in copies])
    array_p = calibrated_softmax(predict_logits(bundle.network, small), spec.temperature)
    labels = np.array([recipe.labels.index(r["label"].lower()) for r in rows], dtype=np.int64)
    dicom_p, unscored = read_probabilities(out, [f.key for f in films], recipe.name,
                                           recipe.labels, [r["path"] for r in rows])
    in_val = sum(part is splits[1] for part, _ in copies)
    report(recipe.name, auc_name(recipe.labels, recipe.loop.select_classes),
           Scored(labels, array_p, dicom_p, tuple(encoding_name(f) for f in films), unscored),
           lambda y, p: validation_auc(y, p, recipe.loop.select_classes),
           images=f"films near full resolution against their 224-px copies ({in_val} in the "
                  "validation split, the rest trained on)")


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+", choices=MODELS)
    ap.add_argument("--data", type=Path, default=Path("../shared/data"))
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "dicom-ai")
    ap.add_argument("--work", type=Path, default=None,
                    help="keep the DICOM objects and the replay here (default: a temp folder)")
    args = ap.parse_args(argv)
    settings = load_settings(None)
    bundles, problems = load_models(settings.inference, Path("models"))
    if problems:
        raise SystemExit(f"bundles not loaded: {problems}")
    shipped = Shipped(bundles, settings)
    for name in args.models:
        with tempfile.TemporaryDirectory() as tmp:
            work = (args.work or Path(tmp)) / name
            if name == fracture.NAME:
                fracture_model(shipped, args.data, args.cache, work)
            else:
                classification_model(shipped, name, args.data, args.cache, work)


if __name__ == "__main__":
    main()
