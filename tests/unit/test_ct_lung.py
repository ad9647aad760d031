"""The ct-lung task on a DICOM phantom series, with a deterministic stand-in network.

The stand-in flags exactly the voxels of lesion density (the phantom's lesions are 100 HU,
the body 40 HU), so the tests check what the product does around a network: volume building,
rejection reasons, measurements, candidate geometry in patient space, slices and key slices.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
import torch
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from dicom_ai.config import InferenceSettings, Settings
from dicom_ai.dicom.model import Instance, Series
from dicom_ai.imaging.ct import CTVolume, build_volume
from dicom_ai.imaging.lung import segment_lungs
from dicom_ai.inference.bundle import Bundle, BundleError
from dicom_ai.inference.ct_lung import (
    Calibration,
    Candidate,
    Preprocessing,
    SearchArea,
    extent_mm,
    find_candidates,
    in_plane_diameter_mm,
    lesion_label,
    measurement_findings,
    model_input,
    probability_map,
    segmentation_view,
    validate_block,
)
from dicom_ai.inference.findings import ModelInfo, ModelResult
from dicom_ai.inference.routing import as_accepts
from dicom_ai.pipeline import StudyOutcome, analyse_series

torch.set_num_threads(1)

SPACING = (2.5, 2.0, 2.0)
SHAPE = (24, 96, 96)
ORIGIN = (-95.0, -90.0, 100.0)  # LPS of voxel (0, 0, 0)
LESION_HU = 100.0
WINDOW = (-1000.0, 400.0)


class DensityBand(torch.nn.Module):
    """Logit +20 where the centre channel is lesion density (95–105 HU), −20 elsewhere."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hu = x[:, 1:2] * (WINDOW[1] - WINDOW[0]) + WINDOW[0]
        return torch.where((hu > 95.0) & (hu < 105.0), 20.0, -20.0)


def _bundle(**accepts: object) -> Bundle:
    block = {
        "task": "ct-lung", "input": "ct",
        "accepts": {"modality": ["CT"], "min_instances": 10, "max_slice_thickness_mm": 5.0,
                    **accepts},
        "preprocessing": {"spacing": [2.5, 2.0, 2.0], "hu_window": list(WINDOW), "channels": 3},
        "thresholds": {"candidate": 0.5, "positive": 0.5, "min_voxels": 1,
                       "max_candidates": 10},
        "calibration": {"method": "platt", "a": 1.0, "b": 0.0},
    }
    return Bundle(root=Path("."), metadata={}, dicom_ai=block, network=DensityBand(),
                  device=torch.device("cpu"), info=ModelInfo("ct-lung", "0", "2.25.1"),
                  inference_config={}, accepts=as_accepts(block["accepts"]))


def _grid() -> tuple[npt.NDArray[np.float64], ...]:
    return tuple(np.meshgrid(*(np.arange(n, dtype=np.float64) for n in SHAPE), indexing="ij"))


def _ball(centre: tuple[float, float, float], radius_mm: float) -> npt.NDArray[np.bool_]:
    zz, yy, xx = _grid()
    d2 = (((zz - centre[0]) * SPACING[0]) ** 2 + ((yy - centre[1]) * SPACING[1]) ** 2
          + ((xx - centre[2]) * SPACING[2]) ** 2)
    inside: npt.NDArray[np.bool_] = d2 <= radius_mm**2
    return inside


def chest_phantom(lesions: list[tuple[tuple[float, float, float], float]]
           ) -> npt.NDArray[np.float32]:
    _, yy, xx = _grid()
    hu = np.full(SHAPE, -1000.0, dtype=np.float32)
    hu[(yy - 48) ** 2 + (xx - 48) ** 2 <= 44**2] = 40.0
    for cx in (26, 70):  # right lung at low column (patient right), left at high
        hu[((yy - 48) / 30) ** 2 + ((xx - cx) / 16) ** 2 <= 1.0] = -850.0
    for centre, radius in lesions:
        hu[_ball(centre, radius)] = LESION_HU
    return hu


