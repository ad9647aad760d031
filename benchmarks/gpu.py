"""Inference on a CUDA GPU: images/s per model with AMP bf16, channels_last, batching and
``torch.compile``, and the share of time spent moving data. Prints "no CUDA device" and exits 0
where torch sees none.

For every bundle under ``models/`` (loaded as ``serve`` loads it, on the GPU) and each batch size
of ``--batches``, with inputs of the model's own shape (see ``inference_throughput.py``):

* ``fp32``: the network as loaded;
* ``bf16``: under ``torch.autocast("cuda", torch.bfloat16)``;
* ``bf16+cl``: bf16 with the network and inputs in ``channels_last``;
* ``bf16+cl+compile``: the same through ``torch.compile`` (largest batch only: each batch size
  is a compilation; the compile time is printed);
* ``serve path``: the code ``serve`` runs (:func:`dicom_ai.inference.runner.predict_logits`,
  :func:`dicom_ai.inference.ct_lung.probability_map`), numpy in, numpy out.

Compute images/s has the batch already on the GPU (CUDA events, synchronised); end-to-end adds
the host → device copy of a numpy batch (pinned) and the copy of the output back; the data
movement share is the time of those two copies alone over copies + compute. Each figure is the
median of ``--runs`` measurements of at least ``--min-time`` seconds. ``--device cpu`` runs the
same code on the CPU (no autocast, no compile) to check the script where no GPU is. Usage::

    python benchmarks/gpu.py [--batches 1,8,32,64,128] [--runs 3] [--no-compile]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from inference_throughput import input_shape  # noqa: E402

from dicom_ai.inference.bundle import Bundle, load_bundle  # noqa: E402

VARIANTS = ("fp32", "bf16", "bf16+cl", "bf16+cl+compile", "serve path")


def autocast(device: torch.device, bf16: bool) -> contextlib.AbstractContextManager[object]:
    """bf16 autocast on CUDA; nothing on the CPU (CPU inference stays float32)."""
    if bf16 and device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(step: Callable[[], object], device: torch.device, min_time: float) -> float:
    """Seconds per call of ``step``: warm-up, then calls until ``min_time`` (at least 3)."""
    step()
    synchronize(device)
    n, start = 0, time.perf_counter()
    while n < 3 or time.perf_counter() - start < min_time:
        step()
        n += 1
        if n >= 100_000:
            break
    synchronize(device)
    return (time.perf_counter() - start) / n


def host_batch(shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """A random [0, 1] batch in host memory, pinned when it will be copied to a GPU."""
    data = torch.from_numpy(np.random.default_rng(0).random(shape, dtype=np.float32))
    return data.pin_memory() if device.type == "cuda" else data


@contextlib.contextmanager
def channels_last(network: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """The network in ``channels_last`` for the block, restored to contiguous after."""
    to_format(network, torch.channels_last)
    try:
        yield network
    finally:
        to_format(network, torch.contiguous_format)


def to_format(network: torch.nn.Module, fmt: torch.memory_format) -> None:
    """Move the network's 4D weights to ``fmt`` (``Module.to`` takes it; its stubs do not)."""
    network.to(memory_format=fmt)  # type: ignore[call-overload]


def measure(bundle: Bundle, batch: int, variant: str, runs: int, min_time: float,
            compiled: dict[str, torch.nn.Module]) -> tuple[float, float, float]:
    """Compute images/s, end-to-end images/s and the share of the copies (input in, first
    output out) in copies + compute, of one variant; medians of ``runs``."""
    device = bundle.device
    c, h, w = input_shape(bundle)
    host = host_batch((batch, c, h, w), device)
    if variant == "serve path":
        step = serve_path_step(bundle, host.numpy(), batch)
        e2e = statistics.median(timed(step, device, min_time) for _ in range(runs))
        return batch / e2e, batch / e2e, float("nan")
    bf16 = variant != "fp32"
    cl = "+cl" in variant
    fmt = torch.channels_last if cl else torch.contiguous_format
    with contextlib.ExitStack() as stack:
        network = stack.enter_context(channels_last(bundle.network)) if cl else bundle.network
        if "compile" in variant:
            network = compiled[bundle.name]
        on_device = host.to(device).contiguous(memory_format=fmt)

        def compute() -> object:
            with torch.inference_mode(), autocast(device, bf16):
                return network(on_device)

        def end_to_end() -> object:
            with torch.inference_mode(), autocast(device, bf16):
                x = host.to(device, non_blocking=True).contiguous(memory_format=fmt)
                out = network(x)
                first = out[0] if isinstance(out, (list, tuple)) else out
                return first.float().cpu()

        result = compute()
        out = result[0] if isinstance(result, (list, tuple)) else result
        assert isinstance(out, torch.Tensor)

        def movement() -> object:
            host.to(device, non_blocking=True)
            return out.float().cpu()

        t_compute = statistics.median(timed(compute, device, min_time) for _ in range(runs))
        t_e2e = statistics.median(timed(end_to_end, device, min_time) for _ in range(runs))
        t_move = statistics.median(timed(movement, device, min_time) for _ in range(runs))
    return batch / t_compute, batch / t_e2e, t_move / (t_move + t_compute)


