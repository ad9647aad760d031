"""C-STORE reception rate: ``dicom-ai serve`` against DCMTK ``storescp`` and Orthanc, one run.

The real TCIA Lung-PET-CT-Dx A0002 chest CT (30 slices of 512²) is copied into sends of fresh
instances (new Study/Series/SOP Instance UIDs for every send, so that no receiver can skip an
instance it already holds) and pushed with DCMTK ``storescu`` (``TCP_NODELAY=1``) in two cases:

* **1 association**: 200 instances over one association;
* **4 associations**: 4 ``storescu`` processes at once, 100 instances each (four modalities
  pushing at the same time); the rate is all 400 instances over the wall time of the slowest.

Receivers, all running at once and taking turns (the order rotates every trial, ``os.sync()``
before each send so that no receiver pays for another's deferred writeback):

1. DCMTK ``storescp --fork`` writing to a temp dir: **no fsync** (DCMTK's default); the ceiling
   any receiver can reach on this machine;
2. Orthanc (Debian's package, its own process, storage and SQLite index in a temp dir on the same
   disk) with its default durability stated: ``SyncStorageArea: true`` (each file fsync'ed before
   the C-STORE response), ``StorageCompression: false``, ``DicomThreadsCount: 4``;
3. ``dicom-ai serve``: every instance written to a temp file, fdatasync'ed, renamed, its
   directory fsync'ed and indexed before the 0x0000 response (its worker has nothing to do:
   the quiet period is an hour).

With ``--busy`` (default on) a second phase repeats storescp against a second ``serve`` whose
worker analyses CT studies meanwhile (the load a real site has). Each figure is the median over
``--runs`` trials; the machine (CPUs, load average before and after) is printed with the table.
A second table gives the CPU time per instance of each receiver (its process tree, from
``/proc``) and of the storescu senders: on a machine with few cores, sender and receiver share
them, so a receiver's rate is bounded by the CPU both need per instance, whatever the load.
``--serve-setting section.key=value`` (repeatable) adds settings to the ``serve`` config, and
``DICOM_AI_*`` variables in the environment reach it too. Usage::

    python benchmarks/cstore_receive.py [--runs 5] [--no-busy] [--serve-setting storage.x=1]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import resource
import socket
import sqlite3
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from pydicom.uid import generate_uid

from dicom_ai.config import Settings
from dicom_ai.service.spool import durable_write

REPO = Path(__file__).resolve().parents[1]
CT_ARCHIVE = REPO.parent / "shared" / "data" / "ct" / "lung_pet_ct_dx_A0002.tar.xz"
N_INSTANCES = 200
#: Parallel associations of the second case, and the instances each of them sends.
PARALLEL, PER_ASSOCIATION = 4, 100
#: CT studies queued to keep the busy ``serve``'s worker analysing through the busy phase.
BUSY_STUDIES = 3
#: Longest wait for a receiver to listen, for models to load, for one send (seconds).
START_TIMEOUT_S, SEND_TIMEOUT_S = 300.0, 600.0
TARGETS = {"1 association": 0.5, "4 associations": 0.75}
ENV = dict(os.environ, TCP_NODELAY="1")


def free_port() -> int:
    """A TCP port nothing listens on now (bound to port 0 and released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = START_TIMEOUT_S,
              proc: subprocess.Popen[bytes] | None = None) -> None:
    """Return once something accepts connections on ``127.0.0.1:port`` (``proc``: the process
    that should listen; its exit is an error at once)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the receiver exited with {proc.returncode} before listening")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise TimeoutError(f"nothing listens on port {port}")


def ct_slices(scratch: Path) -> list[Path]:
    """The 30 real CT slices, unpacked into ``scratch``."""
    with tarfile.open(CT_ARCHIVE) as tar:
        tar.extractall(scratch / "src", filter="data")
    return sorted((scratch / "src").rglob("*.dcm"))


def copies(slices: list[Path], out: Path, count: int) -> list[Path]:
    """``count`` instances of one new study/series, cycling over ``slices``, new SOP UIDs."""
    out.mkdir(parents=True)
    study, series = generate_uid(), generate_uid()
    paths = []
    for i in range(count):
        ds = pydicom.dcmread(slices[i % len(slices)])
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = i + 1
        path = out / f"{i:04d}.dcm"
        ds.save_as(path)
        paths.append(path)
    return paths


class Sends:
    """Fresh copies of one set of instances for every send, made by patching bytes.

    Every UID of the template files (study, series, SOP instance, in the data set and the file
    meta) is ``<root>.1000000.<n>``, where ``<root>`` is a random 2.25 UID; a send replaces
    ``.1000000.`` after the root with its own seven-digit number, which keeps every length (and
    so the encoding) unchanged. The random root cannot occur in pixel data by chance.
    """

    #: Send numbers, shared by all instances so that no two sends write to the same folder.
    numbers = itertools.count(1000001)

    def __init__(self, slices: list[Path], groups: int, per_group: int) -> None:
        self.root = generate_uid(prefix="2.25.")[:40]
        self.templates: list[list[bytes]] = []
        n = 0
        for g in range(groups):
            study = f"{self.root}.1000000.{n}"
            series = f"{self.root}.1000000.{n + 1}"
            n += 2
            group = []
            for i in range(per_group):
                ds = pydicom.dcmread(slices[i % len(slices)])
                ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
                ds.SOPInstanceUID = f"{self.root}.1000000.{n}"
                n += 1
                ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
                ds.InstanceNumber = i + 1
                ds.AccessionNumber = f"BENCH{g}"
                with tempfile.SpooledTemporaryFile() as buf:
                    ds.save_as(buf, enforce_file_format=True)
                    buf.seek(0)
                    group.append(buf.read())
            self.templates.append(group)

    def write(self, out: Path) -> list[list[Path]]:
        """The next send's files under ``out``: one list per association."""
        number = next(self.numbers)
        old = f"{self.root}.1000000.".encode()
        new = f"{self.root}.{number}.".encode()
        groups = []
        for g, group in enumerate(self.templates):
            d = out / f"send{number}" / str(g)
            d.mkdir(parents=True)
            paths = []
            for i, data in enumerate(group):
                path = d / f"{i:04d}.dcm"
                path.write_bytes(data.replace(old, new))
                paths.append(path)
            groups.append(paths)
        return groups


