"""The element walk, against hand-built encodings and against pydicom on the real corpus."""

from __future__ import annotations

import csv
import struct
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    UID,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from dicom_ai.dicom.elements import (
    ScanError,
    encode_element,
    even_text,
    scan_top_level,
    top_level_values,
)

STUDY, SERIES, SOP = 0x0020000D, 0x0020000E, 0x00080018
CORPUS = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "dicom"


def encode(ds: Dataset, syntax: str, *, undefined_lengths: bool = False) -> bytes:
    """The data set alone (no preamble, no meta) in ``syntax``."""
    if undefined_lengths:
        for elem in ds.iterall():
            if elem.VR == "SQ":
                elem.is_undefined_length = True
                for item in elem.value:
                    item.is_undefined_length_sequence_item = True
    fp = DicomBytesIO()
    fp.is_little_endian = UID(syntax).is_little_endian
    fp.is_implicit_VR = UID(syntax).is_implicit_VR
    write_dataset(fp, ds)
    return fp.getvalue()


def with_nested_sequences() -> Dataset:
    ds = Dataset()
    ds.SOPInstanceUID = "1.2.345"
    inner = Dataset()
    inner.CodeValue = "X"
    inner.ConceptNameCodeSequence = Sequence([Dataset(), Dataset()])
    ds.ReferencedImageSequence = Sequence([inner, Dataset()])
    ds.StudyInstanceUID = "1.2.3"
    ds.SeriesInstanceUID = "1.2.3.4"
    ds.Rows = 7
    return ds


@pytest.mark.parametrize("syntax", [ImplicitVRLittleEndian, ExplicitVRLittleEndian,
                                    ExplicitVRBigEndian])
@pytest.mark.parametrize("undefined", [False, True])
def test_values_past_nested_sequences(syntax: str, undefined: bool) -> None:
    data = encode(with_nested_sequences(), syntax, undefined_lengths=undefined)
    if undefined:
        assert struct.pack("<L" if UID(syntax).is_little_endian else ">L",
                           0xFFFFFFFF) in data
    found = top_level_values(data, {SOP, STUDY, SERIES}, implicit_vr=UID(syntax).is_implicit_VR,
                             little_endian=UID(syntax).is_little_endian)
    # UIDs come raw, padded to even length with NUL.
    assert found == {SOP: b"1.2.345\x00", STUDY: b"1.2.3\x00", SERIES: b"1.2.3.4\x00"}


def test_stops_after_the_last_wanted_tag_and_at_the_end() -> None:
    data = encode(with_nested_sequences(), ExplicitVRLittleEndian)
    assert top_level_values(data, {SOP}, implicit_vr=False, little_endian=True) == {
        SOP: b"1.2.345\x00"}
    # A prefix ending between elements: what lies in it.
    cut = data.index(b"1.2.3.4") - 8
    assert top_level_values(data[:cut], {STUDY, SERIES}, implicit_vr=False,
                            little_endian=True) == {STUDY: b"1.2.3\x00"}


def test_scan_says_whether_an_absent_tag_is_absent_or_beyond_the_bytes() -> None:
    data = encode(with_nested_sequences(), ExplicitVRLittleEndian)
    series_number, after_rows = 0x00200011, 0x00280011
    # Rows follows Series Number: the walk went past it, so Series Number is not there.
    assert scan_top_level(data, {STUDY, series_number}, implicit_vr=False,
                          little_endian=True) == ({STUDY: b"1.2.3\x00"}, True)
    # The bytes end first (a prefix, or a data set whose last element comes before the tag):
    # absence says nothing.
    cut = data.index(b"1.2.3.4") - 8
    assert scan_top_level(data[:cut], {STUDY, series_number}, implicit_vr=False,
                          little_endian=True) == ({STUDY: b"1.2.3\x00"}, False)
    assert scan_top_level(data, {after_rows}, implicit_vr=False, little_endian=True) == (
        {}, False)


