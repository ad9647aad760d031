"""A chest X-ray arriving while a CT is analysed: time to its result, one worker against the pool.

``dicom-ai serve`` (the real ``Service``, real models) runs with ``worker.processes`` = 1 — one
worker, as before the pool existed — and then with the pool sized for this machine, the workers
that take CTs kept off the listener's CPU (``worker.listener_core``, the default) and not. In
each run the sample CT study (30 slices) is indexed and complete before the start, so its job is
the first one claimed; once it runs, the chest X-ray ``cxr01`` is filed through the spool (as the
listener files it), the service completes it by its own rules and queues its job. Printed per
run: the CXR's queue → result time (job queued to job done), its last instance → result time
(which includes the completion rule), and the CT's analysis time. Usage::

    python benchmarks/lane_latency.py [--models models] [--runs 2]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import signal
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

from dicom_ai.config import Settings
from dicom_ai.logs import configure_logging
from dicom_ai.service import db
from dicom_ai.service.lanes import available_memory, default_processes, study_lane
from dicom_ai.service.process import usable_cpus
from dicom_ai.service.server import Service
from dicom_ai.service.spool import Spool, parse_keys

REPO = Path(__file__).resolve().parents[1]
CT_STUDY = REPO / "sample_studies" / "ct-lung-pet-ct-dx-a0002"
CXR_STUDY = REPO / "sample_studies" / "cxr01"
#: Bound on every wait of the benchmark (seconds).
TIMEOUT_S = 900.0


def run_service(settings: Settings) -> None:
    """The service process."""
    configure_logging("WARNING")
    sys.exit(Service(settings).run())


def file_study(spool: Spool, study: Path) -> tuple[str, float]:
    """File every instance of ``study`` as the listener does; its UID and the last arrival."""
    uid = ""
    for path in sorted(study.rglob("*.dcm")):
        data = path.read_bytes()
        keys = parse_keys(data)
        spool.store([data], keys, calling_aet="BENCH")
        uid = keys.study_instance_uid
    return uid, time.time()


def wait_row(conn: sqlite3.Connection, sql: str, args: tuple[object, ...]) -> sqlite3.Row:
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline:
        row = conn.execute(sql, args).fetchone()
        if row is not None:
            return row  # type: ignore[no-any-return]
        time.sleep(0.05)
    raise TimeoutError(sql)


def one_run(scratch: Path, models: Path, processes: int,
            listener_core: bool) -> tuple[float, float, float]:
    """(CXR queue → result, CXR last instance → result, CT analysis) seconds."""
    root = scratch / f"p{processes}-{time.monotonic_ns()}"
    spool = Spool(root)
    conn = db.connect(spool.db_path)
    ct_uid, _ = file_study(spool, CT_STUDY)
    # Complete already: the start-up check queues its job before any worker runs.
    conn.execute("UPDATE studies SET state = 'complete', completed_at = ? "
                 "WHERE study_instance_uid = ?", (time.time(), ct_uid))
    settings = Settings()
    settings.scp.port = 0
    settings.storage.directory = str(root)
    settings.storage.minimum_free_mb = 1
    settings.inference.models_dir = str(models)
    settings.worker.processes = processes
    settings.worker.listener_core = listener_core
    settings.log_level = "WARNING"
    settings.worker.poll_interval_s = 0.1
    ctx = multiprocessing.get_context("spawn")
    proc = ctx.Process(target=run_service, args=(settings,))
    proc.start()
    try:
        ct = wait_row(conn, "SELECT started_at FROM jobs WHERE study_instance_uid = ? AND "
                            "state = 'running'", (ct_uid,))
        cxr_uid, last = file_study(spool, CXR_STUDY)
        assert study_lane(conn, cxr_uid) == "fast"
        cxr = wait_row(conn, "SELECT created_at, finished_at FROM jobs WHERE "
                             "study_instance_uid = ? AND state = 'done'", (cxr_uid,))
        ct_done = wait_row(conn, "SELECT finished_at FROM jobs WHERE study_instance_uid = ? "
                                 "AND state = 'done'", (ct_uid,))
    finally:
        if proc.pid is not None:
            os.kill(proc.pid, signal.SIGTERM)
        proc.join(timeout=60)
        spool.close()
        conn.close()
    return (float(cxr[1]) - float(cxr[0]), float(cxr[1]) - last,
            float(ct_done[0]) - float(ct[0]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=Path, default=REPO / "models")
    parser.add_argument("--runs", type=int, default=2)
    args = parser.parse_args(argv)
    cpus = len(usable_cpus())
    pool = max(2, default_processes(cpus, available_memory()))
    setups = {(1, True): "one worker (no pool, as before)",
              (pool, True): f"{pool} workers, bulk off one CPU",
              (pool, False): f"{pool} workers on every CPU"}
    with tempfile.TemporaryDirectory(prefix="lane-bench-") as tmp:
        results = {setup: [one_run(Path(tmp), args.models, *setup) for _ in range(args.runs)]
                   for setup in setups}
    print(f"a CXR filed while the sample CT is analysed; medians of {args.runs} runs, "
          f"{cpus} usable CPUs")
    for setup, label in setups.items():
        queued, arrived, ct = (statistics.median(r[i] for r in results[setup])
                               for i in range(3))
        print(f"  {label:34s} CXR queued → result {queued:6.1f} s   last instance → result "
              f"{arrived:6.1f} s   CT analysis {ct:6.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
