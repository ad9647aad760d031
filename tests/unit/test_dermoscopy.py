"""Dermoscopy normalization (hand-worked values), the ISIC loader, and that training and the
DICOM path prepare the same pixels identically."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from dicom_ai.dicom.model import Instance
from dicom_ai.imaging.dermoscopy import lesion_mask, model_input, require_colour, shades_of_gray
from dicom_ai.inference.classify import prepare
from dicom_ai.inference.spec import parse_classification
from dicom_ai.train.datasets import DERM_LABELS, dermoscopy_model_input, load_isic
from dicom_ai.train.recipes import RECIPES

DERMOSCOPIC_STORAGE = "1.2.840.10008.5.1.4.1.1.77.1.7"


def test_shades_of_gray_by_hand_with_p1() -> None:
    # Gray world (p = 1): channel means 150, 75, 37.5, their mean 87.5; gains 7/12, 7/6, 7/3.
    # 200·7/12 = 100·7/6 = 50·7/3 = 116.67 → 117; the second pixel → 58.33 → 58.
    rgb = np.array([[[200, 100, 50], [100, 50, 25]]], dtype=np.uint8)
    out = shades_of_gray(rgb, p=1.0)
    assert out.tolist() == [[[117, 117, 117], [58, 58, 58]]]
    assert out.dtype == np.uint8


def test_shades_of_gray_removes_a_uniform_cast_with_p6() -> None:
    # A uniform image is its own illuminant estimate for any p: (120, 60, 30) → mean 70.
    rgb = np.broadcast_to(np.array([120, 60, 30], dtype=np.uint8), (4, 5, 3)).copy()
    assert (shades_of_gray(rgb) == 70).all()


def test_shades_of_gray_clips_and_keeps_black() -> None:
    # p = 1: means 125, 5, 5 → mean 45; gains 0.36, 9, 9: (250, 10, 10) → (90, 90, 90).
    rgb = np.array([[[250, 10, 10], [0, 0, 0]]], dtype=np.uint8)
    assert shades_of_gray(rgb, p=1.0).tolist() == [[[90, 90, 90], [0, 0, 0]]]
    # Three yellow pixels and one blue: means 191.25, 191.25, 63.75 → mean 148.75; the red and
    # green gain 0.7778 takes 255 to 198.33 → 198, the blue gain 2.333 takes 255 past 255.
    rgb = np.array([[[255, 255, 0]] * 3 + [[0, 0, 255]]], dtype=np.uint8)
    assert shades_of_gray(rgb, p=1.0).tolist() == [[[198, 198, 0]] * 3 + [[0, 0, 255]]]
    black = np.zeros((3, 3, 3), dtype=np.uint8)
    assert (shades_of_gray(black) == 0).all()


def test_model_input_is_corrected_then_stretched() -> None:
    # 2×4 uniform grey-tinted image → 3×2×2 network input of the corrected grey (70/255).
    rgb = np.broadcast_to(np.array([120, 60, 30], dtype=np.uint8), (2, 4, 3)).copy()
    x = model_input(rgb, (2, 2))
    assert x.shape == (3, 2, 2) and x.dtype == np.float32
    assert np.allclose(x, 70 / 255.0)
    with pytest.raises(ValueError, match="RGB"):
        shades_of_gray(rgb[..., 0])


def _isic_tree(root: Path) -> None:
    rng = np.random.default_rng(0)
    rows = ["path,label,split,age_approximate,sex"]
    for split, labels in (("train", ["melanoma", "nevus", "seborrheic_keratosis", "nevus"]),
                          ("val", ["nevus", "melanoma"])):
        (root / split).mkdir(parents=True)
        for i, label in enumerate(labels):
            name = f"{split}/ISIC_{i:07d}.png"
            Image.fromarray(rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)).save(root / name)
            rows.append(f"{name},{label},{split},50,female")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")


def test_load_isic_keeps_the_official_splits(tmp_path: Path) -> None:
    _isic_tree(tmp_path / "isic")
    train, val = load_isic(tmp_path / "isic", (8, 8), tmp_path / "cache")
    assert train.labels.tolist() == [0, 1, 2, 1] and val.labels.tolist() == [1, 0]
    assert train.names[0] == "train/ISIC_0000000.png" and not set(train.names) & set(val.names)
    assert train.images.shape == (4, 3, 8, 8) and train.images.dtype == np.float16
    expected = dermoscopy_model_input(tmp_path / "isic" / val.names[1], (8, 8))
    assert np.allclose(val.images[1], expected, atol=1e-3)
    # The second call reads the cache and gives the same arrays.
    again, _ = load_isic(tmp_path / "isic", (8, 8), tmp_path / "cache")
    assert np.array_equal(again.images, train.images)
    assert DERM_LABELS == ("melanoma", "nevus", "seborrheic_keratosis")


def test_load_isic_refuses_unknown_labels(tmp_path: Path) -> None:
    _isic_tree(tmp_path / "isic")
    csv = tmp_path / "isic" / "labels.csv"
    csv.write_text(csv.read_text().replace("nevus,val", "basal_cell_carcinoma,val"))
    with pytest.raises(ValueError, match="basal_cell_carcinoma"):
        load_isic(tmp_path / "isic", (8, 8), tmp_path / "cache")


def _dermoscopic_file(path: Path, rgb: np.ndarray) -> Instance:
    ds = Dataset()
    ds.SOPClassUID = DERMOSCOPIC_STORAGE
    ds.SOPInstanceUID = generate_uid()
    ds.Modality = "DMS"
    ds.Rows, ds.Columns = rgb.shape[:2]
    ds.SamplesPerPixel = 3
    ds.PlanarConfiguration = 0
    ds.PhotometricInterpretation = "RGB"
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelData = np.ascontiguousarray(rgb).tobytes()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = DERMOSCOPIC_STORAGE
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.save_as(path, enforce_file_format=True)
    return Instance(path, ds)


def test_dicom_path_matches_training_path(tmp_path: Path) -> None:
    rgb = np.random.default_rng(1).integers(0, 256, (30, 40, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "lesion.png")
    instance = _dermoscopic_file(tmp_path / "lesion.dcm", rgb)
    recipe = RECIPES["derm-lesion"]
    block: dict[str, Any] = {**recipe.dicom_ai, "labels": list(recipe.labels),
                             "derived_findings": [{**d, "threshold": 0.5}
                                                  for d in recipe.dicom_ai["derived_findings"]]}
    bundle: Any = SimpleNamespace(spec=parse_classification(block), name=recipe.name)
    prepared = prepare(bundle, instance)
    trained_on = dermoscopy_model_input(tmp_path / "lesion.png", recipe.size)
    assert np.array_equal(prepared.model_input, trained_on)
    # The reader sees the photograph as stored, not the colour-corrected network input.
    assert np.array_equal(prepared.display, rgb)
    assert prepared.box == (0, 0, *recipe.size)


def _skin_with_lesion(centre: tuple[int, int], radius: int) -> np.ndarray:
    """3×64×64 light skin, a dark round lesion, and a dermatoscope's black corners."""
    rows, cols = np.mgrid[0:64, 0:64]
    x = np.empty((3, 64, 64), dtype=np.float32)
    x[:] = np.array([0.85, 0.7, 0.6], dtype=np.float32)[:, None, None]
    lesion = (rows - centre[0]) ** 2 + (cols - centre[1]) ** 2 <= radius ** 2
    x[:, lesion] = np.array([0.35, 0.2, 0.15], dtype=np.float32)[:, None]
    vignette = (rows - 31.5) ** 2 + (cols - 31.5) ** 2 > 36 ** 2
    x[:, vignette] = 0.0
    return x


