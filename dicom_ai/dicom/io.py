"""Safe reading of DICOM files: one typed error with a one-line reason for anything unusable.

pydicom is lenient on purpose: it reads a truncated file without complaint, keeps an
unparseable number as a string, and warns on stderr. Here those cases become
:class:`~dicom_ai.dicom.errors.UnreadableFileError` with a reason fit for
``replay-summary.json`` and a C-STORE failure comment, and warnings are captured instead of
printed. Reasons never carry element values, so no patient identity can leak through them.
"""

from __future__ import annotations

import os
import struct
import warnings
from pathlib import Path
from typing import BinaryIO

import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence as DicomSequence
from pydicom.tag import BaseTag
from pydicom.uid import DeflatedExplicitVRLittleEndian

from dicom_ai.dicom.errors import UnreadableFileError
from dicom_ai.logs import redact_values

#: Media Storage Directory Storage (a DICOMDIR).
MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"

#: Attributes of which a forced read (no preamble, no file meta) must find at least one before
#: the result is believed to be DICOM: garbage parses as a handful of odd tags, never as these.
_IDENTIFYING = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")

#: Value representations whose text must parse as a number (PS3.5 Table 6.2-1). pydicom keeps
#: an unparseable value as ``str``, which downstream ``int()``/``float()`` would trip over later.
_NUMERIC_STRING_VRS = frozenset({"IS", "DS"})

_UNDEFINED_LENGTH = 0xFFFFFFFF
_ITEM = 0xFFFEE000
_SEQUENCE_DELIMITER = 0xFFFEE0DD
_GZIP_MAGIC = b"\x1f\x8b"
#: Explicit VRs with a 4-byte length after two reserved bytes (PS3.5 Table 7.1-1).
_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN",
                       b"UR", b"UT", b"UV"})
#: More fragments than any real object has (one per frame is usual; 2000-frame objects exist).
_MAX_FRAGMENTS = 1_000_000


def read_header(path: Path) -> Dataset:
    """Read a DICOM file without its pixel data.

    Files with a preamble and file meta are read strictly; files without (older or
    network-dumped objects) are read with ``force=True`` and then accepted only if they carry
    a SOP Class, SOP Instance, Study or Series Instance UID.

    Parameters
    ----------
    path:
        The file to read.

    Returns
    -------
    Dataset
        The header; bulk pixel data is not loaded.

    Raises
    ------
    UnreadableFileError
        Not DICOM, truncated, or a numeric attribute that cannot be read as a number.
    """
    return _read(path, stop_before_pixels=True)


def read_dataset(path: Path) -> Dataset:
    """Read a DICOM file including its pixel data, with the discipline of :func:`read_header`.

    Parameters
    ----------
    path:
        The file to read.

    Returns
    -------
    Dataset
        The complete dataset.

    Raises
    ------
    UnreadableFileError
        As for :func:`read_header`.
    """
    return _read(path, stop_before_pixels=False)


def is_dicomdir(ds: Dataset) -> bool:
    """Whether ``ds`` is a media directory (DICOMDIR) rather than an instance.

    Parameters
    ----------
    ds:
        A dataset as returned by :func:`read_header`.

    Returns
    -------
    bool
        True for the Media Storage Directory SOP class or a Directory Record Sequence.
    """
    meta = getattr(ds, "file_meta", None)
    classes = {str(ds.get("SOPClassUID", "")),
               str(meta.get("MediaStorageSOPClassUID", "")) if meta is not None else ""}
    return MEDIA_STORAGE_DIRECTORY in classes or "DirectoryRecordSequence" in ds


def _read(path: Path, *, stop_before_pixels: bool) -> Dataset:
    # Warnings are recorded and dropped: those that matter (unparseable numbers) are found by
    # _check_values, and the rest (non-conformant UIDs, over-long strings) do not stop us.
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        try:
            ds = _parse(path, stop_before_pixels=stop_before_pixels)
            _check_complete(ds, path)
            _check_values(ds, path)
        except UnreadableFileError:
            raise
        except Exception as exc:
            # Whatever a reader raises on bytes it did not expect (NotImplementedError for an
            # unknown VR, RecursionError for nesting, MemoryError for an absurd length, ...)
            # is this file's reason, never the end of a run.
            raise UnreadableFileError(_parse_failure(exc), path=path) from exc
    return ds