def storescu(port: int, called: str, files: list[Path], calling: str = "BENCH") -> float:
    """Send ``files`` over one association; returns the wall time in seconds."""
    start = time.perf_counter()
    subprocess.run(["storescu", "-aet", calling, "-aec", called, "127.0.0.1", str(port),
                    *map(str, files)], check=True, env=ENV, stdout=subprocess.DEVNULL,
                   timeout=SEND_TIMEOUT_S)
    return time.perf_counter() - start


def storescu_parallel(port: int, called: str, groups: Sequence[list[Path]]) -> float:
    """Send each group over its own association, all at once; wall time until the last ends."""
    start = time.perf_counter()
    procs = [subprocess.Popen(["storescu", "-aet", f"BENCH{g}", "-aec", called, "127.0.0.1",
                               str(port), *map(str, files)], env=ENV,
                              stdout=subprocess.DEVNULL)
             for g, files in enumerate(groups)]
    codes = [p.wait(timeout=SEND_TIMEOUT_S) for p in procs]
    elapsed = time.perf_counter() - start
    if any(codes):
        raise RuntimeError(f"storescu failed: exit codes {codes}")
    return elapsed


@dataclass
class Receiver:
    """A running receiver: where it listens, how to stop it, what it guarantees."""

    name: str
    port: int
    called: str
    proc: subprocess.Popen[bytes]
    times: dict[str, list[float]] = field(default_factory=dict)
    #: CPU seconds per send: the receiver's process tree, and the storescu processes.
    cpu: dict[str, list[float]] = field(default_factory=dict)
    sender_cpu: dict[str, list[float]] = field(default_factory=dict)
    log: Path | None = None

    def group_commit(self) -> str:
        """The service's own group-commit summary, logged when it stops (empty if none)."""
        if self.log is None or not self.log.exists():
            return ""
        lines = [line.split("group commit:", 1)[1].strip()
                 for line in self.log.read_text(errors="replace").splitlines()
                 if "group commit:" in line]
        return lines[-1] if lines else ""

    def stop(self) -> None:
        """Terminate the receiver and wait for it (killed after 20 s)."""
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def start_storescp(scratch: Path) -> Receiver:
    """DCMTK ``storescp``, one child per association (``--fork``), no fsync."""
    port = free_port()
    out = scratch / "storescp"
    out.mkdir()
    proc = subprocess.Popen(["storescp", "--fork", "-od", str(out), str(port)], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(port)
    return Receiver("DCMTK storescp (no fsync)", port, "STORESCP", proc)


#: Orthanc's durability and concurrency settings for the benchmark (its 1.10 defaults, stated).
ORTHANC_SETTINGS = {"SyncStorageArea": True, "StorageCompression": False,
                    "DicomThreadsCount": 4, "OverwriteInstances": False,
                    "MaximumStorageCacheSize": 128}


def start_orthanc(scratch: Path) -> Receiver:
    """Orthanc as its own process, storage and index in ``scratch`` (same disk as ``serve``)."""
    port, http = free_port(), free_port()
    root = scratch / "orthanc"
    (root / "storage").mkdir(parents=True)
    config = {"Name": "bench", "DicomAet": "ORTHANC", "DicomPort": port, "HttpPort": http,
              "StorageDirectory": str(root / "storage"), "IndexDirectory": str(root / "storage"),
              "TemporaryDirectory": str(root / "tmp"), "RemoteAccessAllowed": False,
              "AuthenticationEnabled": False, "DicomCheckCalledAet": False,
              "HttpServerEnabled": True, "Plugins": [], **ORTHANC_SETTINGS}
    (root / "config.json").write_text(json.dumps(config))
    log = (root / "orthanc.log").open("wb")
    proc = subprocess.Popen(["Orthanc", str(root / "config.json")], env=ENV, stdout=log,
                            stderr=subprocess.STDOUT, cwd=root)
    wait_http(f"http://127.0.0.1:{http}/system")
    wait_port(port)
    return Receiver("Orthanc 1.10 (SyncStorageArea)", port, "ORTHANC", proc)


def wait_http(url: str, timeout: float = START_TIMEOUT_S) -> bytes:
    """GET ``url`` until it answers 200."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                body: bytes = response.read()
                return body
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def serve_config(scratch: Path, name: str, port: int, models: Path, quiet_period_s: float,
                 extra: Sequence[str], tables: str = "") -> Path:
    """A ``serve`` TOML in ``scratch``.

    ``extra`` are ``section.key=value`` lines (TOML values), applied last; ``tables`` is TOML
    appended as is (arrays of tables such as ``[[export.destinations]]``).
    """
    sections: dict[str, list[str]] = {
        "scp": [f"port = {port}", "maximum_associations = 16"],
        "storage": [f'directory = "{scratch / name}"', "minimum_free_mb = 256"],
        "studies": [f"quiet_period_s = {quiet_period_s}"],
        "worker": ["poll_interval_s = 0.2"],
        "inference": [f'models_dir = "{models}"'],
    }
    if hasattr(Settings().studies, "maximum_wait_s"):
        # The forced completion must not come before the quiet period.
        sections["studies"].append(f"maximum_wait_s = {max(600.0, quiet_period_s)}")
    if hasattr(Settings(), "http"):
        # Several benchmark services run side by side; none needs the HTTP endpoint.
        sections["http"] = ["enabled = false"]
    for item in extra:
        key, _, value = item.partition("=")
        section, _, leaf = key.strip().rpartition(".")
        if not section or not value:
            raise SystemExit(f"--serve-setting wants section.key=value, got {item!r}")
        sections.setdefault(section, []).append(f"{leaf} = {value.strip()}")
    config = scratch / f"{name}.toml"
    config.write_text("".join(f"[{s}]\n" + "".join(f"{line}\n" for line in lines)
                              for s, lines in sections.items()) + tables)
    return config


def start_serve(scratch: Path, name: str, models: Path, quiet_period_s: float,
                extra: Sequence[str], tables: str = "") -> Receiver:
    """``dicom-ai serve`` as its own process; returns once every worker has loaded the models."""
    port = free_port()
    config = serve_config(scratch, name, port, models, quiet_period_s, extra, tables)
    log_path = scratch / f"{name}.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "dicom_ai.cli", "serve", "--config",
                                 str(config)], env=dict(ENV, PYTHONPATH=str(REPO)), stdout=log,
                                stderr=subprocess.STDOUT)
    receiver = Receiver("dicom-ai serve (fsync)", port, "DICOMAI", proc, log=log_path)
    try:
        try:
            wait_port(port, proc=proc)
        except RuntimeError as exc:
            raise RuntimeError(f"{exc}: {log_path.read_text(errors='replace')[-2000:]}") from exc
        # Measured after the worker has imported torch and loaded the models: that start-up
        # would otherwise compete with the first sends.
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            text = log_path.read_text(errors="replace")
            pool = re.search(r"(\d+) worker processes", text)
            if text.count("models loaded") >= (int(pool.group(1)) if pool else 1):
                break
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(f"serve did not load its models; see {log_path}")
            time.sleep(0.2)
    except BaseException:
        receiver.stop()
        raise
    return receiver


def running_jobs(index: Path) -> int | None:
    """Jobs the worker(s) of a ``serve`` run now, from its index (None if unreadable)."""
    try:
        conn = sqlite3.connect(f"file:{index}?mode=ro", uri=True, timeout=5)
        try:
            return int(conn.execute("SELECT COUNT(*) FROM jobs WHERE state = 'running'"
                                    ).fetchone()[0])
        finally:
            conn.close()
    except sqlite3.Error:
        return None


def bench_durability(scratch: Path, payloads: list[bytes], runs: int) -> list[float]:
    """The durability step alone, no network: each instance's bytes (in memory) written as
    ``dicom-ai serve`` writes an instance — temporary file, fdatasync, rename, directory fsync."""
    times = []
    for run in range(runs):
        out = scratch / f"durable{run}"
        (out / "tmp").mkdir(parents=True)
        os.sync()
        start = time.perf_counter()
        for i, data in enumerate(payloads):
            durable_write(out / f"{i:04d}.dcm", [data], tmp_dir=out / "tmp")
        times.append(time.perf_counter() - start)
    return times


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def tree_cpu_s(root: int) -> float:
    """CPU seconds (user + system) used so far by process ``root`` and its descendants.

    A live process counts its own time and that of the children it has reaped (``cutime``,
    ``cstime``: storescp's per-association children once they exit); a reaped child has left
    ``/proc``, so nothing is counted twice.
    """
    stats: dict[int, tuple[int, list[str]]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            text = (entry / "stat").read_text()
        except OSError:
            continue
        fields = text[text.rindex(")") + 2:].split()
        stats[int(entry.name)] = (int(fields[1]), fields)
    tree, frontier = {root}, [root]
    while frontier:
        parent = frontier.pop()
        children = [pid for pid, (ppid, _) in stats.items() if ppid == parent]
        tree.update(children)
        frontier.extend(children)
    ticks = sum(sum(int(v) for v in stats[pid][1][11:15]) for pid in tree if pid in stats)
    return ticks / CLOCK_TICKS


def children_cpu_s() -> float:
    """CPU seconds of this process's reaped children (the storescu senders)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def trials(receivers: list[Receiver], one: Sends, four: Sends, scratch: Path, runs: int,
           during: Callable[[], None] | None = None) -> None:
    """``runs`` trials; in each every receiver gets one send of each case, order rotating."""
    for trial in range(runs):
        turn = receivers[trial % len(receivers):] + receivers[:trial % len(receivers)]
        for receiver in turn:
            for case, sends in (("1 association", one), ("4 associations", four)):
                groups = sends.write(scratch / "sends")
                os.sync()
                if during is not None:
                    during()
                cpu, sender = tree_cpu_s(receiver.proc.pid), children_cpu_s()
                if len(groups) == 1:
                    elapsed = storescu(receiver.port, receiver.called, groups[0])
                else:
                    elapsed = storescu_parallel(receiver.port, receiver.called, groups)
                receiver.times.setdefault(case, []).append(elapsed)
                receiver.cpu.setdefault(case, []).append(tree_cpu_s(receiver.proc.pid) - cpu)
                receiver.sender_cpu.setdefault(case, []).append(children_cpu_s() - sender)
                for files in groups:
                    for f in files:
                        f.unlink()


def machine() -> str:
    """CPUs and memory, for the table's caption."""
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
        mem_kb = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text()
                      .splitlines() if line.startswith("MemTotal"))
    except (OSError, StopIteration, ValueError):
        mem_kb = 0
    return f"{os.cpu_count()} CPUs ({model}), {mem_kb / 2**20:.0f} GiB RAM"