def test_lesion_mask_finds_the_dark_lesion_not_the_vignette() -> None:
    x = _skin_with_lesion((28, 36), 9)
    found = lesion_mask(x)
    assert found.found
    rows, cols = np.mgrid[0:64, 0:64]
    truth = (rows - 28) ** 2 + (cols - 36) ** 2 <= 81
    overlap = (found.mask & truth).sum() / (found.mask | truth).sum()
    assert overlap > 0.8
    assert not found.mask[0, 0] and not found.mask[63, 63]


def test_lesion_mask_falls_back_to_the_centre() -> None:
    # Uniform skin: nothing dark to find, so the central disk (radius 0.2 of the side) stands in.
    x = np.full((3, 50, 50), 0.7, dtype=np.float32)
    found = lesion_mask(x)
    assert not found.found
    assert found.mask[25, 25] and not found.mask[25, 2]
    assert abs(found.mask.mean() - np.pi * 0.2 ** 2) < 0.02
    with pytest.raises(ValueError, match="3×H×W"):
        lesion_mask(x[0])


def test_grey_pictures_in_colour_are_refused() -> None:
    grey = np.broadcast_to(np.arange(64, dtype=np.uint8)[:, None, None], (64, 64, 3)).copy()
    with pytest.raises(ValueError, match="grey"):
        require_colour(grey)
    # Mean chroma (max − min of the channels) of 2/255 on every pixel is 0.0078: colour enough.
    tinted = grey.copy()
    tinted[..., 0] = np.minimum(grey[..., 0].astype(np.int64) + 2, 255).astype(np.uint8)
    require_colour(tinted)


