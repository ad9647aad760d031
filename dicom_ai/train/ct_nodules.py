"""Train and validate the ``ct-lung`` nodule/mass network on the annotated CT in ../shared/data/ct.

Data: LIDC-IDRI-0001/0002/0003 fragments (lesion = voxels outlined by at least 2 of the 4
readers, :mod:`dicom_ai.train.lidc`) and Lung-PET-CT-Dx A0002 (lesion = the ellipse inscribed
in each tumour box, restricted to soft tissue above −500 HU). Four patients, four lesions.

Recipe: 2D patches (3 neighbouring slices of the volume resampled to the bundle's spacing,
exactly as :func:`dicom_ai.inference.ct_lung.model_input` builds them) sampled around real
lesions, around synthetic lesions inserted into real lung parenchyma of the training patients
(never within :data:`SYNTHETIC_CLEARANCE_MM` of a real lesion), and anywhere in the lungs;
flips, 90° rotations, HU scale/shift and noise; Dice + cross-entropy; AdamW with cosine decay
for a fixed wall-clock budget.

Validation is leave-one-patient-out: each patient's volume is analysed by a network trained on
the other three, with the inference code of the product (:func:`probability_map`,
:func:`find_candidates` in the product's :class:`SearchArea`). A lesion is detected when a
candidate's centre lies in its bounding box grown by :data:`HIT_MARGIN_MM`; other candidates
are false positives, except those at a reader's point mark of a nodule < 3 mm, which are not
counted either way. Platt scaling (:class:`Calibration`) is fitted on these candidates (hit =
1, false positive = 0) and the operating point is chosen on the calibrated scale; the
calibration is also checked leave-one-patient-out (fitted on three patients' candidates,
applied to the fourth's). The final network is then trained on all four patients.

``validate`` repeats the validation without training the final network; each fold's
probability map is kept under ``--scratch`` (keyed by the recipe), so changing how candidates
are found or calibrated does not retrain the folds.

Usage::

    python -m dicom_ai.train.ct_nodules train --out models/ct-lung
    python -m dicom_ai.train.ct_nodules validate --out models/ct-lung
    python -m dicom_ai.train.ct_nodules measure sample_studies/ct-lung-pet-ct-dx-a0002
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import resource
import tarfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from scipy import ndimage, optimize
from scipy.special import expit
from torch import nn

from dicom_ai.config import InferenceSettings
from dicom_ai.dicom.collect import collect
from dicom_ai.dicom.model import Series
from dicom_ai.imaging.ct import CTVolume, build_volume, resample
from dicom_ai.imaging.lung import LungMasks, segment_lungs
from dicom_ai.inference.ct_lung import (
    Calibration,
    Preprocessing,
    SearchArea,
    find_candidates,
    hu_to_unit,
    model_input,
    nearest_on_grid,
    probability_map,
    search_area,
)
from dicom_ai.train.lidc import agreement, read_lidc_xml, small_marks
from dicom_ai.train.metrics import expected_calibration_error
from dicom_ai.train.run import build_network

BoolArray = npt.NDArray[np.bool_]
FloatArray = npt.NDArray[np.float32]

LIDC_ARCHIVE = "lidc_fragments.tar.xz"
A0002_ARCHIVE = "lung_pet_ct_dx_A0002.tar.xz"
#: Readers who must agree on a voxel for it to be lesion (2 of 4: the usual LIDC consensus).
MIN_READERS = 2
#: Tumour boxes of A0002 enclose soft tissue; inside the inscribed ellipse, lung air is not tumour.
BOX_TISSUE_HU = -500.0
#: A candidate whose centre lies this close (mm) to a lesion's bounding box detects it.
HIT_MARGIN_MM = 5.0
#: A candidate this close (mm) to a point-marked nodule < 3 mm is neither hit nor false positive.
SMALL_MARK_MM = 5.0
#: Synthetic lesions are centred at least this far (mm) from any real lesion voxel.
SYNTHETIC_CLEARANCE_MM = 20.0
#: Share of patches centred on a real lesion, on a synthetic one; the rest anywhere in the lungs.
REAL_SHARE, SYNTHETIC_SHARE = 0.3, 0.4
#: False-positive rates (per scan) at which the card reports sensitivity.
FP_LEVELS = (0.25, 0.5, 1.0, 2.0, 4.0)
#: The operating point ("positive") is the lowest threshold with at most this many FP per scan.
#: 2 per scan sits inside the 1–4 range CAD systems are usually run at; at 1 per scan the
#: validation found no lesion (docs/README.md).
TARGET_FP_PER_SCAN = 2.0
#: Training patches "anywhere in the lungs" are centred within this margin (mm) of the lung
#: mask, so the network also sees the chest wall, mediastinum and diaphragm next to the lungs.
SAMPLING_MARGIN_MM = 15.0
#: Calibration is judged with this many equal-width probability bins (few candidates).
CALIBRATION_BINS = 10


@dataclass
class Case:
    """One patient's series on the network's grid, with its lesions and where to look.

    ``region`` is where training patches are sampled (:func:`sampling_region`); ``search`` is
    where the product looks for candidates, and so where validation does.
    """

    name: str
    grid: CTVolume
    lesions: npt.NDArray[np.int32]
    lungs: BoolArray
    region: BoolArray
    search: SearchArea
    marks: list[tuple[int, int, int]]

    @property
    def n_lesions(self) -> int:
        return int(self.lesions.max())


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings of one run."""

    #: CPU minutes of this process (not wall time).
    minutes: float = 3.0
    batch_size: int = 16
    lr: float = 2e-3
    weight_decay: float = 1e-4
    seed: int = 0


