"""Classical lung segmentation and quantitative lung CT measures on a Hounsfield-unit volume.

Everything here is a pure function of arrays in (z, y, x) order plus the voxel spacing and the
direction cosines of the volume, so it is tested on constructed phantoms with known answers.

The recipe (thresholds from the quantitative-CT literature, e.g. Hu, Hoffman & Reinhardt 2001):

1. body: voxels above −500 HU, the largest 3D component (drops the table and cables), holes
   filled slice by slice (a 3D fill would leave lungs that touch the first/last slice open);
2. lung candidates: air-like voxels (below −320 HU) inside the filled body, which excludes the
   outside air by construction;
3. airways: the trachea, main bronchi (and an air-filled oesophagus) are removed as small 2D air
   regions near the body centre line; a lung cross-section there is joined to its lung in the
   slice and so is not small. A density criterion (airway lumen is purer air than parenchyma)
   fails on thick slices, where partial volume brings the trachea to about −850 HU;
4. left/right: 3D components assigned to a side by their centroid along the patient's left-right
   axis, found from the direction cosines; a component straddling the midline (lungs touching at
   the anterior junction) is cut at its thinnest column near the body centre;
5. components smaller than 5 mL or 5 % of the largest are dropped (bowel gas, table foam);
6. per side: a small in-plane closing and per-slice filling of holes up to 20 cm², so vessels and
   nodules inside the lung count as lung (as in the standard lung volume and mean lung density)
   while the stomach or heart ringed by lung does not.

Where a nodule detector may report a candidate (:func:`search_region`, :func:`below_lung_bases`)
is a wider question than lung volume: a juxtapleural nodule or a hilar mass is soft tissue in
a notch of the air-based mask, so each lung is closed per slice with a 15 mm disk (notches up
to about 3 cm wide close; the heart's indentation, wider, stays out). The dome of the liver
is the opposite case: its cap shows as a round soft-tissue island ringed by lung on axial
slices, is filled into the lung mask as a hole, and looks like a nodule slice by slice. What
sets it apart is that no aerated lung lies beneath it: that is what :func:`below_lung_bases`
marks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from scipy import ndimage

from dicom_ai.imaging.xray import window_linear

BoolArray = npt.NDArray[np.bool_]
FloatArray = npt.NDArray[np.floating]

#: Body/air boundary (HU): midway between air (−1000) and fat (about −100).
BODY_THRESHOLD_HU = -500.0
#: Upper bound of aerated lung (HU); denser voxels are soft tissue or vessels.
LUNG_THRESHOLD_HU = -320.0
#: Emphysema index threshold (HU) of %LAA-950.
LAA_THRESHOLD_HU = -950.0
#: Largest cross-section (mm²) of a 2D region still taken for trachea or main bronchus.
AIRWAY_MAX_AREA_MM2 = 700.0
#: An airway region lies within this share of the body width from the body centre (left-right).
AIRWAY_CENTRAL_FRACTION = 0.15
#: 3D lung components smaller than this (mL) are noise, bowel gas or residual airway.
MIN_COMPONENT_ML = 5.0
#: Enclosed holes up to this area (mm²) are filled: vessels, nodules and masses up to about 5 cm;
#: larger ones are the stomach or heart ringed by lung at the diaphragm and the hilum.
MAX_HOLE_MM2 = 2000.0
#: Components smaller than this share of the largest one are bowel gas or a detached airway.
MIN_COMPONENT_SHARE = 0.05
#: A component with at least this share of its voxels on each side of the body centre holds both
#: lungs and is cut in two.
STRADDLE_SHARE = 0.2
#: Radius (mm) of the in-plane closing that smooths the lung border at juxtapleural vessels.
CLOSING_RADIUS_MM = 2.0
#: Radius (mm) of the in-plane closing of each lung that gives the candidate search region.
SEARCH_CLOSING_MM = 15.0


@dataclass(frozen=True)
class LungMasks:
    """Segmentation result, each mask the shape of the HU volume (z, y, x)."""

    body: BoolArray
    left: BoolArray
    right: BoolArray

    @property
    def lungs(self) -> BoolArray:
        """Both lungs."""
        return self.left | self.right


@dataclass(frozen=True)
class LungMeasurements:
    """Standard quantitative lung CT measures."""

    volume_left_ml: float
    volume_right_ml: float
    mean_density_hu: float
    laa950_percent: float


def patient_axis(direction: npt.ArrayLike, lps: int) -> tuple[int, int]:
    """Array axis of a (z, y, x) volume that runs closest to one patient (LPS) axis.

    Parameters
    ----------
    direction
        3×3 matrix whose columns are the unit vectors, in LPS, of the column (x), row (y) and
        slice (z) axes of the volume.
    lps
        0 for the patient's left (LPS +x), 1 for posterior (+y), 2 for superior (+z).

    Returns
    -------
    axis, sign
        ``axis`` is 0, 1 or 2 in (z, y, x) array order; ``sign`` is +1 when increasing the index
        along it moves towards the LPS axis' positive direction, −1 otherwise.
    """
    d = np.asarray(direction, dtype=np.float64)
    if d.shape != (3, 3):
        raise ValueError(f"direction must be 3×3, got {d.shape}")
    # Row ``lps`` of the matrix is that LPS component of each array axis' unit vector.
    components = d[lps]
    col = int(np.argmax(np.abs(components)))
    axis = 2 - col  # direction columns are (x, y, z); array axes are (z, y, x)
    return axis, 1 if components[col] > 0 else -1


def left_right_axis(direction: npt.ArrayLike) -> tuple[int, int]:
    """Array axis (and sign) along the patient's left-right direction: sign +1 when increasing
    the index moves towards the patient's left (:func:`patient_axis` of LPS x)."""
    return patient_axis(direction, 0)


