"""JPEG Lossless decoding: GDCM in the decoder process (ours) against GDCM in this process.

JPEG Lossless is decoded in a child process (:mod:`dicom_ai.dicom.decoder_process`), because
GDCM, its one decoder here, aborts the process it runs in on some malformed files. This measures
what that costs on a lossless CT series: the sample CT's slices (512 × 512, 12 bits stored),
compressed with DCMTK's ``dcmcjpeg +e1`` (JPEG Lossless, first-order prediction), decoded

* by :func:`dicom_ai.dicom.pixels.decode_pixels` (ours: the checks, then GDCM in the child and
  the array back through a pipe), and
* by :func:`dicom_ai.dicom.pixels.decode_file` in this process: the same read and the same GDCM
  call with no child, as pydicom's own ``pixel_array`` decodes it.

The two alternate, ``--runs`` times over ``--slices`` decodes each (the 30 slices in turn); the
medians are printed with their ratio, every array is checked equal to the in-process one, and
the child's start-up (paid once per worker process, and again after an abort) is timed apart.

Usage::

    python benchmarks/lossless_decode.py [--slices 300] [--runs 3]
"""

from __future__ import annotations

import argparse
import itertools
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from cstore_receive import load, machine  # noqa: E402

from dicom_ai.dicom import decoder_process  # noqa: E402
from dicom_ai.dicom.io import read_header  # noqa: E402
from dicom_ai.dicom.model import Instance  # noqa: E402
from dicom_ai.dicom.pixels import decode_file, decode_pixels  # noqa: E402

CT_SAMPLE = REPO / "sample_studies" / "ct-lung-pet-ct-dx-a0002"


def compress(sources: list[Path], folder: Path) -> list[Path]:
    """Each source slice as JPEG Lossless SV1, by DCMTK."""
    out = []
    env = {**os.environ, "TCP_NODELAY": "1"}
    for source in sources:
        target = folder / source.name
        subprocess.run(["dcmcjpeg", "+e1", str(source), str(target)], check=True, env=env)
        out.append(target)
    return out


def timed_pass(files: list[Path], slices: int, decode: Callable[[Path], object]) -> float:
    """Seconds to decode ``slices`` files, cycling through ``files``."""
    started = time.perf_counter()
    for path in itertools.islice(itertools.cycle(files), slices):
        decode(path)
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slices", type=int, default=300, help="decodes per pass")
    parser.add_argument("--runs", type=int, default=3, help="passes of each")
    args = parser.parse_args(argv)
    if shutil.which("dcmcjpeg") is None:
        print("dcmcjpeg (DCMTK) is needed to make the JPEG Lossless series", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        files = compress(sorted(CT_SAMPLE.glob("*.dcm")), Path(tmp))
        instances = {path: Instance(path, read_header(path)) for path in files}

        def ours(path: Path) -> npt.NDArray[Any]:
            return decode_pixels(instances[path]).array

        def in_process(path: Path) -> npt.NDArray[Any]:
            return decode_file(path, in_decoder_process=True).array

        decoder_process.stop()
        started = time.perf_counter()
        ours(files[0])
        start_up = time.perf_counter() - started
        for path in files:
            if not np.array_equal(ours(path), in_process(path)):
                print(f"{path.name}: the two decodes differ", file=sys.stderr)
                return 1
        times: dict[str, list[float]] = {"ours": [], "in process": []}
        for _ in range(args.runs):
            times["in process"].append(timed_pass(files, args.slices, in_process))
            times["ours"].append(timed_pass(files, args.slices, ours))
    pixels_mb = args.slices * 512 * 512 * 2 / 2**20
    print(f"JPEG Lossless SV1 CT, 512 x 512 x 16 bit, {args.slices} decodes per pass, "
          f"median of {args.runs}; {machine()}; {load()}")
    print("| decoder | ms per slice | MiB/s decoded |")
    print("|---|---|---|")
    medians = {name: statistics.median(values) for name, values in times.items()}
    for name, seconds in medians.items():
        print(f"| GDCM {name} | {1000 * seconds / args.slices:.2f} | {pixels_mb / seconds:.0f} |")
    print(f"ratio ours / in process: {medians['ours'] / medians['in process']:.2f}; "
          f"decoder process start-up with the first slice: {1000 * start_up:.0f} ms; "
          f"all {len(files)} slices identical")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
