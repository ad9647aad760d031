"""What the reception gate buys: C-STORE rate while a CNN runs, with and without the gate.

The listener of ``dicom-ai serve`` (in this process) receives the 200 CT instances of
``cstore_receive.py`` from DCMTK ``storescu`` three ways, ``--runs`` sends each:

1. nothing else running;
2. a worker-like process (nice 10, one torch thread) running the ct-lung network (MONAI
   BasicUNet, 2D, 3 channels) forward in a loop;
3. the same, with :class:`dicom_ai.service.gate.ReceptionGate` hooked into every layer, as
   ``dicom-ai serve``'s worker does.

It prints the median instances/s of each and the ratios to the first. Usage::

    python benchmarks/reception_gate.py [--runs 4]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from multiprocessing.sharedctypes import Synchronized
from multiprocessing.synchronize import Event
from pathlib import Path

from cstore_receive import N_INSTANCES, copies, ct_slices, storescu

from dicom_ai.config import Settings
from dicom_ai.service.gate import ReceptionGate
from dicom_ai.service.scp import start_scp
from dicom_ai.service.spool import Spool


def inference_loop(clock: Synchronized[float], gated: bool, stop: Event) -> None:
    """The worker's load: one torch thread at nice 10, forward passes until ``stop``."""
    os.nice(10)
    import torch
    from monai.networks.nets.basic_unet import BasicUNet

    torch.set_num_threads(1)
    net = BasicUNet(spatial_dims=2, in_channels=3, out_channels=1).eval()
    if gated:
        torch.nn.modules.module.register_module_forward_pre_hook(ReceptionGate(clock, 2.0))
    x = torch.zeros(4, 3, 256, 256)
    with torch.inference_mode():
        while not stop.is_set():
            net(x)


def measure(scratch: Path, files: list[Path], load: str, runs: int) -> list[float]:
    ctx = multiprocessing.get_context("spawn")
    clock = ctx.Value("d", 0.0, lock=False)
    settings = Settings()
    settings.scp.port = 0
    settings.storage.minimum_free_mb = 256
    spool = Spool(scratch / f"spool-{load}")
    listener = start_scp(settings, spool, reception=clock)
    stop = ctx.Event()
    worker = None
    if load != "idle":
        worker = ctx.Process(target=inference_loop, args=(clock, load == "gated", stop))
        worker.start()
        time.sleep(8)  # imports and first forward passes
    try:
        port = int(listener.server_address[1])
        return [storescu(port, "DICOMAI", files) for _ in range(runs)]
    finally:
        stop.set()
        if worker is not None:
            worker.join()
        listener.stop()
        spool.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=4)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="gate-bench-") as tmp:
        scratch = Path(tmp)
        files = copies(ct_slices(scratch), scratch / "bench", N_INSTANCES)
        results = {load: measure(scratch, files, load, args.runs)
                   for load in ("idle", "ungated", "gated")}
    rate = {load: N_INSTANCES / statistics.median(t) for load, t in results.items()}
    print(f"{N_INSTANCES} CT instances, storescu → dicom-ai listener, median of {args.runs}")
    for load, label in [("idle", "no inference"), ("ungated", "CNN running, no gate"),
                        ("gated", "CNN running, gate on")]:
        print(f"  {label:24s} {rate[load]:7.1f} instances/s  ratio to idle "
              f"{rate[load] / rate['idle']:.2f}  runs: "
              f"{', '.join(f'{t:.2f}s' for t in results[load])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