def write_series(hu: npt.NDArray[np.float32], folder: Path, *, thickness: float = 2.5,
                  duplicate: bool = False) -> Series:
    folder.mkdir(parents=True, exist_ok=True)
    study, series_uid, frame = generate_uid(), generate_uid(), generate_uid()
    instances = []
    for k in range(hu.shape[0]):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = \
            study, series_uid, frame
        ds.Modality = "CT"
        ds.BodyPartExamined = "CHEST"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.InstanceNumber = k + 1
        z = ORIGIN[2] + SPACING[0] * (k - 1 if duplicate and k > 0 else k)
        ds.ImagePositionPatient = [ORIGIN[0], ORIGIN[1], z]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [SPACING[1], SPACING[2]]
        ds.SliceThickness = thickness
        ds.Rows, ds.Columns = hu.shape[1:]
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        ds.RescaleIntercept, ds.RescaleSlope = 0, 1
        ds.PixelData = np.rint(hu[k]).astype(np.int16).tobytes()
        path = folder / f"{k:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        header = ds.copy()
        del header.PixelData
        instances.append(Instance(path=path, header=header))
    return Series(series_uid, instances[::-1])  # arrival order need not be slice order


def _run(series: Series, bundle: Bundle | None = None) -> tuple[ModelResult, dict[str, str]]:
    # Through the pipeline, as the product runs it: routing's header rules come first.
    outcome = StudyOutcome(series.study_instance_uid)
    analyse_series(series, [bundle or _bundle()],
                   Settings(inference=InferenceSettings(batch_size=8)), datetime(2026, 1, 1),
                   outcome)
    (result,) = outcome.results
    return result, outcome.failed_files


def _lps(zyx: tuple[float, float, float]) -> npt.NDArray[np.float64]:
    return np.array([ORIGIN[0] + zyx[2] * SPACING[2], ORIGIN[1] + zyx[1] * SPACING[1],
                     ORIGIN[2] + zyx[0] * SPACING[0]])


def test_measurements_candidate_geometry_and_key_slice(tmp_path: Path) -> None:
    nodule = ((12.0, 48.0, 70.0), 6.0)  # 12 mm ball in the left lung
    hu = chest_phantom([nodule])
    series = write_series(hu, tmp_path / "s")
    result, failed = _run(series)
    assert result.status == "ok" and failed == {}
    by_label = {f.label: f for f in result.findings}
    assert by_label["lung_volume_left_ml"].unit == "mL"
    assert by_label["mean_lung_density_hu"].unit == "[hnsf'U]"
    assert by_label["laa950_percent"].value == 0.0
    # Left lung: the −850 ellipse (through all 24 slices) plus the enclosed nodule.
    _, yy, xx = _grid()
    left = (((yy - 48) / 30) ** 2 + ((xx - 70) / 16) ** 2 <= 1.0)
    assert by_label["lung_volume_left_ml"].value == pytest.approx(
        left.sum() * np.prod(SPACING) / 1000.0)
    cands = [f for f in result.findings if f.label in ("nodule", "mass")]
    assert len(cands) == 1
    c = cands[0]
    assert c.label == "nodule" and c.positive and c.probability == pytest.approx(1.0)
    assert c.center_mm is not None and c.extent_mm is not None
    np.testing.assert_allclose(c.center_mm, _lps(nodule[0]), atol=0.5)
    ball = _ball(*nodule)
    zs, ys, xs = np.nonzero(ball)
    expected_extent = ((np.ptp(xs) + 1) * 2.0, (np.ptp(ys) + 1) * 2.0, (np.ptp(zs) + 1) * 2.5)
    np.testing.assert_allclose(c.extent_mm, expected_extent)
    by_z = {round(float(i.header.ImagePositionPatient[2]), 3): i.SOPInstanceUID
            for i in series.instances}
    assert c.slices == tuple(by_z[round(ORIGIN[2] + z * 2.5, 3)] for z in range(zs.min(),
                                                                               zs.max() + 1))
    (expl,) = result.explanations
    assert expl.source.SOPInstanceUID == by_z[round(ORIGIN[2] + 12 * 2.5, 3)]
    assert expl.image.shape == (96, 96) and expl.image.dtype == np.uint8
    assert expl.heatmap is not None and expl.heatmap[48, 70] == pytest.approx(1.0)
    r0, c0, r1, c1 = expl.markers[0]
    assert r0 <= 48 <= r1 and c0 <= 70 <= c1 and r1 - r0 == np.ptp(ys)
    assert "nodule" in expl.caption


