"""Dermoscopic photographs: any photometric → RGB → colour constancy → model input.

Dermoscopic Photography and VL Photographic images arrive as RGB or YBR (JPEG); the colour
conversion is the fundus one (:func:`dicom_ai.imaging.fundus.rgb_from_dataset`). There is no
field-of-view crop: a dermatoscope's circular vignette, where present, is part of what the
training images look like.

Dermatoscopes and cameras differ in white balance, so each image is colour-normalised with the
Shades of Gray method (Finlayson and Trezzi 2004; for dermoscopy Barata et al., IEEE J Biomed
Health Inform 19(3):1146-1152, 2015): the illuminant of channel c is estimated as the Minkowski
p-norm mean ``e_c = (mean(I_c ** p)) ** (1/p)`` and each channel is scaled by
``mean(e) / e_c`` so that the estimated illuminant becomes grey. Then the image is stretched to
the network's square input, as the ISIC 2017 training copies were (256×256, aspect not kept).

No lesion masks ship with the classification data, so :func:`lesion_mask` is a classical
estimate of where the lesion is — the explanation map should point there. It is a proxy, not a
segmentation anyone checked: the lesion is the dark region around the image centre.

1. luminance (ITU-R 601) of the network input, smoothed with a Gaussian of 2 % of the side;
2. Otsu's threshold computed inside the central disk (:data:`SEARCH_RADIUS`), which leaves out
   the dark vignette of many dermatoscopes at the corners; the dark class is the candidate;
3. the dark region (after holes are filled) that overlaps the central disk of
   :data:`CENTRE_RADIUS` most — ISIC images are framed on one lesion;
4. plausibility: when that region covers less than :data:`AREA_RANGE`'s lower or more than its
   upper share of the image, the central disk of :data:`CENTRE_RADIUS` stands in for it.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import numpy.typing as npt
from scipy import ndimage

from dicom_ai.imaging.anatomy import otsu_threshold
from dicom_ai.imaging.resize import resize_2d

UInt8Array = npt.NDArray[np.uint8]

#: Minkowski norm of the illuminant estimate; 6 is the value Barata et al. found best.
SHADES_OF_GRAY_P = 6.0
#: An image whose mean chroma (max − min of R, G, B, as a share of full scale) is below this is
#: grey, not a dermoscopic photograph (a radiograph exported in colour); the least colourful
#: ISIC 2017 image has 0.016.
MIN_CHROMA = 0.005
#: A pixel darker than this mean of R, G, B (0–255) is outside the picture's lit area: a fundus
#: camera's black surround, a dermatoscope's vignette.
DARK_LEVEL = 20
#: Fundus photographs are refused when their lit area's blue chromaticity B / (R + G + B) is
#: below :data:`FUNDUS_BLUE_MAX` and more than :data:`FUNDUS_DARK_SHARE` of the picture is
#: dark (the black surround of the camera's circular field), or whatever the surround when
#: their blue chromaticity is below :data:`MIN_BLUE`. Chosen on the ISIC 2017 train split
#: (0.45 % of its images refused) and measured on data it was not chosen on: ISIC 2017
#: validation 1 of 148 refused, RetinaMNIST (1,200 fundus photographs) 98.1 % and DRIVE (40)
#: 100 % refused (``tests/unit/test_dermoscopy.py``, derm-lesion model card).
FUNDUS_BLUE_MAX = 0.30
#: See :data:`FUNDUS_BLUE_MAX`; ISIC 2017 train images with more than this dark share: 0.8 %.
FUNDUS_DARK_SHARE = 0.15
#: See :data:`FUNDUS_BLUE_MAX`; the 0.5th percentile of ISIC 2017 train is 0.20.
MIN_BLUE = 0.19
#: Lesion search: Otsu's level is computed within this radius of the centre (share of the side).
SEARCH_RADIUS = 0.45
#: The lesion is the dark region overlapping this central disk most (share of the side); the
#: disk itself is the fallback.
CENTRE_RADIUS = 0.2
#: A found lesion must cover between these shares of the image.
AREA_RANGE = (0.005, 0.9)


def shades_of_gray(rgb: UInt8Array, p: float = SHADES_OF_GRAY_P) -> UInt8Array:
    """Colour-constancy correction of an H×W×3 uint8 image (result rounded and clipped).

    An image with a channel that is 0 everywhere (no illuminant to estimate) is returned
    unchanged.
    """
    if rgb.ndim != 3 or rgb.shape[-1] != 3:
        raise ValueError(f"expected H×W×3 RGB, got shape {rgb.shape}")
    x = rgb.astype(np.float64)
    illuminant = np.power(np.mean(np.power(x, p), axis=(0, 1)), 1.0 / p)
    if not np.all(illuminant > 0):
        return rgb.copy()
    gain = illuminant.mean() / illuminant
    out: UInt8Array = np.clip(np.rint(x * gain), 0, 255).astype(np.uint8)
    return out


def require_colour(rgb: UInt8Array) -> None:
    """Refuse a grey picture stored as colour (see :data:`MIN_CHROMA`).

    Raises
    ------
    ValueError
        The image's mean chroma is below :data:`MIN_CHROMA`.
    """
    x = rgb.astype(np.int16)
    chroma = float((x.max(axis=-1) - x.min(axis=-1)).mean()) / 255.0
    if chroma < MIN_CHROMA:
        raise ValueError(f"the image is grey (mean chroma {chroma:.4f} < {MIN_CHROMA}), not a "
                         f"dermoscopic colour photograph")


class ColourStats(NamedTuple):
    """What :func:`require_not_fundus` looks at."""

    #: Mean B / (R + G + B) over the lit pixels.
    blue: float
    #: Share of pixels darker than :data:`DARK_LEVEL`.
    dark_share: float


def colour_stats(rgb: UInt8Array) -> ColourStats:
    """Blue chromaticity of the lit area and the dark share of an RGB uint8 picture."""
    x = rgb.reshape(-1, 3).astype(np.float64)
    total = x.sum(axis=1)
    lit = total > 3 * DARK_LEVEL
    if not lit.any():
        return ColourStats(blue=0.0, dark_share=1.0)
    blue = float(np.mean(x[lit, 2] / total[lit]))
    return ColourStats(blue=blue, dark_share=1.0 - float(lit.mean()))


def require_not_fundus(rgb: UInt8Array) -> None:
    """Refuse a fundus photograph (see :data:`FUNDUS_BLUE_MAX`): orange-red within a black
    surround, unlike skin seen through a dermatoscope.

    Raises
    ------
    ValueError
        The picture's colour and dark surround are those of a fundus photograph.
    """
    stats = colour_stats(rgb)
    if stats.blue < MIN_BLUE:
        raise ValueError(f"the picture's colour is a fundus photograph's (blue chromaticity "
                         f"{stats.blue:.3f} < {MIN_BLUE}), not dermoscopy's")
    if stats.dark_share > FUNDUS_DARK_SHARE and stats.blue < FUNDUS_BLUE_MAX:
        raise ValueError(f"the picture's colour and dark surround are a fundus photograph's "
                         f"(blue chromaticity {stats.blue:.3f} < {FUNDUS_BLUE_MAX}, dark "
                         f"surround {stats.dark_share:.0%} > {FUNDUS_DARK_SHARE:.0%}), not "
                         "dermoscopy's")


def model_input(rgb: UInt8Array, size: tuple[int, int]) -> npt.NDArray[np.float32]:
    """RGB uint8 H×W×3 dermoscopic image → 3×H'×W' float32 in [0, 1], colour-normalised and
    stretched to ``size``."""
    corrected = shades_of_gray(rgb)
    chw = np.moveaxis(corrected, -1, 0).astype(np.float32) / 255.0
    return resize_2d(chw, size, aspect="stretch")


class LesionMask(NamedTuple):
    """Estimated lesion of a dermoscopic image (:func:`lesion_mask`)."""

    mask: npt.NDArray[np.bool_]
    #: False when the central disk stood in for an implausible or missing region.
    found: bool


def _disk(shape: tuple[int, int], radius: float) -> npt.NDArray[np.bool_]:
    h, w = shape
    rows, cols = np.mgrid[0:h, 0:w].astype(np.float64)
    inside: npt.NDArray[np.bool_] = ((rows + 0.5) / h - 0.5) ** 2 \
        + ((cols + 0.5) / w - 0.5) ** 2 <= radius ** 2
    return inside


def lesion_mask(model_input: npt.NDArray[np.floating]) -> LesionMask:
    """Estimate the lesion of a 3×H×W dermoscopy network input in [0, 1] (module recipe)."""
    x = np.asarray(model_input, dtype=np.float64)
    if x.ndim != 3 or x.shape[0] != 3:
        raise ValueError(f"expected a 3×H×W network input, got shape {x.shape}")
    shape = (x.shape[1], x.shape[2])
    luma = 0.299 * x[0] + 0.587 * x[1] + 0.114 * x[2]
    smooth = ndimage.gaussian_filter(luma, sigma=max(1.0, 0.02 * max(shape)))
    search = _disk(shape, SEARCH_RADIUS)
    centre = _disk(shape, CENTRE_RADIUS)
    dark = ndimage.binary_fill_holes(search & (smooth < otsu_threshold(smooth[search])))
    labels, n = ndimage.label(dark)
    if n:
        overlap = np.bincount(labels[centre], minlength=n + 1)
        overlap[0] = 0
        if overlap.max() > 0:
            lesion: npt.NDArray[np.bool_] = labels == int(np.argmax(overlap))
            if AREA_RANGE[0] <= float(lesion.mean()) <= AREA_RANGE[1]:
                return LesionMask(lesion, True)
    return LesionMask(centre, False)
