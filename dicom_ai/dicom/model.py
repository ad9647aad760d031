"""In-memory model of what was received or found on disk: instances, series and studies.

Headers are read without pixel data; pixels are decoded on demand by
:func:`dicom_ai.dicom.pixels.decode`, so grouping a large study stays cheap.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from pydicom.dataset import Dataset


@dataclass(frozen=True)
class Instance:
    """One readable DICOM instance: where it is and its header (pixel data not loaded)."""

    path: Path
    header: Dataset

    @property
    def SOPInstanceUID(self) -> str:
        return str(self.header.SOPInstanceUID)

    @property
    def SOPClassUID(self) -> str:
        return str(self.header.SOPClassUID)


@dataclass
class Series:
    """The instances of one Series Instance UID, in arrival/discovery order."""

    series_instance_uid: str
    instances: list[Instance] = field(default_factory=list)

    @property
    def header(self) -> Dataset:
        """Header of the first instance, for series-level attributes."""
        return self.instances[0].header

    @property
    def modality(self) -> str:
        return str(self.header.get("Modality", "")).upper()

    @property
    def study_instance_uid(self) -> str:
        return str(self.header.StudyInstanceUID)


@dataclass
class Study:
    """The series of one Study Instance UID."""

    study_instance_uid: str
    series: list[Series] = field(default_factory=list)

    @property
    def instances(self) -> list[Instance]:
        return [i for s in self.series for i in s.instances]