def test_large_lesion_is_a_mass(tmp_path: Path) -> None:
    series = write_series(chest_phantom([((12.0, 48.0, 26.0), 16.0)]), tmp_path / "s")
    result, _ = _run(series)
    (c,) = [f for f in result.findings if f.probability is not None]
    assert c.label == "mass"  # 32 mm across > 30 mm


def test_head_like_series_is_rejected(tmp_path: Path) -> None:
    hu = np.full(SHAPE, -1000.0, dtype=np.float32)
    _, yy, xx = _grid()
    hu[(yy - 48) ** 2 + (xx - 48) ** 2 <= 40**2] = 40.0
    result, _ = _run(write_series(hu, tmp_path / "s"))
    assert result.status == "rejected" and not result.findings
    assert result.reason is not None and result.reason.startswith("not a chest CT")


@pytest.mark.parametrize(("kwargs", "slices", "reason"), [
    ({"thickness": 7.0}, SHAPE[0], "slice thickness 7 mm exceeds the model's limit of 5 mm"),
    ({}, 8, "8 image(s), the model needs at least 10"),
    ({"duplicate": True}, SHAPE[0], "not one regular CT volume: duplicate slice positions"),
])
def test_unusable_series_are_rejected(tmp_path: Path, kwargs: dict[str, Any], slices: int,
                                      reason: str) -> None:
    hu = chest_phantom([])[:slices]
    result, _ = _run(write_series(hu, tmp_path / "s", **kwargs))
    assert result.status == "rejected" and result.reason is not None
    assert result.reason.startswith(reason)


def test_slices_further_apart_than_the_limit_are_rejected_whatever_their_thickness(
        tmp_path: Path) -> None:
    # Thin slices with gaps between them: Slice Thickness (1.5 mm) passes the header rule,
    # the positions (2.5 mm apart) do not.
    series = write_series(chest_phantom([]), tmp_path / "s", thickness=1.5)
    result, _ = _run(series, _bundle(max_slice_thickness_mm=2.0))
    assert result.status == "rejected"
    assert result.reason == "slices are 2.50 mm apart, over the model's limit of 2 mm"


def test_body_part_of_another_region_is_rejected(tmp_path: Path) -> None:
    series = write_series(chest_phantom([]), tmp_path / "s")
    result, _ = _run(series, _bundle(body_part_examined=["LUNG"]))
    assert result.reason == "body part examined is CHEST, the model reads LUNG"


def test_model_input_repeats_edge_slices() -> None:
    hu = np.stack([np.full((2, 2), v, dtype=np.float32) for v in (-1000.0, -300.0, 400.0)])
    x = model_input(hu, Preprocessing((1, 1, 1), WINDOW, 3))
    assert x.shape == (3, 3, 2, 2)
    assert x[0, :, 0, 0].tolist() == pytest.approx([0.0, 0.0, 0.5])
    assert x[2, :, 0, 0].tolist() == pytest.approx([0.5, 1.0, 1.0])


