"""CT series → one 3D volume in Hounsfield units, with its geometry in patient coordinates.

Slices are ordered by projecting Image Position (Patient) onto the slice normal — never by
file name or Instance Number, which scanners and PACS exports do not keep consistent. A
series that does not form one regular stack (duplicates, gaps, uneven spacing, mixed sizes or
orientations, gantry tilt) is rejected with a reason rather than resampled into something a
model was never trained on.

Axes: arrays are (z, y, x); patient coordinates are DICOM LPS millimetres (x, y, z).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset
from scipy import ndimage

from dicom_ai.dicom.errors import PixelDecodeError, SeriesGeometryError
from dicom_ai.dicom.model import Instance, Series
from dicom_ai.dicom.pixels import check_volume_size, decode

FloatArray = npt.NDArray[np.float64]

#: Two slices closer than this along the normal (mm) are at the same position.
DUPLICATE_TOLERANCE_MM = 0.01
#: A step longer than this many median spacings, and a whole number of them, means slices are
#: missing.
GAP_FACTOR = 1.5
#: Steps may differ from the median by this fraction (scanners round positions; 10 % keeps the
#: worst local distortion of a stack treated as regular below a tenth of a slice).
SPACING_TOLERANCE = 0.1
#: Orientation cosines and pixel spacings that differ by less than this are the same.
ORIENTATION_TOLERANCE = 1e-3
SPACING_RTOL = 1e-3


@dataclass(frozen=True)
class SliceGeometry:
    """Where one slice lies: the header attributes that define the volume grid.

    Attributes
    ----------
    position:
        Image Position (Patient), LPS mm of the centre of the first transmitted pixel.
    orientation:
        Image Orientation (Patient): row direction cosines, then column direction cosines.
    rows, columns:
        Matrix size.
    pixel_spacing:
        Pixel Spacing (row spacing = between rows, column spacing = between columns), mm.
    """

    position: tuple[float, float, float]
    orientation: tuple[float, float, float, float, float, float]
    rows: int
    columns: int
    pixel_spacing: tuple[float, float]


@dataclass(frozen=True)
class CTVolume:
    """A CT series as a regular 3D grid in Hounsfield units.

    Attributes
    ----------
    hu:
        float32, shape (z, y, x).
    spacing:
        (z, y, x) mm; z is the distance between slice centres along the slice normal.
    origin:
        LPS (x, y, z) mm of voxel (0, 0, 0): the first slice's Image Position (Patient).
    direction:
        3×3; columns are the unit LPS vectors of the x (column), y (row) and z (slice) axes.
    instances:
        The source slices in sorted order: one per z for a volume from
        :func:`build_volume`; after :func:`resample` use :meth:`instance_at`.
    """

    hu: npt.NDArray[np.float32]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: FloatArray
    instances: tuple[Instance, ...]

    def index_to_patient(self, zyx: npt.ArrayLike) -> FloatArray:
        """Voxel index (z, y, x), fractional allowed, → LPS (x, y, z) mm.

        Parameters
        ----------
        zyx:
            One index (3,) or many (..., 3).

        Returns
        -------
        numpy.ndarray
            Same leading shape, last axis (x, y, z) in mm.
        """
        index = np.asarray(zyx, dtype=np.float64)
        steps_xyz = index[..., ::-1] * np.asarray(self.spacing[::-1], dtype=np.float64)
        origin = np.asarray(self.origin, dtype=np.float64)
        result: FloatArray = origin + steps_xyz @ self.direction.T
        return result

    def instance_at(self, z: float) -> Instance:
        """The source slice whose plane is nearest to voxel plane ``z``.

        Parameters
        ----------
        z:
            Index along the volume's z axis (of this volume, resampled or not).

        Returns
        -------
        Instance
            The slice to reference for a finding at that depth.
        """
        normal = self.direction[:, 2]
        target = float(self.index_to_patient((z, 0.0, 0.0)) @ normal)
        depths = np.array([_position(i.header) @ normal for i in self.instances])
        return self.instances[int(np.argmin(np.abs(depths - target)))]


def slice_normal(iop: Sequence[float]) -> FloatArray:
    """Unit normal of the image plane: row direction × column direction.

    Parameters
    ----------
    iop:
        Image Orientation (Patient), six direction cosines.

    Returns
    -------
    numpy.ndarray
        (3,) unit vector in LPS.

    Raises
    ------
    SeriesGeometryError
        When the row and column directions are parallel or zero.
    """
    row = np.asarray(iop[:3], dtype=np.float64)
    col = np.asarray(iop[3:6], dtype=np.float64)
    normal = np.cross(row, col)
    length = float(np.linalg.norm(normal))
    if length < 1e-6:
        raise SeriesGeometryError("ImageOrientationPatient row and column directions are "
                                  "parallel")
    return np.asarray(normal / length, dtype=np.float64)


def sort_by_position(positions: Sequence[Sequence[float]], iop: Sequence[float]) -> list[int]:
    """Order of slices along the slice normal (ascending projection of their positions).

    Parameters
    ----------
    positions:
        Image Position (Patient) of each slice.
    iop:
        The (shared) Image Orientation (Patient).

    Returns
    -------
    list of int
        Indices into ``positions``, first slice first; ties keep their input order.
    """
    depths = np.asarray(positions, dtype=np.float64) @ slice_normal(iop)
    return [int(i) for i in np.argsort(depths, kind="stable")]


def to_hu(stored: npt.NDArray[np.generic], slope: float = 1.0,
          intercept: float = 0.0) -> npt.NDArray[np.float32]:
    """Stored values → Hounsfield units: ``slope * stored + intercept`` (the Modality LUT).

    Parameters
    ----------
    stored:
        Decoded stored values.
    slope, intercept:
        Rescale Slope and Rescale Intercept of the slice.

    Returns
    -------
    numpy.ndarray
        float32, same shape.
    """
    return (stored.astype(np.float64) * float(slope) + float(intercept)).astype(np.float32)


def check_geometry(slices: Sequence[SliceGeometry], *, max_tilt_deg: float = 0.5) -> float:
    """Check that slices form one regular stack; return the distance between slices.

    Parameters
    ----------
    slices:
        The slices, in any order.
    max_tilt_deg:
        Largest accepted angle between the stacking direction and the slice normal.

    Returns
    -------
    float
        Slice spacing along the normal, mm (mean step, first to last slice).

    Raises
    ------
    SeriesGeometryError
        Fewer than 2 slices, mixed sizes, orientations or pixel spacings, duplicate
        positions, gantry tilt, missing slices or uneven spacing; the reason says which and
        where.
    """
    if len(slices) < 2:
        raise SeriesGeometryError(f"a CT volume needs at least 2 slices, got {len(slices)}")
    sizes = Counter((s.rows, s.columns) for s in slices)
    if len(sizes) > 1:
        listed = ", ".join(f"{r}×{c} ({n} slices)" for (r, c), n in sizes.most_common())
        raise SeriesGeometryError(f"mixed image sizes: {listed}")
    iop = np.asarray(slices[0].orientation, dtype=np.float64)
    if any(not np.allclose(s.orientation, iop, atol=ORIENTATION_TOLERANCE) for s in slices):
        raise SeriesGeometryError("mixed orientations: ImageOrientationPatient differs "
                                  "between slices")
    spacing0 = np.asarray(slices[0].pixel_spacing, dtype=np.float64)
    if any(not np.allclose(s.pixel_spacing, spacing0, rtol=SPACING_RTOL) for s in slices):
        raise SeriesGeometryError("mixed pixel spacing: PixelSpacing differs between slices")
    normal = slice_normal(slices[0].orientation)
    positions = np.asarray([s.position for s in slices], dtype=np.float64)
    depths = np.sort(positions @ normal)
    steps = np.diff(depths)
    _check_duplicates(depths, steps)
    _check_tilt(positions[sort_by_position(positions.tolist(), slices[0].orientation)],
                normal, max_tilt_deg)
    _check_steps(depths, steps)
    return float((depths[-1] - depths[0]) / (len(depths) - 1))


def _check_duplicates(depths: FloatArray, steps: FloatArray) -> None:
    same = np.nonzero(steps < DUPLICATE_TOLERANCE_MM)[0]
    if same.size:
        at = float(depths[same[0]])
        raise SeriesGeometryError(f"duplicate slice positions: {same.size} slice(s) repeat a "
                                  f"position (first at {at:.2f} mm along the slice normal)")


def _check_tilt(ordered: FloatArray, normal: FloatArray, max_tilt_deg: float) -> None:
    # The first-to-last vector averages out the rounding of individual positions, which over
    # one sub-millimetre step can look like a tilt of a degree.
    stack = ordered[-1] - ordered[0]
    cosine = abs(float(stack @ normal)) / float(np.linalg.norm(stack))
    angle = float(np.degrees(np.arccos(min(1.0, cosine))))
    if angle > max_tilt_deg:
        raise SeriesGeometryError(f"gantry tilt: slices are stacked {angle:.2f}° off the slice "
                                  f"normal (limit {max_tilt_deg:g}°)")


def _check_steps(depths: FloatArray, steps: FloatArray) -> None:
    median = float(np.median(steps))
    ratios = steps / median
    gaps = np.nonzero(ratios > GAP_FACTOR)[0]
    # A missing slice leaves a step of a whole number of spacings. Steps of other lengths
    # (e.g. a head protocol switching from 4 mm to 7 mm slices) are a different spacing,
    # not a hole, and are reported as such.
    whole = bool(np.all(np.abs(ratios[gaps] - np.rint(ratios[gaps])) <= SPACING_TOLERANCE))
    if gaps.size and whole:
        k = int(gaps[0])
        raise SeriesGeometryError(
            f"missing slices: {steps[k]:.2f} mm gap between {depths[k]:.2f} and "
            f"{depths[k + 1]:.2f} mm along the slice normal, about {round(ratios[k]) - 1} "
            f"slice(s) missing (median spacing {median:.2f} mm; {gaps.size} gap(s))")
    if np.any(np.abs(ratios - 1.0) > SPACING_TOLERANCE):
        raise SeriesGeometryError(f"inconsistent spacing: slice steps range from "
                                  f"{steps.min():.2f} to {steps.max():.2f} mm (median "
                                  f"{median:.2f} mm)")


def build_volume(series: Series, *, max_tilt_deg: float = 0.5) -> CTVolume:
    """Decode a CT series into a :class:`CTVolume` in Hounsfield units.

    Parameters
    ----------
    series:
        Single-frame CT slices of one series, in any order.
    max_tilt_deg:
        Largest accepted gantry tilt (see :func:`check_geometry`).

    Returns
    -------
    CTVolume
        Slices sorted along the normal; each slice rescaled with its own slope/intercept.

    Raises
    ------
    SeriesGeometryError
        Missing geometry attributes, multi-frame instances, or a stack
        :func:`check_geometry` rejects.
    PixelDecodeError
        A slice cannot be decoded, or the volume would exceed ``limits.max_volume_mb``
        (checked from the headers, before any slice is decoded).
    """
    instances = list(series.instances)
    geometry = [_geometry(i) for i in instances]
    spacing_z = check_geometry(geometry, max_tilt_deg=max_tilt_deg)
    first = geometry[0]
    order = sort_by_position([g.position for g in geometry], first.orientation)
    check_volume_size(len(order), first.rows, first.columns,
                      bytes_per_voxel=np.dtype(np.float32).itemsize)
    hu = np.empty((len(order), first.rows, first.columns), dtype=np.float32)
    for z, k in enumerate(order):
        stored = decode(instances[k])
        if stored.shape != hu.shape[1:]:
            raise PixelDecodeError(f"decoded slice has shape {stored.shape}, expected "
                                   f"{hu.shape[1:]}", path=instances[k].path)
        header = instances[k].header
        hu[z] = to_hu(stored, _float(header, "RescaleSlope", 1.0),
                      _float(header, "RescaleIntercept", 0.0))
    row = np.asarray(first.orientation[:3], dtype=np.float64)
    col = np.asarray(first.orientation[3:], dtype=np.float64)
    direction = np.column_stack([row, col, slice_normal(first.orientation)])
    origin = geometry[order[0]].position
    spacing = (spacing_z, first.pixel_spacing[0], first.pixel_spacing[1])
    return CTVolume(hu, spacing, origin, direction, tuple(instances[k] for k in order))


def resample(volume: CTVolume, spacing: tuple[float, float, float]) -> CTVolume:
    """Resample onto a grid with the given (z, y, x) spacing, trilinear.

    The new grid starts at the same first voxel and covers the old extent without
    extrapolating: ``n' = floor((n - 1) * s / s') + 1`` along each axis.

    Parameters
    ----------
    volume:
        The volume to resample.
    spacing:
        Target (z, y, x) spacing in mm, all positive.

    Returns
    -------
    CTVolume
        Same origin, direction and source instances; new ``hu`` and ``spacing``.
    """
    if min(spacing) <= 0:
        raise ValueError(f"spacing must be positive, got {spacing}")
    old = np.asarray(volume.spacing, dtype=np.float64)
    new = np.asarray(spacing, dtype=np.float64)
    step = new / old  # one output voxel, in input voxels
    extent = (np.asarray(volume.hu.shape, dtype=np.float64) - 1.0) / step
    shape = tuple(int(n) for n in np.floor(extent + 1e-6).astype(int) + 1)
    hu = ndimage.affine_transform(volume.hu, step, output_shape=shape, order=1,
                                  mode="nearest").astype(np.float32, copy=False)
    return CTVolume(hu, (float(new[0]), float(new[1]), float(new[2])), volume.origin,
                    volume.direction, volume.instances)


def _geometry(instance: Instance) -> SliceGeometry:
    header = instance.header
    frames = header.get("NumberOfFrames")
    if frames not in (None, "") and int(frames) > 1:
        raise SeriesGeometryError(f"multi-frame CT ({int(frames)} frames in one instance) is "
                                  "not supported; a series of single-frame slices is",
                                  path=instance.path)
    for keyword, tag in (("ImagePositionPatient", "(0020,0032)"),
                         ("ImageOrientationPatient", "(0020,0037)"),
                         ("PixelSpacing", "(0028,0030)"), ("Rows", "(0028,0010)"),
                         ("Columns", "(0028,0011)")):
        if header.get(keyword) in (None, ""):
            raise SeriesGeometryError(f"a slice has no {keyword} {tag}", path=instance.path)
    iop = [float(v) for v in header.ImageOrientationPatient]
    ps = [float(v) for v in header.PixelSpacing]
    if len(iop) != 6 or len(ps) != 2 or len(header.ImagePositionPatient) != 3:
        raise SeriesGeometryError("a slice has a malformed ImagePositionPatient, "
                                  "ImageOrientationPatient or PixelSpacing", path=instance.path)
    position = _position(header)
    return SliceGeometry((float(position[0]), float(position[1]), float(position[2])),
                         (iop[0], iop[1], iop[2], iop[3], iop[4], iop[5]),
                         int(header.Rows), int(header.Columns), (ps[0], ps[1]))


def _position(header: Dataset) -> FloatArray:
    return np.asarray([float(v) for v in header.ImagePositionPatient], dtype=np.float64)


def _float(header: Dataset, keyword: str, default: float) -> float:
    value = header.get(keyword)
    return default if value in (None, "") else float(value)


__all__ = ["CTVolume", "SliceGeometry", "build_volume", "check_geometry", "resample",
           "slice_normal", "sort_by_position", "to_hu"]
