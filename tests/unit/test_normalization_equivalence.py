"""The pixels a model trains on equal the pixels it gets from a DICOM of the same image.

A training JPEG (or RetinaMNIST image) is encoded into DICOM datasets in memory the way
modalities send it — MONOCHROME2 8-bit CR, MONOCHROME1 12-bit DX with a VOI window, RGB and
YBR_FULL secondary captures — written, read back and decoded by pydicom, and pushed through the
inference normalization. The result must match the training path within 1/255.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset

from dicom_ai.imaging import fundus, xray
from dicom_ai.train.datasets import cxr_model_input
from dicom_ai.train.recipes import CXR_PNEUMONIA, FUNDUS_DR
from tests.conftest import image_dataset

DATA = Path(__file__).resolve().parents[3] / "shared" / "data"
CXR_JPEG = DATA / "cxr" / "kermany224" / "train" / "PNEUMONIA" / "person1000_bacteria_2931.jpeg"
FUNDUS_NPZ = DATA / "fundus" / "retinamnist28_trainval.npz"

pytestmark = pytest.mark.skipif(not CXR_JPEG.exists() or not FUNDUS_NPZ.exists(),
                                reason="../shared/data is not present")

# One grey level, plus float32 rounding.
TOLERANCE = 1.0 / 255.0 + 1e-6


def _round_trip(ds: Dataset) -> Dataset:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    buf.seek(0)
    return pydicom.dcmread(buf)


def _gray(path: Path) -> npt.NDArray[np.uint8]:
    with Image.open(path) as im:
        return np.asarray(im.convert("L"), dtype=np.uint8)


def test_cxr_monochrome2_8bit_cr() -> None:
    size = CXR_PNEUMONIA.size
    gray = _gray(CXR_JPEG)
    ds = _round_trip(image_dataset(gray, Modality="CR", BodyPartExamined="CHEST"))
    pres = xray.presentation_from_dataset(ds.pixel_array, ds)
    got = xray.model_input(pres, size, aspect="stretch")
    want = cxr_model_input(CXR_JPEG, size)
    assert got.shape == want.shape == (1, *size)
    assert np.abs(got - want).max() <= TOLERANCE


def test_cxr_monochrome1_12bit_dx_with_window() -> None:
    size = CXR_PNEUMONIA.size
    gray = _gray(CXR_JPEG).astype(np.int64)
    # MONOCHROME1 stores dark as high: stored = 1000 + 10·(255 − g), 12 bits (max 3550).
    stored = (1000 + 10 * (255 - gray)).astype(np.uint16)
    # LINEAR window: y = (x − (c − 0.5)) / (w − 1) + 0.5. With w − 1 = 2550 and
    # c = 1000.5 + 1275 the window maps x = 1000 + 10·k to k / 255, and inversion gives g / 255.
    ds = image_dataset(stored, Modality="DX", BodyPartExamined="CHEST",
                       PhotometricInterpretation="MONOCHROME1", BitsStored=12, HighBit=11,
                       WindowCenter="2275.5", WindowWidth="2551", RescaleSlope="1",
                       RescaleIntercept="0", ViewPosition="PA")
    ds = _round_trip(ds)
    pres = xray.presentation_from_dataset(ds.pixel_array, ds)
    assert np.abs(pres - gray / 255.0).max() <= 1e-6
    got = xray.model_input(pres, size, aspect="stretch")
    want = cxr_model_input(CXR_JPEG, size)
    assert np.abs(got - want).max() <= TOLERANCE


def _fundus_image() -> npt.NDArray[np.uint8]:
    return np.load(FUNDUS_NPZ)["val_images"][3]


def _rgb_to_ybr_full(rgb: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint8]:
    # PS3.3 C.7.6.3.1.2 (YBR_FULL, 8 bit): the inverse of ybr_full_to_rgb.
    r, g, b = (rgb[..., i].astype(np.float64) for i in range(3))
    y = 0.299 * r + 0.587 * g + 0.114 * b
    cb = -0.168736 * r - 0.331264 * g + 0.5 * b + 128.0
    cr = 0.5 * r - 0.418688 * g - 0.081312 * b + 128.0
    return np.clip(np.rint(np.stack([y, cb, cr], axis=-1)), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("photometric", ["RGB", "YBR_FULL"])
def test_fundus_rgb_and_ybr_full(photometric: str) -> None:
    size = FUNDUS_DR.size
    rgb = _fundus_image()
    pixels = rgb if photometric == "RGB" else _rgb_to_ybr_full(rgb)
    ds = _round_trip(image_dataset(pixels, Modality="OP", PhotometricInterpretation=photometric))
    # Stored values as they are in the file, converted by fundus.ybr_full_to_rgb (pydicom's
    # convert_color_space for 8 bits).
    stored = ds.pixel_array if photometric == "RGB" else pydicom.pixels.pixel_array(
        ds, raw=True)
    decoded = (stored if photometric == "RGB" else fundus.ybr_full_to_rgb(stored))
    # Rounding Y/Cb/Cr to integers moves RGB by at most one level.
    assert np.abs(decoded.astype(int) - rgb.astype(int)).max() <= 1
    got = fundus.model_input(decoded, size)
    want = fundus.model_input(rgb, size)
    assert got.shape == want.shape == (3, *size)
    assert np.abs(got - want).max() <= TOLERANCE
