"""Colour fundus photographs: any photometric → RGB → field-of-view crop → model input.

Ophthalmic Photography (8/16 bit), VL Photographic and Secondary Capture arrive as RGB,
YBR_FULL, YBR_FULL_422 or PALETTE COLOR. The camera's circular field of view sits on a dark
background; cropping to it makes photos from different cameras look alike to the network.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset
from pydicom.pixels.processing import apply_color_lut, convert_color_space
from scipy import ndimage

from dicom_ai.imaging.resize import resize_2d

UInt8Array = npt.NDArray[np.uint8]


def ybr_full_to_rgb(ybr: npt.NDArray[np.generic], bits: int = 8) -> UInt8Array:
    """YCbCr (full range, PS3.3 C.7.6.3.1.2, ITU-R BT.601 coefficients) → RGB uint8.

    ``R = Y + 1.402 (Cr - h)``, ``G = Y - 0.344136 (Cb - h) - 0.714136 (Cr - h)``,
    ``B = Y + 1.772 (Cb - h)`` with ``h = 2**(bits-1)``; results rounded and clipped. Eight-bit
    samples go through pydicom's ``convert_color_space`` (which converts only 8 bits; it
    differs from the rounding here by one level in about 0.02 % of uniformly random samples),
    16-bit ones (OP) through the formulas here.
    """
    if bits == 8:
        rgb8: UInt8Array = convert_color_space(np.asarray(ybr, dtype=np.uint8), "YBR_FULL",
                                               "RGB")
        return rgb8
    arr = ybr.astype(np.float64)
    half = float(2 ** (bits - 1))
    y, cb, cr = arr[..., 0], arr[..., 1] - half, arr[..., 2] - half
    rgb = np.stack([y + 1.402 * cr, y - 0.344136 * cb - 0.714136 * cr, y + 1.772 * cb], axis=-1)
    top = float(2**bits - 1)
    rgb = np.clip(np.rint(rgb), 0, top)
    return to_uint8(rgb, bits)


def to_uint8(rgb: npt.NDArray[np.generic], bits: int) -> UInt8Array:
    """Scale an RGB array with ``bits`` bits per sample to uint8 (16-bit OP → 8 bit)."""
    if bits == 8:
        clipped: UInt8Array = np.clip(rgb, 0, 255).astype(np.uint8)
        return clipped
    scaled = rgb.astype(np.float64) * (255.0 / float(2**bits - 1))
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def upsample_422(ybr: npt.NDArray[np.generic]) -> npt.NDArray[np.generic]:
    """YBR_FULL_422 with chroma stored at half horizontal resolution → full resolution.

    A decoded array already has one Cb/Cr per pixel (shape H×W×3); raw 4:2:2 samples as
    ``Y0 Y1 Cb Cr`` per pixel pair (PS3.5 8.2.1) come as a flat per-row buffer, H×(2W) bytes.
    """
    if ybr.ndim == 3 and ybr.shape[-1] == 3:
        return ybr
    h, row = ybr.shape
    quads = ybr.reshape(h, row // 4, 4)
    y = quads[..., :2].reshape(h, -1)
    cb = np.repeat(quads[..., 2], 2, axis=1)
    cr = np.repeat(quads[..., 3], 2, axis=1)
    return np.stack([y, cb, cr], axis=-1)


def palette_to_rgb(indices: npt.NDArray[np.generic], red: npt.NDArray[np.generic],
                   green: npt.NDArray[np.generic], blue: npt.NDArray[np.generic],
                   first_mapped: int, bits: int) -> UInt8Array:
    """PALETTE COLOR: index → (R, G, B) through the three LUTs (PS3.3 C.7.6.3.1.5)."""
    idx = np.clip(indices.astype(np.int64) - first_mapped, 0, len(red) - 1)
    rgb = np.stack([np.asarray(red)[idx], np.asarray(green)[idx], np.asarray(blue)[idx]], -1)
    return to_uint8(rgb, bits)


def fov_mask(rgb: UInt8Array, *, threshold: float = 0.1) -> npt.NDArray[np.bool_]:
    """The camera's field of view: the largest connected region brighter than ``threshold`` ×
    the image's 99th percentile of the red channel (the fundus is red-dominant; the mask
    background is near black). When nothing stands out, the whole image."""
    red = rgb[..., 0].astype(np.float64) if rgb.ndim == 3 else rgb.astype(np.float64)
    ref = float(np.percentile(red, 99))
    whole = np.ones(red.shape, dtype=bool)
    if ref <= 0:
        return whole
    mask = red > threshold * ref
    mask = ndimage.binary_opening(mask, iterations=1) if min(mask.shape) > 32 else mask
    labels, n = ndimage.label(mask)
    if n == 0:
        return whole
    sizes = ndimage.sum_labels(mask, labels, index=np.arange(1, n + 1))
    biggest: npt.NDArray[np.bool_] = labels == int(np.argmax(sizes)) + 1
    return biggest


def field_of_view(rgb: UInt8Array, *, threshold: float = 0.1) -> tuple[int, int, int, int]:
    """Bounding box (row0, col0, row1, col1), end-exclusive, of the camera's field of view
    (:func:`fov_mask`)."""
    rows, cols = np.nonzero(fov_mask(rgb, threshold=threshold))
    return int(rows.min()), int(cols.min()), int(rows.max()) + 1, int(cols.max()) + 1


def crop_to_fov(rgb: UInt8Array) -> UInt8Array:
    """Crop to the field of view, then pad the shorter side so the result is square and the
    FOV circle stays centred (many cameras clip the circle at the top and bottom)."""
    r0, c0, r1, c1 = field_of_view(rgb)
    crop = rgb[r0:r1, c0:c1]
    h, w = crop.shape[:2]
    side = max(h, w)
    out = np.zeros((side, side, *crop.shape[2:]), dtype=crop.dtype)
    top, left = (side - h) // 2, (side - w) // 2
    out[top:top + h, left:left + w] = crop
    return out


def model_input(rgb: UInt8Array, size: tuple[int, int]) -> npt.NDArray[np.float32]:
    """RGB uint8 H×W×3 photograph → 3×H'×W' float32 in [0, 1], FOV-cropped."""
    if rgb.ndim != 3 or rgb.shape[-1] != 3:
        raise ValueError(f"expected H×W×3 RGB, got shape {rgb.shape}")
    return input_from_fov(crop_to_fov(rgb), size)


def input_from_fov(square: UInt8Array, size: tuple[int, int]) -> npt.NDArray[np.float32]:
    """An FOV-cropped square RGB image (:func:`crop_to_fov`) → 3×H'×W' float32 in [0, 1]."""
    chw = np.moveaxis(square, -1, 0).astype(np.float32) / 255.0
    return resize_2d(chw, size, aspect="pad")


def rgb_from_dataset(stored: npt.NDArray[np.generic], header: Dataset) -> UInt8Array:
    """Decoded stored values of one frame (no colour conversion applied) → RGB uint8.

    Handles RGB, YBR_FULL, YBR_FULL_422 (decoded or raw 4:2:2), PALETTE COLOR, and 8 or 16 bits
    per sample. Grayscale input is an error: a fundus model is never given a grey image.
    """
    photometric = str(header.get("PhotometricInterpretation", "")).upper()
    bits = int(header.get("BitsStored", header.get("BitsAllocated", 8)))
    # JPEG 2000 decoders undo the reversible/irreversible colour transform themselves, so
    # YBR_RCT and YBR_ICT pixels arrive as RGB (see dicom_ai.dicom.pixels.DecodedPixels).
    if photometric in {"RGB", "YBR_RCT", "YBR_ICT"}:
        return to_uint8(stored, bits)
    if photometric == "YBR_FULL":
        return ybr_full_to_rgb(stored, bits)
    if photometric == "YBR_FULL_422":
        return ybr_full_to_rgb(upsample_422(stored), bits)
    if photometric == "PALETTE COLOR":
        if "RedPaletteColorLookupTableDescriptor" not in header:
            raise ValueError("PALETTE COLOR image without a Red Palette Color LUT Descriptor")
        desc = [int(v) for v in header.RedPaletteColorLookupTableDescriptor]
        lut_bits = desc[2]
        if "RedPaletteColorLookupTableData" not in header:
            # Segmented palettes (PS3.3 C.7.9.2) are expanded by pydicom's own implementation.
            return to_uint8(apply_color_lut(stored, header), lut_bits)
        dtype = np.uint16 if lut_bits > 8 else np.uint8
        red, green, blue = (np.frombuffer(header.get(f"{c}PaletteColorLookupTableData"), dtype)
                            for c in ("Red", "Green", "Blue"))
        return palette_to_rgb(stored, red, green, blue, desc[1], lut_bits)
    raise ValueError(f"expected a colour photograph, got PhotometricInterpretation "
                     f"{photometric or '(none)'}")
