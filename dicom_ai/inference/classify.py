"""The ``classification`` task: 2D images (chest X-ray, fundus, dermoscopy) → class
probabilities.

Per image: decode → normalize (the same functions training used) → image-based input-fit
check → calibrated probabilities → Grad-CAM. Per series: the image with the strongest
evidence for the model's decision finding speaks for the series (a study's worst image is
what a reader must see); every analysed image gets its own Explanation and so its own SC.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

import numpy as np
import numpy.typing as npt

from dicom_ai.config import InferenceSettings
from dicom_ai.dicom.errors import ContentMismatchError, DicomInputError
from dicom_ai.dicom.model import Instance, Series
from dicom_ai.dicom.pixels import decode
from dicom_ai.imaging import dermoscopy, fundus, xray
from dicom_ai.imaging.anatomy import RESTRICTED_NOTE, explained_anatomy, restrict
from dicom_ai.imaging.resize import Aspect, content_box, resize_2d
from dicom_ai.inference import input_fit
from dicom_ai.inference.bundle import Bundle, BundleError
from dicom_ai.inference.findings import Explanation, Finding, ModelResult
from dicom_ai.inference.runner import calibrated_softmax, gradcam, predict_logits
from dicom_ai.inference.spec import ClassificationSpec, FractureSpec

#: Longest side of the picture shown in a Secondary Capture: enough for a reading-room
#: monitor, small enough to keep each SC a few hundred kB.
DISPLAY_MAX_SIDE = 1024


@dataclass(frozen=True)
class PreparedImage:
    """One image ready for the network, and the picture a reader will see it explained on."""

    instance: Instance
    model_input: npt.NDArray[np.float32]
    display: npt.NDArray[np.uint8]
    box: tuple[int, int, int, int]


def _display(image: npt.NDArray[np.float32]) -> npt.NDArray[np.uint8]:
    """[0, 1] H×W or H×W×3 image → uint8, long side at most :data:`DISPLAY_MAX_SIDE`."""
    chw = image[None] if image.ndim == 2 else np.moveaxis(image, -1, 0)
    h, w = chw.shape[1:]
    scale = min(1.0, DISPLAY_MAX_SIDE / max(h, w))
    if scale < 1.0:
        chw = resize_2d(chw, (max(1, round(h * scale)), max(1, round(w * scale))), aspect="stretch")
    out = np.clip(np.rint(chw * 255.0), 0, 255).astype(np.uint8)
    return out[0] if image.ndim == 2 else np.moveaxis(out, 0, -1)


def _first_frame(stored: npt.NDArray[Any], header: Any) -> npt.NDArray[Any]:
    frames = int(header.get("NumberOfFrames", 1) or 1)
    return stored[0] if frames > 1 else stored


@dataclass(frozen=True)
class PreparedSeries:
    """The images of one series prepared for one bundle's analysis, begun at ``started``."""

    series: Series
    bundle: Bundle
    started: datetime
    #: Every image that decodes and is the kind the model reads, in series order.
    images: list[PreparedImage]
    #: The instances that failed to decode: path → reason.
    failed: dict[str, str]
    #: The instances that decode but are not the kind of image the model reads: path → reason.
    refused: dict[str, str]

    def rejected(self, reason: str) -> tuple[ModelResult, dict[str, str]]:
        """The series rejected with ``reason``, and the instances that failed to decode."""
        return (ModelResult.rejected(self.series, self.bundle.info, self.started, reason),
                self.failed)

    def unusable(self) -> tuple[ModelResult, dict[str, str]] | None:
        """The rejection of a series none of whose images could be prepared (each failed to
        decode or was refused); None if one was."""
        if self.images:
            return None
        reasons = set(self.failed.values()) | set(self.refused.values())
        return self.rejected("no image of the series could be used: " + "; ".join(sorted(reasons)))


def prepare_series(bundle: Bundle, series: Series, started: datetime) -> PreparedSeries:
    """Every image of ``series`` that decodes and is the kind ``bundle`` reads, prepared for it,
    and the instances that failed to decode or were refused."""
    failed: dict[str, str] = {}
    refused: dict[str, str] = {}
    prepared: list[PreparedImage] = []
    for instance in series.instances:
        try:
            prepared.append(prepare(bundle, instance))
        except ContentMismatchError as exc:
            refused[str(instance.path)] = exc.reason
        except DicomInputError as exc:
            failed[str(instance.path)] = exc.reason
    return PreparedSeries(series, bundle, started, prepared, failed, refused)


