"""Delivery of results to the configured destinations: C-STORE SCU and DICOMweb STOW-RS.

The ``outbound`` table holds one row per result object and destination. The exporter process sends
the rows that are due, one association (or one STOW-RS request) per destination and round, and
marks a row ``delivered`` only after the destination confirmed it. A failed try schedules the next
after an exponential backoff (``export.initial_backoff_s`` doubling up to ``export.max_backoff_s``)
for as long as ``export.retry_horizon_s`` (24 h by default: a PACS maintenance window is hours);
a delivery still failing then is ``dead`` — logged at ERROR, visible in ``dicom-ai status`` and
never retried by itself, so a destination that keeps refusing us cannot cause an endless loop. A
delivery pending longer than ``export.late_after_s`` is logged once at WARNING. A crash between a
successful send and the mark re-sends the object on the next start; that is harmless because
result UIDs are deterministic and a PACS keeps one instance per SOP Instance UID. Each try and its
outcome (``sent``, ``acknowledged``, ``send_failed``, ``late``, ``dead``, ``requeued``) is a line of
the study's audit trail (:mod:`~dicom_ai.service.audit`).
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import pydicom
import requests
from pydicom.errors import InvalidDicomError
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.events import Event
from pynetdicom.pdu import A_ASSOCIATE_RJ

from dicom_ai.config import DestinationSettings, ExportSettings, Settings
from dicom_ai.logs import log_failure
from dicom_ai.service import audit, db, metrics
from dicom_ai.service.process import child_setup, orphaned
from dicom_ai.service.requestor import associate
from dicom_ai.service.tls import client_context

log = logging.getLogger(__name__)

#: C-STORE statuses that mean "stored": success and the PS3.4 B.2 warnings (coercion, elements
#: discarded, data set does not match SOP class — the SCP kept the object in every case).
_STORED = {0x0000, 0xB000, 0xB006, 0xB007}


def backoff_delay(failures: int, initial_s: float, max_s: float) -> float:
    """Seconds to wait after the ``failures``-th failed try: ``initial_s * 2**(failures-1)``.

    Parameters
    ----------
    failures:
        Failed tries so far (≥ 1).
    initial_s, max_s:
        ``export.initial_backoff_s`` and the cap ``export.max_backoff_s``.
    """
    return float(min(max_s, initial_s * 2.0 ** (max(failures, 1) - 1)))


@dataclass(frozen=True)
class Delivery:
    """One pending row of the outbound table."""

    id: int
    path: Path
    sop_instance_uid: str
    sop_class_uid: str
    destination: str
    attempts: int
    #: When the row became pending (queued, or re-queued by ``dicom-ai retry``), epoch seconds.
    pending_since: float = 0.0
    #: Whether the row was already reported late.
    late: bool = False
    #: The study the result belongs to (for its audit trail).
    study_instance_uid: str = ""


class Sender(Protocol):
    """Sends a batch of result files to one destination."""

    def send(self, items: Sequence[Delivery]) -> dict[int, str | None]:
        """Send ``items``; map each id to None (stored) or a short reason it was not."""
        ...


class DimseSender:
    """C-STORE SCU over one association per batch (optionally TLS).

    Parameters
    ----------
    destination:
        AE title, host, port and TLS of the peer.
    calling_aet:
        Our AE title as the caller (``scp.ae_title``): PACS allow-lists know us by it.
    """

    def __init__(self, destination: DestinationSettings, calling_aet: str) -> None:
        self.destination = destination
        self.calling_aet = calling_aet

    def send(self, items: Sequence[Delivery]) -> dict[int, str | None]:
        """Store each file; a refused or broken association fails the whole batch."""
        dest = self.destination
        ae = AE(ae_title=self.calling_aet)
        for sop_class in sorted({i.sop_class_uid for i in items}):
            ae.add_requested_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        # Filled from the reactor thread as PDUs arrive. pynetdicom's own verdict cannot be used: a
        # peer that rejects and closes at once can make it report "failed to connect" (its ACSE
        # thread looks at the socket after the reactor has already closed it), hiding the reason.
        connected: list[bool] = []
        rejection: list[str] = []

        def on_pdu(event: Event) -> None:
            pdu = event.pdu
            if isinstance(pdu, A_ASSOCIATE_RJ):
                try:
                    reason = pdu.reason_str
                except ValueError:  # a source/diagnostic pair PS3.8 does not define
                    reason = f"source {pdu.source}, diagnostic {pdu.reason_diagnostic}"
                rejection.append(f"association rejected: {reason}")

        tls_args = (client_context(dest.tls), dest.host) if dest.tls.enabled else None
        # requestor.associate: pynetdicom's reactor can otherwise take a C-STORE response meant
        # for this thread (notes in dicom_ai/service/requestor.py).
        assoc = associate(ae, dest.host, dest.port, ae_title=dest.ae_title, tls_args=tls_args,
                          evt_handlers=[(evt.EVT_PDU_RECV, on_pdu),
                                        (evt.EVT_CONN_OPEN, lambda _: connected.append(True))])
        if not assoc.is_established:
            why = rejection[0] if rejection else ("association aborted" if connected
                                                  else "cannot connect")
            return dict.fromkeys((i.id for i in items), why)
        results: dict[int, str | None] = {}
        try:
            for item in items:
                if not assoc.is_established:
                    results[item.id] = "association lost"
                    continue
                try:
                    rsp = assoc.send_c_store(item.path)
                except (OSError, InvalidDicomError) as exc:
                    results[item.id] = f"result file unreadable ({type(exc).__name__})"
                    continue
                status = getattr(rsp, "Status", None)
                if status in _STORED:
                    results[item.id] = None
                elif status is None:
                    results[item.id] = "no C-STORE response"
                else:
                    comment = str(rsp.get("ErrorComment", "")).strip()
                    results[item.id] = f"C-STORE status 0x{status:04X}" + (
                        f" ({comment})" if comment else "")
        finally:
            if assoc.is_established:
                assoc.release()
        return results


class _ConfiguredTLSSession(requests.Session):
    """A session whose ``verify`` setting beats ``REQUESTS_CA_BUNDLE``/``CURL_CA_BUNDLE``.

    requests lets those environment variables override a session's CA bundle (only a per-call
    ``verify`` beats them, and dicomweb-client passes none), so a CA bundle set machine-wide would
    silently replace the one configured for a destination. Proxy settings from the environment
    still apply.
    """

    def merge_environment_settings(self, url: str, proxies: Any, stream: Any,
                                   verify: Any, cert: Any) -> dict[str, Any]:
        settings: dict[str, Any] = super().merge_environment_settings(url, proxies, stream,
                                                                      verify, cert)
        if verify is None:
            settings["verify"] = self.verify
        return settings


class StowSender:
    """DICOMweb STOW-RS, one request per batch (``dicomweb-client``).

    Parameters
    ----------
    destination:
        ``url`` is the DICOMweb base (``…/dicom-web``); TLS settings apply to https URLs.
    """

    def __init__(self, destination: DestinationSettings) -> None:
        self.destination = destination

    def send(self, items: Sequence[Delivery]) -> dict[int, str | None]:
        """Store the files; instances the server lists as failed keep their failure reason."""
        from dicomweb_client.api import DICOMwebClient

        session = _ConfiguredTLSSession()
        tls = self.destination.tls
        if tls.enabled:
            session.verify = tls.ca_certificates or True
            if tls.certificate:
                session.cert = (tls.certificate, tls.private_key) if tls.private_key \
                    else tls.certificate
        client = DICOMwebClient(url=self.destination.url, session=session)
        # The outbound queue retries with its own backoff; the library's retries would hold the
        # exporter for half a minute per failing request.
        client.set_http_retry_params(retry=False)
        datasets = [pydicom.dcmread(i.path) for i in items]
        try:
            response = client.store_instances(datasets=datasets)
        except (requests.RequestException, OSError) as exc:
            return dict.fromkeys((i.id for i in items), f"STOW-RS failed ({type(exc).__name__}: "
                                 f"{str(exc)[:120]})")
        failed = {str(f.get("ReferencedSOPInstanceUID", "")): int(f.get("FailureReason", 0))
                  for f in response.get("FailedSOPSequence", [])}
        return {i.id: (f"STOW-RS failure reason 0x{failed[i.sop_instance_uid]:04X}"
                       if i.sop_instance_uid in failed else None) for i in items}


def make_senders(settings: Settings) -> dict[str, Sender]:
    """One sender per configured destination, by name."""
    senders: dict[str, Sender] = {}
    for dest in settings.export.destinations:
        senders[dest.name] = (StowSender(dest) if dest.kind == "stow"
                              else DimseSender(dest, settings.scp.ae_title))
    return senders


def due_deliveries(conn: sqlite3.Connection, root: Path, now: float,
                   limit: int = 200) -> list[Delivery]:
    """Pending rows whose next try is due, oldest first."""
    rows = conn.execute(
        "SELECT id, path, sop_instance_uid, sop_class_uid, destination, attempts, "
        "COALESCE(pending_since, created_at), late, study_instance_uid FROM outbound "
        "WHERE state = 'pending' AND next_attempt_at <= ? ORDER BY id LIMIT ?",
        (now, limit)).fetchall()
    return [Delivery(int(r[0]), root / r[1], str(r[2]), str(r[3]), str(r[4]), int(r[5]),
                     float(r[6]), bool(r[7]), str(r[8])) for r in rows]


def record_results(conn: sqlite3.Connection, items: Sequence[Delivery],
                   results: Mapping[int, str | None], settings: ExportSettings,
                   now: float, *, audit_root: Path | None = None) -> None:
    """Mark delivered rows, and schedule a retry or dead-letter the others, in one transaction.

    A failed try at or after ``export.retry_horizon_s`` since the row became pending makes it a
    dead letter (logged at ERROR); the first failed try after ``export.late_after_s`` marks it
    late (logged at WARNING, once). With ``audit_root`` (``storage.directory``) each outcome is
    added to its study's audit trail — ``acknowledged``, ``send_failed``, ``late``, ``dead`` —
    after the transaction, so the trail never states what the index rolled back.
    """
    events: list[tuple[Delivery, str, dict[str, Any]]] = []
    with db.transaction(conn):
        for item in items:
            error = results.get(item.id, "not attempted")
            pending_for = now - item.pending_since
            if error is None:
                conn.execute("UPDATE outbound SET state = 'delivered', delivered_at = ?, "
                             "attempts = attempts + 1, last_error = NULL WHERE id = ?",
                             (now, item.id))
                if item.late:
                    log.info("late delivery of %s to %s done after %.0f s", item.sop_instance_uid,
                             item.destination, pending_for)
                events.append((item, "acknowledged", {"status": "stored",
                                                      "attempt": item.attempts + 1}))
                continue
            failures = item.attempts + 1
            dead = pending_for >= settings.retry_horizon_s
            late = item.late or pending_for >= settings.late_after_s
            conn.execute(
                "UPDATE outbound SET state = ?, attempts = ?, last_error = ?, "
                "next_attempt_at = ?, late = ? WHERE id = ?",
                ("dead" if dead else "pending", failures, error,
                 now + backoff_delay(failures, settings.initial_backoff_s,
                                     settings.max_backoff_s), late, item.id))
            events.append((item, "send_failed", {"attempt": failures, "reason": error}))
            if dead:
                log.error("delivery of %s to %s is a dead letter after %d tries in %.0f s (%s); "
                          "`dicom-ai retry` queues it again", item.sop_instance_uid,
                          item.destination, failures, pending_for, error)
                events.append((item, "dead", {"attempts": failures, "reason": error,
                                              "pending_s": round(pending_for, 1)}))
            elif late and not item.late:
                log.warning("delivery of %s to %s is late: pending for %.0f s, %d tries (%s); "
                            "retried until %.0f s", item.sop_instance_uid, item.destination,
                            pending_for, failures, error, settings.retry_horizon_s)
                events.append((item, "late", {"attempts": failures,
                                              "pending_s": round(pending_for, 1)}))
        metrics.record_deliveries(conn, items, results, now)
    if audit_root is not None:
        for item, event, fields in events:
            _audit(audit_root, item, event, now=now, **fields)


def _audit(root: Path, item: Delivery, event: str, **fields: Any) -> None:
    if item.study_instance_uid:
        audit.record(root, item.study_instance_uid, event, destination=item.destination,
                     sop_instance_uid=item.sop_instance_uid, **fields)


class Exporter:
    """Sends due deliveries, grouped by destination.

    Parameters
    ----------
    conn:
        Connection to the index.
    root:
        ``storage.directory`` (outbound paths are relative to it).
    senders:
        Destination name → sender. Rows for a destination no longer configured are dead-lettered.
    settings:
        ``export`` settings (attempts and backoff).
    """

    def __init__(self, conn: sqlite3.Connection, root: Path, senders: Mapping[str, Sender],
                 settings: ExportSettings) -> None:
        self.conn = conn
        self.root = root
        self.senders = senders
        self.settings = settings

    def run_once(self, now: float | None = None) -> int:
        """One round over due deliveries; returns how many were attempted."""
        items = due_deliveries(self.conn, self.root, time.time() if now is None else now)
        by_destination: dict[str, list[Delivery]] = defaultdict(list)
        for item in items:
            by_destination[item.destination].append(item)
        for name, batch in by_destination.items():
            sender = self.senders.get(name)
            results: dict[int, str | None]
            if sender is None:
                results = dict.fromkeys((i.id for i in batch), "destination no longer configured")
                with db.transaction(self.conn):
                    self.conn.executemany(
                        "UPDATE outbound SET state = 'dead', last_error = ? WHERE id = ?",
                        [(results[i.id], i.id) for i in batch])
                    metrics.record_deliveries(self.conn, batch, results, time.time(),
                                              attempted=False)
                log.error("%d deliveries to %s are dead letters: destination no longer "
                          "configured", len(batch), name)
                for item in batch:
                    _audit(self.root, item, "dead", attempts=item.attempts,
                           reason="destination no longer configured")
                continue
            for item in batch:
                _audit(self.root, item, "sent", attempt=item.attempts + 1)
            try:
                results = sender.send(batch)
            except Exception as exc:
                log_failure(log, f"sending to {name} failed", exc)
                results = dict.fromkeys((i.id for i in batch), f"{type(exc).__name__} while "
                                        "sending")
            record_results(self.conn, batch, results, self.settings,
                           time.time() if now is None else now, audit_root=self.root)
            sent = sum(1 for r in results.values() if r is None)
            log.info("%s: %d of %d delivered%s", name, sent, len(batch),
                     "" if sent == len(batch) else
                     f" ({next(r for r in results.values() if r is not None)})")
        return len(items)


def retry_dead(conn: sqlite3.Connection, now: float, destination: str | None = None, *,
               audit_root: Path | None = None) -> int:
    """Give dead letters a fresh set of tries (after the destination was fixed).

    Parameters
    ----------
    conn:
        Connection to the index.
    now:
        When they become due.
    destination:
        Only this destination's dead letters; all by default.
    audit_root:
        ``storage.directory``: each row queued again is a ``requeued`` event of its study.

    Returns
    -------
    int
        How many rows are pending again.
    """
    with db.transaction(conn):
        rows = conn.execute(
            "UPDATE outbound SET state = 'pending', attempts = 0, next_attempt_at = ?, "
            "pending_since = ?, late = 0 WHERE state = 'dead' AND (? IS NULL OR destination = ?) "
            "RETURNING study_instance_uid, sop_instance_uid, destination",
            (now, now, destination, destination)).fetchall()
        # Before the commit: the running exporter cannot send (and audit "sent") a row sooner.
        if audit_root is not None:
            for study, sop, dest in rows:
                audit.record(audit_root, str(study), "requeued", now=now,
                             destination=str(dest), sop_instance_uid=str(sop))
    return len(rows)


def next_due_in(conn: sqlite3.Connection, now: float) -> float | None:
    """Seconds until the next pending delivery is due (0 if one is due); None if none pends."""
    row = conn.execute("SELECT MIN(next_attempt_at) FROM outbound WHERE state = 'pending'"
                       ).fetchone()
    return None if row is None or row[0] is None else max(0.0, float(row[0]) - now)


def exporter_main(settings: Settings, parent_pid: int) -> None:
    """Entry point of the exporter process: deliver until SIGTERM."""
    stop = child_setup(settings, parent_pid, "exporter")
    root = Path(settings.storage.directory)
    conn = db.connect(root / "index.sqlite")
    exporter = Exporter(conn, root, make_senders(settings), settings.export)
    poll = settings.worker.poll_interval_s
    while not stop.is_set() and not orphaned(parent_pid):
        exporter.run_once()
        wait = next_due_in(conn, time.time())
        stop.wait(poll if wait is None else min(poll, max(wait, 0.05)))

