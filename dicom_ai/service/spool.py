"""Durable storage of received instances: file first (fsync, rename, fsync dir), then the index row.

Layout under ``storage.directory``::

    index.sqlite                         the index (see :mod:`dicom_ai.service.db`)
    incoming/<study>/<series>/<sop>.dcm  received instances, exactly as sent (no re-encoding)
    outputs/<study>/<sop>.dcm            our SR and SC objects, waiting for or after delivery
    outputs/<study>/findings.json        the machine-readable twin of the latest SR(s)
    tmp/                                 partial files; removed on start

A file appears under ``incoming/`` only complete and fsync'ed (it is written in ``tmp/`` — as the
data set arrives, for a large one — and renamed), so a crash leaves either nothing or a whole
instance. An instance whose index row cannot be written (disk full) is removed again: the sender
is told it failed, and nothing of it remains. The start-up scan (:meth:`Spool.reindex`) indexes any
whole instance whose row was lost to a crash between rename and insert.

Instances committed at the same time — several associations storing at once — share the last two
steps (:class:`GroupCommit`): each fdatasyncs and renames its own file (concurrent fdatasyncs join
the same journal commit in the kernel); instances renamed into one directory while it is being
fsync'ed share its next fsync (directories in parallel), and the rows waiting for the index go in
one transaction. Each instance still returns only after its file, its name and its row are
durable; if a shared step fails, every instance sharing it fails and none is acknowledged.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import logging
import os
import shutil
import sqlite3
import struct
import threading
import time
import zlib
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from io import BytesIO
from pathlib import Path
from typing import Generic, TypeVar

from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_dataset, read_partial
from pydicom.tag import BaseTag, Tag
from pydicom.uid import UID

from dicom_ai import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from dicom_ai.dicom.elements import (
    ScanError,
    encode_element,
    even_text,
    scan_top_level,
    top_level_values,
)
from dicom_ai.dicom.errors import MissingAttributeError, UnreadableFileError
from dicom_ai.dicom.uid import is_valid_uid as is_uid
from dicom_ai.service import audit, db, studies

log = logging.getLogger(__name__)

_KEY_TAGS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID",
             "Manufacturer")
_KEY_TAG_NUMBERS: list[BaseTag | int] = [Tag(k) for k in _KEY_TAGS]
_LAST_KEY_TAG = max(_KEY_TAG_NUMBERS)
#: What the listener's walk of a data set reads: the filing keys and the completion facts.
_WALKED_TAGS = frozenset(int(t) for t in _KEY_TAG_NUMBERS) | frozenset(studies.FACT_TAGS)


def _after_keys(tag: BaseTag, _vr: str | None, _length: int) -> bool:
    # Data sets are in ascending tag order: past Series Instance UID nothing we need follows, and
    # the parse is over before the image module and its pixel data.
    return bool(tag > _LAST_KEY_TAG)


@dataclass(frozen=True)
class InstanceKeys:
    """The few header attributes the receiver needs: where to file an instance and its kind."""

    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    manufacturer: str
    #: What completion reads from the instance, when the walk that read the keys could decide it
    #: (:func:`dicom_ai.service.studies.facts_at_reception`); else the assembler reads the file.
    facts: studies.InstanceFacts | None = None


def parse_keys(data: bytes) -> InstanceKeys:
    """Read the filing keys from an encoded DICOM file, parsing no further than they lie.

    Parameters
    ----------
    data:
        A DICOM file (preamble, file meta, data set) as bytes, or a leading part of one.

    Raises
    ------
    UnreadableFileError
        The bytes are not a parseable DICOM data set, or a UID is malformed.
    MissingAttributeError
        A UID needed to file the instance is absent.
    """
    return _keys(_dataset_values(lambda: read_partial(BytesIO(data), stop_when=_after_keys,
                                                      specific_tags=_KEY_TAG_NUMBERS)))


def parse_dataset_keys(data: bytes, transfer_syntax: str) -> InstanceKeys:
    """:func:`parse_keys` for a data set as a C-STORE carries it: no preamble, no file meta.

    The same walk reads the instance's completion facts where it can (``InstanceKeys.facts``).

    Parameters
    ----------
    data:
        The data set, or a leading part of it, encoded in ``transfer_syntax``.
    transfer_syntax:
        The presentation context's transfer syntax.
    """
    implicit_vr, little_endian, deflated = _encoding(transfer_syntax)
    if deflated:
        # A leading part of a deflate stream inflates to a leading part of the data set.
        try:
            data = zlib.decompressobj(-zlib.MAX_WBITS).decompress(data)
        except zlib.error as exc:
            raise UnreadableFileError("deflated data set cannot be inflated") from exc
    try:
        raw, passed = scan_top_level(data, _WALKED_TAGS, implicit_vr=implicit_vr,
                                     little_endian=little_endian)
    except ScanError:
        return _walked_keys(data, implicit_vr, little_endian)
    values = _text_values(raw)
    return _keys(values, studies.facts_at_reception(raw, values["SOPClassUID"], passed=passed))


def _walked_keys(data: bytes, implicit_vr: bool, little_endian: bool) -> InstanceKeys:
    """The filing keys alone: from a walk that stops at them, else from pydicom."""
    try:
        raw = top_level_values(data, _KEY_TAG_NUMBERS, implicit_vr=implicit_vr,
                               little_endian=little_endian)
    except ScanError:
        # pydicom reads what the walk leaves alone, or names the problem.
        return _keys(_dataset_values(lambda: read_dataset(
            BytesIO(data), implicit_vr, little_endian,
            stop_when=_after_keys, specific_tags=_KEY_TAG_NUMBERS)))
    return _keys(_text_values(raw))


@lru_cache(maxsize=64)
def _encoding(transfer_syntax: str) -> tuple[bool, bool, bool]:
    """Implicit VR, little endian, deflated: pydicom's answer, kept (the negotiated syntaxes are
    few, and a ``UID`` validates its value every time one is made)."""
    syntax = UID(transfer_syntax)
    return syntax.is_implicit_VR, syntax.is_little_endian, syntax.is_deflated


def _text_values(raw: dict[int, bytes]) -> dict[str, str]:
    return {keyword: raw.get(tag, b"").decode("latin-1").rstrip("\0").strip()
            for keyword, tag in zip(_KEY_TAGS, _KEY_TAG_NUMBERS, strict=True)}


def _dataset_values(read: Callable[[], Dataset]) -> dict[str, str]:
    """The key attributes' values as text from a pydicom read."""
    try:
        ds = read()
        return {k: str(ds.get(k, "") or "").strip() for k in _KEY_TAGS}
    except (InvalidDicomError, ValueError, TypeError, EOFError, OSError, KeyError,
            NotImplementedError, AttributeError) as exc:
        # The exception text can quote element values; only its kind leaves this function.
        raise UnreadableFileError(f"data set cannot be parsed ({type(exc).__name__})") from exc


