"""Faults: the service killed with SIGKILL while receiving, processing and exporting; an analysis
that never returns; the disk full on a small tmpfs; the PACS down for longer than the backoff.

The service runs as it does in production — :class:`~dicom_ai.service.server.Service` in its own
process with its worker and exporter processes — with a processor that takes a known time (the
models are not what is tested here) and a pynetdicom storage SCP in the test process as the PACS.
Only the service process is killed, so that its children must end by themselves. Each test
asserts: every acknowledged instance is indexed and whole after the restart, nothing half-written
is indexed or left, no child outlives the service, each result reaches the PACS, no traceback and
no identity in the log. Loopback only; every loop is bounded in count and time.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import random
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from multiprocessing.context import SpawnProcess
from pathlib import Path
from typing import Any, TypeVar

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage
from pynetdicom import AE, evt
from pynetdicom.events import Event
from scp_peer import (
    Outcome,
    assert_clean_log,
    assert_consistent,
    ct_dataset,
    indexed,
    store_with_pynetdicom,
)

from dicom_ai.config import DestinationSettings, ExportSettings, Settings
from dicom_ai.service import db
from dicom_ai.service.export import DimseSender, Exporter
from dicom_ai.service.requestor import associate
from dicom_ai.service.scp import start_scp
from dicom_ai.service.spool import Spool, durable_write
from dicom_ai.service.worker import ProcessedStudy, Processor, encode

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="kill -9 semantics and /proc are Linux")

T = TypeVar("T")
#: Seconds the test processor spends on a study.
PROCESSING_S = 2.0
#: Peak resident memory allowed to the service process (listener, assembler, supervisor) and to
#: each of its children (the worker runs the timed processor here, not the models).
SERVICE_RSS_BOUND_MIB = 400


def wait_for(what: str, probe: Callable[[], T | None], timeout: float = 30.0) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.05)


def timed_processor(settings: Settings) -> Processor:
    """The worker's processor in these tests: ``PROCESSING_S`` per study, then one SC result per
    source series with a UID derived from the series (deterministic, like the real results).
    While ``hang`` exists in the storage directory it never returns (a hung decoder)."""
    hang = Path(settings.storage.directory) / "hang"

    def process(paths: Sequence[Path]) -> ProcessedStudy:
        while hang.exists():
            time.sleep(0.05)
        time.sleep(PROCESSING_S)
        import pydicom

        results = []
        for series in sorted({str(pydicom.dcmread(p, stop_before_pixels=True).SeriesInstanceUID)
                              for p in paths}):
            ds = Dataset()
            ds.SOPClassUID = SecondaryCaptureImageStorage
            ds.SOPInstanceUID = series + ".999"
            ds.StudyInstanceUID = series.rsplit(".", 1)[0]
            ds.SeriesInstanceUID = series + ".998"
            ds.Modality = "OT"
            ds.Manufacturer = "dicom-ai"
            ds.file_meta = pydicom.dataset.FileMetaDataset()
            ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
            results.append(ds)
        return ProcessedStudy(results)

    return process


def run_service(settings: Settings, log_path: str) -> None:
    """Target of the service process: its stderr (and its children's) go to ``log_path``."""
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.dup2(fd, 2)
    from dicom_ai.logs import configure_logging
    from dicom_ai.service.server import Service

    configure_logging(settings.log_level)
    sys.exit(Service(settings, processor_factory=timed_processor).run())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def children_of(pid: int) -> list[int]:
    """Live (not zombie) processes whose parent is ``pid``."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:
            continue
        if fields[1] == str(pid) and fields[0] != "Z":
            found.append(int(stat.parent.name))
    return found


def peak_rss_mib(pid: int) -> float:
    """VmHWM of a live process, MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM in /proc status")


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state != "Z"


class Pacs:
    """A pynetdicom storage SCP: records each SOP Instance UID it stores (and may be slow)."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.received: list[str] = []
        self.started = threading.Event()
        self.delay_s = delay_s
        ae = AE(ae_title="PACS")
        ae.add_supported_context(SecondaryCaptureImageStorage, ExplicitVRLittleEndian)
        self.server = ae.start_server(("127.0.0.1", 0), block=False,
                                      evt_handlers=[(evt.EVT_C_STORE, self._store)])
        self.port = int(self.server.server_address[1])

    def _store(self, event: Event) -> int:
        self.started.set()
        time.sleep(self.delay_s)
        self.received.append(str(event.dataset.SOPInstanceUID))
        return 0x0000

    def stop(self) -> None:
        self.server.shutdown()


class ServiceRun:
    """The service in a spawned process, started, killed and restarted by the test."""

    def __init__(self, root: Path, pacs_port: int) -> None:
        self.root = root / "storage"
        self.log = root / "serve.log"
        self.settings = Settings()
        self.settings.scp.port = free_port()
        self.settings.storage.directory = str(self.root)
        self.settings.storage.minimum_free_mb = 1
        self.settings.studies.quiet_period_s = 0.3
        self.settings.worker.poll_interval_s = 0.1
        self.settings.export.initial_backoff_s = 0.2
        self.settings.export.max_backoff_s = 0.5
        self.settings.export.destinations = [DestinationSettings(
            name="pacs", ae_title="PACS", host="127.0.0.1", port=pacs_port)]
        self.process: SpawnProcess | None = None
        #: The peak resident memory of the service process and of each child at each kill.
        self.peak_rss_mib: list[float] = []

    @property
    def port(self) -> int:
        return self.settings.scp.port

    def start(self) -> None:
        """Start the service and return once it listens and has started its children: the
        listener opens before the worker and exporter do, and a test that counts children
        must not count them before they exist."""
        started = self.children_started()
        ctx = multiprocessing.get_context("spawn")
        self.process = ctx.Process(target=run_service, args=(self.settings, str(self.log)))
        self.process.start()

        def listening() -> bool:
            assert self.process is not None
            if not self.process.is_alive():
                pytest.fail(f"service exited: {self.log.read_text()[-3000:]}")
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", self.port)) == 0

        wait_for("the listener", listening, timeout=60)
        wait_for("the worker and exporter", lambda: self.children_started() > started,
                 timeout=60)

    def children_started(self) -> int:
        """How many times a service has logged its exporter started, the last child it starts."""
        if not self.log.exists():
            return 0
        return self.log.read_text(errors="replace").count("exporter process started")

    def kill9(self) -> None:
        """SIGKILL the service process only; its worker and exporter must end by themselves."""
        assert self.process is not None and self.process.pid is not None
        children = children_of(self.process.pid)
        assert len(children) >= 2, "worker and exporter not found"
        self.peak_rss_mib.extend(peak_rss_mib(pid) for pid in [self.process.pid, *children])
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.join(10)
        wait_for("the children to end with the service",
                 lambda: not any(alive(c) for c in children), timeout=10)

    def stop(self) -> None:
        if self.process is not None and self.process.is_alive():
            self.process.terminate()
            self.process.join(40)
            if self.process.is_alive():
                self.process.kill()
                self.process.join()
            assert self.process.exitcode == 0

    def assert_bounded_and_contained(self) -> None:
        """Every process stayed under the memory bound, and nothing was written beside the
        storage directory and the log."""
        print(f"peak RSS at the kills (service, children): {self.peak_rss_mib} MiB")
        assert self.peak_rss_mib and max(self.peak_rss_mib) < SERVICE_RSS_BOUND_MIB
        assert {p.name for p in self.root.parent.iterdir()} == {"storage", "serve.log"}

    def index(self, sql: str) -> list[tuple[Any, ...]]:
        conn = sqlite3.connect(self.root / "index.sqlite")
        try:
            return [tuple(r) for r in conn.execute(sql)]
        finally:
            conn.close()


@pytest.fixture
def pacs() -> Iterator[Pacs]:
    peer = Pacs()
    yield peer
    peer.stop()


@pytest.fixture
def service(tmp_path: Path, pacs: Pacs) -> Iterator[ServiceRun]:
    run = ServiceRun(tmp_path, pacs.port)
    yield run
    run.stop()
    text = run.log.read_text() if run.log.exists() else ""
    assert_clean_log(text)


def test_kill9_while_receiving_loses_nothing_acknowledged(service: ServiceRun) -> None:
    rng = random.Random(11)
    acknowledged: set[str] = set()
    service.start()
    for trial in range(2):
        outcomes: list[Outcome] = []
        sops = [f"1.2.3.{trial}.{n}" for n in range(60)]

        def send(sops: list[str] = sops, outcomes: list[Outcome] = outcomes) -> None:
            outcomes.extend(store_with_pynetdicom(service.port, sops))

        sender = threading.Thread(target=send)
        sender.start()
        time.sleep(rng.uniform(0.2, 1.0))
        service.kill9()
        sender.join(30)
        acknowledged |= {o.sop_instance_uid for o in outcomes if o.acknowledged}
        service.start()  # recovery: partial files dropped, whole ones indexed
        assert_consistent(service.root, acknowledged)
    assert acknowledged, "nothing was acknowledged before the kills"
    service.stop()
    assert_consistent(service.root, acknowledged)
    service.assert_bounded_and_contained()


def test_kill9_while_processing_resumes_the_job(service: ServiceRun, pacs: Pacs) -> None:
    service.start()
    assert all(o.acknowledged for o in store_with_pynetdicom(service.port, ["1.2.3.9.1"]))
    wait_for("the job running", lambda: service.index(
        "SELECT COUNT(*) FROM jobs WHERE state = 'running'")[0][0] == 1)
    time.sleep(PROCESSING_S / 2)
    service.kill9()
    assert service.index("SELECT state FROM jobs") == [("running",)]
    service.start()
    wait_for("the job done and its result delivered", lambda: service.index(
        "SELECT COUNT(*) FROM outbound WHERE state = 'delivered'")[0][0] == 1)
    assert service.index("SELECT state, attempts FROM jobs") == [("done", 2)]
    assert pacs.received == [service.index("SELECT sop_instance_uid FROM outbound")[0][0]]
    service.assert_bounded_and_contained()


def test_a_hung_analysis_is_stopped_and_reprocessed_once_fixed(service: ServiceRun,
                                                                pacs: Pacs) -> None:
    """A job that never returns holds its worker until ``worker.job_timeout_s``: then the
    worker is replaced and the study fails with the reason; once the cause is gone,
    ``dicom-ai reprocess`` has the fresh worker analyse it, and its result is delivered."""
    service.settings.worker.job_timeout_s = 6.0
    service.root.mkdir(parents=True, exist_ok=True)
    (service.root / "hang").touch()
    service.start()
    assert service.process is not None and service.process.pid is not None
    before = set(children_of(service.process.pid))
    assert all(o.acknowledged for o in store_with_pynetdicom(service.port, ["1.2.3.9.1"]))
    wait_for("the hung job failed", lambda: service.index(
        "SELECT state, last_error FROM jobs") == [(
            "failed", "analysis ran past worker.job_timeout_s (6 s); the worker was stopped")],
        timeout=60)
    assert len(before - set(children_of(service.process.pid))) == 1, "one worker replaced"
    (service.root / "hang").unlink()
    study = service.index("SELECT study_instance_uid FROM studies")[0][0]
    config = service.root.parent / "settings.toml"
    config.write_text(f'[storage]\ndirectory = "{service.root}"\n')
    done = subprocess.run([sys.executable, "-m", "dicom_ai.cli", "reprocess", study, "--config",
                           str(config)], capture_output=True, text=True, check=True)
    assert "queued (its job was failed)" in done.stdout
    wait_for("the study analysed again and delivered", lambda: service.index(
        "SELECT COUNT(*) FROM outbound WHERE state = 'delivered'")[0][0] == 1, timeout=60)
    assert service.index("SELECT generation, state, attempts FROM jobs") == [(1, "done", 1)]
    assert "ran past worker.job_timeout_s (6 s)" in service.log.read_text()
    config.unlink()


def test_kill9_while_exporting_delivers_every_result(tmp_path: Path) -> None:
    slow = Pacs(delay_s=1.0)
    run = ServiceRun(tmp_path, slow.port)
    try:
        run.start()
        sops = [f"1.2.3.10.{n}" for n in range(3)]
        for n, sop in enumerate(sops):  # three series: three results
            ds = ct_dataset(sop)
            ds.SeriesInstanceUID = f"{ds.StudyInstanceUID}.{n + 2}"
            assert store_single(run.port, ds)
        wait_for("the exporter sending", lambda: slow.started.is_set(), timeout=40)
        run.kill9()
        slow.delay_s = 0.0
        run.start()
        wait_for("every result delivered", lambda: run.index(
            "SELECT COUNT(*) = 3 AND SUM(state = 'delivered') = 3 FROM outbound")[0][0] == 1)
        ours = {r[0] for r in run.index("SELECT sop_instance_uid FROM outbound")}
        # Sent again after the kill is harmless: the same UIDs, one instance each in a PACS.
        assert set(slow.received) == ours
        run.assert_bounded_and_contained()
    finally:
        run.stop()
        slow.stop()
    assert_clean_log(run.log.read_text())


def store_single(port: int, ds: Dataset) -> bool:
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(ds.SOPClassUID, ExplicitVRLittleEndian)
    assoc = associate(ae, "127.0.0.1", port, ae_title="DICOMAI")
    try:
        return bool(assoc.is_established and assoc.send_c_store(ds).Status == 0x0000)
    finally:
        if assoc.is_established:
            assoc.release()


def test_pacs_down_longer_than_the_backoff(tmp_path: Path,
                                           caplog: pytest.LogCaptureFixture) -> None:
    """Down for several backoff periods (but within the horizon): late (WARNING), then delivered
    when it is back. Down for longer than the horizon: a dead letter (ERROR)."""
    caplog.set_level(logging.INFO, logger="dicom_ai.service.export")
    spool = Spool(tmp_path)
    conn = db.connect(spool.db_path)
    ds = Dataset()
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.Modality = "OT"
    for n in (1, 2):
        ds.SOPInstanceUID = ds.StudyInstanceUID = f"1.2.3.20.{n}"
        path = spool.outputs / f"{n}.dcm"
        durable_write(path, [encode(ds)], tmp_dir=spool.tmp)
    port = free_port()
    dest = DestinationSettings(name="pacs", ae_title="PACS", host="127.0.0.1", port=port)

    def queue(sop: str) -> None:
        now = time.time()
        conn.execute("INSERT INTO outbound (job_id, study_instance_uid, sop_instance_uid, "
                     "sop_class_uid, path, destination, state, next_attempt_at, created_at) "
                     "VALUES (1, ?, ?, ?, ?, 'pacs', 'pending', ?, ?)",
                     (sop, sop, SecondaryCaptureImageStorage,
                      f"outputs/{sop.rsplit('.', 1)[1]}.dcm", now, now))

    def run(horizon_s: float, seconds: float, until: Callable[[], bool]) -> None:
        settings = ExportSettings(initial_backoff_s=0.05, max_backoff_s=0.2, late_after_s=0.3,
                                  retry_horizon_s=horizon_s)
        exporter = Exporter(conn, spool.root, {"pacs": DimseSender(dest, "DICOMAI")}, settings)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and not until():
            exporter.run_once()
            time.sleep(0.02)

    def state(sop: str) -> str:
        return str(conn.execute("SELECT state FROM outbound WHERE sop_instance_uid = ?",
                                (sop,)).fetchone()[0])

    # Down for 1 s: five times the longest backoff, within a 60 s horizon.
    queue("1.2.3.20.1")
    run(60.0, 1.0, lambda: False)
    assert state("1.2.3.20.1") == "pending"
    assert any(r.levelname == "WARNING" and "late" in r.message for r in caplog.records)
    ae = AE(ae_title="PACS")
    ae.add_supported_context(SecondaryCaptureImageStorage, ExplicitVRLittleEndian)
    server = ae.start_server(("127.0.0.1", port), block=False,
                             evt_handlers=[(evt.EVT_C_STORE, lambda _event: 0x0000)])
    try:
        run(60.0, 10.0, lambda: state("1.2.3.20.1") == "delivered")
    finally:
        server.shutdown()
    assert state("1.2.3.20.1") == "delivered"
    # Down beyond a 0.5 s horizon.
    queue("1.2.3.20.2")
    run(0.5, 5.0, lambda: state("1.2.3.20.2") == "dead")
    assert state("1.2.3.20.2") == "dead"
    assert any(r.levelname == "ERROR" and "dead letter" in r.message for r in caplog.records)
    conn.close()
    spool.close()


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs (needs root, or CAP_SYS_ADMIN); skipped where mounting is not allowed."""
    mount = tmp_path / "small"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()[:100]}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.mark.parametrize("probe", ["statfs", "stale"])