def classification_spec(bundle: Bundle) -> ClassificationSpec:
    """The parsed ``dicom_ai`` block of a classification bundle (parsed and checked at load).

    Raises
    ------
    BundleError
        ``bundle`` was not loaded as a classification bundle.
    """
    if not isinstance(bundle.spec, ClassificationSpec):
        raise BundleError(f"{bundle.name}: not loaded as a classification bundle")
    return bundle.spec


def prepare(bundle: Bundle, instance: Instance) -> PreparedImage:
    """Decode and normalize one instance as the bundle's ``input`` and ``preprocessing`` say
    (a classification bundle, or the fracture detector, which reads radiographs the same way).

    Raises
    ------
    DicomInputError
        The pixels cannot be decoded or are not the kind of image the model reads.
    BundleError
        ``bundle`` has no classification or fracture spec.
    """
    spec = bundle.spec
    aspect: Aspect
    if isinstance(spec, FractureSpec):
        kind, size, aspect = "xray", spec.size, "pad"
    elif isinstance(spec, ClassificationSpec):
        kind, size, aspect = spec.input, spec.size, spec.aspect
    else:
        raise BundleError(f"{bundle.name}: not a bundle of 2D images")
    frame = _first_frame(decode(instance), instance.header)
    try:
        if kind == "xray":
            pres = xray.presentation_from_dataset(frame, instance.header)
            return PreparedImage(instance, xray.model_input(pres, size, aspect=aspect),
                                 _display(pres), content_box(pres.shape, size, aspect=aspect))
        if kind == "fundus":
            square = fundus.crop_to_fov(fundus.rgb_from_dataset(frame, instance.header))
            return PreparedImage(instance, fundus.input_from_fov(square, size),
                                 _display(square.astype(np.float32) / 255.0), (0, 0, *size))
        if kind == "dermoscopy":
            rgb = fundus.rgb_from_dataset(frame, instance.header)
            try:
                dermoscopy.require_colour(rgb)
                dermoscopy.require_not_fundus(rgb)
            except ValueError as exc:
                raise ContentMismatchError(str(exc), path=instance.path) from exc
            # Shown as it was photographed; the stretched network input maps back onto the
            # whole image.
            return PreparedImage(instance, dermoscopy.model_input(rgb, size),
                                 _display(rgb.astype(np.float32) / 255.0), (0, 0, *size))
    except ValueError as exc:
        raise DicomInputError(str(exc), path=instance.path) from exc
    raise DicomInputError(f"model {bundle.name} declares an unknown input {kind!r}")


def decide(spec: ClassificationSpec, probabilities: npt.NDArray[np.float32]) -> list[Finding]:
    """Findings for one image: every class of the model, then the derived findings."""
    labels = list(spec.labels)
    decision = spec.decision
    threshold = float(decision.threshold or 0.0)
    target = labels.index(decision.label) if decision.kind == "threshold" and decision.label \
        else -1
    if target >= 0:
        hit = bool(probabilities[target] >= threshold)
        positive = [hit if i == target else not hit for i in range(len(labels))] \
            if len(labels) == 2 else [i == target and hit for i in range(len(labels))]
    else:
        top = int(np.argmax(probabilities))
        positive = [i == top for i in range(len(labels))]
    # The operating point of each class that has one: the threshold of the decision label, and
    # for a two-class model its complement for the other class (positive exactly when the
    # decision label is not).
    points: list[float | None] = [None] * len(labels)
    if target >= 0:
        points = [threshold if i == target else 1.0 - threshold if len(labels) == 2 else None
                  for i in range(len(labels))]
    findings = [Finding(label=lab, probability=float(p), positive=pos, operating_point=at)
                for lab, p, pos, at in zip(labels, probabilities, positive, points, strict=True)]
    for derived in spec.derived_findings:
        p = float(sum(probabilities[labels.index(lab)] for lab in derived.sum_of))
        findings.append(Finding(label=derived.label, probability=p,
                                positive=p >= derived.threshold,
                                operating_point=derived.threshold))
    return findings


