"""Safe reading: every unusable file gives UnreadableFileError with a one-line reason."""

from __future__ import annotations

import gzip
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from dicom_ai.dicom.errors import UnreadableFileError
from dicom_ai.dicom.io import MEDIA_STORAGE_DIRECTORY, is_dicomdir, read_dataset, read_header
from tests.conftest import MakeDicom

PIXELS = np.arange(16, dtype=np.uint16).reshape(4, 4)


def test_header_without_pixels_and_dataset_with(make_dicom: MakeDicom) -> None:
    path = make_dicom("a.dcm", PIXELS)
    header = read_header(path)
    assert "PixelData" not in header
    assert header.Rows == 4
    full = read_dataset(path)
    assert np.array_equal(full.pixel_array, PIXELS)


def test_no_preamble_no_meta_is_read_by_force(make_dicom: MakeDicom, tmp_path: Path) -> None:
    ds = read_dataset(make_dicom("a.dcm", PIXELS))
    bare = tmp_path / "bare"
    del ds.file_meta
    ds.preamble = None
    ds.save_as(bare, implicit_vr=True, little_endian=True)
    assert bare.read_bytes()[:2] == b"\x08\x00"  # starts with group 0008, no preamble
    assert read_header(bare).SOPInstanceUID == ds.SOPInstanceUID


def test_text_file_is_not_dicom(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("path\tmd5\n" * 100)
    with pytest.raises(UnreadableFileError) as info:
        read_header(path)
    assert info.value.reason == "not a DICOM file"
    assert str(info.value) == "notes.txt: not a DICOM file"


def test_forced_read_of_garbage_is_not_dicom(tmp_path: Path) -> None:
    # Starts like a bare dataset (group 0008) but carries no identifying UID.
    path = tmp_path / "junk"
    path.write_bytes(b"\x08\x00\x05\x00CS\x0a\x00ISO_IR 100" + bytes(64))
    with pytest.raises(UnreadableFileError, match="not a DICOM file"):
        read_header(path)


def test_gzip_is_named(make_dicom: MakeDicom, tmp_path: Path) -> None:
    path = tmp_path / "a.dcm.gz"
    path.write_bytes(gzip.compress(make_dicom("a.dcm", PIXELS).read_bytes()))
    with pytest.raises(UnreadableFileError) as info:
        read_header(path)
    assert info.value.reason == "not a DICOM file (gzip-compressed)"


def test_truncated_header_names_element_and_bytes(make_dicom: MakeDicom, tmp_path: Path) -> None:
    path = make_dicom("a.dcm", None, ImageComments="x" * 200)
    elem = pydicom.dcmread(path).get_item(0x00204000)
    assert isinstance(elem, RawDataElement)
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(path.read_bytes()[: elem.value_tell + 50])
    with pytest.raises(UnreadableFileError) as info:
        read_header(cut)
    assert info.value.reason == "truncated: (0020,4000) holds 50 of 200 bytes"


def test_cut_inside_an_undefined_length_sequence(make_dicom: MakeDicom,
                                                 tmp_path: Path) -> None:
    item = Dataset()
    item.ImageComments = "z" * 100
    item.is_undefined_length_sequence_item = True
    path = make_dicom("a.dcm", None, ReferencedImageSequence=Sequence([item]))
    ds = pydicom.dcmread(path)
    ds["ReferencedImageSequence"].is_undefined_length = True
    ds.save_as(path, enforce_file_format=True)
    data = path.read_bytes()
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(data[: data.index(b"z" * 100) + 100])
    with pytest.raises(UnreadableFileError) as info:
        read_header(cut)
    assert info.value.reason.startswith("truncated or corrupt: ")


def test_truncated_pixel_data_passes_header_fails_dataset(make_dicom: MakeDicom,
                                                          tmp_path: Path) -> None:
    path = make_dicom("a.dcm", PIXELS)
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(path.read_bytes()[:-2])
    assert read_header(cut).Rows == 4
    with pytest.raises(UnreadableFileError) as info:
        read_dataset(cut)
    assert info.value.reason == "truncated: (7FE0,0010) holds 30 of 32 bytes"


def _with_patched_bytes(path: Path, old: bytes, new: bytes) -> Path:
    data = path.read_bytes()
    assert data.count(old) == 1
    path.write_bytes(data.replace(old, new))
    return path


def test_unparseable_integer_string(make_dicom: MakeDicom) -> None:
    path = _with_patched_bytes(make_dicom("a.dcm", PIXELS, InstanceNumber="9876"),
                               b"9876", b"98A6")
    with pytest.raises(UnreadableFileError) as info:
        read_header(path)
    assert info.value.reason == "invalid value for VR IS in (0020,0013)"


def test_reason_never_carries_the_value(make_dicom: MakeDicom) -> None:
    # A bad number in a patient attribute: the reason names the tag, never the text.
    path = _with_patched_bytes(make_dicom("a.dcm", PIXELS, PatientWeight="71.25"),
                               b"71.25", b"SMITH")
    with pytest.raises(UnreadableFileError) as info:
        read_header(path)
    assert info.value.reason == "invalid value for VR DS in (0010,1030)"
    assert "SMITH" not in str(info.value)


def test_bad_value_inside_a_sequence(make_dicom: MakeDicom) -> None:
    item = Dataset()
    item.ReferencedFrameNumber = "4321"
    path = _with_patched_bytes(
        make_dicom("a.dcm", PIXELS, ReferencedImageSequence=Sequence([item])),
        b"4321", b"43x1")
    with pytest.raises(UnreadableFileError, match=r"invalid value for VR IS in \(0008,1160\)"):
        read_header(path)


def test_nonconformant_uid_is_read_quietly(make_dicom: MakeDicom) -> None:
    with pytest.warns(UserWarning, match="Invalid value for VR UI"):
        path = make_dicom("a.dcm", PIXELS, FrameOfReferenceUID="1.2.abc")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert read_header(path).FrameOfReferenceUID == "1.2.abc"


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(UnreadableFileError, match="cannot open"):
        read_header(tmp_path / "absent.dcm")


def test_is_dicomdir() -> None:
    by_class = Dataset()
    by_class.SOPClassUID = MEDIA_STORAGE_DIRECTORY
    by_records = Dataset()
    by_records.DirectoryRecordSequence = Sequence([])
    image = Dataset()
    image.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    assert is_dicomdir(by_class)
    assert is_dicomdir(by_records)
    assert not is_dicomdir(image)
