"""The anatomy an explanation map should point at, and how much of a map lies there.

A Grad-CAM map shows where the network's evidence for a class came from; a reader needs it
over the lung fields of a chest radiograph or inside the camera's field of view of a fundus
photograph. Restricting the displayed map to that anatomy keeps a reader's eye on it, but does
not make the model look there: :func:`share_inside` measures, on the unrestricted map, how much
of the evidence the model drew from the anatomy (``scripts/explanation_anatomy.py`` reports it
on validation images).

No lung masks ship with the chest X-ray data, so :func:`lung_fields` is a classical estimate on
the normalized radiograph (lungs are the large dark regions inside the bright thorax), guided by
an anatomical prior (:data:`PRIOR_LUNG`, an ellipse per lung):

1. smooth with a Gaussian of 2 % of the image side, so rib edges do not split a lung;
2. per lung, a search window (the prior ellipse grown by :data:`WINDOW_GROWTH`), thresholded at
   Otsu's level computed inside it: the lung is the dark class;
3. open with a disk of 3 % of the side to cut the narrow links between a lung and the air
   outside the patient, and take the dark region that overlaps the prior most;
4. the region becomes its convex hull: an opacity (pneumonia) makes part of a lung bright and
   would otherwise be cut out, and it is the very place the map should point at;
5. plausibility: when the region's area is not within :data:`AREA_RATIO` of the prior's, the
   prior is used for that lung, so the result always holds two lung fields.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from scipy import ndimage

BoolArray = npt.NDArray[np.bool_]
FloatArray = npt.NDArray[np.floating]

#: Gaussian smoothing before thresholding, as a share of the longer image side.
SMOOTH_FRACTION = 0.02
#: Opening radius that separates a lung from the air outside, as a share of the longer side.
OPENING_FRACTION = 0.03
#: Anatomical prior of each lung field on a frontal chest radiograph cropped to the thorax,
#: as shares of the image (centre row, centre column of the image-left lung, row and column
#: semi-axes); the other lung is its mirror image.
PRIOR_LUNG = (0.45, 0.30, 0.30, 0.15)
#: A lung is looked for within its prior ellipse with both semi-axes grown by this factor.
WINDOW_GROWTH = 1.4
#: A found lung's area must lie within these multiples of the prior's, else the prior is used.
AREA_RATIO = (0.35, 2.0)


@dataclass(frozen=True)
class LungFields:
    """Estimated lung fields of a chest radiograph.

    Attributes
    ----------
    mask:
        Both lung fields, the image's shape.
    from_image:
        How many of the two lungs were found in the image (the others are the prior).
    """

    mask: BoolArray
    from_image: int


def otsu_threshold(values: FloatArray, bins: int = 256) -> float:
    """Otsu's (1979) threshold: the level that maximizes the between-class variance of a
    histogram of ``values`` (``bins`` equal-width bins over their range)."""
    v = np.asarray(values, dtype=np.float64).ravel()
    lo, hi = float(v.min()), float(v.max())
    if hi <= lo:
        return lo
    counts, edges = np.histogram(v, bins=bins, range=(lo, hi))
    centres = 0.5 * (edges[:-1] + edges[1:])
    weight = np.cumsum(counts).astype(np.float64)
    mass = np.cumsum(counts * centres)
    total, total_mass = weight[-1], mass[-1]
    below, above = weight[:-1], total - weight[:-1]
    with np.errstate(divide="ignore", invalid="ignore"):
        mean_below = mass[:-1] / below
        mean_above = (total_mass - mass[:-1]) / above
        between = below * above * (mean_below - mean_above) ** 2
    between = np.nan_to_num(between, nan=-1.0)
    # The level sits on the upper edge of the last bin of the dark class.
    return float(edges[int(np.argmax(between)) + 1])


def convex_hull(mask: BoolArray) -> BoolArray:
    """The smallest convex set of pixels (centres) holding every pixel of a 2D ``mask``."""
    points = np.argwhere(mask)
    if len(points) < 3:
        return mask.copy()
    from scipy.spatial import ConvexHull, QhullError

    try:
        hull = ConvexHull(points)
    except QhullError:  # collinear pixels (a one-pixel-wide line): the mask is its own hull
        return mask.copy()
    rows, cols = np.mgrid[0:mask.shape[0], 0:mask.shape[1]]
    grid = np.stack([rows.ravel(), cols.ravel()], axis=1).astype(np.float64)
    # Inside every facet's half-plane (normal · p + offset <= 0), with a tolerance for the
    # pixels on the hull's edges.
    inside = (grid @ hull.equations[:, :2].T + hull.equations[:, 2]) <= 1e-9
    filled: BoolArray = inside.all(axis=1).reshape(mask.shape) | mask
    return filled


def _ellipses(shape: tuple[int, int], growth: float) -> tuple[BoolArray, BoolArray]:
    h, w = shape
    rows, cols = np.mgrid[0:h, 0:w].astype(np.float64)
    cy, cx, ry, rx = PRIOR_LUNG
    fields = []
    for centre in (cx, 1.0 - cx):
        inside: BoolArray = (((rows + 0.5) / h - cy) / (ry * growth)) ** 2 \
            + (((cols + 0.5) / w - centre) / (rx * growth)) ** 2 <= 1.0
        fields.append(inside)
    return fields[0], fields[1]


def prior_lung_fields(shape: tuple[int, int]) -> tuple[BoolArray, BoolArray]:
    """The anatomical prior (:data:`PRIOR_LUNG`) of the image-left and image-right lung."""
    return _ellipses(shape, 1.0)


def _disk(radius: int) -> BoolArray:
    r = max(1, radius)
    yy, xx = np.mgrid[-r:r + 1, -r:r + 1]
    disk: BoolArray = yy * yy + xx * xx <= r * r
    return disk


def _one_lung(smooth: npt.NDArray[np.float64], prior: BoolArray,
              window: BoolArray) -> BoolArray | None:
    """The lung inside ``window`` (module recipe, steps 2–5), or None when none is plausible."""
    dark = window & (smooth < otsu_threshold(smooth[window]))
    dark = ndimage.binary_opening(dark, structure=_disk(round(OPENING_FRACTION
                                                             * max(smooth.shape))))
    labels, n = ndimage.label(dark)
    if n == 0:
        return None
    overlap = np.bincount(labels[prior], minlength=n + 1)
    overlap[0] = 0
    if overlap.max() == 0:
        return None
    lung = convex_hull(labels == int(np.argmax(overlap)))
    ratio = float(lung.sum()) / float(prior.sum())
    return lung if AREA_RATIO[0] <= ratio <= AREA_RATIO[1] else None


def lung_fields(image: FloatArray) -> LungFields:
    """Estimate the two lung fields of a normalized frontal chest radiograph (module recipe).

    Parameters
    ----------
    image
        H×W, brighter = denser (MONOCHROME2 as the network reads it), any range.

    Returns
    -------
    LungFields
        The mask and how many lungs came from the image rather than the prior.
    """
    img = np.asarray(image, dtype=np.float64)
    if img.ndim != 2:
        raise ValueError(f"expected one H×W image, got shape {img.shape}")
    smooth = ndimage.gaussian_filter(img, sigma=max(1.0, SMOOTH_FRACTION * max(img.shape)))
    shape = (img.shape[0], img.shape[1])
    mask = np.zeros(shape, dtype=bool)
    found = 0
    for prior, window in zip(prior_lung_fields(shape), _ellipses(shape, WINDOW_GROWTH),
                             strict=True):
        lung = _one_lung(smooth, prior, window)
        found += lung is not None
        mask |= prior if lung is None else lung
    return LungFields(mask=mask, from_image=found)


#: Note added to an explanation's caption when its map is restricted to the anatomy.
RESTRICTED_NOTE = {"xray": "map shown within the estimated lung fields",
                   "fundus": "map shown within the field of view",
                   "dermoscopy": "map shown within the estimated lesion"}


def explained_anatomy(kind: str, model_input: FloatArray,
                      box: tuple[int, int, int, int] | None = None) -> BoolArray | None:
    """The anatomy an explanation of a network input of ``kind`` should point at.

    Parameters
    ----------
    kind
        The bundle's ``input``: ``"xray"`` (a frontal chest radiograph: :func:`lung_fields`),
        ``"fundus"`` (the camera's field of view, :func:`dicom_ai.imaging.fundus.fov_mask`),
        ``"dermoscopy"`` (the estimated lesion, :func:`dicom_ai.imaging.dermoscopy.lesion_mask`);
        other kinds have no anatomy here (:data:`RESTRICTED_NOTE` lists those that do).
    model_input
        C×H×W network input in [0, 1].
    box
        (top, left, height, width) of the image inside a padded input; the anatomy is found
        there and is empty in the padding. The whole input if None.

    Returns
    -------
    numpy.ndarray or None
        H×W mask, or None when there is nothing to restrict to.
    """
    x = np.asarray(model_input)
    top, left, h, w = box if box is not None else (0, 0, x.shape[1], x.shape[2])
    content = x[:, top:top + h, left:left + w]
    if kind == "xray":
        inside = lung_fields(content[0]).mask
    elif kind == "fundus":
        from dicom_ai.imaging.fundus import fov_mask

        rgb = np.clip(np.rint(np.moveaxis(content, 0, -1) * 255.0), 0, 255).astype(np.uint8)
        inside = fov_mask(rgb)
    elif kind == "dermoscopy":
        from dicom_ai.imaging.dermoscopy import lesion_mask

        inside = lesion_mask(content).mask
    else:
        return None
    mask = np.zeros(x.shape[1:], dtype=bool)
    mask[top:top + h, left:left + w] = inside
    return mask


def share_inside(heat: FloatArray, mask: BoolArray) -> float:
    """Share of a non-negative map's mass that lies in ``mask`` (NaN for an all-zero map)."""
    values = np.clip(np.asarray(heat, dtype=np.float64), 0.0, None)
    total = float(values.sum())
    return float(values[mask].sum()) / total if total > 0 else float("nan")


def restrict(heat: FloatArray, mask: BoolArray) -> npt.NDArray[np.float32]:
    """The map zeroed outside ``mask`` and rescaled so its maximum inside is 1 (the display
    colours then span the anatomy); all zeros when the map has no mass there."""
    inside = np.where(mask, np.clip(np.asarray(heat, dtype=np.float32), 0.0, None), 0.0)
    peak = float(inside.max()) if inside.size else 0.0
    out: npt.NDArray[np.float32] = (inside / peak if peak > 0 else inside).astype(np.float32)
    return out


__all__ = ["RESTRICTED_NOTE", "LungFields", "convex_hull", "explained_anatomy", "lung_fields",
           "otsu_threshold", "prior_lung_fields", "restrict", "share_inside"]
