"""Reception while a model runs, without stopping it: the worker's CPU priority, both sides.

The listener of ``dicom-ai serve`` (in this process) receives the 200 CT instances of
``cstore_receive.py`` from DCMTK ``storescu``, sent again and again while a worker-like process
runs the real pipeline over the sample CT study (torch on all usable cores but one, as ``serve``
sets it up). Set-ups, one analysis each in every one of ``--runs`` rounds (the set-ups take turns,
so a change in the machine's background load falls on all of them alike):

* ``none``: no analysis running, reception alone;
* ``normal``: the worker at normal priority;
* ``idle``: the worker at ``SCHED_IDLE``;
* ``batch``: the worker at ``SCHED_BATCH``, nice 10;
* ``batch+core`` and ``idle+core``: the same, and the worker kept off one CPU so the listener
  always finds one (:func:`dicom_ai.service.process.leave_listener_a_core`; only with ≥ 2 CPUs).

For each it prints the median reception rate during the analyses and its ratio to ``none``, and
the median analysis time and its ratio to the same analysis with nothing being received (normal
priority, once per round). The worker's set-up is :func:`dicom_ai.service.process.set_priority`
and ``leave_listener_a_core``, the functions ``dicom-ai serve`` uses. Usage::

    python benchmarks/reception_pacing.py [--models models] [--runs 3] [--setups batch,idle]
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import sys
import tempfile
import time
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Event
from pathlib import Path

from cstore_receive import N_INSTANCES, REPO, copies, ct_slices, storescu

from dicom_ai.config import Settings
from dicom_ai.service.process import leave_listener_a_core, set_priority, usable_cpus
from dicom_ai.service.scp import start_scp
from dicom_ai.service.spool import Spool

CT_STUDY = REPO / "sample_studies" / "ct-lung-pet-ct-dx-a0002"
#: Bounds of the benchmark's loops: sends per analysis, seconds per analysis.
MAX_SENDS, MAX_ANALYSIS_S = 500, 900.0

SETUPS = {
    "normal": "worker at normal priority",
    "idle": "worker at SCHED_IDLE",
    "batch": "worker at SCHED_BATCH, nice 10",
    "idle+core": "SCHED_IDLE, one CPU left free",
    "batch+core": "SCHED_BATCH nice 10, one CPU free",
}


def analyse_on_request(models: Path, setup: str, go: Event, done: Queue[float]) -> None:
    """The worker's load: one analysis of the sample CT study per ``go``, its seconds to ``done``.

    The first analysis (models loaded, caches warm) is reported too, and not counted.
    """
    from dicom_ai.service.worker import pipeline_processor

    policy, _, core = setup.partition("+")
    set_priority(policy)
    if core:
        leave_listener_a_core()
    settings = Settings()
    settings.inference.models_dir = str(models)
    settings.inference.num_threads = max(1, len(usable_cpus()) - (0 if core else 1))
    process = pipeline_processor(settings)
    files = sorted(CT_STUDY.rglob("*.dcm"))
    while True:
        started = time.monotonic()
        process(files)
        done.put(time.monotonic() - started)
        if not go.wait(MAX_ANALYSIS_S):
            return
        go.clear()


class Analyser:
    """A worker-like process of one set-up, warmed up, analysing once per :meth:`start`."""

    def __init__(self, models: Path, setup: str) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.go, self.done = ctx.Event(), ctx.Queue()
        self.process = ctx.Process(target=analyse_on_request,
                                   args=(models, setup, self.go, self.done), daemon=True)
        self.process.start()
        self.done.get(timeout=MAX_ANALYSIS_S)  # the warm-up analysis

    def start(self) -> None:
        self.go.set()

    def finished(self) -> bool:
        return not self.done.empty()

    def seconds(self) -> float:
        return float(self.done.get(timeout=MAX_ANALYSIS_S))

    def close(self) -> None:
        self.process.terminate()
        self.process.join()


def measure(scratch: Path, files: list[Path], models: Path, setups: list[str],
            runs: int) -> dict[str, tuple[list[float], list[float]]]:
    """Reception rates (instances/s per send) and analysis seconds of each set-up.

    The set-ups take turns in every round (reception alone, the analysis alone, then each
    set-up), so a change in the machine's background load during the benchmark falls on all of
    them alike.
    """
    settings = Settings()
    settings.scp.port = 0
    settings.storage.minimum_free_mb = 256
    spool = Spool(scratch / "spool")
    listener = start_scp(settings, spool)
    port = int(listener.server_address[1])
    results: dict[str, tuple[list[float], list[float]]] = {
        setup: ([], []) for setup in ["none", "alone", *setups]}
    analysers = {setup: Analyser(models, setup) for setup in ["normal", *setups]}
    try:
        for _ in range(runs):
            results["none"][0].extend(N_INSTANCES / storescu(port, "DICOMAI", files)
                                      for _ in range(3))
            analysers["normal"].start()
            results["alone"][1].append(analysers["normal"].seconds())
            for setup in setups:
                analyser = analysers[setup]
                analyser.start()
                for _ in range(MAX_SENDS):
                    results[setup][0].append(N_INSTANCES / storescu(port, "DICOMAI", files))
                    if analyser.finished():
                        break
                results[setup][1].append(analyser.seconds())
        return results
    finally:
        for analyser in analysers.values():
            analyser.close()
        listener.stop()
        spool.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=Path, default=REPO / "models")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--setups", default=",".join(SETUPS),
                        help="comma-separated, from: " + ", ".join(SETUPS))
    args = parser.parse_args(argv)
    setups = [s for s in args.setups.split(",") if s]
    unknown = [s for s in setups if s not in SETUPS]
    if unknown:
        parser.error(f"unknown set-up {', '.join(unknown)}")
    if len(usable_cpus()) < 2:
        setups = [s for s in setups if not s.endswith("+core")]
    with tempfile.TemporaryDirectory(prefix="pacing-bench-") as tmp:
        scratch = Path(tmp)
        files = copies(ct_slices(scratch), scratch / "bench", N_INSTANCES)
        results = measure(scratch, files, args.models, setups, args.runs)
    base_rate = statistics.median(results["none"][0])
    base_analysis = statistics.median(results["alone"][1])
    print(f"{N_INSTANCES} CT instances per send, storescu → dicom-ai listener, while the CT "
          f"pipeline analyses the sample study; medians of {args.runs} rounds, "
          f"{len(usable_cpus())} usable CPUs")
    print(f"  {'no analysis running':34s} {base_rate:7.1f} instances/s")
    print(f"  {'analysis alone, nothing received':34s} {base_analysis:7.1f} s")
    for setup in setups:
        rates, analyses = results[setup]
        rate, seconds = statistics.median(rates), statistics.median(analyses)
        print(f"  {SETUPS[setup]:34s} {rate:7.1f} instances/s  ratio {rate / base_rate:.2f}   "
              f"analysis {seconds:6.1f} s  ratio {seconds / base_analysis:.2f}  "
              f"({len(rates)} sends)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
