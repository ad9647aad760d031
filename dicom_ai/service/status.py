"""``dicom-ai status``: studies, jobs and the outbound queue, read from the index; with a Study
Instance UID, that study's audit trail (:mod:`~dicom_ai.service.audit`), readable or as JSON lines.

Only UIDs, AE titles, counts, states and reasons are shown — never patient name, ID or birth date
(neither the index nor the audit trail holds them).
"""

from __future__ import annotations

import json
import sqlite3
import sys
import time
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, TextIO

from pydicom.uid import UID

from dicom_ai.service import queries


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain-text table with left-aligned columns and a dashed rule under the headers."""
    cells = [[str(c) for c in headers]] + [["" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
             for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _age(then: float | None, now: float) -> str:
    if then is None:
        return ""
    seconds = max(0, int(now - then))
    if seconds < 120:
        return f"{seconds}s ago"
    if seconds < 7200:
        return f"{seconds // 60}m ago"
    return datetime.fromtimestamp(then).strftime("%Y-%m-%d %H:%M")


def render(conn: sqlite3.Connection, *, now: float | None = None, limit: int = 20) -> str:
    """The status report as text.

    Parameters
    ----------
    conn:
        Connection to the index.
    now:
        Reference time for ages (epoch seconds); the current time by default.
    limit:
        Most recent studies, open jobs and dead letters shown.
    """
    now = time.time() if now is None else now
    parts: list[str] = []

    studies = queries.recent_studies(conn, limit)
    total = queries.study_count(conn)
    parts.append(f"Studies ({total}, latest {len(studies)} shown)")
    parts.append(table(["study instance uid", "state", "gen", "instances", "last instance",
                        "job"], [(r.study_instance_uid, r.state, r.generation, r.instance_count,
                                  _age(r.last_received, now), r.job_state or "")
                                 for r in studies]))

    counts = queries.job_counts(conn)
    parts.append("\nJobs: " + ", ".join(f"{s} {n}" for s, n in counts.items()))
    open_jobs = queries.open_jobs(conn, limit)
    if open_jobs:
        parts.append(table(["job", "study instance uid", "gen", "state", "attempts", "outputs",
                            "last error"], open_jobs))

    queue = queries.destinations(conn)
    parts.append("\nOutbound queue")
    parts.append(table(["destination", "pending", "delivered", "dead"],
                       [(d.destination, d.pending, d.delivered, d.dead) for d in queue])
                 if queue else "(empty)")
    dead = queries.dead_letters(conn, limit)
    if dead:
        parts.append("\nDead letters (not retried automatically; `dicom-ai retry` after fixing "
                     "the destination)")
        parts.append(table(["destination", "sop instance uid", "attempts", "last error"],
                           [(d.destination, d.sop_instance_uid, d.attempts, d.last_error)
                            for d in dead]))
    pending = queries.retrying(conn, limit)
    if pending:
        parts.append("\nRetrying")
        parts.append(table(["destination", "sop instance uid", "attempts", "next try in",
                            "last error"],
                           [(r.destination, r.sop_instance_uid, r.attempts,
                             f"{max(0, int(r.next_attempt_at - now))}s", r.last_error)
                            for r in pending]))
    return "\n".join(parts) + "\n"


def _uid_name(uid: object) -> str:
    """A UID's registered name (SOP class, transfer syntax), or the UID itself."""
    return str(UID(str(uid)).name) if uid else ""


def _clock(event: Mapping[str, Any]) -> str:
    """``2026-12-02T06:35:01.123456Z`` as ``2026-12-02 06:35:01.123Z``."""
    text = str(event.get("time", ""))
    return f"{text[:10]} {text[11:23]}Z" if len(text) >= 23 else text


def _fields(event: Mapping[str, Any], skip: Sequence[str] = ()) -> str:
    hidden = {"time", "event", "study_instance_uid", "pid", *skip}
    return ", ".join(f"{k}={v}" for k, v in event.items() if k not in hidden)