def _disk(radius_px: int) -> BoolArray:
    r = max(1, radius_px)
    yy, xx = np.mgrid[-r:r + 1, -r:r + 1]
    disk: BoolArray = (yy * yy + xx * xx) <= r * r
    return disk


def _per_slice(mask: BoolArray, margin: int,
               operation: Callable[[BoolArray], BoolArray]) -> BoolArray:
    """``operation`` applied to each slice of ``mask``, on the slice's bounding box of True
    pixels widened by ``margin`` (clipped to the slice); False outside it and on empty slices.

    The result is the operation on the whole slice whenever the operation changes nothing
    farther than ``margin`` from the mask and sees the slice border only as background, which
    holds for the fills, closings and distance thresholds here. One lung's box is a fraction
    of the slice, and the slices above and below the lungs are skipped.
    """
    out = np.zeros_like(mask)
    rows_any: BoolArray = np.any(mask, axis=2)
    cols_any: BoolArray = np.any(mask, axis=1)
    for k in range(mask.shape[0]):
        rows, cols = np.nonzero(rows_any[k])[0], np.nonzero(cols_any[k])[0]
        if rows.size == 0:
            continue
        box = (slice(max(0, int(rows[0]) - margin), int(rows[-1]) + margin + 1),
               slice(max(0, int(cols[0]) - margin), int(cols[-1]) + margin + 1))
        out[k][box] = operation(mask[k][box])
    return out


def _fill_slices(mask: BoolArray) -> BoolArray:
    return _per_slice(mask, 1, ndimage.binary_fill_holes)


def _largest_component(mask: BoolArray) -> BoolArray:
    labels, n = ndimage.label(mask)
    if n == 0:
        return np.zeros_like(mask)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    largest: BoolArray = labels == int(np.argmax(sizes))
    return largest


def body_mask(hu: FloatArray, threshold: float = BODY_THRESHOLD_HU) -> BoolArray:
    """The patient's body: largest component above ``threshold`` HU, holes filled per slice.

    Parameters
    ----------
    hu
        (z, y, x) volume in Hounsfield units.
    threshold
        Body/air boundary in HU.

    Returns
    -------
    numpy.ndarray
        Boolean mask of the body with the lungs and airways inside it filled.
    """
    return _fill_slices(_largest_component(hu > threshold))


