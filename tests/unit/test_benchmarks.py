"""The benchmark scripts' command lines and the pure helpers their figures rest on.

The benchmarks themselves are not run here (they take minutes and time a shared machine); these
tests keep them importable and check what would make a figure wrong: copies that are not fresh
instances, a thin CT that is not one regular stack, a GPU path that is not the CPU default.
"""

from __future__ import annotations

import contextlib
import importlib
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pydicom
import pytest
import torch

from dicom_ai.dicom.collect import collect
from dicom_ai.imaging.ct import build_volume
from dicom_ai.inference.bundle import Bundle
from dicom_ai.inference.findings import ModelInfo
from dicom_ai.inference.runner import predict_logits
from dicom_ai.inference.spec import Accepts

REPO = Path(__file__).resolve().parents[2]
# The scripts import each other by name, as they do when run from the command line.
sys.path.insert(0, str(REPO / "benchmarks"))
cstore_receive = importlib.import_module("cstore_receive")
e2e_latency = importlib.import_module("e2e_latency")
gpu = importlib.import_module("gpu")
inference_throughput = importlib.import_module("inference_throughput")
lossless_decode = importlib.import_module("lossless_decode")

CT_SAMPLE = REPO / "sample_studies" / "ct-lung-pet-ct-dx-a0002"


@pytest.mark.parametrize("module", [cstore_receive, e2e_latency, inference_throughput, gpu,
                                    lossless_decode])
def test_command_line_parses(module: ModuleType, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--help"])
    assert exit_info.value.code == 0
    assert "usage:" in capsys.readouterr().out


def test_sends_are_fresh_instances_with_the_same_pixels(tmp_path: Path) -> None:
    slices = sorted(CT_SAMPLE.glob("*.dcm"))[:3]
    sends = cstore_receive.Sends(slices, 2, 3)
    first, second = sends.write(tmp_path / "a"), sends.write(tmp_path / "b")
    uids = set()
    for group_a, group_b in zip(first, second, strict=True):
        for a, b, source in zip(group_a, group_b, slices, strict=True):
            da, db, ds = (pydicom.dcmread(p) for p in (a, b, source))
            assert da.PixelData == db.PixelData == ds.PixelData
            assert da.SOPInstanceUID != db.SOPInstanceUID
            assert da.file_meta.MediaStorageSOPInstanceUID == da.SOPInstanceUID
            assert len(da.SOPInstanceUID) <= 64 and len(db.StudyInstanceUID) <= 64
            uids.update({da.SOPInstanceUID, db.SOPInstanceUID})
        # One study and series per association and send.
        assert len({pydicom.dcmread(p).StudyInstanceUID for p in group_a}) == 1
    assert len(uids) == 12
    studies = {pydicom.dcmread(g[0]).StudyInstanceUID for g in (*first, *second)}
    assert len(studies) == 4


#: A child that burns 0.3 s of CPU (process time, so a loaded machine cannot shorten it),
#: reaps it, says so and waits: its parent's tree must hold the grandchild's CPU.
_BURN = "import time\nwhile time.process_time() < 0.3: pass"
_PARENT = (f"import subprocess, sys, time\nsubprocess.run([sys.executable, '-c', {_BURN!r}])\n"
           "print('reaped', flush=True)\ntime.sleep(60)")


def test_receiver_cpu_counts_children_it_has_reaped() -> None:
    proc = subprocess.Popen([sys.executable, "-c", _PARENT], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "reaped\n"
        # /proc keeps each of utime, stime, cutime and cstime in whole clock ticks, rounded
        # down: up to four ticks short of the 0.3 s burnt (0.3 s once failed here, under load).
        # The parent alone, without the reaped child, uses a few hundredths of a second.
        slack = 4 / cstore_receive.CLOCK_TICKS
        assert 0.3 - slack <= cstore_receive.tree_cpu_s(proc.pid) < 5.0
    finally:
        proc.kill()
        proc.wait()


def test_thin_ct_is_one_regular_stack_of_the_real_slices(tmp_path: Path) -> None:
    datasets = e2e_latency.thin_ct_datasets(60, 4)
    for k, ds in enumerate(datasets):
        ds.save_as(tmp_path / f"{k:03d}.dcm", enforce_file_format=True)
    (study,) = collect(tmp_path).studies
    (series,) = study.series
    volume = build_volume(series)
    source = build_volume(collect(CT_SAMPLE).studies[0].series[0])
    assert volume.hu.shape == (60, *source.hu.shape[1:])
    assert volume.spacing[0] == pytest.approx(source.spacing[0] / 4, rel=1e-3)
    # Slice k shows real slice k // 4 of the sample series.
    assert np.array_equal(volume.hu[4 * 7 + 3], source.hu[7])
    assert len({ds.SOPInstanceUID for ds in datasets}) == 60


def test_gpu_benchmark_without_cuda_says_so(capsys: pytest.CaptureFixture[str]) -> None:
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    assert gpu.main([]) == 0
    assert capsys.readouterr().out.strip() == "no CUDA device"


class Recorder(torch.nn.Module):
    """Records whether autocast is on and the input dtype; returns two logits per image."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[bool, torch.dtype]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append((torch.is_autocast_enabled(x.device.type), x.dtype))
        return x.mean(dim=(2, 3)).repeat(1, 2)[:, :2]


def test_serve_path_on_the_cpu_runs_float32_without_autocast_when_amp_is_asked() -> None:
    """The default path the GPU benchmark compares with: AMP is asked for (the default
    setting) and stays off on the CPU."""
    net = Recorder()
    bundle = Bundle(root=Path("."), metadata={}, dicom_ai={}, network=net,
                    device=torch.device("cpu"), info=ModelInfo("m", "0", "2.25.1"),
                    inference_config={}, accepts=Accepts(modality=("OT",)))
    items = [np.full((1, 4, 4), v, dtype=np.float32) for v in (0.25, 0.75, 1.0)]
    logits = predict_logits(bundle, items, batch_size=2, amp=True)
    assert logits.dtype == np.float32 and logits.shape == (3, 2)
    assert logits[:, 0] == pytest.approx([0.25, 0.75, 1.0])
    assert net.seen == [(False, torch.float32), (False, torch.float32)]


def test_gpu_benchmark_helpers_are_no_ops_on_the_cpu() -> None:
    cpu = torch.device("cpu")
    assert isinstance(gpu.autocast(cpu, True), contextlib.nullcontext)
    gpu.synchronize(cpu)
    assert not gpu.host_batch((1, 1, 2, 2), cpu).is_pinned()
    net = torch.nn.Conv2d(1, 2, 3)
    with gpu.channels_last(net):
        assert net.weight.is_contiguous(memory_format=torch.channels_last)
    assert net.weight.is_contiguous()