# --- data -----------------------------------------------------------------------------------

def unpack(archive: Path, scratch: Path) -> Path:
    """Extract ``archive`` under ``scratch`` once (a marker file records completion)."""
    target = scratch / archive.name.split(".")[0]
    marker = target / ".unpacked"
    if not marker.exists():
        target.mkdir(parents=True, exist_ok=True)
        with tarfile.open(archive) as tar:
            tar.extractall(target, filter="data")
        marker.touch()
    return target


def _one_series(folder: Path) -> Series:
    studies = collect(folder).studies
    series = [s for st in studies for s in st.series if s.modality == "CT"]
    if len(series) != 1:
        raise ValueError(f"{folder}: expected one CT series, found {len(series)}")
    return series[0]


def sampling_region(masks: LungMasks, volume: CTVolume, grid: CTVolume) -> BoolArray:
    """Where "anywhere" training patches are centred: the lungs dilated by
    :data:`SAMPLING_MARGIN_MM`, on the network's grid."""
    lungs = nearest_on_grid(masks.lungs, volume, grid)
    if not lungs.any():
        return lungs
    distance = ndimage.distance_transform_edt(~lungs, sampling=grid.spacing)
    region: BoolArray = distance <= SAMPLING_MARGIN_MM
    return region


def _on_grid(volume: CTVolume, lesions: npt.NDArray[np.int32], marks_zyx: list[tuple[int, int,
             int]], name: str, pre: Preprocessing) -> Case:
    grid = resample(volume, pre.spacing)
    masks = segment_lungs(volume.hu, volume.spacing, volume.direction)
    scale = np.asarray(volume.spacing) / np.asarray(grid.spacing)
    marks = [tuple(round(float(v)) for v in np.asarray(m) * scale) for m in marks_zyx]
    return Case(name=name, grid=grid, lesions=nearest_on_grid(lesions, volume, grid),
                lungs=nearest_on_grid(masks.lungs, volume, grid),
                region=sampling_region(masks, volume, grid),
                search=search_area(masks, volume, grid),
                marks=[(m[0], m[1], m[2]) for m in marks])


def load_lidc(root: Path, pre: Preprocessing) -> list[Case]:
    """The LIDC fragments: consensus lesions (≥ 2 readers) labelled 1…n per patient."""
    cases = []
    for xml in sorted(root.rglob("*.xml")):
        volume = build_volume(_one_series(xml.parent))
        index = {inst.SOPInstanceUID: z for z, inst in enumerate(volume.instances)}
        nodules = read_lidc_xml(xml)
        count = agreement(nodules, index, volume.hu.shape)
        lesions, _ = ndimage.label(count >= MIN_READERS, structure=np.ones((3, 3, 3), bool))
        patient = next(p for p in xml.parents if p.name.startswith("LIDC-IDRI-")).name
        cases.append(_on_grid(volume, lesions.astype(np.int32), small_marks(nodules, index),
                              patient, pre))
    return cases


def box_lesion(volume: CTVolume, boxes: dict[str, tuple[int, int, int, int]]
               ) -> npt.NDArray[np.int32]:
    """Lesion mask from per-slice boxes (SOP UID → xmin, ymin, xmax, ymax): the inscribed
    ellipse's soft tissue on each boxed slice, labelled by 3D connected component."""
    mask = np.zeros(volume.hu.shape, dtype=bool)
    rows, cols = np.mgrid[0:volume.hu.shape[1], 0:volume.hu.shape[2]]
    for z, inst in enumerate(volume.instances):
        box = boxes.get(inst.SOPInstanceUID)
        if box is None:
            continue
        x0, y0, x1, y1 = box
        cy, cx, ry, rx = (y0 + y1) / 2, (x0 + x1) / 2, (y1 - y0) / 2 + 0.5, (x1 - x0) / 2 + 0.5
        ellipse = ((rows - cy) / ry) ** 2 + ((cols - cx) / rx) ** 2 <= 1.0
        mask[z] = ellipse & (volume.hu[z] > BOX_TISSUE_HU)
    labels, _ = ndimage.label(mask, structure=np.ones((3, 3, 3), bool))
    lesions: npt.NDArray[np.int32] = labels.astype(np.int32)
    return lesions


