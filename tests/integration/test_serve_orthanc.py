"""``dicom-ai serve`` against real peers: DCMTK ``storescu`` as the modality, Orthanc as the PACS.

Each test starts Orthanc (temp dir, ``TCP_NODELAY=1``) and the service as a subprocess with a TOML
config using the keys of ``deploy/dicom-ai.example.toml`` and a 2 s quiet period, then looks for
our SR and SC objects in the *same* StudyInstanceUID through Orthanc's REST API.

The models directory is the repository's ``models/`` (``DICOMAI_TEST_MODELS`` overrides it).
"""

from __future__ import annotations

import functools
import importlib
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pydicom
import pytest
from orthanc import (
    NEEDS_ORTHANC_AND_DCMTK,
    Orthanc,
    end_with_this_process,
    free_port,
    start_orthanc,
)

pytestmark = [
    pytest.mark.integration,
    NEEDS_ORTHANC_AND_DCMTK,
]

REPO = Path(__file__).resolve().parents[2]
SAMPLES = REPO / "sample_studies"
MODELS = Path(os.environ.get("DICOMAI_TEST_MODELS", REPO / "models"))
SR_PREFIX = "1.2.840.10008.5.1.4.1.1.88."
SC = "1.2.840.10008.5.1.4.1.1.7"
#: Bound on the time from the last instance sent to the results being in the PACS (2 s quiet
#: period, model loading on first use, inference on 2 CPU cores, export).
RESULT_TIMEOUT_S = 240.0

T = TypeVar("T")


