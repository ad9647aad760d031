"""sample_studies/: every file reads and decodes, and the promised variety is there."""

from __future__ import annotations

import importlib.util
import shutil
import sys
from collections import Counter
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
from PIL import Image
from pydicom import dcmread
from pydicom.dataset import FileDataset
from pydicom.uid import (
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
)

from dicom_ai.imaging.xray import presentation_from_dataset

SAMPLES = Path(__file__).resolve().parents[2] / "sample_studies"
FILES = sorted(SAMPLES.rglob("*.dcm")) if SAMPLES.is_dir() else []

pytestmark = pytest.mark.skipif(not FILES, reason="sample_studies/ is missing or empty")

#: What the README's table promises: (folder, SOP class, photometric, bits stored, syntax).
EXPECTED = {
    "cxr01": ("1.2.840.10008.5.1.4.1.1.1", "MONOCHROME2", 8, ExplicitVRLittleEndian),
    "cxr02": ("1.2.840.10008.5.1.4.1.1.1", "MONOCHROME1", 12, RLELossless),
    "cxr03": ("1.2.840.10008.5.1.4.1.1.1.1", "MONOCHROME2", 12, JPEG2000Lossless),
    "cxr04": ("1.2.840.10008.5.1.4.1.1.1.1.1", "MONOCHROME1", 12, JPEGLSLossless),
    "fundus01": ("1.2.840.10008.5.1.4.1.1.77.1.5.1", "RGB", 8, ExplicitVRLittleEndian),
    "fundus02": ("1.2.840.10008.5.1.4.1.1.77.1.5.1", "YBR_FULL_422", 8, JPEGBaseline8Bit),
    "fundus03": ("1.2.840.10008.5.1.4.1.1.77.1.5.1", "RGB", 8, RLELossless),
    "fracture01": ("1.2.840.10008.5.1.4.1.1.1", "MONOCHROME2", 12, JPEGLosslessSV1),
    "derm01": ("1.2.840.10008.5.1.4.1.1.77.1.7", "RGB", 8, ExplicitVRLittleEndian),
    "derm02": ("1.2.840.10008.5.1.4.1.1.77.1.7", "YBR_FULL_422", 8, JPEGBaseline8Bit),
    "derm03": ("1.2.840.10008.5.1.4.1.1.77.1.7", "RGB", 8, RLELossless),
}
CT_FOLDER = "ct-lung-pet-ct-dx-a0002"
SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"
SOURCE_JPEGS = {
    "cxr01": "train/NORMAL/IM-0199-0001.jpeg",
    "cxr02": "train/PNEUMONIA/person480_virus_982.jpeg",
    "cxr03": "train/NORMAL/IM-0448-0001.jpeg",
    "cxr04": "train/PNEUMONIA/person898_bacteria_2823.jpeg",
}


def read(folder: str, name: str = "1.dcm") -> FileDataset:
    return dcmread(SAMPLES / folder / name)


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(SAMPLES)))
def test_every_file_reads_and_decodes(path: Path) -> None:
    ds = dcmread(path)
    pixels = ds.pixel_array
    assert pixels.shape[:2] == (ds.Rows, ds.Columns)
    assert int(pixels.max()) > int(pixels.min()), "a blank image is no sample"


@pytest.mark.parametrize("folder", sorted(EXPECTED))
def test_encoding_matches_the_readme(folder: str) -> None:
    sop_class, photometric, bits, syntax = EXPECTED[folder]
    ds = read(folder)
    assert ds.SOPClassUID == sop_class
    assert ds.PhotometricInterpretation == photometric
    assert ds.BitsStored == bits
    assert ds.file_meta.TransferSyntaxUID == syntax


@pytest.mark.parametrize("folder", [f for f in sorted(EXPECTED) if f.startswith("cxr")])
def test_chest_xrays_use_their_whole_stored_range(folder: str) -> None:
    """Stretched to 12 bits or kept at 8, the stored values reach both ends of the range."""
    ds = read(folder)
    pixels = ds.pixel_array
    assert (int(pixels.min()), int(pixels.max())) == (0, 2**ds.BitsStored - 1)
    assert ds.BodyPartExamined == "CHEST"
    assert ds.ViewPosition in {"AP", "PA"}


@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data is not beside the repository")
@pytest.mark.parametrize("folder", sorted(SOURCE_JPEGS))
def test_chest_xrays_display_like_their_source(folder: str) -> None:
    """Through the DICOM grayscale pipeline (VOI, MONOCHROME1 inversion) every object shows the
    source JPEG's values: within one 12-bit step of ``v / 255``."""
    ds = read(folder)
    shown = presentation_from_dataset(ds.pixel_array, ds)
    with Image.open(SHARED / "cxr" / "kermany_fullres_subset" / SOURCE_JPEGS[folder]) as im:
        source = np.asarray(im.convert("L"), dtype=np.float64) / 255.0
    assert np.abs(shown - source).max() <= 1.0 / 4095


@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data is not beside the repository")
def test_fundus_pixels_match_retinamnist() -> None:
    """Lossless objects hold RetinaMNIST's values exactly; the JPEG one stays close."""
    with np.load(SHARED / "fundus" / "retinamnist28_trainval.npz") as npz:
        images = npz["val_images"]
    for folder, index, tolerance in (("fundus01", 8, 0), ("fundus02", 67, 12),
                                     ("fundus03", 49, 0)):
        decoded = read(folder).pixel_array.astype(np.int64)
        assert np.abs(decoded - images[index]).max() <= tolerance, folder


