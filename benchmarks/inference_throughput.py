"""Inference on the CPU: images/s per model by batch size and torch threads; CT peak memory.

1. Every bundle under ``models/`` (loaded as ``serve`` loads it, :func:`load_bundle`) runs
   forward passes on inputs of its own shape — the classifiers at their ``preprocessing.size``,
   ``ct-lung`` on 5-slice inputs of a 512² slice at its 1.5 mm grid (240², padded to 16) — for
   each batch size of ``--batches`` and each torch thread count 1 … CPUs, ``--runs`` trials
   alternating over the grid, each at least ``--min-time`` seconds; images/s is the median.
   The speed-up columns compare with batch 1 on the same thread count, and with 1 thread.
2. Peak RSS of a 1,000-slice CT through the CT path (:func:`dicom_ai.inference.ct_lung.analyse_ct`
   with the shipped ``ct-lung`` bundle: HU volume, lung segmentation and measurements, network
   over the resampled volume, candidates, key slices) in a fresh process: the sample CT's real
   slices, each repeated 34 times at 1/34 of its spacing (new positions and UIDs), in a temp dir.
   Reported with the process's RSS before the analysis (interpreter, torch, the model) and the
   size of the volume in float32. Target: ≤ 2 GB.

Usage::

    python benchmarks/inference_throughput.py [--runs 2] [--batches 1,2,4,8,16,32,64]
        [--threads 1,2] [--no-ct] [--ct-only] [--ct-slices 1000]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from cstore_receive import load, machine  # noqa: E402
from e2e_latency import thin_ct_datasets  # noqa: E402

from dicom_ai.inference.bundle import Bundle, load_bundle  # noqa: E402

#: The CT network's input side: a 512² slice of ~0.7 mm pixels on the bundle's 1.5 mm grid,
#: padded to a multiple of 16.
CT_SIDE = 240
CT_SLICES, CT_REPEAT = 1000, 34
RSS_TARGET_GB = 2.0


def input_channels(network: torch.nn.Module) -> int:
    """Channels of the first convolution (what the network reads)."""
    for module in network.modules():
        if isinstance(module, torch.nn.modules.conv._ConvNd):
            return int(module.in_channels)
    raise ValueError("no convolution in the network")


def input_shape(bundle: Bundle) -> tuple[int, int, int]:
    """(channels, height, width) of one network input of ``bundle``."""
    channels = input_channels(bundle.network)
    if bundle.task == "ct-lung":
        return channels, CT_SIDE, CT_SIDE
    size = bundle.dicom_ai["preprocessing"]["size"]
    return channels, int(size[0]), int(size[1])


def images_per_second(bundle: Bundle, batch: int, min_time: float,
                      rng: np.random.Generator) -> float:
    """Forward passes of random [0, 1] batches until ``min_time`` has passed (at least 1,
    after one not timed)."""
    c, h, w = input_shape(bundle)
    data = rng.random((batch, c, h, w), dtype=np.float32)
    with torch.inference_mode():
        bundle.network(torch.from_numpy(data))  # warm-up: allocator, oneDNN kernels
        n, start = 0, time.perf_counter()
        while n < 1 or time.perf_counter() - start < min_time:
            bundle.network(torch.from_numpy(data))
            n += 1
            if n >= 10_000:
                break
        return n * batch / (time.perf_counter() - start)


def throughput(models: Path, batches: list[int], threads: list[int], runs: int,
               min_time: float, ct_max_batch: int) -> dict[tuple[str, int, int], list[float]]:
    """images/s per (model, threads, batch), ``runs`` values each (ct-lung up to
    ``ct_max_batch``)."""
    bundles = [load_bundle(p.parent.parent, device=torch.device("cpu"))
               for p in sorted(models.glob("*/configs/metadata.json"))]
    rng = np.random.default_rng(0)
    results: dict[tuple[str, int, int], list[float]] = {}
    for _ in range(runs):
        for bundle in bundles:
            # Name and version: two versions of one model side by side are two rows.
            name = f"{bundle.name} {bundle.info.version}"
            for t in threads:
                torch.set_num_threads(t)
                for b in batches:
                    if bundle.task == "ct-lung" and b > ct_max_batch:
                        continue
                    results.setdefault((name, t, b), []).append(
                        images_per_second(bundle, b, min_time, rng))
                    print(f"  {name} threads={t} batch={b}: "
                          f"{results[(name, t, b)][-1]:.1f} images/s",
                          file=sys.stderr, flush=True)
    return results


def rss_mb() -> float:
    """This process's resident set now (MiB), from /proc."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def ct_child(folder: Path, models: Path) -> None:
    """In a fresh process: the CT path over ``folder``; prints one JSON line."""
    from dicom_ai.config import InferenceSettings
    from dicom_ai.dicom.collect import collect
    from dicom_ai.inference.ct_lung import analyse_ct

    bundle = load_bundle(models / "ct-lung", device=torch.device("cpu"))
    (study,) = collect(folder).studies
    (series,) = study.series
    before = rss_mb()
    start = time.perf_counter()
    result, failed = analyse_ct(bundle, series, datetime.now(UTC), InferenceSettings())
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"status": result.status, "reason": result.reason, "failed": len(failed),
                      "findings": len(result.findings), "seconds": seconds,
                      "rss_before_mb": before, "peak_rss_mb": peak,
                      "slices": len(series.instances), "threads": torch.get_num_threads()}))


