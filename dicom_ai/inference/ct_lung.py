"""The ``ct-lung`` task: chest CT → lung measurements and nodule/mass candidates.

Per series: HU volume (:func:`dicom_ai.imaging.ct.build_volume`) → is it a usable chest CT
(header rules of the bundle, then the image: enough lung-density air inside the body) → lung
segmentation and measurements (:mod:`dicom_ai.imaging.lung`; on a thin-slice series over every
k-th slice, at most the network's slice spacing apart: :func:`segmentation_view`) → the bundle's
2.5D network over
every axial slice of the volume resampled to the bundle's spacing → a probability map → 3D
connected components that lie in the lungs (:class:`SearchArea`: the peak and most voxels in
each lung closed per slice, their soft tissue not mostly below the lung bases) → each candidate's
peak probability calibrated (:class:`Calibration`, fitted on the leave-one-patient-out
validation candidates) → candidates with a 3D centre and extent in patient coordinates, the
source slices they lie on, and a key-slice picture for each.

The network reads ``channels`` neighbouring slices (centre slice in the middle) of the
resampled volume, with HU clipped to a window and scaled to [0, 1]; training
(:mod:`dicom_ai.train.ct_nodules`) calls :func:`model_input` and :func:`probability_map` so
that it sees exactly what inference sees.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from scipy import ndimage

from dicom_ai.config import InferenceSettings
from dicom_ai.dicom.errors import SeriesGeometryError
from dicom_ai.dicom.model import Series
from dicom_ai.imaging.ct import CTVolume, build_volume, resample
from dicom_ai.imaging.lung import (
    BODY_THRESHOLD_HU,
    LungMasks,
    below_lung_bases,
    lung_fraction,
    lung_window,
    measure_lungs,
    search_region,
    segment_lungs,
)
from dicom_ai.inference.bundle import Bundle, BundleError
from dicom_ai.inference.findings import Explanation, Finding, ModelResult
from dicom_ai.inference.placement import candidate_masks, in_plane_box

FloatArray = npt.NDArray[np.float32]
BoolArray = npt.NDArray[np.bool_]
ScalarT = TypeVar("ScalarT", bound=np.generic)

#: Standard size boundary (Fleischner glossary): a lesion over 30 mm is a mass, else a nodule.
MASS_DIAMETER_MM = 30.0
#: Below this share of the body volume in lung a series is not a chest CT (a chest through the
#: lungs has about 0.15–0.5; the head CT of the test corpus 0.01).
MIN_LUNG_FRACTION = 0.05
#: A candidate's peak and at least this share of its voxels must lie in the search region
#: (:func:`dicom_ai.imaging.lung.search_region`): a juxtapleural mass may bulge into the chest
#: wall by a little, a region over the diaphragm or the heart lies mostly outside.
MIN_INSIDE_SHARE = 0.5
#: A candidate with more than this share of its soft-tissue voxels (above −500 HU) having no
#: aerated lung beneath (:func:`dicom_ai.imaging.lung.below_lung_bases`) is the diaphragm or
#: liver dome. Only its soft tissue counts: on thick slices a region over the dome also takes
#: in partial-volume lung above it, which would dilute an all-voxel share.
MAX_BELOW_BASES_SHARE = 0.5
#: Raw peak probabilities are clipped this far from 0 and 1 before the logit of
#: :class:`Calibration`: float32 sigmoid outputs reach exactly 1.0.
RAW_EPS = 1e-7
#: Network input spatial sides must be multiples of this (four 2× poolings of a U-Net).
SIZE_MULTIPLE = 16
#: Largest batch of slices on the CPU: the shipped 2.5D U-Net on 240² slices ran no faster at
#: 16 than at 4 on 2 cores (3 images/s each), and 16 held 440 MB more activations — the peak of
#: a 1,000-slice CT (``benchmarks/inference_throughput.py``).
CPU_MAX_BATCH = 4


@dataclass(frozen=True)
class Preprocessing:
    """The ``dicom_ai.preprocessing`` block of a ct-lung bundle.

    Attributes
    ----------
    spacing:
        (z, y, x) mm the network reads.
    hu_window:
        (low, high) HU mapped onto [0, 1], clipped outside.
    channels:
        Number of neighbouring slices per input (odd; the centre slice is predicted).
    """

    spacing: tuple[float, float, float]
    hu_window: tuple[float, float]
    channels: int

    @classmethod
    def from_block(cls, block: Mapping[str, Any]) -> Preprocessing:
        """Read the bundle's ``preprocessing`` block."""
        s = [float(v) for v in block["spacing"]]
        w = [float(v) for v in block["hu_window"]]
        channels = int(block.get("channels", 3))
        if len(s) != 3 or len(w) != 2 or channels % 2 == 0:
            raise ValueError("preprocessing needs spacing [z, y, x], hu_window [low, high] and "
                             "an odd number of channels")
        return cls((s[0], s[1], s[2]), (w[0], w[1]), channels)


