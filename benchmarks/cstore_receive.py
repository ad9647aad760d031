"""C-STORE reception rate: DCMTK ``storescp`` against ``dicom-ai serve`` in one run.

The same 200 CT instances (the real TCIA Lung-PET-CT-Dx A0002 chest CT, 30 slices of 512², copied
with new SOP Instance UIDs) are sent with DCMTK ``storescu`` (``TCP_NODELAY=1``) to

1. ``storescp`` writing to a temp dir (no fsync — DCMTK's default), and
2. ``dicom-ai serve`` (every instance fsync'ed, renamed, directory fsync'ed and indexed before
   the acknowledgement) while its worker is processing CT studies queued just before.

It prints the median instances/s of each over ``--runs`` runs and the ratio, plus two references:
the rate of a bare pynetdicom SCP that writes nothing (why ``dicom-ai serve`` has its own
acceptor), and the time the durability step alone takes for the same files, which bounds the
ratio any receiver acknowledging only durable instances can reach against ``storescp`` (which
does not fsync). Usage::

    python benchmarks/cstore_receive.py [--models models] [--runs 3]
"""

from __future__ import annotations

import argparse
import os
import socket
import sqlite3
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import pydicom
from pydicom.uid import generate_uid

from dicom_ai.service.spool import durable_write

REPO = Path(__file__).resolve().parents[1]
CT_ARCHIVE = REPO.parent / "shared" / "data" / "ct" / "lung_pet_ct_dx_A0002.tar.xz"
N_INSTANCES = 200
#: One CT study keeps the worker busy (ct-lung) for longer than the measured runs take.
BUSY_STUDIES = 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
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