def test_voi_window_present_on_some_and_absent_on_others() -> None:
    windowed = {f for f in EXPECTED if f.startswith("cxr") and "WindowCenter" in read(f)}
    assert windowed == {"cxr02", "cxr03"}
    assert read("cxr03").PresentationIntentType == "FOR PRESENTATION"
    assert read("cxr04").PresentationIntentType == "FOR PROCESSING"


def test_fundus_decodes_to_rgb() -> None:
    for folder in ("fundus01", "fundus02", "fundus03"):
        ds = read(folder)
        pixels = ds.pixel_array
        assert pixels.shape == (28, 28, 3)
        assert pixels.dtype == np.uint8
        assert ds.ImageLaterality in {"R", "L"}


def test_fracture_radiograph_names_its_box_and_body_part() -> None:
    ds = read("fracture01")
    assert ds.BodyPartExamined == "HAND" and ds.Modality == "CR"
    assert "FracAtlas" in ds.ImageComments and "CC BY 4.0" in ds.ImageComments
    # boxes.csv: cx 0.6331, cy 0.4141, w 0.1041, h 0.0469 on a 373 × 454 image.
    assert "[216.7, 177.4, 255.6, 198.6]" in ds.ImageComments


@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data is not beside the repository")
def test_dermoscopy_pixels_match_isic() -> None:
    """One train image per class; lossless objects hold the decoded ISIC JPEG exactly."""
    for folder, source, label, tolerance in (
            ("derm01", "train/ISIC_0000002.jpg", "melanoma", 0),
            ("derm02", "train/ISIC_0000000.jpg", "nevus", 40),
            ("derm03", "train/ISIC_0012090.jpg", "seborrheic_keratosis", 0)):
        ds = read(folder)
        assert ds.Modality == "DMS" and ds.AnatomicRegionSequence[0].CodeValue == "39937001"
        with Image.open(SHARED / "skin" / "isic2017" / source) as im:
            rgb = np.asarray(im.convert("RGB"), dtype=np.int64)
        decoded = ds.pixel_array.astype(np.int64)
        assert np.abs(decoded - rgb).max() <= tolerance, folder
        # Away from sharp edges the JPEG baseline copy is close on average.
        assert np.abs(decoded - rgb).mean() <= 3.0, folder
        assert f"{source}, {label};" in ds.ImageComments and "CC-0" in ds.ImageComments


def test_identities_are_synthetic_and_unique() -> None:
    studies: Counter[str] = Counter()
    for folder in EXPECTED:
        ds = read(folder)
        number = folder[-2:]
        kind = folder[:-2].upper()
        assert str(ds.PatientName) == f"ANON^{kind}{number}"
        assert ds.PatientID == f"DICOMAI-{kind}-{number}"
        assert ds.PatientBirthDate == ""
        studies[ds.StudyInstanceUID] += 1
    assert set(studies.values()) == {1}


def test_ct_series_is_one_complete_series() -> None:
    slices = [dcmread(p, stop_before_pixels=True) for p in FILES if p.parent.name == CT_FOLDER]
    assert len(slices) == 30
    assert {ds.SeriesInstanceUID for ds in slices} == {slices[0].SeriesInstanceUID}
    assert {ds.Modality for ds in slices} == {"CT"}
    assert len({ds.SOPInstanceUID for ds in slices}) == 30
    positions = sorted(float(ds.ImagePositionPatient[2]) for ds in slices)
    assert len(set(positions)) == 30


def test_total_size_stays_small() -> None:
    total = sum(p.stat().st_size for p in SAMPLES.rglob("*") if p.is_file())
    assert total < 25 * 2**20


def load_build_script() -> ModuleType:
    """scripts/ is not a package: load the build script from its path."""
    path = SAMPLES.parent / "scripts" / "build_sample_studies.py"
    spec = importlib.util.spec_from_file_location("build_sample_studies", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while building
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data is not beside the repository")
def test_build_script_reproduces_the_committed_files(tmp_path: Path) -> None:
    """Same script, same data, same encoders → the same bytes (CT slices are plain copies and
    are left out to keep this fast)."""
    build = load_build_script()
    with np.load(SHARED / "fundus" / "retinamnist28_trainval.npz") as npz:
        images, labels = npz["val_images"], npz["val_labels"].ravel()
    built = [(spec.key, build.chest_xray(spec, SHARED)) for spec in build.CHEST_XRAYS]
    built += [(spec.key, build.fundus_photo(spec, images, labels)) for spec in build.FUNDUS_PHOTOS]
    built += [(spec.key, build.fracture_xray(spec, SHARED)) for spec in build.FRACTURE_XRAYS]
    built += [(spec.key, build.dermoscopy_image(spec, SHARED))
              for spec in build.DERMOSCOPY_IMAGES]
    for key, ds in built:
        written = build.write(ds, tmp_path / key.lower() / "1.dcm")
        committed = SAMPLES / key.lower() / "1.dcm"
        assert written.read_bytes() == committed.read_bytes(), f"{key}: rebuild sample_studies"


@pytest.mark.integration
@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dicom3tools is not installed")
@pytest.mark.parametrize("folder", sorted(EXPECTED))
def test_built_objects_pass_dciodvfy(folder: str) -> None:
    """dicom3tools finds no IOD error (the build script's known module clash aside)."""
    assert load_build_script().dciodvfy_errors(SAMPLES / folder / "1.dcm") == []
