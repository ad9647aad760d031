"""Pixel decoding: stored values out, no colour conversion, no rescale, one typed error.

The imaging code owns every transform from stored values to model input (YBR → RGB, palette,
Modality and VOI LUTs), so decoding here is "raw": YBR_FULL stays YBR_FULL. The one exception
is the decoder's own: JPEG 2000 codecs undo the multi-component transform, so YBR_RCT/YBR_ICT
come out as RGB, and native YBR_FULL_422 comes out with its subsampling removed (YBR_FULL).
:func:`decode_pixels` says which photometric interpretation the returned array is in.

Decoders available: python-gdcm, Pillow, pylibjpeg-openjpeg, pyjpegls and pydicom's own
(native, RLE); :data:`DECODING_PLUGINS` says which one decodes what. The GPL pylibjpeg-libjpeg is
deliberately absent, so 12-bit JPEG Extended fails with a clear reason.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import struct
import warnings
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy.typing as npt
from pydicom.dataset import Dataset
from pydicom.encaps import generate_fragments
from pydicom.pixels.decoders.base import get_decoder
from pydicom.pixels.utils import as_pixel_options, get_expected_length
from pydicom.uid import (
    HTJ2K,
    JPEG2000,
    UID,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)

from dicom_ai.config import LimitsSettings
from dicom_ai.dicom.decoder_process import ISOLATED_PLUGINS, decode_in_child
from dicom_ai.dicom.errors import DicomInputError, PixelDecodeError, UnreadableFileError
from dicom_ai.dicom.io import read_dataset
from dicom_ai.dicom.model import Instance
from dicom_ai.logs import redact_values

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

_MIB = 1024 * 1024
#: The decode limit in force (bytes); see :func:`decode_limit`.
_MAX_DECODED_BYTES: ContextVar[int] = ContextVar(
    "max_decoded_bytes", default=LimitsSettings().max_decoded_mb * _MIB)
#: The volume limit in force (bytes); see :func:`decode_limit` and :func:`check_volume_size`.
_MAX_VOLUME_BYTES: ContextVar[int] = ContextVar(
    "max_volume_bytes", default=LimitsSettings().max_volume_mb * _MIB)
#: The time limit in force on a decode in the decoder process (seconds); see :func:`decode_limit`.
_ISOLATED_TIMEOUT_S: ContextVar[float] = ContextVar(
    "isolated_timeout_s", default=LimitsSettings().isolated_decode_timeout_s)
#: Fragments whose codestream header is checked (one per frame is usual).
_MAX_FRAGMENTS_CHECKED = 100_000
#: Segments walked to find a JPEG SOF marker (real files have fewer than 20 before it).
_MAX_JPEG_SEGMENTS = 1000
#: Start of Frame markers of JPEG (SOF0-SOF15 less DHT, JPG and DAC) and JPEG-LS (SOF55).
_SOF_MARKERS = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD,
                          0xCE, 0xCF, 0xF7})
_JP2_SIGNATURE = b"\x00\x00\x00\x0cjP  "

#: The pydicom plugins each of these transfer syntaxes may be decoded with, in order: the first
#: one installed decodes it, alone. GDCM decodes them all, but on some malformed JPEG and
#: JPEG-LS codestreams it aborts the whole process (an uncaught C++ exception, a failed
#: assertion; found by fuzzing, ``tests/robustness``) where the others raise an error. No
#: fallback to GDCM either: after the first plugin's error pydicom would hand it the same
#: codestream. On every file of the test corpus these plugins return the arrays GDCM returns.
#: pylibjpeg comes first for JPEG Extended where a site installs pylibjpeg-libjpeg for 12-bit
#: files (Pillow, like GDCM, reads 8 bits only). JPEG Lossless has no other installed plugin,
#: so GDCM decodes it, in the child process of :mod:`~dicom_ai.dicom.decoder_process`, where an
#: abort costs only the file. RLE and HTJ2K are named too (pydicom 3.0 offers no GDCM for
#: them), so that every compressed syntax the listener accepts has its plugin chosen here: a
#: pydicom that added GDCM to their order could not run it in this process unnoticed.
DECODING_PLUGINS: dict[str, tuple[str, ...]] = {
    JPEGBaseline8Bit: ("pillow",),
    JPEGExtended12Bit: ("pylibjpeg", "pillow"),
    JPEGLossless: ("gdcm",),
    JPEGLosslessSV1: ("gdcm",),
    JPEGLSLossless: ("pyjpegls",),
    JPEGLSNearLossless: ("pyjpegls",),
    JPEG2000Lossless: ("pylibjpeg",),
    JPEG2000: ("pylibjpeg",),
    HTJ2KLossless: ("pylibjpeg",),
    HTJ2KLosslessRPCL: ("pylibjpeg",),
    HTJ2K: ("pylibjpeg",),
    RLELossless: ("pydicom",),
}

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
        With a one-line reason: no pixel data, a missing Image Pixel attribute, a declared size
        over :func:`decode_limit` (checked before the file is read) or a codestream larger
        than the header declares, an unsupported transfer syntax or one without an installed
        decoder, short or corrupt pixel data, or whatever else a decoder raised.
    """
    # Before the file is read: the header alone says how much memory decoding would take.
    _check_declared_size(instance.header, instance.path, whole=index is None)
    if _plugin(_header_syntax(instance.header)) in ISOLATED_PLUGINS:
        array, photometric = decode_in_child(instance.path, index,
                                             timeout_s=_ISOLATED_TIMEOUT_S.get())
        return DecodedPixels(array, photometric)
    return decode_file(instance.path, index=index)


