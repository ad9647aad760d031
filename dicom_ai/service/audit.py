"""The audit trail: one append-only JSON-lines file per study, ``audit/<StudyInstanceUID>.jsonl``.

Every step a study goes through is one line — received (per instance), complete, job started,
analysed (by which model versions, with which result objects), failed, sent, acknowledged, late,
dead, purged — so that "what happened to study X, and with which model?" has an answer long after
the study's files left the spool (:mod:`~dicom_ai.service.retention` keeps audit files for
``storage.audit_retention_days``). ``dicom-ai status STUDY_UID`` prints it; ``--json`` exports it.

Lines are written by the listener (main process), the worker and the exporter (child processes)
at once. Each line is one ``write(2)`` on a descriptor opened with ``O_APPEND``: the kernel moves
to the end and writes the whole buffer under the file's lock, so lines of different processes
never interleave within a line on a local file system (not over NFS, where ``O_APPEND`` is
emulated; the spool must be local anyway for its fsync guarantees). Lines are not fsync'ed: a
crashed process loses none (the kernel holds what was written), a power cut may lose the last
seconds of lines, and the index stays the source of truth for what is still to be done. An fsync
per received instance would double the syncs on the C-STORE path for a record nobody waits for.

Writing is failure-safe: :func:`record` never raises. A full disk, a read-only directory or a
value that cannot be serialized is logged once at ERROR (type and place, no values) and the
store, job or delivery goes on — an audit trail must not take the service down with it.

No patient identity goes in: the fields are UIDs, AE titles, destination and model names,
counts, states and identity-free reasons, and every field named ``*_uid`` must hold a valid UID
(a free-text value in a UID field, which could be a name, is refused), and a field whose name
speaks of a patient, a birth date, an accession number or a physician is refused outright. A
``reason`` (which may repeat a peer's Error Comment) has its quoted and bracketed values taken out
(:func:`dicom_ai.logs.redact_values`). A line costs about 65 µs to write (measured on the shared
2-core test machine), next to the milliseconds of the fsync'ed store it records.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import sqlite3
import time
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from dicom_ai.dicom.uid import is_valid_uid, require_uid
from dicom_ai.logs import log_failure, redact_values

log = logging.getLogger(__name__)

#: Sub-directory of ``storage.directory`` holding the audit files.
AUDIT_DIR = "audit"
SUFFIX = ".jsonl"

#: Every event the trail knows, in the order a study usually meets them.
EVENTS = (
    "received",      # one instance stored: SOP/series/class UIDs, calling AE, transfer syntax
    "complete",      # the study is complete: rule, instance count, generation
    "job_queued",    # a job for that generation is queued
    "job_started",   # the worker took the job: attempt, instances
    "analysed",      # models (name, version, status, findings), result SOP UIDs and classes
    "superseded",    # the study re-opened while the job ran; a newer job replaces it
    "failed",        # the job failed: reason, whether it is retried
    "sent",          # a result is being sent to a destination
    "acknowledged",  # the destination confirmed the result (status)
    "send_failed",   # a try failed: reason; retried with backoff
    "late",          # still pending after export.late_after_s
    "dead",          # given up after export.retry_horizon_s (or the destination is gone)
    "requeued",      # a dead letter queued again by `dicom-ai retry`
    "purged",        # retention removed the study's files (this file stays)
)
_EVENT_SET = frozenset(EVENTS)
#: Keys every line has; an event's fields cannot take them.
RESERVED = ("time", "event", "study_instance_uid", "pid")
#: A line longer than this is refused: it would be a bug (a findings summary is a few kB).
MAX_LINE_BYTES = 1 << 20

_FIELD = re.compile(r"[a-z][a-z0-9_]*")
#: Field names that could only carry patient identity; refused wherever they appear.
_IDENTITY_WORDS = ("patient", "birth", "accession", "physician", "operator")
_FLAGS = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_CLOEXEC", 0) \
    | getattr(os, "O_NOFOLLOW", 0)


class UnknownStudyError(LookupError):
    """No audit trail exists for the study (never received here, or removed by retention)."""


class _Keys(Protocol):
    """What :func:`received` reads from :class:`~dicom_ai.service.spool.InstanceKeys`."""

    @property
    def study_instance_uid(self) -> str: ...
    @property
    def series_instance_uid(self) -> str: ...
    @property
    def sop_instance_uid(self) -> str: ...
    @property
    def sop_class_uid(self) -> str: ...


def audit_dir(root: Path) -> Path:
    """The audit directory under ``storage.directory``."""
    return root / AUDIT_DIR


def audit_path(root: Path, study_instance_uid: str) -> Path:
    """The audit file of a study.

    Raises
    ------
    InvalidUIDError
        When ``study_instance_uid`` is not a UID: nothing else may name a file.
    """
    require_uid(study_instance_uid, "Study Instance UID")
    return audit_dir(root) / f"{study_instance_uid}{SUFFIX}"


def utc_text(epoch: float) -> str:
    """``epoch`` as UTC ISO 8601 with microseconds and a ``Z``."""
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _field_name_ok(key: object) -> bool:
    return (isinstance(key, str) and _FIELD.fullmatch(key) is not None
            and not any(word in key for word in _IDENTITY_WORDS))


def _check(value: Any, name: str) -> None:
    """Refuse a field that is not plain JSON, or a ``*_uid(s)`` field that is not a UID."""
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not _field_name_ok(key):
                raise ValueError(f"audit field {name}: keys are lower_case, identity-free names")
            _check(item, key)
    elif isinstance(value, list | tuple):
        for item in value:
            _check(item, name)
    elif name.endswith(("_uid", "_uids")):
        if value is not None and not (isinstance(value, str) and is_valid_uid(value)):
            raise ValueError(f"audit field {name} is not a valid UID")
    elif value is not None and not isinstance(value, str | int | float | bool):
        raise TypeError(f"audit field {name} is a {type(value).__name__}, not JSON")


def format_line(study_instance_uid: str, event: str, fields: Mapping[str, Any], *,
                now: float) -> bytes:
    """One audit line: ``time``, ``event``, ``study_instance_uid``, the fields, ``pid``.

    Raises
    ------
    ValueError
        For an unknown event, a reserved, malformed or identity-naming field name (``patient…``,
        ``…birth…``), an invalid UID or a line over :data:`MAX_LINE_BYTES`.
    TypeError
        For a value JSON cannot hold.
    """
    if event not in _EVENT_SET:
        raise ValueError("unknown audit event")
    require_uid(study_instance_uid, "Study Instance UID")
    for key in fields:
        if key in RESERVED or not _field_name_ok(key):
            raise ValueError(f"audit field name {key!r} is reserved or malformed")
    _check(dict(fields), "fields")
    # A reason may quote what a peer answered (a PACS's Error Comment): quoted and bracketed
    # values are taken out, as for third-party log records.
    fields = {k: redact_values(v) if k == "reason" and isinstance(v, str) else v
              for k, v in fields.items()}
    line = {"time": utc_text(now), "event": event, "study_instance_uid": study_instance_uid,
            **fields, "pid": os.getpid()}
    # ASCII-only JSON has no raw newline or control character: one line is one record.
    data = (json.dumps(line, ensure_ascii=True, allow_nan=False, separators=(",", ":"))
            + "\n").encode("ascii")
    if len(data) > MAX_LINE_BYTES:
        raise ValueError("audit line over MAX_LINE_BYTES")
    return data


def _append(path: Path, data: bytes) -> None:
    try:
        fd = os.open(path, _FLAGS, 0o640)
    except FileNotFoundError:
        path.parent.mkdir(mode=0o750, parents=True, exist_ok=True)
        fd = os.open(path, _FLAGS, 0o640)
    try:
        written = os.write(fd, data)
        if written != len(data):
            # Disk full mid-line: end the torn line so that the next writer's line stays whole
            # (readers skip the torn one).
            with contextlib.suppress(OSError):
                os.write(fd, b"\n")
            raise OSError(errno.ENOSPC, f"audit line cut short ({written} of {len(data)} bytes)")
    finally:
        os.close(fd)


def record(root: Path, study_instance_uid: str, event: str, *, now: float | None = None,
           **fields: Any) -> bool:
    """Append one event to the study's audit file; never raises.

    Parameters
    ----------
    root:
        ``storage.directory``.
    study_instance_uid:
        The study; must be a valid UID.
    event:
        One of :data:`EVENTS`.
    now:
        When it happened (epoch seconds); the current time by default.
    **fields:
        The event's details: names in ``lower_case``, values str/int/float/bool/None or lists
        and mappings of them; names ending ``_uid`` hold UIDs. No patient identity.

    Returns
    -------
    bool
        Whether the line was written. A failure is logged at ERROR without values.
    """
    try:
        data = format_line(study_instance_uid, event, fields,
                           now=time.time() if now is None else now)
        _append(audit_path(root, study_instance_uid), data)
    except Exception as exc:
        # Whatever went wrong (disk, permissions, a bug in a caller's fields), the store, job or
        # delivery that is being audited must go on.
        log_failure(log, f"audit event {event if event in _EVENT_SET else '(unknown)'} "
                    "not written", exc)
        return False
    return True


def received(root: Path, keys: _Keys, *, calling_aet: str, transfer_syntax: str | None,
             new: bool = True) -> bool:
    """Record one stored instance (never raises).

    Parameters
    ----------
    root:
        ``storage.directory``.
    keys:
        The instance's filing keys (:class:`~dicom_ai.service.spool.InstanceKeys`).
    calling_aet:
        The sender's AE title; empty for an instance the start-up scan indexed.
    transfer_syntax:
        The transfer syntax UID it was sent in; None when unknown (start-up scan).
    new:
        False when the SOP Instance UID was already stored (sent again).
    """
    try:
        return record(root, keys.study_instance_uid, "received",
                      sop_instance_uid=keys.sop_instance_uid,
                      series_instance_uid=keys.series_instance_uid,
                      sop_class_uid=keys.sop_class_uid, calling_aet=calling_aet,
                      transfer_syntax_uid=transfer_syntax, new=new)
    except Exception as exc:
        log_failure(log, "audit event received not written", exc)
        return False


def study_complete(root: Path, conn: sqlite3.Connection, study_instance_uid: str,
                   generation: int, *, rule: str, **fields: Any) -> bool:
    """Record that a study is complete and its job queued (never raises).

    Reads the instance count and the job's id from the index (``conn``), after the transaction
    that completed the study, so the trail says what the index holds.

    Parameters
    ----------
    root:
        ``storage.directory``.
    conn:
        A connection to the index.
    study_instance_uid, generation:
        The study and the generation that is complete.
    rule:
        Which completion rule fired (``"quiet_period"``, …).
    **fields:
        The rule's parameters (``quiet_period_s=30.0``).
    """
    try:
        row = conn.execute("SELECT instance_count FROM studies WHERE study_instance_uid = ?",
                           (study_instance_uid,)).fetchone()
        job = conn.execute("SELECT id FROM jobs WHERE study_instance_uid = ? AND generation = ? "
                           "ORDER BY id DESC LIMIT 1",
                           (study_instance_uid, generation)).fetchone()
        done = record(root, study_instance_uid, "complete", generation=generation,
                      instance_count=None if row is None else int(row[0]), rule=rule, **fields)
        return record(root, study_instance_uid, "job_queued", generation=generation,
                      job_id=None if job is None else int(job[0])) and done
    except Exception as exc:
        log_failure(log, "audit event complete not written", exc)
        return False


def findings_summary(findings: Mapping[str, Any] | None) -> list[dict[str, Any]]:
    """Per model result of a ``findings.json`` document: model name and version, series,
    status, number of findings, labels called positive, and the reason of a skip or failure."""
    summary: list[dict[str, Any]] = []
    for result in (findings or {}).get("results", []):
        model = result.get("model", {})
        items = result.get("findings", [])
        entry: dict[str, Any] = {
            "name": str(model.get("name", "")), "version": str(model.get("version", "")),
            "series_instance_uid": result.get("series_instance_uid"),
            "status": str(result.get("status", "")), "findings": len(items),
            "positive": sorted({str(f["label"]) for f in items if f.get("positive")}),
        }
        if result.get("reason"):
            entry["reason"] = str(result["reason"])
        summary.append(entry)
    return summary


def analysed(root: Path, study_instance_uid: str, *, job_id: int, generation: int,
             datasets: Sequence[Any], findings: Mapping[str, Any] | None) -> bool:
    """Record a finished job: which models ran and what they wrote (never raises).

    Parameters
    ----------
    root:
        ``storage.directory``.
    study_instance_uid:
        The study.
    job_id, generation:
        The job and the study generation it processed.
    datasets:
        The result objects written (SR, SC, SEG…).
    findings:
        The ``findings.json`` document, when the job produced one.
    """
    try:
        results = [{"sop_instance_uid": str(ds.SOPInstanceUID),
                    "sop_class_uid": str(ds.SOPClassUID)} for ds in datasets]
        return record(root, study_instance_uid, "analysed", job_id=job_id,
                      generation=generation, models=findings_summary(findings),
                      results=results)
    except Exception as exc:
        log_failure(log, "audit event analysed not written", exc)
        return False


def read_events(root: Path, study_instance_uid: str) -> list[dict[str, Any]]:
    """The study's events in the order they were written.

    A line that is not a whole JSON object (cut short by a full disk, or being written right
    now) is skipped.

    Raises
    ------
    InvalidUIDError
        ``study_instance_uid`` is not a UID.
    UnknownStudyError
        The study has no audit file.
    """
    path = audit_path(root, study_instance_uid)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise UnknownStudyError(study_instance_uid) from None
    events: list[dict[str, Any]] = []
    skipped = 0
    lines = raw.split(b"\n")
    # The part after the last newline is a line still being written (or torn): not a record.
    skipped += bool(lines[-1])
    for line in lines[:-1]:
        try:
            event = json.loads(line)
        except ValueError:
            skipped += bool(line)
            continue
        if isinstance(event, dict) and "event" in event:
            events.append(event)
        else:
            skipped += 1
    if skipped:
        log.warning("audit trail of %s: %d unreadable line(s) skipped", study_instance_uid,
                    skipped)
    return events


def studies_with_trail(root: Path) -> Iterable[Path]:
    """The audit files under ``root`` (their names are validated UIDs)."""
    directory = audit_dir(root)
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.glob(f"*{SUFFIX}") if is_valid_uid(p.stem))