def load() -> str:
    """The 1/5/15-minute load averages."""
    return "/".join(f"{v:.2f}" for v in os.getloadavg())


def rate(n: int, times: list[float]) -> float:
    """Instances per second of the median time."""
    return n / statistics.median(times)


def table(receivers: list[Receiver], reference: Receiver, counts: dict[str, int],
          title: str) -> list[str]:
    """Markdown rows: instances/s per receiver and case, ratio to ``reference``, per-run range."""
    lines = [f"**{title}**", "",
             "| receiver | " + " | ".join(f"{c}: instances/s (runs)" for c in counts) + " |",
             "|---|" + "---|" * len(counts)]
    for r in receivers:
        cells = []
        for case, n in counts.items():
            runs = sorted(n / t for t in r.times[case])
            cells.append(f"{rate(n, r.times[case]):.0f}/s ({runs[0]:.0f}–{runs[-1]:.0f})")
        lines.append(f"| {r.name} | " + " | ".join(cells) + " |")
    return lines


def cpu_table(receivers: list[Receiver], counts: dict[str, int]) -> list[str]:
    """Markdown rows: CPU milliseconds per instance of each receiver and of its senders."""
    lines = ["", "| CPU per instance, ms (median of the sends) | "
             + " | ".join(f"{c}: receiver / storescu" for c in counts) + " |",
             "|---|" + "---|" * len(counts)]
    for r in receivers:
        cells = [f"{1000 * statistics.median(r.cpu[c]) / n:.2f} / "
                 f"{1000 * statistics.median(r.sender_cpu[c]) / n:.2f}"
                 for c, n in counts.items()]
        lines.append(f"| {r.name} | " + " | ".join(cells) + " |")
    return lines


