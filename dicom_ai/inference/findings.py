"""What a model says about a series: typed findings and per-model results.

These types are the contract between inference and everything downstream (``findings.json``,
the TID 1500 SR, the Secondary Captures, the service). They hold no patient identity.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from dicom_ai.dicom.model import Instance, Series

Status = Literal["ok", "rejected"]


@dataclass(frozen=True)
class ModelInfo:
    """Identity of the algorithm that produced a result.

    ``device_uid`` changes whenever the weights change (it is derived from their hash), so a
    retrained model is a different observer device in the SR.
    """

    name: str
    version: str
    device_uid: str
    manufacturer: str = "dicom-ai"

    @property
    def label(self) -> str:
        """``<name> <version>``, as tables, logs, descriptions and the SR's model name show it."""
        return f"{self.name} {self.version}"

    def to_json(self) -> dict[str, str]:
        """The ``findings.json`` form: name and version."""
        return {"name": self.name, "version": self.version}


#: A finding site as ``(code value, coding scheme designator, code meaning)``.
SiteCode = tuple[str, str, str]
#: A box ``(col_min, row_min, col_max, row_max)`` in an image's stored pixel grid.
BoxPx = tuple[float, float, float, float]


@dataclass(frozen=True)
class CandidateMask:
    """Where a localized CT candidate lies, per source slice, for the DICOM Segmentation.

    ``pixels[k]`` is the candidate's mask on the source slice whose SOP Instance UID is
    ``slices[k]``, in that slice's stored pixel grid (Rows × Columns).
    """

    slices: tuple[str, ...]
    pixels: npt.NDArray[np.bool_]

    def __post_init__(self) -> None:
        if self.pixels.ndim != 3 or self.pixels.shape[0] != len(self.slices):
            raise ValueError(f"a mask needs one Rows × Columns plane per slice, got shape "
                             f"{self.pixels.shape} for {len(self.slices)} slices")


@dataclass(frozen=True)
class Finding:
    """One entry of ``findings`` in ``findings.json`` and one measurement group in the SR.

    Classification findings carry ``probability`` and ``positive``, and ``operating_point``,
    the threshold ``positive`` was decided at (``probability >= operating_point``);
    quantitative measurements carry ``value`` and ``unit`` (UCUM); localized CT candidates add
    ``center_mm`` / ``extent_mm`` (patient coordinates, LPS, millimetres) and the SOP Instance
    UIDs of the ``slices`` they lie on.

    ``image_uid`` names the image the finding was found on (the image that spoke for an
    image-level score, the image a box lies on, a CT candidate's key slice); ``bbox_px`` is a
    box ``(col_min, row_min, col_max, row_max)`` on that image in its stored pixel grid, in
    continuous coordinates as DICOM SCOORD uses them: (0, 0) is the top-left corner of the first
    pixel, so a box over whole pixels c0..c1, r0..r1 is ``(c0, r0, c1 + 1, r1 + 1)``. ``site``
    overrides the bundle's finding site for this finding; ``mask`` (CT candidates) is what the
    DICOM Segmentation is made of and is not part of ``findings.json``.
    """

    label: str
    probability: float | None = None
    positive: bool | None = None
    value: float | None = None
    unit: str | None = None
    center_mm: tuple[float, float, float] | None = None
    extent_mm: tuple[float, float, float] | None = None
    slices: tuple[str, ...] = ()
    operating_point: float | None = None
    image_uid: str | None = None
    bbox_px: BoxPx | None = None
    site: SiteCode | None = None
    mask: CandidateMask | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.bbox_px is not None:
            c0, r0, c1, r1 = self.bbox_px
            if not (c0 < c1 and r0 < r1):
                raise ValueError(f"bbox_px must be (col_min, row_min, col_max, row_max) with "
                                 f"min < max, got {self.bbox_px}")
            if self.image_uid is None:
                raise ValueError("a finding with bbox_px must name its image (image_uid)")

    @property
    def localized(self) -> bool:
        """Whether the finding has a place of its own (a box or a 3D position)."""
        return self.bbox_px is not None or self.center_mm is not None

    @property
    def below_operating_point(self) -> bool:
        """A localized candidate the model scored below its operating point: reported as such,
        never as an "absent" finding."""
        return self.localized and self.positive is False

    def to_json(self) -> dict[str, Any]:
        """The ``findings.json`` form: only the keys that apply to this kind of finding."""
        out: dict[str, Any] = {"label": self.label}
        if self.probability is not None:
            out["probability"] = round(float(self.probability), 6)
        if self.positive is not None:
            out["positive"] = bool(self.positive)
        if self.value is not None:
            out["value"] = round(float(self.value), 4)
            if self.unit is not None:
                out["unit"] = self.unit
        if self.center_mm is not None:
            out["center_mm"] = [round(float(v), 2) for v in self.center_mm]
        if self.extent_mm is not None:
            out["extent_mm"] = [round(float(v), 2) for v in self.extent_mm]
        if self.operating_point is not None:
            out["operating_point"] = round(float(self.operating_point), 6)
        if self.image_uid is not None:
            out["image_uid"] = self.image_uid
        if self.bbox_px is not None:
            out["bbox_px"] = [round(float(v), 1) for v in self.bbox_px]
        if self.site is not None:
            out["site"] = dict(zip(("value", "scheme", "meaning"), self.site, strict=True))
        if self.slices:
            out["slices"] = list(self.slices)
        return out


@dataclass(frozen=True)
class Explanation:
    """A picture for a Secondary Capture: the analysed image with a heatmap over it.

    ``image`` is what the model looked at, for display (H×W grey or H×W×3 RGB, uint8) at the
    source image's aspect ratio; ``heatmap`` is in [0, 1] with the same H×W; ``markers`` are
    boxes (row0, col0, row1, col1) in ``image`` pixels for localized candidates.
    """

    source: Instance
    image: npt.NDArray[np.uint8]
    heatmap: npt.NDArray[np.float32] | None
    caption: str
    markers: tuple[tuple[int, int, int, int], ...] = ()


@dataclass
class ModelResult:
    """The outcome of one model on one series: findings, or a stated rejection."""

    series: Series
    model: ModelInfo
    status: Status
    started: datetime
    findings: list[Finding] = field(default_factory=list)
    explanations: list[Explanation] = field(default_factory=list)
    reason: str | None = None
    outputs: list[str] = field(default_factory=list)

    @classmethod
    def rejected(cls, series: Series, model: ModelInfo, started: datetime,
                 reason: str) -> ModelResult:
        """The model did not judge ``series``, for ``reason`` (said in the SR and the log)."""
        return cls(series=series, model=model, status="rejected", started=started,
                   reason=reason)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "series_instance_uid": self.series.series_instance_uid,
            "model": self.model.to_json(),
            "status": self.status,
        }
        if self.reason is not None:
            out["reason"] = self.reason
        out["findings"] = [f.to_json() for f in self.findings]
        out["outputs"] = list(self.outputs)
        return out
