"""Lung segmentation and measurements on constructed HU phantoms with known answers."""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt
import pytest

from dicom_ai.imaging.lung import (
    LungMasks,
    below_lung_bases,
    body_mask,
    close_in_plane,
    left_right_axis,
    lung_fraction,
    lung_window,
    measure_lungs,
    patient_axis,
    search_region,
    segment_lungs,
)

SPACING = (2.5, 2.0, 2.0)  # (z, y, x) mm
SHAPE = (40, 128, 128)
VOXEL_ML = 2.5 * 2.0 * 2.0 / 1000.0
IDENTITY = np.eye(3)

Bool = npt.NDArray[np.bool_]


def _grid() -> tuple[npt.NDArray[np.float64], ...]:
    zz, yy, xx = np.meshgrid(*(np.arange(n, dtype=np.float64) for n in SHAPE), indexing="ij")
    return zz, yy, xx


def _ellipsoid(centre: tuple[float, float, float], semi: tuple[float, float, float]) -> Bool:
    zz, yy, xx = _grid()
    inside: Bool = (((zz - centre[0]) / semi[0]) ** 2 + ((yy - centre[1]) / semi[1]) ** 2
                    + ((xx - centre[2]) / semi[2]) ** 2) <= 1.0
    return inside


def _body() -> Bool:
    _, yy, xx = _grid()
    cylinder: Bool = (yy - 64) ** 2 + (xx - 64) ** 2 <= 55**2
    return cylinder


HIGH_X = _ellipsoid((20, 64, 92), (12, 30, 18))  # high column index: patient left for identity
LOW_X = _ellipsoid((20, 64, 36), (12, 30, 18))


def _phantom() -> npt.NDArray[np.float32]:
    """Air outside, a 40 HU body cylinder and two −850 HU ellipsoid lungs."""
    hu = np.full(SHAPE, -1000.0, dtype=np.float32)
    hu[_body()] = 40.0
    hu[HIGH_X | LOW_X] = -850.0
    return hu


def test_volumes_match_the_constructed_lungs() -> None:
    hu = _phantom()
    masks = segment_lungs(hu, SPACING, IDENTITY)
    assert np.array_equal(masks.left, HIGH_X)
    assert np.array_equal(masks.right, LOW_X)
    m = measure_lungs(hu, masks, SPACING)
    assert m.volume_left_ml == pytest.approx(HIGH_X.sum() * VOXEL_ML)
    # The voxelized ellipsoid is within 2 % of 4/3·π·abc (30 mm × 60 mm × 36 mm semi-axes).
    analytic_ml = 4.0 / 3.0 * math.pi * 30 * 60 * 36 / 1000.0
    assert m.volume_right_ml == pytest.approx(analytic_ml, rel=0.02)
    assert m.mean_density_hu == pytest.approx(-850.0)
    assert m.laa950_percent == 0.0


def test_flipped_columns_swap_the_sides() -> None:
    # Columns running towards patient right (LPS −x): the high-index lung is the right one.
    direction = np.diag([-1.0, 1.0, 1.0])
    assert left_right_axis(direction) == (2, -1)
    masks = segment_lungs(_phantom(), SPACING, direction)
    assert np.array_equal(masks.right, HIGH_X)
    assert np.array_equal(masks.left, LOW_X)


def test_emphysema_block_gives_laa_and_mean_density() -> None:
    hu = _phantom()
    block = np.zeros(SHAPE, dtype=bool)
    block[16:24, 56:72, 86:98] = True  # 8 × 16 × 12 voxels, inside the left lung
    assert np.all(HIGH_X[block])
    hu[block] = -980.0
    masks = segment_lungs(hu, SPACING, IDENTITY)
    m = measure_lungs(hu, masks, SPACING)
    n_lung = int(HIGH_X.sum() + LOW_X.sum())
    assert m.laa950_percent == pytest.approx(100.0 * block.sum() / n_lung)
    expected_mean = (-850.0 * (n_lung - block.sum()) - 980.0 * block.sum()) / n_lung
    assert m.mean_density_hu == pytest.approx(expected_mean)