def wait_for(what: str, probe: Callable[[], T | None], timeout: float = RESULT_TIMEOUT_S,
             every: float = 0.5) -> T:
    """Poll ``probe`` until it returns something truthy; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)


def config_text(storage: Path, port: int, destinations: list[dict[str, Any]], *,
                http_port: int, **export: float) -> str:
    lines = [
        'log_level = "INFO"',
        "[scp]", 'ae_title = "DICOMAI"', 'bind_address = "127.0.0.1"', f"port = {port}",
        'allowed_calling_aets = []',
        "[storage]", f'directory = "{storage}"', "minimum_free_mb = 64",
        "[studies]", "quiet_period_s = 2.0",
        "[worker]", "poll_interval_s = 0.2",
        # A free port of its own: the default 9110 would be fought over by every serve a test
        # starts (and by anything else on the machine).
        "[http]", f"port = {http_port}",
        "[inference]", f'models_dir = "{MODELS}"', 'device = "auto"', "num_threads = 2",
        "[export]", *(f"{k} = {v}" for k, v in export.items()),
    ]
    for dest in destinations:
        lines.append("[[export.destinations]]")
        lines.extend(f"{k} = {v!r}" if isinstance(v, int) else f'{k} = "{v}"'
                     for k, v in dest.items())
    return "\n".join(lines) + "\n"


def dimse(pacs: Orthanc, name: str = "pacs") -> dict[str, Any]:
    return {"name": name, "kind": "dimse", "ae_title": pacs.aet, "host": "127.0.0.1",
            "port": pacs.dicom_port}


class Serve:
    """``dicom-ai serve`` as a subprocess in its own process group (so kill -9 takes it all)."""

    def __init__(self, workdir: Path, destinations: list[dict[str, Any]], *,
                 port: int | None = None, **export: float) -> None:
        self.workdir = workdir
        self.port = port or free_port()
        self.http_port = free_port()
        self.storage = workdir / "storage"
        self.config = workdir / "dicom-ai.toml"
        self.config.write_text(config_text(self.storage, self.port, destinations,
                                             http_port=self.http_port, **export))
        self.log = workdir / "serve.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = dict(os.environ, PYTHONPATH=str(REPO))
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "dicom_ai.cli", "serve", "--config", str(self.config)],
                cwd=self.workdir, env=env, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True, preexec_fn=end_with_this_process)

        def listening() -> bool:
            assert self.process is not None
            if self.process.poll() is not None:
                pytest.fail(f"serve exited: {self.log.read_text()[-3000:]}")
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", self.port)) == 0

        wait_for("the listener", listening, timeout=60, every=0.1)

    def kill9(self) -> None:
        assert self.process is not None
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=40)
            except subprocess.TimeoutExpired:
                self.kill9()

    def storescu(self, *paths: Path, calling: str = "MODALITY") -> None:
        send(paths, "DICOMAI", self.port, calling)

    def index(self, sql: str, *args: Any) -> list[tuple[Any, ...]]:
        conn = sqlite3.connect(self.storage / "index.sqlite")
        try:
            return [tuple(r) for r in conn.execute(sql, args)]
        finally:
            conn.close()

    def cli(self, command: str, *args: str) -> str:
        """Run ``dicom-ai COMMAND --config … ARGS`` beside the service; its standard output."""
        env = dict(os.environ, PYTHONPATH=str(REPO))
        return subprocess.run(
            [sys.executable, "-m", "dicom_ai.cli", command, "--config", str(self.config), *args],
            cwd=self.workdir, env=env, capture_output=True, text=True, check=True).stdout

    def status(self) -> str:
        return self.cli("status")


#: storescu proposes uncompressed transfer syntaxes unless told; one flag per compressed syntax.
STORESCU_PROPOSAL = {
    "1.2.840.10008.1.2.5": "-xr",      # RLE Lossless
    "1.2.840.10008.1.2.4.90": "-xv",   # JPEG 2000 Lossless
    "1.2.840.10008.1.2.4.80": "-xt",   # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.50": "-xy",   # JPEG Baseline
    "1.2.840.10008.1.2.4.70": "-xs",   # JPEG Lossless SV1
}


def send(paths: tuple[Path, ...] | list[Path], called: str, port: int, calling: str) -> None:
    """DCMTK storescu (the modality); every instance must be acknowledged with success."""
    groups: dict[str, list[str]] = {}
    for f in sorted(f for p in paths for f in ([p] if p.is_file() else p.rglob("*.dcm"))):
        ts = str(pydicom.dcmread(f, stop_before_pixels=True).file_meta.TransferSyntaxUID)
        groups.setdefault(STORESCU_PROPOSAL.get(ts, ""), []).append(str(f))
    for flag, files in groups.items():
        # -R: a presentation context for each SOP class sent, dermoscopy among them (storescu's
        # default list lacks it).
        result = subprocess.run(["storescu", "-R", *([flag] if flag else []), "-aet", calling,
                                 "-aec", called, "127.0.0.1", str(port), *files],
                                env=dict(os.environ, TCP_NODELAY="1"), capture_output=True,
                                text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-2000:]
        assert "error" not in result.stderr.lower(), result.stderr[-2000:]


def study_uid(folder: Path) -> str:
    first = next(iter(sorted(folder.rglob("*.dcm"))))
    return str(pydicom.dcmread(first, stop_before_pixels=True).StudyInstanceUID)


def results_in_pacs(pacs: Orthanc, uid: str) -> dict[str, list[str]] | None:
    """Our SR(s) and SC(s) in the study, once both kinds are there."""
    by_class = pacs.instances_by_sop_class(uid)
    srs = [s for c, sops in by_class.items() if c.startswith(SR_PREFIX) for s in sops]
    scs = by_class.get(SC, [])
    return {"sr": srs, "sc": scs} if srs and scs else None


def delivered(serve: Serve, uid: str) -> int | None:
    """How many results of the study were queued, once every one is delivered."""
    states = [r[0] for r in serve.index("SELECT state FROM outbound WHERE "
                                        "study_instance_uid = ?", uid)]
    return len(states) if states and set(states) == {"delivered"} else None


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    return tmp_path


@pytest.fixture
def serve_factory(workdir: Path) -> Iterator[Callable[..., Serve]]:
    started: list[Serve] = []

    def make(destinations: list[dict[str, Any]], *, port: int | None = None,
             **export: float) -> Serve:
        (workdir / f"serve{len(started)}").mkdir()
        serve = Serve(workdir / f"serve{len(started)}", destinations, port=port, **export)
        started.append(serve)
        return serve

    yield make
    for serve in started:
        serve.stop()


def test_modality_push_results_land_in_the_same_study(workdir: Path,
                                                      serve_factory: Callable[..., Serve]) -> None:
    studies = [SAMPLES / "cxr01", SAMPLES / "fundus01", SAMPLES / "ct-lung-pet-ct-dx-a0002"]
    with start_orthanc(workdir / "pacs") as pacs:
        serve = serve_factory([dimse(pacs)])
        serve.start()
        for folder in studies:
            send([folder], pacs.aet, pacs.dicom_port, "MODALITY")  # the modality's own push
            serve.storescu(folder)
        for folder in studies:
            uid = study_uid(folder)
            wait_for(f"SR and SC of {folder.name} in the PACS",
                     functools.partial(results_in_pacs, pacs, uid))
            # Every object the worker queued for the study (SR, SC and, for the CT, SEG),
            # delivered: the PACS holds the sources and exactly those.
            queued = wait_for(f"every result of {folder.name} delivered",
                              functools.partial(delivered, serve, uid))
            sources = len(list(folder.rglob("*.dcm")))
            assert sum(len(v) for v in pacs.instances_by_sop_class(uid).values()) == \
                sources + queued
        assert "dead" not in {r[0] for r in serve.index("SELECT state FROM outbound")}


def test_orthanc_as_sender_and_stow_rs_destination(workdir: Path,
                                                   serve_factory: Callable[..., Serve]) -> None:
    port = free_port()
    folder = SAMPLES / "fundus02"
    with start_orthanc(workdir / "pacs", modalities={"DICOMAI": ("DICOMAI", "127.0.0.1", port)}
                       ) as pacs, start_orthanc(workdir / "archive", aet="ARCHIVE") as archive:
        serve = serve_factory([dimse(pacs), {"name": "archive", "kind": "stow",
                                             "url": archive.dicomweb_url}], port=port)
        serve.start()
        for path in sorted(folder.rglob("*.dcm")):
            pacs.upload(path)
        uid = study_uid(folder)
        pacs.post("/modalities/DICOMAI/store", {"Resources": [pacs.study_id(uid)],
                                                "Synchronous": True})
        found = wait_for("SR and SC sent back to the sending PACS",
                         lambda: results_in_pacs(pacs, uid))
        archived = wait_for("the same objects stored by STOW-RS",
                            lambda: results_in_pacs(archive, uid))
        assert sorted(archived["sr"]) == sorted(found["sr"])
        assert sorted(archived["sc"]) == sorted(found["sc"])


def test_kill_and_restart_delivers_each_result_exactly_once(
        workdir: Path, serve_factory: Callable[..., Serve]) -> None:
    folder = SAMPLES / "fundus03"
    uid = study_uid(folder)
    pacs_dir = workdir / "pacs"
    with start_orthanc(pacs_dir) as pacs:
        serve = serve_factory([dimse(pacs)], initial_backoff_s=0.5, max_backoff_s=1.0,
                              retry_horizon_s=3600.0)
        pacs_port = pacs.dicom_port
        serve.start()
        serve.storescu(folder)
        # Received and acknowledged, quiet period not over: nothing processed or sent yet.
        serve.kill9()
    assert serve.index("SELECT COUNT(*) FROM jobs") == [(0,)]

    # Restart while the PACS is down: results are produced but cannot be delivered.
    serve.start()
    wait_for("result objects queued for delivery",
             lambda: serve.index("SELECT COUNT(*) FROM outbound WHERE attempts > 0")[0][0] > 0)
    serve.kill9()
    assert serve.index("SELECT COUNT(*) FROM outbound WHERE state = 'delivered'") == [(0,)]

    with start_orthanc(pacs_dir, dicom_port=pacs_port) as pacs:
        serve.start()
        wait_for("every result delivered", lambda: serve.index(
            "SELECT COUNT(*) = SUM(state = 'delivered') FROM outbound")[0][0] == 1)
        found = results_in_pacs(pacs, uid)
        assert found is not None
        ours = {r[0] for r in serve.index("SELECT sop_instance_uid FROM outbound")}
        assert set(found["sr"]) | set(found["sc"]) == ours
        assert len(found["sr"]) + len(found["sc"]) == len(ours)
        # Another kill and restart sends nothing again.
        serve.kill9()
        attempts = serve.index("SELECT SUM(attempts) FROM outbound")
        serve.start()
        time.sleep(3)
        assert serve.index("SELECT SUM(attempts) FROM outbound") == attempts
        assert serve.index("SELECT COUNT(*), SUM(state = 'done') FROM jobs")[0] == (1, 1)
        assert "delivered" in serve.status()


def test_destination_refusing_us_ends_in_dead_letters(workdir: Path,
                                                      serve_factory: Callable[..., Serve]) -> None:
    folder = SAMPLES / "fundus01"
    with start_orthanc(workdir / "pacs", allow_unknown_callers=False) as pacs:
        serve = serve_factory([dimse(pacs)], initial_backoff_s=0.2, max_backoff_s=0.5,
                              retry_horizon_s=1.0)
        serve.start()
        serve.storescu(folder)
        wait_for("dead letters", lambda: serve.index(
            "SELECT COUNT(*) > 0 AND COUNT(*) = SUM(state = 'dead') FROM outbound")[0][0] == 1)
        reasons = {r[0] for r in serve.index("SELECT last_error FROM outbound")}
        assert reasons == {"association rejected: Calling AE title not recognised"}
        # Tries 0.2, 0.4, 0.5 s apart until the 1 s horizon: three or four of them.
        assert serve.index("SELECT MIN(attempts) >= 3 FROM outbound") == [(1,)]
        status = serve.status()
        assert "Dead letters" in status and "Calling AE title not recognised" in status
        pacs_port = pacs.dicom_port
    # The PACS administrator adds us; the operator re-queues the dead letters.
    with start_orthanc(workdir / "pacs", dicom_port=pacs_port) as pacs:
        assert "queued again" in serve.cli("retry")
        wait_for("re-queued results delivered", lambda: serve.index(
            "SELECT COUNT(*) = SUM(state = 'delivered') FROM outbound")[0][0] == 1)
        assert results_in_pacs(pacs, study_uid(folder)) is not None
    assert_audit_trail(serve, folder)


def test_a_file_that_kills_the_decoder_costs_its_series_not_the_worker(
        workdir: Path, serve_factory: Callable[..., Serve]) -> None:
    """One study, two dermoscopy series in JPEG Lossless SV1: the image DCMTK compressed is
    analysed and its results reach the PACS; the mutation that makes GDCM abort, decoded by the
    same worker, fails its own series, and that worker is never restarted."""
    sys.path.insert(0, str(REPO / "tests" / "robustness"))
    fuzz = importlib.import_module("test_reader_fuzz")
    if not (fuzz.CORPUS / "INDEX.tsv").is_file():
        pytest.skip("corpus not present")
    folder = workdir / "study"
    folder.mkdir()
    _native, lossless, aborting = fuzz.lossless_dermoscopy(workdir)
    study = f"{fuzz.UID_ROOT}.10"
    for n, ds in enumerate((lossless, aborting), start=1):
        ds.StudyInstanceUID = study
        ds.SeriesInstanceUID = f"{study}.{n}"
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = f"{study}.{n}.1"
        ds.save_as(folder / f"{n}.dcm", enforce_file_format=True)
    with start_orthanc(workdir / "pacs") as pacs:
        serve = serve_factory([dimse(pacs)])
        serve.start()
        serve.storescu(folder)
        wait_for("SR and SC in the PACS", functools.partial(results_in_pacs, pacs, study))
        wait_for("every result delivered", functools.partial(delivered, serve, study))
        status = serve.status()
    results = json.loads((serve.storage / "outputs" / study / "findings.json").read_text())
    by_series = {r["series_instance_uid"]: r for r in results["results"]}
    assert {uid: r["status"] for uid, r in by_series.items()} == {
        f"{study}.1": "ok", f"{study}.2": "rejected"}
    assert by_series[f"{study}.2"]["reason"].startswith(
        "no image of the series could be used: the decoder process was killed by SIGABRT")
    log = serve.log.read_text()
    assert "decoder process was killed by SIGABRT; a fresh one decodes the next file" in log
    assert "process exited with code" not in log
    assert "Traceback" not in log
    assert [f for f in fuzz.FRAGMENTS if f in log + status] == []


def assert_audit_trail(serve: Serve, folder: Path) -> None:
    """The study's audit trail, written by four processes (listener, worker, exporter and the
    ``retry`` command), tells the whole story in order and holds no patient identity."""
    uid = study_uid(folder)
    results = {r[0] for r in serve.index("SELECT sop_instance_uid FROM outbound")}

    def trail() -> list[dict[str, Any]] | None:
        events = [json.loads(line) for line in serve.cli("status", uid, "--json").splitlines()]
        acked = {e["sop_instance_uid"] for e in events if e["event"] == "acknowledged"}
        return events if acked == results else None

    events = wait_for("every result acknowledged in the audit trail", trail, timeout=30)
    kinds = [e["event"] for e in events]
    sources = sorted(f for f in folder.rglob("*.dcm"))
    assert kinds[:len(sources)] == ["received"] * len(sources)
    assert {e["sop_instance_uid"] for e in events[:len(sources)]} == {
        str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in sources}
    assert {e["calling_aet"] for e in events[:len(sources)]} == {"MODALITY"}
    analysed = events[kinds.index("analysed")]
    assert kinds.index("complete") < kinds.index("analysed") < kinds.index("sent")
    assert {r["sop_instance_uid"] for r in analysed["results"]} == results
    assert all(m["name"] and m["version"] for m in analysed["models"])
    for sop in results:
        mine = [e["event"] for e in events if e.get("sop_instance_uid") == sop]
        assert mine[0] == "sent" and mine[-2:] == ["sent", "acknowledged"]
        assert mine.index("send_failed") < mine.index("dead") < mine.index("requeued")
    by_event = {e["event"]: e["pid"] for e in events}
    assert len({by_event[k] for k in ("received", "analysed", "dead", "requeued")}) == 4
    text = serve.cli("status", uid)
    assert "dead letter after" in text and "by pacs: stored" in text
    for f in sources:
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        for value in (ds.get("PatientName"), ds.get("PatientID"), ds.get("PatientBirthDate")):
            if value:
                assert str(value) not in text
                assert str(value) not in (serve.storage / "audit" / f"{uid}.jsonl").read_text()
