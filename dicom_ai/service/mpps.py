"""Modality Performed Procedure Step SCP (PS3.4 Annex F.7): N-CREATE and N-SET.

A modality creates a Performed Procedure Step when an exam starts (N-CREATE, status IN PROGRESS,
naming the studies in its Scheduled Step Attribute Sequence) and sets it COMPLETED or
DISCONTINUED at the end (N-SET), listing what it produced in the Performed Series Sequence. That
is the one "end of exam" message DICOM has; study completion (:mod:`dicom_ai.service.studies`)
uses it:

- while a step that names a study is IN PROGRESS, its quiet periods do not apply;
- COMPLETED: the study is complete as soon as every instance the Performed Series Sequence
  lists (Referenced Image Sequence, Referenced Non-Image Composite SOP Instance Sequence) has
  arrived;
- DISCONTINUED: what has arrived is processed.

The state is kept in the index (tables ``mpps``, ``mpps_studies``, ``mpps_instances``), committed
before the response, so a restart loses no step. Only what completion needs is kept — status,
Study, Series and SOP Instance UIDs, the calling AE title — never the patient or procedure
attributes the step also carries, and no log line quotes a received value other than a
validated UID.

Answers (PS3.4 F.7.2.1.2, F.7.2.2.2; PS3.7 Annex C):

========  =======================================================================================
0x0000    Success.
0x0106    Invalid Attribute Value: a malformed UID, an unknown status, N-CREATE not IN PROGRESS.
0x0110    Processing Failure: the data set cannot be parsed or the index failed; with Error ID
          0xA710 "Performed Procedure Step Object may no longer be updated" for an N-SET of a
          COMPLETED or DISCONTINUED step.
0x0111    Duplicate SOP Instance: N-CREATE of a step that exists.
0x0112    No Such SOP Instance: N-SET of an unknown step.
0x0117    Invalid Object Instance: the SOP Instance UID of the command is not a UID.
0x0120    Missing Attribute: no data set, no status (N-CREATE) or no Scheduled Step Attribute
          Sequence with a Study Instance UID (N-CREATE).
0x0122    SOP Class Not Supported: the command names another SOP class.
0x0213    Resource Limitation: a data set over :data:`MAXIMUM_DATASET_BYTES`.
========  =======================================================================================
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pydicom.uid import UID, generate_uid

from dicom_ai.dicom.uid import is_valid_uid
from dicom_ai.service import db

log = logging.getLogger(__name__)

#: Modality Performed Procedure Step SOP Class.
MPPS_SOP_CLASS = "1.2.840.10008.3.1.2.3.3"
N_SET_RQ = 0x0120
N_CREATE_RQ = 0x0140

SUCCESS = 0x0000
INVALID_ATTRIBUTE_VALUE = 0x0106
PROCESSING_FAILURE = 0x0110
DUPLICATE_SOP_INSTANCE = 0x0111
NO_SUCH_SOP_INSTANCE = 0x0112
INVALID_OBJECT_INSTANCE = 0x0117
MISSING_ATTRIBUTE = 0x0120
SOP_CLASS_NOT_SUPPORTED = 0x0122
RESOURCE_LIMITATION = 0x0213
#: Error ID (0000,0903) of PS3.4 F.7.2.2.2: the step is COMPLETED or DISCONTINUED.
MAY_NO_LONGER_BE_UPDATED = 0xA710

IN_PROGRESS, COMPLETED, DISCONTINUED = "IN PROGRESS", "COMPLETED", "DISCONTINUED"
STATUSES = (IN_PROGRESS, COMPLETED, DISCONTINUED)

#: An MPPS data set is a few kilobytes; one of thousands of performed instances stays well below.
MAXIMUM_DATASET_BYTES = 4 * 1024 * 1024


@dataclass(frozen=True)
class NormalizedRequest:
    """An N-CREATE or N-SET as the handler sees it when its command set has arrived."""

    calling_aet: str
    command_field: int
    #: Affected (N-CREATE) or Requested (N-SET) SOP Class UID.
    sop_class_uid: str
    #: Affected (N-CREATE, may be empty) or Requested (N-SET) SOP Instance UID.
    sop_instance_uid: str
    transfer_syntax: str


@dataclass(frozen=True)
class NormalizedResult:
    """The response: status, the SOP Instance UID it concerns, and for failures why."""

    status: int
    sop_instance_uid: str = ""
    comment: str = ""
    error_id: int = 0


class DataSetBuffer:
    """The data set of an N-CREATE/N-SET while it arrives: kept in memory up to a bound."""

    def __init__(self, limit: int = MAXIMUM_DATASET_BYTES) -> None:
        self._limit = limit
        self._fragments: list[bytes] = []
        self._size = 0
        self.overflowed = False

    def add(self, fragment: memoryview) -> None:
        """Take the next fragment (dropped once the bound is passed)."""
        self._size += len(fragment)
        if self._size > self._limit:
            self.overflowed = True
            self._fragments = []
        elif not self.overflowed:
            self._fragments.append(bytes(fragment))

    def data(self) -> bytes:
        """The data set received."""
        return b"".join(self._fragments)

    def discard(self) -> None:
        """Forget what was received."""
        self._fragments = []


#: Answers one N-CREATE/N-SET (``None``: the request carried no data set).
NormalizedFunction = Callable[[NormalizedRequest, DataSetBuffer | None], NormalizedResult]


class InvalidRequest(Exception):
    """A request refused with ``status``; ``comment`` names no received value."""

    def __init__(self, status: int, comment: str, error_id: int = 0) -> None:
        super().__init__(comment)
        self.status = status
        self.comment = comment
        self.error_id = error_id


@dataclass(frozen=True)
class StepAttributes:
    """What is kept of a step's data set, validated.

    ``None`` for an attribute the data set does not carry (an N-SET changes only what it sends).
    """

    status: str | None
    study_instance_uids: tuple[str, ...] | None
    #: (Series Instance UID, SOP Instance UID) of every instance the step lists.
    performed: tuple[tuple[str, str], ...] | None


def parse_step(data: bytes, transfer_syntax: str) -> StepAttributes:
    """Read and validate the attributes completion uses from an MPPS data set.

    Raises
    ------
    InvalidRequest
        The data set cannot be parsed (0x0110) or carries an invalid value (0x0106).
    """
    syntax = UID(transfer_syntax)
    try:
        ds = read_dataset(BytesIO(data), syntax.is_implicit_VR, syntax.is_little_endian)
        status = _text(ds, "PerformedProcedureStepStatus")
        studies = None
        if "ScheduledStepAttributesSequence" in ds:
            studies = tuple(dict.fromkeys(
                _uid(item, "StudyInstanceUID", "Scheduled Step Attribute Sequence")
                for item in ds.ScheduledStepAttributesSequence))
        performed = None
        if "PerformedSeriesSequence" in ds:
            performed = tuple(_performed(ds.PerformedSeriesSequence))
    except InvalidRequest:
        raise
    except Exception as exc:  # pydicom raises anything on malformed input
        raise InvalidRequest(PROCESSING_FAILURE,
                             f"data set cannot be parsed ({type(exc).__name__})") from exc
    if status is not None and status not in STATUSES:
        raise InvalidRequest(INVALID_ATTRIBUTE_VALUE,
                             "Performed Procedure Step Status is not a defined term")
    return StepAttributes(status, studies, performed)


def _text(ds: Dataset, keyword: str) -> str | None:
    if keyword not in ds:
        return None
    return str(ds[keyword].value or "").strip()


def _uid(item: Dataset, keyword: str, where: str) -> str:
    value = _text(item, keyword) or ""
    if not is_valid_uid(value):
        raise InvalidRequest(INVALID_ATTRIBUTE_VALUE, f"{keyword} in {where} is not a UID")
    return value


def _performed(series_items: list[Dataset]) -> list[tuple[str, str]]:
    listed: list[tuple[str, str]] = []
    for series in series_items:
        series_uid = _uid(series, "SeriesInstanceUID", "Performed Series Sequence")
        for keyword in ("ReferencedImageSequence",
                        "ReferencedNonImageCompositeSOPInstanceSequence"):
            for ref in series.get(keyword) or []:
                _uid(ref, "ReferencedSOPClassUID", keyword)
                listed.append((series_uid, _uid(ref, "ReferencedSOPInstanceUID", keyword)))
    return listed


class MppsHandler:
    """Serves N-CREATE and N-SET of MPPS objects; one instance shared by the listener's threads.

    Each request opens its own index connection: a step sends two or three requests per exam.

    Parameters
    ----------
    db_path:
        The index database.
    clock:
        Epoch seconds, replaceable in tests.
    """

    def __init__(self, db_path: Path, *, clock: Callable[[], float] = time.time) -> None:
        self._db_path = db_path
        self._clock = clock

    def __call__(self, request: NormalizedRequest,
                 data: DataSetBuffer | None) -> NormalizedResult:
        """Answer one request; never raises."""
        try:
            if request.sop_class_uid != MPPS_SOP_CLASS:
                raise InvalidRequest(SOP_CLASS_NOT_SUPPORTED,
                                     "only Modality Performed Procedure Step is served")
            if data is None:
                raise InvalidRequest(MISSING_ATTRIBUTE, "no data set")
            if data.overflowed:
                raise InvalidRequest(RESOURCE_LIMITATION, "data set too large")
            attributes = parse_step(data.data(), request.transfer_syntax)
            conn = db.connect(self._db_path)
            try:
                if request.command_field == N_CREATE_RQ:
                    return self._create(conn, request, attributes)
                return self._set(conn, request, attributes)
            finally:
                conn.close()
        except InvalidRequest as exc:
            log.warning("MPPS %s from %s refused (0x%04X): %s",
                        "N-CREATE" if request.command_field == N_CREATE_RQ else "N-SET",
                        request.calling_aet, exc.status, exc.comment)
            return NormalizedResult(exc.status, _echo(request.sop_instance_uid), exc.comment,
                                    exc.error_id)
        except sqlite3.Error as exc:
            log.error("MPPS request from %s not stored: %s", request.calling_aet,
                      type(exc).__name__)
            return NormalizedResult(PROCESSING_FAILURE, _echo(request.sop_instance_uid),
                                    "local index error")

    def _create(self, conn: sqlite3.Connection, request: NormalizedRequest,
                step: StepAttributes) -> NormalizedResult:
        uid = request.sop_instance_uid or str(generate_uid(prefix=None))
        if not is_valid_uid(uid):
            raise InvalidRequest(INVALID_OBJECT_INSTANCE, "Affected SOP Instance UID is not a UID")
        if step.status is None:
            raise InvalidRequest(MISSING_ATTRIBUTE, "no Performed Procedure Step Status")
        if step.status != IN_PROGRESS:
            raise InvalidRequest(INVALID_ATTRIBUTE_VALUE,
                                 "a new Performed Procedure Step must be IN PROGRESS")
        if not step.study_instance_uids:
            raise InvalidRequest(MISSING_ATTRIBUTE,
                                 "no Study Instance UID in Scheduled Step Attribute Sequence")
        now = self._clock()
        with db.transaction(conn):
            inserted = conn.execute(
                "INSERT OR IGNORE INTO mpps (sop_instance_uid, status, calling_aet, created_at, "
                "updated_at) VALUES (?, ?, ?, ?, ?)",
                (uid, step.status, request.calling_aet, now, now)).rowcount
            if not inserted:
                raise InvalidRequest(DUPLICATE_SOP_INSTANCE,
                                     "a Performed Procedure Step with this UID exists")
            conn.executemany("INSERT OR IGNORE INTO mpps_studies (mpps_uid, study_instance_uid) "
                             "VALUES (?, ?)", [(uid, s) for s in step.study_instance_uids])
            _replace_performed(conn, uid, step.performed)
        log.info("MPPS %s created by %s: IN PROGRESS, studies %s", uid, request.calling_aet,
                 ", ".join(step.study_instance_uids))
        return NormalizedResult(SUCCESS, uid)

    def _set(self, conn: sqlite3.Connection, request: NormalizedRequest,
             step: StepAttributes) -> NormalizedResult:
        uid = request.sop_instance_uid
        if not is_valid_uid(uid):
            raise InvalidRequest(INVALID_OBJECT_INSTANCE,
                                 "Requested SOP Instance UID is not a UID")
        now = self._clock()
        with db.transaction(conn):
            row = conn.execute("SELECT status FROM mpps WHERE sop_instance_uid = ?",
                               (uid,)).fetchone()
            if row is None:
                raise InvalidRequest(NO_SUCH_SOP_INSTANCE, "no such Performed Procedure Step")
            if str(row[0]) != IN_PROGRESS:
                raise InvalidRequest(PROCESSING_FAILURE, "Performed Procedure Step Object may "
                                     "no longer be updated", MAY_NO_LONGER_BE_UPDATED)
            status = step.status or IN_PROGRESS
            conn.execute("UPDATE mpps SET status = ?, updated_at = ? WHERE sop_instance_uid = ?",
                         (status, now, uid))
            _replace_performed(conn, uid, step.performed)
            listed = conn.execute("SELECT COUNT(*) FROM mpps_instances WHERE mpps_uid = ?",
                                  (uid,)).fetchone()[0]
        log.info("MPPS %s set by %s: %s, %d instances listed", uid, request.calling_aet, status,
                 listed)
        return NormalizedResult(SUCCESS, uid)


def _replace_performed(conn: sqlite3.Connection, uid: str,
                       performed: tuple[tuple[str, str], ...] | None) -> None:
    # N-SET replaces a sequence as a whole (PS3.4 F.7.2.2.1).
    if performed is None:
        return
    conn.execute("DELETE FROM mpps_instances WHERE mpps_uid = ?", (uid,))
    conn.executemany("INSERT OR IGNORE INTO mpps_instances (mpps_uid, series_instance_uid, "
                     "sop_instance_uid) VALUES (?, ?, ?)",
                     [(uid, series, sop) for series, sop in performed])


def _echo(uid: str) -> str:
    return uid if is_valid_uid(uid) else ""
