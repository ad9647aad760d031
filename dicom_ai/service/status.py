"""``dicom-ai status``: studies, jobs and the outbound queue, read from the index.

Only UIDs, AE titles, counts, states and reasons are shown — never patient name, ID or birth date
(the index does not hold them).
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Sequence
from datetime import datetime


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

    studies = conn.execute(
        "SELECT s.study_instance_uid, s.state, s.generation, s.instance_count, s.last_received, "
        "(SELECT j.state FROM jobs j WHERE j.study_instance_uid = s.study_instance_uid "
        " ORDER BY j.generation DESC, j.id DESC LIMIT 1) "
        "FROM studies s ORDER BY s.last_received DESC LIMIT ?", (limit,)).fetchall()
    total = conn.execute("SELECT COUNT(*) FROM studies").fetchone()[0]
    parts.append(f"Studies ({total}, latest {len(studies)} shown)")
    parts.append(table(["study instance uid", "state", "gen", "instances", "last instance",
                        "job"], [(r[0], r[1], r[2], r[3], _age(r[4], now), r[5] or "")
                                 for r in studies]))

    counts = dict(conn.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall())
    parts.append("\nJobs: " + ", ".join(f"{s} {counts.get(s, 0)}" for s in
                                        ("queued", "running", "done", "failed", "superseded")))
    open_jobs = conn.execute(
        "SELECT id, study_instance_uid, generation, state, attempts, outputs, last_error "
        "FROM jobs WHERE state IN ('queued', 'running', 'failed') ORDER BY id DESC LIMIT ?",
        (limit,)).fetchall()
    if open_jobs:
        parts.append(table(["job", "study instance uid", "gen", "state", "attempts", "outputs",
                            "last error"], [tuple(r) for r in open_jobs]))

    queue = conn.execute(
        "SELECT destination, SUM(state = 'pending'), SUM(state = 'delivered'), "
        "SUM(state = 'dead') FROM outbound GROUP BY destination ORDER BY destination").fetchall()
    parts.append("\nOutbound queue")
    parts.append(table(["destination", "pending", "delivered", "dead"],
                       [tuple(r) for r in queue]) if queue else "(empty)")
    dead = conn.execute(
        "SELECT destination, sop_instance_uid, attempts, last_error FROM outbound "
        "WHERE state = 'dead' ORDER BY id DESC LIMIT ?", (limit,)).fetchall()
    if dead:
        parts.append("\nDead letters (not retried automatically; `dicom-ai retry` after fixing "
                     "the destination)")
        parts.append(table(["destination", "sop instance uid", "attempts", "last error"],
                           [tuple(r) for r in dead]))
    pending = conn.execute(
        "SELECT destination, sop_instance_uid, attempts, next_attempt_at, last_error "
        "FROM outbound WHERE state = 'pending' AND attempts > 0 ORDER BY id LIMIT ?",
        (limit,)).fetchall()
    if pending:
        parts.append("\nRetrying")
        parts.append(table(["destination", "sop instance uid", "attempts", "next try in",
                            "last error"],
                           [(r[0], r[1], r[2], f"{max(0, int(r[3] - now))}s", r[4])
                            for r in pending]))
    return "\n".join(parts) + "\n"
