"""Prometheus metrics of the whole service, served at ``/metrics`` by :mod:`dicom_ai.service.http`.

The service is several processes (listener and assembler in the main process, worker and exporter
children), and the endpoint runs in the main process. Two sources make up what it shows:

- The main process counts in memory (the listener and the supervisor run in the endpoint's
  process): instances received and refused by reason, associations accepted, rejected by reason,
  and open, child processes restarted. These counters start at zero with the process, as
  Prometheus counters do.
- Everything the children do is counted in the SQLite index, in the same transaction as the work
  it counts (:func:`add_count`, :func:`observe`): studies completed, deliveries attempted, failed,
  delivered, late and dead, inference seconds per model, end-to-end seconds per modality. Stored
  as running totals and histogram buckets (``metric_counters``, ``metric_histograms``), they stay
  monotonic across restarts and across retention, which deletes the rows they were counted from,
  and they cost a few rows however long the service runs. :class:`IndexCollector` reads them,
  and the current state (jobs by state and lane, queue depths, dead letters, free spool space),
  at scrape time.

Names follow Prometheus conventions: prefix ``dicom_ai_``, base units (seconds, bytes), ``_total``
for counters. ``docs/operations.md`` lists every metric and the alerts built on them.
"""

from __future__ import annotations

import bisect
import logging
import sqlite3
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Protocol
from urllib.parse import quote

from prometheus_client import Counter, Gauge
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from dicom_ai import __version__

log = logging.getLogger(__name__)

INF = float("inf")

#: Bucket bounds (seconds) of ``dicom_ai_inference_seconds``: one model on one study, from a
#: radiograph on a GPU (a tenth of a second) to a CT on a CPU (minutes).
INFERENCE_BUCKETS: tuple[float, ...] = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0,
                                        250.0, 500.0, INF)
#: Bucket bounds (seconds) of ``dicom_ai_end_to_end_seconds``: the quiet period (30 s by default)
#: is part of it, and a delivery retried through a PACS outage takes hours.
END_TO_END_BUCKETS: tuple[float, ...] = (5.0, 10.0, 20.0, 30.0, 45.0, 60.0, 90.0, 120.0, 180.0,
                                         300.0, 600.0, 1800.0, 3600.0, 14400.0, INF)

#: Stored counters: name in ``metric_counters`` → (label name, help). Exposed as
#: ``dicom_ai_<name>_total``.
COUNTERS: dict[str, tuple[str, str]] = {
    "studies_completed": ("modality", "Studies analysed to the end (job done, results queued)"),
    "delivery_attempts": ("destination", "Result objects tried to deliver (each try counts)"),
    "delivery_failures": ("destination", "Tries that did not store the object at the destination"),
    "deliveries_delivered": ("destination", "Result objects the destination confirmed as stored"),
    "deliveries_late": ("destination",
                        "Deliveries that became late (pending longer than export.late_after_s)"),
    "deliveries_dead": ("destination", "Deliveries dead-lettered (no more automatic retries)"),
}
#: Stored histograms: name → (label name, help, bucket bounds). Exposed as ``dicom_ai_<name>``.
HISTOGRAMS: dict[str, tuple[str, str, tuple[float, ...]]] = {
    "inference_seconds": ("model", "Seconds one model spent on one study's series",
                          INFERENCE_BUCKETS),
    "end_to_end_seconds": ("modality", "Seconds from the last instance of a study received to an "
                           "SR of its results stored at a destination", END_TO_END_BUCKETS),
}
#: Job states of the ``jobs`` table, exposed with zeros so that an alert on one finds the series.
JOB_STATES = ("queued", "running", "done", "failed", "superseded")
#: Every SR storage SOP class lies under this root (PS3.4 Annex O/A.35).
SR_CLASS_PREFIX = "1.2.840.10008.5.1.4.1.1.88."


# --- listener (main process, in memory) -----------------------------------------------------

#: Listener instruments, registered with the endpoint's registry (``registry=None``: a test or a
#: second endpoint never meets a global registry's duplicates).
INSTANCES_RECEIVED = Counter("dicom_ai_instances_received",
                             "Instances received and acknowledged with success (C-STORE 0x0000)",
                             registry=None)
INSTANCES_REFUSED = Counter("dicom_ai_instances_refused",
                            "C-STOREs answered with a failure status, by reason", ["reason"],
                            registry=None)
