"""Lung-field estimate, field-of-view mask and map restriction on hand-made arrays."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pytest

from dicom_ai.imaging.anatomy import (
    convex_hull,
    explained_anatomy,
    lung_fields,
    otsu_threshold,
    prior_lung_fields,
    restrict,
    share_inside,
)

Bool = npt.NDArray[np.bool_]
SIDE = 128


def _ellipse(cy: float, cx: float, ry: float, rx: float, side: int = SIDE) -> Bool:
    rows, cols = np.mgrid[0:side, 0:side].astype(np.float64)
    inside: Bool = ((rows - cy) / ry) ** 2 + ((cols - cx) / rx) ** 2 <= 1.0
    return inside


def _radiograph(lungs: tuple[Bool, ...], *, opacity: Bool | None = None) -> npt.NDArray[np.float32]:
    """A frontal chest film: dark air at the sides, a bright thorax, two dark lungs with
    rib-like stripes, a bright mediastinum between them."""
    rows = np.arange(SIDE)[:, None]
    image = np.full((SIDE, SIDE), 0.05, dtype=np.float32)
    image[:, 8:SIDE - 8] = 0.75  # thorax and abdomen
    for lung in lungs:
        image[lung] = 0.25
    ribs = (rows // 6) % 2 == 0
    image[ribs & np.logical_or.reduce(lungs)] += 0.08
    if opacity is not None:
        image[opacity] = 0.7
    noise = np.random.default_rng(0).normal(0.0, 0.02, size=image.shape)
    return np.clip(image + noise, 0.0, 1.0).astype(np.float32)


RIGHT_LUNG = _ellipse(56, 38, 36, 18)  # image left = patient right
LEFT_LUNG = _ellipse(56, 90, 36, 18)


def _dice(a: Bool, b: Bool) -> float:
    return 2.0 * float((a & b).sum()) / float(a.sum() + b.sum())


def test_otsu_splits_two_levels() -> None:
    values = np.concatenate([np.full(100, 0.2), np.full(300, 0.8)])
    assert 0.2 < otsu_threshold(values) <= 0.8
    assert otsu_threshold(np.full(10, 0.5)) == 0.5


def test_convex_hull_fills_a_notch() -> None:
    ring = _ellipse(30, 30, 20, 20, side=64) & ~_ellipse(30, 45, 8, 8, side=64)
    hull = convex_hull(ring)
    assert hull[30, 45] and not ring[30, 45]  # the notch is inside the hull
    assert not hull[2, 2]  # a corner outside the disk is not
    line = np.zeros((10, 10), dtype=bool)
    line[5, 2:8] = True
    assert (convex_hull(line) == line).all()  # collinear: its own hull


def test_lung_fields_find_both_lungs() -> None:
    fields = lung_fields(_radiograph((RIGHT_LUNG, LEFT_LUNG)))
    assert fields.from_image == 2
    assert _dice(fields.mask, RIGHT_LUNG | LEFT_LUNG) > 0.85
    assert not fields.mask[:, 60:68].any()  # the mediastinum is not lung
    assert not fields.mask[:, :8].any()  # nor the air outside the patient


def test_an_opacity_inside_a_lung_stays_in_its_field() -> None:
    # Consolidation at the lateral edge of the right lung base: bright, like the thorax.
    opacity = RIGHT_LUNG & _ellipse(76, 30, 10, 10)
    fields = lung_fields(_radiograph((RIGHT_LUNG, LEFT_LUNG), opacity=opacity))
    assert fields.from_image == 2
    assert fields.mask[opacity].mean() > 0.7


def test_a_white_lung_falls_back_to_the_prior() -> None:
    # The left lung is fully opaque: no dark region there, the prior stands in for it.
    fields = lung_fields(_radiograph((RIGHT_LUNG,), opacity=None))
    assert fields.from_image == 1
    _, prior_left = prior_lung_fields((SIDE, SIDE))
    assert (fields.mask[prior_left]).all()
    assert _dice(fields.mask & (np.arange(SIDE) < SIDE // 2)[None, :], RIGHT_LUNG) > 0.85


def test_a_featureless_image_is_the_prior() -> None:
    fields = lung_fields(np.full((64, 80), 0.5, dtype=np.float32))
    left, right = prior_lung_fields((64, 80))
    assert fields.from_image == 0
    assert (fields.mask == (left | right)).all()


def test_share_and_restriction() -> None:
    heat = np.zeros((10, 10), dtype=np.float32)
    heat[0, :] = 1.0  # hottest at the top margin
    heat[5, 5] = 0.5
    mask = np.zeros((10, 10), dtype=bool)
    mask[4:7, 4:7] = True
    assert share_inside(heat, mask) == pytest.approx(0.5 / 10.5)
    shown = restrict(heat, mask)
    assert shown.max() == pytest.approx(1.0) and shown[5, 5] == pytest.approx(1.0)
    assert share_inside(shown, mask) == pytest.approx(1.0)
    assert not restrict(heat, np.zeros_like(mask)).any()
    assert np.isnan(share_inside(np.zeros((3, 3)), mask[:3, :3]))


def test_explained_anatomy_per_input_kind() -> None:
    xray = _radiograph((RIGHT_LUNG, LEFT_LUNG))[None]
    lungs = explained_anatomy("xray", xray)
    assert lungs is not None and _dice(lungs, RIGHT_LUNG | LEFT_LUNG) > 0.85
    # A padded input: the anatomy is found in the content box, the padding stays out.
    padded = np.zeros((1, SIDE, SIDE + 32), dtype=np.float32)
    padded[:, :, 16:16 + SIDE] = xray
    boxed = explained_anatomy("xray", padded, (0, 16, SIDE, SIDE))
    assert boxed is not None and (boxed[:, 16:16 + SIDE] == lungs).all()
    assert not boxed[:, :16].any()
    fundus = np.zeros((3, 40, 40), dtype=np.float32)
    disc = _ellipse(20, 20, 15, 15, side=40)
    fundus[0][disc], fundus[1][disc] = 0.8, 0.3
    fov = explained_anatomy("fundus", fundus)
    assert fov is not None and _dice(fov, disc) > 0.95
    assert explained_anatomy("ct", fundus) is None
