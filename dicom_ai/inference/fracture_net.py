"""The ``xr-fracture`` network and the decoding of its outputs into boxes.

One 2D CNN with two heads on a square, aspect-padded radiograph:

* an image-level logit of "any fracture" (global average and max pooling of the deepest
  features: a fracture is a small local finding, so the max keeps it from being averaged away);
* a CenterNet-style dense output at stride :data:`STRIDE` (Zhou et al. 2019, "Objects as
  Points"): a fracture-centre heatmap logit and, per cell, the log of the box width and height
  in cells.

Boxes are the heatmap's local maxima (3×3 max-pool peaks) with the size read at the peak,
then greedy IoU non-maximum suppression. Everything here is torch/numpy only, so training
(:mod:`dicom_ai.train.fracture`) and inference (:mod:`dicom_ai.inference.fracture`) decode
alike.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from torch import nn

#: Input pixels per heatmap cell.
STRIDE = 4
#: Initial heatmap bias: sigmoid(-4.6) ≈ 0.01, the CenterNet prior that keeps the focal loss of
#: the (overwhelmingly) empty cells from swamping the first steps.
HEAT_PRIOR_BIAS = -4.6


def _conv_bn(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class _Residual(nn.Module):
    """Two 3×3 convolutions with an identity shortcut (ResNet basic block)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = _conv_bn(channels, channels)
        self.conv2 = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1, bias=False),
                                   nn.BatchNorm2d(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.conv2(self.conv1(x)))