def ct_memory(models: Path, slices: int) -> dict[str, object]:
    """Write the thin CT into a temp dir and run :func:`ct_child` on it in a new process."""
    with tempfile.TemporaryDirectory(prefix="ct-rss-", dir=REPO.parent) as tmp:
        folder = Path(tmp)
        for k, ds in enumerate(thin_ct_datasets(slices, CT_REPEAT)):
            ds.save_as(folder / f"{k:05d}.dcm", enforce_file_format=True)
        out = subprocess.run([sys.executable, __file__, "--ct-child", str(folder), "--models",
                              str(models)], check=True, capture_output=True, text=True,
                             env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=1800)
    result: dict[str, object] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (also read by the unit test)."""
    cpus = os.cpu_count() or 1
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=Path, default=REPO / "models")
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--batches", default="1,2,4,8,16,32,64")
    parser.add_argument("--threads", default=",".join(str(t) for t in range(1, cpus + 1)))
    parser.add_argument("--min-time", type=float, default=0.5,
                        help="seconds per measurement (at least 1 batch after a warm-up)")
    parser.add_argument("--ct-max-batch", type=int, default=16,
                        help="largest ct-lung batch (3 images/s on 2 cores: 64 takes minutes)")
    parser.add_argument("--no-ct", action="store_true", help="skip the 1,000-slice CT")
    parser.add_argument("--ct-only", action="store_true", help="only the 1,000-slice CT")
    parser.add_argument("--ct-slices", type=int, default=CT_SLICES)
    parser.add_argument("--ct-child", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.ct_child is not None:
        ct_child(args.ct_child, args.models)
        return 0
    before = load()
    batches = [int(b) for b in args.batches.split(",")]
    threads = [int(t) for t in args.threads.split(",")]
    results = {} if args.ct_only else throughput(args.models, batches, threads, args.runs,
                                                 args.min_time, args.ct_max_batch)
    ct = None if args.no_ct else ct_memory(args.models, args.ct_slices)
    print(f"CPU inference, torch {torch.__version__}, float32, torch.inference_mode; "
          f"machine: {machine()}; load average before {before}, after {load()}")
    if results:
        print(f"Images/s, median of {args.runs} alternating trials (≥ {args.min_time:g} s "
              f"each); speed-up vs batch 1 at the same threads in brackets")
        print()
        names = sorted({k[0] for k in results})
        print("| model | threads | " + " | ".join(f"batch {b}" for b in batches) + " |")
        print("|---|---|" + "---|" * len(batches))
        for name in names:
            for t in threads:
                base = statistics.median(results[(name, t, batches[0])])
                cells = [f"{statistics.median(results[(name, t, b)]):.1f} "
                         f"({statistics.median(results[(name, t, b)]) / base:.1f}×)"
                         if (name, t, b) in results else "—" for b in batches]
                print(f"| {name} | {t} | " + " | ".join(cells) + " |")
        if len(threads) > 1:
            print()
            scaling = []
            for name in names:
                b = max(k[2] for k in results if k[0] == name)
                ratio = statistics.median(results[(name, threads[-1], b)]) / \
                    statistics.median(results[(name, threads[0], b)])
                scaling.append(f"{name} {ratio:.2f}× at batch {b}")
            print(f"Thread scaling, {threads[-1]} threads vs {threads[0]}: " + "; ".join(scaling))
    if ct is not None:
        peak_gb = float(ct["peak_rss_mb"]) / 1024  # type: ignore[arg-type]
        volume_mb = int(ct["slices"]) * 512 * 512 * 4 / 2**20  # type: ignore[call-overload]
        print()
        print(f"| {ct['slices']}-slice CT through analyse_ct (ct-lung) | value |")
        print("|---|---|")
        print(f"| result | {ct['status']} ({ct['findings']} findings"
              + (f"; {ct['reason']}" if ct["reason"] else "") + ") |")
        print(f"| time | {float(ct['seconds']):.1f} s ({ct['threads']} threads) |")  # type: ignore[arg-type]
        print(f"| RSS before the analysis (Python, torch, model, headers) | "
              f"{float(ct['rss_before_mb']):.0f} MB |")  # type: ignore[arg-type]
        print(f"| **peak RSS** | **{peak_gb:.2f} GB** (HU volume in float32: {volume_mb:.0f} MB) |")
        print()
        print(f"Target peak RSS ≤ {RSS_TARGET_GB:g} GB: "
              f"{'met' if peak_gb <= RSS_TARGET_GB else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