def _keys(values: dict[str, str], facts: studies.InstanceFacts | None = None) -> InstanceKeys:
    if not any(values.values()):
        raise UnreadableFileError("not a DICOM data set")
    for key in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID"):
        if not values[key]:
            raise MissingAttributeError(f"{key} is missing")
        if not is_uid(values[key]):
            raise UnreadableFileError(f"{key} is not a valid UID")
    return InstanceKeys(values["StudyInstanceUID"], values["SeriesInstanceUID"],
                        values["SOPInstanceUID"], values["SOPClassUID"], values["Manufacturer"],
                        facts)


def part10_header(sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str,
                  source_aet: str) -> bytes:
    """Preamble, ``DICM`` and File Meta Information (PS3.10 §7.1) for a received data set.

    Written element by element (:func:`~dicom_ai.dicom.elements.encode_element`) rather than
    through pydicom's generic writer, because it is built once per C-STORE on the hot path.

    Parameters
    ----------
    sop_class_uid, sop_instance_uid:
        Affected SOP Class and Instance UIDs of the C-STORE.
    transfer_syntax:
        The presentation context's transfer syntax.
    source_aet:
        The calling AE title (Source Application Entity Title); omitted when empty.
    """
    elements = [
        encode_element(0x00020001, b"\x00\x01", b"OB"),
        encode_element(0x00020002, even_text(sop_class_uid, b"\x00"), b"UI"),
        encode_element(0x00020003, even_text(sop_instance_uid, b"\x00"), b"UI"),
        encode_element(0x00020010, even_text(transfer_syntax, b"\x00"), b"UI"),
        encode_element(0x00020012, even_text(IMPLEMENTATION_CLASS_UID, b"\x00"), b"UI"),
        encode_element(0x00020013, even_text(IMPLEMENTATION_VERSION_NAME, b" "), b"SH"),
    ]
    if source_aet:
        elements.append(encode_element(0x00020016, even_text(source_aet, b" "), b"AE"))
    body = b"".join(elements)
    return (bytes(128) + b"DICM" + encode_element(0x00020000, struct.pack("<L", len(body)), b"UL")
            + body)