@dataclass(frozen=True)
class Calibration:
    """Platt scaling of a candidate's peak probability: ``sigmoid(a · logit(p) + b)``.

    The network's peak probabilities crowd at 1.0 (a segmentation network is trained per
    voxel, not per candidate); the two parameters are fitted on the leave-one-patient-out
    validation candidates (:mod:`dicom_ai.train.ct_nodules`) so that the reported probability
    is the observed chance that such a candidate is a lesion.

    Attributes
    ----------
    a, b:
        Slope (> 0, so the order of candidates is kept) and intercept on the logit scale.
    """

    a: float
    b: float

    @classmethod
    def from_block(cls, block: object) -> Calibration:
        """Read the bundle's ``calibration`` block (``{"method": "platt", "a": …, "b": …}``).

        Raises
        ------
        ValueError
            The block is missing, of another method, or its parameters are not finite with
            ``a > 0``.
        """
        if not isinstance(block, Mapping):
            raise ValueError("a ct-lung bundle needs a 'calibration' block "
                             "({\"method\": \"platt\", \"a\": ..., \"b\": ...})")
        if block.get("method") != "platt":
            raise ValueError(f"calibration.method must be 'platt', got {block.get('method')!r}")
        try:
            a, b = float(block["a"]), float(block["b"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError("calibration needs numbers 'a' and 'b'") from exc
        if not (np.isfinite(a) and np.isfinite(b) and a > 0):
            raise ValueError(f"calibration needs finite a > 0 and b, got a={a}, b={b}")
        return cls(a, b)

    def logit(self, raw: npt.ArrayLike) -> npt.NDArray[np.float64]:
        """Calibrated logit of raw peak probabilities."""
        p = np.clip(np.asarray(raw, dtype=np.float64), RAW_EPS, 1.0 - RAW_EPS)
        out: npt.NDArray[np.float64] = self.a * np.log(p / (1.0 - p)) + self.b
        return out

    def __call__(self, raw: npt.ArrayLike) -> npt.NDArray[np.float64]:
        """Calibrated probabilities of raw peak probabilities."""
        out: npt.NDArray[np.float64] = 1.0 / (1.0 + np.exp(-self.logit(raw)))
        return out


@dataclass(frozen=True)
class SearchArea:
    """Where a candidate may lie, on the network's grid.

    Attributes
    ----------
    inside:
        Each lung closed per slice (:func:`dicom_ai.imaging.lung.search_region`).
    below_bases:
        Soft tissue with no aerated lung beneath (:func:`dicom_ai.imaging.lung.below_lung_bases`).
    soft_tissue:
        Voxels above :data:`dicom_ai.imaging.lung.BODY_THRESHOLD_HU`.
    """

    inside: BoolArray
    below_bases: BoolArray
    soft_tissue: BoolArray


@dataclass(frozen=True)
class Candidate:
    """A connected region of the probability map, in voxel indices of the map's grid.

    Attributes
    ----------
    probability:
        Highest probability inside the region.
    lo, hi:
        Inclusive bounding box corners (z, y, x).
    centre:
        Probability-weighted centroid (z, y, x), fractional.
    """

    probability: float
    lo: tuple[int, int, int]
    hi: tuple[int, int, int]
    centre: tuple[float, float, float]


def hu_to_unit(hu: npt.NDArray[np.floating], pre: Preprocessing) -> FloatArray:
    """HU clipped to ``pre.hu_window`` and scaled to [0, 1] (float32)."""
    low, high = pre.hu_window
    unit: FloatArray = np.clip((np.asarray(hu, dtype=np.float32) - low) / (high - low),
                               0.0, 1.0).astype(np.float32, copy=False)
    return unit


def model_input(hu: npt.NDArray[np.floating], pre: Preprocessing) -> FloatArray:
    """HU volume (already on the network's grid) → (z, channels, y, x) network inputs.

    Each slice k gets slices k − c//2 … k + c//2 (edge slices repeated at the ends), HU
    clipped to ``pre.hu_window`` and scaled to [0, 1].

    Parameters
    ----------
    hu
        (z, y, x) volume in HU on the network's grid.
    pre
        Preprocessing of the bundle.

    Returns
    -------
    numpy.ndarray
        float32 (z, channels, y, x).
    """
    unit = hu_to_unit(hu, pre)
    half = pre.channels // 2
    idx = np.clip(np.arange(unit.shape[0])[:, None] + np.arange(-half, half + 1)[None, :],
                  0, unit.shape[0] - 1)
    stacked: FloatArray = unit[idx].astype(np.float32, copy=False)
    return stacked


def probability_map(network: torch.nn.Module, inputs: FloatArray, *, device: torch.device,
                    batch_size: int = 8, amp: bool = True) -> FloatArray:
    """Run a 2D segmentation network slice by slice; sigmoid of its single output channel.

    Parameters
    ----------
    network
        Maps (N, channels, H, W) to (N, 1, H, W) logits; sides padded to multiples of 16.
    inputs
        (z, channels, y, x) from :func:`model_input`.
    device, batch_size, amp
        Where and how to run; float16 autocast is used on CUDA only.

    Returns
    -------
    numpy.ndarray
        float32 (z, y, x) probabilities in [0, 1].
    """
    z, _, h, w = inputs.shape
    ph, pw = (-h) % SIZE_MULTIPLE, (-w) % SIZE_MULTIPLE
    out = np.empty((z, h, w), dtype=np.float32)
    autocast = torch.autocast("cuda", dtype=torch.float16) if amp and device.type == "cuda" \
        else torch.autocast("cpu", enabled=False)
    with torch.inference_mode(), autocast:
        for start in range(0, z, batch_size):
            x = torch.from_numpy(inputs[start:start + batch_size]).to(device)
            x = F.pad(x, (0, pw, 0, ph))
            logits = network(x)[:, 0, :h, :w]
            out[start:start + batch_size] = torch.sigmoid(logits.float()).cpu().numpy()
    return out


def _peaks_and_centres(prob: FloatArray, labels: npt.NDArray[np.integer], n: int
                       ) -> tuple[npt.NDArray[np.float64], list[tuple[int, ...]],
                                  npt.NDArray[np.float64]]:
    """Per label 1…n: the highest probability, its voxel (the first in raster order where
    several share it: float32 sigmoids reach exactly 1.0) and the probability-weighted centroid
    (n × 3).

    Over the labelled voxels only: ``scipy.ndimage.maximum_position`` sorts the whole volume,
    which was most of the candidate search.
    """
    flat = np.flatnonzero(labels)
    lab = labels.ravel()[flat]
    p = prob.ravel()[flat].astype(np.float64)
    peaks = np.full(n + 1, -np.inf)
    np.maximum.at(peaks, lab, p)
    at_peak = np.flatnonzero(p == peaks[lab])
    _, first = np.unique(lab[at_peak], return_index=True)
    peak_at = [tuple(int(v) for v in np.unravel_index(flat[at_peak[i]], prob.shape))
               for i in first]
    weight = np.bincount(lab, weights=p, minlength=n + 1)[1:]
    coords = np.unravel_index(flat, prob.shape)
    centres = np.stack([np.bincount(lab, weights=p * c, minlength=n + 1)[1:] for c in coords],
                       axis=1) / weight[:, None]
    return peaks[1:], peak_at, centres


def find_candidates(prob: FloatArray, threshold: float, *,
                    region: SearchArea | None = None, min_voxels: int = 1) -> list[Candidate]:
    """Connected regions of ``prob >= threshold`` that lie in ``region``.

    Parameters
    ----------
    prob
        (z, y, x) probability map.
    threshold
        Level at which regions are formed.
    region
        A region is kept when its peak voxel and at least :data:`MIN_INSIDE_SHARE` of its voxels
        are ``region.inside`` and at most :data:`MAX_BELOW_BASES_SHARE` of its
        ``region.soft_tissue`` voxels are ``region.below_bases``; everywhere if None.
    min_voxels
        Smaller regions are dropped as noise.

    Returns
    -------
    list of Candidate
        Highest probability first.
    """
    labels, n = ndimage.label(prob >= threshold, structure=np.ones((3, 3, 3), dtype=bool))
    if n == 0:
        return []
    peaks, peak_at, centres = _peaks_and_centres(prob, labels, n)
    boxes = ndimage.find_objects(labels)
    sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    if region is not None:
        inside = np.bincount(labels[region.inside], minlength=n + 1)[1:] / np.maximum(sizes, 1)
        tissue = np.bincount(labels[region.soft_tissue], minlength=n + 1)[1:]
        below = np.bincount(labels[region.below_bases & region.soft_tissue],
                            minlength=n + 1)[1:] / np.maximum(tissue, 1)
    found: list[Candidate] = []
    for k, (peak, at, centre, box, size) in enumerate(
            zip(peaks, peak_at, centres, boxes, sizes, strict=True)):
        if size < min_voxels or box is None:
            continue
        if region is not None and not (region.inside[tuple(int(v) for v in at)]
                                       and inside[k] >= MIN_INSIDE_SHARE
                                       and below[k] <= MAX_BELOW_BASES_SHARE):
            continue
        c = tuple(float(v) for v in centre)
        found.append(Candidate(
            probability=float(peak),
            lo=(box[0].start, box[1].start, box[2].start),
            hi=(box[0].stop - 1, box[1].stop - 1, box[2].stop - 1),
            centre=(c[0], c[1], c[2])))
    return sorted(found, key=lambda k: -k.probability)


def extent_mm(lo: Sequence[float], hi: Sequence[float], spacing: Sequence[float],
              direction: npt.ArrayLike) -> tuple[float, float, float]:
    """Size of an index bounding box along the patient axes (x, y, z), mm.

    The box's sides, ``(hi − lo + 1) · spacing`` along the array axes, are rotated into LPS with
    the direction cosines; for oblique slices this is the extent of the rotated box.
    """
    sides_zyx = (np.asarray(hi, dtype=np.float64) - np.asarray(lo, dtype=np.float64) + 1.0) \
        * np.asarray(spacing, dtype=np.float64)
    sides_xyz = np.abs(np.asarray(direction, dtype=np.float64)) @ sides_zyx[::-1]
    return float(sides_xyz[0]), float(sides_xyz[1]), float(sides_xyz[2])


def lesion_label(diameter_mm: float) -> str:
    """``"mass"`` when the longest diameter exceeds 30 mm, else ``"nodule"``."""
    return "mass" if diameter_mm > MASS_DIAMETER_MM else "nodule"


def in_plane_diameter_mm(candidate: Candidate, spacing: Sequence[float]) -> float:
    """Longest in-plane side of the candidate's box, mm: radiologists measure lesions on axial
    slices, and the craniocaudal extent of a thick-slice series is coarse."""
    return max((candidate.hi[a] - candidate.lo[a] + 1) * float(spacing[a]) for a in (1, 2))


def nearest_on_grid(values: npt.NDArray[ScalarT], volume: CTVolume, grid: CTVolume
                    ) -> npt.NDArray[ScalarT]:
    """An array on ``volume``'s voxels (a mask, labels) sampled, nearest voxel, on ``grid``.

    ``grid`` is a resampling of ``volume`` (:func:`dicom_ai.imaging.ct.resample`): both share
    origin and direction, so grid index ``i`` lies at volume index
    ``i · grid.spacing / volume.spacing``.
    """
    step = np.asarray(grid.spacing) / np.asarray(volume.spacing)
    idx = [np.clip(np.rint(np.arange(n) * s).astype(int), 0, m - 1)
           for n, s, m in zip(grid.hu.shape, step, volume.hu.shape, strict=True)]
    return values[np.ix_(*idx)]


def segmentation_view(volume: CTVolume, max_spacing_mm: float) -> CTVolume:
    """Every k-th slice of ``volume`` (a view of its array, no copy), k the largest whole
    number that keeps the slices at most ``max_spacing_mm`` apart; ``volume`` itself when its
    slices are more than half that apart already.

    Parameters
    ----------
    volume
        The source volume.
    max_spacing_mm
        Largest distance between the slices of the view (the network's z spacing).

    Returns
    -------
    CTVolume
        Same origin and direction; spacing ``k ·`` the source's along z; every k-th instance.
    """
    k = max(1, int(np.floor(max_spacing_mm / volume.spacing[0] + 1e-6)))
    if k == 1:
        return volume
    return CTVolume(volume.hu[::k], (volume.spacing[0] * k, volume.spacing[1], volume.spacing[2]),
                    volume.origin, volume.direction, volume.instances[::k])


def search_area(masks: LungMasks, volume: CTVolume, grid: CTVolume) -> SearchArea:
    """The :class:`SearchArea` of a segmented volume, on the network's grid (computed on the
    source voxels, where the lung border is sharpest, then sampled)."""
    inside = search_region(masks, volume.spacing)
    below = below_lung_bases(volume.hu, masks, volume.direction)
    return SearchArea(inside=nearest_on_grid(inside, volume, grid),
                      below_bases=nearest_on_grid(below, volume, grid),
                      soft_tissue=nearest_on_grid(volume.hu > BODY_THRESHOLD_HU, volume, grid))


def calibrated(candidates: Sequence[Candidate], calibration: Calibration) -> list[Candidate]:
    """``candidates`` with their peak probability replaced by the calibrated one."""
    return [replace(c, probability=float(calibration(c.probability))) for c in candidates]


def validate_block(name: str, block: Mapping[str, Any]) -> None:
    """Refuse, when the bundle loads, a ct-lung block that analysis could not use.

    Raises
    ------
    BundleError
        The preprocessing, the thresholds (``candidate`` and ``positive`` in [0, 1]) or the
        :class:`Calibration` is missing or invalid.
    """
    try:
        Preprocessing.from_block(block["preprocessing"])
        Calibration.from_block(block.get("calibration"))
        thresholds = block["thresholds"]
        for key in ("candidate", "positive"):
            value = float(thresholds[key])
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"thresholds.{key} must lie in [0, 1], got {value}")
    except (KeyError, TypeError, ValueError) as exc:
        reason = f"missing {exc}" if isinstance(exc, KeyError) else str(exc)
        raise BundleError(f"{name}: ct-lung block unusable: {reason}") from exc


def not_chest_reason(masks: LungMasks) -> str | None:
    """Why a segmented volume is not a chest CT (too little lung inside the body), or None."""
    fraction = lung_fraction(masks)
    if fraction >= MIN_LUNG_FRACTION:
        return None
    return (f"not a chest CT: lung-density air is {100 * fraction:.1f} % of the body volume "
            f"(a chest CT through the lungs has at least {100 * MIN_LUNG_FRACTION:.0f} %)")


def shown_candidates(pairs: Sequence[tuple[Candidate, Finding]]
                     ) -> list[tuple[Candidate, Finding]]:
    """Candidates that get a key-slice picture: every positive one, else the most probable."""
    return [(c, f) for c, f in pairs if f.positive] or list(pairs[:1])


def measurement_findings(masks: LungMasks, volume: CTVolume) -> list[Finding]:
    """The four lung measurements as findings (labels and UCUM units of ``findings.json``)."""
    m = measure_lungs(volume.hu, masks, volume.spacing)
    return [
        Finding(label="lung_volume_left_ml", value=m.volume_left_ml, unit="mL"),
        Finding(label="lung_volume_right_ml", value=m.volume_right_ml, unit="mL"),
        Finding(label="mean_lung_density_hu", value=m.mean_density_hu, unit="[hnsf'U]"),
        Finding(label="laa950_percent", value=m.laa950_percent, unit="%"),
    ]


def candidate_finding(candidate: Candidate, grid: CTVolume, threshold: float) -> Finding:
    """A candidate on the network's grid as a ``nodule``/``mass`` finding in patient space."""
    centre = grid.index_to_patient(candidate.centre)
    extent = extent_mm(candidate.lo, candidate.hi, grid.spacing, grid.direction)
    uids: list[str] = []
    for z in range(candidate.lo[0], candidate.hi[0] + 1):
        uid = grid.instance_at(z).SOPInstanceUID
        if uid not in uids:
            uids.append(uid)
    key = grid.instance_at(candidate.centre[0])
    return Finding(label=lesion_label(in_plane_diameter_mm(candidate, grid.spacing)),
                    probability=candidate.probability,
                   positive=candidate.probability >= threshold, operating_point=threshold,
                   center_mm=(float(centre[0]), float(centre[1]), float(centre[2])),
                   extent_mm=extent, slices=tuple(uids), image_uid=key.SOPInstanceUID,
                   bbox_px=in_plane_box(candidate.lo, candidate.hi, grid.spacing, key.header))


def key_slice_explanation(candidate: Candidate, finding: Finding, volume: CTVolume,
                          grid: CTVolume, prob: FloatArray | None) -> Explanation:
    """The source slice through the candidate's centre, lung-windowed, with the probability
    map (when the model makes one) over it and the candidate's box marked."""
    source = grid.instance_at(candidate.centre[0])
    k = next(i for i, inst in enumerate(volume.instances)
             if inst.SOPInstanceUID == source.SOPInstanceUID)
    image = lung_window(volume.hu[k])
    heatmap = None
    if prob is not None:
        heat = torch.from_numpy(np.ascontiguousarray(prob[round(candidate.centre[0])]))
        heatmap = np.clip(F.interpolate(heat[None, None], size=image.shape, mode="bilinear",
                                        align_corners=True)[0, 0].numpy(), 0.0, 1.0
                          ).astype(np.float32)
    ry = grid.spacing[1] / volume.spacing[1]
    rx = grid.spacing[2] / volume.spacing[2]
    h, w = image.shape
    marker = (int(np.clip(np.floor(candidate.lo[1] * ry), 0, h - 1)),
              int(np.clip(np.floor(candidate.lo[2] * rx), 0, w - 1)),
              int(np.clip(np.ceil(candidate.hi[1] * ry), 0, h - 1)),
              int(np.clip(np.ceil(candidate.hi[2] * rx), 0, w - 1)))
    size = max(finding.extent_mm or (0.0,))
    caption = (f"{finding.label}: p={candidate.probability:.2f} "
               f"{'POSITIVE' if finding.positive else 'below threshold'}, about {size:.0f} mm")
    return Explanation(source=source, image=image, heatmap=heatmap, caption=caption,
                       markers=(marker,))


def analyse_volume(bundle: Bundle, volume: CTVolume, settings: InferenceSettings
                   ) -> tuple[str | None, list[Finding], list[Explanation]]:
    """Measurements and candidates for a CT volume; a rejection reason instead when the
    volume is not a chest CT the model can judge."""
    block = bundle.dicom_ai
    pre = Preprocessing.from_block(block["preprocessing"])
    max_spacing = bundle.accepts.max_slice_thickness_mm
    if max_spacing is not None and volume.spacing[0] > max_spacing * 1.01:
        return (f"slices are {volume.spacing[0]:.2f} mm apart, over the model's limit of "
                f"{max_spacing:g} mm", [], [])
    # The lungs are segmented on slices as far apart as the network reads them: on a thin-slice
    # series the full-resolution segmentation needs ~15 bytes per voxel (two 3D labellings),
    # which for 1,000 slices of 512² is 4 GB on top of the volume.
    coarse = segmentation_view(volume, pre.spacing[0])
    masks = segment_lungs(coarse.hu, coarse.spacing, coarse.direction)
    reason = not_chest_reason(masks)
    if reason is not None:
        return reason, [], []
    findings = measurement_findings(masks, coarse)
    grid = resample(volume, pre.spacing)
    batch = settings.batch_size if bundle.device.type == "cuda" \
        else min(settings.batch_size, CPU_MAX_BATCH)
    prob = probability_map(bundle.network, model_input(grid.hu, pre), device=bundle.device,
                           batch_size=batch, amp=settings.amp)
    thresholds = block["thresholds"]
    candidates = find_candidates(prob, float(thresholds["candidate"]),
                                 region=search_area(masks, coarse, grid),
                                 min_voxels=int(thresholds.get("min_voxels", 1)))
    candidates = calibrated(candidates[:int(thresholds.get("max_candidates", 10))],
                            Calibration.from_block(block.get("calibration")))
    positive_at = float(thresholds["positive"])
    pairs = [(c, candidate_finding(c, grid, positive_at)) for c in candidates]
    masks_of = candidate_masks(prob, float(thresholds["candidate"]),
                               [(c.lo, c.hi) for c in candidates], volume, grid)
    pairs = [(c, replace(f, mask=m)) for (c, f), m in zip(pairs, masks_of, strict=True)]
    findings.extend(f for _, f in pairs)
    explanations = [key_slice_explanation(c, f, volume, grid, prob)
                    for c, f in shown_candidates(pairs)]
    return None, findings, explanations


VolumeAnalysis = Callable[[CTVolume], tuple[str | None, list[Finding], list[Explanation]]]


def analyse_ct_series(bundle: Bundle, series: Series, started: datetime,
                      analyse: VolumeAnalysis) -> tuple[ModelResult, dict[str, str]]:
    """The frame shared by the CT tasks: the HU volume, then ``analyse`` (which returns a
    rejection reason, or findings and explanations). The bundle's header rules were already
    applied by :func:`dicom_ai.pipeline.analyse_series`."""
    try:
        volume = build_volume(series)
    except SeriesGeometryError as exc:
        failed = {str(exc.path): exc.reason} if exc.path is not None else {}
        return ModelResult.rejected(series, bundle.info, started,
                                    f"not one regular CT volume: {exc.reason}"), \
            failed
    reason, findings, explanations = analyse(volume)
    if reason is not None:
        return ModelResult.rejected(series, bundle.info, started, reason), {}
    return ModelResult(series=series, model=bundle.info, status="ok", started=started,
                       findings=findings, explanations=explanations), {}


def analyse_ct(bundle: Bundle, series: Series, started: datetime,
               settings: InferenceSettings) -> tuple[ModelResult, dict[str, str]]:
    """Run a ``ct-lung`` bundle on a CT series.

    Parameters
    ----------
    bundle
        A loaded bundle whose ``dicom_ai.task`` is ``"ct-lung"``.
    series
        The CT series.
    started
        When the study's processing began (for the SR's dates).
    settings
        Batch size and mixed precision.

    Returns
    -------
    tuple
        The result (``ok`` with measurements and candidates, or ``rejected`` with a reason)
        and the files that could not be used (path → reason; a CT series is used whole, so a
        slice with broken geometry rejects the series and is listed here).
    """
    return analyse_ct_series(bundle, series, started,
                             lambda volume: analyse_volume(bundle, volume, settings))


__all__ = ["Calibration", "Candidate", "Preprocessing", "SearchArea", "VolumeAnalysis",
           "analyse_ct", "analyse_ct_series", "analyse_volume", "calibrated", "candidate_finding",
           "extent_mm", "find_candidates", "hu_to_unit", "in_plane_diameter_mm",
           "key_slice_explanation", "lesion_label", "measurement_findings", "model_input",
           "nearest_on_grid", "not_chest_reason", "probability_map", "search_area",
           "segmentation_view", "shown_candidates", "validate_block"]
