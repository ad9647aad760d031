"""The status page's content: recent studies with each model's findings, the queue, the
destinations and the dead letters, from the index and ``outputs/<study>/findings.json``.

What is shown of a study is its Study Instance UID, the modality of its series, the times it was
received and processed, and what our models said. Nothing else of a DICOM header is read but
the Modality element (:func:`modality`); ``findings.json`` is read key by key for what the page
shows (a key it does not know is never rendered), so patient identity cannot reach the page
even where a file holds it.
"""

from __future__ import annotations

import functools
import json
import math
import re
import sqlite3
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID

from dicom_ai import DISCLAIMER, __version__
from dicom_ai.dicom.uid import is_valid_uid
from dicom_ai.results.writer import FINDINGS_NAME
from dicom_ai.service import queries
from dicom_ai.service.page.templates import REFRESH_S, badge, document, table, text, uid

#: Studies shown (most recent first), and rows of each other list.
LIMIT = 20
#: Series per study whose modality is read.
MAX_SERIES = 16
#: A ``findings.json`` larger than this is not read (ours are a few kB).
MAX_FINDINGS_BYTES = 4 * 1024 * 1024
#: Code String (PS3.5 6.2): upper case, digits, space, underscore; at most 16 characters.
_CS = re.compile(r"[A-Z0-9_ ]{1,16}")
#: Our SC file names as ``findings.json`` lists them under ``outputs``.
_SC_NAME = re.compile(r"sc-([0-9.]{1,64})\.dcm")


def when(epoch: float | None) -> str:
    """An epoch time as ``YYYY-MM-DD HH:MM:SS`` UTC (empty for ``None``)."""
    if epoch is None:
        return ""
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%d %H:%M:%S")


def ago(epoch: float | None, now: float) -> str:
    """How long before ``now`` (``12 s``, ``5 min``, ``3 h``, ``2 d``); empty for ``None``."""
    if epoch is None:
        return ""
    seconds = max(0.0, now - epoch)
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= 2 * size:
            return f"{int(seconds // size)} {unit}"
    return f"{int(seconds)} s"


def object_kind(sop_class_uid: str) -> str:
    """A result's SOP class by name (``Comprehensive SR Storage``), or the UID if unknown."""
    name = UID(sop_class_uid).name if is_valid_uid(sop_class_uid) else ""
    return name.removesuffix(" Image Storage").removesuffix(" Storage") or sop_class_uid


def _time_cell(epoch: float | None, now: float) -> str:
    if epoch is None:
        return ""
    return f'{text(when(epoch))} <span class="meta">({text(ago(epoch, now))} ago)</span>'


@functools.lru_cache(maxsize=1024)
def _modality_of_file(path: str) -> str:
    try:
        ds = pydicom.dcmread(path, specific_tags=["Modality"], stop_before_pixels=True)
    except (InvalidDicomError, OSError, ValueError, EOFError):
        return ""
    value = str(ds.get("Modality", "") or "").strip()
    return value if _CS.fullmatch(value) else ""


def modality(conn: sqlite3.Connection, root: Path, study_instance_uid: str) -> str:
    """The modalities of a study's received series (``CR``, ``CT, PT``), from one file each.

    Only the Modality element is parsed; a value that is not a Code String (or a file that has
    gone) is left out.
    """
    found = {_modality_of_file(str(root / f.path))
             for f in queries.series_files(conn, study_instance_uid, MAX_SERIES)}
    return ", ".join(sorted(m for m in found if m))


def read_findings(outputs: Path, study_instance_uid: str) -> list[dict[str, Any]] | None:
    """The ``results`` of a study's ``findings.json``, or ``None`` when it has none (yet).

    Raises
    ------
    ValueError
        When the file exists but is not a ``findings.json`` of this study.
    """
    if not is_valid_uid(study_instance_uid):
        raise ValueError("not a UID")
    path = outputs / study_instance_uid / FINDINGS_NAME
    try:
        if path.stat().st_size > MAX_FINDINGS_BYTES:
            raise ValueError("findings.json is too large")
        document_ = json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError("findings.json is unreadable") from exc
    if not isinstance(document_, dict) or \
            document_.get("study_instance_uid") != study_instance_uid or \
            not isinstance(document_.get("results"), list):
        raise ValueError("findings.json is not this study's")
    return [r for r in document_["results"] if isinstance(r, dict)]


