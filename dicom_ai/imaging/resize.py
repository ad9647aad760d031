"""Resizing shared by every 2D modality."""

from __future__ import annotations

from typing import Literal

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F

Aspect = Literal["stretch", "pad"]


def content_box(shape: tuple[int, int], size: tuple[int, int], *,
                aspect: Aspect = "pad") -> tuple[int, int, int, int]:
    """Where an H×W image lands inside the ``size`` network input: (top, left, height, width).

    Used both to place the image and to map a Grad-CAM map back onto the source image.
    """
    h, w = shape
    th, tw = size
    if aspect == "stretch":
        return 0, 0, th, tw
    scale = min(th / h, tw / w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    return (th - nh) // 2, (tw - nw) // 2, nh, nw


def resize_2d(image: npt.NDArray[np.float32], size: tuple[int, int], *,
              aspect: Aspect = "pad") -> npt.NDArray[np.float32]:
    """Resize a C×H×W float image to C×size[0]×size[1] with area/bilinear interpolation.

    ``aspect="pad"`` keeps the aspect ratio and pads the short side with zeros (centred);
    ``aspect="stretch"`` resizes each axis independently — right for a model whose training
    images were themselves stretched to a square (the Kermany 224 px release is).
    """
    if image.ndim != 3:
        raise ValueError(f"expected C×H×W, got shape {image.shape}")
    c, h, w = image.shape
    th, tw = size
    top, left, nh, nw = content_box((h, w), size, aspect=aspect)
    t = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None]
    # Area interpolation when shrinking avoids aliasing of fine structure (e.g. trabeculae,
    # vessels); bilinear when enlarging.
    mode = "area" if nh <= h and nw <= w else "bilinear"
    kwargs = {} if mode == "area" else {"align_corners": False}
    out = F.interpolate(t, size=(nh, nw), mode=mode, **kwargs)[0].numpy()
    if (nh, nw) == (th, tw):
        return out.astype(np.float32, copy=False)
    canvas = np.zeros((c, th, tw), dtype=np.float32)
    canvas[:, top:top + nh, left:left + nw] = out
    return canvas
