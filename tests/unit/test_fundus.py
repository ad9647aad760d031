"""Fundus colour handling and field-of-view crop, pinned with values worked out by hand
(PS3.3 C.7.6.3.1.2 YBR_FULL with BT.601 coefficients, PS3.5 8.2.1 4:2:2 sample order)."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pytest
from pydicom.dataset import Dataset

from dicom_ai.imaging.fundus import (
    crop_to_fov,
    field_of_view,
    model_input,
    palette_to_rgb,
    rgb_from_dataset,
    upsample_422,
    ybr_full_to_rgb,
)


def _ybr(*pixels: tuple[int, int, int], dtype: type = np.uint8) -> npt.NDArray[np.generic]:
    return np.array([pixels], dtype=dtype)


def test_ybr_grey_and_white() -> None:
    assert ybr_full_to_rgb(_ybr((128, 128, 128), (255, 128, 128))).tolist() == [
        [[128, 128, 128], [255, 255, 255]]]


def test_ybr_saturated_red_and_blue() -> None:
    # Red (255, 0, 0) encodes as Y 76, Cb 85, Cr 255. Back:
    #   R = 76 + 1.402·127 = 254.05 → 254
    #   G = 76 − 0.344136·(−43) − 0.714136·127 = 0.10 → 0
    #   B = 76 + 1.772·(−43) = −0.20 → 0
    # Blue (0, 0, 255) encodes as Y 29, Cb 255, Cr 107:
    #   R = 29 + 1.402·(−21) = −0.44 → 0; G = 29 − 43.71 + 15.00 = 0.29 → 0;
    #   B = 29 + 1.772·127 = 254.04 → 254
    out = ybr_full_to_rgb(_ybr((76, 85, 255), (29, 255, 107)))
    assert out.dtype == np.uint8
    assert out.tolist() == [[[254, 0, 0], [0, 0, 254]]]


def test_ybr_16_bit_grey_to_8_bit() -> None:
    # Half-scale grey 32768 with h = 2**15 → 32768·255/65535 = 127.502 → 128.
    out = ybr_full_to_rgb(_ybr((32768, 32768, 32768), dtype=np.uint16), bits=16)
    assert out.tolist() == [[[128, 128, 128]]]


def test_upsample_raw_422() -> None:
    # One row of two pixel pairs stored Y0 Y1 Cb Cr: each pair shares its chroma.
    raw = np.array([[10, 20, 100, 200, 30, 40, 110, 210]], dtype=np.uint8)
    assert upsample_422(raw).tolist() == [
        [[10, 100, 200], [20, 100, 200], [30, 110, 210], [40, 110, 210]]]
    decoded = np.zeros((2, 2, 3), dtype=np.uint8)
    assert upsample_422(decoded) is decoded


def test_ybr_422_end_to_end() -> None:
    raw = np.array([[128, 255, 128, 128]], dtype=np.uint8)
    assert ybr_full_to_rgb(upsample_422(raw)).tolist() == [[[128, 128, 128], [255, 255, 255]]]


def test_palette() -> None:
    # 16-bit LUTs, first mapped index 10; index 5 is below the table and takes entry 0.
    red = np.array([0, 65535, 0], dtype=np.uint16)
    green = np.array([0, 0, 65535], dtype=np.uint16)
    blue = np.array([65535, 0, 0], dtype=np.uint16)
    out = palette_to_rgb(np.array([[10, 11], [12, 5]]), red, green, blue, 10, 16)
    assert out.tolist() == [[[0, 0, 255], [255, 0, 0]], [[0, 255, 0], [0, 0, 255]]]


def _disc(shape: tuple[int, int], centre: tuple[int, int], radius: int) -> npt.NDArray[np.uint8]:
    rows, cols = np.mgrid[: shape[0], : shape[1]]
    image = np.full((*shape, 3), 5, dtype=np.uint8)
    image[(rows - centre[0]) ** 2 + (cols - centre[1]) ** 2 <= radius**2] = (200, 90, 40)
    return image


def test_field_of_view_exact_box() -> None:
    image = _disc((100, 120), (50, 60), 30)
    image[5:7, 5:7] = 255  # a bright speck: not the largest region
    # Rows 50 ± 30 and columns 60 ± 30, end-exclusive.
    assert field_of_view(image) == (20, 30, 81, 91)
    assert crop_to_fov(image).shape == (61, 61, 3)


def test_clipped_circle_is_padded_centred() -> None:
    # Disc centred on row 30 of 50 rows: rows 0–49 are inside, the camera clipped the top.
    image = _disc((50, 120), (30, 60), 30)
    assert field_of_view(image) == (0, 30, 50, 91)
    square = crop_to_fov(image)
    assert square.shape == (61, 61, 3)
    top = (61 - 50) // 2  # 5 rows of padding above, 6 below
    assert not square[:top].any()
    assert np.array_equal(square[top], image[0, 30:91])
    assert not square[top + 50:].any()


def test_black_image_keeps_everything() -> None:
    assert field_of_view(np.zeros((40, 50, 3), dtype=np.uint8)) == (0, 0, 40, 50)


def test_model_input_shape_and_range() -> None:
    out = model_input(_disc((100, 120), (50, 60), 30), (32, 32))
    assert out.shape == (3, 32, 32)
    assert out.dtype == np.float32
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    assert out[0, 16, 16] == pytest.approx(200 / 255)
    with pytest.raises(ValueError, match="RGB"):
        model_input(np.zeros((10, 10), dtype=np.uint8), (32, 32))


def _colour_header(photometric: str) -> Dataset:
    header = Dataset()
    header.PhotometricInterpretation = photometric
    header.BitsAllocated = 8
    header.BitsStored = 8
    return header


@pytest.mark.parametrize("photometric", ["RGB", "YBR_RCT", "YBR_ICT"])
def test_rgb_and_jpeg2000_colour_pass_through(photometric: str) -> None:
    # The JPEG 2000 decoder has already turned YBR_RCT/YBR_ICT samples into RGB.
    rgb = np.array([[[200, 90, 40]]], dtype=np.uint8)
    assert rgb_from_dataset(rgb, _colour_header(photometric)).tolist() == [[[200, 90, 40]]]


def test_rgb_from_ybr_header() -> None:
    ybr = _ybr((76, 85, 255))
    assert rgb_from_dataset(ybr, _colour_header("YBR_FULL_422")).tolist() == [[[254, 0, 0]]]
    with pytest.raises(ValueError, match="colour photograph"):
        rgb_from_dataset(np.zeros((2, 2), np.uint8), _colour_header("MONOCHROME2"))


def test_segmented_palette_of_a_real_file() -> None:
    from pathlib import Path

    from dicom_ai.dicom.io import read_dataset
    from dicom_ai.imaging.fundus import rgb_from_dataset

    path = (Path(__file__).resolve().parents[2].parent / "shared" / "data" / "dicom"
            / "pydicom-data" / "gdcm-US-ALOKA-16.dcm")
    if not path.exists():
        pytest.skip("../shared/data not present")
    ds = read_dataset(path)
    assert "SegmentedRedPaletteColorLookupTableData" in ds
    rgb = rgb_from_dataset(ds.pixel_array, ds)
    assert rgb.dtype == np.uint8 and rgb.shape == (int(ds.Rows), int(ds.Columns), 3)
    assert rgb.max() > 0


def test_palette_without_descriptor_is_a_value_error() -> None:
    from dicom_ai.imaging.fundus import rgb_from_dataset

    ds = Dataset()
    ds.PhotometricInterpretation = "PALETTE COLOR"
    with pytest.raises(ValueError, match="Descriptor"):
        rgb_from_dataset(np.zeros((2, 2), np.uint8), ds)
