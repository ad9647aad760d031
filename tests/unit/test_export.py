"""Outbound queue: backoff schedule, delivery marks, dead letters after N tries, resumption after a
restart, and the C-STORE SCU against a real pynetdicom SCP."""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.events import Event
from test_spool import encoded

from dicom_ai.config import DestinationSettings, ExportSettings
from dicom_ai.service import audit, db
from dicom_ai.service.export import (
    Delivery,
    DimseSender,
    Exporter,
    backoff_delay,
    next_due_in,
    retry_dead,
)


@pytest.mark.parametrize(("failures", "expected"), [(1, 2.0), (2, 4.0), (3, 8.0), (5, 32.0),
                                                    (9, 300.0), (30, 300.0)])
def test_backoff_doubles_from_initial_up_to_the_cap(failures: int, expected: float) -> None:
    assert backoff_delay(failures, 2.0, 300.0) == expected


class Flaky:
    """A sender whose answer per SOP Instance UID is set by the test."""

    def __init__(self, answers: dict[str, str | None]) -> None:
        self.answers = answers
        self.sent: list[str] = []

    def send(self, items: Sequence[Delivery]) -> dict[int, str | None]:
        self.sent.extend(i.sop_instance_uid for i in items)
        return {i.id: self.answers[i.sop_instance_uid] for i in items}


def queue(conn: sqlite3.Connection, *sops: str, destination: str = "pacs") -> None:
    for sop in sops:
        conn.execute("INSERT INTO outbound (job_id, study_instance_uid, sop_instance_uid, "
                     "sop_class_uid, path, destination, state, next_attempt_at, created_at) "
                     "VALUES (1, '1.2', ?, ?, ?, ?, 'pending', 0, 0)",
                     (sop, CTImageStorage, f"outputs/1.2/{sop}.dcm", destination))


def rows(conn: sqlite3.Connection) -> list[tuple[object, ...]]:
    return [tuple(r) for r in conn.execute(
        "SELECT sop_instance_uid, state, attempts, next_attempt_at, last_error FROM outbound "
        "ORDER BY id")]


@pytest.fixture
def conn(tmp_path: Path) -> Iterator[sqlite3.Connection]:
    connection = db.connect(tmp_path / "index.sqlite")
    yield connection
    connection.close()


SETTINGS = ExportSettings(initial_backoff_s=2.0, max_backoff_s=300.0)
#: A horizon of 6 s: tries at 0, 2 and 6 s, the third makes the dead letter.
SHORT = ExportSettings(initial_backoff_s=2.0, max_backoff_s=300.0, late_after_s=2.0,
                       retry_horizon_s=6.0)


def test_delivered_only_after_success_and_retried_with_backoff(conn: sqlite3.Connection,
                                                               tmp_path: Path) -> None:
    queue(conn, "1.1", "1.2")
    sender = Flaky({"1.1": None, "1.2": "C-STORE status 0xA700"})
    exporter = Exporter(conn, tmp_path, {"pacs": sender}, SETTINGS)
    assert exporter.run_once(now=1000.0) == 2
    assert rows(conn) == [("1.1", "delivered", 1, 0.0, None),
                          ("1.2", "pending", 1, 1002.0, "C-STORE status 0xA700")]
    assert next_due_in(conn, 1000.0) == 2.0
    # Not due before its backoff has passed; due after.
    assert exporter.run_once(now=1001.9) == 0
    assert exporter.run_once(now=1002.0) == 1
    assert rows(conn)[1][1:4] == ("pending", 2, 1006.0)
    assert sender.sent == ["1.1", "1.2", "1.2"]


def test_late_then_dead_letter_at_the_horizon_and_never_again(
        conn: sqlite3.Connection, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="dicom_ai.service.export")
    queue(conn, "2.1")
    reason = "association rejected: Calling AE title not recognised"
    sender = Flaky({"2.1": reason})
    exporter = Exporter(conn, tmp_path, {"pacs": sender}, SHORT)
    levels = []
    for now in (0.0, 2.0, 6.0):
        caplog.clear()
        assert exporter.run_once(now=now) == 1
        levels.append(sorted({r.levelname for r in caplog.records
                              if r.name == "dicom_ai.service.export"}))
    # First try: a plain failure; at 2 s it becomes late (WARNING, once); at 6 s dead (ERROR).
    assert levels == [["INFO"], ["INFO", "WARNING"], ["ERROR", "INFO"]]
    assert rows(conn)[0][1:3] == ("dead", 3)
    assert rows(conn)[0][4] == reason
    assert exporter.run_once(now=10**9) == 0
    assert next_due_in(conn, 10**9) is None
    assert sender.sent == ["2.1"] * 3