def paired(ours: Receiver, other: Receiver, case: str) -> tuple[float, float]:
    """Median and worst of the per-trial rate ratios ``ours / other`` (same trial, same load)."""
    pairs = [t_other / t_ours for t_ours, t_other in
             zip(ours.times[case], other.times[case], strict=True)]
    return statistics.median(pairs), min(pairs)


def ratios(ours: Receiver, others: list[Receiver], counts: dict[str, int]) -> list[str]:
    """Median ratio, worst per-trial ratio and the target per case."""
    lines = ["", "| ratio | " + " | ".join(counts) + " |", "|---|" + "---|" * len(counts)]
    for other in others:
        cells = []
        for case in counts:
            median, worst = paired(ours, other, case)
            cells.append(f"**{median:.2f}** (worst {worst:.2f})")
        lines.append(f"| serve / {other.name.split(' (')[0]} | " + " | ".join(cells) + " |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=Path, default=REPO / "models")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--busy", action=argparse.BooleanOptionalAction, default=True,
                        help="second phase: serve's worker analyses CT studies meanwhile")
    parser.add_argument("--serve-setting", action="append", default=[], metavar="S.K=V",
                        help="extra serve setting, e.g. storage.group_commit_ms=2")
    args = parser.parse_args(argv)
    before = load()
    counts = {"1 association": N_INSTANCES, "4 associations": PARALLEL * PER_ASSOCIATION}
    with tempfile.TemporaryDirectory(prefix="cstore-bench-", dir=REPO.parent) as tmp:
        scratch = Path(tmp)
        slices = ct_slices(scratch)
        one = Sends(slices, 1, N_INSTANCES)
        four = Sends(slices, PARALLEL, PER_ASSOCIATION)
        size_mb = sum(map(len, one.templates[0])) / 2**20
        receivers: list[Receiver] = []
        try:
            receivers.append(start_storescp(scratch))
            receivers.append(start_orthanc(scratch))
            receivers.append(start_serve(scratch, "serve-idle", args.models, 3600.0,
                                         args.serve_setting))
            trials(receivers, one, four, scratch, args.runs)
        finally:
            for r in receivers:
                r.stop()
        commits = receivers[2].group_commit()
        busy_rows: list[str] = []
        if args.busy:
            busy_rows = busy_phase(scratch, slices, args, one, four, counts)
        durable = bench_durability(scratch, one.templates[0], args.runs)
    storescp, orthanc, ours = receivers
    print(f"Reception, storescu → receiver on 127.0.0.1, TCP_NODELAY=1 on both ends; "
          f"{N_INSTANCES} CT instances of 512² ({size_mb:.0f} MB) over 1 association, "
          f"{PARALLEL}×{PER_ASSOCIATION} over {PARALLEL} at once; fresh UIDs every send; "
          f"median of {args.runs} alternating trials")
    print(f"Machine: {machine()}; load average before {before}, after {load()}")
    print(f"Orthanc settings: {json.dumps(ORTHANC_SETTINGS)} (SQLite index on the same disk)")
    if args.serve_setting:
        print(f"serve settings added: {', '.join(args.serve_setting)}")
    if commits:
        print(f"serve (worker idle) group commit, from its log: {commits}")
    print()
    for line in (table(receivers, storescp, counts, "worker idle")
                 + ratios(ours, [storescp, orthanc], counts) + cpu_table(receivers, counts)
                 + busy_rows):
        print(line)
    print()
    print("Targets: serve / storescp ≥ " + ", ".join(f"{v}× on {k}" for k, v in TARGETS.items())
          + "; serve / Orthanc > 1 on both.")
    for case, target in TARGETS.items():
        r_dcmtk, worst_dcmtk = paired(ours, storescp, case)
        r_orth, worst_orth = paired(ours, orthanc, case)
        verdict = "met" if r_dcmtk >= target and r_orth > 1 else "NOT met"
        every = "met" if worst_dcmtk >= target and worst_orth > 1 else "NOT met"
        print(f"  {case}: {r_dcmtk:.2f}× storescp, {r_orth:.2f}× Orthanc (medians of the "
              f"trials' ratios) — {verdict}; in every trial (worst {worst_dcmtk:.2f}×, "
              f"{worst_orth:.2f}×) — {every}")
    t_dcmtk, t_durable = statistics.median(storescp.times["1 association"]), \
        statistics.median(durable)
    print(f"Durability alone (tmp file, fdatasync, rename, dir fsync; no network): "
          f"{t_durable:.2f} s for {N_INSTANCES} instances; ceiling of the 1-association ratio "
          f"for any receiver with that durability: {t_dcmtk / (t_dcmtk + t_durable):.2f}")
    return 0


