"""Find DICOM files under a folder and group them into studies and series.

Every input file gets a :class:`FileEntry` saying what became of it, so a replay can account
for each file it was given. Grouping keeps instances without pixel data (SR, RT objects,
waveforms, presentation states): which series a model analyses is the pipeline's decision.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from dicom_ai.dicom.errors import UnreadableFileError
from dicom_ai.dicom.io import is_dicomdir, read_header
from dicom_ai.dicom.model import Instance, Series, Study
from dicom_ai.dicom.uid import is_valid_uid
from dicom_ai.logs import log_failure, safe_error_text

log = logging.getLogger(__name__)

#: What became of a file. "processed" is set by the pipeline once a model has analysed it.
Status = Literal["ok", "skipped", "failed", "processed"]

#: Groups a dataset without file meta can start with: (0002) file meta, (0008) identification.
_FIRST_GROUPS = (0x0002, 0x0008)

_REQUIRED_UIDS = (
    ("StudyInstanceUID", "(0020,000D)"),
    ("SeriesInstanceUID", "(0020,000E)"),
    ("SOPInstanceUID", "(0008,0018)"),
)


@dataclass(frozen=True)
class FileEntry:
    """What happened to one input file.

    Attributes
    ----------
    path:
        The file, as given or as found under the folder given.
    status:
        ``"ok"`` (grouped into a study), ``"skipped"`` (not for us: not DICOM, a DICOMDIR, a
        duplicate) or ``"failed"`` (DICOM we could not use); ``"processed"`` is the pipeline's.
    reason:
        One patient-free line for skipped and failed files, else None.
    """

    path: Path
    status: Status
    reason: str | None = None
    study_instance_uid: str | None = None
    series_instance_uid: str | None = None
    sop_instance_uid: str | None = None

    def to_json(self) -> dict[str, Any]:
        """The file's record in ``replay-summary.json``."""
        return {"path": str(self.path), "status": self.status, "reason": self.reason,
                "study_instance_uid": self.study_instance_uid}


@dataclass
class Collection:
    """The studies found and one entry per input file, in discovery order."""

    studies: list[Study] = field(default_factory=list)
    entries: list[FileEntry] = field(default_factory=list)


def looks_like_dicom(path: Path) -> bool:
    """Whether the first bytes of ``path`` are those of a DICOM file.

    True for the ``DICM`` marker after a 128-byte preamble, and for a bare dataset whose first
    tag is in group 0002 or 0008 in either byte order (objects written without preamble).

    Parameters
    ----------
    path:
        A regular file.

    Returns
    -------
    bool
        False also when the file cannot be opened.
    """
    try:
        with path.open("rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    if head[128:132] == b"DICM":
        return True
    if len(head) < 8:
        return False
    little = int.from_bytes(head[0:2], "little")
    big = int.from_bytes(head[0:2], "big")
    return little in _FIRST_GROUPS or big in _FIRST_GROUPS


def discover(folder: Path) -> list[Path]:
    """Files under ``folder`` (recursively) that look like DICOM by their content.

    Hidden files and folders (names starting with ``.``) are skipped; file extensions are
    ignored, since PACS exports often have none.

    Parameters
    ----------
    folder:
        The folder to search.

    Returns
    -------
    list of Path
        Sorted by path, so every run sees the files in the same order.
    """
    return [p for p in _walk(folder) if looks_like_dicom(p)]


def collect(source: Path | Iterable[Path]) -> Collection:
    """Read the headers of a folder's (or a list of) files and group them into studies.

    Parameters
    ----------
    source:
        A folder (searched recursively, as :func:`discover` does), a single file, or files.

    Returns
    -------
    Collection
        Studies with their series in order of first appearance, and one :class:`FileEntry`
        per non-hidden input file: non-DICOM files, DICOMDIRs and repeated SOP Instance UIDs
        are ``"skipped"``; missing or unreadable files and files lacking a Study, Series or
        SOP Instance UID, or with one that is not a valid UID, are ``"failed"``. Of several
        copies of one SOP Instance UID the first complete one is kept: a copy cut short (in
        its header or its pixel data) is ``"failed"`` as truncated.
    """
    if isinstance(source, Path):
        paths = _walk(source) if source.is_dir() else [source]
    else:
        paths = list(source)
    collection = Collection()
    studies: dict[str, Study] = {}
    series_by_uid: dict[str, Series] = {}
    seen: set[str] = set()
    for path in paths:
        try:
            entry, instance = _classify(path, seen)
        except Exception as exc:  # one file's surprise must not end the collection
            log_failure(log, f"{path.name}: reading the header failed", exc)
            entry, instance = FileEntry(path, "failed",
                                        f"internal error: {safe_error_text(exc)}"), None
        collection.entries.append(entry)
        if instance is None:
            continue
        seen.add(instance.SOPInstanceUID)
        study_uid = str(instance.header.StudyInstanceUID)
        series_uid = str(instance.header.SeriesInstanceUID)
        study = studies.get(study_uid)
        if study is None:
            study = studies[study_uid] = Study(study_uid)
            collection.studies.append(study)
        series = series_by_uid.get(series_uid)
        if series is None:
            series = series_by_uid[series_uid] = Series(series_uid)
            study.series.append(series)
        series.instances.append(instance)
    return collection


def _classify(path: Path, seen: set[str]) -> tuple[FileEntry, Instance | None]:
    if not path.is_file():
        return FileEntry(path, "failed", "no such file"), None
    if not looks_like_dicom(path):
        return FileEntry(path, "skipped", "not a DICOM file"), None
    try:
        header = read_header(path)
    except UnreadableFileError as exc:
        return FileEntry(path, "failed", exc.reason), None
    uids = {keyword: str(header.get(keyword, "") or "").strip() for keyword, _ in _REQUIRED_UIDS}
    # Only valid UIDs are reported: an invalid one may be patient text in the wrong element.
    known = {
        field: value if is_valid_uid(value) else None
        for field, value in (("study_instance_uid", uids["StudyInstanceUID"]),
                             ("series_instance_uid", uids["SeriesInstanceUID"]),
                             ("sop_instance_uid", uids["SOPInstanceUID"]))
    }
    if is_dicomdir(header):
        return FileEntry(path, "skipped", "DICOMDIR: a media directory, not an image",
                         **known), None
    missing = [f"{keyword} {tag}" for keyword, tag in _REQUIRED_UIDS if not uids[keyword]]
    if missing:
        return FileEntry(path, "failed", "missing " + ", ".join(missing), **known), None
    invalid = [f"{keyword} {tag}" for keyword, tag in _REQUIRED_UIDS
               if not is_valid_uid(uids[keyword])]
    if invalid:
        # These UIDs name folders and files downstream: "../../x" or "/etc" must never get
        # that far.
        return FileEntry(path, "failed", "not a valid UID (PS3.5 9.1): " + ", ".join(invalid),
                         **known), None
    if uids["SOPInstanceUID"] in seen:
        return FileEntry(path, "skipped", "duplicate SOP Instance UID", **known), None
    return FileEntry(path, "ok", None, **known), Instance(path, header)


def _walk(folder: Path) -> list[Path]:
    found: list[Path] = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found.extend(Path(root) / name for name in files if not name.startswith("."))
    return sorted(p for p in found if p.is_file())


__all__ = ["Collection", "FileEntry", "Status", "collect", "discover", "looks_like_dicom"]
