"""Batch augmentation on tensors (N×C×H×W in [0, 1]), seeded through a ``torch.Generator``.

Working on whole batches keeps augmentation cheap next to the network on a 2-core CPU.

- Chest X-ray: small rotation, scale and translation (patient positioning varies a little),
  brightness, contrast and gamma (exposure and processing differ between devices). No flips:
  the heart is on the left and an upside-down chest film does not occur.
- Fundus: horizontal and vertical flips and any rotation (left and right eyes mirror each other;
  the camera's circular field has no preferred orientation), brightness, contrast and
  saturation (camera colour balance differs).
- Dermoscopy: flips and any rotation (a lesion seen through a dermatoscope has no up or down),
  some zoom (lesions are framed more or less tightly), brightness, contrast, gamma and
  saturation (dermatoscopes and their light sources differ).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class AugmentConfig:
    """Ranges of the random transforms; a range (a, b) is sampled uniformly."""

    rotate_deg: float = 0.0
    scale: tuple[float, float] = (1.0, 1.0)
    translate: float = 0.0
    hflip: bool = False
    vflip: bool = False
    brightness: float = 0.0
    contrast: tuple[float, float] = (1.0, 1.0)
    gamma: tuple[float, float] = (1.0, 1.0)
    saturation: tuple[float, float] = (1.0, 1.0)


CXR = AugmentConfig(rotate_deg=10.0, scale=(0.9, 1.1), translate=0.06, brightness=0.08,
                    contrast=(0.85, 1.15), gamma=(0.8, 1.25))
FUNDUS = AugmentConfig(rotate_deg=180.0, scale=(0.95, 1.05), translate=0.03, hflip=True,
                       vflip=True, brightness=0.08, contrast=(0.85, 1.15),
                       saturation=(0.8, 1.2))
DERMOSCOPY = AugmentConfig(rotate_deg=180.0, scale=(0.9, 1.15), translate=0.05, hflip=True,
                           vflip=True, brightness=0.08, contrast=(0.8, 1.2), gamma=(0.85, 1.2),
                           saturation=(0.8, 1.2))


def _uniform(n: int, bounds: tuple[float, float], gen: torch.Generator) -> torch.Tensor:
    low, high = bounds
    return low + (high - low) * torch.rand(n, generator=gen)


def affine_matrices(n: int, cfg: AugmentConfig, gen: torch.Generator) -> torch.Tensor:
    """N×2×3 matrices for :func:`torch.nn.functional.affine_grid` (output → input coordinates).

    Rotation by θ and isotropic zoom s map output coordinates through ``R(θ)/s``; flips negate
    an axis; translation is a fraction of the half-width (grid coordinates span [-1, 1]).
    """
    theta = _uniform(n, (-cfg.rotate_deg, cfg.rotate_deg), gen) * (math.pi / 180.0)
    inv_scale = 1.0 / _uniform(n, cfg.scale, gen)
    cos, sin = torch.cos(theta) * inv_scale, torch.sin(theta) * inv_scale
    fx = torch.ones(n)
    fy = torch.ones(n)
    if cfg.hflip:
        fx = torch.where(torch.rand(n, generator=gen) < 0.5, -fx, fx)
    if cfg.vflip:
        fy = torch.where(torch.rand(n, generator=gen) < 0.5, -fy, fy)
    tx = _uniform(n, (-2 * cfg.translate, 2 * cfg.translate), gen)
    ty = _uniform(n, (-2 * cfg.translate, 2 * cfg.translate), gen)
    row0 = torch.stack([cos * fx, -sin * fy, tx], dim=1)
    row1 = torch.stack([sin * fx, cos * fy, ty], dim=1)
    return torch.stack([row0, row1], dim=1)


def intensity(x: torch.Tensor, cfg: AugmentConfig, gen: torch.Generator) -> torch.Tensor:
    """Random gamma, contrast about the image mean, brightness and (colour) saturation."""
    n = x.shape[0]
    shape = (n, 1, 1, 1)
    out = x.clamp(0.0, 1.0) ** _uniform(n, cfg.gamma, gen).view(shape)
    mean = out.mean(dim=(1, 2, 3), keepdim=True)
    out = (out - mean) * _uniform(n, cfg.contrast, gen).view(shape) + mean
    out = out + _uniform(n, (-cfg.brightness, cfg.brightness), gen).view(shape)
    if x.shape[1] == 3:
        grey = out.mean(dim=1, keepdim=True)
        out = (out - grey) * _uniform(n, cfg.saturation, gen).view(shape) + grey
    return out.clamp(0.0, 1.0)


def augment(x: torch.Tensor, cfg: AugmentConfig, gen: torch.Generator,
            size: tuple[int, int] | None = None) -> torch.Tensor:
    """Geometric then intensity augmentation of a batch; outside the image is 0 (black), as
    padding is at inference. The result is sampled at ``size`` (H, W), by default the input's
    (a smaller one gives SimCLR's reduced views)."""
    out = list(x.shape[:2]) + list(size) if size is not None else list(x.shape)
    grid = F.affine_grid(affine_matrices(x.shape[0], cfg, gen).to(x.dtype), out,
                         align_corners=False)
    warped = F.grid_sample(x, grid.to(x.device), mode="bilinear", padding_mode="zeros",
                           align_corners=False)
    return intensity(warped, cfg, gen)