def _parse(path: Path, *, stop_before_pixels: bool) -> Dataset:
    try:
        with path.open("rb") as fh:
            ds = pydicom.dcmread(fh, stop_before_pixels=stop_before_pixels)
            if stop_before_pixels:
                _check_pixel_data(fh, ds, path)
        return ds
    except InvalidDicomError:
        pass
    except OSError as exc:
        # pydicom raises a bare OSError (no errno) when the stream ends where an element or
        # item should start, e.g. a file cut inside an undefined-length sequence.
        reason = (f"cannot open: {exc.strerror}" if exc.errno is not None
                  else f"truncated or corrupt: {_first_line(exc)}")
        raise UnreadableFileError(reason, path=path) from exc
    with path.open("rb") as fh:
        if fh.read(2) == _GZIP_MAGIC:
            raise UnreadableFileError("not a DICOM file (gzip-compressed)", path=path)
        fh.seek(0)
        try:
            ds = pydicom.dcmread(fh, stop_before_pixels=stop_before_pixels, force=True)
        except Exception as exc:
            raise UnreadableFileError("not a DICOM file", path=path) from exc
        if not any(keyword in ds for keyword in _IDENTIFYING):
            raise UnreadableFileError("not a DICOM file", path=path)
        if stop_before_pixels:
            _check_pixel_data(fh, ds, path)
    return ds


def _parse_failure(exc: Exception) -> str:
    if isinstance(exc, EOFError):
        return "truncated: the file ends inside the file meta information"
    if isinstance(exc, MemoryError):
        return "cannot parse: an element declares more data than memory holds"
    if isinstance(exc, RecursionError):
        return "cannot parse: sequences nested too deeply"
    return f"cannot parse: {_first_line(exc)}"


def _first_line(exc: Exception) -> str:
    # Reader messages describe structure (tags, lengths, VRs, offsets) but may quote the value
    # they stumbled on; that is taken out.
    text = str(exc).strip()
    return redact_values(text.splitlines()[0])[:200] if text else type(exc).__name__


def _positions_are_file_offsets(ds: Dataset) -> bool:
    # A deflated data set is read from an inflated copy: its offsets are not the file's.
    meta = getattr(ds, "file_meta", None)
    ts = str(meta.get("TransferSyntaxUID", "") or "") if meta is not None else ""
    return ts != DeflatedExplicitVRLittleEndian


def _check_pixel_data(fh: BinaryIO, ds: Dataset, path: Path) -> None:
    """Raise if the pixel data that a header read stopped before runs past the end of the file.

    A header read never loads the pixel data, so a copy of an instance cut inside it would
    otherwise pass for complete (and could be kept instead of the intact copy). pydicom leaves
    the file at the pixel data element's tag; its length, or for encapsulated pixel data each
    fragment's, is checked against the file size without reading the values.
    """
    if not _positions_are_file_offsets(ds):
        return
    start = fh.tell()
    size = os.fstat(fh.fileno()).st_size
    if start >= size:
        return
    implicit, little = ds.original_encoding
    order = "<" if little else ">"
    head = fh.read(12)
    if len(head) < 8:
        raise UnreadableFileError("truncated: the file ends inside an element header", path=path)
    group, element = struct.unpack_from(f"{order}HH", head)
    tag = BaseTag((group << 16) | element)
    vr = head[4:6]
    if implicit or not (vr.isalpha() and vr.isupper()):
        # Implicit VR, or pixel data written implicitly inside an explicit data set (pydicom
        # reads both; so does this).
        length, offset = struct.unpack_from(f"{order}L", head, 4)[0], 8
    elif vr in _LONG_VRS:
        if len(head) < 12:
            raise UnreadableFileError("truncated: the file ends inside an element header",
                                      path=path)
        length, offset = struct.unpack_from(f"{order}L", head, 8)[0], 12
    else:
        length, offset = struct.unpack_from(f"{order}H", head, 6)[0], 8
    value_start = start + offset
    if length != _UNDEFINED_LENGTH:
        if value_start + length > size:
            raise UnreadableFileError(
                f"truncated: {_tag(tag)} holds {max(0, size - value_start)} of {length} bytes",
                path=path)
        return
    _check_fragments(fh, value_start, size, order, tag, path)