_part_numbers = itertools.count()
#: Most buffers one ``writev`` takes (a sender with small PDUs gives many fragments).
_IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024


def fsync_dir(path: Path) -> None:
    """Flush a directory entry (a rename or a new file) to disk."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_all(fd: int, chunks: Sequence[bytes | memoryview]) -> int:
    """Write ``chunks`` to ``fd`` in order with ``writev`` (as few calls as the kernel allows).

    Unbuffered: the chunks are large and already in memory, and a buffered file would copy them.

    Returns
    -------
    int
        The number of bytes written.
    """
    size = 0
    views = [memoryview(c) for c in chunks]
    while views:
        written = os.writev(fd, views[:_IOV_MAX])
        size += written
        while views and written >= len(views[0]):
            written -= len(views.pop(0))
        if views:
            views[0] = views[0][written:]
    return size


def _open_part(tmp_dir: Path) -> tuple[str, int]:
    # Unique without mkstemp's random names: process, thread and a per-process counter.
    name = str(tmp_dir / f"{os.getpid()}-{threading.get_ident()}-{next(_part_numbers)}.part")
    return name, os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)


def durable_write(target: Path, chunks: Sequence[bytes | memoryview], *, tmp_dir: Path) -> int:
    """Write ``chunks`` to ``target`` so that after return the file survives a crash or power cut.

    The data goes to a temporary file in ``tmp_dir`` (same file system), is fsync'ed, renamed over
    ``target`` and the target directory is fsync'ed. Readers never see a partial file.

    Parameters
    ----------
    target:
        Final path; its directory must exist.
    chunks:
        The bytes to write, in order (avoids joining large buffers).
    tmp_dir:
        Directory for the partial file, on the same file system as ``target``.

    Returns
    -------
    int
        The number of bytes written.
    """
    tmp_name, fd = _open_part(tmp_dir)
    try:
        try:
            size = write_all(fd, chunks)
            # The data and the file size; the name is made durable by the directory fsync below.
            os.fdatasync(fd)
        finally:
            os.close(fd)
        os.replace(tmp_name, target)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    fsync_dir(target.parent)
    return size


#: What an index row holds besides its keys: (path, size, calling AE title, arrival time).
IndexRow = tuple[InstanceKeys, Path, int, str, float]

T = TypeVar("T")
R = TypeVar("R")


@dataclass
class _Round(Generic[T, R]):
    """One shared operation of a :class:`Coalescing`: the items it covers, then its outcome."""

    items: list[T] = field(default_factory=list)
    results: list[R] = field(default_factory=list)
    done: bool = False
    error: BaseException | None = field(default=None, repr=False)


class Coalescing(Generic[T, R]):
    """One operation done once for every caller that asked for it before it started.

    A caller joins the round that has not started yet. If no round is running, it runs that one
    at once — for everyone who joined it — otherwise it waits; callers arriving meanwhile join
    the next round, run by one of them when the current one ends. No thread of its own and no
    timer: a lone caller runs at once, and the busier the spool, the larger the rounds.

    Parameters
    ----------
    operation:
        Does the work for a round's items, in order, and returns one result per item.
    """

    def __init__(self, operation: Callable[[list[T]], list[R]]) -> None:
        self._operation = operation
        self._changed = threading.Condition()
        self._next: _Round[T, R] = _Round()
        self._running = False
        #: Rounds run and items in them (``items / rounds`` is the mean size of a round).
        self.rounds = 0
        self.items = 0

    def submit(self, item: T) -> R:
        """The operation's result for ``item``, from a round that started after this call.

        Raises
        ------
        BaseException
            What the round's operation raised (a copy of it for all but one of its callers):
            every caller of a failed round fails.
        """
        with self._changed:
            mine = self._next
            index = len(mine.items)
            mine.items.append(item)
            while not mine.done and self._running:
                self._changed.wait()
            lead = not mine.done
            if lead:
                self._running = True
                self._next = _Round()
        if lead:
            self._run(mine)
        if mine.error is not None:
            raise mine.error if index == 0 else copy.copy(mine.error)
        return mine.results[index]

    def idle(self) -> bool:
        """Whether no round is running and nobody waits."""
        with self._changed:
            return not self._running and not self._next.items

    def _run(self, current: _Round[T, R]) -> None:
        try:
            results = self._operation(current.items)
        except BaseException as exc:
            # Each caller raises its own copy: one exception object raised in several threads
            # would collect their tracebacks into one.
            current.error = exc
        else:
            current.results = results
        with self._changed:
            self.rounds += 1
            self.items += len(current.items)
            current.done = True
            self._running = False
            self._changed.notify_all()


class GroupCommit:
    """The directory fsyncs and index commits of instances committed at the same time, shared.

    Each instance's directory entry is made durable by an fsync of its directory that started
    after its rename: instances renamed into one directory while an fsync of it runs share the
    next one, and different directories are fsync'ed in parallel, never one behind another. Its
    row then goes into the next index transaction, with every row waiting for it.

    Parameters
    ----------
    spool:
        Whose directories and index.
    """

    def __init__(self, spool: Spool) -> None:
        self._lock = threading.Lock()
        self._directories: dict[Path, Coalescing[None, None]] = {}
        self.index: Coalescing[IndexRow, bool] = Coalescing(lambda rows: spool._index_rows(rows))
        #: Directory fsyncs done, and the instances they made durable.
        self.fsyncs = 0
        self.fsynced = 0

    def commit(self, row: IndexRow) -> bool:
        """Make ``row``'s directory entry durable, then index it.

        Parameters
        ----------
        row:
            The instance, its file already fdatasync'ed and renamed into place.

        Returns
        -------
        bool
            Whether the instance is new (see :meth:`Spool._index_rows`).

        Raises
        ------
        OSError, sqlite3.Error
            The directory fsync or the transaction shared with others failed; the row is not
            written.
        """
        directory = row[1].parent
        with self._lock:
            fsync = self._directories.get(directory)
            if fsync is None:
                fsync = self._directories[directory] = Coalescing(self._fsync(directory))
        try:
            fsync.submit(None)
        finally:
            with self._lock:
                # Dropped once idle, so that the map does not grow with every series ever
                # received; a caller still holding it only shares with fewer.
                if fsync.idle() and self._directories.get(directory) is fsync:
                    del self._directories[directory]
        return self.index.submit(row)

    def _fsync(self, directory: Path) -> Callable[[list[None]], list[None]]:
        def run(items: list[None]) -> list[None]:
            fsync_dir(directory)
            with self._lock:
                self.fsyncs += 1
                self.fsynced += len(items)
            return [None] * len(items)

        return run


@dataclass(frozen=True)
class Stored:
    """Outcome of :meth:`Spool.store`: where the instance lies and whether it was new."""

    path: Path
    new: bool


class Spool:
    """Received instances on disk plus their index rows; safe to share between SCP threads.

    Parameters
    ----------
    root:
        ``storage.directory``; created if missing.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.incoming = root / "incoming"
        self.outputs = root / "outputs"
        self.tmp = root / "tmp"
        for d in (self.root, self.incoming, self.outputs, self.tmp):
            d.mkdir(parents=True, exist_ok=True)
        self.db_path = root / "index.sqlite"
        self._conn = db.connect(self.db_path, synchronous="NORMAL", check_same_thread=False)
        self._lock = threading.Lock()
        self._dir_lock = threading.Lock()
        self._known_dirs: set[Path] = set()
        self.group_commit = GroupCommit(self)
        # A study is never purged while one of its instances is being stored, and a store waits
        # while its study is being purged.
        self._studies = threading.Condition()
        self._storing: Counter[str] = Counter()
        self._purging: set[str] = set()

    def close(self) -> None:
        """Close the index connection."""
        group, index = self.group_commit, self.group_commit.index
        if index.rounds:
            log.info("group commit: %d instances in %d index transactions; %d in %d directory "
                     "fsyncs", index.items, index.rounds, group.fsynced, group.fsyncs)
        with self._lock:
            self._conn.close()

    def ensure_dir(self, path: Path) -> None:
        """``mkdir -p`` that fsyncs the parent of each directory it creates.

        Without the parent fsync a new study directory, and with it every file inside, could
        vanish in a power cut although each file was fsync'ed.
        """
        if path in self._known_dirs:
            return
        with self._dir_lock:
            missing: list[Path] = []
            p = path
            while not p.is_dir():
                missing.append(p)
                p = p.parent
            for d in reversed(missing):
                d.mkdir(exist_ok=True)
                fsync_dir(d.parent)
            self._known_dirs.add(path)

    def instance_path(self, keys: InstanceKeys) -> Path:
        """Where an instance is filed: ``incoming/<study>/<series>/<sop>.dcm``."""
        return (self.incoming / keys.study_instance_uid / keys.series_instance_uid
                / f"{keys.sop_instance_uid}.dcm")

    def store(self, chunks: Sequence[bytes | memoryview], keys: InstanceKeys, *,
              calling_aet: str, now: float | None = None) -> Stored:
        """Write an instance durably, then index it and note its arrival for study assembly.

        On return the instance is safe to acknowledge; on an exception nothing of it is left
        (see :meth:`PartialInstance.commit`).

        Parameters
        ----------
        chunks:
            The encoded DICOM file (preamble, meta, data set).
        keys:
            Its filing keys, from :func:`parse_keys`.
        calling_aet:
            The sender, kept for ``dicom-ai status`` and audits.
        now:
            Arrival time (epoch seconds); the current time by default.
        """
        part = self.begin(keys, calling_aet=calling_aet)
        try:
            part.write(chunks)
        except BaseException:
            part.discard()
            raise
        return part.commit(now)

    def begin(self, keys: InstanceKeys, *, calling_aet: str) -> PartialInstance:
        """Start writing an instance whose bytes arrive in parts (see :class:`PartialInstance`).

        Parameters
        ----------
        keys:
            Its filing keys.
        calling_aet:
            The sender.
        """
        return PartialInstance(self, keys, calling_aet)

    def _storing_starts(self, study: str) -> None:
        with self._studies:
            self._studies.wait_for(lambda: study not in self._purging)
            self._storing[study] += 1

    def _storing_ends(self, study: str) -> None:
        with self._studies:
            self._storing[study] -= 1
            if not self._storing[study]:
                del self._storing[study]

    def purge_study(self, study_instance_uid: str, *, cutoff: float) -> int | None:
        """Remove a study finished before ``cutoff``: its files, then its index rows.

        Files go first: a crash in between leaves rows without files, which the next sweep
        removes, never files without rows, which the start-up scan would index as new arrivals.

        Parameters
        ----------
        study_instance_uid:
            The study.
        cutoff:
            See :func:`dicom_ai.service.studies.finished_before`.

        Returns
        -------
        int or None
            The number of instances removed; ``None`` when the study is not (or no longer)
            finished before ``cutoff``, or an instance of it is being stored right now.
        """
        with self._studies:
            if self._storing[study_instance_uid]:
                return None
            self._purging.add(study_instance_uid)
        try:
            with self._lock:
                if not studies.finished_before(self._conn, cutoff, study_instance_uid):
                    return None
            removed = (self.incoming / study_instance_uid, self.outputs / study_instance_uid)
            for directory in removed:
                shutil.rmtree(directory, ignore_errors=True)
            with self._dir_lock:
                self._known_dirs = {d for d in self._known_dirs
                                    if not any(d.is_relative_to(r) for r in removed)}
            with self._lock, db.transaction(self._conn) as conn:
                count = int(conn.execute("DELETE FROM instances WHERE study_instance_uid = ?",
                                         (study_instance_uid,)).rowcount)
                for table in ("outbound", "jobs", "studies"):
                    conn.execute(f"DELETE FROM {table} WHERE study_instance_uid = ?",
                                 (study_instance_uid,))
            return count
        finally:
            with self._studies:
                self._purging.discard(study_instance_uid)
                self._studies.notify_all()

    def _index(self, keys: InstanceKeys, path: Path, size: int, calling_aet: str,
               now: float) -> bool:
        return self._index_rows([(keys, path, size, calling_aet, now)])[0]

    def _index_rows(self, rows: Sequence[IndexRow]) -> list[bool]:
        """Index instances in one transaction; for each, whether it is new."""
        news: list[bool] = []
        with self._lock, db.transaction(self._conn) as conn:
            for keys, path, size, calling_aet, now in rows:
                row = (keys.study_instance_uid, keys.series_instance_uid, keys.sop_class_uid,
                       str(path.relative_to(self.root)), size, calling_aet, now,
                       keys.sop_instance_uid)
                # One statement for a new instance, the common case; a second for one sent
                # again.
                new = conn.execute(
                    "INSERT OR IGNORE INTO instances (study_instance_uid, series_instance_uid, "
                    "sop_class_uid, path, size, calling_aet, received_at, sop_instance_uid) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?)", row).rowcount == 1
                if not new:
                    conn.execute(
                        "UPDATE instances SET study_instance_uid = ?, series_instance_uid = ?, "
                        "sop_class_uid = ?, path = ?, size = ?, calling_aet = ?, "
                        "received_at = ? WHERE sop_instance_uid = ?", row)
                studies.record_arrival(conn, keys.study_instance_uid, now, new_instance=new)
                # An instance sent again keeps what its first arrival recorded.
                if new and keys.facts is not None:
                    studies.record_facts(conn, keys.sop_instance_uid, keys.study_instance_uid,
                                         keys.series_instance_uid, keys.facts)
                news.append(new)
        return news

    def reindex(self) -> int:
        """Index whole instances found on disk without a row, and drop partial files.

        A crash between the rename and the insert leaves such a file; it was never acknowledged,
        but it is complete, so it is indexed (its study then waits a fresh quiet period).

        Returns
        -------
        int
            The number of instances indexed.
        """
        for part in self.tmp.glob("*.part"):
            part.unlink(missing_ok=True)
        with self._lock:
            known = {r[0] for r in self._conn.execute("SELECT path FROM instances")}
            uids = {r[0] for r in self._conn.execute("SELECT sop_instance_uid FROM instances")}
        added = 0
        for path in sorted(self.incoming.glob("*/*/*.dcm")):
            rel = str(path.relative_to(self.root))
            if rel in known:
                continue
            try:
                keys = parse_keys(path.read_bytes())
            except (UnreadableFileError, MissingAttributeError) as exc:
                log.warning("start-up scan: %s is not indexable: %s", rel, exc.reason)
                continue
            if keys.sop_instance_uid in uids or path != self.instance_path(keys):
                # A stale copy of an instance that was re-sent under other study/series UIDs.
                log.warning("start-up scan: %s is superseded by a later copy; left unindexed", rel)
                continue
            self._index(keys, path, path.stat().st_size, "", time.time())
            # The sender and transfer syntax are unknown here; the trail says "start-up scan".
            audit.received(self.root, keys, calling_aet="", transfer_syntax=None)
            uids.add(keys.sop_instance_uid)
            added += 1
        return added