def test_vessel_inside_the_lung_counts_as_lung() -> None:
    hu = _phantom()
    zz, yy, xx = _grid()
    # Through the inner slices only: near the lung tips the vessel would reach the lung border
    # and be a notch rather than an enclosed hole.
    vessel = ((yy - 64) ** 2 + (xx - 36) ** 2 <= 2**2) & LOW_X & (zz >= 12) & (zz <= 28)
    hu[vessel] = 40.0
    masks = segment_lungs(hu, SPACING, IDENTITY)
    m = measure_lungs(hu, masks, SPACING)
    assert m.volume_right_ml == pytest.approx(LOW_X.sum() * VOXEL_ML)
    n_lung = int(HIGH_X.sum() + LOW_X.sum())
    expected_mean = (-850.0 * (n_lung - vessel.sum()) + 40.0 * vessel.sum()) / n_lung
    assert m.mean_density_hu == pytest.approx(expected_mean)


def test_trachea_and_outside_air_are_not_lung() -> None:
    hu = _phantom()
    _, yy, xx = _grid()
    trachea = (yy - 50) ** 2 + (xx - 64) ** 2 <= 5**2  # 10 mm radius air tube, every slice
    hu[trachea] = -1000.0
    masks = segment_lungs(hu, SPACING, IDENTITY)
    assert not masks.lungs[trachea].any()
    assert np.array_equal(masks.lungs, HIGH_X | LOW_X)
    assert np.array_equal(masks.body, _body())


def test_lungs_cut_by_the_volume_edges_are_measured() -> None:
    # A fragment: the lungs run through the first and last slice, as in a short series.
    hu = _phantom()
    tube_high = _ellipsoid((20, 64, 92), (1000, 30, 18))
    hu[tube_high] = -850.0
    masks = segment_lungs(hu, SPACING, IDENTITY)
    assert np.array_equal(masks.left, tube_high)


def test_lungs_joined_at_the_midline_are_split() -> None:
    hu = _phantom()
    bridge = np.zeros(SHAPE, dtype=bool)
    bridge[18:22, 62:66, 53:76] = True  # a thin junction joining both lungs
    hu[bridge] = -850.0
    masks = segment_lungs(hu, SPACING, IDENTITY)
    m = measure_lungs(hu, masks, SPACING)
    assert not (masks.left & masks.right).any()
    constructed = HIGH_X | LOW_X | bridge
    assert masks.lungs[constructed].all()
    # The closing rounds the concave corners where the bridge meets the lungs: a few voxels.
    assert masks.lungs.sum() - constructed.sum() <= 16
    # The bridge (336 voxels) is shared out; each side stays within it of its own ellipsoid.
    assert abs(m.volume_left_ml - HIGH_X.sum() * VOXEL_ML) <= bridge.sum() * VOXEL_ML
    assert abs(m.volume_right_ml - LOW_X.sum() * VOXEL_ML) <= bridge.sum() * VOXEL_ML


def test_head_like_volume_has_almost_no_lung() -> None:
    hu = np.full(SHAPE, -1000.0, dtype=np.float32)
    hu[_body()] = 40.0
    hu[_ellipsoid((20, 40, 64), (3, 4, 6))] = -1000.0  # a sinus-sized air pocket
    masks = segment_lungs(hu, SPACING, IDENTITY)
    assert lung_fraction(masks) < 0.01
    empty = LungMasks(body=np.zeros(SHAPE, bool), left=np.zeros(SHAPE, bool),
                      right=np.zeros(SHAPE, bool))
    assert lung_fraction(empty) == 0.0
    assert math.isnan(measure_lungs(hu, empty, SPACING).mean_density_hu)


def test_body_mask_drops_a_separate_table() -> None:
    hu = _phantom()
    hu[:, 122:125, 10:118] = 200.0  # table below the patient, not touching
    assert np.array_equal(body_mask(hu), _body())