def _check_fragments(fh: BinaryIO, position: int, size: int, order: str, tag: BaseTag,
                     path: Path) -> None:
    """Walk the items of encapsulated pixel data (item tags and lengths only) to its end."""
    for _ in range(_MAX_FRAGMENTS):
        fh.seek(position)
        head = fh.read(8)
        if len(head) < 8:
            raise UnreadableFileError(
                f"truncated: {_tag(tag)} ends before its sequence delimiter", path=path)
        group, element, length = struct.unpack(f"{order}HHL", head)
        item = (group << 16) | element
        if item == _SEQUENCE_DELIMITER:
            return
        if item != _ITEM or length == _UNDEFINED_LENGTH:
            raise UnreadableFileError(
                f"corrupt: {_tag(tag)} holds {_tag(BaseTag(item))} where a fragment item "
                f"should be", path=path)
        position += 8 + length
        if position > size:
            raise UnreadableFileError(
                f"truncated: a fragment of {_tag(tag)} runs {position - size} bytes past the "
                f"end of the file", path=path)
    raise UnreadableFileError(f"corrupt: {_tag(tag)} has more than {_MAX_FRAGMENTS} fragments",
                              path=path)


def _check_complete(ds: Dataset, path: Path) -> None:
    """Raise if an element's declared length runs past the end of the file.

    pydicom stops quietly at end of file and keeps the short last value, so a file cut during
    transfer would otherwise look whole.
    """
    size = path.stat().st_size
    offsets = _positions_are_file_offsets(ds)
    for tag in tuple(ds.keys()):
        if tag.group == 0xFFFE:
            # An item or delimiter outside any sequence: no VR, no meaning at the top level.
            raise UnreadableFileError(f"{_tag(tag)} item tag outside a sequence", path=path)
        elem = ds.get_item(tag)
        if not offsets:
            continue
        if not isinstance(elem, RawDataElement) or elem.length == _UNDEFINED_LENGTH:
            continue
        if elem.value_tell + elem.length > size:
            have = max(0, size - elem.value_tell)
            raise UnreadableFileError(
                f"truncated: {_tag(tag)} holds {have} of {elem.length} bytes", path=path)


def _check_values(ds: Dataset, path: Path) -> None:
    """Convert every standard element, raising on a numeric string that is not a number."""
    for tag in tuple(ds.keys()):
        if tag.is_private:
            continue
        try:
            elem = ds[tag]
        except Exception as exc:
            raise UnreadableFileError(f"cannot read value of {_tag(tag)}", path=path) from exc
        if elem.VR in _NUMERIC_STRING_VRS and _has_text(elem.value):
            raise UnreadableFileError(f"invalid value for VR {elem.VR} in {_tag(tag)}",
                                      path=path)
        if isinstance(elem.value, DicomSequence):
            for item in elem.value:
                _check_values(item, path)


def _has_text(value: object) -> bool:
    # pydicom's IS/DS classes subclass int/float/str-with-float; a bare ``str`` is what it keeps
    # when the text could not be parsed.
    values = value if isinstance(value, MultiValue | list) else [value]
    return any(type(v) is str and v.strip() != "" for v in values)


def _tag(tag: BaseTag) -> str:
    return f"({tag.group:04X},{tag.element:04X})"


__all__ = ["MEDIA_STORAGE_DIRECTORY", "is_dicomdir", "read_dataset", "read_header"]