def _same_run(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    keys = ("series_instance_uid", "calling_aet", "sop_class_uid", "transfer_syntax_uid")
    return a.get("event") == b.get("event") == "received" and all(a.get(k) == b.get(k)
                                                                   for k in keys)


def _describe(event: Mapping[str, Any], run: Sequence[Mapping[str, Any]]) -> list[str]:
    """What one event (or a run of received instances) says, as one or more lines."""
    kind = event.get("event")
    e = event
    if kind == "received":
        again = sum(1 for r in run if r.get("new") is False)
        what = (f"{len(run)} instances" if len(run) > 1 else str(e.get("sop_instance_uid")))
        sender = e.get("calling_aet") or "(start-up scan)"
        kinds = [_uid_name(e.get(k)) for k in ("sop_class_uid", "transfer_syntax_uid")]
        text = (f"{what} of series {e.get('series_instance_uid')} from {sender} "
                f"({', '.join(k for k in kinds if k)})")
        if len(run) > 1:
            text += f", last at {_clock(run[-1])[11:]}"
        if again:
            text += f"; {again} sent again"
        return [text]
    if kind == "complete":
        params = _fields(e, ("generation", "instance_count", "rule"))
        return [f"generation {e.get('generation')}, {e.get('instance_count')} instances "
                f"(rule {e.get('rule')}{': ' + params if params else ''})"]
    if kind in ("job_queued", "superseded"):
        left = e.get("reprocess_of")
        return [f"job {e.get('job_id')}, generation {e.get('generation')}"
                + (f" (dicom-ai reprocess; the job was {left})" if left else "")]
    if kind == "job_started":
        extra = _fields(e, ("job_id", "generation", "attempt", "instances"))
        return [f"job {e.get('job_id')}, generation {e.get('generation')}, attempt "
                f"{e.get('attempt')}, {e.get('instances')} instances"
                + (f", {extra}" if extra else "")]
    if kind == "analysed":
        lines = [f"job {e.get('job_id')}, generation {e.get('generation')}: "
                 f"{len(e.get('models') or [])} model result(s), "
                 f"{len(e.get('results') or [])} result object(s)"]
        for m in e.get("models") or []:
            positive = ", ".join(m.get("positive") or [])
            lines.append(f"  model {m.get('name')} {m.get('version')} on series "
                         f"{m.get('series_instance_uid')}: {m.get('status')}, "
                         f"{m.get('findings')} finding(s)"
                         + (f", positive: {positive}" if positive else "")
                         + (f" ({m['reason']})" if m.get("reason") else ""))
        for r in e.get("results") or []:
            lines.append(f"  result {r.get('sop_instance_uid')}  "
                         f"{_uid_name(r.get('sop_class_uid'))}")
        return lines
    if kind == "failed":
        return [f"job {e.get('job_id')}, attempt {e.get('attempt')}: {e.get('reason')} "
                f"({'no more attempts' if e.get('final') else 'queued again'})"]
    if kind == "sent":
        return [f"{e.get('sop_instance_uid')} to {e.get('destination')} (try {e.get('attempt')})"]
    if kind == "acknowledged":
        return [f"{e.get('sop_instance_uid')} by {e.get('destination')}: {e.get('status')}"]
    if kind == "send_failed":
        return [f"{e.get('sop_instance_uid')} to {e.get('destination')}, try "
                f"{e.get('attempt')}: {e.get('reason')}"]
    if kind == "late":
        return [f"{e.get('sop_instance_uid')} to {e.get('destination')}: pending "
                f"{e.get('pending_s')} s after {e.get('attempts')} tries"]
    if kind == "dead":
        return [f"{e.get('sop_instance_uid')} to {e.get('destination')}: dead letter after "
                f"{e.get('attempts')} tries ({e.get('reason')}); `dicom-ai retry` sends it again"]
    if kind == "requeued":
        return [f"{e.get('sop_instance_uid')} to {e.get('destination')}: queued again"]
    if kind == "purged":
        return [f"{e.get('instances')} received instances and the results removed by retention "
                "(this trail is kept)"]
    return [_fields(e)]


def render_trail(study_instance_uid: str, events: Sequence[Mapping[str, Any]],
                 conn: sqlite3.Connection | None = None) -> str:
    """A study's audit trail as text, one line per event in the order written.

    Consecutive ``received`` events of one series, sender, SOP class and transfer syntax are
    shown as one line with their count (``--json`` gives every one).

    Parameters
    ----------
    study_instance_uid:
        The study.
    events:
        From :func:`dicom_ai.service.audit.read_events`.
    conn:
        The index, when there is one: the study's current state is shown above the events.
    """
    parts = [f"Study {study_instance_uid}: {len(events)} audit events"
             + (f", {_clock(events[0])} to {_clock(events[-1])}" if events else "")]
    if conn is not None:
        row = conn.execute(
            "SELECT s.state, s.generation, s.instance_count, (SELECT j.state FROM jobs j "
            "WHERE j.study_instance_uid = s.study_instance_uid "
            "ORDER BY j.generation DESC, j.id DESC LIMIT 1) FROM studies s "
            "WHERE s.study_instance_uid = ?", (study_instance_uid,)).fetchone()
        parts.append("Now: not in the index (removed by retention)" if row is None else
                     f"Now: {row[0]}, generation {row[1]}, {row[2]} instances, job "
                     f"{row[3] or 'none'}")
    parts.append("")
    width = max((len(str(e.get("event", ""))) for e in events), default=0)
    i = 0
    while i < len(events):
        run = [events[i]]
        while i + len(run) < len(events) and _same_run(events[i], events[i + len(run)]):
            run.append(events[i + len(run)])
        first, *rest = _describe(events[i], run)
        parts.append(f"{_clock(events[i])}  {str(events[i].get('event')).ljust(width)}  {first}")
        indent = " " * (len(_clock(events[i])) + width + 4)
        parts.extend(f"{indent}{line}" for line in rest)
        i += len(run)
    return "\n".join(parts) + "\n"


def trail_json_lines(events: Sequence[Mapping[str, Any]]) -> str:
    """The events as JSON lines (one object per line, as stored), for export."""
    return "".join(json.dumps(e, ensure_ascii=True, separators=(",", ":")) + "\n"
                   for e in events)


def show_trail(root: Path, study_instance_uid: str, *, as_json: bool = False,
               out: TextIO | None = None, err: TextIO | None = None) -> int:
    """``dicom-ai status STUDY_UID [--json]``: print the study's audit trail.

    Parameters
    ----------
    root:
        ``storage.directory``.
    study_instance_uid:
        The study asked for.
    as_json:
        JSON lines (every event as stored) instead of the readable text.
    out, err:
        Where the trail and the messages go; stdout and stderr by default.

    Returns
    -------
    int
        0 when shown; 1 when the study has no trail; 2 when the argument is not a UID.
    """
    from dicom_ai.dicom.uid import InvalidUIDError
    from dicom_ai.service import audit, db

    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    try:
        events = audit.read_events(root, study_instance_uid)
    except InvalidUIDError:
        print("dicom-ai status: the argument is not a Study Instance UID (digits and dots, "
              "at most 64 characters)", file=err)
        return 2
    except audit.UnknownStudyError:
        print(f"dicom-ai status: no audit trail for study {study_instance_uid} under "
              f"{audit.audit_dir(root)}: it was never received with this storage directory, or "
              "its trail is older than storage.audit_retention_days", file=err)
        return 1
    if as_json:
        out.write(trail_json_lines(events))
        return 0
    index = root / "index.sqlite"
    conn = db.connect(index) if index.is_file() else None
    try:
        out.write(render_trail(study_instance_uid, events, conn))
    finally:
        if conn is not None:
            conn.close()
    return 0
