"""Pixel decoding: stored values out, no colour conversion, no rescale, one typed error.

The imaging code owns every transform from stored values to model input (YBR → RGB, palette,
Modality and VOI LUTs), so decoding here is "raw": YBR_FULL stays YBR_FULL. The one exception
is the decoder's own: JPEG 2000 codecs undo the multi-component transform, so YBR_RCT/YBR_ICT
come out as RGB, and native YBR_FULL_422 comes out with its subsampling removed (YBR_FULL).
:func:`decode_pixels` says which photometric interpretation the returned array is in.

Decoders available: python-gdcm, pylibjpeg-openjpeg, pyjpegls and pydicom's own (native,
RLE). The GPL pylibjpeg-libjpeg is deliberately absent, so 12-bit JPEG Extended fails with a
clear reason.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from typing import Any

import numpy.typing as npt
from pydicom.dataset import Dataset
from pydicom.pixels.decoders.base import get_decoder
from pydicom.pixels.utils import as_pixel_options, get_expected_length
from pydicom.uid import (
    UID,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from dicom_ai.dicom.errors import PixelDecodeError, UnreadableFileError
from dicom_ai.dicom.io import read_dataset
from dicom_ai.dicom.model import Instance

# pydicom logs a full traceback for every plugin that fails on a frame, even when the next
# plugin succeeds. Each plugin's message is already in PixelDecodeError's reason, so the
# tracebacks would only bury the service log and a replay's console.
logging.getLogger("pydicom.pixels.decoders.base").setLevel(logging.CRITICAL)

_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")

#: Image Pixel module attributes pydicom needs for any pixel data, with their tags for reasons.
_REQUIRED = (
    ("Rows", "(0028,0010)"),
    ("Columns", "(0028,0011)"),
    ("SamplesPerPixel", "(0028,0002)"),
    ("PhotometricInterpretation", "(0028,0004)"),
    ("BitsAllocated", "(0028,0100)"),
)
#: Also needed for integer pixel data (Pixel Data, as opposed to Float Pixel Data).
_REQUIRED_INTEGER = (
    ("BitsStored", "(0028,0101)"),
    ("PixelRepresentation", "(0028,0103)"),
)

#: Transfer syntaxes newer than pydicom 3.0's UID dictionary, named for error messages.
_TS_NAMES = {
    "1.2.840.10008.1.2.8.1": "Deflated Image Frame Compression",
}


@dataclass(frozen=True)
class DecodedPixels:
    """Decoded stored values and the photometric interpretation they are in.

    Attributes
    ----------
    array:
        (rows, columns[, samples]) for one frame, frames first for several.
    photometric_interpretation:
        Usually the header's; RGB for JPEG 2000 YBR_RCT/YBR_ICT, YBR_FULL for native
        YBR_FULL_422 (the decoder has already undone those).
    """

    array: npt.NDArray[Any]
    photometric_interpretation: str


def decode_pixels(instance: Instance, *, index: int | None = None) -> DecodedPixels:
    """Read ``instance`` with its pixel data and decode all frames, or frame ``index``.

    Parameters
    ----------
    instance:
        A readable instance (from :func:`dicom_ai.dicom.collect.collect` or the spool).
    index:
        0-based frame to decode; None decodes every frame.

    Returns
    -------
    DecodedPixels
        The stored values (no rescale, no colour conversion) and their photometric
        interpretation.

    Raises
    ------
    PixelDecodeError
        With a one-line reason: no pixel data, a missing Image Pixel attribute, an unsupported
        transfer syntax or one without an installed decoder, short or corrupt pixel data.
    """
    try:
        ds = read_dataset(instance.path)
    except UnreadableFileError as exc:
        raise PixelDecodeError(exc.reason, path=instance.path) from exc
    keyword = _pixel_keyword(ds, instance)
    ts = _transfer_syntax(ds, keyword, instance)
    name = transfer_syntax_name(ts)
    try:
        decoder = get_decoder(ts)
    except NotImplementedError as exc:
        raise PixelDecodeError(f"{name} is not supported", path=instance.path) from exc
    if not decoder.is_native and not decoder.available_plugins:
        raise PixelDecodeError(f"no decoder plugin available for {name}", path=instance.path)
    if decoder.is_native and keyword == "PixelData":
        _check_length(ds, instance)
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        try:
            array, properties = decoder.as_array(ds, index=index, raw=True,
                                                 **as_pixel_options(ds))
        except Exception as exc:
            raise PixelDecodeError(f"cannot decode {name}: {_one_line(exc)}",
                                   path=instance.path) from exc
    photometric = str(properties.get("photometric_interpretation",
                                     ds.PhotometricInterpretation))
    return DecodedPixels(array, photometric)


def decode(instance: Instance) -> npt.NDArray[Any]:
    """Decoded stored values of every frame of ``instance`` (see :func:`decode_pixels`).

    Parameters
    ----------
    instance:
        A readable instance.

    Returns
    -------
    numpy.ndarray
        (rows, columns[, samples]) for a single frame, (frames, rows, columns[, samples])
        for a multi-frame instance.

    Raises
    ------
    PixelDecodeError
        As for :func:`decode_pixels`.
    """
    return decode_pixels(instance).array


def decode_frame(instance: Instance, index: int = 0) -> npt.NDArray[Any]:
    """Decoded stored values of one frame: (rows, columns[, samples]).

    Parameters
    ----------
    instance:
        A readable instance.
    index:
        0-based frame number.

    Returns
    -------
    numpy.ndarray
        One frame, whether the instance has one frame or many.

    Raises
    ------
    PixelDecodeError
        As for :func:`decode_pixels`, or when ``index`` is past the last frame.
    """
    frames = _number_of_frames(instance.header)
    if not 0 <= index < frames:
        raise PixelDecodeError(f"frame {index} requested of an image with {frames} frame(s)",
                               path=instance.path)
    return decode_pixels(instance, index=index).array


def transfer_syntax_name(uid: str) -> str:
    """Human name of a transfer syntax UID, or the UID itself when it is not known.

    Parameters
    ----------
    uid:
        A transfer syntax UID.

    Returns
    -------
    str
        E.g. ``"JPEG Extended (Process 2 and 4)"``.
    """
    if uid in _TS_NAMES:
        return _TS_NAMES[uid]
    return str(UID(uid).name)


def _pixel_keyword(ds: Dataset, instance: Instance) -> str:
    present = [k for k in _PIXEL_KEYWORDS if k in ds]
    if not present:
        raise PixelDecodeError("no pixel data", path=instance.path)
    required = _REQUIRED + (_REQUIRED_INTEGER if present[0] == "PixelData" else ())
    missing = [f"{_spaced(keyword)} {tag}" for keyword, tag in required
               if ds.get(keyword) in (None, "")]
    if missing:
        raise PixelDecodeError("missing " + ", ".join(missing), path=instance.path)
    return present[0]


def _transfer_syntax(ds: Dataset, keyword: str, instance: Instance) -> str:
    meta = getattr(ds, "file_meta", None)
    ts = str(meta.get("TransferSyntaxUID", "") or "") if meta is not None else ""
    if ts:
        return ts
    # Without file meta the encoding pydicom detected while reading is the transfer syntax,
    # as long as the pixel data is not encapsulated (a codec would be unknowable).
    if ds[keyword].is_undefined_length:
        raise PixelDecodeError("no Transfer Syntax UID and the pixel data is compressed",
                               path=instance.path)
    implicit, little = ds.original_encoding
    if implicit:
        return str(ImplicitVRLittleEndian)
    return str(ExplicitVRLittleEndian if little else ExplicitVRBigEndian)


def _check_length(ds: Dataset, instance: Instance) -> None:
    expected = int(get_expected_length(ds))
    actual = len(ds.PixelData)
    if actual < expected:
        raise PixelDecodeError(f"pixel data shorter than expected: {actual} of {expected} bytes",
                               path=instance.path)


def _number_of_frames(header: Dataset) -> int:
    try:
        return max(1, int(header.get("NumberOfFrames", 1) or 1))
    except (TypeError, ValueError):
        return 1


def _one_line(exc: Exception) -> str:
    # pydicom lists one failure per plugin on its own line; keep them all, on one line.
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].endswith(":"):
        lines = lines[1:]
    return "; ".join(lines) or type(exc).__name__


def _spaced(keyword: str) -> str:
    """``BitsAllocated`` → ``Bits Allocated``, as the standard names attributes."""
    return "".join(f" {c}" if c.isupper() and i else c for i, c in enumerate(keyword))


__all__ = ["DecodedPixels", "decode", "decode_frame", "decode_pixels", "transfer_syntax_name"]
