"""What pausing the worker buys: C-STORE rate while a CT study is analysed, with and without it.

The listener of ``dicom-ai serve`` (in this process) receives the 200 CT instances of
``cstore_receive.py`` from DCMTK ``storescu`` three ways, ``--runs`` sends each:

1. nothing else running;
2. a worker-like process (nice 10, torch on all cores but one, as ``serve`` sets it up) running
   the real pipeline over the sample CT study in a loop;
3. the same, paused by :class:`dicom_ai.service.pacing.Pacer` while instances arrive, as
   ``dicom-ai serve`` does (``worker.reception_pause_s`` at its default).

It prints the median instances/s of each and the ratios to the first. Usage::

    python benchmarks/reception_pacing.py [--models models] [--runs 4]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from multiprocessing.synchronize import Event
from pathlib import Path

from cstore_receive import N_INSTANCES, REPO, copies, ct_slices, storescu

from dicom_ai.config import Settings
from dicom_ai.service import pacing
from dicom_ai.service.scp import start_scp
from dicom_ai.service.spool import Spool

CT_STUDY = REPO / "sample_studies" / "ct-lung-pet-ct-dx-a0002"


def analyse_forever(models: Path, stop: Event) -> None:
    """The worker's load: the real pipeline over the sample CT study until ``stop``."""
    from dicom_ai.service.worker import pipeline_processor

    os.nice(10)
    settings = Settings()
    settings.inference.models_dir = str(models)
    settings.inference.num_threads = max(1, (os.cpu_count() or 1) - 1)
    process = pipeline_processor(settings)
    files = sorted(CT_STUDY.rglob("*.dcm"))
    while not stop.is_set():
        process(files)


def measure(scratch: Path, files: list[Path], models: Path, load: str, runs: int) -> list[float]:
    ctx = multiprocessing.get_context("spawn")
    clock = ctx.Value("d", 0.0, lock=False)
    settings = Settings()
    settings.scp.port = 0
    settings.storage.minimum_free_mb = 256
    spool = Spool(scratch / f"spool-{load}")
    listener = start_scp(settings, spool, reception=clock)
    stop = ctx.Event()
    worker = pacer = None
    if load != "idle":
        worker = ctx.Process(target=analyse_forever, args=(models, stop))
        worker.start()
        time.sleep(20)  # imports, model loading, into the first study
        if load == "paced":
            pacer = pacing.Pacer(clock, ctx.Lock(), lambda: worker.pid if worker else None,
                                 Settings().worker.reception_pause_s)
            pacer.start()
    try:
        port = int(listener.server_address[1])
        return [storescu(port, "DICOMAI", files) for _ in range(runs)]
    finally:
        if pacer is not None:
            pacer.stop()
        stop.set()
        if worker is not None:
            worker.join()
        listener.stop()
        spool.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=Path, default=REPO / "models")
    parser.add_argument("--runs", type=int, default=4)
    args = parser.parse_args(argv)
    if not pacing.supported():
        print("pausing processes needs Linux", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory(prefix="pacing-bench-") as tmp:
        scratch = Path(tmp)
        files = copies(ct_slices(scratch), scratch / "bench", N_INSTANCES)
        results = {load: measure(scratch, files, args.models, load, args.runs)
                   for load in ("idle", "unpaced", "paced")}
    rate = {load: N_INSTANCES / statistics.median(t) for load, t in results.items()}
    print(f"{N_INSTANCES} CT instances, storescu → dicom-ai listener, median of {args.runs}")
    for load, label in [("idle", "no analysis running"), ("unpaced", "CT analysis, not paused"),
                        ("paced", "CT analysis, paused")]:
        print(f"  {label:26s} {rate[load]:7.1f} instances/s  ratio to idle "
              f"{rate[load] / rate['idle']:.2f}  runs: "
              f"{', '.join(f'{t:.2f}s' for t in results[load])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
