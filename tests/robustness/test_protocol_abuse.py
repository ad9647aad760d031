"""Protocol abuse against the listener, in the spirit of DICOM SCP attack tools: PDUs out of order,
lying lengths, truncation, aborts mid-data-set, slow and idle peers, a connection flood, and invalid
bytes in every field of the C-STORE command set.

After each, the checks of :mod:`scp_peer`: an instance is indexed exactly when it was acknowledged,
nothing half-written is left or indexed, no traceback and no patient identity reach the log, no
thread dies with an exception, memory stays bounded, and a well-behaved modality still stores.
Loopback only; every loop is bounded in count and time.
"""

from __future__ import annotations

import contextlib
import logging
import select
import socket
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from scp_peer import (
    RawAssociation,
    assert_clean_log,
    assert_consistent,
    associate_rq,
    command_set,
    ct_dataset,
    dataset_bytes,
    fragments,
    indexed,
    pdata,
    response_status,
    soon,
    store_fields,
    store_with_pynetdicom,
)

from dicom_ai.config import Settings
from dicom_ai.service.scp import CONNECTIONS_PER_SLOT, SPOOL_AFTER, Listener, start_scp
from dicom_ai.service.spool import Spool
from dicom_ai.service.ul import AbortReason, PDUType, PeerClosed, abort_pdu, read_pdu

#: Short limits so that the slow and idle cases end within seconds.
NETWORK_TIMEOUT_S = 1.0
REQUEST_TIMEOUT_S = 1.0
DEADLINE_S = 3.0


@dataclass
class Running:
    listener: Listener
    spool: Spool
    port: int
    root: Path


