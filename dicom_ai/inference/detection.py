"""The ``detection`` task: MONAI detection bundles (RetinaNet) → nodule/mass candidates.

A MONAI Model Zoo detection bundle such as ``lung_nodule_ct_detection`` is used as it ships:
its ``configs/inference.json`` builds the network (``network_def``), the
``RetinaNetDetector`` (``detector``, with its ``anchor_generator``) and runs ``detector_ops``
(box selection thresholds, sliding-window inferer) — with the network the bundle loader already
built and filled with ``models/model.pt``. What its ``preprocessing`` transforms would do to a
NIfTI/MHD file is done here to the DICOM series' HU volume:

* ``Orientationd`` → the array is permuted/flipped so its axes run along ``axcodes`` (RAS for the
  Model Zoo bundle);
* ``Spacingd`` → resampled to ``pixdim`` (x, y, z of the oriented array). The Model Zoo bundle
  marks this transform ``_disabled_`` because its own inputs were resampled beforehand; a DICOM
  series was not, so ``pixdim`` is always applied;
* ``ScaleIntensityRanged`` → HU ``[a_min, a_max]`` onto ``[b_min, b_max]`` (clipped if ``clip``).

Boxes come back in the oriented array's voxel coordinates, MONAI ``xyzxyz`` mode, whose max
corner is one past the last voxel (a box over voxels i…j spans [i, j + 1]). They are mapped back
to the resampled grid and through :class:`~dicom_ai.imaging.ct.CTVolume` to patient LPS
millimetres, then reported as the ``ct-lung`` candidates are (:mod:`dicom_ai.inference.ct_lung`):
``nodule`` or ``mass`` by size, probability = the box score, the slices they cover and a key
slice with the box marked. ``docs/detection-bundles.md`` says what is supported.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from dicom_ai.config import InferenceSettings
from dicom_ai.dicom.model import Series
from dicom_ai.imaging.ct import CTVolume, resample
from dicom_ai.imaging.lung import segment_lungs
from dicom_ai.inference.bundle import Bundle, BundleError
from dicom_ai.inference.ct_lung import (
    Candidate,
    analyse_ct_series,
    candidate_finding,
    key_slice_explanation,
    not_chest_reason,
    shown_candidates,
)
from dicom_ai.inference.findings import Explanation, Finding, ModelResult

FloatArray = npt.NDArray[np.float32]

#: Unit vector in LPS of the direction each orientation letter names.
_LETTERS = {"L": (1.0, 0.0, 0.0), "R": (-1.0, 0.0, 0.0), "P": (0.0, 1.0, 0.0),
            "A": (0.0, -1.0, 0.0), "S": (0.0, 0.0, 1.0), "I": (0.0, 0.0, -1.0)}
#: Reporting defaults for a bundle without our ``dicom_ai.thresholds`` (Model Zoo bundles).
DEFAULT_THRESHOLDS = {"candidate": 0.0, "positive": 0.5, "max_candidates": 10}


@dataclass(frozen=True)
class Orientation:
    """How the oriented array is taken from the (z, y, x) grid of a CT volume.

    Output axis ``i`` is grid axis ``axes[i]``, reversed when ``flips[i]``.
    """

    axes: tuple[int, int, int]
    flips: tuple[bool, bool, bool]

    def apply(self, grid: npt.NDArray[np.floating]) -> FloatArray:
        """The grid array as the detector's oriented array."""
        out = np.transpose(grid, self.axes)
        flip_axes = tuple(i for i, f in enumerate(self.flips) if f)
        oriented: FloatArray = np.ascontiguousarray(np.flip(out, flip_axes) if flip_axes
                                                    else out, dtype=np.float32)
        return oriented

    def to_grid(self, index: npt.ArrayLike, grid_shape: Sequence[int]) -> npt.NDArray[np.float64]:
        """Voxel index (fractional allowed) of the oriented array → (z, y, x) grid index."""
        o = np.asarray(index, dtype=np.float64)
        g = np.empty(3, dtype=np.float64)
        for i, (axis, flip) in enumerate(zip(self.axes, self.flips, strict=True)):
            g[axis] = grid_shape[axis] - 1 - o[i] if flip else o[i]
        return g


