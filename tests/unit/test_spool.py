"""Durable spool: file on disk and index row before the acknowledgement, start-up re-indexing."""

from __future__ import annotations

import errno
import os
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from io import BytesIO
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, CTImageStorage, ExplicitVRLittleEndian

from dicom_ai.dicom.errors import MissingAttributeError, UnreadableFileError
from dicom_ai.service import db
from dicom_ai.service.spool import Spool, Stored, durable_write, is_uid, parse_keys, study_paths

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


#: Instances stored at once in the group commit tests.
CONCURRENT = 8


def wait_until(what: str, probe: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not probe():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.001)


class Storing:
    """Threads each storing one instance into the same series directory of ``spool``, with
    ``os.fsync`` and index transactions counted. The first instance's directory fsync is held
    until the others wait for that directory, and its index transaction until they wait for the
    index: the others are then known to share the second fsync and the second transaction."""

    def __init__(self, spool: Spool, monkeypatch: pytest.MonkeyPatch) -> None:
        self.spool = spool
        self.series_dir = spool.incoming / STUDY / SERIES
        self.fsyncs: Counter[str] = Counter()
        self.transactions = 0
        self.first_held = threading.Event()
        self.release = threading.Event()
        self.fail_second: OSError | sqlite3.Error | None = None
        self.results: dict[str, Stored | BaseException] = {}
        fsync, transaction = os.fsync, db.transaction
        count_lock = threading.Lock()

        def counted_fsync(fd: int) -> None:
            path = os.readlink(f"/proc/self/fd/{fd}")
            with count_lock:
                self.fsyncs[path] += 1
                calls = self.fsyncs[path]
            if path == str(self.series_dir):
                if calls == 1:
                    self.first_held.set()
                    assert self.release.wait(10.0)
                elif isinstance(self.fail_second, OSError):
                    raise self.fail_second
            fsync(fd)

        def counted_transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
            self.transactions += 1
            if self.transactions == 1 and not isinstance(self.fail_second, OSError):
                wait_until("the others to wait for the index",
                           lambda: len(self.spool.group_commit.index._next.items)
                           == CONCURRENT - 1)
            if self.transactions == 2 and isinstance(self.fail_second, sqlite3.Error):
                raise self.fail_second
            return transaction(conn)

        monkeypatch.setattr(os, "fsync", counted_fsync)
        monkeypatch.setattr(db, "transaction", counted_transaction)

    def store(self, sop: str) -> threading.Thread:
        def run() -> None:
            try:
                self.results[sop] = self.spool.store([encoded(sop)], parse_keys(encoded(sop)),
                                                     calling_aet="CT")
            except BaseException as exc:  # reported through results, asserted by the test
                self.results[sop] = exc

        thread = threading.Thread(target=run)
        thread.start()
        return thread

    def run(self) -> list[str]:
        """Store CONCURRENT instances: one alone, held in its directory fsync, then the rest
        while it is held. Returns the SOP Instance UIDs of the rest."""
        first = self.store("1.2.3.50")
        assert self.first_held.wait(10.0)
        rest = [f"1.2.3.{51 + n}" for n in range(CONCURRENT - 1)]
        threads = [self.store(sop) for sop in rest]
        directory = self.spool.group_commit._directories[self.series_dir]
        wait_until("the others to wait for the directory",
                   lambda: len(directory._next.items) == len(rest))
        self.release.set()
        for thread in (first, *threads):
            thread.join(10.0)
            assert not thread.is_alive()
        return rest


def test_concurrent_commits_share_one_directory_fsync_and_one_transaction(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spool = Spool(tmp_path / "storage")
    spool.ensure_dir(spool.incoming / STUDY / SERIES)
    storing = Storing(spool, monkeypatch)
    rest = storing.run()
    assert all(isinstance(r, Stored) and r.new for r in storing.results.values()), \
        storing.results
    # CONCURRENT instances: two directory fsyncs and two index transactions, not CONCURRENT.
    assert storing.fsyncs[str(storing.series_dir)] == 2
    assert storing.transactions == 2
    group = spool.group_commit
    assert (group.fsyncs, group.fsynced) == (2, CONCURRENT)
    assert (group.index.rounds, group.index.items) == (2, CONCURRENT)
    assert not group._directories, "an idle directory is dropped"
    rows = {r[0] for r in spool._conn.execute("SELECT sop_instance_uid FROM instances")}
    assert rows == {"1.2.3.50", *rest}
    assert spool._conn.execute("SELECT instance_count FROM studies").fetchone()[0] == CONCURRENT
    spool.close()


@pytest.mark.parametrize("failure", [
    OSError(errno.EIO, "Input/output error"),
    sqlite3.OperationalError("database or disk is full")])
def test_a_failed_group_commit_fails_every_member_and_leaves_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        failure: OSError | sqlite3.Error) -> None:
    spool = Spool(tmp_path / "storage")
    spool.ensure_dir(spool.incoming / STUDY / SERIES)
    storing = Storing(spool, monkeypatch)
    storing.fail_second = failure
    rest = storing.run()
    assert isinstance(storing.results["1.2.3.50"], Stored)
    for sop in rest:
        error = storing.results[sop]
        assert isinstance(error, type(failure)) and error.args == failure.args, error
    # Only the first group's instance is indexed, and only its file is left.
    rows = {r[0] for r in spool._conn.execute("SELECT sop_instance_uid FROM instances")}
    assert rows == {"1.2.3.50"}
    assert {p.name for p in storing.series_dir.iterdir()} == {"1.2.3.50.dcm"}
    assert not list(spool.tmp.iterdir())
    spool.close()
    # Nothing the members were told had failed comes back at a restart.
    restarted = Spool(tmp_path / "storage")
    assert restarted.reindex() == 0
    restarted.close()
