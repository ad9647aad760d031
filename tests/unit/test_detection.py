"""MONAI detection bundles: orientation, box → candidate mapping, and a randomly initialised
MONAI RetinaNet run end to end on a DICOM chest phantom."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from dicom_ai.config import InferenceSettings
from dicom_ai.imaging.ct import CTVolume, build_volume, resample
from dicom_ai.inference.bundle import Bundle, BundleError
from dicom_ai.inference.detection import (
    DetectionInput,
    Orientation,
    analyse_detection,
    box_to_candidate,
    build_detector,
    grid_spacing,
    orientation,
)
from dicom_ai.inference.findings import ModelInfo
from dicom_ai.inference.routing import as_accepts
from tests.unit.test_ct_lung import ORIGIN, SHAPE, SPACING, chest_phantom, write_series

AXIAL = np.eye(3)

#: The Model Zoo lung_nodule_ct_detection layout, small: anchors, detector, detector_ops and
#: preprocessing as that bundle writes them (its network is built by the test).
CONFIG: dict[str, Any] = {
    "device": "$torch.device('cpu')",
    "anchor_generator": {
        "_target_": "monai.apps.detection.utils.anchor_utils.AnchorGeneratorWithAnchorShape",
        "feature_map_scales": [2, 4],
        "base_anchor_shapes": [[6, 8, 4], [8, 6, 5], [10, 10, 6]],
    },
    "network": "$@network_def.to(@device)",
    "detector": {"_target_": "RetinaNetDetector", "network": "@network",
                 "anchor_generator": "@anchor_generator", "debug": False},
    "detector_ops": [
        "$@detector.set_target_keys(box_key='box', label_key='label')",
        "$@detector.set_box_selector_parameters(score_thresh=0.0,topk_candidates_per_level=50,"
        "nms_thresh=0.22,detections_per_img=20)",
        "$@detector.set_sliding_window_inferer(roi_size=[64,64,32],overlap=0.25,sw_batch_size=1,"
        "mode='constant',device='cpu')",
    ],
    "preprocessing": {"_target_": "Compose", "transforms": [
        {"_target_": "LoadImaged", "keys": "image"},
        {"_target_": "EnsureChannelFirstd", "keys": "image"},
        {"_target_": "Orientationd", "keys": "image", "axcodes": "RAS"},
        {"_target_": "Spacingd", "keys": "image", "pixdim": [2.0, 2.0, 2.5],
         "_disabled_": "@whether_resampled_luna16"},
        {"_target_": "ScaleIntensityRanged", "keys": "image", "a_min": -1024.0, "a_max": 300.0,
         "b_min": 0.0, "b_max": 1.0, "clip": True},
    ]},
}


class TinyFeatures(nn.Module):
    """Two-level feature pyramid (strides 2 and 4) standing in for the ResNet-FPN, which needs
    torchvision."""

    out_channels = 8

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv3d(1, 8, 3, stride=2, padding=1)
        self.b = nn.Conv3d(8, 8, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        f1 = torch.relu(self.a(x))
        return {"0": f1, "1": torch.relu(self.b(f1))}


def _retinanet(features: nn.Module) -> nn.Module:
    from monai.apps.detection.networks.retinanet_network import RetinaNet

    torch.manual_seed(0)
    net: nn.Module = RetinaNet(spatial_dims=3, num_classes=1, num_anchors=3,
                               feature_extractor=features, size_divisible=[4, 4, 4])
    return net.eval()


def _bundle(network: nn.Module, config: dict[str, Any] | None = None) -> Bundle:
    block = {"task": "detection", "input": "ct",
             "accepts": {"modality": ["CT"], "min_instances": 10}}
    return Bundle(root=Path("."), metadata={}, dicom_ai=block, network=network,
                  device=torch.device("cpu"), info=ModelInfo("zoo-detector", "0.1", "2.25.2"),
                  inference_config=config or CONFIG, accepts=as_accepts(block["accepts"]))


def test_orientation_of_axial_slices() -> None:
    # Columns run to patient left (+x), rows to posterior (+y), slices to superior (+z).
    assert orientation(AXIAL, "RAS") == Orientation((2, 1, 0), (True, True, False))
    assert orientation(AXIAL, "LPS") == Orientation((2, 1, 0), (False, False, False))
    # Slices stacked towards inferior: S is the reversed slice axis.
    assert orientation(np.diag([1.0, 1.0, -1.0]), "RAS").flips == (True, True, True)
    with pytest.raises(ValueError, match="three different axes"):
        orientation(AXIAL, "RLS")


def test_orientation_of_sagittal_slices() -> None:
    # Columns towards anterior (−y), rows towards inferior (−z), slices towards left (+x).
    sagittal = np.array([[0.0, 0.0, 1.0], [-1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])
    o = orientation(sagittal, "RAS")
    assert o == Orientation((0, 2, 1), (True, False, True))
    volume = CTVolume(np.zeros((2, 2, 2), np.float32), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0),
                      sagittal, ())
    # pixdim is (R-L, A-P, S-I): R-L runs along the slices, A-P along columns, S-I along rows.
    assert grid_spacing(volume, o, (0.7, 0.8, 2.5)) == (0.7, 2.5, 0.8)


def test_apply_and_to_grid_agree() -> None:
    grid = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)
    for o in (orientation(AXIAL, "RAS"), Orientation((0, 2, 1), (True, False, True))):
        oriented = o.apply(grid)
        for index in np.ndindex(oriented.shape):
            z, y, x = o.to_grid(index, grid.shape).astype(int)
            assert oriented[index] == grid[z, y, x]


def test_box_to_candidate_known_answer() -> None:
    # RAS array of a (10, 20, 30) axial grid: oriented x = 29 − grid x, y = 19 − grid y.
    cand = box_to_candidate([5, 4, 2, 9, 8, 6], 0.8, orientation(AXIAL, "RAS"), (10, 20, 30))
    assert cand.probability == pytest.approx(0.8)
    assert cand.lo == (2, 12, 21) and cand.hi == (5, 15, 24)
    assert cand.centre == pytest.approx((3.5, 13.5, 22.5))


def test_detection_input_reads_the_zoo_preprocessing() -> None:
    prep = DetectionInput.from_config(CONFIG)
    assert prep.axcodes == "RAS" and prep.pixdim == (2.0, 2.0, 2.5) and prep.clip
    hu = np.array([-2000.0, -1024.0, -362.0, 300.0, 1000.0], dtype=np.float32)
    assert prep.scale(hu).tolist() == pytest.approx([0.0, 0.0, 0.5, 1.0, 1.0])
    with pytest.raises(BundleError, match="ScaleIntensityRanged"):
        DetectionInput.from_config({"preprocessing": {"transforms": []}})


def test_random_retinanet_boxes_map_to_patient_space(tmp_path: Path) -> None:
    series = write_series(chest_phantom([]), tmp_path / "s")
    bundle = _bundle(_retinanet(TinyFeatures()))
    detector = build_detector(bundle)
    assert detector.network is bundle.network
    assert detector.box_selector.score_thresh == 0.0
    volume = build_volume(series)
    prep = DetectionInput.from_config(CONFIG)
    orient = orientation(volume.direction, prep.axcodes)
    grid = resample(volume, grid_spacing(volume, orient, prep.pixdim))
    # The RAS array's affine, written out by hand: voxel (i, j, k) of the oriented array lies
    # at LPS x = x0 + (nx − 1 − i)·sx, y = y0 + (ny − 1 − j)·sy, z = z0 + k·sz.
    _, ny, nx = grid.hu.shape
    with torch.inference_mode():
        out = detector([torch.from_numpy(prep.scale(orient.apply(grid.hu)))[None]],
                       use_inferer=True)[0]
    box = out["box"][0].numpy().astype(np.float64)
    centre_ras = (box[:3] + box[3:] - 1.0) / 2.0
    expected = (ORIGIN[0] + (nx - 1 - centre_ras[0]) * SPACING[2],
                ORIGIN[1] + (ny - 1 - centre_ras[1]) * SPACING[1],
                ORIGIN[2] + centre_ras[2] * SPACING[0])

    result, failed = analyse_detection(bundle, series, datetime(2026, 1, 1),
                                       InferenceSettings())
    assert result.status == "ok" and failed == {}
    assert 1 <= len(result.findings) <= 10
    uids = {i.SOPInstanceUID for i in series.instances}
    top = result.findings[0]
    probabilities = [f.probability or 0.0 for f in result.findings]
    assert probabilities == sorted(probabilities, reverse=True)
    assert top.label in ("nodule", "mass")
    assert top.probability == pytest.approx(float(out["label_scores"][0]))
    assert top.center_mm == pytest.approx(expected, abs=1e-4)
    assert top.slices and set(top.slices) <= uids
    assert all(f.positive is False for f in result.findings)  # random weights: scores ≪ 0.5
    (expl,) = result.explanations  # no positive candidate: the top one is shown
    assert expl.heatmap is None and expl.image.shape == SHAPE[1:]
    r0, c0, r1, c1 = expl.markers[0]
    assert 0 <= r0 <= r1 < SHAPE[1] and 0 <= c0 <= c1 < SHAPE[2]


def test_not_a_chest_is_rejected_before_detection(tmp_path: Path) -> None:
    hu = np.full(SHAPE, -1000.0, dtype=np.float32)
    hu[:, 8:88, 8:88] = 40.0
    result, _ = analyse_detection(_bundle(_retinanet(TinyFeatures())),
                                  write_series(hu, tmp_path / "s"), datetime(2026, 1, 1),
                                  InferenceSettings())
    assert result.status == "rejected" and result.reason is not None
    assert result.reason.startswith("not a chest CT")
