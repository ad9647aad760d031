"""Projection radiography grayscale pipeline, pinned with values worked out by hand
(PS3.3 C.11.1 Modality LUT, C.11.2.1.2.1 LINEAR, C.11.2.1.3.1 SIGMOID and C.11.2.1.3.2
LINEAR_EXACT VOI functions): the Modality LUT and windows are pydicom's, so these hand-worked
values are what pydicom's functions must give."""

from __future__ import annotations

import math

import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian

from dicom_ai.imaging.xray import (
    VOI,
    apply_lut,
    apply_voi,
    invert,
    modality_values,
    model_input,
    presentation_from_8bit,
    presentation_from_dataset,
    voi_from_header,
    window,
    window_linear,
)


def test_linear_window_c50_w101() -> None:
    # Bottom edge c − 0.5 − (w−1)/2 = −0.5, top edge c − 0.5 + (w−1)/2 = 99.5;
    # inside: (x − 49.5)/100 + 0.5.
    x = np.array([-10, -0.5, 0, 49.5, 50, 99, 99.5, 100, 1000])
    expected = [0, 0, 0.005, 0.5, 0.505, 0.995, 1, 1, 1]
    assert np.allclose(window_linear(x, 50, 101), expected)


def test_linear_window_full_12_bit_and_width_one() -> None:
    # c = 2048, w = 4096: (x − 2047.5)/4095 + 0.5 → 0 at x = 0 and 1 at x = 4095.
    assert np.allclose(window_linear(np.array([0, 4095]), 2048, 4096), [0, 1])
    # w = 1 is a threshold at c − 0.5.
    assert window_linear(np.array([9, 9.5, 10]), 10, 1).tolist() == [0, 0, 1]
    with pytest.raises(ValueError, match="Window Width"):
        window_linear(np.array([0]), 10, 0.5)


def test_linear_exact_window_c50_w100() -> None:
    # PS3.3 C.11.2.1.3.2: x <= c − w/2 → 0, x > c + w/2 → 1, else (x − c)/w + 0.5 — no
    # half-pixel shift and no w − 1 as in LINEAR.
    x = np.array([-1, 0, 0.5, 25, 50, 99.5, 100, 100.5])
    assert np.allclose(window(x, 50, 100, "LINEAR_EXACT"),
                       [0, 0, 0.005, 0.25, 0.5, 0.995, 1, 1])
    # LINEAR on the same window differs: (25 − 49.5)/99 + 0.5.
    assert window(np.array([25.0]), 50, 100)[0] == pytest.approx((25 - 49.5) / 99 + 0.5)
    with pytest.raises(ValueError, match="greater than 0"):
        window(x, 50, 0, "LINEAR_EXACT")
    header = _header(WindowCenter=50, WindowWidth=100, VOILUTFunction="LINEAR_EXACT",
                     BitsStored=8)
    out = presentation_from_dataset(np.array([0, 25, 100], dtype=np.uint8), header)
    assert np.allclose(out, [0, 0.25, 1])


def test_sigmoid_window() -> None:
    # 1 / (1 + exp(−4 (x − c) / w)): x = c → 0.5, x = c ± w/4 → 1/(1 + e^∓1).
    out = window(np.array([50.0, 75.0, 25.0]), 50, 100, "SIGMOID")
    assert np.allclose(out, [0.5, 1 / (1 + math.exp(-1)), 1 / (1 + math.e)])


def test_rescale_and_invert() -> None:
    header = _header(RescaleSlope=2, RescaleIntercept=-100)
    assert modality_values(np.array([0, 50], dtype=np.uint16), header).tolist() == [-100.0, 0.0]
    assert invert(np.array([0.0, 0.25, 1.0])).tolist() == [1.0, 0.75, 0.0]


def test_apply_lut_clamps_both_ends() -> None:
    # Descriptor (4 entries, first input 10, 8 bits): 9 → first entry, 14 → last entry.
    out = apply_lut(np.array([9, 10, 11, 12, 13, 14]), (4, 10, 8), [0, 100, 200, 255])
    assert out.tolist() == [0, 0, 100, 200, 255, 255]


def _header(**attrs: object) -> Dataset:
    ds = Dataset()
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.PixelRepresentation = 0
    for keyword, value in attrs.items():
        setattr(ds, keyword, value)
    return ds


def test_voi_lut_sequence() -> None:
    item = Dataset()
    item.LUTDescriptor = [4, 10, 8]
    item.add_new(0x00283006, "US", [0, 100, 200, 255])
    header = _header(VOILUTSequence=Sequence([item]), WindowCenter=1, WindowWidth=1)
    voi = voi_from_header(header)
    assert voi.kind == "lut"  # the LUT wins over the window
    out = apply_voi(np.array([9.0, 10.0, 12.0, 13.0, 20.0]), voi)
    assert np.allclose(out, [0, 0, 200 / 255, 1, 1])


def test_voi_lut_sequence_as_16_bit_words() -> None:
    item = Dataset()
    item.LUTDescriptor = [3, 0, 12]
    item.add_new(0x00283006, "OW", np.array([0, 1000, 4095], dtype="<u2").tobytes())
    voi = voi_from_header(_header(VOILUTSequence=Sequence([item])))
    assert np.allclose(apply_voi(np.array([0.0, 1.0, 2.0]), voi), [0, 1000 / 4095, 1])