@pytest.mark.parametrize("cut", [3, 9])
def test_truncation_inside_an_element_is_an_error(cut: int) -> None:
    data = encode(with_nested_sequences(), ExplicitVRLittleEndian)
    end = data.index(b"1.2.3.4") - 8 + cut
    with pytest.raises(ScanError):
        top_level_values(data[:end], {SERIES}, implicit_vr=False, little_endian=True)


def test_undefined_length_un_is_left_to_pydicom() -> None:
    # (0009,1010) UN, undefined length: its items are Implicit VR inside an Explicit VR data set.
    data = (struct.pack("<HH2s2xL", 0x0009, 0x1010, b"UN", 0xFFFFFFFF)
            + struct.pack("<HHL", 0xFFFE, 0xE0DD, 0))
    with pytest.raises(ScanError):
        top_level_values(data, {STUDY}, implicit_vr=False, little_endian=True)


def corpus_files() -> list[Path]:
    with (CORPUS / "INDEX.tsv").open() as fh:
        return [CORPUS / row["path"] for row in csv.DictReader(fh, delimiter="\t")
                if row["status"] == "ok"]


@pytest.mark.skipif(not (CORPUS / "INDEX.tsv").is_file(), reason="../shared/data not present")
def test_agrees_with_pydicom_on_the_corpus() -> None:
    """Every readable corpus file: the walk finds the values pydicom finds, or steps aside."""
    keys = {STUDY: "StudyInstanceUID", SERIES: "SeriesInstanceUID", SOP: "SOPInstanceUID",
            0x00080016: "SOPClassUID", 0x00080070: "Manufacturer"}
    compared = stepped_aside = 0
    for path in corpus_files():
        raw = path.read_bytes()
        if raw[128:132] != b"DICM":
            continue  # no file meta to tell the encoding
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        syntax = UID(ds.file_meta.get("TransferSyntaxUID", ImplicitVRLittleEndian))
        if not syntax.is_transfer_syntax or syntax.is_deflated:
            continue
        offset = 144 + struct.unpack_from("<L", raw, 140)[0]
        try:
            found = top_level_values(raw[offset:], keys, implicit_vr=syntax.is_implicit_VR,
                                     little_endian=syntax.is_little_endian)
        except ScanError:
            stepped_aside += 1
            continue
        for tag, keyword in keys.items():
            value = found.get(tag, b"").decode("latin-1").rstrip("\0").strip()
            assert value == str(ds.get(keyword, "") or "").strip(), (path.name, keyword)
        compared += 1
    assert compared > 200 and stepped_aside < compared / 10


def test_implicit_bytes_under_an_explicit_syntax_are_left_to_pydicom() -> None:
    data = encode(with_nested_sequences(), ImplicitVRLittleEndian)
    with pytest.raises(ScanError):
        top_level_values(data, {STUDY}, implicit_vr=False, little_endian=True)


def test_encode_element_in_each_form() -> None:
    # Implicit VR: tag, 4-byte length. Explicit short: tag, VR, 2-byte length. Explicit long
    # (OB): tag, VR, 2 reserved bytes, 4-byte length (PS3.5 §7.1).
    assert encode_element(0x00000100, b"\x01\x80") == bytes.fromhex("0000 0001 02000000 0180")
    assert encode_element(0x00020010, b"1.2\x00", b"UI") == (
        bytes.fromhex("0200 1000") + b"UI" + bytes.fromhex("0400") + b"1.2\x00")
    assert encode_element(0x00020001, b"\x00\x01", b"OB") == (
        bytes.fromhex("0200 0100") + b"OB" + bytes.fromhex("0000 02000000 0001"))
    assert even_text("1.2", b"\x00") == b"1.2\x00" and even_text("AB", b" ") == b"AB"
    data = (encode_element(STUDY, even_text("1.2.3", b"\x00"), b"UI")
            + encode_element(SERIES, even_text("1.2.3.4", b"\x00"), b"UI"))
    assert top_level_values(data, {STUDY, SERIES}, implicit_vr=False, little_endian=True) == {
        STUDY: b"1.2.3\x00", SERIES: b"1.2.3.4\x00"}