class PartialInstance:
    """An instance being written: a temporary file in ``tmp/`` until :meth:`commit`.

    While it is open its study is not purged. Exactly one of :meth:`commit` and
    :meth:`discard` ends it (:meth:`discard` after either is harmless).

    Parameters
    ----------
    spool:
        Where it goes.
    keys:
        Its filing keys.
    calling_aet:
        The sender.
    """

    def __init__(self, spool: Spool, keys: InstanceKeys, calling_aet: str) -> None:
        self.spool = spool
        self.keys = keys
        self.calling_aet = calling_aet
        self.size = 0
        spool._storing_starts(keys.study_instance_uid)
        self._storing = True
        try:
            tmp, self._fd = _open_part(spool.tmp)
        except BaseException:
            self._end()
            raise
        self._tmp: str | None = tmp

    def write(self, chunks: Sequence[bytes | memoryview]) -> None:
        """Append ``chunks`` (the file's bytes in order: preamble and meta first)."""
        self.size += write_all(self._fd, chunks)

    def commit(self, now: float | None = None) -> Stored:
        """Make the file durable, file it under ``incoming/`` and index it.

        On return the instance is safe to acknowledge. Its directory fsync and index row are
        shared with the instances committed at the same time (:class:`GroupCommit`). If the
        directory fsync or the index row fails (disk full, a broken database), the file is
        removed again unless it replaced an instance already
        indexed under the same path, and the error is raised: the sender is told the store failed,
        so nothing may remain that the start-up scan would index. A SOP Instance UID received
        again replaces the file but does not re-open a completed study: DICOM gives changed
        content a new UID.

        Parameters
        ----------
        now:
            Arrival time (epoch seconds); the current time by default.
        """
        keys, tmp = self.keys, self._tmp
        if tmp is None:
            raise RuntimeError("instance already committed or discarded")
        path = self.spool.instance_path(keys)
        try:
            try:
                # The data and the file size; the name is made durable by the directory fsync.
                os.fdatasync(self._fd)
            finally:
                os.close(self._fd)
                self._fd = -1
            self.spool.ensure_dir(path.parent)
            replaced = path.exists()
            os.replace(tmp, path)
            self._tmp = None
        except BaseException:
            self.discard()
            raise
        try:
            new = self.spool.group_commit.commit(
                (keys, path, self.size, self.calling_aet, time.time() if now is None else now))
        except BaseException:
            if not replaced:
                path.unlink(missing_ok=True)
                with contextlib.suppress(OSError):
                    fsync_dir(path.parent)
            raise
        finally:
            self._end()
        return Stored(path, new)

    def discard(self) -> None:
        """Remove the temporary file; nothing of the instance remains."""
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = -1
        if self._tmp is not None:
            Path(self._tmp).unlink(missing_ok=True)
            self._tmp = None
        self._end()

    def _end(self) -> None:
        if self._storing:
            self._storing = False
            self.spool._storing_ends(self.keys.study_instance_uid)


def study_paths(conn: sqlite3.Connection, root: Path, study_instance_uid: str) -> list[Path]:
    """The files of every indexed instance of a study, in a stable order.

    Parameters
    ----------
    conn:
        A connection to the index.
    root:
        ``storage.directory`` (index paths are relative to it).
    study_instance_uid:
        The study.
    """
    rows = conn.execute("SELECT path FROM instances WHERE study_instance_uid = ? ORDER BY path",
                        (study_instance_uid,)).fetchall()
    return [root / r[0] for r in rows]
