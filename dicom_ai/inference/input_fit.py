"""Input-fit check: is an image close enough to the training data for the model to judge it?

The network's pooled features of the training images (several layers, shallow to deep) are
summarised by their mean and a shrinkage-regularised inverse covariance (Ledoit–Wolf); an input
whose Mahalanobis distance to that distribution exceeds a threshold fitted on validation images
is rejected before any finding (Lee et al. 2018, "A simple unified framework for detecting
out-of-distribution samples").

The bundle's ``dicom_ai.input_fit`` block (parsed into :class:`~dicom_ai.inference.spec.InputFit`)
names the layers, the statistics file and the threshold. :func:`scored` records the features
while the task runs its own forward pass, so the check costs no extra pass, whatever the
network returns (class logits, or the fracture detector's logit, heatmap and sizes)::

    scores, logits = scored(bundle, fit, lambda: predict_logits(bundle, inputs))
    keep, reason = fitting(scores, fit)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar

import numpy as np
import numpy.typing as npt
import torch
from sklearn.covariance import ledoit_wolf
from torch import nn

from dicom_ai.inference.bundle import Bundle, BundleError
from dicom_ai.inference.runner import predict_logits
from dicom_ai.inference.spec import InputFit

T = TypeVar("T")


def fit_statistics(features: npt.NDArray[np.floating]) -> dict[str, torch.Tensor]:
    """Mean and inverse of the Ledoit–Wolf shrunk covariance of N×D training features.

    Returns
    -------
    dict
        ``{"mean": (D,), "precision": (D, D)}`` float64 tensors, saved with
        :func:`torch.save` and loaded with ``torch.load(..., weights_only=True)``.
    """
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"need N×D features with N >= 2, got shape {x.shape}")
    mean = x.mean(axis=0)
    cov, _shrinkage = ledoit_wolf(x)
    precision = np.linalg.pinv(cov, hermitian=True)
    return {"mean": torch.from_numpy(mean), "precision": torch.from_numpy(precision)}


def mahalanobis(features: npt.NDArray[np.floating] | torch.Tensor,
                stats: dict[str, torch.Tensor]) -> npt.NDArray[np.float64]:
    """Mahalanobis distance sqrt((x−μ)ᵀ Σ⁻¹ (x−μ)) of each row of N×D ``features``."""
    x = torch.as_tensor(features).detach().cpu().to(torch.float64)
    diff = x - stats["mean"].to(torch.float64)
    d2 = ((diff @ stats["precision"].to(torch.float64)) * diff).sum(dim=1)
    return np.asarray(d2.clamp(min=0.0).sqrt().numpy(), dtype=np.float64)


def load_statistics(path: Path) -> dict[str, torch.Tensor]:
    """Statistics written by ``torch.save(fit_statistics(...))``, loaded safely."""
    stats = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(stats, dict) or set(stats) != {"mean", "precision"}:
        raise ValueError(f"{path} does not hold input-fit statistics")
    return stats


def layer_names(fit: dict[str, Any]) -> list[str]:
    """The layers of a bundle's ``input_fit`` block: ``layer`` is one module name or a list."""
    layer = fit["layer"]
    return [layer] if isinstance(layer, str) else [str(n) for n in layer]


class FeatureTap:
    """Context manager that records the outputs of named modules of ``net`` during forward
    passes, each pooled to N×D_i (spatial dimensions averaged) and concatenated to N×ΣD_i.

    Several layers from shallow to deep make a better out-of-distribution detector than the
    last one alone (Lee et al. 2018): shallow layers see colour and texture, deep ones content.

    Parameters
    ----------
    net
        The network.
    layers
        One name or a list of names from ``net.named_modules()``, e.g. ``"layer4"``.

    Raises
    ------
    KeyError
        If a layer is not a module of ``net``.
    """

    def __init__(self, net: nn.Module, layers: str | Sequence[str]) -> None:
        modules = dict(net.named_modules())
        names = [layers] if isinstance(layers, str) else list(layers)
        for name in names:
            if name not in modules:
                raise KeyError(f"no module named {name!r} in {type(net).__name__}")
        self._modules = [modules[n] for n in names]
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._features: list[list[torch.Tensor]] = [[] for _ in names]

    def _hook(self, index: int) -> Any:
        def record(_module: nn.Module, _inputs: Any, output: torch.Tensor) -> None:
            out = output.detach()
            if out.ndim > 2:
                out = out.flatten(2).mean(dim=2)
            self._features[index].append(out.float().cpu())

        return record

    def __enter__(self) -> Self:
        self._features = [[] for _ in self._modules]
        self._handles = [m.register_forward_hook(self._hook(i))
                         for i, m in enumerate(self._modules)]
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    @property
    def features(self) -> torch.Tensor:
        """N×D features of every forward pass made inside the ``with`` block: batches stacked
        along rows, layers side by side in the order given."""
        if not self._features[0]:
            raise RuntimeError("no forward pass recorded")
        return torch.cat([torch.cat(per_layer) for per_layer in self._features], dim=1)


def scored(bundle: Bundle, fit: InputFit, run: Callable[[], T]
           ) -> tuple[npt.NDArray[np.float64], T]:
    """Input-fit scores (Mahalanobis distances) of the images ``run`` passes through
    ``bundle.network``, in the order it passes them, and what ``run`` returns."""
    stats = load_statistics(bundle.file(fit.stats))
    with FeatureTap(bundle.network, fit.layers) as tap:
        out = run()
    return mahalanobis(tap.features, stats), out


def fitting(scores: npt.NDArray[np.float64], fit: InputFit) -> tuple[list[int], str | None]:
    """Indices of the images whose score is within the threshold, and the reason to reject the
    series when none is (None when some are)."""
    keep = [i for i, s in enumerate(scores) if s <= fit.threshold]
    if keep:
        return keep, None
    return keep, (f"the image is unlike the model's training data (input-fit score "
                  f"{float(min(scores)):.1f} > {fit.threshold:.1f})")


def score_and_logits(bundle: Bundle, inputs: Sequence[npt.NDArray[np.float32]], *,
                     batch_size: int = 16,
                     amp: bool = True) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float32]]:
    """Input-fit scores and logits of ``inputs`` of a classification bundle in one forward pass.

    Parameters
    ----------
    bundle
        A loaded bundle whose spec has an input-fit check.
    inputs
        C×H×W model inputs.
    batch_size, amp
        As for :func:`dicom_ai.inference.runner.predict_logits`.

    Raises
    ------
    BundleError
        The bundle declares no input-fit check.
    """
    fit = bundle.spec.input_fit if bundle.spec is not None else None
    if fit is None:
        raise BundleError(f"{bundle.name}: no input-fit check declared")
    return scored(bundle, fit,
                  lambda: predict_logits(bundle, inputs, batch_size=batch_size, amp=amp))