def storescu(port: int, called: str, files: list[Path]) -> float:
    """Send ``files`` over one association; returns the wall time in seconds."""
    start = time.perf_counter()
    subprocess.run(["storescu", "-aet", "BENCH", "-aec", called, "127.0.0.1", str(port),
                    *map(str, files)], check=True, env=dict(os.environ, TCP_NODELAY="1"),
                   stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def running_jobs(index: Path) -> int:
    conn = sqlite3.connect(index)
    try:
        return int(conn.execute("SELECT COUNT(*) FROM jobs WHERE state = 'running'"
                                ).fetchone()[0])
    finally:
        conn.close()


def bench_receiver(command: list[str], port: int, called: str, files: list[Path],
                   runs: int) -> list[float]:
    """Start a receiver (``command`` listens on ``port``), time ``runs`` sends, stop it."""
    proc = subprocess.Popen(command, env=dict(os.environ, TCP_NODELAY="1"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port)
        return [storescu(port, called, files) for _ in range(runs)]
    finally:
        proc.terminate()
        proc.wait()


def bench_storescp(scratch: Path, files: list[Path], runs: int) -> list[float]:
    port = free_port()
    out = scratch / "storescp"
    out.mkdir()
    return bench_receiver(["storescp", "-od", str(out), str(port)], port, "STORESCP", files,
                          runs)


#: The floor for any pynetdicom receiver: an SCP that only takes the encoded bytes and answers.
FLOOR_SCP = """
import sys, time
from pynetdicom import AE, evt
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
ae = AE("FLOOR")
ae.add_supported_context(CTImageStorage, ExplicitVRLittleEndian)
ae.maximum_pdu_size = 262144
def on_store(event):
    event.encoded_dataset()
    return 0x0000
ae.start_server(("127.0.0.1", int(sys.argv[1])), block=True,
                evt_handlers=[(evt.EVT_C_STORE, on_store)])
"""


def bench_floor(files: list[Path], runs: int) -> list[float]:
    port = free_port()
    return bench_receiver([sys.executable, "-c", FLOOR_SCP, str(port)], port, "FLOOR", files,
                          runs)


def bench_durability(scratch: Path, files: list[Path], runs: int) -> list[float]:
    """The durability step alone, no network: each file's bytes (already in memory) written as
    ``dicom-ai serve`` writes an instance — temporary file, fdatasync, rename, directory fsync."""
    payloads = [f.read_bytes() for f in files]
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


def bench_serve(scratch: Path, files: list[Path], busy: list[list[Path]], models: Path,
                runs: int) -> tuple[list[float], list[float], list[bool]]:
    """Runs with the worker idle, then runs while it processes ``busy`` studies."""
    port = free_port()
    storage = scratch / "serve"
    config = scratch / "dicom-ai.toml"
    # 5 s: the back-to-back idle runs keep the benchmark study open (no job yet), while the busy
    # study still starts processing soon after it is sent.
    config.write_text(
        f'[scp]\nport = {port}\n[storage]\ndirectory = "{storage}"\nminimum_free_mb = 256\n'
        f'[studies]\nquiet_period_s = 5.0\n[worker]\npoll_interval_s = 0.2\n'
        f'[inference]\nmodels_dir = "{models}"\n')
    env = dict(os.environ, PYTHONPATH=str(REPO))
    log = (scratch / "serve.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "dicom_ai.cli", "serve", "--config",
                             str(config)], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_port(port)
        # "Idle" means after the worker has imported torch and loaded the models.
        deadline = time.monotonic() + 300
        while b"models loaded" not in (scratch / "serve.log").read_bytes():
            if time.monotonic() > deadline:
                raise TimeoutError("the worker did not load its models")
            time.sleep(0.2)
        idle = [storescu(port, "DICOMAI", files) for _ in range(runs)]
        # Studies for the worker to chew on while we measure reception.
        for study in busy:
            storescu(port, "DICOMAI", study)
        deadline = time.monotonic() + 120
        while running_jobs(storage / "index.sqlite") == 0 and time.monotonic() < deadline:
            time.sleep(0.2)
        times, overlapped = [], []
        for _ in range(runs):
            before = running_jobs(storage / "index.sqlite")
            times.append(storescu(port, "DICOMAI", files))
            overlapped.append(before > 0 and running_jobs(storage / "index.sqlite") > 0)
        return idle, times, overlapped
    finally:
        # The measurement is over: no need to wait for the worker to finish its study.
        proc.kill()
        proc.wait()
        log.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=Path, default=REPO / "models")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="cstore-bench-") as tmp:
        scratch = Path(tmp)
        slices = ct_slices(scratch)
        files = copies(slices, scratch / "bench", N_INSTANCES)
        busy = [copies(slices, scratch / f"busy{i}", len(slices)) for i in range(BUSY_STUDIES)]
        size_mb = sum(f.stat().st_size for f in files) / 2**20
        # storescp leaves its 100 MB per run dirty in the page cache; on ext4 (data=ordered) our
        # first fsyncs would wait for that writeback, charging storescp's deferred cost to us.
        os.sync()
        dcmtk = bench_storescp(scratch, files, args.runs)
        os.sync()
        floor = bench_floor(files, args.runs)
        os.sync()
        idle, ours, overlapped = bench_serve(scratch, files, busy, args.models, args.runs)
        os.sync()
        durable = bench_durability(scratch, files, args.runs)
    rate_dcmtk = N_INSTANCES / statistics.median(dcmtk)
    rate_ours = N_INSTANCES / statistics.median(ours)
    print(f"{N_INSTANCES} CT instances ({size_mb:.0f} MB), storescu with TCP_NODELAY=1, "
          f"median of {args.runs} runs")
    print(f"  DCMTK storescp (no fsync)            {rate_dcmtk:7.1f} instances/s  "
          f"runs: {', '.join(f'{t:.2f}s' for t in dcmtk)}")
    print(f"  pynetdicom SCP, no write (floor)     {N_INSTANCES / statistics.median(floor):7.1f} "
          f"instances/s  runs: {', '.join(f'{t:.2f}s' for t in floor)}")
    print(f"  dicom-ai serve (fsync, worker idle)  {N_INSTANCES / statistics.median(idle):7.1f} "
          f"instances/s  runs: {', '.join(f'{t:.2f}s' for t in idle)}")
    print(f"  dicom-ai serve (fsync, worker busy)  {rate_ours:7.1f} instances/s  "
          f"runs: {', '.join(f'{t:.2f}s' for t in ours)}")
    print(f"  worker processing a study during {sum(overlapped)} of {args.runs} runs")
    print(f"  ratio dicom-ai / storescp            {rate_ours / rate_dcmtk:7.2f}")
    t_dcmtk, t_durable = statistics.median(dcmtk), statistics.median(durable)
    print(f"  durability alone (tmp file, fdatasync, rename, dir fsync; no network): "
          f"{t_durable:.2f} s for the {N_INSTANCES}")
    print(f"  ceiling of the ratio for any receiver with that durability: storescp time / "
          f"(storescp time + durability time) = {t_dcmtk / (t_dcmtk + t_durable):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