ASSOCIATIONS_ACCEPTED = Counter("dicom_ai_associations_accepted",
                                "Associations accepted by the listener", registry=None)
ASSOCIATIONS_REJECTED = Counter("dicom_ai_associations_rejected",
                                "A-ASSOCIATE-RJ sent, by reason", ["reason"], registry=None)
ASSOCIATIONS_OPEN = Gauge("dicom_ai_associations_open", "Associations open now",
                          registry=None)
#: Counted by the supervisor (main process): a crash loop shows here even when each restarted
#: child lives long enough to pass readiness between crashes.
CHILD_RESTARTS = Counter("dicom_ai_child_restarts",
                         "Child processes (workers, exporter) restarted after they exited",
                         ["process"], registry=None)
#: The in-memory instruments of the main process.
MAIN_PROCESS_METRICS: tuple[Collector, ...] = (INSTANCES_RECEIVED, INSTANCES_REFUSED,
                                               ASSOCIATIONS_ACCEPTED, ASSOCIATIONS_REJECTED,
                                               ASSOCIATIONS_OPEN, CHILD_RESTARTS)

#: C-STORE failure statuses (PS3.4 B.2.3, PS3.7 C.4) → reason label.
_REFUSAL_REASONS = {0xA700: "out_of_resources", 0xA900: "sop_class_mismatch",
                    0xC000: "cannot_understand", 0x0122: "sop_class_not_supported",
                    0x0110: "processing_failure"}
#: Refinements of 0xA700 by the Error Comment the listener sends (see scp.py); an unknown comment
#: stays ``out_of_resources``.
_OUT_OF_RESOURCES = (("disk almost full", "disk_low"), ("disk full", "disk_full"),
                     ("too large", "too_large"))
#: A-ASSOCIATE-RJ (result, source, diagnostic), PS3.8 Table 9-21 → reason label.
_REJECTION_REASONS = {(0x01, 0x02, 0x02): "protocol_version_not_supported",
                      (0x01, 0x01, 0x02): "application_context_not_supported",
                      (0x01, 0x01, 0x03): "calling_ae_not_recognised",
                      (0x01, 0x01, 0x07): "called_ae_not_recognised",
                      (0x02, 0x03, 0x02): "local_limit_exceeded"}


def refusal_reason(status: int, comment: str) -> str:
    """The ``reason`` label of a C-STORE failure status: a fixed set, never a wire value."""
    reason = _REFUSAL_REASONS.get(status, "other")
    if status == 0xA700:
        reason = next((label for text, label in _OUT_OF_RESOURCES if text in comment), reason)
    return reason


def store_answered(status: int, comment: str) -> None:
    """Count one C-STORE response of the listener."""
    if status == 0x0000:
        INSTANCES_RECEIVED.inc()
    else:
        INSTANCES_REFUSED.labels(refusal_reason(status, comment)).inc()


def association_rejected(result: int, source: int, diagnostic: int) -> None:
    """Count one A-ASSOCIATE-RJ."""
    ASSOCIATIONS_REJECTED.labels(
        _REJECTION_REASONS.get((result, source, diagnostic), "other")).inc()


def association_opened() -> None:
    """An association was accepted and holds a slot."""
    ASSOCIATIONS_ACCEPTED.inc()
    ASSOCIATIONS_OPEN.inc()


def association_closed() -> None:
    """An accepted association ended and gave its slot back."""
    ASSOCIATIONS_OPEN.dec()


def child_restarted(name: str) -> None:
    """The supervisor restarts the child process ``name``."""
    CHILD_RESTARTS.labels(name).inc()


# --- stored counters and histograms (any process, in the caller's transaction) --------------

def add_count(conn: sqlite3.Connection, name: str, label: str, amount: float = 1.0) -> None:
    """Add ``amount`` to the stored counter ``name{label}`` (one of :data:`COUNTERS`).

    Call inside the transaction that does what is counted: the count is then exactly as durable
    as the work.
    """
    if name not in COUNTERS:
        raise ValueError(f"unknown counter {name!r}")
    conn.execute("INSERT INTO metric_counters (name, label, value) VALUES (?, ?, ?) "
                 "ON CONFLICT (name, label) DO UPDATE SET value = value + excluded.value",
                 (name, label, amount))


