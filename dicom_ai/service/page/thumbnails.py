"""PNG thumbnails of our Secondary Captures, for the status page.

A thumbnail is named by two UIDs (study, SOP instance) and nothing else: both are checked with
:func:`dicom_ai.dicom.uid.is_valid_uid` before they name a file, and the file must be one of
*our* objects (``outputs/<study>/sc-<sop>.dcm``, the name :func:`dicom_ai.results.output_filename`
gives), a Secondary Capture whose own UIDs match the request. Only its pixels are used; none of
its header (which copies the source's patient module) reaches the response.
"""

from __future__ import annotations

import functools
from io import BytesIO
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pydicom
from PIL import Image
from pydicom.errors import InvalidDicomError
from pydicom.uid import SecondaryCaptureImageStorage

from dicom_ai.dicom.uid import is_valid_uid

#: Longest side of a thumbnail, pixels.
MAX_SIDE = 256
#: Largest SC file decoded for a thumbnail; ours are a few MB (RGB, at least 512 px a side).
MAX_FILE_BYTES = 64 * 1024 * 1024
#: Largest picture decoded (rows × columns × samples).
MAX_SAMPLES = 8192 * 8192 * 3


class InvalidRequestError(ValueError):
    """The request names no valid UID pair (400)."""


class NotFoundError(LookupError):
    """No Secondary Capture of ours by that name, or one we cannot show (404)."""


def sc_path(outputs: Path, study_instance_uid: str, sop_instance_uid: str) -> Path:
    """Where our SC of that name lies, after both UIDs were checked.

    Parameters
    ----------
    outputs:
        ``storage.directory/outputs``.
    study_instance_uid, sop_instance_uid:
        From the request.

    Raises
    ------
    InvalidRequestError
        When either is not a UID (so it cannot hold ``/``, ``..`` or anything but digits and dots).
    """
    if not (is_valid_uid(study_instance_uid) and is_valid_uid(sop_instance_uid)):
        raise InvalidRequestError("not a UID")
    return outputs / study_instance_uid / f"sc-{sop_instance_uid}.dcm"


def thumbnail_png(outputs: Path, study_instance_uid: str, sop_instance_uid: str, *,
                  max_side: int = MAX_SIDE) -> bytes:
    """A PNG of the SC's first frame, its longest side at most ``max_side`` pixels.

    Parameters
    ----------
    outputs:
        ``storage.directory/outputs``.
    study_instance_uid, sop_instance_uid:
        The SC's study and SOP Instance UID.
    max_side:
        Bound on the thumbnail's width and height.

    Returns
    -------
    bytes
        The PNG.

    Raises
    ------
    InvalidRequestError
        When a UID is not valid.
    NotFoundError
        When there is no such SC of ours, or it is not a picture this can show.
    """
    path = sc_path(outputs, study_instance_uid, sop_instance_uid)
    try:
        stat = path.stat()
    except OSError:
        raise NotFoundError("no such Secondary Capture") from None
    if not path.is_file() or stat.st_size > MAX_FILE_BYTES:
        raise NotFoundError("no such Secondary Capture")
    return _render(str(path), stat.st_mtime_ns, stat.st_size, study_instance_uid,
                   sop_instance_uid, max_side)


# Keyed by the file's identity as well as its name: a replaced file is rendered again.
@functools.lru_cache(maxsize=64)
def _render(path: str, _mtime_ns: int, _size: int, study_instance_uid: str,
            sop_instance_uid: str, max_side: int) -> bytes:
    try:
        ds = pydicom.dcmread(path)
    except (InvalidDicomError, OSError, ValueError, EOFError):
        raise NotFoundError("unreadable Secondary Capture") from None
    if (str(ds.get("SOPClassUID", "")) != SecondaryCaptureImageStorage
            or str(ds.get("StudyInstanceUID", "")) != study_instance_uid
            or str(ds.get("SOPInstanceUID", "")) != sop_instance_uid
            or "PixelData" not in ds):
        raise NotFoundError("not this Secondary Capture")
    rows, columns = int(ds.get("Rows", 0)), int(ds.get("Columns", 0))
    samples = int(ds.get("SamplesPerPixel", 1))
    if not (0 < rows * columns * samples <= MAX_SAMPLES):
        raise NotFoundError("picture too large")
    try:
        pixels = ds.pixel_array
    except (ValueError, NotImplementedError, RuntimeError, AttributeError):
        raise NotFoundError("undecodable pixel data") from None
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        pixels = pixels[0]
    picture = Image.fromarray(_eight_bit(pixels, str(ds.get("PhotometricInterpretation", ""))))
    picture.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    out = BytesIO()
    picture.save(out, format="PNG", optimize=True)
    return out.getvalue()


def _eight_bit(pixels: npt.NDArray[np.generic], photometric: str) -> npt.NDArray[np.uint8]:
    """RGB (as pydicom decodes it) or greyscale scaled to 0..255; MONOCHROME1 inverted."""
    if pixels.ndim == 3 and pixels.shape[-1] == 3 and photometric == "RGB":
        if pixels.dtype == np.uint8:
            return np.ascontiguousarray(pixels)
    elif pixels.ndim != 2 or photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise NotFoundError("not an RGB or greyscale picture")
    values = pixels.astype(np.float64)
    low, high = float(values.min()), float(values.max())
    scaled = (values - low) * (255.0 / (high - low)) if high > low else np.zeros_like(values)
    if photometric == "MONOCHROME1":
        scaled = 255.0 - scaled
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


__all__ = ["MAX_SIDE", "InvalidRequestError", "NotFoundError", "sc_path", "thumbnail_png"]