def _remove_airways(candidates: BoolArray, body: BoolArray,
                    spacing: tuple[float, float, float], lr_axis: int) -> BoolArray:
    pixel_area = spacing[1] * spacing[2]
    # In-plane left-right axis of the slices: 1 → columns, 0 → rows (axial or coronal slices).
    lr_in_plane = lr_axis - 1 if lr_axis > 0 else 1
    # Each pixel's index along that axis, for the regions' centroids.
    position = np.broadcast_to(np.arange(candidates.shape[1 + lr_in_plane]).reshape(
        (-1, 1) if lr_in_plane == 0 else (1, -1)), candidates.shape[1:]).ravel()
    out = candidates.copy()
    for k in range(candidates.shape[0]):
        body_k = body[k]
        if not body_k.any():
            continue
        coords = np.nonzero(body_k.any(axis=1 - lr_in_plane))[0]
        centre, width = 0.5 * (coords.min() + coords.max()), float(coords.max() - coords.min() + 1)
        labels, n = ndimage.label(candidates[k])
        if n == 0:
            continue
        counts = np.bincount(labels.ravel())[1:]
        centroid = np.bincount(labels.ravel(), weights=position)[1:] / counts
        central = np.abs(centroid - centre) <= AIRWAY_CENTRAL_FRACTION * width
        areas = counts * pixel_area
        airway = np.concatenate(([False], central & (areas <= AIRWAY_MAX_AREA_MM2)))
        out[k] &= ~airway[labels]
    return out


def _split_straddling(component: BoolArray, lr_axis: int, centre: float) -> BoolArray:
    """Mask of the part of ``component`` on the high-index side of its thinnest midline cut."""
    other = tuple(a for a in range(3) if a != lr_axis)
    profile = component.sum(axis=other).astype(np.float64)
    idx = np.nonzero(profile)[0]
    lo, hi = int(idx.min()), int(idx.max())
    # Look for the cut only in the middle third of the component, around the body centre, so
    # a thin lateral portion (a lung tip) is not mistaken for the junction.
    third = (hi - lo) / 3.0
    start = int(max(lo + third, centre - third / 2))
    stop = int(min(hi - third, centre + third / 2)) + 1
    if stop <= start:
        start, stop = int(lo + third), int(hi - third) + 1
    cut = start + int(np.argmin(profile[start:stop]))
    high = np.zeros_like(component)
    sl: list[slice] = [slice(None)] * 3
    sl[lr_axis] = slice(cut + 1, None)
    high[tuple(sl)] = component[tuple(sl)]
    return high


def _fill_small_holes(mask2d: BoolArray, max_area_px: float) -> BoolArray:
    holes = ndimage.binary_fill_holes(mask2d) & ~mask2d
    labels, n = ndimage.label(holes)
    if n == 0:
        return mask2d
    areas = np.bincount(labels.ravel())
    small = areas <= max_area_px
    small[0] = False
    filled: BoolArray = mask2d | small[labels]
    return filled


def _smooth_side(mask: BoolArray, spacing: tuple[float, float, float]) -> BoolArray:
    radius_px = round(CLOSING_RADIUS_MM / min(spacing[1], spacing[2]))
    disk = _disk(radius_px)
    max_hole_px = MAX_HOLE_MM2 / (spacing[1] * spacing[2])
    pad = disk.shape[0]

    def smooth(mask2d: BoolArray) -> BoolArray:
        # Pad so the closing's erosion does not eat a lung that touches the slice border.
        padded = np.pad(mask2d, pad)
        closed = ndimage.binary_closing(padded, structure=disk)[pad:-pad, pad:-pad]
        return _fill_small_holes(closed | mask2d, max_hole_px)

    return _per_slice(mask, 2 * pad + 1, smooth)


