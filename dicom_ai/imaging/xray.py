"""Projection radiography (CR, DX): stored values → presentation values in [0, 1] → model input.

The order follows the DICOM grayscale pipeline (PS3.4 N.2): Modality LUT (rescale or Modality
LUT Sequence) → VOI LUT (VOI LUT Sequence or window) → MONOCHROME1 inversion. All functions
are pure; :func:`presentation_from_dataset` reads the parameters from a header.

The Modality LUT and the window are pydicom's (:func:`pydicom.pixels.apply_modality_lut`,
:func:`pydicom.pixels.apply_windowing`: LINEAR, LINEAR_EXACT and SIGMOID as PS3.3
C.11.2.1.2–3 define them). A VOI LUT Sequence is applied here: pydicom's ``apply_voi`` indexes
an 8-bit LUT through a uint8 array, so inputs 256 or more past the first mapped value wrap
around instead of taking the last entry (``tests/unit/test_xray.py`` shows it), and it warns
on the floating-point values a rescale produces.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.pixels.processing import apply_modality_lut, apply_windowing

from dicom_ai.imaging.resize import Aspect, resize_2d

FloatArray = npt.NDArray[np.float64]


def apply_lut(values: npt.NDArray[np.generic], descriptor: Sequence[int],
              lut: Sequence[int] | npt.NDArray[np.generic]) -> FloatArray:
    """Apply a LUT (Modality or VOI LUT Sequence item) as PS3.3 C.11.1.1 / C.11.2.1.1 define.

    ``descriptor`` is (number of entries, first input value mapped, bits per entry); a number of
    entries of 0 means 65536. Inputs below the first mapped value take the first entry, inputs
    past the last take the last entry.
    """
    n_entries, first, _bits = (int(v) for v in descriptor)
    table = np.asarray(lut, dtype=np.float64)
    n = n_entries or 65536
    table = table[:n]
    idx = np.clip(np.rint(values.astype(np.float64)) - first, 0, len(table) - 1).astype(np.int64)
    mapped: FloatArray = table[idx]
    return mapped


#: Output range of the window computed by pydicom (16-bit unsigned), scaled to [0, 1] here.
_WINDOW_TOP = 65535.0


def window(values: npt.NDArray[np.generic], center: float, width: float,
           function: str = "LINEAR") -> FloatArray:
    """VOI window, output in [0, 1]: ``LINEAR`` (PS3.3 C.11.2.1.2.1), ``LINEAR_EXACT``
    (C.11.2.1.3.2) or ``SIGMOID`` (C.11.2.1.3.1), computed by pydicom's ``apply_windowing``.

    LINEAR: ``x <= c - 0.5 - (w-1)/2`` → 0, ``x > c - 0.5 + (w-1)/2`` → 1, otherwise
    ``(x - (c - 0.5)) / (w - 1) + 0.5``; LINEAR_EXACT the same with ``c`` and ``w`` as given;
    SIGMOID ``1 / (1 + exp(-4 (x - c) / w))``.

    Raises
    ------
    ValueError
        A width below 1 (LINEAR) or not positive (LINEAR_EXACT, SIGMOID), or another function.
    """
    ds = Dataset()
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsStored = 16
    ds.PixelRepresentation = 0
    # FD, not the attributes' DS: a computed centre may need more than DS's 16 characters.
    ds.add(DataElement(0x00281050, "FD", float(center)))
    ds.add(DataElement(0x00281051, "FD", float(width)))
    ds.VOILUTFunction = function
    out: FloatArray = apply_windowing(values.astype(np.float64), ds) / _WINDOW_TOP
    return out


def window_linear(values: npt.NDArray[np.generic], center: float, width: float) -> FloatArray:
    """The LINEAR :func:`window`."""
    return window(values, center, width, "LINEAR")


def scale_to_unit(values: npt.NDArray[np.generic], low: float, high: float) -> FloatArray:
    """Map ``[low, high]`` linearly onto ``[0, 1]`` (clipped)."""
    if high <= low:
        return np.zeros(values.shape, dtype=np.float64)
    return np.clip((values.astype(np.float64) - low) / (high - low), 0.0, 1.0)


def invert(unit: FloatArray) -> FloatArray:
    """MONOCHROME1 → MONOCHROME2 on presentation values in [0, 1]."""
    return 1.0 - unit


@dataclass(frozen=True)
class VOI:
    """How stored values become [0, 1]: a window, a LUT, or the full stored range."""

    kind: str  # "window", "lut" or "range"
    center: float = 0.0
    width: float = 0.0
    function: str = "LINEAR"
    lut_descriptor: tuple[int, int, int] = (0, 0, 0)
    lut_data: tuple[int, ...] = ()
    low: float = 0.0
    high: float = 0.0


def _first(value: object) -> float:
    if isinstance(value, (list, tuple)) or (hasattr(value, "__getitem__") and not isinstance(
            value, (str, bytes))):
        return float(value[0])
    return float(value)  # type: ignore[arg-type]


def lut_from_item(item: Dataset) -> tuple[tuple[int, int, int], npt.NDArray[np.int64]]:
    """Descriptor and entries of a Modality or VOI LUT Sequence item.

    LUT Data arrives as integers (VR US) or, in explicit VR files, as OW bytes: 16-bit
    little-endian words, or one byte per entry when 8-bit entries fill exactly one byte each.
    """
    if "LUTDescriptor" not in item or "LUTData" not in item:
        raise ValueError("LUT Sequence item without LUT Descriptor or LUT Data")
    desc = tuple(int(v) for v in item.LUTDescriptor)
    data = item.LUTData
    if isinstance(data, bytes):
        dtype = np.uint8 if desc[2] <= 8 and len(data) == (desc[0] or 65536) else np.dtype("<u2")
        data = np.frombuffer(data, dtype=dtype)
    return (desc[0], desc[1], desc[2]), np.asarray(data, dtype=np.int64).ravel()


def stored_range(header: Dataset) -> tuple[float, float]:
    """Range of stored values allowed by BitsStored and PixelRepresentation."""
    bits = int(header.get("BitsStored", header.get("BitsAllocated", 8)))
    if int(header.get("PixelRepresentation", 0)) == 1:
        return float(-(2 ** (bits - 1))), float(2 ** (bits - 1) - 1)
    return 0.0, float(2**bits - 1)


def voi_from_header(header: Dataset) -> VOI:
    """The VOI transform a viewer would apply by default: the first VOI LUT Sequence item, else
    the first Window Center/Width, else the full range after the modality LUT."""
    seq = header.get("VOILUTSequence")
    if seq:
        desc, data = lut_from_item(seq[0])
        return VOI(kind="lut", lut_descriptor=desc, lut_data=tuple(int(v) for v in data))
    if "WindowCenter" in header and "WindowWidth" in header:
        fn = str(header.get("VOILUTFunction", "LINEAR")).upper() or "LINEAR"
        return VOI(kind="window", center=_first(header.WindowCenter),
                   width=_first(header.WindowWidth), function=fn)
    low, high = stored_range(header)
    slope = float(header.get("RescaleSlope", 1.0) or 1.0)
    intercept = float(header.get("RescaleIntercept", 0.0) or 0.0)
    ends = sorted((low * slope + intercept, high * slope + intercept))
    return VOI(kind="range", low=ends[0], high=ends[1])


def modality_values(stored: npt.NDArray[np.generic], header: Dataset) -> FloatArray:
    """Stored values → modality values (Modality LUT Sequence, else Rescale Slope/Intercept),
    by pydicom's ``apply_modality_lut``."""
    return np.asarray(apply_modality_lut(stored, header), dtype=np.float64)


