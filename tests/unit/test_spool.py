"""Durable spool: file on disk and index row before the acknowledgement, start-up re-indexing."""

from __future__ import annotations

import sqlite3
from io import BytesIO
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, CTImageStorage, ExplicitVRLittleEndian

from dicom_ai.dicom.errors import MissingAttributeError, UnreadableFileError
from dicom_ai.service.spool import Spool, durable_write, is_uid, parse_keys, study_paths

STUDY = "1.2.826.0.1.3680043.8.498.10"
SERIES = "1.2.826.0.1.3680043.8.498.10.1"


def encoded(sop: str, *, study: str = STUDY, series: str = SERIES, **attrs: object) -> bytes:
    """A small CT instance in the DICOM file format, as a C-STORE handler would receive it."""
    ds = Dataset()
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = series
    ds.Modality = "CT"
    ds.Manufacturer = "ACME"
    ds.Rows = ds.Columns = 4
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelRepresentation = 1
    ds.PixelData = np.arange(16, dtype=np.int16).tobytes()
    for key, value in attrs.items():
        if value is None:
            delattr(ds, key)
        else:
            setattr(ds, key, value)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = UID(sop)
    buf = BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


@pytest.mark.parametrize(("value", "ok"), [
    ("1.2.840.10008.1.2", True), ("0.1", True), ("1.02", False), ("../x", False),
    ("1..2", False), ("", False), ("1." + "2" * 63, False), ("1.2/3", False)])
def test_is_uid(value: str, ok: bool) -> None:
    assert is_uid(value) is ok


def test_parse_keys_reads_filing_attributes() -> None:
    keys = parse_keys(encoded("1.2.3.4"))
    assert (keys.study_instance_uid, keys.series_instance_uid, keys.sop_instance_uid,
            keys.sop_class_uid, keys.manufacturer) == (STUDY, SERIES, "1.2.3.4", CTImageStorage,
                                                       "ACME")


def test_parse_keys_rejects_garbage_missing_and_malformed_uids() -> None:
    with pytest.raises(UnreadableFileError, match=r"cannot be parsed|not a DICOM data set"):
        parse_keys(b"\x00" * 128 + b"DICM" + b"\xff" * 40)
    with pytest.raises(UnreadableFileError):
        parse_keys(b"plain text, not DICOM at all")
    with pytest.raises(MissingAttributeError, match="SeriesInstanceUID is missing"):
        parse_keys(encoded("1.2.3.5", SeriesInstanceUID=None))
    # A UID becomes a directory name: a path-like value must never reach the file system.
    with pytest.raises(UnreadableFileError, match="StudyInstanceUID is not a valid UID"):
        parse_keys(encoded("1.2.3.6", study="../../etc"))


def test_durable_write_leaves_only_the_target(tmp_path: Path) -> None:
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    target = tmp_path / "a.bin"
    assert durable_write(target, [b"abc", b"def"], tmp_dir=tmp) == 6
    assert target.read_bytes() == b"abcdef"
    assert list(tmp.iterdir()) == []


def test_durable_write_of_more_fragments_than_one_writev_takes(tmp_path: Path) -> None:
    # 16 KiB PDUs bring a 100 MB instance in thousands of fragments, some of them empty.
    chunks = [bytes([i % 251]) * (i % 7) for i in range(5000)]
    target = tmp_path / "many.bin"
    assert durable_write(target, chunks, tmp_dir=tmp_path) == sum(map(len, chunks))
    assert target.read_bytes() == b"".join(chunks)


def test_store_writes_file_and_row_and_counts_new_instances(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    data = encoded("1.2.3.7")
    stored = spool.store([data], parse_keys(data), calling_aet="CT1", now=100.0)
    assert stored.new
    assert stored.path == tmp_path / "incoming" / STUDY / SERIES / "1.2.3.7.dcm"
    assert stored.path.read_bytes() == data
    conn = sqlite3.connect(spool.db_path)
    assert conn.execute("SELECT path, size, calling_aet, received_at FROM instances").fetchall() \
        == [(f"incoming/{STUDY}/{SERIES}/1.2.3.7.dcm", len(data), "CT1", 100.0)]
    again = spool.store([data], parse_keys(data), calling_aet="CT1", now=101.0)
    assert not again.new
    assert conn.execute("SELECT state, instance_count, last_received FROM studies").fetchall() \
        == [("receiving", 1, 101.0)]
    assert study_paths(conn, tmp_path, STUDY) == [stored.path]
    assert list((tmp_path / "tmp").iterdir()) == []


def test_reindex_adds_unindexed_files_and_drops_partial_ones(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    first = encoded("1.2.3.8")
    spool.store([first], parse_keys(first), calling_aet="CT1", now=100.0)
    # A crash after the rename and before the insert leaves a whole, unindexed file.
    orphan = encoded("1.2.3.9")
    target = spool.instance_path(parse_keys(orphan))
    target.write_bytes(orphan)
    (spool.tmp / "x.part").write_bytes(b"partial")
    (target.parent / "9.9.dcm").write_bytes(b"not dicom")
    spool.close()

    restarted = Spool(tmp_path)
    assert restarted.reindex() == 1
    assert list(restarted.tmp.iterdir()) == []
    conn = sqlite3.connect(restarted.db_path)
    assert sorted(r[0] for r in conn.execute("SELECT sop_instance_uid FROM instances")) == \
        ["1.2.3.8", "1.2.3.9"]
    assert conn.execute("SELECT instance_count FROM studies").fetchone() == (2,)
    assert restarted.reindex() == 0


def test_ensure_dir_creates_nested_directories(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    deep = tmp_path / "outputs" / "1.2" / "3.4"
    spool.ensure_dir(deep)
    assert deep.is_dir()