@pytest.mark.parametrize(("direction", "expected"), [
    (np.eye(3), (2, 1)),
    # Sagittal slices: columns run along −y (anterior), rows along −z, slices along +x.
    (np.array([[0.0, 0.0, 1.0], [-1.0, 0.0, 0.0], [0.0, -1.0, 0.0]]), (0, 1)),
    # Coronal slices with columns towards patient right.
    (np.array([[-1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, -1.0, 0.0]]), (2, -1)),
])
def test_left_right_axis(direction: npt.NDArray[np.float64], expected: tuple[int, int]) -> None:
    assert left_right_axis(direction) == expected


def test_superior_axis_follows_the_slice_direction() -> None:
    assert patient_axis(np.eye(3), 2) == (0, 1)
    # Slices stored from head to foot: the index runs towards the feet.
    assert patient_axis(np.diag([1.0, 1.0, -1.0]), 2) == (0, -1)


def test_in_plane_closing_fills_a_notch_but_not_a_wide_bay() -> None:
    spacing = (2.5, 1.0, 1.0)
    mask = np.zeros((1, 120, 120), dtype=bool)
    mask[0, 20:100, 20:100] = True
    mask[0, 20:40, 55:65] = False  # a 10 mm wide notch from the top edge
    mask[0, 60:100, 20:80] = False  # a 60 mm wide bay from the bottom-left corner
    closed = close_in_plane(mask, 15.0, spacing)
    assert closed[0, 22:40, 55:65].all()  # all but the rim, where the disk just touches
    assert not closed[0, 70:100, 20:70].any()
    assert closed[mask].all()


def test_search_region_takes_in_a_juxtapleural_nodule() -> None:
    hu = _phantom()
    zz, yy, xx = _grid()
    # A 16 mm soft-tissue nodule on the lateral border of the patient-left lung.
    nodule = (zz - 20) ** 2 * 2.5**2 + ((yy - 64) ** 2 + (xx - 108) ** 2) * 2.0**2 <= 8.0**2
    hu[nodule] = 40.0
    masks = segment_lungs(hu, SPACING, IDENTITY)
    region = search_region(masks, SPACING)
    assert masks.lungs[nodule].mean() < 0.6
    assert region[nodule & (xx <= 108)].all()  # its lung side, the notch, is closed
    assert not (region & ~masks.body).any()  # the region never leaves the body
    assert not region[:, 64, 60:68].any()  # nor bridges the mediastinum


def test_below_lung_bases_marks_tissue_with_no_lung_beneath() -> None:
    hu = _phantom()
    zz, yy, xx = _grid()
    dome = LOW_X & (zz < 14) & ((yy - 64) ** 2 + (xx - 36) ** 2 <= 6**2)  # a cap from below
    hu[dome] = 40.0
    vessel = LOW_X & (zz > 18) & (zz < 24) & ((yy - 64) ** 2 + (xx - 36) ** 2 <= 2**2)
    hu[vessel] = 40.0
    masks = segment_lungs(hu, SPACING, IDENTITY)
    below = below_lung_bases(hu, masks, IDENTITY)
    assert below[dome].all()
    assert not below[vessel].any()  # aerated lung lies beneath the vessel
    assert below[2, 64, 64] and not below[30, 64, 36]
    flipped = below_lung_bases(hu[::-1], segment_lungs(hu[::-1], SPACING, np.diag(
        [1.0, 1.0, -1.0])), np.diag([1.0, 1.0, -1.0]))
    assert np.array_equal(flipped, below[::-1])


def test_lung_window() -> None:
    hu = np.array([-2000.0, -1350.5, -600.0, 149.5, 1000.0])
    # PS3.3 linear window, W 1500 / L −600: ((x + 600.5) / 1499 + 0.5) · 255.
    expected = np.rint(np.clip((hu + 600.5) / 1499.0 + 0.5, 0, 1) * 255).astype(np.uint8)
    out = lung_window(hu)
    assert out.dtype == np.uint8
    assert list(out) == list(expected)
    assert out[0] == 0 and out[-1] == 255 and out[2] == 128