def test_colour_stats_and_fundus_rule_by_hand() -> None:
    from dicom_ai.imaging.dermoscopy import colour_stats, require_not_fundus

    # Half black (dark share 0.5), half (200, 100, 50): blue chromaticity 50/350 = 0.143.
    rgb = np.zeros((2, 2, 3), dtype=np.uint8)
    rgb[0] = (200, 100, 50)
    stats = colour_stats(rgb)
    assert stats.dark_share == 0.5 and stats.blue == pytest.approx(50 / 350)
    # Blue below 0.19 is refused whatever the surround, and the reason says so.
    with pytest.raises(ValueError, match=r"colour is a fundus photograph's \(blue "
                                         r"chromaticity 0\.143 < 0\.19\)"):
        require_not_fundus(rgb)
    # Orange-red inside a black surround (blue 0.25 < 0.30, dark 0.5 > 0.15): a fundus.
    rgb[0] = (180, 120, 100)
    with pytest.raises(ValueError, match=r"colour and dark surround are a fundus photograph's "
                                         r"\(blue chromaticity 0\.250 < 0\.3, dark surround "
                                         r"50% > 15%\)"):
        require_not_fundus(rgb)
    # The same colour filling the picture is skin-like (blue 0.25 ≥ 0.19, no surround).
    require_not_fundus(np.broadcast_to(np.array([180, 120, 100], dtype=np.uint8),
                                       (4, 4, 3)).copy())


DATA = Path(__file__).resolve().parents[3] / "shared" / "data"


@pytest.mark.skipif(not (DATA / "skin" / "isic2017").is_dir()
                    or not (DATA / "fundus").is_dir(), reason="../shared/data is not present")
def test_fundus_rule_on_real_photographs() -> None:
    """The rates the model card states: ISIC 2017 validation (never used to choose the rule)
    1 of 148 refused; RetinaMNIST validation 113 of 120 and DRIVE 40 of 40 refused."""
    import csv

    from dicom_ai.imaging.dermoscopy import require_not_fundus

    def refused(rgb: np.ndarray) -> bool:
        try:
            require_not_fundus(rgb)
        except ValueError:
            return True
        return False

    root = DATA / "skin" / "isic2017"
    with (root / "labels.csv").open(encoding="utf-8", newline="") as fh:
        val = [r["path"] for r in csv.DictReader(fh) if r["split"] == "val"]
    isic = [refused(np.asarray(Image.open(root / p).convert("RGB"))) for p in val]
    assert (sum(isic), len(isic)) == (1, 148)
    retina = np.load(DATA / "fundus" / "retinamnist28_trainval.npz")["val_images"]
    assert (sum(refused(im) for im in retina), len(retina)) == (113, 120)
    drive = sorted((DATA / "fundus" / "drive").glob("*/*.jpg"))
    assert (sum(refused(np.asarray(Image.open(p).convert("RGB"))) for p in drive),
            len(drive)) == (40, 40)