def decode_file(path: Path, *, index: int | None = None, in_decoder_process: bool = False
                ) -> DecodedPixels:
    """Read ``path`` with its pixel data and decode it in this process.

    What :func:`decode_pixels` does after its check of the header, for the transfer syntaxes
    decoded here, and what the decoder process (:mod:`~dicom_ai.dicom.decoder_process`) does
    for the others.

    Parameters
    ----------
    path:
        The file.
    index:
        0-based frame to decode; None decodes every frame.
    in_decoder_process:
        True in the decoder process, the only place a plugin of
        :data:`~dicom_ai.dicom.decoder_process.ISOLATED_PLUGINS` may run.

    Returns
    -------
    DecodedPixels
        As for :func:`decode_pixels`.

    Raises
    ------
    PixelDecodeError
        As for :func:`decode_pixels`.
    """
    try:
        ds = read_dataset(path)
    except UnreadableFileError as exc:
        raise PixelDecodeError(exc.reason, path=path) from exc
    try:
        return _decode(ds, path, index, in_decoder_process=in_decoder_process)
    except DicomInputError:
        raise
    except Exception as exc:
        # Whatever a decoder (or pydicom preparing it) raises on values it did not expect is
        # this file's reason, never the end of a study.
        raise PixelDecodeError(f"cannot decode: {_one_line(exc)}", path=path) from exc


def _decode(ds: Dataset, path: Path, index: int | None, *, in_decoder_process: bool
            ) -> DecodedPixels:
    keyword = _pixel_keyword(ds, path)
    ts = _transfer_syntax(ds, keyword, path)
    name = transfer_syntax_name(ts)
    try:
        decoder = get_decoder(ts)
    except NotImplementedError as exc:
        raise PixelDecodeError(f"{name} is not supported", path=path) from exc
    if not decoder.is_native and not decoder.available_plugins:
        raise PixelDecodeError(f"no decoder plugin available for {name}", path=path)
    if decoder.is_native and keyword == "PixelData":
        _check_length(ds, path)
    if not decoder.is_native:
        _check_codestreams(ds, path)
    plugins = DECODING_PLUGINS.get(ts, ())
    plugin = _plugin(ts)
    if plugins and plugin is None:
        raise PixelDecodeError(f"no {' or '.join(plugins)} decoder installed for {name}",
                               path=path)
    if plugin in ISOLATED_PLUGINS and not in_decoder_process:
        # decode_pixels sends these to the decoder process by the header's transfer syntax;
        # this one's differs, so the file changed since its header was read.
        raise PixelDecodeError(f"{name} is decoded in the decoder process only", path=path)
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        try:
            array, properties = decoder.as_array(ds, index=index, raw=True,
                                                 decoding_plugin=plugin or "",
                                                 **as_pixel_options(ds))
        except Exception as exc:
            raise PixelDecodeError(f"cannot decode {name}: {_one_line(exc)}",
                                   path=path) from exc
    photometric = str(properties.get("photometric_interpretation",
                                     ds.PhotometricInterpretation))
    return DecodedPixels(array, photometric)


def _header_syntax(header: Dataset) -> str:
    """The Transfer Syntax UID of the file meta, or "" without one."""
    meta = getattr(header, "file_meta", None)
    return str(meta.get("TransferSyntaxUID", "") or "") if meta is not None else ""


def _plugin(transfer_syntax: str) -> str | None:
    """The plugin of :data:`DECODING_PLUGINS` that decodes ``transfer_syntax``: the first one
    installed; None when it names none, or none of its plugins is installed."""
    plugins = DECODING_PLUGINS.get(transfer_syntax, ())
    if not plugins:
        return None
    available = get_decoder(transfer_syntax).available_plugins
    return next((p for p in plugins if p in available), None)


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