def test_disk_full_answers_out_of_resources_and_leaves_nothing(
        small_disk: Path, caplog: pytest.LogCaptureFixture, probe: str) -> None:
    """minimum_free_mb = 0, so the file system itself runs out. With the free-space probe the
    listener refuses before writing; with a stale probe (another process filled the disk since
    it last looked) the write of a file or of the index fails. Every answer is success or
    0xA7xx; what was refused leaves nothing behind."""
    caplog.set_level(logging.DEBUG)
    settings = Settings()
    settings.scp.port = 0
    settings.storage.minimum_free_mb = 0
    spool = Spool(small_disk / "storage")
    listener = start_scp(settings, spool, **({} if probe == "statfs" else {
        "free_bytes": lambda _path: 1 << 40}))
    port = int(listener.server_address[1])
    statuses: dict[str, int] = {}
    try:
        ae = AE(ae_title="MODALITY")
        ae.add_requested_context(ct_dataset("1.2").SOPClassUID, ExplicitVRLittleEndian)
        assoc = associate(ae, "127.0.0.1", port, ae_title="DICOMAI")
        assert assoc.is_established
        for n in range(40):
            sop = f"1.2.3.30.{n}"
            rsp = assoc.send_c_store(ct_dataset(sop, pixels=150_000))
            statuses[sop] = int(rsp.Status)
        assoc.release()
    finally:
        listener.stop(grace_s=1.0)
        spool.close()
    assert {s for s in statuses.values() if s != 0x0000} and all(
        s == 0x0000 or s & 0xFF00 == 0xA700 for s in statuses.values()), statuses
    acknowledged = [sop for sop, status in statuses.items() if status == 0x0000]
    assert acknowledged
    assert_consistent(spool.root, acknowledged)
    assert set(indexed(spool.root)) == set(acknowledged)
    # A restart indexes nothing the sender was told had failed.
    restarted = Spool(spool.root)
    assert restarted.reindex() == 0
    restarted.close()
    assert_clean_log(caplog.text)