class FractureNet(nn.Module):
    """ResNet-style encoder, FPN-style decoder to stride 4, classification and box heads.

    Parameters
    ----------
    in_channels
        Image channels (1 for a radiograph).
    widths
        Channels of the stem (stride 2) and of the four stages (strides 4, 8, 16, 32).
    fpn_channels
        Channels of the decoder and heads.
    dropout
        Dropout before the image-level logit.

    ``forward`` returns ``(logit, heat, size)``: N×1 image logits, N×1×h×w centre-heatmap
    logits and N×2×h×w log box (width, height) in cells, with h, w = input / :data:`STRIDE`.
    """

    def __init__(self, in_channels: int = 1, widths: Sequence[int] = (24, 32, 64, 128, 192),
                 fpn_channels: int = 64, dropout: float = 0.2) -> None:
        super().__init__()
        if len(widths) != 5:
            raise ValueError(f"widths names the stem and four stages, got {len(widths)} values")
        w = list(widths)
        self.stem = _conv_bn(in_channels, w[0], stride=2)
        self.stages = nn.ModuleList(
            nn.Sequential(_conv_bn(w[i], w[i + 1], stride=2), _Residual(w[i + 1]))
            for i in range(4))
        self.lateral = nn.ModuleList(nn.Conv2d(c, fpn_channels, 1) for c in w[1:])
        self.smooth = _conv_bn(fpn_channels, fpn_channels)
        self.heat = nn.Conv2d(fpn_channels, 1, 1)
        self.size = nn.Conv2d(fpn_channels, 2, 1)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(2 * w[4], 1))
        with torch.no_grad():
            self.heat.bias.fill_(HEAT_PRIOR_BIAS)  # type: ignore[union-attr]
            # Typical FracAtlas boxes are ~5 cells wide at 256 px: start the size head there.
            self.size.bias.fill_(math.log(5.0))  # type: ignore[union-attr]

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The four stages' features, strides 4 to 32."""
        feats = []
        y = self.stem(x)
        for stage in self.stages:
            y = stage(y)
            feats.append(y)
        return feats

    @staticmethod
    def pool(deepest: torch.Tensor) -> torch.Tensor:
        """What the classifier reads: the deepest features' mean and max over the image."""
        return torch.cat([deepest.mean(dim=(2, 3)), deepest.amax(dim=(2, 3))], dim=1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        feats = self.encode(x)
        logit = self.classifier(self.pool(feats[-1]))
        top = self.lateral[-1](feats[-1])
        for i in range(len(feats) - 2, -1, -1):
            top = F.interpolate(top, size=feats[i].shape[2:], mode="nearest") + \
                self.lateral[i](feats[i])
        top = self.smooth(top)
        return logit, self.heat(top), self.size(top)


def image_score(logit: torch.Tensor, heat: torch.Tensor, peak_weight: float) -> torch.Tensor:
    """The image-level "any fracture" logit a bundle calibrates: ``(1 - w) · image logit +
    w · highest centre-heatmap logit``, with ``w = peak_weight``.

    The two heads read one film two ways: the classifier pools the whole image, the heatmap
    scores each place. Trained to the end of the schedule, each network's mean of the two
    ranks validation images better than either alone (``scripts/experiments/
    fracture_image_score.py``); the weight is the bundle's, as its temperature and threshold
    are calibrated on the score it defines.

    Parameters
    ----------
    logit
        N×1 image logits.
    heat
        N×1×h×w centre-heatmap logits.
    peak_weight
        ``w`` in [0, 1]; 0 is the classifier alone.

    Returns
    -------
    torch.Tensor
        N scores, float64.
    """
    peak = heat[:, 0].amax(dim=(-2, -1)).double()
    return (1.0 - peak_weight) * logit[:, 0].double() + peak_weight * peak


@dataclass(frozen=True)
class Box:
    """A fracture box in model-input pixel coordinates (pixel edges: a box over pixels
    0…9 spans x0 = 0 to x1 = 10) and its heatmap score."""

    x0: float
    y0: float
    x1: float
    y1: float
    score: float

    @property
    def center(self) -> tuple[float, float]:
        """(x, y) of the box centre."""
        return (self.x0 + self.x1) / 2.0, (self.y0 + self.y1) / 2.0


def iou(a: Box, b: Box) -> float:
    """Intersection over union of two boxes (0 when either is empty)."""
    iw = max(0.0, min(a.x1, b.x1) - max(a.x0, b.x0))
    ih = max(0.0, min(a.y1, b.y1) - max(a.y0, b.y0))
    inter = iw * ih
    union = (a.x1 - a.x0) * (a.y1 - a.y0) + (b.x1 - b.x0) * (b.y1 - b.y0) - inter
    return inter / union if union > 0 else 0.0


def nms(boxes: Sequence[Box], iou_threshold: float) -> list[Box]:
    """Greedy non-maximum suppression: highest score first, drop boxes overlapping a kept one
    by more than ``iou_threshold``."""
    kept: list[Box] = []
    for box in sorted(boxes, key=lambda b: -b.score):
        if all(iou(box, k) <= iou_threshold for k in kept):
            kept.append(box)
    return kept


def decode_boxes(heat: npt.NDArray[np.floating], log_size: npt.NDArray[np.floating], *,
                 stride: int = STRIDE, max_boxes: int = 10, min_score: float = 0.0,
                 iou_threshold: float = 0.3) -> list[Box]:
    """Boxes from one image's heatmap probabilities and log sizes.

    Parameters
    ----------
    heat
        h×w centre probabilities (sigmoid of the heatmap logits).
    log_size
        2×h×w log (width, height) of the box in cells.
    stride
        Input pixels per cell; cell (r, c) covers input pixels [c·s, (c+1)·s) and its centre is
        at ((c + 0.5)·s, (r + 0.5)·s).
    max_boxes
        At most this many peaks (highest first) before NMS.
    min_score
        Peaks below this probability are dropped.
    iou_threshold
        NMS overlap limit.

    Returns
    -------
    list of Box
        Highest score first.
    """
    h = np.asarray(heat, dtype=np.float64)
    t = torch.from_numpy(h)[None, None]
    peak = (F.max_pool2d(t, 3, stride=1, padding=1) == t)[0, 0].numpy() & (h >= min_score)
    rows, cols = np.nonzero(peak)
    order = np.argsort(-h[rows, cols], kind="stable")[:max_boxes]
    boxes = []
    for r, c in zip(rows[order].tolist(), cols[order].tolist(), strict=True):
        cx, cy = (c + 0.5) * stride, (r + 0.5) * stride
        bw = math.exp(float(log_size[0, r, c])) * stride
        bh = math.exp(float(log_size[1, r, c])) * stride
        boxes.append(Box(cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2, float(h[r, c])))
    return nms(boxes, iou_threshold)


def to_source(box: Box, content: tuple[int, int, int, int],
              source_shape: tuple[int, int]) -> tuple[float, float, float, float]:
    """A model-input box → (col_min, row_min, col_max, row_max) on the source image.

    ``content`` is where the source landed in the model input, (top, left, height, width), as
    :func:`dicom_ai.imaging.resize.content_box` returns it; ``source_shape`` is the source's
    (rows, columns). Pixel-edge coordinates, clipped to the image.
    """
    top, left, nh, nw = content
    rows, cols = source_shape
    sx, sy = cols / nw, rows / nh

    def clip(v: float, hi: int) -> float:
        return min(max(v, 0.0), float(hi))

    return (clip((box.x0 - left) * sx, cols), clip((box.y0 - top) * sy, rows),
            clip((box.x1 - left) * sx, cols), clip((box.y1 - top) * sy, rows))
