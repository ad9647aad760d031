"""Input-fit statistics, Mahalanobis distance, the feature tap, and the shipped bundles' check
on real non-chest radiographs and non-fundus photographs from ../shared/data/dicom."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from dicom_ai.dicom.io import read_header
from dicom_ai.dicom.model import Instance
from dicom_ai.inference.bundle import load_bundle
from dicom_ai.inference.classify import prepare
from dicom_ai.inference.input_fit import (
    FeatureTap,
    fit_statistics,
    layer_names,
    load_statistics,
    mahalanobis,
    score_and_logits,
)


def test_mahalanobis_by_hand() -> None:
    stats = {"mean": torch.tensor([1.0, 2.0], dtype=torch.float64),
             "precision": torch.tensor([[0.25, 0.0], [0.0, 1.0]], dtype=torch.float64)}
    # (3−1)²/4 + (2−2)² = 1 → 1; (1−1)²/4 + (5−2)² = 9 → 3.
    d = mahalanobis(np.array([[3.0, 2.0], [1.0, 5.0]]), stats)
    assert d.tolist() == pytest.approx([1.0, 3.0])


def test_fit_statistics_recovers_gaussian() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4000, 3)) * np.array([1.0, 2.0, 0.5]) + np.array([5.0, -1.0, 0.0])
    stats = fit_statistics(x)
    assert stats["mean"].numpy() == pytest.approx([5.0, -1.0, 0.0], abs=0.1)
    # Precision ≈ diag(1, 1/4, 4); Ledoit–Wolf shrinks only slightly with n ≫ d.
    assert np.diag(stats["precision"].numpy()) == pytest.approx([1.0, 0.25, 4.0], rel=0.15)
    d = mahalanobis(x, stats)
    # Squared distances of a 3-D Gaussian follow χ²(3): mean 3.
    assert float((d**2).mean()) == pytest.approx(3.0, rel=0.1)


def test_fit_statistics_with_more_dims_than_samples_is_finite() -> None:
    x = np.random.default_rng(1).normal(size=(5, 20))
    d = mahalanobis(x + 10.0, fit_statistics(x))
    assert np.all(np.isfinite(d))


def test_statistics_round_trip(tmp_path: Path) -> None:
    stats = fit_statistics(np.random.default_rng(2).normal(size=(50, 4)))
    torch.save(stats, tmp_path / "fit.pt")
    back = load_statistics(tmp_path / "fit.pt")
    assert torch.equal(back["precision"], stats["precision"])
    torch.save({"other": torch.zeros(1)}, tmp_path / "bad.pt")
    with pytest.raises(ValueError):
        load_statistics(tmp_path / "bad.pt")


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 1, bias=False)
        self.head = nn.Linear(2, 1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor([1.0, 2.0]).view(2, 1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv(x).mean(dim=(2, 3)))


def test_feature_tap_pools_and_detaches() -> None:
    net = _Net()
    x = torch.arange(8.0).view(2, 1, 2, 2)  # image means 1.5 and 5.5
    with FeatureTap(net, "conv") as tap:
        net(x[:1])
        net(x[1:])
    assert tap.features.tolist() == [[1.5, 3.0], [5.5, 11.0]]
    # The hook is gone after the block.
    net(x)
    assert tap.features.shape == (2, 2)


def test_feature_tap_concatenates_layers_in_order() -> None:
    net = _Net()
    x = torch.arange(8.0).view(2, 1, 2, 2)
    with FeatureTap(net, ["head", "conv"]) as tap:
        out = net(x)
    # head output (N×1) first, then the pooled conv features (N×2).
    assert tap.features.shape == (2, 3)
    assert torch.allclose(tap.features[:, :1], out)
    assert tap.features[:, 1:].tolist() == [[1.5, 3.0], [5.5, 11.0]]


def test_layer_names() -> None:
    assert layer_names({"layer": ["a", "b"]}) == ["a", "b"]
    assert layer_names({"layer": "c"}) == ["c"]


def test_feature_tap_unknown_layer() -> None:
    with pytest.raises(KeyError):
        FeatureTap(_Net(), "nope")


def test_feature_tap_without_forward() -> None:
    with FeatureTap(_Net(), "conv") as tap, pytest.raises(RuntimeError):
        _ = tap.features


REPO = Path(__file__).resolve().parents[2]
CORPUS = REPO.parent / "shared" / "data" / "dicom"


def _scores(bundle_name: str, files: list[Path]) -> tuple[list[float], float]:
    bundle = load_bundle(REPO / "models" / bundle_name, device=torch.device("cpu"))
    inputs = [prepare(bundle, Instance(f, read_header(f))).model_input for f in files]
    scores, _ = score_and_logits(bundle, inputs, amp=False)
    return scores.tolist(), float(bundle.dicom_ai["input_fit"]["threshold"])


@pytest.mark.skipif(not CORPUS.is_dir(), reason="../shared/data/dicom is not present")
def test_shipped_cxr_model_rejects_non_chest_and_passes_samples() -> None:
    others = ["highdicom/dx_image.dcm",                              # lateral thorax, DX
              "pydicom_test_files/dicomdirtests/77654033/CR1/6154",  # cervical spine, CR
              "dcm_qa_ct/GE/01.dcm",                                 # head CT slice
              "pydicom-data/vlut_04.dcm"]                            # test pattern, SC
    scores, threshold = _scores("cxr-pneumonia", [CORPUS / f for f in others])
    assert all(s > threshold for s in scores), scores
    samples = sorted((REPO / "sample_studies").glob("cxr0*/1.dcm"))
    scores, threshold = _scores("cxr-pneumonia", samples)
    assert len(scores) == 4 and all(s <= threshold for s in scores), scores


@pytest.mark.skipif(not CORPUS.is_dir(), reason="../shared/data/dicom is not present")
def test_shipped_fundus_model_rejects_other_photographs_and_passes_samples() -> None:
    others = ["pydicom-data/SC_rgb.dcm",                             # colour test pattern
              "pydicom_test_files/SC_rgb_jpeg.dcm",                  # photograph, JPEG
              "pydicom-data/US1_UNCI.dcm",                           # colour ultrasound
              "pydicom_test_files/examples_ybr_color.dcm"]           # ultrasound, YBR_FULL_422
    scores, threshold = _scores("fundus-dr", [CORPUS / f for f in others])
    assert all(s > threshold for s in scores), scores
    samples = sorted((REPO / "sample_studies").glob("fundus0*/1.dcm"))
    scores, threshold = _scores("fundus-dr", samples)
    assert len(scores) == 3 and all(s <= threshold for s in scores), scores


def _vl_photograph(path: Path, rgb: np.ndarray) -> Path:
    """``rgb`` written as an uncompressed VL Photographic image of the skin (as a camera or a
    workstation exporting it would label it)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.77.1.4"
    ds.SOPInstanceUID = generate_uid()
    ds.Modality = "XC"
    ds.BodyPartExamined = "SKIN"
    ds.Rows, ds.Columns = rgb.shape[:2]
    ds.SamplesPerPixel = 3
    ds.PlanarConfiguration = 0
    ds.PhotometricInterpretation = "RGB"
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelData = np.ascontiguousarray(rgb, dtype=np.uint8).tobytes()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.mark.skipif(not CORPUS.is_dir(), reason="../shared/data/dicom is not present")
def test_shipped_derm_model_rejects_other_photographs_and_grey_films(tmp_path: Path) -> None:
    from dicom_ai.dicom.errors import DicomInputError

    scores, threshold = _scores("derm-lesion", [CORPUS / "pydicom-data" / "SC_rgb.dcm"])
    assert all(s > threshold for s in scores), scores                # colour test pattern
    bundle = load_bundle(REPO / "models" / "derm-lesion", device=torch.device("cpu"))
    # Colour ultrasound (a warm-tinted sector on black) is refused by the fundus rule before
    # the network sees it.
    for name in ("pydicom-data/US1_UNCI.dcm", "pydicom_test_files/examples_rgb_color.dcm"):
        with pytest.raises(DicomInputError, match="fundus"):
            prepare(bundle, Instance(CORPUS / name, read_header(CORPUS / name)))
    # Radiographs exported as colour VL photographs labelled as skin: the grey film in RGB is
    # refused before the network sees it.
    for folder in ("cxr01", "cxr03", "fracture01"):
        grey = presentation_grey(REPO / "sample_studies" / folder / "1.dcm")
        path = _vl_photograph(tmp_path / f"{folder}.dcm", np.repeat(grey[..., None], 3, axis=-1))
        with pytest.raises(DicomInputError, match="grey"):
            prepare(bundle, Instance(path, read_header(path)))
    # So is an ultrasound stored as YBR_FULL_422 whose frame is grey but for a colour bar.
    path = CORPUS / "pydicom_test_files" / "examples_ybr_color.dcm"
    with pytest.raises(DicomInputError, match="grey"):
        prepare(bundle, Instance(path, read_header(path)))
    # Fundus photographs labelled as skin VL photographs are refused by their colour and
    # black surround before the network sees them (dicom_ai.imaging.dermoscopy).
    from dicom_ai.dicom.pixels import decode
    from dicom_ai.imaging.fundus import rgb_from_dataset

    for folder in ("fundus01", "fundus02", "fundus03"):
        source = Instance(REPO / "sample_studies" / folder / "1.dcm",
                          read_header(REPO / "sample_studies" / folder / "1.dcm"))
        rgb = rgb_from_dataset(decode(source), source.header)
        path = _vl_photograph(tmp_path / f"{folder}.dcm", rgb)
        with pytest.raises(DicomInputError, match="fundus"):
            prepare(bundle, Instance(path, read_header(path)))
    samples = sorted((REPO / "sample_studies").glob("derm0*/1.dcm"))
    scores, threshold = _scores("derm-lesion", samples)
    assert len(scores) == 3 and all(s <= threshold for s in scores), scores