def test_default_horizon_retries_through_a_day_of_downtime(conn: sqlite3.Connection,
                                                          tmp_path: Path) -> None:
    """A PACS down for 23 hours: still pending, tried every max_backoff_s; then delivered."""
    queue(conn, "2.2")
    sender = Flaky({"2.2": "cannot connect"})
    exporter = Exporter(conn, tmp_path, {"pacs": sender}, ExportSettings())
    now = 0.0
    for _ in range(400):
        exporter.run_once(now=now)
        due = next_due_in(conn, now)
        assert due is not None
        now += due
        if now > 23 * 3600:
            break
    assert rows(conn)[0][1] == "pending"
    assert 23 * 3600 / 300 < len(sender.sent) < 400
    sender.answers["2.2"] = None
    exporter.run_once(now=now)
    assert rows(conn)[0][1] == "delivered"


def test_destination_removed_from_config_is_dead_lettered(conn: sqlite3.Connection,
                                                          tmp_path: Path) -> None:
    queue(conn, "3.1", destination="old-pacs")
    Exporter(conn, tmp_path, {}, SETTINGS).run_once(now=0.0)
    assert rows(conn)[0][1] == "dead"
    assert rows(conn)[0][4] == "destination no longer configured"


def test_sender_exception_counts_as_a_failed_try(conn: sqlite3.Connection,
                                                 tmp_path: Path) -> None:
    class Broken:
        def send(self, items: Sequence[Delivery]) -> dict[int, str | None]:
            raise ConnectionResetError

    queue(conn, "4.1")
    Exporter(conn, tmp_path, {"pacs": Broken()}, SETTINGS).run_once(now=0.0)
    assert rows(conn)[0][1:5] == ("pending", 1, 2.0, "ConnectionResetError while sending")


def test_restart_resumes_pending_and_skips_delivered(tmp_path: Path) -> None:
    first = db.connect(tmp_path / "index.sqlite")
    queue(first, "5.1", "5.2")
    Exporter(first, tmp_path, {"pacs": Flaky({"5.1": None, "5.2": "cannot connect"})},
             SETTINGS).run_once(now=0.0)
    first.close()
    # A new process (a restarted service) with a new connection continues where it stopped.
    second = db.connect(tmp_path / "index.sqlite")
    sender = Flaky({"5.1": None, "5.2": None})
    Exporter(second, tmp_path, {"pacs": sender}, SETTINGS).run_once(now=2.0)
    assert sender.sent == ["5.2"]
    assert [r[1] for r in rows(second)] == ["delivered", "delivered"]


@pytest.fixture
def storage_scp() -> Iterator[tuple[int, list[int], list[str]]]:
    """A pynetdicom storage SCP answering the statuses the test puts in ``answers``."""
    answers: list[int] = []
    received: list[str] = []

    def on_store(event: Event) -> int:
        received.append(str(event.dataset.SOPInstanceUID))
        return answers.pop(0) if answers else 0x0000

    ae = AE(ae_title="PACS")
    ae.add_supported_context(CTImageStorage, ExplicitVRLittleEndian)
    server = ae.start_server(("127.0.0.1", 0), block=False,
                             evt_handlers=[(evt.EVT_C_STORE, on_store)])
    assert server is not None
    yield int(server.server_address[1]), answers, received
    server.shutdown()


def test_dimse_sender_maps_statuses(storage_scp: tuple[int, list[int], list[str]],
                                    tmp_path: Path) -> None:
    port, answers, received = storage_scp
    items = []
    for n, sop in enumerate(("6.1", "6.2", "6.3"), start=1):
        path = tmp_path / f"{sop}.dcm"
        path.write_bytes(encoded(sop))
        items.append(Delivery(n, path, sop, CTImageStorage, "pacs", 0))
    answers.extend([0x0000, 0xA700, 0xB007])
    dest = DestinationSettings(name="pacs", ae_title="PACS", host="127.0.0.1", port=port)
    assert DimseSender(dest, "DICOMAI").send(items) == {
        1: None, 2: "C-STORE status 0xA700", 3: None}
    assert received == ["6.1", "6.2", "6.3"]