def segment_lungs(hu: FloatArray, spacing: tuple[float, float, float],
                  direction: npt.ArrayLike) -> LungMasks:
    """Segment the body and the left and right lungs of a chest CT volume.

    Parameters
    ----------
    hu
        (z, y, x) volume in Hounsfield units.
    spacing
        Voxel size (z, y, x) in mm.
    direction
        3×3 direction cosines (columns: x, y, z axes in LPS); decides which side is the
        patient's left (LPS +x), whatever the orientation of the slices.

    Returns
    -------
    LungMasks
        Body, left and right lung masks; the lungs are empty when no lung-like air is found.
    """
    hu = np.asarray(hu)
    if hu.ndim != 3:
        raise ValueError(f"expected a (z, y, x) volume, got shape {hu.shape}")
    lr_axis, lr_sign = left_right_axis(direction)
    body = body_mask(hu)
    candidates = body & (hu < LUNG_THRESHOLD_HU)
    candidates = _remove_airways(candidates, body, spacing, lr_axis)

    voxel_ml = float(np.prod(spacing)) / 1000.0
    labels, n = ndimage.label(candidates)
    left = np.zeros_like(candidates)
    right = np.zeros_like(candidates)
    if n:
        other = tuple(a for a in range(3) if a != lr_axis)
        body_profile = np.nonzero(body.any(axis=other))[0]
        centre = 0.5 * (body_profile.min() + body_profile.max()) if body_profile.size else 0.0
        sizes = np.bincount(labels.ravel())
        sizes[0] = 0
        keep_from = max(MIN_COMPONENT_ML / voxel_ml, MIN_COMPONENT_SHARE * sizes.max())
        for label in range(1, n + 1):
            if sizes[label] < keep_from:
                continue
            component = labels == label
            profile = component.sum(axis=other)
            high_share = profile[int(centre) + 1:].sum() / profile.sum()
            # A lung crosses the body centre by a little; both lungs joined at the anterior
            # junction put a large share of the component on each side.
            if STRADDLE_SHARE < high_share < 1.0 - STRADDLE_SHARE:
                high = _split_straddling(component, lr_axis, centre)
            else:
                high = component if high_share >= 0.5 else np.zeros_like(component)
            low = component & ~high
            # Patient left is the high-index side when increasing the index moves to LPS +x.
            left |= high if lr_sign > 0 else low
            right |= low if lr_sign > 0 else high
    left = _smooth_side(left, spacing)
    right = _smooth_side(right, spacing) & ~left
    return LungMasks(body=body, left=left, right=right)


def measure_lungs(hu: FloatArray, masks: LungMasks,
                  spacing: tuple[float, float, float]) -> LungMeasurements:
    """Lung volume per side, mean lung density and the emphysema index %LAA-950.

    Parameters
    ----------
    hu
        (z, y, x) volume in Hounsfield units.
    masks
        Result of :func:`segment_lungs` (or any masks of the same shape).
    spacing
        Voxel size (z, y, x) in mm.

    Returns
    -------
    LungMeasurements
        Volumes in mL (voxel count × voxel volume), mean HU over both lungs and the percentage of
        lung voxels below −950 HU. Density and %LAA are NaN when the lungs are empty.
    """
    voxel_ml = float(np.prod(spacing)) / 1000.0
    lungs = masks.lungs
    values = np.asarray(hu)[lungs]
    if values.size == 0:
        mean, laa = float("nan"), float("nan")
    else:
        mean = float(values.mean(dtype=np.float64))
        laa = 100.0 * float(np.count_nonzero(values < LAA_THRESHOLD_HU)) / values.size
    return LungMeasurements(volume_left_ml=float(np.count_nonzero(masks.left)) * voxel_ml,
                            volume_right_ml=float(np.count_nonzero(masks.right)) * voxel_ml,
                            mean_density_hu=mean, laa950_percent=laa)