def _pixel_keyword(ds: Dataset, path: Path) -> str:
    present = [k for k in _PIXEL_KEYWORDS if k in ds]
    if not present:
        raise PixelDecodeError("no pixel data", path=path)
    required = _REQUIRED + (_REQUIRED_INTEGER if present[0] == "PixelData" else ())
    missing = [f"{_spaced(keyword)} {tag}" for keyword, tag in required
               if ds.get(keyword) in (None, "")]
    if missing:
        raise PixelDecodeError("missing " + ", ".join(missing), path=path)
    return present[0]


def _transfer_syntax(ds: Dataset, keyword: str, path: Path) -> str:
    ts = _header_syntax(ds)
    if ts:
        return ts
    # Without file meta the encoding pydicom detected while reading is the transfer syntax,
    # as long as the pixel data is not encapsulated (a codec would be unknowable).
    if ds[keyword].is_undefined_length:
        raise PixelDecodeError("no Transfer Syntax UID and the pixel data is compressed",
                               path=path)
    implicit, little = ds.original_encoding
    if implicit:
        return str(ImplicitVRLittleEndian)
    return str(ExplicitVRLittleEndian if little else ExplicitVRBigEndian)


def _check_declared_size(header: Dataset, path: Path, *, whole: bool) -> None:
    """Refuse pixel data whose declared decoded size exceeds :func:`decode_limit`."""
    try:
        rows, columns = int(header.get("Rows") or 0), int(header.get("Columns") or 0)
        samples = int(header.get("SamplesPerPixel") or 1)
        bits = int(header.get("BitsAllocated") or 8)
    except (TypeError, ValueError):
        return  # _pixel_keyword names what is missing or malformed
    frames = _number_of_frames(header) if whole else 1
    # Decoders return at least one byte per sample (1-bit data is unpacked).
    declared = rows * columns * frames * samples * max(1, (bits + 7) // 8)
    limit = _MAX_DECODED_BYTES.get()
    if declared > limit:
        raise PixelDecodeError(
            f"declared image size {columns} x {rows} x {frames} frame(s) x {samples} "
            f"sample(s) x {bits} bit(s) ({declared / _MIB:.0f} MiB) exceeds "
            f"limits.max_decoded_mb ({limit // _MIB} MiB)", path=path)


def _check_codestreams(ds: Dataset, path: Path) -> None:
    """Refuse a JPEG, JPEG-LS or JPEG 2000 codestream larger than the header declares.

    A decoder allocates what the codestream says, not what Rows and Columns say: a header of
    512 x 512 around a codestream of 65000 x 65000 would otherwise pass the declared-size check.
    """
    declared = int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel") or 1)
    # The first item is the Basic Offset Table, not a fragment.
    items = generate_fragments(ds.PixelData)
    for fragment in itertools.islice(items, 1, _MAX_FRAGMENTS_CHECKED):
        codestream = _jp2_codestream(fragment) if fragment.startswith(_JP2_SIGNATURE) \
            else fragment
        if codestream is None:
            # pydicom's own JP2 parser (pixels.utils.get_j2k_parameters) adds each box's
            # length until it meets the codestream box: a length of 0, or 0 read from the
            # bytes past the end, makes it loop forever.
            raise PixelDecodeError("a JP2 file whose boxes do not lead to its codestream "
                                   "(jp2c)", path=path)
        size = codestream_size(codestream)
        if size is not None and size[0] * size[1] * size[2] > declared:
            raise PixelDecodeError(
                f"a codestream declares {size[0]} x {size[1]} x {size[2]} samples, the header "
                f"{ds.Columns} x {ds.Rows} x {ds.get('SamplesPerPixel') or 1}",
                path=path)


def codestream_size(fragment: bytes) -> tuple[int, int, int] | None:
    """Width, height and components a JPEG, JPEG-LS or JPEG 2000 codestream declares.

    Parameters
    ----------
    fragment:
        The start of a frame's codestream (its first fragment).

    Returns
    -------
    tuple of int, or None
        ``(width, height, components)`` from the SOF (JPEG, JPEG-LS) or SIZ (JPEG 2000, HTJ2K)
        segment; None for a fragment that does not start a codestream (a continuation fragment)
        or ends before that segment.
    """
    if fragment.startswith(_JP2_SIGNATURE):
        fragment = _jp2_codestream(fragment) or b""
    if fragment.startswith(b"\xff\x4f\xff\x51") and len(fragment) >= 42:
        # SIZ (ISO/IEC 15444-1 A.5.1): Lsiz Rsiz Xsiz Ysiz XOsiz YOsiz ... Csiz.
        x, y, x0, y0 = struct.unpack_from(">LLLL", fragment, 8)
        (components,) = struct.unpack_from(">H", fragment, 40)
        return max(0, x - x0), max(0, y - y0), components
    if not fragment.startswith(b"\xff\xd8"):
        return None
    offset = 2
    for _ in range(_MAX_JPEG_SEGMENTS):
        if offset + 4 > len(fragment) or fragment[offset] != 0xFF:
            return None
        marker = fragment[offset + 1]
        if marker in _SOF_MARKERS:
            if offset + 10 > len(fragment):
                return None
            height, width = struct.unpack_from(">HH", fragment, offset + 5)
            return width, height, fragment[offset + 9]
        (length,) = struct.unpack_from(">H", fragment, offset + 2)
        offset += 2 + length
    return None


def _jp2_codestream(data: bytes) -> bytes | None:
    """The contiguous codestream box (jp2c) of a JP2 file, or None unless the boxes before it
    (at most :data:`_MAX_JPEG_SEGMENTS`, each at least 8 bytes long) lead to it within
    ``data``."""
    offset = 0
    for _ in range(_MAX_JPEG_SEGMENTS):
        if offset + 8 > len(data):
            return None
        (length,) = struct.unpack_from(">L", data, offset)
        if data[offset + 4:offset + 8] == b"jp2c":
            return data[offset + 8:]
        if length < 8:
            return None
        offset += length
    return None


@contextlib.contextmanager
def decode_limit(max_decoded_mb: int, *, max_volume_mb: int | None = None,
                 isolated_timeout_s: float | None = None) -> Iterator[None]:
    """Within the block, refuse to decode pixel data declaring more than ``max_decoded_mb``.

    Parameters
    ----------
    max_decoded_mb:
        ``limits.max_decoded_mb`` of the settings; outside any block, its default applies.
    max_volume_mb:
        ``limits.max_volume_mb``, for :func:`check_volume_size`; the limit in force outside the
        block when not given.
    isolated_timeout_s:
        ``limits.isolated_decode_timeout_s``: how long one decode in the decoder process may
        take; the limit in force outside the block when not given.
    """
    token = _MAX_DECODED_BYTES.set(max_decoded_mb * _MIB)
    volume = _MAX_VOLUME_BYTES.set(_MAX_VOLUME_BYTES.get() if max_volume_mb is None
                                   else max_volume_mb * _MIB)
    timeout = _ISOLATED_TIMEOUT_S.set(_ISOLATED_TIMEOUT_S.get() if isolated_timeout_s is None
                                      else isolated_timeout_s)
    try:
        yield
    finally:
        _ISOLATED_TIMEOUT_S.reset(timeout)
        _MAX_VOLUME_BYTES.reset(volume)
        _MAX_DECODED_BYTES.reset(token)


def check_volume_size(slices: int, rows: int, columns: int, *, bytes_per_voxel: int) -> None:
    """Refuse a volume larger than ``limits.max_volume_mb`` before it is allocated.

    One image is bounded by ``limits.max_decoded_mb``; a series of thousands of valid slices
    stacked into one array is not, so its declared size is checked from the headers first.

    Parameters
    ----------
    slices, rows, columns:
        The volume's shape, from the slices' headers.
    bytes_per_voxel:
        Size of one voxel of the array to be allocated.

    Raises
    ------
    PixelDecodeError
        The volume would exceed the limit in force (see :func:`decode_limit`).
    """
    declared = slices * rows * columns * bytes_per_voxel
    limit = _MAX_VOLUME_BYTES.get()
    if declared > limit:
        raise PixelDecodeError(
            f"declared volume {slices} slices x {rows} x {columns} x {bytes_per_voxel} "
            f"byte(s) ({declared / _MIB:.0f} MiB) exceeds limits.max_volume_mb "
            f"({limit // _MIB} MiB)")


def _check_length(ds: Dataset, path: Path) -> None:
    expected = int(get_expected_length(ds))
    actual = len(ds.PixelData)
    if actual < expected:
        raise PixelDecodeError(f"pixel data shorter than expected: {actual} of {expected} bytes",
                               path=path)


def _number_of_frames(header: Dataset) -> int:
    try:
        return max(1, int(header.get("NumberOfFrames", 1) or 1))
    except (TypeError, ValueError):
        return 1


def _one_line(exc: Exception) -> str:
    # pydicom lists one failure per plugin on its own line; keep them all, on one line, without
    # any value a plugin quotes.
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].endswith(":"):
        lines = lines[1:]
    return redact_values("; ".join(lines))[:500] or type(exc).__name__


def _spaced(keyword: str) -> str:
    """``BitsAllocated`` → ``Bits Allocated``, as the standard names attributes."""
    return "".join(f" {c}" if c.isupper() and i else c for i, c in enumerate(keyword))


__all__ = [
    "DecodedPixels",
    "codestream_size",
    "decode",
    "decode_file",
    "decode_frame",
    "decode_limit",
    "decode_pixels",
    "transfer_syntax_name",
]