def decision_score(spec: ClassificationSpec, findings: Sequence[Finding]) -> float:
    """How strongly an image supports the model's key finding (used to pick the series'
    representative image): the thresholded label, else the first derived finding, else
    one minus the first (normal) class."""
    by_label = {f.label: f for f in findings}
    if spec.decision.kind == "threshold" and spec.decision.label:
        return float(by_label[spec.decision.label].probability or 0.0)
    if spec.derived_findings:
        return float(by_label[spec.derived_findings[0].label].probability or 0.0)
    return 1.0 - float(findings[0].probability or 0.0)


def explained_class(spec: ClassificationSpec, probabilities: npt.NDArray[np.float32]) -> int:
    """Class whose Grad-CAM is shown: the decision label, or the most probable class."""
    if spec.decision.kind == "threshold" and spec.decision.label:
        return list(spec.labels).index(spec.decision.label)
    return int(np.argmax(probabilities))


def caption(spec: ClassificationSpec, findings: Sequence[Finding]) -> str:
    """The finding text burned into a Secondary Capture."""
    decision = spec.decision
    parts: list[str] = []
    shown = [f for f in findings if f.positive] if decision.kind == "argmax" else [
        f for f in findings if f.label == decision.label]
    derived = {d.label for d in spec.derived_findings}
    for f in shown:
        if f.label in derived:
            continue
        verdict = "POSITIVE" if f.positive else "negative"
        parts.append(f"{f.label}: p={f.probability:.2f} {verdict}")
    for f in findings:
        if f.label in derived:
            parts.append(f"{f.label}: p={f.probability:.2f} "
                         f"{'POSITIVE' if f.positive else 'negative'}")
    return "; ".join(parts)


def _heatmap_on_display(heat: npt.NDArray[np.float32], box: tuple[int, int, int, int],
                        shape: tuple[int, ...]) -> npt.NDArray[np.float32]:
    top, left, h, w = box
    inside = heat[top:top + h, left:left + w]
    on_display: npt.NDArray[np.float32] = resize_2d(inside[None], (int(shape[0]), int(shape[1])),
                                                    aspect="stretch")[0]
    return on_display


def analyse_images(bundle: Bundle, series: Series, started: datetime,
                   settings: InferenceSettings) -> tuple[ModelResult, dict[str, str]]:
    """Run a classification bundle over every image of ``series``.

    Returns the result and the instances that failed to decode (path → reason); a series all
    of whose images fail or are unfit is ``rejected`` with the reason.
    """
    spec = classification_spec(bundle)
    series_inputs = prepare_series(bundle, series, started)
    if (unusable := series_inputs.unusable()) is not None:
        return unusable
    prepared = series_inputs.images
    inputs = [p.model_input for p in prepared]
    if spec.input_fit is not None:
        scores, logits = input_fit.score_and_logits(bundle, inputs,
                                                    batch_size=settings.batch_size,
                                                    amp=settings.amp)
        keep, reason = input_fit.fitting(scores, spec.input_fit)
        if reason is not None:
            return series_inputs.rejected(reason)
        prepared = [prepared[i] for i in keep]
        logits = logits[keep]
    else:
        logits = predict_logits(bundle, inputs, batch_size=settings.batch_size, amp=settings.amp)
    probabilities = calibrated_softmax(logits, spec.temperature)
    per_image = [decide(spec, p) for p in probabilities]
    best = max(range(len(prepared)), key=lambda i: decision_score(spec, per_image[i]))
    explanations: list[Explanation] = []
    for image, probs, findings in zip(prepared, probabilities, per_image, strict=True):
        heat = None
        text = caption(spec, findings)
        if spec.gradcam_layers:
            cam = gradcam(bundle, image.model_input, explained_class(spec, probs),
                          spec.gradcam_layers)
            # Shown only over the anatomy that matters; how much of the unrestricted map lies
            # there is measured by scripts/explanation_anatomy.py and stated in the model card.
            anatomy_mask = explained_anatomy(spec.input, image.model_input, image.box)
            if anatomy_mask is not None:
                cam = restrict(cam, anatomy_mask)
                text = f"{text}; {RESTRICTED_NOTE[spec.input]}"
            heat = _heatmap_on_display(cam, image.box, image.display.shape)
        explanations.append(Explanation(source=image.instance, image=image.display,
                                        heatmap=heat, caption=text))
    # The image that speaks for the series is where its findings are shown.
    shown_on = prepared[best].instance.SOPInstanceUID
    return ModelResult(series=series, model=bundle.info, status="ok", started=started,
                       findings=[replace(f, image_uid=shown_on) for f in per_image[best]],
                       explanations=explanations), series_inputs.failed
