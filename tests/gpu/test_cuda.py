"""The CUDA path: with a GPU in sight, inference and training run on it and agree with the CPU.

Skipped where torch sees no CUDA device (CI has none); ``scripts/gpu_check.sh`` runs this
module on a GPU machine.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from dicom_ai.inference.bundle import Bundle, load_bundle, select_device
from dicom_ai.inference.ct_lung import probability_map
from dicom_ai.inference.fracture import forward
from dicom_ai.inference.fracture_net import FractureNet
from dicom_ai.inference.runner import predict_logits
from dicom_ai.train import fracture as tf
from dicom_ai.train.augment import AugmentConfig
from dicom_ai.train.datasets import ImageSet
from dicom_ai.train.loop import LoopConfig, device, fit, global_rng_state, set_global_rng_state
from tests.fracture_data import tiny_fracture_set

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

MODELS = Path(__file__).resolve().parents[2] / "models"
BUNDLES = sorted(p for p in MODELS.iterdir() if (p / "configs" / "metadata.json").exists())
CPU = torch.device("cpu")


def _inputs(bundle: Bundle, n: int) -> list[np.ndarray]:
    conv = next(m for m in bundle.network.modules()
                if isinstance(m, torch.nn.modules.conv._ConvNd))
    pre = bundle.dicom_ai["preprocessing"]
    h, w = pre["patch_size"] if bundle.task == "ct-lung" else pre["size"]
    rng = np.random.default_rng(0)
    return list(rng.random((n, int(conv.in_channels), int(h), int(w)), dtype=np.float32))


def _outputs(bundle: Bundle, inputs: list[np.ndarray], amp: bool) -> np.ndarray:
    """What serve computes from the network (probabilities for ct-lung, raw outputs else)."""
    if bundle.task == "ct-lung":
        return probability_map(bundle.network, np.stack(inputs), device=bundle.device, amp=amp)
    if bundle.task == "xr-fracture":
        # Its serve path (fracture.forward) runs in float32 whatever the device.
        logits, heats, sizes = forward(bundle, inputs, batch_size=4)
        return np.concatenate([logits[:, None], heats.reshape(len(inputs), -1),
                               sizes.reshape(len(inputs), -1)], 1)
    return predict_logits(bundle, inputs, amp=amp)


def test_auto_device_is_the_gpu() -> None:
    assert select_device("auto").type == "cuda"
    assert device().type == "cuda"


@pytest.mark.parametrize("path", BUNDLES, ids=lambda p: p.name)
def test_bundle_on_the_gpu_matches_the_cpu(path: Path) -> None:
    cpu = load_bundle(path, device=CPU)
    gpu = load_bundle(path, device=select_device("cuda"))
    assert next(gpu.network.parameters()).is_cuda
    inputs = _inputs(cpu, 4)
    reference = _outputs(cpu, inputs, amp=False)
    scale = float(np.abs(reference).max()) or 1.0
    # float32 on CUDA may use TF32 convolutions (10-bit mantissa); serve's float16 autocast
    # rounds more. Both must stay well inside what moves a probability or a box.
    fp32 = np.abs(_outputs(gpu, inputs, amp=False) - reference).max() / scale
    fp16 = np.abs(_outputs(gpu, inputs, amp=True) - reference).max() / scale
    print(f"{path.name}: max |gpu - cpu| / max |cpu| = {fp32:.2e} (fp32), {fp16:.2e} (fp16)")
    assert fp32 < 1e-2
    assert fp16 < 3e-2


def test_checkpointed_generators_include_cuda() -> None:
    # Dropout on the GPU draws from CUDA's generator: a resumed run needs it back.
    state = global_rng_state()
    first = torch.rand(4, device="cuda")
    torch.rand(4, device="cuda")
    set_global_rng_state(state)
    assert torch.equal(torch.rand(4, device="cuda"), first)
    assert torch.backends.cudnn.deterministic


def test_classification_training_runs_on_the_gpu() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, size=128).astype(np.int64)
    images = (rng.uniform(0.0, 0.4, size=(128, 1, 8, 8)) + 0.5 * labels[:, None, None, None])
    names = tuple(str(i) for i in range(128))
    data = ImageSet(images.astype(np.float16), labels, names, names)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(),
                              torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                              torch.nn.Linear(4, 2))
    history = fit(net, data, data, 2, AugmentConfig(),
                  LoopConfig(epochs=4, batch_size=32, lr=1e-2), lambda _s: None)
    assert next(net.parameters()).is_cuda
    assert history.best_auc > 0.95


def test_fracture_training_runs_on_the_gpu(tmp_path: Path) -> None:
    data = tiny_fracture_set()
    torch.manual_seed(1)
    net = FractureNet(widths=(4, 4, 4, 4, 4), fpn_channels=4, dropout=0.5)
    state = tf.train(net, data, data, LoopConfig(epochs=2, batch_size=4, lr=2e-3),
                     checkpoint=tmp_path / "c.pt", log=lambda _s: None)
    assert state.epoch == 2 and next(net.parameters()).is_cuda
    assert all(np.isfinite(h["loss_cls"]) for h in state.history)
