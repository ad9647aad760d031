"""Where a CT candidate lies on the source slices: its box on the key slice and its mask.

A candidate is found on the network's resampled grid (:func:`dicom_ai.imaging.ct.resample`,
same origin and direction as the source volume); viewers draw on the source slices. These
functions carry a candidate back: :func:`in_plane_box` gives the box in a slice's stored pixel
grid (SCOORD coordinates, for the SR's 2D region) and :func:`candidate_masks` the candidate's
connected region on every source slice it covers (for the DICOM Segmentation).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset
from scipy import ndimage

from dicom_ai.imaging.ct import CTVolume
from dicom_ai.inference.findings import BoxPx, CandidateMask

Index3 = tuple[int, int, int]


def in_plane_box(lo: Index3, hi: Index3, grid_spacing: Sequence[float],
                 header: Dataset) -> BoxPx:
    """The (y, x) extent of a grid box on a source slice, as ``(col_min, row_min, col_max,
    row_max)`` in SCOORD pixel coordinates ((0, 0) = top-left corner of the first pixel).

    Grid voxel ``i`` is centred ``i · grid spacing`` mm from the first source pixel's centre
    and covers half a grid step either side; that pixel's centre is at 0.5 in SCOORD
    coordinates. Clipped to the slice.
    """
    row_mm, col_mm = (float(v) for v in header.PixelSpacing)
    rows, cols = float(header.Rows), float(header.Columns)

    def edge(index: float, step: float, pixel: float, limit: float) -> float:
        return float(np.clip(index * step / pixel + 0.5, 0.0, limit))

    gy, gx = float(grid_spacing[1]), float(grid_spacing[2])
    return (edge(lo[2] - 0.5, gx, col_mm, cols), edge(lo[1] - 0.5, gy, row_mm, rows),
            edge(hi[2] + 0.5, gx, col_mm, cols), edge(hi[1] + 0.5, gy, row_mm, rows))


def candidate_masks(prob: npt.NDArray[np.float32], threshold: float,
                    boxes: Sequence[tuple[Index3, Index3]], volume: CTVolume,
                    grid: CTVolume) -> list[CandidateMask | None]:
    """Each candidate's connected region of ``prob >= threshold`` on the source slices.

    Parameters
    ----------
    prob:
        (z, y, x) probability map on ``grid``.
    threshold:
        The level the candidates were formed at (their regions are the connected components
        of the map at that level, 26-connected).
    boxes:
        Each candidate's inclusive (lo, hi) grid box; the component is the one holding the
        highest probability inside the box.
    volume:
        The source volume (one z per source slice, in the slices' own pixel grid).
    grid:
        ``volume`` resampled to the map's spacing.

    Returns
    -------
    list
        Per candidate a mask on the source slices it covers (nearest grid voxel per source
        pixel), or ``None`` when nothing of it lands on a source pixel.
    """
    labels, _ = ndimage.label(prob >= threshold, structure=np.ones((3, 3, 3), dtype=bool))
    scale = np.asarray(volume.spacing) / np.asarray(grid.spacing)
    z_of = np.clip(np.rint(np.arange(volume.hu.shape[0]) * scale[0]).astype(int), 0,
                   prob.shape[0] - 1)
    y_of = np.clip(np.rint(np.arange(volume.hu.shape[1]) * scale[1]).astype(int), 0,
                   prob.shape[1] - 1)
    x_of = np.clip(np.rint(np.arange(volume.hu.shape[2]) * scale[2]).astype(int), 0,
                   prob.shape[2] - 1)
    out: list[CandidateMask | None] = []
    for lo, hi in boxes:
        window = tuple(slice(a, b + 1) for a, b in zip(lo, hi, strict=True))
        inside = np.where(labels[window] > 0, prob[window], -1.0)
        peak = np.unravel_index(int(np.argmax(inside)), inside.shape)
        label = int(labels[window][peak])
        ks = [k for k in range(volume.hu.shape[0]) if lo[0] <= z_of[k] <= hi[0]]
        planes = [(labels[z_of[k]] == label)[np.ix_(y_of, x_of)] for k in ks] if label else []
        kept = [(k, p) for k, p in zip(ks, planes, strict=True) if p.any()]
        out.append(CandidateMask(
            slices=tuple(volume.instances[k].SOPInstanceUID for k, _ in kept),
            pixels=np.stack([p for _, p in kept])) if kept else None)
    return out
