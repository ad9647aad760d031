"""Retention: a finished study leaves the spool ``storage.retention_days`` after its last instance.

dicom-ai is not an archive: the PACS keeps the originals and receives our results, so the spool
holds only what processing and delivery still need, plus a grace period for an operator to look
into a result. A sweep every :data:`SWEEP_INTERVAL_S` removes each study that
:func:`~dicom_ai.service.studies.finished_before` the cutoff (processed, nothing queued, every
result delivered — a dead letter keeps its study until it is retried) with
:meth:`~dicom_ai.service.spool.Spool.purge_study`. An instance arriving later for a removed study
starts it afresh.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time

from dicom_ai.logs import log_failure
from dicom_ai.service import db, studies
from dicom_ai.service.spool import Spool

log = logging.getLogger(__name__)

#: Seconds between sweeps: retention is counted in days, so ten minutes late is immaterial.
SWEEP_INTERVAL_S = 600.0
SECONDS_PER_DAY = 86400.0


def sweep(spool: Spool, conn: sqlite3.Connection, now: float, retention_days: float) -> int:
    """Remove every study finished more than ``retention_days`` before ``now``.

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
            removed += 1
    return removed


class Sweeper(threading.Thread):
    """Background thread running :func:`sweep` at start and every :data:`SWEEP_INTERVAL_S`."""

    def __init__(self, spool: Spool, retention_days: float) -> None:
        super().__init__(name="retention", daemon=True)
        self._spool = spool
        self._days = retention_days
        self._stop_event = threading.Event()

    def stop(self) -> None:
        """Ask the thread to finish."""
        self._stop_event.set()

    def run(self) -> None:
        conn = db.connect(self._spool.db_path)
        try:
            while not self._stop_event.is_set():
                try:
                    sweep(self._spool, conn, time.time(), self._days)
                except (sqlite3.Error, OSError) as exc:
                    log_failure(log, "retention sweep failed; retrying later", exc)
                self._stop_event.wait(SWEEP_INTERVAL_S)
        finally:
            conn.close()