def observe(conn: sqlite3.Connection, name: str, label: str, value: float) -> None:
    """Count one observation of the stored histogram ``name{label}`` (one of :data:`HISTOGRAMS`):
    its bucket and its sum."""
    if name not in HISTOGRAMS:
        raise ValueError(f"unknown histogram {name!r}")
    bounds = HISTOGRAMS[name][2]
    value = max(0.0, value)
    le = bounds[min(bisect.bisect_left(bounds, value), len(bounds) - 1)]
    conn.execute("INSERT INTO metric_histograms (name, label, le, count, sum) "
                 "VALUES (?, ?, ?, 1, ?) ON CONFLICT (name, label, le) DO UPDATE SET "
                 "count = count + 1, sum = sum + excluded.sum", (name, label, le, value))


def record_job(conn: sqlite3.Connection, job_id: int, modality: str,
               inference_seconds: Mapping[str, float], *, done: bool) -> None:
    """What the worker counts when a job ends with results (inside its finishing transaction).

    Parameters
    ----------
    conn:
        The worker's connection, in the transaction that marks the job.
    job_id:
        The job; its ``modality`` is set (the exporter labels end-to-end seconds with it).
    modality:
        Modality of the analysed series (``""``: unknown).
    inference_seconds:
        Model name → seconds it spent on the study.
    done:
        The job is ``done`` (counted as a completed study); ``False`` for a superseded one, whose
        inference still counts.
    """
    conn.execute("UPDATE jobs SET modality = ? WHERE id = ?", (modality or None, job_id))
    for model, seconds in inference_seconds.items():
        observe(conn, "inference_seconds", model, seconds)
    if done:
        add_count(conn, "studies_completed", modality or "unknown")


class DeliveryLike(Protocol):
    """What :func:`record_deliveries` reads of an exporter ``Delivery``."""

    @property
    def id(self) -> int: ...

    @property
    def destination(self) -> str: ...

    @property
    def sop_class_uid(self) -> str: ...

    @property
    def late(self) -> bool: ...


def record_deliveries(conn: sqlite3.Connection, items: Sequence[DeliveryLike],
                      results: Mapping[int, str | None], now: float, *,
                      attempted: bool = True) -> None:
    """What the exporter counts after it recorded a batch's outcome (inside that transaction).

    Read back from the rows just written, so that the counts follow the exporter's own
    decisions (late, dead) instead of repeating them: each item is an attempt; a failure unless
    its result is None (stored); late when the row became late now; dead when it is dead now.
    A delivered SR adds its end-to-end seconds (``now`` minus the study's last instance).

    Parameters
    ----------
    conn:
        The exporter's connection, in the transaction that recorded ``results``.
    items:
        The batch.
    results:
        Delivery id → None (stored) or the reason it was not.
    now:
        When the outcome was recorded (epoch seconds).
    attempted:
        ``False`` for rows dead-lettered without a try (their destination is gone).
    """
    if not items:
        return
    ids = [item.id for item in items]
    marks = ",".join("?" * len(ids))
    rows = {int(r[0]): (str(r[1]), bool(r[2]), r[3], r[4]) for r in conn.execute(
        "SELECT o.id, o.state, o.late, j.modality, s.last_received FROM outbound o "
        "LEFT JOIN jobs j ON j.id = o.job_id "
        "LEFT JOIN studies s ON s.study_instance_uid = o.study_instance_uid "
        f"WHERE o.id IN ({marks})", ids)}
    counts: dict[tuple[str, str], int] = defaultdict(int)
    for item in items:
        if item.id not in rows:
            continue
        state, late, modality, last_received = rows[item.id]
        stored = attempted and results.get(item.id, "not attempted") is None
        if attempted:
            counts["delivery_attempts", item.destination] += 1
            counts["deliveries_delivered" if stored else "delivery_failures",
                   item.destination] += 1
        if late and not item.late:
            counts["deliveries_late", item.destination] += 1
        if state == "dead":
            counts["deliveries_dead", item.destination] += 1
        if stored and item.sop_class_uid.startswith(SR_CLASS_PREFIX) and last_received is not None:
            observe(conn, "end_to_end_seconds", str(modality or "unknown"),
                    now - float(last_received))
    for (name, label), amount in counts.items():
        add_count(conn, name, label, amount)


# --- scrape-time collector ------------------------------------------------------------------

FreeBytes = Callable[[Path], int]

#: Seconds a scrape waits for the index (a reader in WAL mode waits only for a checkpoint).
READ_TIMEOUT_S = 5.0


