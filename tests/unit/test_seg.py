"""The DICOM Segmentation of CT candidates, and how a candidate is placed on source slices."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset

from dicom_ai.imaging.ct import CTVolume
from dicom_ai.inference.findings import CandidateMask
from dicom_ai.inference.placement import candidate_masks, in_plane_box
from dicom_ai.results import build_outputs, output_filename
from dicom_ai.results.seg import build_segmentation
from tests import results_fixtures as fx


def test_reported_candidates_become_segments_on_their_slices(tmp_path: Path) -> None:
    result = fx.ct_result()
    seg = build_segmentation(result, fx.settings(), codes=fx.CODES)
    assert seg is not None
    assert seg.segments == {3: 1}  # the candidate below its operating point is not segmented
    path = tmp_path / output_filename(seg.dataset)
    assert path.name.startswith("seg-")
    seg.dataset.save_as(path, enforce_file_format=True)
    back = hd.seg.segread(path)
    assert back.StudyInstanceUID == result.series.header.StudyInstanceUID
    assert back.FrameOfReferenceUID == result.series.header.FrameOfReferenceUID
    (description,) = back.SegmentSequence
    assert description.SegmentedPropertyTypeCodeSequence[0].CodeValue == fx.NODULE["value"]
    finding = result.findings[3]
    assert finding.mask is not None
    for k, uid in enumerate(finding.mask.slices):
        plane = back.get_pixels_by_source_instance(
            source_sop_instance_uids=[uid], segment_numbers=[1],
            ignore_spatial_locations=True)[0, ..., 0]
        assert np.array_equal(plane.astype(bool), finding.mask.pixels[k])
    assert back.SeriesDescription.startswith("AI SEGMENTATION")


def test_no_segmentation_without_reported_masks() -> None:
    result = fx.ct_result()
    result.findings = [dataclasses.replace(f, mask=None) for f in result.findings]
    assert build_segmentation(result, fx.settings(), codes=fx.CODES) is None
    datasets = build_outputs([result], fx.settings(), codes=fx.CODES, finding_site=fx.LUNG)
    assert [d.Modality for d in datasets] == ["OT", "SR"]


def _header(rows: int, cols: int, spacing: float) -> Dataset:
    ds = Dataset()
    ds.Rows, ds.Columns, ds.PixelSpacing = rows, cols, [spacing, spacing]
    return ds


def test_in_plane_box_maps_grid_voxels_to_pixel_edges() -> None:
    # Grid at 2 mm over 0.5 mm pixels: grid voxel 10 covers source pixels 38..41.5 (centres
    # 36..44 mm), i.e. SCOORD 38.5 .. 42.5 after the half-pixel shift to corner coordinates.
    box = in_plane_box((0, 10, 20), (0, 10, 21), (1.0, 2.0, 2.0), _header(512, 512, 0.5))
    assert box == (78.5, 38.5, 86.5, 42.5)
    # Clipped to the slice.
    assert in_plane_box((0, 0, 0), (0, 300, 300), (1.0, 2.0, 2.0),
                        _header(512, 512, 0.5))[2:] == (512.0, 512.0)


def test_candidate_masks_follow_the_component_onto_source_slices() -> None:
    instances = tuple(fx.instance(p) for p in sorted(
        fx.data_path(fx.CT_DIR).glob("*.dcm"))[:4])
    rows, cols = int(instances[0].header.Rows), int(instances[0].header.Columns)
    volume = CTVolume(hu=np.zeros((4, rows, cols), np.float32), spacing=(2.0, 1.0, 1.0),
                      origin=(0.0, 0.0, 0.0), direction=np.eye(3), instances=instances)
    grid = dataclasses.replace(volume, hu=np.zeros((8, rows // 2, cols // 2), np.float32),
                               spacing=(1.0, 2.0, 2.0))
    prob = np.zeros(grid.hu.shape, np.float32)
    prob[2:5, 10:13, 20:24] = 0.9  # the candidate
    prob[6, 40:42, 40:42] = 0.8    # another component in the same map
    (mask,) = candidate_masks(prob, 0.5, [((2, 10, 20), (4, 12, 23))], volume, grid)
    assert mask is not None
    # Grid slices 2..4 are source slices 1 and 2 (z 2 mm / 1 mm).
    assert mask.slices == (instances[1].SOPInstanceUID, instances[2].SOPInstanceUID)
    on_source = np.argwhere(mask.pixels[0])
    assert on_source[:, 0].min() == 19 and on_source[:, 0].max() == 25
    assert not mask.pixels[:, 80:, :].any()  # the other component is not part of it


def test_mask_slices_must_match_planes() -> None:
    with pytest.raises(ValueError, match="one Rows × Columns plane per slice"):
        CandidateMask(slices=("1.2.3",), pixels=np.zeros((2, 4, 4), bool))


def test_segmentation_reads_back_with_pydicom(tmp_path: Path) -> None:
    result = fx.ct_result()
    seg = build_segmentation(result, fx.settings(), codes=fx.CODES)
    assert seg is not None
    seg.dataset.save_as(tmp_path / "seg.dcm", enforce_file_format=True)
    ds = pydicom.dcmread(tmp_path / "seg.dcm")
    assert ds.SpecificCharacterSet == "ISO_IR 192"
    assert ds.ContentDescription == "AI generated — not for diagnostic use"