def busy_phase(scratch: Path, slices: list[Path], args: argparse.Namespace, one: Sends,
               four: Sends, counts: dict[str, int]) -> list[str]:
    """storescp against a ``serve`` whose worker analyses CT studies; Markdown rows."""
    receivers: list[Receiver] = []
    overlapped: list[bool] = []
    index = scratch / "serve-busy" / "index.sqlite"

    def note_busy() -> None:
        overlapped.append(bool(running_jobs(index)))

    busy_root = scratch / "busy"
    busy_root.mkdir()
    receivers.append(start_storescp(busy_root))
    try:
        ours = start_serve(scratch, "serve-busy", args.models, 1.0, args.serve_setting)
        ours.name = "dicom-ai serve (fsync), worker analysing CT"
        receivers.append(ours)
        studies = [copies(slices, busy_root / f"ct{i}", len(slices)) for i in range(BUSY_STUDIES)]
        for study in studies:
            storescu(ours.port, ours.called, study)
        deadline = time.monotonic() + START_TIMEOUT_S
        while not running_jobs(index) and time.monotonic() < deadline:
            time.sleep(0.2)
        trials(receivers, one, four, busy_root, args.runs, during=note_busy)
    finally:
        for r in receivers:
            r.stop()
    rows = ["", *table(receivers, receivers[0], counts,
                       f"worker busy: serve's worker analysing CT studies during "
                       f"{sum(overlapped)} of {len(overlapped)} sends (all receivers)"),
            *ratios(receivers[1], receivers[:1], counts)]
    return rows


if __name__ == "__main__":
    sys.exit(main())