def read_voc_box(path: Path) -> tuple[int, int, int, int]:
    """The (first) bounding box of a PASCAL-VOC annotation: xmin, ymin, xmax, ymax."""
    box = ET.parse(path).getroot().find("object/bndbox")
    if box is None:
        raise ValueError(f"{path}: no object/bndbox")
    values = [box.findtext(k) for k in ("xmin", "ymin", "xmax", "ymax")]
    if any(v is None for v in values):
        raise ValueError(f"{path}: incomplete bndbox")
    x0, y0, x1, y1 = (int(float(str(v))) for v in values)
    return x0, y0, x1, y1


def load_a0002(root: Path, pre: Preprocessing) -> Case:
    """Lung-PET-CT-Dx A0002 with its tumour boxes (files named by SOP Instance UID)."""
    patient = next(root.rglob("A0002"))
    volume = build_volume(_one_series(patient / "series_B40f"))
    boxes = {p.stem: read_voc_box(p) for p in (patient / "annotations").glob("*.xml")}
    return _on_grid(volume, box_lesion(volume, boxes), [], "A0002", pre)


def load_cases(data_dir: Path, scratch: Path, pre: Preprocessing) -> list[Case]:
    """All four annotated patients, unpacked under ``scratch`` and put on the network's grid."""
    lidc = unpack(data_dir / LIDC_ARCHIVE, scratch)
    a0002 = unpack(data_dir / A0002_ARCHIVE, scratch)
    return [*load_lidc(lidc, pre), load_a0002(a0002, pre)]


# --- patches ----------------------------------------------------------------------------------

def crop(values: npt.NDArray[np.generic], centre: Sequence[int], channels: int, size: int,
         fill: float) -> FloatArray:
    """(channels, size, size) around ``centre`` (z, y, x): slices clamped at the volume's ends
    as :func:`model_input` does, ``fill`` outside the field of view (air for HU)."""
    half = channels // 2
    zs = np.clip(np.arange(centre[0] - half, centre[0] + half + 1), 0, values.shape[0] - 1)
    out = np.full((channels, size, size), fill, dtype=np.float32)
    y0, x0 = centre[1] - size // 2, centre[2] - size // 2
    ys, xs = max(0, y0), max(0, x0)
    ye, xe = min(values.shape[1], y0 + size), min(values.shape[2], x0 + size)
    out[:, ys - y0:ye - y0, xs - x0:xe - x0] = values[zs][:, ys:ye, xs:xe]
    return out


