"""Running a network: batching, device placement, mixed precision and Grad-CAM.

Models are loaded once (:mod:`dicom_ai.inference.bundle`); this module only moves arrays
through them. Inference runs under ``torch.inference_mode``; Grad-CAM, which needs
gradients, runs separately on the one image it explains.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import numpy as np
import numpy.typing as npt
import torch

from dicom_ai.inference.bundle import Bundle

FloatArray = npt.NDArray[np.float32]


def _autocast(device: torch.device, amp: bool) -> contextlib.AbstractContextManager[object]:
    # float16 autocast only where it pays and is numerically safe for these CNNs: on CUDA.
    if amp and device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.float16)
    return contextlib.nullcontext()


def batches(items: Sequence[FloatArray], size: int) -> Iterator[FloatArray]:
    """Stack ``items`` (each C×H×W) into arrays of at most ``size``."""
    for start in range(0, len(items), size):
        yield np.stack(items[start:start + size]).astype(np.float32)


def predict_logits(bundle: Bundle, inputs: Sequence[FloatArray], *, batch_size: int = 16,
                   amp: bool = True) -> FloatArray:
    """Raw network outputs for each input, as an N×K float32 array on the CPU."""
    outputs: list[FloatArray] = []
    with torch.inference_mode(), _autocast(bundle.device, amp):
        for batch in batches(inputs, batch_size):
            out = bundle.network(torch.from_numpy(batch).to(bundle.device))
            outputs.append(out.float().cpu().numpy())
    return np.concatenate(outputs) if outputs else np.zeros((0, 0), dtype=np.float32)


def calibrated_softmax(logits: npt.NDArray[np.floating],
                       temperature: float = 1.0) -> npt.NDArray[np.float64]:
    """Row-wise softmax of ``logits / temperature``, in float64 (numerically stable).

    Training chooses operating points with this same function, so a probability compared with
    a bundle's threshold at inference is computed exactly as it was when the threshold was set.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    scaled = np.asarray(logits, dtype=np.float64) / temperature
    scaled -= scaled.max(axis=1, keepdims=True)
    exp = np.exp(scaled)
    return np.asarray(exp / exp.sum(axis=1, keepdims=True), dtype=np.float64)


def gradcam(bundle: Bundle, image: FloatArray, class_index: int,
            layers: Sequence[str]) -> FloatArray:
    """Grad-CAM map (H×W in [0, 1], the input's size) for ``class_index``: the sum of the
    maps at ``layers``, 1 where the evidence for the class is strongest, 0 where there is none.

    An ensemble names one layer per member; each member's map enters unscaled, so it weighs
    as much as its gradients say, as its logit does in the ensemble's mean.

    Raises
    ------
    ValueError
        ``layers`` is empty.
    """
    from monai.visualize.class_activation_maps import GradCAM

    if not layers:
        raise ValueError("Grad-CAM needs at least one layer")
    x = torch.from_numpy(np.ascontiguousarray(image[None], dtype=np.float32)).to(bundle.device)
    raw = np.zeros(image.shape[1:], dtype=np.float64)
    for layer in layers:
        cam = bundle.gradcams.get(layer)
        if cam is None:
            # MONAI's default post-processing maps each map's maximum to 0 and its minimum to
            # 1 (its docstring says so; Project-MONAI/tutorials#1796), which would paint the
            # pixels that matter least hottest. The raw map (ReLU of the gradient-weighted
            # activations, upsampled) is taken and scaled here instead.
            cam = GradCAM(nn_module=bundle.network, target_layers=layer,
                          postprocessing=_unchanged)
            bundle.gradcams[layer] = cam
        with torch.enable_grad():
            heat = cam(x=x, class_idx=class_index)
        raw += np.nan_to_num(heat[0, 0].detach().double().cpu().numpy(), nan=0.0)
    return unit_scaled(raw)


def _unchanged(maps: torch.Tensor) -> torch.Tensor:
    return maps


def unit_scaled(values: npt.NDArray[np.floating]) -> FloatArray:
    """``values`` mapped linearly so that their minimum is 0 and their maximum 1; all zeros
    when they are constant."""
    low, high = float(values.min()), float(values.max())
    if high <= low:
        return np.zeros(values.shape, dtype=np.float32)
    return ((values - low) / (high - low)).astype(np.float32)
