"""CT volume geometry and HU, pinned with values worked out by hand."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import replace

import numpy as np
import pytest
from pydicom.uid import CTImageStorage

from dicom_ai.dicom.collect import collect
from dicom_ai.dicom.errors import SeriesGeometryError
from dicom_ai.dicom.model import Series
from dicom_ai.imaging.ct import (
    CTVolume,
    SliceGeometry,
    build_volume,
    check_geometry,
    resample,
    slice_normal,
    sort_by_position,
    to_hu,
)
from tests.conftest import MakeDicom

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
#: Feet-first supine: rows run to the patient's right, so the normal points to the feet.
FEET_FIRST = (-1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


def _slices(zs: Sequence[float], *, iop: Sequence[float] = AXIAL,
            shift_y: float = 0.0) -> list[SliceGeometry]:
    return [SliceGeometry((0.0, shift_y * i, float(z)),
                          (iop[0], iop[1], iop[2], iop[3], iop[4], iop[5]), 4, 4, (0.5, 0.5))
            for i, z in enumerate(zs)]


def test_slice_normal_hand_values() -> None:
    assert np.allclose(slice_normal(AXIAL), (0, 0, 1))
    assert np.allclose(slice_normal(FEET_FIRST), (0, 0, -1))
    assert np.allclose(slice_normal((0, 1, 0, 0, 0, -1)), (-1, 0, 0))  # sagittal
    assert np.allclose(slice_normal((1, 0, 0, 0, 0, -1)), (0, 1, 0))  # coronal
    with pytest.raises(SeriesGeometryError, match="parallel"):
        slice_normal((1, 0, 0, 1, 0, 0))


def test_sort_uses_positions_not_input_order() -> None:
    positions = [(0, 0, 10.0), (0, 0, 0.0), (0, 0, 5.0)]
    assert sort_by_position(positions, AXIAL) == [1, 2, 0]
    # Along a normal pointing to the feet the most superior slice comes first.
    assert sort_by_position(positions, FEET_FIRST) == [0, 2, 1]
    # Oblique: normal (0, -0.6, 0.8) → projections 0.8·z − 0.6·y.
    oblique = (1, 0, 0, 0, 0.8, 0.6)
    assert sort_by_position([(0, 10, 0), (0, 0, 0), (0, -10, 0)], oblique) == [0, 1, 2]


def test_to_hu() -> None:
    stored = np.array([0, 1000, 2048], dtype=np.uint16)
    assert to_hu(stored, 1.0, -1024.0).tolist() == [-1024.0, -24.0, 1024.0]
    assert to_hu(np.array([2000], dtype=np.int16), 0.5, -1000.0).tolist() == [0.0]
    assert to_hu(stored).dtype == np.float32


def test_check_geometry_returns_spacing() -> None:
    assert check_geometry(_slices([7.5, 0.0, 2.5, 5.0])) == pytest.approx(2.5)
    assert check_geometry(_slices([0.0, -1.25, -2.5], iop=FEET_FIRST)) == pytest.approx(1.25)


@pytest.mark.parametrize(("slices", "reason"), [
    (_slices([0.0]), "a CT volume needs at least 2 slices, got 1"),
    (_slices([0.0, 2.5, 2.5, 5.0]),
     "duplicate slice positions: 1 slice(s) repeat a position (first at 2.50 mm along the "
     "slice normal)"),
    (_slices([0.0, 2.5, 5.0, 12.5, 15.0]),
     "missing slices: 7.50 mm gap between 5.00 and 12.50 mm along the slice normal, about 2 "
     "slice(s) missing (median spacing 2.50 mm; 1 gap(s))"),
    (_slices([0.0, 2.5, 5.0, 8.0, 10.5]),
     "inconsistent spacing: slice steps range from 2.50 to 3.00 mm (median 2.50 mm)"),
    # 4 mm then 7 mm slices: 7/4 = 1.75 spacings is a change of spacing, not a hole.
    (_slices([0.0, 4.0, 8.0, 12.0, 19.0, 26.0]),
     "inconsistent spacing: slice steps range from 4.00 to 7.00 mm (median 4.00 mm)"),
    # tan(10°) = 0.17633: each 1 mm step also moves 0.17633 mm along y.
    (_slices([0.0, 1.0, 2.0, 3.0], shift_y=math.tan(math.radians(10))),
     "gantry tilt: slices are stacked 10.00° off the slice normal (limit 0.5°)"),
])
def test_check_geometry_rejects(slices: list[SliceGeometry], reason: str) -> None:
    with pytest.raises(SeriesGeometryError) as info:
        check_geometry(slices)
    assert info.value.reason == reason


def test_check_geometry_mixed() -> None:
    base = _slices([0.0, 1.0, 2.0])
    with pytest.raises(SeriesGeometryError, match=r"mixed image sizes: 4×4 \(2 slices\), "
                                                  r"8×4 \(1 slices\)"):
        check_geometry([*base[:2], replace(base[2], rows=8)])
    with pytest.raises(SeriesGeometryError, match="mixed orientations"):
        check_geometry([*base[:2], replace(base[2], orientation=(1, 0, 0, 0, 0.9, 0.1))])
    with pytest.raises(SeriesGeometryError, match="mixed pixel spacing"):
        check_geometry([*base[:2], replace(base[2], pixel_spacing=(0.7, 0.7))])


def test_small_tilt_is_accepted_up_to_the_limit() -> None:
    tilted = _slices([0.0, 1.0, 2.0], shift_y=math.tan(math.radians(2)))
    assert check_geometry(tilted, max_tilt_deg=2.5) == pytest.approx(1.0)
    with pytest.raises(SeriesGeometryError, match=r"2\.00°"):
        check_geometry(tilted)


def test_index_to_patient_hand_values() -> None:
    volume = CTVolume(np.zeros((3, 20, 10), np.float32), (2.5, 0.5, 0.8), (-100.0, -50.0, 20.0),
                      np.eye(3), ())
    assert np.allclose(volume.index_to_patient((2, 10, 4)), (-96.8, -45.0, 25.0))
    assert np.allclose(volume.index_to_patient([[0, 0, 0], [1, 1, 1]]),
                       [(-100.0, -50.0, 20.0), (-99.2, -49.5, 22.5)])
    feet_first = np.column_stack([(-1, 0, 0), (0, 1, 0), (0, 0, -1)]).astype(np.float64)
    ff = CTVolume(np.zeros((4, 4, 4), np.float32), (2.0, 1.0, 1.0), (0.0, 0.0, 0.0),
                  feet_first, ())
    assert np.allclose(ff.index_to_patient((1, 2, 3)), (-3.0, 2.0, -2.0))


def _ct_series(make_dicom: MakeDicom, zs: Sequence[float], iop: Sequence[float] = AXIAL,
               ) -> Series:
    """One 3×4 slice per z; slice k stores k + 10 and has slope 2, intercept k - 1000,
    so its HU are 2·(k + 10) + k − 1000 = 3k − 980 — a per-slice rescale checks itself."""
    paths = [make_dicom(f"ct/{k:02d}.dcm", np.full((3, 4), k + 10, dtype=np.int16),
                        SOPClassUID=CTImageStorage, Modality="CT",
                        ImagePositionPatient=[-10.0, -20.0, z], ImageOrientationPatient=list(iop),
                        PixelSpacing=[0.5, 0.75], RescaleSlope=2, RescaleIntercept=k - 1000)
             for k, z in enumerate(zs)]
    (study,) = collect(paths).studies
    return study.series[0]


def test_build_volume_sorts_shuffled_slices(make_dicom: MakeDicom) -> None:
    zs = [5.0, -2.5, 10.0, 0.0, 7.5, 2.5]  # file k lies at zs[k]
    series = _ct_series(make_dicom, zs)
    random.Random(3).shuffle(series.instances)
    volume = build_volume(series)
    order = sorted(range(len(zs)), key=lambda k: zs[k])  # [1, 3, 5, 0, 4, 2]
    assert volume.hu.shape == (6, 3, 4)
    assert volume.hu.dtype == np.float32
    assert volume.hu[:, 0, 0].tolist() == [3 * k - 980 for k in order]
    assert volume.spacing == (2.5, 0.5, 0.75)
    assert volume.origin == (-10.0, -20.0, -2.5)
    assert np.allclose(volume.direction, np.eye(3))
    assert [i.path.name for i in volume.instances] == [f"{k:02d}.dcm" for k in order]
    assert volume.instance_at(3.4).path.name == "00.dcm"  # z index 3 → zs 5.0


def test_build_volume_feet_first(make_dicom: MakeDicom) -> None:
    series = _ct_series(make_dicom, [0.0, -2.0, -4.0], iop=FEET_FIRST)
    series.instances.reverse()
    volume = build_volume(series)
    # Ascending along the normal (0, 0, -1): the most superior slice (z = 0) first.
    assert volume.hu[:, 0, 0].tolist() == [-980.0, -977.0, -974.0]
    assert volume.origin == (-10.0, -20.0, 0.0)
    assert volume.spacing == (2.0, 0.5, 0.75)
    assert np.allclose(volume.index_to_patient((2, 0, 1)), (-10.75, -20.0, -4.0))


def test_build_volume_rejects_a_gap(make_dicom: MakeDicom) -> None:
    with pytest.raises(SeriesGeometryError, match="missing slices"):
        build_volume(_ct_series(make_dicom, [0.0, 1.0, 2.0, 5.0, 6.0]))


def test_build_volume_needs_positions(make_dicom: MakeDicom) -> None:
    series = _ct_series(make_dicom, [0.0, 1.0])
    del series.instances[1].header.ImagePositionPatient
    with pytest.raises(SeriesGeometryError) as info:
        build_volume(series)
    assert info.value.reason == "a slice has no ImagePositionPatient (0020,0032)"


def test_resample_linear_ramp() -> None:
    ramp = np.broadcast_to(np.arange(5, dtype=np.float32)[:, None, None] * 10, (5, 4, 4))
    volume = CTVolume(np.ascontiguousarray(ramp), (2.0, 1.0, 1.0), (1.0, 2.0, 3.0), np.eye(3),
                      ())
    fine = resample(volume, (1.0, 1.0, 1.0))
    assert fine.hu.shape == (9, 4, 4)  # (5 − 1)·2 / 1 + 1
    assert np.allclose(fine.hu[:, 2, 1], [0, 5, 10, 15, 20, 25, 30, 35, 40])
    assert fine.spacing == (1.0, 1.0, 1.0)
    assert fine.origin == volume.origin
    assert np.allclose(fine.index_to_patient((8, 3, 3)), volume.index_to_patient((4, 3, 3)))
    coarse = resample(volume, (3.0, 0.5, 1.5))
    assert coarse.hu.shape == (3, 7, 3)  # floor(8/3)+1, 3/0.5+1, floor(3/1.5)+1
    assert np.allclose(coarse.hu[:, 0, 0], [0, 15, 30])
    with pytest.raises(ValueError, match="positive"):
        resample(volume, (0.0, 1.0, 1.0))