def test_dimse_sender_reports_a_closed_port(tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dest = DestinationSettings(name="pacs", ae_title="PACS", host="127.0.0.1", port=port)
    item = Delivery(1, tmp_path / "x.dcm", "7.1", CTImageStorage, "pacs", 0)
    assert DimseSender(dest, "DICOMAI").send([item]) == {1: "cannot connect"}


def test_retry_dead_revives_only_the_chosen_destination(conn: sqlite3.Connection) -> None:
    queue(conn, "8.1", destination="pacs")
    queue(conn, "8.2", destination="archive")
    conn.execute("UPDATE outbound SET state = 'dead', attempts = 6")
    assert retry_dead(conn, 50.0, "pacs") == 1
    # The horizon starts again from the re-queue.
    assert conn.execute("SELECT pending_since FROM outbound WHERE sop_instance_uid = '8.1'"
                        ).fetchone()[0] == 50.0
    assert rows(conn)[0][:4] == ("8.1", "pending", 0, 50.0)
    assert rows(conn)[1][1] == "dead"
    assert retry_dead(conn, 60.0) == 1


def test_a_rejection_is_reported_even_when_the_peer_closes_at_once(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A PACS that rejects and closes at once. pynetdicom's ACSE thread may look at the socket
    only after its reactor has closed it, and then reports a failed connection (the race behind
    a flaky integration test): the ACSE thread is delayed here so that it always loses."""
    import socket
    import threading
    import time

    from pynetdicom.acse import ACSE

    rejection = bytes((0x03, 0, 0, 0, 0, 4, 0, 1, 1, 3))  # permanent, user, calling AE title
    server = socket.create_server(("127.0.0.1", 0))

    def reject_once() -> None:
        conn, _ = server.accept()
        with conn:
            conn.settimeout(5)
            conn.recv(65536)
            conn.sendall(rejection)

    thread = threading.Thread(target=reject_once)
    thread.start()
    send_request = ACSE.send_request

    def slow_send_request(self: ACSE) -> None:
        send_request(self)
        time.sleep(0.5)

    monkeypatch.setattr(ACSE, "send_request", slow_send_request)
    dest = DestinationSettings(name="pacs", ae_title="PACS", host="127.0.0.1",
                               port=server.getsockname()[1])
    item = Delivery(1, tmp_path / "x.dcm", "7.2", CTImageStorage, "pacs", 0)
    try:
        assert DimseSender(dest, "DICOMAI").send([item]) == {
            1: "association rejected: Calling AE title not recognised"}
    finally:
        thread.join(5)
        server.close()


def test_every_try_and_outcome_is_in_the_study_audit_trail(conn: sqlite3.Connection,
                                                           tmp_path: Path) -> None:
    queue(conn, "3.1")
    queue(conn, "3.2", destination="gone")
    sender = Flaky({"3.1": "cannot connect"})
    exporter = Exporter(conn, tmp_path, {"pacs": sender}, SHORT)
    for now in (0.0, 2.0, 6.0):
        exporter.run_once(now=now)
    assert retry_dead(conn, 7.0, "pacs", audit_root=tmp_path) == 1
    sender.answers["3.1"] = None
    exporter.run_once(now=7.0)
    trail = [(e["event"], e["sop_instance_uid"], e["destination"], e.get("attempt"),
              e.get("reason") or e.get("status"))
             for e in audit.read_events(tmp_path, "1.2")]
    assert trail == [
        ("sent", "3.1", "pacs", 1, None),
        ("send_failed", "3.1", "pacs", 1, "cannot connect"),
        ("dead", "3.2", "gone", None, "destination no longer configured"),
        ("sent", "3.1", "pacs", 2, None),
        ("send_failed", "3.1", "pacs", 2, "cannot connect"),
        ("late", "3.1", "pacs", None, None),
        ("sent", "3.1", "pacs", 3, None),
        ("send_failed", "3.1", "pacs", 3, "cannot connect"),
        ("dead", "3.1", "pacs", None, "cannot connect"),
        ("requeued", "3.1", "pacs", None, None),
        ("sent", "3.1", "pacs", 1, None),
        ("acknowledged", "3.1", "pacs", 1, "stored"),
    ]