def serve_path_step(bundle: Bundle, batch: np.ndarray, size: int) -> Callable[[], object]:
    """One call of the function ``serve`` runs for this bundle, on ``batch`` (numpy)."""
    if bundle.task == "ct-lung":
        from dicom_ai.inference.ct_lung import probability_map

        return lambda: probability_map(bundle.network, batch, device=bundle.device,
                                       batch_size=size, amp=True)
    items = list(batch)
    if bundle.task == "xr-fracture":
        from dicom_ai.inference.fracture import forward

        return lambda: forward(bundle, items, size)
    from dicom_ai.inference.runner import predict_logits

    return lambda: predict_logits(bundle, items, batch_size=size, amp=True)


def compile_network(bundle: Bundle, batch: int) -> tuple[torch.nn.Module, float]:
    """``torch.compile`` of the network in channels_last, compiled at ``batch``; its seconds."""
    c, h, w = input_shape(bundle)
    network = bundle.network
    to_format(network, torch.channels_last)
    compiled = torch.compile(network, dynamic=False)
    x = torch.rand((batch, c, h, w), device=bundle.device).contiguous(
        memory_format=torch.channels_last)
    start = time.perf_counter()
    with torch.inference_mode(), autocast(bundle.device, True):
        compiled(x)
    synchronize(bundle.device)
    seconds = time.perf_counter() - start
    to_format(network, torch.contiguous_format)
    return compiled, seconds  # type: ignore[return-value]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (also read by the unit test)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=Path, default=REPO / "models")
    parser.add_argument("--batches", default="1,8,32,64,128")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--min-time", type=float, default=0.3)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="cpu: check the script without a GPU")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device")
        return 0
    device = torch.device(args.device)
    batches = [int(b) for b in args.batches.split(",")]
    use_compile = not args.no_compile and device.type == "cuda"
    variants = [v for v in VARIANTS if use_compile or "compile" not in v]
    bundles = [load_bundle(p.parent.parent, device=device)
               for p in sorted(args.models.glob("*/configs/metadata.json"))]
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        name = torch.cuda.get_device_name(device)
        props = torch.cuda.get_device_properties(device)
        cudnn = torch.backends.cudnn.version()  # type: ignore[no-untyped-call]
        print(f"GPU: {name}, {props.total_memory / 2**30:.0f} GiB; torch {torch.__version__}, "
              f"CUDA {torch.version.cuda}, cuDNN {cudnn}")
    else:
        print(f"CPU check run (no autocast, no compile); torch {torch.__version__}")
    compiled: dict[str, torch.nn.Module] = {}
    compile_s: dict[str, float] = {}
    if use_compile:
        for bundle in bundles:
            compiled[bundle.name], compile_s[bundle.name] = compile_network(bundle, batches[-1])
    print()
    print("| model | input | variant | " + " | ".join(f"batch {b}" for b in batches)
          + f" | data movement at batch {batches[-1]} |")
    print("|---|---|---|" + "---|" * len(batches) + "---|")
    for bundle in bundles:
        c, h, w = input_shape(bundle)
        for variant in variants:
            cells, share = [], ""
            for b in batches:
                if "compile" in variant and b != batches[-1]:
                    cells.append("—")
                    continue
                compute, e2e, moving = measure(bundle, b, variant, args.runs, args.min_time,
                                               compiled)
                if variant == "serve path":
                    cells.append(f"{e2e:.0f}")
                else:
                    cells.append(f"{compute:.0f} / {e2e:.0f}")
                if b == batches[-1] and variant != "serve path":
                    share = f"{100 * moving:.0f} %"
                print(f"  {bundle.name} {variant} batch {b}: {cells[-1]}", file=sys.stderr,
                      flush=True)
            print(f"| {bundle.name} | {c}×{h}×{w} | {variant} | " + " | ".join(cells)
                  + f" | {share} |")
    print()
    print("Cells: images/s with the batch on the GPU / end to end (numpy batch copied in, "
          "output copied out); serve path: end to end only.")
    if compile_s:
        print("torch.compile time at batch " + str(batches[-1]) + ": "
              + ", ".join(f"{k} {v:.0f} s" for k, v in compile_s.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