def test_modality_lut_sequence() -> None:
    item = Dataset()
    item.LUTDescriptor = [3, 0, 16]
    item.add_new(0x00283006, "US", [100, 200, 300])
    header = _header(ModalityLUTSequence=Sequence([item]))
    assert modality_values(np.array([0, 1, 2, 5]), header).tolist() == [100, 200, 300, 300]


def test_window_from_header_takes_the_first_of_several() -> None:
    voi = voi_from_header(_header(WindowCenter=[40, 400], WindowWidth=[400, 2000],
                                  VOILUTFunction="SIGMOID"))
    assert voi == VOI(kind="window", center=40.0, width=400.0, function="SIGMOID")


def test_full_range_fallback_after_rescale() -> None:
    # 12-bit unsigned, intercept −1024: stored 0..4095 → −1024..3071 → [0, 1].
    header = _header(RescaleSlope=1, RescaleIntercept=-1024)
    voi = voi_from_header(header)
    assert (voi.kind, voi.low, voi.high) == ("range", -1024.0, 3071.0)
    out = presentation_from_dataset(np.array([0, 1024, 4095], dtype=np.uint16), header)
    assert np.allclose(out, [0, 1024 / 4095, 1])


def test_signed_full_range() -> None:
    header = _header(PixelRepresentation=1, BitsStored=8)
    assert voi_from_header(header) == VOI(kind="range", low=-128.0, high=127.0)


def test_monochrome1_12_bit_dataset() -> None:
    # Window c = 2048, w = 4096 maps 0 → 0 and 4095 → 1; MONOCHROME1 then inverts, so the
    # lowest stored value is displayed white.
    header = _header(PhotometricInterpretation="MONOCHROME1", WindowCenter=2048,
                     WindowWidth=4096)
    out = presentation_from_dataset(np.array([[0, 2048, 4095]], dtype=np.uint16), header)
    assert out.dtype == np.float32
    assert np.allclose(out, [[1.0, 1 - (0.5 / 4095 + 0.5), 0.0]])


def test_presentation_rejects_colour() -> None:
    with pytest.raises(ValueError, match="grayscale"):
        presentation_from_dataset(np.zeros((2, 2, 3)), _header(PhotometricInterpretation="RGB"))


def test_8_bit_training_pictures_match_an_8_bit_dicom() -> None:
    gray = np.array([[0, 51, 255]], dtype=np.uint8)
    header = _header(BitsAllocated=8, BitsStored=8)
    assert np.allclose(presentation_from_8bit(gray), presentation_from_dataset(gray, header))


def test_model_input_pad_versus_stretch() -> None:
    wide = np.ones((2, 4), dtype=np.float32)
    padded = model_input(wide, (4, 4), aspect="pad")
    assert padded.shape == (1, 4, 4)
    # Scale min(4/2, 4/4) = 1: the 2×4 image sits centred, rows 1–2; rows 0 and 3 are padding.
    assert padded[0].tolist() == [[0] * 4, [1] * 4, [1] * 4, [0] * 4]
    assert np.allclose(model_input(wide, (4, 4), aspect="stretch"), 1.0)
    with pytest.raises(ValueError, match="one H×W frame"):
        model_input(np.ones((1, 2, 4), dtype=np.float32), (4, 4))


def test_modality_lut_sequence_as_16_bit_words() -> None:
    # Explicit VR files store LUT Data as OW: pydicom hands over bytes, not integers.
    item = Dataset()
    item.LUTDescriptor = [3, 0, 16]
    item.add_new(0x00283006, "OW", np.array([100, 200, 300], dtype="<u2").tobytes())
    header = _header(ModalityLUTSequence=Sequence([item]))
    # OW words are read in the data set's byte order (pydicom asks the transfer syntax).
    header.file_meta = FileMetaDataset()
    header.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    assert modality_values(np.array([0, 1, 2, 5]), header).tolist() == [100, 200, 300, 300]


def test_lut_item_without_descriptor_is_a_value_error() -> None:
    from pydicom.dataset import Dataset

    from dicom_ai.imaging.xray import lut_from_item

    with pytest.raises(ValueError, match="without LUT Descriptor"):
        lut_from_item(Dataset())


def test_pydicom_voi_lut_wraps_8_bit_luts_so_ours_is_used() -> None:
    """Why the VOI LUT Sequence is not pydicom's: its apply_voi indexes an 8-bit LUT through
    uint8, so an input 256 past the first mapped value wraps to the first entry."""
    from pydicom.pixels.processing import apply_voi

    item = Dataset()
    item.LUTDescriptor = [4, 10, 8]
    item.add_new(0x00283006, "US", [0, 100, 200, 255])
    header = _header(VOILUTSequence=Sequence([item]))
    stored = np.array([12, 266], dtype=np.uint16)
    assert apply_voi(stored, header).tolist() == [200, 0]
    assert np.allclose(apply_voi_here(stored, header), [200 / 255, 1.0])


def apply_voi_here(stored: np.ndarray, header: Dataset) -> np.ndarray:
    return apply_voi(modality_values(stored, header), voi_from_header(header))