def _str(value: object) -> str | None:
    return value if isinstance(value, str) else None


def _dict(value: object) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _list(value: object) -> list[Any]:
    return value if isinstance(value, list) else []


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _finding_row(finding: Mapping[str, Any]) -> list[str]:
    probability = _number(finding.get("probability"))
    operating_point = _number(finding.get("operating_point"))
    value = _number(finding.get("value"))
    positive = finding.get("positive")
    unit = _str(finding.get("unit"))
    call = ("" if not isinstance(positive, bool)
            else badge("positive") if positive else text("negative"))
    return [text(_str(finding.get("label"))),
            "" if probability is None else text(f"{probability:.3f}"),
            "" if operating_point is None else text(f"{operating_point:.3f}"),
            call,
            "" if value is None else text(f"{value:g}" + (f" {unit}" if unit else ""))]


def _thumbnail(study_instance_uid: str, sop_instance_uid: str, token: str | None) -> str:
    src = f"/thumbnails/{study_instance_uid}/{sop_instance_uid}.png"
    if token:
        src += "?token=" + quote(token, safe="")
    return (f'<figure><a href="{text(src)}"><img src="{text(src)}" alt="Secondary Capture '
            f'{text(sop_instance_uid)}" loading="lazy"></a>'
            f"<figcaption>{text(sop_instance_uid)}</figcaption></figure>")


def _result(result: Mapping[str, Any], study_instance_uid: str, token: str | None) -> str:
    model = _dict(result.get("model"))
    name, version = _str(model.get("name")) or "?", _str(model.get("version")) or ""
    status = _str(result.get("status")) or "?"
    series = _str(result.get("series_instance_uid"))
    reason = _str(result.get("reason"))
    findings = [f for f in _list(result.get("findings")) if isinstance(f, dict)]
    scs = [m.group(1) for name_ in _list(result.get("outputs")) if isinstance(name_, str)
           and (m := _SC_NAME.fullmatch(name_)) and is_valid_uid(m.group(1))]
    parts = [f'<div class="result"><h3>{text(name)} <span class="meta">{text(version)}</span> '
             f"{badge(status)}</h3>"]
    if series and is_valid_uid(series):
        parts.append(f'<div class="meta">series {uid(series)}</div>')
    if reason:
        parts.append(f"<p>Reason: {text(reason)}</p>")
    if findings:
        parts.append(table(["finding", "probability", "operating point", "call", "value"],
                           (_finding_row(f) for f in findings), numeric=frozenset({1, 2, 4})))
    elif status == "ok":
        parts.append('<p class="empty">no findings</p>')
    if scs:
        parts.append('<div class="thumbs">' + "".join(
            _thumbnail(study_instance_uid, s, token) for s in scs) + "</div>")
    parts.append("</div>")
    return "".join(parts)


def _study(conn: sqlite3.Connection, root: Path, study: queries.StudyRow, now: float,
           token: str | None) -> str:
    key = study.study_instance_uid
    facts = table(
        ["modality", "instances", "received", "complete", "processed", "job"],
        [[text(modality(conn, root, key)), text(study.instance_count),
          _time_cell(study.last_received, now), _time_cell(study.completed_at, now),
          _time_cell(study.job_finished_at, now),
          badge(study.job_state) if study.job_state else ""]],
        numeric=frozenset({1}))
    parts = [f'<section class="study"><h3>Study {uid(key)} {badge(study.state)}</h3>{facts}']
    try:
        results = read_findings(root / "outputs", key)
    except ValueError as exc:
        parts.append(f'<p class="error">{text(exc)}</p>')
        results = None
    if results is None:
        parts.append('<p class="empty">no results yet</p>')
    else:
        parts.extend(_result(r, key, token) for r in results)
        if not results:
            parts.append('<p class="empty">no model applies to this study</p>')
    parts.append("</section>")
    return "".join(parts)


def _health(row: queries.DestinationRow) -> str:
    if row.dead:
        return "failing"
    if row.retrying:
        return "retrying"
    return "ok"