def orientation(direction: npt.ArrayLike, axcodes: str) -> Orientation:
    """The grid axes that run closest to the directions ``axcodes`` names (e.g. ``"RAS"``).

    Parameters
    ----------
    direction
        3×3 direction cosines of the volume (columns: x, y, z array axes in LPS).
    axcodes
        Three letters from L/R, P/A, S/I, one per output axis, naming where its index grows.

    Returns
    -------
    Orientation
        The permutation maximizing the alignment (as MONAI's ``Orientationd`` picks for an
        oblique image) and the flips.
    """
    codes = axcodes.upper()
    if len(codes) != 3 or any(c not in _LETTERS for c in codes) or \
            len({"LRPASI".index(c) // 2 for c in codes}) != 3:
        raise ValueError(f"axcodes must name three different axes (e.g. 'RAS'), got {axcodes!r}")
    d = np.asarray(direction, dtype=np.float64)
    # Grid axis a = (z, y, x)[a] runs along direction column 2 - a.
    dots = np.array([[float(d[:, 2 - a] @ np.asarray(_LETTERS[c])) for a in range(3)]
                     for c in codes])
    best = max(itertools.permutations(range(3)),
               key=lambda p: sum(abs(dots[i, p[i]]) for i in range(3)))
    return Orientation(axes=(best[0], best[1], best[2]),
                       flips=(bool(dots[0, best[0]] < 0), bool(dots[1, best[1]] < 0),
                              bool(dots[2, best[2]] < 0)))


@dataclass(frozen=True)
class DetectionInput:
    """What a detection bundle's ``preprocessing`` transforms ask of the input image."""

    axcodes: str
    #: Voxel size (mm) along the oriented axes, None to keep the series' own.
    pixdim: tuple[float, float, float] | None
    a_min: float
    a_max: float
    b_min: float
    b_max: float
    clip: bool

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> DetectionInput:
        """Read ``preprocessing.transforms`` of a MONAI ``inference.json``.

        Raises
        ------
        BundleError
            Without a ``ScaleIntensityRanged`` transform (the intensity mapping cannot be
            guessed).
        """
        transforms = config.get("preprocessing", {}).get("transforms", [])
        by_name: dict[str, Mapping[str, Any]] = {}
        for t in transforms:
            if isinstance(t, Mapping) and isinstance(t.get("_target_"), str):
                by_name.setdefault(t["_target_"].rsplit(".", 1)[-1], t)
        scale = by_name.get("ScaleIntensityRanged")
        if scale is None:
            raise BundleError("detection bundle: preprocessing has no ScaleIntensityRanged, so "
                              "the HU mapping of its inputs is unknown")
        spacing = by_name.get("Spacingd", {}).get("pixdim")
        pixdim = None if spacing is None else (float(spacing[0]), float(spacing[1]),
                                               float(spacing[2]))
        return cls(axcodes=str(by_name.get("Orientationd", {}).get("axcodes", "RAS")),
                   pixdim=pixdim, a_min=float(scale["a_min"]), a_max=float(scale["a_max"]),
                   b_min=float(scale.get("b_min", 0.0)), b_max=float(scale.get("b_max", 1.0)),
                   clip=bool(scale.get("clip", False)))

    def scale(self, hu: FloatArray) -> FloatArray:
        """``ScaleIntensityRanged``: HU → the network's intensity range."""
        unit = (hu - self.a_min) / (self.a_max - self.a_min)
        if self.clip:
            unit = np.clip(unit, 0.0, 1.0)
        out: FloatArray = (unit * (self.b_max - self.b_min) + self.b_min).astype(np.float32)
        return out


def box_to_candidate(box: Sequence[float], score: float, orient: Orientation,
                     grid_shape: Sequence[int]) -> Candidate:
    """A MONAI ``xyzxyz`` box of the oriented array as a :class:`Candidate` on the grid.

    The box covers voxels ``box[:3]`` … ``box[3:] − 1``; its centre is the middle of that
    range. The grid box is the whole-voxel hull of the mapped corners, clipped to the grid.
    """
    lo_o = np.asarray(box[:3], dtype=np.float64)
    hi_o = np.asarray(box[3:], dtype=np.float64) - 1.0
    a, b = orient.to_grid(lo_o, grid_shape), orient.to_grid(hi_o, grid_shape)
    centre = orient.to_grid((lo_o + hi_o) / 2.0, grid_shape)
    top = np.asarray(grid_shape) - 1
    lo = np.clip(np.floor(np.minimum(a, b)), 0, top).astype(int)
    hi = np.clip(np.ceil(np.maximum(a, b)), 0, top).astype(int)
    return Candidate(probability=float(score),
                     lo=(int(lo[0]), int(lo[1]), int(lo[2])),
                     hi=(int(hi[0]), int(hi[1]), int(hi[2])),
                     centre=(float(centre[0]), float(centre[1]), float(centre[2])))


def build_detector(bundle: Bundle) -> Any:
    """The bundle's ``RetinaNetDetector`` around its loaded network, ``detector_ops`` applied."""
    from monai.bundle.config_parser import ConfigParser

    config = bundle.inference_config
    if "detector" not in config:
        raise BundleError(f"{bundle.name}: configs/inference.json has no 'detector'")
    parser = ConfigParser(copy.deepcopy(config))
    # The loader built the network and loaded its weights: the detector must wrap that one.
    parser["network"] = bundle.network
    parser["device"] = bundle.device
    try:
        detector = parser.get_parsed_content("detector")
        if "detector_ops" in config:
            parser.get_parsed_content("detector_ops")
    except (RuntimeError, KeyError, TypeError, ValueError, AttributeError, ImportError) as exc:
        raise BundleError(f"{bundle.name}: cannot build its detector: "
                          f"{str(exc).splitlines()[0]}") from exc
    detector.eval()
    return detector


def detect(bundle: Bundle, detector: Any, grid: CTVolume, orient: Orientation,
           prep: DetectionInput, amp: bool) -> list[Candidate]:
    """Run the detector on the resampled volume; candidates on the grid, best first."""
    image = torch.from_numpy(prep.scale(orient.apply(grid.hu)))[None].to(bundle.device)
    autocast = torch.autocast("cuda", dtype=torch.float16) if amp and \
        bundle.device.type == "cuda" else torch.autocast("cpu", enabled=False)
    with torch.inference_mode(), autocast:
        out = detector([image], use_inferer=getattr(detector, "inferer", None) is not None)[0]
    boxes = out[detector.target_box_key].float().cpu().numpy()
    scores = out[detector.pred_score_key].float().cpu().numpy()
    found = [box_to_candidate(b, float(s), orient, grid.hu.shape)
             for b, s in zip(boxes, scores, strict=True)]
    return sorted(found, key=lambda c: -c.probability)


def grid_spacing(volume: CTVolume, orient: Orientation,
                 pixdim: tuple[float, float, float] | None) -> tuple[float, float, float]:
    """(z, y, x) spacing of the grid whose oriented axes have voxel size ``pixdim``."""
    if pixdim is None:
        return volume.spacing
    spacing = [0.0, 0.0, 0.0]
    for i, axis in enumerate(orient.axes):
        spacing[axis] = pixdim[i]
    return spacing[0], spacing[1], spacing[2]


def analyse_boxes(bundle: Bundle, volume: CTVolume, settings: InferenceSettings
                  ) -> tuple[str | None, list[Finding], list[Explanation]]:
    """Candidates of a detection bundle on a CT volume, or why the volume is not analysed."""
    reason = not_chest_reason(segment_lungs(volume.hu, volume.spacing, volume.direction))
    if reason is not None:
        return reason, [], []
    prep = DetectionInput.from_config(bundle.inference_config)
    orient = orientation(volume.direction, prep.axcodes)
    grid = resample(volume, grid_spacing(volume, orient, prep.pixdim))
    candidates = detect(bundle, build_detector(bundle), grid, orient, prep, settings.amp)
    thresholds = {**DEFAULT_THRESHOLDS, **bundle.dicom_ai.get("thresholds", {})}
    kept = [c for c in candidates if c.probability >= float(thresholds["candidate"])]
    kept = kept[:int(thresholds["max_candidates"])]
    pairs = [(c, candidate_finding(c, grid, float(thresholds["positive"]))) for c in kept]
    explanations = [key_slice_explanation(c, f, volume, grid, None)
                    for c, f in shown_candidates(pairs)]
    return None, [f for _, f in pairs], explanations


def analyse_detection(bundle: Bundle, series: Series, started: datetime,
                      settings: InferenceSettings) -> tuple[ModelResult, dict[str, str]]:
    """Run a MONAI detection bundle on a CT series.

    Parameters
    ----------
    bundle
        A loaded bundle whose task is ``"detection"`` (a RetinaNet ``network_def`` and a
        ``detector`` in ``configs/inference.json``).
    series
        The CT series.
    started
        When the study's processing began.
    settings
        Mixed precision (CUDA only).

    Returns
    -------
    tuple
        The result (candidates, or ``rejected`` with a reason) and the files that could not be
        used.
    """
    return analyse_ct_series(bundle, series, started,
                             lambda volume: analyse_boxes(bundle, volume, settings))


__all__ = ["DetectionInput", "Orientation", "analyse_boxes", "analyse_detection",
           "box_to_candidate", "build_detector", "detect", "grid_spacing", "orientation"]