def test_probability_map_pads_and_crops() -> None:
    class Echo(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            assert x.shape[-1] % 16 == 0 and x.shape[-2] % 16 == 0
            return x[:, 1:2]

    inputs = np.zeros((5, 3, 20, 30), dtype=np.float32)
    prob = probability_map(Echo(), inputs, device=torch.device("cpu"), batch_size=2)
    assert prob.shape == (5, 20, 30)
    assert np.allclose(prob, 0.5)


def test_find_candidates_orders_filters_and_boxes() -> None:
    prob = np.zeros((5, 10, 10), dtype=np.float32)
    prob[1:3, 1:3, 1:4] = 0.6
    prob[2, 2, 2] = 0.7
    prob[4, 8, 8] = 0.9  # a single voxel: kept unless min_voxels > 1
    found = find_candidates(prob, 0.5)
    assert [round(c.probability, 2) for c in found] == [0.9, 0.7]
    assert found[1].lo == (1, 1, 1) and found[1].hi == (2, 2, 3)
    assert len(find_candidates(prob, 0.5, min_voxels=2)) == 1
    inside = np.zeros(prob.shape, dtype=bool)
    inside[4, 8, 8] = True
    area = SearchArea(inside=inside, below_bases=np.zeros_like(inside),
                      soft_tissue=np.ones_like(inside))
    assert [c.probability for c in find_candidates(prob, 0.5, region=area)] == \
        pytest.approx([0.9])


def test_a_candidate_peak_shared_by_voxels_is_the_first_in_raster_order() -> None:
    # Two voxels at exactly 1.0 (as float32 sigmoids give): the peak that must lie inside the
    # search area is the first of them, so the answer does not depend on a sort's tie order.
    prob = np.zeros((2, 4, 4), dtype=np.float32)
    prob[0, 1, 1:3] = 1.0
    prob[1, 1, 1] = 0.6
    inside = np.zeros(prob.shape, dtype=bool)
    area = SearchArea(inside=inside, below_bases=np.zeros_like(inside),
                      soft_tissue=np.ones_like(inside))
    inside[0, 1, 2] = inside[1, 1, 1] = True  # 2 of 3 voxels, but not the first peak
    assert find_candidates(prob, 0.5, region=area) == []
    inside[0, 1, 1] = True
    (found,) = find_candidates(prob, 0.5, region=area)
    # Centroid weighted by probability: z = 0.6 / 2.6, y = 1, x = (1 + 2 + 0.6) / 2.6.
    assert found.centre == pytest.approx((0.6 / 2.6, 1.0, 3.6 / 2.6))


def test_a_candidate_needs_its_peak_and_most_voxels_inside() -> None:
    prob = np.zeros((3, 10, 10), dtype=np.float32)
    prob[1, 2:6, 2:6] = 0.6  # 16 voxels
    prob[1, 3, 3] = 0.8  # the peak
    inside = np.zeros(prob.shape, dtype=bool)
    none = np.zeros_like(inside)
    tissue = np.ones_like(inside)
    inside[1, 2:6, 2:4] = True  # 8 of 16 voxels, the peak among them
    assert len(find_candidates(prob, 0.5, region=SearchArea(inside, none, tissue))) == 1
    inside[1, 2, 2] = False  # 7 of 16: most of the region lies outside
    assert find_candidates(prob, 0.5, region=SearchArea(inside, none, tissue)) == []
    inside[1, 2:6, 2:6] = True
    inside[1, 3, 3] = False  # the peak outside
    assert find_candidates(prob, 0.5, region=SearchArea(inside, none, tissue)) == []
    inside[1, 3, 3] = True
    below = np.zeros_like(inside)
    below[1, 2:4, 2:6] = True  # 8 of 16 voxels over the diaphragm: not most
    assert len(find_candidates(prob, 0.5, region=SearchArea(inside, below, tissue))) == 1
    # ... but most of its soft tissue when the rest is partial-volume lung above the dome.
    tissue[1, 4:6, 2:6] = False
    assert find_candidates(prob, 0.5, region=SearchArea(inside, below, tissue)) == []


def dome_phantom(lesions: list[tuple[tuple[float, float, float], float]]
                 ) -> npt.NDArray[np.float32]:
    """Lungs above slice 6 (the index runs to the head), abdomen below, and the liver dome
    rising into the right lung's base as a soft-tissue cap that narrows slice by slice."""
    hu = chest_phantom(lesions=[])
    _, yy, xx = _grid()
    hu[:6][hu[:6] < -500.0] = 40.0  # below the lung bases: soft tissue inside the body
    for z in range(6, 11):
        radius = 10 - 2 * (z - 6)  # 20 mm across at the base, 4 mm at the top
        hu[z][(yy[z] - 48) ** 2 + (xx[z] - 26) ** 2 <= radius**2] = 40.0
    for centre, r in lesions:
        hu[_ball(centre, r)] = LESION_HU
    return hu


def test_no_candidate_over_the_liver_dome(tmp_path: Path) -> None:
    dome_blob = ((7.0, 48.0, 26.0), 4.0)  # lesion density inside the dome cap
    nodule = ((16.0, 48.0, 70.0), 6.0)  # a nodule in the left lung
    hu = dome_phantom([dome_blob, nodule])
    series = write_series(hu, tmp_path / "s")
    # The dome cap is filled into the lung mask as a hole (as the real liver dome is), so a
    # rule "centre in the lungs" would keep it; the lung-base rule must reject it.
    volume = build_volume(series)
    masks = segment_lungs(volume.hu, volume.spacing, volume.direction)
    assert masks.lungs[7, 48, 26]
    result, _ = _run(series)
    cands = [f for f in result.findings if f.label in ("nodule", "mass")]
    assert len(cands) == 1
    assert cands[0].center_mm is not None
    np.testing.assert_allclose(cands[0].center_mm, _lps(nodule[0]), atol=0.5)


def test_juxtapleural_nodule_is_kept(tmp_path: Path) -> None:
    # Against the lateral chest wall of the left lung (its border at column 86): the nodule's
    # voxels make a notch in the air-based lung mask.
    nodule = ((12.0, 48.0, 84.0), 6.0)
    hu = chest_phantom([nodule])
    series = write_series(hu, tmp_path / "s")
    volume = build_volume(series)
    masks = segment_lungs(volume.hu, volume.spacing, volume.direction)
    assert not masks.lungs[_ball(*nodule)].all()
    result, _ = _run(series)
    cands = [f for f in result.findings if f.label in ("nodule", "mass")]
    assert len(cands) == 1 and cands[0].center_mm is not None
    np.testing.assert_allclose(cands[0].center_mm, _lps(nodule[0]), atol=1.0)


def test_calibration_maps_and_validates() -> None:
    cal = Calibration.from_block({"method": "platt", "a": 0.5, "b": -1.0})
    assert float(cal(0.5)) == pytest.approx(1.0 / (1.0 + np.exp(1.0)))
    assert float(cal(1.0)) < 1.0  # saturated raw peaks stay below 1 after calibration
    assert np.all(np.diff(cal(np.array([0.5, 0.9, 0.99, 1.0]))) > 0)  # order kept
    for bad in (None, {"method": "isotonic", "a": 1, "b": 0}, {"method": "platt", "a": 0,
                                                               "b": 0},
                {"method": "platt", "a": "x", "b": 0}):
        with pytest.raises(ValueError):
            Calibration.from_block(bad)


def test_bundle_without_calibration_is_refused_at_load() -> None:
    block = dict(_bundle().dicom_ai)
    validate_block("ct-lung", block)
    del block["calibration"]
    with pytest.raises(BundleError, match="calibration"):
        validate_block("ct-lung", block)
    with pytest.raises(BundleError, match="positive"):
        validate_block("ct-lung", {**_bundle().dicom_ai,
                                   "thresholds": {"candidate": 0.5, "positive": 2.0}})


def test_extent_follows_the_direction_cosines() -> None:
    # Columns along LPS −x, rows along +z (coronal-like): array axes map to patient axes.
    direction = np.array([[-1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    assert extent_mm((0, 0, 0), (1, 3, 9), (2.0, 1.0, 0.5), direction) == (5.0, 4.0, 4.0)


def test_lesion_label_boundary() -> None:
    assert lesion_label(30.0) == "nodule" and lesion_label(30.1) == "mass"
    cand = Candidate(0.9, (0, 2, 3), (4, 5, 12), (2.0, 3.5, 7.5))
    assert in_plane_diameter_mm(cand, (8.0, 0.5, 0.5)) == 5.0  # z extent (40 mm) not counted


@pytest.mark.slow
def test_sample_ct_candidates_lie_in_the_lungs() -> None:
    """The shipped bundle on the sample chest CT (TCIA A0002): every candidate's centre lies in
    the closed lungs and has aerated lung beneath it (0.1.0 put three masses at p = 1.00 over
    the diaphragm and liver dome), its probability is calibrated (below 1) and the tumour is
    still the top, positive candidate."""
    from dicom_ai.dicom.collect import collect
    from dicom_ai.imaging.lung import below_lung_bases, search_region
    from dicom_ai.inference.bundle import load_bundle
    from dicom_ai.inference.ct_lung import analyse_ct

    repo = Path(__file__).resolve().parents[2]
    bundle = load_bundle(repo / "models" / "ct-lung", device=torch.device("cpu"))
    (study,) = collect(repo / "sample_studies" / "ct-lung-pet-ct-dx-a0002").studies
    (series,) = [s for s in study.series if s.modality == "CT"]
    result, _ = analyse_ct(bundle, series, datetime(2026, 1, 1), InferenceSettings())
    volume = build_volume(series)
    masks = segment_lungs(volume.hu, volume.spacing, volume.direction)
    inside = search_region(masks, volume.spacing)
    below = below_lung_bases(volume.hu, masks, volume.direction)
    to_index = np.linalg.inv(np.asarray(volume.direction) * np.asarray(volume.spacing)[::-1])
    cands = [f for f in result.findings if f.label in ("nodule", "mass")]
    assert cands
    for c in cands:
        assert c.center_mm is not None and c.probability is not None
        x, y, z = np.rint(to_index @ (np.asarray(c.center_mm) - np.asarray(volume.origin)))
        voxel = (int(z), int(y), int(x))
        assert inside[voxel] and not below[voxel], c
        assert c.probability < 0.99
    top = max(cands, key=lambda f: f.probability or 0.0)
    assert top.label == "mass" and top.positive
    assert top.center_mm is not None
    np.testing.assert_allclose(np.array(top.center_mm), np.array([-63.65, -98.76, 187.15]),
                               atol=5.0)


def _thin(hu: npt.NDArray[np.float32], repeat: int) -> CTVolume:
    """``hu`` with each slice repeated ``repeat`` times at ``1 / repeat`` of the spacing."""
    instances = tuple(Instance(path=Path(f"{k}.dcm"), header=Dataset())
                      for k in range(hu.shape[0] * repeat))
    return CTVolume(np.repeat(hu, repeat, axis=0), (SPACING[0] / repeat, *SPACING[1:]), ORIGIN,
                    np.eye(3), instances)


def test_segmentation_view_keeps_a_series_already_at_the_network_spacing() -> None:
    volume = _thin(chest_phantom([]), 1)
    assert segmentation_view(volume, SPACING[0]) is volume
    # Slices more than half the limit apart cannot be thinned without exceeding it.
    assert segmentation_view(volume, 1.9 * SPACING[0]) is volume


def test_segmentation_view_is_every_kth_slice_without_a_copy() -> None:
    volume = _thin(chest_phantom([]), 5)
    view = segmentation_view(volume, SPACING[0])
    assert view.hu.shape == (SHAPE[0], *SHAPE[1:])
    assert np.shares_memory(view.hu, volume.hu)
    assert view.spacing == pytest.approx(SPACING)
    assert view.instances == volume.instances[::5]
    assert np.array_equal(view.hu, volume.hu[::5])
    assert view.origin == volume.origin


def test_lung_measurements_of_a_thin_series_match_its_full_resolution() -> None:
    """A thin-slice series measured on the view gives the measurements of every slice."""
    full = _thin(chest_phantom([]), 4)
    view = segmentation_view(full, SPACING[0])
    on_view = measurement_findings(segment_lungs(view.hu, view.spacing, view.direction), view)
    on_full = measurement_findings(segment_lungs(full.hu, full.spacing, full.direction), full)
    for a, b in zip(on_view, on_full, strict=True):
        assert a.label == b.label
        assert a.value == pytest.approx(b.value, rel=1e-6, abs=1e-6)


class AutocastProbe(torch.nn.Module):
    """Logits 0 everywhere; records whether autocast was on and the input dtype."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[bool, torch.dtype]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append((torch.is_autocast_enabled(x.device.type), x.dtype))
        return torch.zeros_like(x[:, :1])


def test_probability_map_on_the_cpu_stays_float32_when_amp_is_asked() -> None:
    probe = AutocastProbe()
    inputs = np.zeros((3, 3, 20, 20), dtype=np.float32)
    prob = probability_map(probe, inputs, device=torch.device("cpu"), batch_size=2, amp=True)
    assert prob.dtype == np.float32 and prob.shape == (3, 20, 20)
    assert np.all(prob == 0.5)
    assert probe.seen == [(False, torch.float32), (False, torch.float32)]
