"""The ``xr-fracture`` task: limb radiographs (CR/DX) → "any fracture" probability and boxes.

Per image: decode → presentation values → aspect-padded model input (the same functions
training used, :func:`dicom_ai.inference.classify.prepare`) → image-based input-fit check →
:class:`~dicom_ai.inference.fracture_net.FractureNet` → calibrated image probability (of the
image score the bundle names: image logit and heatmap peak) and boxes decoded from the centre
heatmap, mapped back onto the stored pixel grid.

Findings of the series (its most suspicious image speaks for it):

* ``fracture`` with the image-level probability, ``positive`` at the bundle's operating point;
* for a positive image, one ``fracture`` finding per box (``bbox_px`` in source pixels): the
  top heatmap peak, plus further peaks at or above ``boxes.min_score``;
* ``multiple_fractures`` when more than one box is reported.

The finding site is the examined body part (Body Part Examined → SNOMED CT, CID 4031); the
FracAtlas region it belongs to (hand, leg, hip, shoulder) is named in the caption. Every
analysed image gets a Secondary Capture with the heatmap over it and the boxes drawn.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F

from dicom_ai.config import InferenceSettings
from dicom_ai.dicom.model import Series
from dicom_ai.imaging.resize import resize_2d
from dicom_ai.inference import input_fit
from dicom_ai.inference.bundle import Bundle, BundleError
from dicom_ai.inference.classify import PreparedImage, prepare_series
from dicom_ai.inference.findings import Explanation, Finding, ModelResult
from dicom_ai.inference.fracture_net import Box, decode_boxes, image_score, to_source
from dicom_ai.inference.runner import batches
from dicom_ai.inference.spec import BoxRule, FractureSpec
from dicom_ai.results.codes import FRACTURE_SITES

FloatArray = npt.NDArray[np.float32]

def fracture_spec(bundle: Bundle) -> FractureSpec:
    """The parsed ``dicom_ai`` block of a fracture bundle (parsed and checked at load).

    Raises
    ------
    BundleError
        ``bundle`` was not loaded as an ``xr-fracture`` bundle.
    """
    if not isinstance(bundle.spec, FractureSpec):
        raise BundleError(f"{bundle.name}: not loaded as an xr-fracture bundle")
    return bundle.spec


def body_part_site(header: Any) -> tuple[str, tuple[str, str, str] | None]:
    """FracAtlas region and SNOMED CT finding site of the examined body part ("" and None
    when the header names none that is known)."""
    part = str(header.get("BodyPartExamined", "") or "").strip().upper()
    if part not in FRACTURE_SITES:
        return "", None
    region, value, meaning = FRACTURE_SITES[part]
    return region, (value, "SCT", meaning)


def forward(bundle: Bundle, inputs: Sequence[FloatArray], batch_size: int
            ) -> tuple[npt.NDArray[np.float64], FloatArray, FloatArray]:
    """Image scores (N, the bundle's :func:`~dicom_ai.inference.fracture_net.image_score`),
    heatmap probabilities (N×h×w) and log box sizes (N×2×h×w)."""
    weight = fracture_spec(bundle).peak_weight
    logits, heats, sizes = [], [], []
    with torch.inference_mode():
        for batch in batches(inputs, batch_size):
            logit, heat, size = bundle.network(torch.from_numpy(batch).to(bundle.device))
            logits.append(image_score(logit, heat, weight).cpu().numpy())
            heats.append(torch.sigmoid(heat[:, 0]).float().cpu().numpy())
            sizes.append(size.float().cpu().numpy())
    return np.concatenate(logits), np.concatenate(heats), np.concatenate(sizes)


def reported_boxes(boxes: Sequence[Box], positive: bool, rule: BoxRule) -> list[Box]:
    """Boxes a positive image reports: the top peak, then further peaks with a score of at
    least ``rule.min_score``, at most ``rule.max_boxes``; a negative image reports none."""
    if not positive or not boxes:
        return []
    rest = [b for b in boxes[1:] if b.score >= rule.min_score]
    return [boxes[0], *rest][:rule.max_boxes]


def heatmap_on_display(heat: FloatArray, image: PreparedImage, size: tuple[int, int]
                       ) -> FloatArray:
    """The stride-``s`` heatmap → display pixels: upsampled to the model input, cropped to
    where the source image lies, resized to the display, scaled so its peak is 1."""
    full = F.interpolate(torch.from_numpy(heat)[None, None], size=size, mode="bilinear",
                         align_corners=False)[0].numpy()
    top, left, h, w = image.box
    shown = resize_2d(np.ascontiguousarray(full[:, top:top + h, left:left + w]),
                      image.display.shape[:2], aspect="stretch")[0]
    peak = float(shown.max())
    scaled: FloatArray = np.clip(shown / peak if peak > 0 else shown, 0.0, 1.0
                                 ).astype(np.float32)
    return scaled


def display_marker(box: tuple[float, float, float, float], source_shape: tuple[int, int],
                   display_shape: tuple[int, ...]) -> tuple[int, int, int, int]:
    """A source-pixel box (col_min, row_min, col_max, row_max) → an Explanation marker
    (row0, col0, row1, col1) on the display image, whole pixels covering it."""
    sy = display_shape[0] / source_shape[0]
    sx = display_shape[1] / source_shape[1]
    c0, r0, c1, r1 = box
    return (int(np.floor(r0 * sy)), int(np.floor(c0 * sx)),
            int(np.ceil(r1 * sy)), int(np.ceil(c1 * sx)))


def image_findings(spec: FractureSpec, probability: float, boxes: Sequence[Box],
                   image: PreparedImage
                   ) -> tuple[list[Finding], list[tuple[float, float, float, float]]]:
    """Findings of one image and its reported boxes in source pixels."""
    threshold = float(spec.decision.threshold or 0.0)
    positive = probability >= threshold
    uid = image.instance.SOPInstanceUID
    _region, site = body_part_site(image.instance.header)
    source_shape = (int(image.instance.header.Rows), int(image.instance.header.Columns))
    findings = [Finding(label="fracture", probability=probability, positive=positive,
                        operating_point=threshold, image_uid=uid, site=site)]
    source_boxes: list[tuple[float, float, float, float]] = []
    for box in reported_boxes(boxes, positive, spec.boxes):
        px = to_source(box, image.box, source_shape)
        # A box of the padding only has no area left on the image.
        if px[0] >= px[2] or px[1] >= px[3]:
            continue
        source_boxes.append(px)
        # Reported because the image is positive (the top box) or its peak passed
        # boxes.min_score: either way a localized positive finding.
        findings.append(Finding(label="fracture", probability=box.score, positive=True,
                                bbox_px=px, image_uid=uid, site=site))
    if len(source_boxes) > 1:
        findings.append(Finding(label="multiple_fractures", positive=True, image_uid=uid,
                                site=site))
    return findings, source_boxes


def caption(probability: float, positive: bool, n_boxes: int, region: str) -> str:
    """The text burned into the Secondary Capture."""
    where = f" ({region})" if region else ""
    text = f"fracture{where}: p={probability:.2f} {'POSITIVE' if positive else 'negative'}"
    if n_boxes:
        text += f"; {n_boxes} box{'es' if n_boxes > 1 else ''} drawn"
    return text


def analyse_fracture(bundle: Bundle, series: Series, started: datetime,
                     settings: InferenceSettings) -> tuple[ModelResult, dict[str, str]]:
    """Run the fracture bundle over every image of ``series``.

    Returns the result and the instances that failed to decode (path → reason); a series all
    of whose images fail or are unlike the training data is ``rejected`` with the reason.
    """
    spec = fracture_spec(bundle)
    series_inputs = prepare_series(bundle, series, started)
    if (unusable := series_inputs.unusable()) is not None:
        return unusable
    prepared = series_inputs.images
    inputs = [p.model_input for p in prepared]
    if spec.input_fit is not None:
        scores, (logits, heats, sizes) = input_fit.scored(
            bundle, spec.input_fit, lambda: forward(bundle, inputs, settings.batch_size))
        keep, reason = input_fit.fitting(scores, spec.input_fit)
        if reason is not None:
            return series_inputs.rejected(reason)
        prepared = [prepared[i] for i in keep]
        logits, heats, sizes = logits[keep], heats[keep], sizes[keep]
    else:
        logits, heats, sizes = forward(bundle, inputs, settings.batch_size)
    probabilities = 1.0 / (1.0 + np.exp(-logits / spec.temperature))
    per_image: list[list[Finding]] = []
    explanations: list[Explanation] = []
    for image, p, heat, log_size in zip(prepared, probabilities, heats, sizes, strict=True):
        boxes = decode_boxes(heat, log_size, stride=spec.stride, max_boxes=10,
                             iou_threshold=spec.boxes.iou_threshold)
        findings, source_boxes = image_findings(spec, float(p), boxes, image)
        per_image.append(findings)
        source_shape = (int(image.instance.header.Rows), int(image.instance.header.Columns))
        region, _site = body_part_site(image.instance.header)
        explanations.append(Explanation(
            source=image.instance, image=image.display,
            heatmap=heatmap_on_display(heat, image, spec.size),
            caption=caption(float(p), bool(findings[0].positive), len(source_boxes), region),
            markers=tuple(display_marker(b, source_shape, image.display.shape)
                          for b in source_boxes)))
    best = int(np.argmax(probabilities))
    return ModelResult(series=series, model=bundle.info, status="ok", started=started,
                       findings=per_image[best], explanations=explanations), series_inputs.failed