def insert_lesion(hu: FloatArray, spacing: Sequence[float], centre_yx: tuple[float, float],
                  rng: np.random.Generator) -> BoolArray:
    """Blend a synthetic lesion into a (channels, y, x) HU crop, in place; return its mask on
    the centre slice.

    Shape: an ellipsoid with semi-axes 2–20 mm (log-uniform mean radius, each axis ×0.75–1.25,
    in-plane rotation), sometimes with a second overlapping lobe. Density: solid to part-solid
    (−150…60 HU) with ±25 HU texture, blended into the lung through a soft edge (a sigmoid of
    the normalized radius), as partial volume blurs a real nodule's border.
    """
    c, h, w = hu.shape
    zz, yy, xx = np.meshgrid((np.arange(c) - c // 2) * spacing[0], np.arange(h) * spacing[1],
                             np.arange(w) * spacing[2], indexing="ij")
    radius = math.exp(rng.uniform(math.log(2.0), math.log(20.0)))
    alpha = np.zeros(hu.shape, dtype=np.float32)
    label = np.zeros(hu.shape, dtype=bool)
    lobes = 1 if rng.random() < 0.6 else 2
    for lobe in range(lobes):
        axes = radius * rng.uniform(0.75, 1.25, size=3) * (1.0 if lobe == 0 else 0.7)
        theta = rng.uniform(0, math.pi)
        offset = (rng.normal(0, radius / 2, size=2) if lobe else np.zeros(2))
        dy = yy - (centre_yx[0] * spacing[1] + offset[0])
        dx = xx - (centre_yx[1] * spacing[2] + offset[1])
        u = dy * math.cos(theta) + dx * math.sin(theta)
        v = -dy * math.sin(theta) + dx * math.cos(theta)
        d = np.sqrt((zz / axes[0]) ** 2 + (u / axes[1]) ** 2 + (v / axes[2]) ** 2)
        edge = rng.uniform(0.08, 0.25)
        alpha = np.maximum(alpha, expit((1.0 - d) / edge))
        label |= d <= 1.0
    target = rng.uniform(-150.0, 60.0) + rng.normal(0.0, 25.0, size=hu.shape)
    hu[:] = hu * (1.0 - alpha) + target * alpha
    centre: BoolArray = label[c // 2]
    return centre


def sample_batch(cases: Sequence[Case], pre: Preprocessing, size: int, n: int,
                 rng: np.random.Generator, sites: Sequence[Sites]
                 ) -> tuple[FloatArray, FloatArray]:
    """``n`` augmented (input, target) patches: (n, channels, size, size) and (n, 1, size, size)."""
    xs = np.empty((n, pre.channels, size, size), dtype=np.float32)
    ys = np.empty((n, 1, size, size), dtype=np.float32)
    half = pre.channels // 2
    for i in range(n):
        k = int(rng.integers(len(cases)))
        case, pools = cases[k], sites[k]
        kind = rng.random()
        synthetic = kind < REAL_SHARE + SYNTHETIC_SHARE and not (
            kind < REAL_SHARE and len(pools.lesion))
        pool = pools.synthetic if synthetic else (
            pools.lesion if kind < REAL_SHARE else pools.region)
        z, y, x = pool[int(rng.integers(len(pool)))]
        jitter = np.zeros(2, dtype=int) if synthetic else rng.integers(-size // 3, size // 3 + 1,
                                                                       size=2)
        centre = (int(z), int(y + jitter[0]), int(x + jitter[1]))
        hu = crop(case.grid.hu, centre, pre.channels, size, -1000.0)
        labels = crop(case.lesions, centre, pre.channels, size, 0.0)[half] > 0
        if synthetic:
            labels |= insert_lesion(hu, case.grid.spacing, (size / 2 - 0.5, size / 2 - 0.5), rng)
        hu = hu * rng.uniform(0.95, 1.05) + rng.uniform(-30.0, 30.0)
        hu += rng.normal(0.0, rng.uniform(0.0, 15.0), size=hu.shape).astype(np.float32)
        image, target = hu_to_unit(hu, pre), labels.astype(np.float32)[None]
        turns = int(rng.integers(4))
        image, target = np.rot90(image, turns, (1, 2)), np.rot90(target, turns, (1, 2))
        if rng.random() < 0.5:
            image, target = image[:, :, ::-1], target[:, :, ::-1]
        if rng.random() < 0.5:
            image = image[::-1]  # the network should not care which way the patient lies
        xs[i], ys[i] = image, target
    return xs, ys


@dataclass(frozen=True)
class Sites:
    """Voxel indices (N×3) a patch of each kind is centred on, listed once per case."""

    lesion: npt.NDArray[np.intp]
    synthetic: npt.NDArray[np.intp]
    region: npt.NDArray[np.intp]


def patch_sites(case: Case) -> Sites:
    """Real lesion voxels; lung voxels far enough from every real lesion to host a synthetic
    one; and the whole search region, for patches of whatever is there."""
    if case.n_lesions:
        distance = ndimage.distance_transform_edt(case.lesions == 0, sampling=case.grid.spacing)
        synthetic = case.lungs & (distance > SYNTHETIC_CLEARANCE_MM)
    else:
        synthetic = case.lungs
    return Sites(np.argwhere(case.lesions > 0), np.argwhere(synthetic), np.argwhere(case.region))


# --- training ---------------------------------------------------------------------------------

def train(cases: Sequence[Case], network_def: dict[str, Any], pre: Preprocessing,
          patch: int, cfg: TrainConfig, log: Callable[[str], None]) -> tuple[nn.Module, int]:
    """Train a fresh network on ``cases`` for ``cfg.minutes`` of CPU time; returns it and the
    number of iterations."""
    from monai.losses.dice import DiceCELoss

    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    net = build_network(network_def).to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    loss_fn = DiceCELoss(sigmoid=True, batch=True)
    sites = [patch_sites(c) for c in cases]
    # The budget is CPU time of this process: on a shared machine wall time says little about
    # how much training a network got. With one thread it is the compute spent.
    budget = cfg.minutes * 60.0
    start = time.process_time()
    it, running = 0, 0.0
    net.train()
    while (elapsed := time.process_time() - start) < budget:
        for group in opt.param_groups:  # cosine decay over the wall-clock budget
            group["lr"] = cfg.lr * 0.5 * (1.0 + math.cos(math.pi * elapsed / budget))
        x, y = sample_batch(cases, pre, patch, cfg.batch_size, rng, sites)
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(net(torch.from_numpy(x).to(device)), torch.from_numpy(y).to(device))
        loss.backward()
        opt.step()
        it += 1
        running = 0.98 * running + 0.02 * loss.item() if it > 1 else loss.item()
        if it % 100 == 0:
            log(f"  iter {it}: loss {running:.3f} ({elapsed / 60:.1f} CPU min)")
    net.eval()
    return net, it


# --- validation -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Scored:
    """One candidate on a validation scan: its probability and what it hit."""

    case: str
    probability: float
    lesion: int | None
    ignored: bool


def score_map(prob: FloatArray, case: Case, area: SearchArea, threshold: float,
              min_voxels: int) -> list[Scored]:
    """Candidates of a probability map of a whole validation scan, found in ``area`` and each
    matched to the lesions; probabilities are the network's raw peaks."""
    found = find_candidates(prob, threshold, region=area, min_voxels=min_voxels)
    spacing = np.asarray(case.grid.spacing)
    boxes = ndimage.find_objects(case.lesions)
    scored = []
    for cand in found:
        centre = np.asarray(cand.centre)
        hit = None
        for lesion, box in enumerate(boxes, start=1):
            if box is None:
                continue
            lo = np.array([s.start for s in box]) - HIT_MARGIN_MM / spacing
            hi = np.array([s.stop - 1 for s in box]) + HIT_MARGIN_MM / spacing
            if np.all(centre >= lo) and np.all(centre <= hi):
                hit = lesion
                break
        near_mark = any(np.linalg.norm((centre - np.asarray(m)) * spacing) <= SMALL_MARK_MM
                        for m in case.marks)
        scored.append(Scored(case.name, cand.probability, hit, hit is None and near_mark))
    return scored


def fit_platt(raw: npt.ArrayLike, hits: npt.ArrayLike) -> Calibration:
    """Platt scaling fitted to candidates' raw peak probabilities and whether each hit a lesion.

    Maximum likelihood of ``sigmoid(a · logit(p) + b)`` with Platt's (1999) smoothed targets
    ``(N₊ + 1) / (N₊ + 2)`` and ``1 / (N₋ + 2)`` instead of 1 and 0, which keeps the fit finite
    when few candidates are lesions; ``a`` is fitted on the log scale so it stays positive and
    the candidates' order is kept.

    Raises
    ------
    ValueError
        When there are no hits or no false positives to fit to.
    """
    y = np.asarray(hits, dtype=bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"Platt scaling needs hits and false positives, got {n_pos} and {n_neg}")
    target = np.where(y, (n_pos + 1.0) / (n_pos + 2.0), 1.0 / (n_neg + 2.0))
    z = Calibration(1.0, 0.0).logit(raw)

    def loss(theta: npt.NDArray[np.float64]) -> float:
        logit = math.exp(theta[0]) * z + theta[1]
        # log(1 + e^x) without overflow; cross-entropy against the smoothed targets.
        return float(np.mean(np.logaddexp(0.0, logit) - target * logit))

    fit = optimize.minimize(loss, np.zeros(2), method="Nelder-Mead",
                            options={"xatol": 1e-6, "fatol": 1e-10, "maxiter": 4000})
    return Calibration(a=math.exp(float(fit.x[0])), b=float(fit.x[1]))


def calibration_report(probability: npt.ArrayLike, hits: npt.ArrayLike) -> dict[str, float]:
    """How well candidate probabilities match how often candidates are lesions.

    Returns
    -------
    dict
        ``brier`` (mean squared error), ``log_loss``, ``ece`` (expected calibration error over
        :data:`CALIBRATION_BINS` equal-width bins), ``mean_probability`` beside ``hit_rate``
        (equal when calibrated on average), ``share_at_least_0.99`` (saturation) and ``n``.
    """
    p = np.asarray(probability, dtype=np.float64)
    y = np.asarray(hits, dtype=bool)
    q = np.clip(p, 1e-12, 1.0 - 1e-12)
    return {"n": float(len(p)), "brier": float(np.mean((p - y) ** 2)),
            "log_loss": float(-np.mean(np.where(y, np.log(q), np.log1p(-q)))),
            "ece": expected_calibration_error(np.stack([1.0 - p, p], axis=1), y.astype(int),
                                              n_bins=CALIBRATION_BINS),
            "mean_probability": float(p.mean()), "hit_rate": float(y.mean()),
            "share_at_least_0.99": float(np.mean(p >= 0.99))}


def counted(scored: Sequence[Scored]) -> list[Scored]:
    """Candidates that count for calibration: hits and false positives (not the ignored)."""
    return [s for s in scored if s.lesion is not None or not s.ignored]


def out_of_patient(scored: Sequence[Scored]) -> list[float]:
    """Each counted candidate's probability under a calibration fitted on the other patients'
    candidates (the honest check of a calibration fitted on so few patients)."""
    kept = counted(scored)
    out = []
    for s in kept:
        others = [o for o in kept if o.case != s.case]
        cal = fit_platt([o.probability for o in others], [o.lesion is not None for o in others])
        out.append(float(cal(s.probability)))
    return out


def froc(scored: Sequence[Scored], n_lesions: int, n_scans: int) -> list[dict[str, float]]:
    """Sensitivity and false positives per scan at every candidate probability threshold.

    Parameters
    ----------
    scored
        Candidates of all validation scans.
    n_lesions, n_scans
        Lesions and scans they were validated on.

    Returns
    -------
    list of dict
        ``threshold``, ``sensitivity``, ``fp_per_scan``, ``detected``, ``false_positives``;
        thresholds descending.
    """
    points = []
    for t in sorted({s.probability for s in scored}, reverse=True):
        above = [s for s in scored if s.probability >= t]
        detected = {(s.case, s.lesion) for s in above if s.lesion is not None}
        fps = sum(1 for s in above if s.lesion is None and not s.ignored)
        points.append({"threshold": t, "sensitivity": len(detected) / max(n_lesions, 1),
                       "fp_per_scan": fps / n_scans, "detected": float(len(detected)),
                       "false_positives": float(fps)})
    return points


def sensitivity_at(points: Sequence[dict[str, float]], fp_per_scan: float) -> float:
    """Best sensitivity with at most ``fp_per_scan`` false positives per scan (0 if none)."""
    ok = [p["sensitivity"] for p in points if p["fp_per_scan"] <= fp_per_scan]
    return max(ok, default=0.0)


def operating_threshold(points: Sequence[dict[str, float]], fp_per_scan: float,
                        floor: float) -> float:
    """Lowest threshold with at most ``fp_per_scan`` FP per scan (``floor`` when even the
    highest has more, or there are no candidates)."""
    ok = [p["threshold"] for p in points if p["fp_per_scan"] <= fp_per_scan]
    return min(ok, default=max((p["threshold"] for p in points), default=floor))


# --- commands ---------------------------------------------------------------------------------

def _read_bundle(out: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    metadata = json.loads((out / "configs" / "metadata.json").read_text(encoding="utf-8"))
    inference = json.loads((out / "configs" / "inference.json").read_text(encoding="utf-8"))
    return metadata, inference


def fold_maps(cases: Sequence[Case], network_def: dict[str, Any], pre: Preprocessing,
              patch: int, cfg: TrainConfig, cache: Path
              ) -> tuple[dict[str, tuple[FloatArray, int]], list[str]]:
    """Each case's probability map from a network trained on the other cases, and that
    network's iteration count; maps are kept in ``cache`` under a key of the recipe, so a
    later run with the same recipe reuses them instead of retraining. Also returns the
    names of the cases whose map came from the cache."""
    cache.mkdir(parents=True, exist_ok=True)
    maps = {}
    reused = []
    for held in cases:
        train_cases = [c for c in cases if c is not held]
        key = hashlib.sha256(json.dumps(
            {"network_def": network_def, "pre": [pre.spacing, pre.hu_window, pre.channels],
             "patch": patch, "cfg": vars(cfg), "train": [c.name for c in train_cases],
             "shares": [REAL_SHARE, SYNTHETIC_SHARE, SYNTHETIC_CLEARANCE_MM]},
            sort_keys=True).encode()).hexdigest()[:16]
        path = cache / f"{held.name}-{key}.npz"
        if path.exists():
            with np.load(path) as stored:
                maps[held.name] = (stored["prob"], int(stored["iterations"]))
            print(f"fold {held.name}: probability map from {path}", flush=True)
            reused.append(held.name)
            continue
        print(f"fold: validate on {held.name}, train on {[c.name for c in train_cases]}",
              flush=True)
        net, iters = train(train_cases, network_def, pre, patch, cfg,
                           lambda m: print(m, flush=True))
        device = next(net.parameters()).device
        prob = probability_map(net, model_input(held.grid.hu, pre), device=device)
        np.savez(path, prob=prob, iterations=iters)
        maps[held.name] = (prob, iters)
    return maps, reused


def _candidates_json(scored: Sequence[Scored], calibration: Calibration) -> list[dict[str, Any]]:
    # Unrounded: near 1 the calibrated value moves with the sixth decimal of the raw one.
    return [{"raw_probability": s.probability,
             "probability": round(float(calibration(s.probability)), 4),
             "lesion": s.lesion, "ignored": s.ignored} for s in scored]


def validate(cases: Sequence[Case], maps: dict[str, tuple[FloatArray, int]],
             cand_t: float, min_vox: int) -> tuple[dict[str, Any], Calibration]:
    """Score the fold maps, fit the calibration, and summarise before/after.

    "Before" is close to the search of the bundle's first release, which kept a region
    whose centroid lay in the lungs dilated by :data:`SAMPLING_MARGIN_MM`: here its peak and
    most voxels must lie there, with no lung-base rule, and probabilities are the raw peaks.
    Both are scored on the same maps, so they differ only in where candidates are looked for
    and how they are scored.
    """
    scored: list[Scored] = []
    before: list[Scored] = []
    folds: list[dict[str, Any]] = []
    for case in cases:
        prob, iters = maps[case.name]
        result = score_map(prob, case, case.search, cand_t, min_vox)
        dilated = SearchArea(inside=case.region, below_bases=np.zeros_like(case.region),
                             soft_tissue=case.search.soft_tissue)
        old = score_map(prob, case, dilated, cand_t, min_vox)
        scored.extend(result)
        before.extend(old)
        folds.append({"validation": case.name, "lesions": case.n_lesions, "iterations": iters,
                      "candidates_before": len(old), "scored": result})
        print(f"  {case.name}: {len(result)} candidates ({len(old)} in the dilated lungs), "
              f"lesions hit {sorted({s.lesion for s in result if s.lesion})}", flush=True)
    kept = counted(scored)
    hits = [s.lesion is not None for s in kept]
    calibration = fit_platt([s.probability for s in kept], hits)
    calibrated_scored = [Scored(s.case, float(calibration(s.probability)), s.lesion, s.ignored)
                         for s in scored]
    n_lesions = sum(c.n_lesions for c in cases)
    points = froc(calibrated_scored, n_lesions, len(cases))
    raw_points = froc(scored, n_lesions, len(cases))
    old_points = froc(before, n_lesions, len(cases))
    old_kept = counted(before)
    summary: dict[str, Any] = {
        "protocol": "leave-one-patient-out over 4 patients; lesion hit = candidate centre in "
                    f"lesion bounding box + {HIT_MARGIN_MM:g} mm",
        "search": "peak and >= 50 % of voxels in each lung closed per slice (15 mm); <= 50 % "
                  "of its soft-tissue voxels (> -500 HU) with no aerated lung beneath",
        "lesions": n_lesions, "scans": len(cases),
        "sensitivity_at_fp_per_scan": {str(f): sensitivity_at(points, f) for f in FP_LEVELS},
        "calibration": {"method": "platt", "a": calibration.a, "b": calibration.b,
                        "fitted_on": f"{len(kept)} validation candidates ({sum(hits)} hits)"},
        "calibration_check": {
            "before_raw_dilated_search": calibration_report(
                [s.probability for s in old_kept], [s.lesion is not None for s in old_kept]),
            "raw": calibration_report([s.probability for s in kept], hits),
            "platt_in_sample": calibration_report([float(calibration(s.probability))
                                                   for s in kept], hits),
            "platt_out_of_patient": calibration_report(out_of_patient(scored), hits)},
        "before": {"search": "lungs dilated by 15 mm (peak and >= 50 % of voxels inside), no "
                             "lung-base rule; raw probabilities",
                   "candidates": len(before),
                   "false_positives_per_scan_all": sum(1 for s in old_kept if s.lesion is None)
                   / len(cases),
                   "sensitivity_at_fp_per_scan": {str(f): sensitivity_at(old_points, f)
                                                  for f in FP_LEVELS}},
        "froc": points, "froc_raw": raw_points,
        "folds": [{**{k: v for k, v in f.items() if k != "scored"},
                   "candidates": _candidates_json(f["scored"], calibration)} for f in folds],
    }
    print(json.dumps({k: v for k, v in summary.items() if k not in ("froc", "froc_raw",
                                                                   "folds")}, indent=1),
          flush=True)
    return summary, calibration


def _validation_setup(args: argparse.Namespace) -> tuple[Path, dict[str, Any], dict[str, Any],
                                                          list[Case], Preprocessing, int]:
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    metadata, inference = _read_bundle(out)
    block = metadata["dicom_ai"]
    pre = Preprocessing.from_block(block["preprocessing"])
    patch = int(block["preprocessing"]["patch_size"][0])
    cases = load_cases(Path(args.data), Path(args.scratch), pre)
    for c in cases:
        print(f"{c.name}: grid {c.grid.hu.shape} at {c.grid.spacing} mm, {c.n_lesions} lesion(s),"
              f" {int((c.lesions > 0).sum())} lesion voxels, {len(c.marks)} small marks",
              flush=True)
    return out, metadata, inference, cases, pre, patch


def _write_validation(out: Path, summary: dict[str, Any], calibration: Calibration) -> None:
    (out / "docs").mkdir(parents=True, exist_ok=True)
    (out / "docs" / "validation.json").write_text(json.dumps(summary, indent=2) + "\n",
                                                  encoding="utf-8")
    metadata, _ = _read_bundle(out)
    metadata["dicom_ai"]["calibration"] = {"method": "platt", "a": round(calibration.a, 6),
                                           "b": round(calibration.b, 6)}
    (out / "configs" / "metadata.json").write_text(json.dumps(metadata, indent=2) + "\n",
                                                   encoding="utf-8")
    set_operating_point(out, TARGET_FP_PER_SCAN)


def _recipe(args: argparse.Namespace, cfg: TrainConfig, patch: int,
            t0: float) -> dict[str, Any]:
    return {"fold_minutes": args.fold_minutes, "threads": args.threads,
            "batch_size": cfg.batch_size, "patch": patch, "lr": cfg.lr, "seed": args.seed,
            "real_share": REAL_SHARE, "synthetic_share": SYNTHETIC_SHARE,
            "synthetic_clearance_mm": SYNTHETIC_CLEARANCE_MM,
            "wall_minutes": round((time.monotonic() - t0) / 60.0, 1),
            "device": "cuda" if torch.cuda.is_available() else "cpu"}


def command_validate(args: argparse.Namespace) -> tuple[dict[str, Any], Calibration]:
    """Leave-one-patient-out validation and calibration; writes docs/validation.json, the
    calibration and the operating point (the shipped network is not touched)."""
    t0 = time.monotonic()
    out, metadata, inference, cases, pre, patch = _validation_setup(args)
    thresholds = metadata["dicom_ai"]["thresholds"]
    cfg = TrainConfig(minutes=args.fold_minutes, seed=args.seed)
    maps, reused = fold_maps(cases, inference["network_def"], pre, patch, cfg,
                             Path(args.scratch) / "folds")
    summary, calibration = validate(cases, maps, float(thresholds["candidate"]),
                                    int(thresholds["min_voxels"]))
    previous = out / "docs" / "validation.json"
    earlier = json.loads(previous.read_text(encoding="utf-8")) if previous.exists() else {}
    summary["recipe"] = _recipe(args, cfg, patch, t0)
    if reused:
        # Wall time of the run that trained the folds, not of this re-scoring.
        summary["recipe"]["wall_minutes"] = earlier.get("recipe", {}).get("wall_minutes")
        summary["recipe"]["fold_maps_reused"] = reused
    summary["final"] = earlier.get("final")
    _write_validation(out, summary, calibration)
    return summary, calibration


def command_train(args: argparse.Namespace) -> int:
    """Leave-one-patient-out validation, then the final network on all patients."""
    t0 = time.monotonic()
    summary, calibration = command_validate(args)
    out, _, inference, cases, pre, patch = _validation_setup(args)
    final_cfg = TrainConfig(minutes=args.final_minutes, seed=args.seed)
    print("final network on all patients", flush=True)
    net, iters = train(cases, inference["network_def"], pre, patch, final_cfg,
                       lambda m: print(m, flush=True))
    (out / "models").mkdir(parents=True, exist_ok=True)
    torch.save({k: v.cpu() for k, v in net.state_dict().items()}, out / "models" / "model.pt")
    summary["final"] = {"iterations": iters, "minutes": args.final_minutes}
    summary["recipe"]["wall_minutes"] = round((time.monotonic() - t0) / 60.0, 1)
    _write_validation(out, summary, calibration)
    return 0


def set_operating_point(out: Path, fp_per_scan: float) -> float:
    """Choose ``thresholds.positive`` from the validation FROC (on the calibrated scale) at
    ``fp_per_scan``; record it in ``docs/validation.json`` and ``configs/metadata.json``."""
    validation_path = out / "docs" / "validation.json"
    summary = json.loads(validation_path.read_text(encoding="utf-8"))
    metadata, _ = _read_bundle(out)
    thresholds = metadata["dicom_ai"]["thresholds"]
    positive = operating_threshold(summary["froc"], fp_per_scan, float(thresholds["candidate"]))
    at_op = [p for p in summary["froc"] if p["threshold"] >= positive]
    summary["operating_fp_per_scan"] = fp_per_scan
    summary["operating_threshold"] = positive
    summary["operating_point"] = at_op[-1] if at_op else None
    validation_path.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    thresholds["positive"] = round(positive, 6)
    (out / "configs" / "metadata.json").write_text(json.dumps(metadata, indent=2) + "\n",
                                                   encoding="utf-8")
    return positive


def command_measure(args: argparse.Namespace) -> int:
    """Wall time and peak memory of the product's ct-lung analysis on one CT series."""
    from dicom_ai.inference.bundle import load_bundle, select_device
    from dicom_ai.inference.ct_lung import analyse_ct

    torch.set_num_threads(args.threads)
    bundle = load_bundle(Path(args.out), device=select_device("auto"))
    series = _one_series(Path(args.series))
    start = time.monotonic()
    result, _ = analyse_ct(bundle, series, datetime.now().astimezone(),
                           InferenceSettings(num_threads=args.threads))
    wall = time.monotonic() - start
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    print(json.dumps({"status": result.status, "reason": result.reason,
                      "findings": [f.to_json() for f in result.findings],
                      "wall_s": round(wall, 2), "peak_rss_mb": round(peak_mb),
                      "threads": args.threads, "device": str(bundle.device)}, indent=2))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``train`` (validate and train) or ``measure SERIES_DIR``."""
    parser = argparse.ArgumentParser(prog="ct_nodules", description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="models/ct-lung", help="the ct-lung bundle directory")
    parser.add_argument("--threads", type=int, default=1)
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="leave-one-patient-out validation, then the final model")
    v = sub.add_parser("validate", help="leave-one-patient-out validation and calibration only")
    for p in (t, v):
        p.add_argument("--data", default="../shared/data/ct")
        p.add_argument("--scratch", default="/tmp/dicom-ai-ct",
                       help="where the archives are unpacked and the fold maps kept "
                            "(outside the repository)")
        p.add_argument("--fold-minutes", type=float, default=3.5)
        p.add_argument("--seed", type=int, default=0)
    t.add_argument("--final-minutes", type=float, default=6.0)
    m = sub.add_parser("measure", help="wall time and peak memory on one CT series")
    m.add_argument("series", help="folder holding one CT series")
    o = sub.add_parser("operating-point",
                       help="set thresholds.positive from docs/validation.json")
    o.add_argument("--fp-per-scan", type=float, default=TARGET_FP_PER_SCAN)
    args = parser.parse_args(argv)
    if args.command == "operating-point":
        print(f"positive threshold: {set_operating_point(Path(args.out), args.fp_per_scan):.6g}")
        return 0
    if args.command == "validate":
        command_validate(args)
        return 0
    return command_train(args) if args.command == "train" else command_measure(args)


if __name__ == "__main__":
    raise SystemExit(main())
