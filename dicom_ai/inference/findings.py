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


@dataclass(frozen=True)
class Finding:
    """One entry of ``findings`` in ``findings.json`` and one measurement group in the SR.

    Classification findings carry ``probability`` and ``positive``; quantitative measurements
    carry ``value`` and ``unit`` (UCUM); localized candidates add ``center_mm`` / ``extent_mm``
    (patient coordinates, LPS, millimetres) and the SOP Instance UIDs of the ``slices`` they lie on.
    """

    label: str
    probability: float | None = None
    positive: bool | None = None
    value: float | None = None
    unit: str | None = None
    center_mm: tuple[float, float, float] | None = None
    extent_mm: tuple[float, float, float] | None = None
    slices: tuple[str, ...] = ()

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

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "series_instance_uid": self.series.series_instance_uid,
            "model": {"name": self.model.name, "version": self.model.version},
            "status": self.status,
        }
        if self.reason is not None:
            out["reason"] = self.reason
        out["findings"] = [f.to_json() for f in self.findings]
        out["outputs"] = list(self.outputs)
        return out