@pytest.fixture
def scp(tmp_path: Path, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> Iterator[Running]:
    caplog.set_level(logging.DEBUG)
    died: list[BaseException | None] = []
    monkeypatch.setattr(threading, "excepthook", lambda args: died.append(args.exc_value))
    settings = Settings()
    settings.scp.port = 0
    settings.scp.network_timeout = NETWORK_TIMEOUT_S
    settings.scp.request_timeout_s = REQUEST_TIMEOUT_S
    settings.scp.association_deadline_s = DEADLINE_S
    settings.scp.maximum_associations = 4
    settings.scp.maximum_associations_per_ae = 2
    settings.scp.maximum_pdu_size = 16384
    settings.storage.minimum_free_mb = 1
    spool = Spool(tmp_path / "storage")
    listener = start_scp(settings, spool)
    running = Running(listener, spool, int(listener.server_address[1]), spool.root)
    yield running
    listener.stop(grace_s=1.0)
    spool.close()
    assert not died, f"a thread died: {died!r}"
    assert_clean_log(caplog.text)


class RawSocket(RawAssociation):
    """A connection that has not associated."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)


def still_serving(running: Running, sop: str) -> None:
    """A well-behaved modality stores an instance, and the storage is consistent."""
    outcomes = store_with_pynetdicom(running.port, [sop])
    assert outcomes[0].acknowledged
    assert_consistent(running.root, [sop])


def expect_abort(sock: socket.socket, reason: AbortReason) -> None:
    assert read_pdu(sock, 64, soon()).raw == abort_pdu(reason)


def test_pdata_before_association(scp: Running) -> None:
    with socket.create_connection(("127.0.0.1", scp.port), timeout=5) as sock:
        sock.sendall(pdata(b"\0" * 10, command=True))
        expect_abort(sock, AbortReason.UNEXPECTED_PDU)
    still_serving(scp, "1.2.3.1")


def test_double_associate_request(scp: Running) -> None:
    with RawAssociation(scp.port) as peer:
        peer.send(associate_rq())
        expect_abort(peer.sock, AbortReason.UNEXPECTED_PDU)
    still_serving(scp, "1.2.3.2")


@pytest.mark.parametrize("associated", [False, True])
def test_huge_pdu_is_refused_before_allocation(scp: Running, associated: bool) -> None:
    before = resident_bytes()
    for pdu_type in (PDUType.A_ASSOCIATE_RQ, PDUType.P_DATA_TF):
        header = struct.pack(">BxL", pdu_type, 0xFFFFFFF0)
        with (RawAssociation(scp.port) if associated else RawSocket(scp.port)) as peer:
            peer.send(header)
            assert peer.read().type == PDUType.A_ABORT
    assert resident_bytes() - before < 64 << 20
    still_serving(scp, f"1.2.3.3{int(associated)}")


def test_truncated_pdus_and_command_sets(scp: Running) -> None:
    # A PDU shorter than its header says, then the connection closed.
    with RawAssociation(scp.port) as peer:
        peer.send(struct.pack(">BxL", PDUType.P_DATA_TF, 1000) + b"\0" * 10)
    # A PDV item longer than its PDU.
    with RawAssociation(scp.port) as peer:
        peer.send(struct.pack(">BxL", PDUType.P_DATA_TF, 8) + struct.pack(">LBB", 100, 1, 3)
                  + b"xx")
        expect_abort(peer.sock, AbortReason.INVALID_PDU_PARAMETER_VALUE)
    # A command set cut in the middle of an element.
    with RawAssociation(scp.port) as peer:
        peer.send(pdata(command_set(store_fields("1.2.3.40"))[:30], command=True))
        expect_abort(peer.sock, AbortReason.INVALID_PDU_PARAMETER_VALUE)
    # A command set that never ends (no last fragment) is cut off, not buffered without bound.
    with RawAssociation(scp.port) as peer:
        for _ in range(20):
            peer.send(pdata(b"\0" * 8000, command=True, last=False))
        expect_abort(peer.sock, AbortReason.INVALID_PDU_PARAMETER_VALUE)
    assert not indexed(scp.root)
    still_serving(scp, "1.2.3.4")


@pytest.mark.parametrize("how", ["abort", "close"])
@pytest.mark.parametrize("size", ["small", "spooled"])
def test_peer_gone_mid_data_set_leaves_nothing(scp: Running, how: str, size: str) -> None:
    # 2 bytes a pixel: 80 kB (several fragments, kept in memory) or twice the spool threshold.
    pixels = 40000 if size == "small" else SPOOL_AFTER
    data = dataset_bytes(ct_dataset("1.2.3.50", pixels=pixels))
    with RawAssociation(scp.port) as peer:
        peer.send(pdata(command_set(store_fields("1.2.3.50")), command=True))
        parts = list(fragments(data))
        for part in parts[:max(1, len(parts) * 3 // 4)]:
            peer.send(part)
        if how == "abort":
            peer.send(bytes((0x07, 0, 0, 0, 0, 4, 0, 0, 0, 0)))
        time.sleep(0.2)
    deadline = time.monotonic() + 5
    while list(scp.spool.tmp.iterdir()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not indexed(scp.root)
    still_serving(scp, "1.2.3.5")


def test_slow_peer_is_cut_off_at_the_association_deadline(scp: Running) -> None:
    """Each byte comes well within network_timeout; the overall deadline still ends it."""
    data = pdata(command_set(store_fields("1.2.3.60")), command=True) * 10
    started = time.monotonic()
    with RawAssociation(scp.port) as peer:
        for byte in data[:int((DEADLINE_S + 5) / (NETWORK_TIMEOUT_S / 4))]:
            peer.send(bytes((byte,)))
            if select.select([peer.sock], [], [], NETWORK_TIMEOUT_S / 4)[0]:
                break
        elapsed = time.monotonic() - started
        expect_abort(peer.sock, AbortReason.NOT_SPECIFIED)
    assert DEADLINE_S - 0.5 < elapsed < DEADLINE_S + 2
    still_serving(scp, "1.2.3.6")


def test_slow_request_is_cut_off(scp: Running) -> None:
    """An A-ASSOCIATE-RQ trickled a byte at a time: the connection is aborted after
    request_timeout_s."""
    started = time.monotonic()
    with RawSocket(scp.port) as peer:
        for byte in associate_rq()[:int((REQUEST_TIMEOUT_S + 5) / 0.2)]:
            peer.send(bytes((byte,)))
            if select.select([peer.sock], [], [], 0.2)[0]:
                break
        elapsed = time.monotonic() - started
        assert peer.read().type == PDUType.A_ABORT
    assert elapsed < REQUEST_TIMEOUT_S + 2
    still_serving(scp, "1.2.3.7")


def test_idle_peers_holding_slots_do_not_lock_out_a_modality(scp: Running) -> None:
    """A peer opens as many associations as it may, and more, and leaves them idle."""
    held = [RawAssociation(scp.port, calling="IDLER") for _ in range(2)]
    try:
        with socket.create_connection(("127.0.0.1", scp.port), timeout=5) as third:
            third.sendall(associate_rq("IDLER"))
            assert read_pdu(third, 64, soon()).type == PDUType.A_ASSOCIATE_RJ
        outcomes = store_with_pynetdicom(scp.port, ["1.2.3.80", "1.2.3.81"])
        assert all(o.acknowledged for o in outcomes)
    finally:
        for peer in held:
            peer.close()
    # The idle ones are aborted after network_timeout anyway.
    assert_consistent(scp.root, ["1.2.3.80", "1.2.3.81"])


def test_connection_flood_is_bounded(scp: Running) -> None:
    """Connections that never associate: those beyond the limit are closed at once, the rest
    after request_timeout_s; then a modality stores again."""
    limit = CONNECTIONS_PER_SLOT * 4
    flood = [socket.create_connection(("127.0.0.1", scp.port), timeout=5)
             for _ in range(limit + 10)]
    try:
        time.sleep(0.3)
        closed = 0
        for sock in flood:
            sock.settimeout(0.05)
            with contextlib.suppress(TimeoutError, ConnectionError):
                closed += sock.recv(1) == b""
        assert closed >= 10
        deadline = time.monotonic() + REQUEST_TIMEOUT_S + 10
        while not (outcome := store_with_pynetdicom(scp.port, ["1.2.3.90"]))[0].acknowledged:
            assert time.monotonic() < deadline, "the flood kept the modality out"
            time.sleep(0.2)
        assert outcome[0].acknowledged
    finally:
        for sock in flood:
            sock.close()
    assert_consistent(scp.root, ["1.2.3.90"])


#: Bad values for one field: a non-ASCII byte, all NUL, a lying length, too short, absent.
MUTATIONS = ["non-ascii", "nul", "overlong-length", "short", "absent"]


@pytest.mark.parametrize("tag", [*store_fields("1.2.3"), 0x00000000])
def test_invalid_bytes_in_every_command_field(scp: Running, tag: int) -> None:
    """Each field of a C-STORE-RQ, each mutation: answered by a status or an A-ABORT; an
    instance is indexed if and only if it was acknowledged."""
    for n, mutation in enumerate(MUTATIONS):
        sop = f"1.2.3.100.{tag & 0xFFFF}.{n}"
        fields = store_fields(sop)
        lengths: dict[int, int] = {}
        group_length = None
        if tag == 0x00000000:
            group_length = {"non-ascii": 0xFFFFFFFF, "nul": 0, "overlong-length": 1 << 30,
                            "short": 3, "absent": 12}[mutation]
        elif mutation == "non-ascii":
            fields[tag] = fields[tag][:-2] + b"\xe9\xff"
        elif mutation == "nul":
            fields[tag] = b"\0" * len(fields[tag])
        elif mutation == "overlong-length":
            lengths[tag] = len(fields[tag]) + 1000
        elif mutation == "short":
            fields[tag] = fields[tag][:1]
        else:
            del fields[tag]
        data = dataset_bytes(ct_dataset(sop))
        with RawAssociation(scp.port) as peer:
            try:
                peer.send(pdata(command_set(fields, lengths, group_length), command=True))
                for part in fragments(data):
                    peer.send(part)
                answer = peer.read()
            except (PeerClosed, ConnectionError):
                answer = None
        status = None if answer is None else response_status(answer)
        assert answer is None or status is not None or answer.type == PDUType.A_ABORT
        assert (status == 0x0000) == (sop in indexed(scp.root)), (mutation, status)
    assert_consistent(scp.root, list(indexed(scp.root)))
    still_serving(scp, f"1.2.3.101.{tag & 0xFFFF}")


def test_non_ascii_uid_in_the_command_is_refused_cleanly(scp: Running,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    """The case that once killed the association thread with UnicodeEncodeError after the
    instance was stored and indexed: now a failure status, nothing stored, the association
    carries on."""
    sop = "1.2.3.110"
    fields = store_fields(sop)
    fields[0x00001000] = sop.encode() + b"\xe9\0"
    with RawAssociation(scp.port) as peer:
        peer.send(pdata(command_set(fields), command=True))
        for part in fragments(dataset_bytes(ct_dataset(sop))):
            peer.send(part)
        status = response_status(peer.read())
        assert status is not None and 0xC000 <= status <= 0xCFFF
        # The same association stores the next, valid instance.
        peer.send(pdata(command_set(store_fields("1.2.3.111", message_id=2)), command=True))
        for part in fragments(dataset_bytes(ct_dataset("1.2.3.111"))):
            peer.send(part)
        assert response_status(peer.read()) == 0x0000
    assert set(indexed(scp.root)) == {"1.2.3.111"}
    assert "UnicodeEncodeError" not in caplog.text
    still_serving(scp, "1.2.3.112")


def test_wrong_called_title_and_garbage_associate_request(scp: Running) -> None:
    garbage = bytearray(associate_rq())
    garbage[10:] = b"\xff" * (len(garbage) - 10)
    for request, answer in ((associate_rq(called="NOTUS"), PDUType.A_ASSOCIATE_RJ),
                            (bytes(garbage), PDUType.A_ABORT)):
        with RawSocket(scp.port) as peer:
            peer.send(request)
            assert peer.read().type == answer
    still_serving(scp, "1.2.3.120")


def resident_bytes() -> int:
    """This process's resident memory (Linux ``/proc``; 0 elsewhere, and the check is moot)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except OSError:
        return 0
    import os

    return pages * os.sysconf("SC_PAGE_SIZE")
