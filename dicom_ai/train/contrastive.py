"""Self-supervised pretraining (SimCLR) of a network's encoder on unlabelled images.

Transfer learning without downloadable weights: an encoder first learns, without labels, to
tell two random views of one image from the views of every other image in the batch (Chen et
al., "A simple framework for contrastive learning of visual representations", ICML 2020), then
starts a task's training (:func:`dicom_ai.train.run.load_warm_start` copies it). A view
is an affine zoom into part of the image (SimCLR's crop), shift, rotation, flips and intensity
changes, sampled at a reduced side so that pretraining is affordable on a CPU; the loss is
NT-Xent on a 2-layer projection of the pooled deepest features, which training then discards.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from torch import nn

from dicom_ai.inference.fracture_net import FractureNet
from dicom_ai.train.augment import AugmentConfig, augment
from dicom_ai.train.loop import learning_rate, read_checkpoint, write_checkpoint
from dicom_ai.train.run import build_network, module_state

#: The FractureNet modules pretraining trains and a warm start copies.
FRACTURE_ENCODER = ("stem", "stages")

#: A zoom up to 2.2× shows 1/2.2 of the image's side: SimCLR's crops, as an affine map.
RADIOGRAPH_VIEWS = AugmentConfig(rotate_deg=20.0, scale=(1.0, 2.2), translate=0.25, hflip=True,
                                 vflip=True, brightness=0.15, contrast=(0.6, 1.4),
                                 gamma=(0.6, 1.6))


@dataclass(frozen=True)
class ContrastiveConfig:
    """How pretraining runs."""

    epochs: int = 20
    #: Images a step; the loss sees twice as many views.
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 1e-4
    temperature: float = 0.2
    #: Side (px) the views are sampled at (:func:`~dicom_ai.train.augment.augment`'s size).
    view_side: int = 160
    views: AugmentConfig = RADIOGRAPH_VIEWS
    seed: int = 0


class FractureEncoder(nn.Module):
    """A FractureNet's encoder (the network itself, not a copy), its deepest features pooled as
    its classifier pools them, then the projection head."""

    def __init__(self, net: FractureNet, projection: int = 128) -> None:
        super().__init__()
        self.net = net
        head = net.classifier[1]
        if not isinstance(head, nn.Linear):
            raise TypeError("a FractureNet's classifier ends in a linear layer")
        width = head.in_features
        self.projection = nn.Sequential(nn.Linear(width, width), nn.ReLU(),
                                        nn.Linear(width, projection))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.projection(self.net.pool(self.net.encode(x)[-1])), dim=1)


def nt_xent(z: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's loss for 2N unit embeddings whose rows k and k + N are two views of one image:
    the mean over rows of the cross-entropy of picking the other view among the 2N − 1 others,
    similarities being cosines over ``temperature``."""
    n = len(z) // 2
    sim = z @ z.T / temperature
    sim.fill_diagonal_(float("-inf"))
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(n)])
    return F.cross_entropy(sim, target)


def pretrain(network_def: dict[str, Any], images: npt.NDArray[np.float16],
             cfg: ContrastiveConfig, *, checkpoint: Path, resume: bool = False,
             log: Callable[[str], None] = print) -> dict[str, torch.Tensor]:
    """Build the FractureNet ``network_def`` names from ``cfg.seed``, train its encoder on
    ``images`` (N×C×H×W in [0, 1]) and return its :data:`FRACTURE_ENCODER` weights. A
    checkpoint after every epoch lets a cut-off run resume (``resume``) where it stopped.

    Raises
    ------
    ValueError
        ``network_def`` is not a FractureNet, or ``images`` do not fill one batch.
    ~dicom_ai.train.loop.CheckpointMismatch
        Resuming from a checkpoint of another configuration, network or image count.
    """
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    net = build_network(network_def)
    if not isinstance(net, FractureNet):
        raise ValueError(f"{network_def.get('_target_')} is not a FractureNet")
    enc = FractureEncoder(net)
    opt = torch.optim.AdamW(enc.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps = len(images) // cfg.batch_size
    if steps == 0:
        raise ValueError(f"{len(images)} images do not fill one batch of {cfg.batch_size}")
    start = 0
    settings = {"config": asdict(cfg), "network_def": network_def,
                "n_images": len(images)}
    if resume and checkpoint.exists():
        ck = read_checkpoint(checkpoint, settings)
        enc.load_state_dict(ck["enc"])
        opt.load_state_dict(ck["opt"])
        gen.set_state(ck["gen"])
        start = int(ck["epoch"])
        log(f"resumed after epoch {start}")
    enc.train()
    side = (cfg.view_side, cfg.view_side)
    for epoch in range(start, cfg.epochs):
        t0 = time.monotonic()
        order = torch.randperm(len(images), generator=gen).numpy()
        total = 0.0
        for b in range(steps):
            lr = learning_rate((epoch + b / steps) / cfg.epochs, cfg.lr, warmup=0.05)
            for group in opt.param_groups:
                group["lr"] = lr
            idx = np.sort(order[b * cfg.batch_size:(b + 1) * cfg.batch_size])
            x = torch.from_numpy(images[idx].astype(np.float32))
            loss = nt_xent(enc(torch.cat([augment(x, cfg.views, gen, size=side),
                                          augment(x, cfg.views, gen, size=side)])),
                           cfg.temperature)
            opt.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            opt.step()
            total += float(loss.item())
        write_checkpoint(checkpoint, {"enc": enc.state_dict(), "opt": opt.state_dict(),
                                      "gen": gen.get_state(), "epoch": epoch + 1}, settings)
        log(f"epoch {epoch + 1}/{cfg.epochs} nt-xent {total / steps:.4f} "
            f"{time.monotonic() - t0:.0f}s")
    return encoder_state(net)


def encoder_state(net: nn.Module) -> dict[str, torch.Tensor]:
    """The :data:`FRACTURE_ENCODER` part of ``net``'s state dict."""
    return module_state(net, FRACTURE_ENCODER)