def apply_voi(values: FloatArray, voi: VOI) -> FloatArray:
    """Modality values → [0, 1] presentation values (before any MONOCHROME1 inversion)."""
    if voi.kind == "lut":
        out = apply_lut(values, voi.lut_descriptor, voi.lut_data)
        # The descriptor's third value is the bit depth of the LUT's entries.
        return scale_to_unit(out, 0.0, float(2**voi.lut_descriptor[2] - 1))
    if voi.kind == "window":
        return window(values, voi.center, voi.width, voi.function)
    return scale_to_unit(values, voi.low, voi.high)


def presentation_from_dataset(stored: npt.NDArray[np.generic],
                              header: Dataset) -> npt.NDArray[np.float32]:
    """Decoded stored values of one grayscale frame → presentation values in [0, 1], where 1
    is displayed white (MONOCHROME1 already inverted)."""
    photometric = str(header.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if photometric not in {"MONOCHROME1", "MONOCHROME2"}:
        raise ValueError(f"expected a grayscale image, got PhotometricInterpretation {photometric}")
    values = apply_voi(modality_values(stored, header), voi_from_header(header))
    if photometric == "MONOCHROME1":
        values = invert(values)
    return values.astype(np.float32)


def presentation_from_8bit(gray: npt.NDArray[np.uint8]) -> npt.NDArray[np.float32]:
    """An 8-bit grayscale picture (the training JPEGs) → [0, 1]: the same path as a
    MONOCHROME2 8-bit DICOM without VOI (full stored range 0–255)."""
    return scale_to_unit(gray, 0.0, 255.0).astype(np.float32)


def model_input(presentation: npt.NDArray[np.float32], size: tuple[int, int], *,
                aspect: Aspect = "pad") -> npt.NDArray[np.float32]:
    """[0, 1] H×W presentation image → 1×H'×W' float32 network input."""
    if presentation.ndim != 2:
        raise ValueError(f"expected one H×W frame, got shape {presentation.shape}")
    return resize_2d(presentation[None].astype(np.float32), size, aspect=aspect)
