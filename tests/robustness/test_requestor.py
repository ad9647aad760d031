"""pynetdicom's requestor loses a response to its own reactor thread on a loaded machine; the
checkpoint of :mod:`dicom_ai.service.requestor` closes the race.

The race needs two threads to be scheduled late, which CPU load does now and then (the disk-full
fault test timed out about once in twenty runs). Here both delays are made certain: the reactor
sleeps 0.1 s each time its checkpoint lets it through (a thread woken but not yet running), and the
sender sleeps 0.3 s before it takes a response off the queue. With pynetdicom's own checkpoint the
second C-STORE's response is taken by the reactor; with ours every response reaches its request.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from scp_peer import ct_dataset

from dicom_ai.config import Settings
from dicom_ai.service.requestor import ReactorCheckpoint, associate
from dicom_ai.service.scp import Listener, start_scp
from dicom_ai.service.spool import Spool

#: Seconds the reactor sleeps after its checkpoint lets it through.
REACTOR_LATE_S = 0.1
#: Seconds the sender sleeps before it takes a response off the queue.
SENDER_LATE_S = 0.3


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[Listener]:
    settings = Settings()
    settings.scp.port = 0
    spool = Spool(tmp_path / "storage")
    running = start_scp(settings, spool)
    try:
        yield running
    finally:
        running.stop(grace_s=1.0)
        spool.close()


@pytest.fixture
def late_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    get_msg = DIMSEServiceProvider.get_msg

    def late_get(self: DIMSEServiceProvider, block: bool = False) -> Any:
        if block:
            time.sleep(SENDER_LATE_S)
        return get_msg(self, block)

    monkeypatch.setattr(DIMSEServiceProvider, "get_msg", late_get)


def late_reactor(assoc: Association) -> None:
    """Make the reactor of ``assoc`` run late after each pass of its checkpoint."""
    checkpoint = assoc._reactor_checkpoint
    wait: Callable[[float | None], bool] = checkpoint.wait

    def late_wait(timeout: float | None = None) -> bool:
        passed = wait(timeout)
        if threading.current_thread() is assoc:
            time.sleep(REACTOR_LATE_S)
        return passed

    checkpoint.wait = late_wait  # type: ignore[method-assign]


def store_four(assoc: Association) -> list[int | None]:
    statuses: list[int | None] = []
    for n in range(4):
        if not assoc.is_established:
            break
        rsp = assoc.send_c_store(ct_dataset(f"1.2.3.77.{n}"))
        statuses.append(getattr(rsp, "Status", None))
    if assoc.is_established:
        assoc.release()
    return statuses


def modality() -> AE:
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    ae.dimse_timeout = 2
    return ae


@pytest.mark.usefixtures("late_threads")
def test_pynetdicom_checkpoint_loses_a_response_when_threads_run_late(
        listener: Listener, caplog: pytest.LogCaptureFixture) -> None:
    """The control: the delays do reproduce the race (and pynetdicom still has it)."""
    caplog.set_level(logging.WARNING, logger="pynetdicom")
    assoc = modality().associate("127.0.0.1", int(listener.server_address[1]),
                                 ae_title="DICOMAI")
    assert assoc.is_established
    late_reactor(assoc)
    statuses = store_four(assoc)
    assert statuses[0] == 0x0000
    assert None in statuses
    assert "Received unexpected C-STORE service message" in caplog.text


@pytest.mark.usefixtures("late_threads")
def test_reactor_checkpoint_keeps_every_response(
        listener: Listener, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="pynetdicom")
    assoc = associate(modality(), "127.0.0.1", int(listener.server_address[1]),
                      ae_title="DICOMAI")
    assert assoc.is_established
    assert isinstance(assoc._reactor_checkpoint, ReactorCheckpoint)
    late_reactor(assoc)
    assert store_four(assoc) == [0x0000] * 4
    assert "unexpected" not in caplog.text