def presentation_grey(path: Path) -> np.ndarray:
    """A radiograph as the product displays it, 8-bit grey."""
    from dicom_ai.dicom.pixels import decode
    from dicom_ai.imaging.xray import presentation_from_dataset

    instance = Instance(path, read_header(path))
    shown = presentation_from_dataset(decode(instance), instance.header)
    return np.clip(np.rint(shown * 255.0), 0, 255).astype(np.uint8)


@pytest.mark.skipif(not CORPUS.is_dir(), reason="../shared/data/dicom is not present")
def test_a_refused_photograph_is_a_rejected_result_not_a_failed_file(tmp_path: Path) -> None:
    """A fundus photograph sent as a skin photograph decodes: derm-lesion's result is rejected
    with the reason, and the replay counts the file as processed (exit 0), as it does for an
    image unlike the training data — failed means the file itself could not be read."""
    import json

    import pydicom
    from pydicom.uid import generate_uid

    from dicom_ai.config import Settings
    from dicom_ai.dicom.pixels import decode
    from dicom_ai.imaging.fundus import rgb_from_dataset
    from dicom_ai.replay import EXIT_OK, replay

    source = REPO / "sample_studies" / "fundus01" / "1.dcm"
    instance = Instance(source, read_header(source))
    folder = tmp_path / "in"
    folder.mkdir()
    path = _vl_photograph(folder / "photo.dcm", rgb_from_dataset(decode(instance),
                                                                 instance.header))
    ds = pydicom.dcmread(path)
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.save_as(path, enforce_file_format=True)
    bundle = load_bundle(REPO / "models" / "derm-lesion", device=torch.device("cpu"))
    report = replay(folder, tmp_path / "out", [bundle], Settings(), progress=False)
    assert report.exit_status == EXIT_OK
    (entry,) = report.entries
    assert (entry["status"], entry["reason"]) == ("processed", None)
    document = json.loads((tmp_path / "out" / ds.StudyInstanceUID / "findings.json").read_text())
    (result,) = document["results"]
    assert result["status"] == "rejected" and result["findings"] == []
    assert result["reason"].startswith("no image of the series could be used: the picture's "
                                       "colour")
    assert "a fundus photograph's" in result["reason"]
