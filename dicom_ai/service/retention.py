"""Retention: a finished study leaves the spool ``storage.retention_days`` after its last instance.

dicom-ai is not an archive: the PACS keeps the originals and receives our results, so the spool
holds only what processing and delivery still need, plus a grace period for an operator to look
into a result. A sweep every :data:`SWEEP_INTERVAL_S` removes each study that
:func:`~dicom_ai.service.studies.finished_before` the cutoff (processed, nothing queued, every
result delivered — a dead letter keeps its study until it is retried) with
:meth:`~dicom_ai.service.spool.Spool.purge_study`. An instance arriving later for a removed study
starts it afresh.

A study's audit trail (:mod:`~dicom_ai.service.audit`) outlives its files: the sweep that removes
a study writes its ``purged`` event, and removes the trail itself only once its last event is
older than ``storage.audit_retention_days`` (365 days by default; 0 keeps every trail) and the
study is no longer in the index. The trail is what answers "which model version analysed this
study, and was the result acknowledged?" weeks after the spool let the study go; at about 450
bytes per received instance it costs little next to the images.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from pathlib import Path

from dicom_ai.logs import log_failure
from dicom_ai.service import audit, db, studies
from dicom_ai.service.spool import Spool

log = logging.getLogger(__name__)

#: Seconds between sweeps: retention is counted in days, so ten minutes late is immaterial.
SWEEP_INTERVAL_S = 600.0
SECONDS_PER_DAY = 86400.0


def sweep(spool: Spool, conn: sqlite3.Connection, now: float, retention_days: float, *,
          audit_retention_days: float = 0.0) -> int:
    """Remove every study finished more than ``retention_days`` before ``now``, and the audit
    trails older than ``audit_retention_days`` (see :func:`prune_audit`).

    Parameters
    ----------
    spool:
        The service's spool (it coordinates removal with the listener's stores).
    conn:
        A connection to the index for finding candidates.
    now:
        Epoch seconds.
    retention_days:
        Positive.
    audit_retention_days:
        0 keeps every audit trail.

    Returns
    -------
    int
        The number of studies removed.
    """
    cutoff = now - retention_days * SECONDS_PER_DAY
    removed = 0
    for uid in studies.finished_before(conn, cutoff):
        count = spool.purge_study(uid, cutoff=cutoff)
        if count is not None:
            log.info("retention: study %s removed (%d received instances)", uid, count)
            audit.record(spool.root, uid, "purged", now=now, instances=count)
            removed += 1
    if audit_retention_days > 0:
        prune_audit(spool.root, conn, now - audit_retention_days * SECONDS_PER_DAY)
    return removed


def prune_audit(root: Path, conn: sqlite3.Connection, cutoff: float) -> int:
    """Remove the audit trails whose last event is older than ``cutoff`` (file modification
    time) and whose study is no longer in the index.

    A study still in the index keeps its trail whatever its age: its files are still here. The
    index is checked after the age, and a store indexes an instance before it audits it, so a
    trail is not removed under an instance arriving for its study.

    Parameters
    ----------
    root:
        ``storage.directory``.
    conn:
        A connection to the index.
    cutoff:
        Epoch seconds.

    Returns
    -------
    int
        The number of trails removed.
    """
    removed = 0
    for path in audit.studies_with_trail(root):
        try:
            if path.stat().st_mtime >= cutoff:
                continue
        except FileNotFoundError:
            continue
        if conn.execute("SELECT 1 FROM studies WHERE study_instance_uid = ?",
                        (path.stem,)).fetchone() is not None:
            continue
        path.unlink(missing_ok=True)
        removed += 1
    if removed:
        log.info("retention: %d audit trails older than storage.audit_retention_days removed",
                 removed)
    return removed


class Sweeper(threading.Thread):
    """Background thread running :func:`sweep` at start and every :data:`SWEEP_INTERVAL_S`."""

    def __init__(self, spool: Spool, retention_days: float, *,
                 audit_retention_days: float = 0.0) -> None:
        super().__init__(name="retention", daemon=True)
        self._spool = spool
        self._days = retention_days
        self._audit_days = audit_retention_days
        self._stop_event = threading.Event()

    def stop(self) -> None:
        """Ask the thread to finish."""
        self._stop_event.set()

    def run(self) -> None:
        conn = db.connect(self._spool.db_path)
        try:
            while not self._stop_event.is_set():
                try:
                    sweep(self._spool, conn, time.time(), self._days,
                          audit_retention_days=self._audit_days)
                except (sqlite3.Error, OSError) as exc:
                    log_failure(log, "retention sweep failed; retrying later", exc)
                self._stop_event.wait(SWEEP_INTERVAL_S)
        finally:
            conn.close()