def close_in_plane(mask: BoolArray, radius_mm: float,
                   spacing: tuple[float, float, float]) -> BoolArray:
    """Closing of each axial slice of ``mask`` with a disk of ``radius_mm``, holes then filled.

    Done with two Euclidean distance transforms in mm (dilate: within ``radius_mm`` of the
    mask; erode: farther than ``radius_mm`` from outside the dilation), which costs the same
    whatever the radius, unlike a morphological closing with a large disk. The slice is padded
    by the radius so the erosion does not eat a mask that touches its border.
    """
    pad = int(np.ceil(radius_mm / min(spacing[1], spacing[2]))) + 1

    def close(mask2d: BoolArray) -> BoolArray:
        padded = np.pad(mask2d, pad)
        dilated = ndimage.distance_transform_edt(~padded, sampling=spacing[1:]) <= radius_mm
        closed = ndimage.distance_transform_edt(dilated, sampling=spacing[1:]) > radius_mm
        filled: BoolArray = ndimage.binary_fill_holes(closed[pad:-pad, pad:-pad] | mask2d)
        return filled

    # The dilation reaches ``pad`` pixels beyond the mask, and the erosion asks no farther than
    # ``pad`` beyond the dilation.
    return _per_slice(mask, 2 * pad + 1, close)


def search_region(masks: LungMasks, spacing: tuple[float, float, float],
                  radius_mm: float = SEARCH_CLOSING_MM) -> BoolArray:
    """Where a lung nodule or mass may lie: each lung closed per slice (:func:`close_in_plane`).

    Closing each side on its own keeps the mediastinum between the lungs out; the closing takes
    in the juxtapleural and hilar notches that the air-based mask leaves open.
    """
    region: BoolArray = close_in_plane(masks.left, radius_mm, spacing) | close_in_plane(
        masks.right, radius_mm, spacing)
    return region


def below_lung_bases(hu: FloatArray, masks: LungMasks, direction: npt.ArrayLike) -> BoolArray:
    """Soft tissue (above :data:`BODY_THRESHOLD_HU`) with no aerated lung beneath it.

    A voxel is marked when, along the array axis closest to the patient's craniocaudal axis,
    no voxel of its column caudal to it is aerated lung (inside the lung masks and below
    :data:`LUNG_THRESHOLD_HU`): the diaphragm, the liver dome and the abdomen below the lung
    bases, and also the heart where it rests on the diaphragm. Vessels and nodules inside a
    lobe have aerated lung beneath them.

    Parameters
    ----------
    hu
        (z, y, x) volume in Hounsfield units.
    masks
        Result of :func:`segment_lungs`.
    direction
        3×3 direction cosines; decide which way is caudal.

    Returns
    -------
    numpy.ndarray
        Boolean mask, the shape of ``hu``.
    """
    hu = np.asarray(hu)
    axis, sign = patient_axis(direction, 2)
    aerated = masks.lungs & (hu < LUNG_THRESHOLD_HU)
    # Caudal is towards lower index when the index runs to the head (sign +1): accumulate the
    # "aerated lung seen so far" from the caudal end of each column.
    ordered = aerated if sign > 0 else np.flip(aerated, axis=axis)
    seen = np.logical_or.accumulate(ordered, axis=axis)
    beneath = seen if sign > 0 else np.flip(seen, axis=axis)
    below: BoolArray = masks.body & (hu > BODY_THRESHOLD_HU) & ~beneath
    return below


def lung_fraction(masks: LungMasks) -> float:
    """Share of the body volume that is segmented lung (0 when there is no body).

    A chest CT through the lungs has roughly 0.15–0.5; a head, abdomen or limb scan has almost
    none, which is the image-based check that a series is a chest.
    """
    body = int(np.count_nonzero(masks.body))
    return 0.0 if body == 0 else float(np.count_nonzero(masks.lungs)) / body


def lung_window(hu: FloatArray, center: float = -600.0, width: float = 1500.0
                ) -> npt.NDArray[np.uint8]:
    """Display a HU image in the lung window (default W 1500 / L −600) as uint8."""
    unit = window_linear(np.asarray(hu), center, width)
    out: npt.NDArray[np.uint8] = np.rint(unit * 255.0).astype(np.uint8)
    return out


__all__ = [
    "LungMasks",
    "LungMeasurements",
    "below_lung_bases",
    "body_mask",
    "close_in_plane",
    "left_right_axis",
    "lung_fraction",
    "lung_window",
    "measure_lungs",
    "patient_axis",
    "search_region",
    "segment_lungs",
]
