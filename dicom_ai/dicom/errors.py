"""Typed errors for DICOM input that cannot be used.

Every error carries a one-line, patient-free ``reason`` that ends up in ``replay-summary.json``,
in log lines and in C-STORE failure comments. Messages never include patient name, ID or birth
date.
"""

from __future__ import annotations

from pathlib import Path


class DicomInputError(Exception):
    """Base class: an input file or series that cannot be processed.

    Parameters
    ----------
    reason:
        One line saying what is wrong, free of patient identity.
    path:
        The file concerned, when there is one.
    """

    def __init__(self, reason: str, *, path: Path | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.path = path

    def __str__(self) -> str:
        return self.reason if self.path is None else f"{self.path.name}: {self.reason}"


class UnreadableFileError(DicomInputError):
    """The file is not DICOM, or its header cannot be parsed (truncated, bad VRs, no meta)."""


class MissingAttributeError(DicomInputError):
    """A Type 1 attribute needed for processing is absent or empty."""


class PixelDecodeError(DicomInputError):
    """The pixel data cannot be decoded (unsupported transfer syntax, corrupt or short data)."""


class ContentMismatchError(DicomInputError):
    """The pixels decode, but the picture is not the kind the model reads (a grey film stored
    as a colour photograph, a fundus photograph labelled as dermoscopy): the model's result is
    rejected with the reason, as for an image unlike its training data; the file is not
    failed."""


class SeriesGeometryError(DicomInputError):
    """A series cannot be turned into a consistent volume (duplicates, gaps, tilt, mixed sizes)."""
