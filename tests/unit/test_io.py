"""Safe reading: every unusable file gives UnreadableFileError with a one-line reason."""

from __future__ import annotations

import gzip
import struct
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence
from pydicom.uid import DeflatedExplicitVRLittleEndian, RLELossless

from dicom_ai.dicom.errors import UnreadableFileError
from dicom_ai.dicom.io import MEDIA_STORAGE_DIRECTORY, is_dicomdir, read_dataset, read_header
from tests.conftest import MakeDicom, image_dataset

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


def test_truncated_pixel_data_fails_header_and_dataset(make_dicom: MakeDicom,
                                                       tmp_path: Path) -> None:
    # The header read stops before the pixel data, yet a copy cut inside it is not complete.
    path = make_dicom("a.dcm", PIXELS)
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(path.read_bytes()[:-2])
    for read in (read_header, read_dataset):
        with pytest.raises(UnreadableFileError) as info:
            read(cut)
        assert info.value.reason == "truncated: (7FE0,0010) holds 30 of 32 bytes"


def _encapsulated(tmp_path: Path) -> Path:
    ds = image_dataset(PIXELS.astype(np.uint8))
    ds.file_meta.TransferSyntaxUID = RLELossless
    ds.PixelData = encapsulate([b"\x00" * 64, b"\x01" * 64])
    ds["PixelData"].VR = "OB"
    path = tmp_path / "rle.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.mark.parametrize(("cut", "reason"), [
    (-8, "truncated: (7FE0,0010) ends before its sequence delimiter"),
    (-20, "truncated: a fragment of (7FE0,0010) runs 12 bytes past the end of the file"),
])
def test_truncated_encapsulated_pixel_data_fails_header(tmp_path: Path, cut: int,
                                                        reason: str) -> None:
    path = _encapsulated(tmp_path)
    assert read_header(path).Rows == 4
    short = tmp_path / "short.dcm"
    short.write_bytes(path.read_bytes()[:cut])
    with pytest.raises(UnreadableFileError) as info:
        read_header(short)
    assert info.value.reason == reason


def test_top_level_item_tag_is_a_reason(make_dicom: MakeDicom, tmp_path: Path) -> None:
    # A zero-length (FFFE,E000) among the top-level elements made pydicom raise
    # NotImplementedError("Unknown Value Representation 'NONE'") out of the whole replay.
    path = make_dicom("a.dcm", PIXELS)
    data = path.read_bytes()
    name_tag = b"\x10\x00\x10\x00PN"
    at = data.index(name_tag)
    bad = tmp_path / "item.dcm"
    bad.write_bytes(data[:at] + b"\xfe\xff\x00\xe0\x00\x00\x00\x00" + data[at:])
    for read in (read_header, read_dataset):
        with pytest.raises(UnreadableFileError) as info:
            read(bad)
        assert info.value.reason == "(FFFE,E000) item tag outside a sequence"


def test_deflated_file_is_complete(make_dicom: MakeDicom, tmp_path: Path) -> None:
    # Offsets of a deflated data set are those of its inflated copy, larger than the file.
    ds = read_dataset(make_dicom("a.dcm", PIXELS, ImageComments="x" * 4000))
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    path = tmp_path / "deflated.dcm"
    ds.save_as(path, enforce_file_format=True)
    assert path.stat().st_size < 1000
    assert read_header(path).ImageComments == "x" * 4000
    assert np.array_equal(read_dataset(path).pixel_array, PIXELS)


@pytest.mark.parametrize("error", [
    NotImplementedError("Unknown Value Representation 'Doe^Jane' in tag (0010,0010)"),
    ValueError("invalid literal for int() with base 10: '19700101'"),
    KeyError("Doe^Jane"), TypeError("can't concat 'Doe^Jane'"), RecursionError(),
    MemoryError(), IndexError("list index out of range"),
    UnicodeDecodeError("ascii", b"Doe", 0, 1, "bad"),
    struct.error("unpack requires a buffer of 4 bytes"), AttributeError("'Doe^Jane'"),
])
def test_any_reader_exception_is_the_files_reason(make_dicom: MakeDicom,
                                                  monkeypatch: pytest.MonkeyPatch,
                                                  error: Exception) -> None:
    path = make_dicom("a.dcm", PIXELS)

    def fail(*args: object, **kwargs: object) -> Dataset:
        raise error

    monkeypatch.setattr(pydicom, "dcmread", fail)
    for read in (read_header, read_dataset):
        with pytest.raises(UnreadableFileError) as info:
            read(path)
        reason = info.value.reason
        assert reason and "\n" not in reason
        assert "Doe" not in reason and "19700101" not in reason, reason


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