def render_page(conn: sqlite3.Connection, root: Path, *, now: float | None = None,
                limit: int = LIMIT, token: str | None = None) -> bytes:
    """The status page as UTF-8 HTML.

    Parameters
    ----------
    conn:
        A (read-only) connection to the index.
    root:
        ``storage.directory`` (index paths are relative to it; results are in ``outputs/``).
    now:
        Reference time (epoch seconds) for ages; the current time by default.
    limit:
        Most recent studies shown, and rows of every other list.
    token:
        The access token the request carried in its query, to carry on in thumbnail links
        (an ``<img>`` request sends no ``Authorization`` header); ``None`` for none.

    Returns
    -------
    bytes
        A whole HTML document without external resources.
    """
    now = time.time() if now is None else now
    total = queries.study_count(conn)
    studies = queries.recent_studies(conn, limit)
    header = (f"<h1>dicom-ai status</h1>"
              f'<div class="disclaimer">{text(DISCLAIMER)}</div> '
              f'<span class="meta">dicom-ai {text(__version__)} · generated {text(when(now))} '
              f"UTC · reloads every {REFRESH_S} s</span>")
    sections = [f"<h2>Recent studies ({text(len(studies))} of {text(total)})</h2>"]
    sections.extend(_study(conn, root, s, now, token) for s in studies)
    if not studies:
        sections.append('<p class="empty">no study received yet</p>')

    lanes = queries.job_counts_by_lane(conn) or {"": queries.job_counts(conn)}
    sections.append("<h2>Queue</h2>")
    sections.append(table(["lane", *queries.JOB_STATES],
                          ([text(lane or "all"), *(text(n) for n in counts.values())]
                           for lane, counts in lanes.items()),
                          numeric=frozenset(range(1, len(queries.JOB_STATES) + 1))))
    sections.append(table(
        ["job", "study", "generation", "state", "attempts", "outputs", "last error"],
        ([text(j.id), uid(j.study_instance_uid), text(j.generation), badge(j.state),
          text(j.attempts), text(j.outputs), text(j.last_error)]
         for j in queries.open_jobs(conn, limit)),
        numeric=frozenset({0, 2, 4, 5}), empty="no job queued, running or failed"))

    sections.append("<h2>Destinations</h2>")
    sections.append(table(
        ["destination", "health", "pending", "retrying", "late", "delivered", "dead",
         "waiting since", "last delivery"],
        ([text(d.destination), badge(_health(d)), text(d.pending), text(d.retrying),
          text(d.late), text(d.delivered), text(d.dead), _time_cell(d.oldest_pending, now),
          _time_cell(d.last_delivered, now)] for d in queries.destinations(conn)),
        numeric=frozenset({2, 3, 4, 5, 6}), empty="nothing queued for delivery yet"))
    retry = queries.retrying(conn, limit)
    if retry:
        sections.append("<h3>Retrying</h3>")
        sections.append(table(
            ["destination", "study", "object", "SOP instance", "attempts", "next try",
             "last error"],
            ([text(r.destination), uid(r.study_instance_uid), text(object_kind(r.sop_class_uid)),
              uid(r.sop_instance_uid), text(r.attempts),
              text(f"in {ago(now, r.next_attempt_at)}" if r.next_attempt_at > now else "due"),
              text(r.last_error)]
             for r in retry), numeric=frozenset({4})))

    sections.append("<h2>Dead letters</h2>")
    sections.append(table(
        ["destination", "study", "object", "SOP instance", "attempts", "waiting since",
         "reason"],
        ([text(d.destination), uid(d.study_instance_uid), text(object_kind(d.sop_class_uid)),
          uid(d.sop_instance_uid), text(d.attempts), _time_cell(d.pending_since, now),
          text(d.last_error)]
         for d in queries.dead_letters(conn, limit)),
        numeric=frozenset({4}), empty="none"))
    sections.append('<p class="meta">Dead letters are not retried automatically: '
                    "<code>dicom-ai retry</code> after fixing the destination.</p>")
    return document("dicom-ai status", header, sections)


__all__ = ["LIMIT", "ago", "modality", "object_kind", "read_findings", "render_page", "when"]