def read_only(path: Path) -> sqlite3.Connection:
    """A read-only connection to the index, for scrapes and probes.

    Read-only, it never waits for a writer's lock (WAL readers do not) and never creates the
    database or its schema: a missing index is an error, not a new empty one.
    """
    return sqlite3.connect(f"file:{quote(str(path))}?mode=ro", uri=True,
                           timeout=READ_TIMEOUT_S, isolation_level=None)


class IndexCollector(Collector):
    """Reads the index (and the spool's file system) at every scrape.

    Parameters
    ----------
    root:
        ``storage.directory``: the index is ``index.sqlite`` in it.
    destinations:
        Names of the configured destinations, exposed with zeros before their first delivery.
    minimum_free_bytes:
        ``storage.minimum_free_mb`` in bytes (below it the listener refuses C-STOREs).
    free_bytes:
        Free-space probe of the spool's file system.
    """

    def __init__(self, root: Path, *, destinations: Sequence[str], minimum_free_bytes: int,
                 free_bytes: FreeBytes) -> None:
        self.root = root
        self.destinations = list(destinations)
        self.minimum_free_bytes = minimum_free_bytes
        self.free_bytes = free_bytes

    def collect(self) -> Iterable[Metric]:
        """The metric families of one scrape."""
        build = GaugeMetricFamily("dicom_ai_build_info", "The running dicom-ai version",
                                  labels=["version"])
        build.add_metric([__version__], 1.0)
        yield build
        yield from self._spool()
        up = GaugeMetricFamily("dicom_ai_index_up",
                               "1 when the scrape could read the SQLite index")
        try:
            families = list(self._index())
        except sqlite3.Error as exc:
            log.warning("metrics: the index could not be read (%s)", type(exc).__name__)
            up.add_metric([], 0.0)
            yield up
            return
        up.add_metric([], 1.0)
        yield up
        yield from families

    def _spool(self) -> Iterator[Metric]:
        minimum = GaugeMetricFamily("dicom_ai_spool_minimum_free_bytes",
                                    "storage.minimum_free_mb: below it C-STORE is refused")
        minimum.add_metric([], float(self.minimum_free_bytes))
        yield minimum
        try:
            free = float(self.free_bytes(self.root))
        except OSError as exc:
            log.warning("metrics: free space of the spool unknown (%s)", exc.strerror)
            return
        family = GaugeMetricFamily("dicom_ai_spool_free_bytes",
                                   "Free bytes on the spool's file system")
        family.add_metric([], free)
        yield family

    def _index(self) -> Iterator[Metric]:
        conn = read_only(self.root / "index.sqlite")
        try:
            now = time.time()
            yield from self._state(conn, now)
            yield from self._counters(conn)
            yield from self._histograms(conn)
        finally:
            conn.close()

    def _state(self, conn: sqlite3.Connection, now: float) -> Iterator[Metric]:
        columns = {str(r[1]) for r in conn.execute("PRAGMA table_info(jobs)")}
        lane = "lane" if "lane" in columns else "'default'"
        jobs = GaugeMetricFamily("dicom_ai_jobs", "Jobs in the index by state and lane",
                                 labels=["state", "lane"])
        by_lane: dict[str, dict[str, int]] = defaultdict(dict)
        for state, lane_name, count in conn.execute(
                f"SELECT state, {lane}, COUNT(*) FROM jobs GROUP BY 1, 2"):
            by_lane[str(lane_name)][str(state)] = int(count)
        for lane_name, states in sorted(by_lane.items()):
            for state in sorted({*JOB_STATES, *states}):
                jobs.add_metric([state, lane_name], float(states.get(state, 0)))
        yield jobs

        receiving, queued, pending = conn.execute(
            "SELECT (SELECT COUNT(*) FROM studies WHERE state = 'receiving'), "
            "(SELECT COUNT(*) FROM jobs WHERE state = 'queued'), "
            "(SELECT COUNT(*) FROM outbound WHERE state = 'pending')").fetchone()
        depth = GaugeMetricFamily("dicom_ai_queue_depth",
                                  "Items waiting: studies still receiving (assembly), queued jobs "
                                  "(processing), pending deliveries (delivery)", labels=["queue"])
        for name, value in (("assembly", receiving), ("processing", queued),
                            ("delivery", pending)):
            depth.add_metric([name], float(value))
        yield depth

        oldest_job, oldest_delivery = conn.execute(
            "SELECT (SELECT MIN(created_at) FROM jobs WHERE state = 'queued'), "
            "(SELECT MIN(COALESCE(pending_since, created_at)) FROM outbound "
            "WHERE state = 'pending')").fetchone()
        age = GaugeMetricFamily("dicom_ai_queue_oldest_age_seconds",
                                "Age of the oldest queued job / pending delivery (0: none)",
                                labels=["queue"])
        for name, since in (("processing", oldest_job), ("delivery", oldest_delivery)):
            age.add_metric([name], 0.0 if since is None else max(0.0, now - float(since)))
        yield age

        pending_by: dict[str, int] = dict.fromkeys(self.destinations, 0)
        dead_by: dict[str, int] = dict.fromkeys(self.destinations, 0)
        for dest, state, count in conn.execute(
                "SELECT destination, state, COUNT(*) FROM outbound "
                "WHERE state IN ('pending', 'dead') GROUP BY 1, 2"):
            (pending_by if state == "pending" else dead_by)[str(dest)] = int(count)
        for name, doc, values in (
                ("dicom_ai_deliveries_pending", "Deliveries waiting for a (next) try",
                 pending_by),
                ("dicom_ai_dead_letters", "Dead-lettered deliveries now in the index (until "
                 "`dicom-ai retry` queues them again)", dead_by)):
            family = GaugeMetricFamily(name, doc, labels=["destination"])
            for dest, value in sorted(values.items()):
                family.add_metric([dest], float(value))
            yield family

        count, size = conn.execute("SELECT COUNT(*), COALESCE(SUM(size), 0) FROM instances"
                                   ).fetchone()
        instances = GaugeMetricFamily("dicom_ai_spool_instances",
                                      "Received instances kept in the spool")
        instances.add_metric([], float(count))
        yield instances
        stored = GaugeMetricFamily("dicom_ai_spool_instances_bytes",
                                   "Bytes of the received instances kept in the spool")
        stored.add_metric([], float(size))
        yield stored

    def _counters(self, conn: sqlite3.Connection) -> Iterator[Metric]:
        values: dict[str, dict[str, float]] = {name: {} for name in COUNTERS}
        for name, label, value in conn.execute("SELECT name, label, value FROM metric_counters"):
            if name in values:
                values[name][str(label)] = float(value)
        for name, (label_name, doc) in COUNTERS.items():
            family = CounterMetricFamily(f"dicom_ai_{name}", doc, labels=[label_name])
            seen = values[name]
            if label_name == "destination":
                seen = {**dict.fromkeys(self.destinations, 0.0), **seen}
            for label, value in sorted(seen.items()):
                family.add_metric([label], value)
            yield family

    def _histograms(self, conn: sqlite3.Connection) -> Iterator[Metric]:
        rows: dict[str, dict[str, dict[float, tuple[int, float]]]] = {
            name: defaultdict(dict) for name in HISTOGRAMS}
        for name, label, le, count, total in conn.execute(
                "SELECT name, label, le, count, sum FROM metric_histograms"):
            if name in rows:
                rows[name][str(label)][float(le)] = (int(count), float(total))
        for name, (label_name, doc, bounds) in HISTOGRAMS.items():
            family = HistogramMetricFamily(f"dicom_ai_{name}", doc, labels=[label_name])
            for label, by_le in sorted(rows[name].items()):
                buckets, total = cumulative_buckets(bounds, by_le)
                family.add_metric([label], buckets, sum_value=total)
            yield family


def cumulative_buckets(bounds: Sequence[float], counts: Mapping[float, tuple[int, float]]
                       ) -> tuple[list[tuple[str, float]], float]:
    """Prometheus buckets from stored per-bucket counts.

    Parameters
    ----------
    bounds:
        The histogram's bucket bounds (ending with +Inf).
    counts:
        Upper bound → (observations in that bucket alone, their sum). Bounds of an earlier
        version's buckets are kept as buckets of their own.

    Returns
    -------
    tuple
        ``(le, cumulative count)`` pairs, ascending and ending with ``+Inf``, and the sum of all
        observations.
    """
    edges = sorted({*bounds, *counts, INF})
    buckets: list[tuple[str, float]] = []
    running = 0
    for le in edges:
        running += counts.get(le, (0, 0.0))[0]
        buckets.append(("+Inf" if le == INF else repr(le), float(running)))
    return buckets, sum(total for _, total in counts.values())
