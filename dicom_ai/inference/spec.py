"""A bundle's ``dicom_ai`` block as typed, validated objects, parsed once when the bundle loads.

:func:`parse_accepts` reads the routing rules every task has; :func:`parse_classification` the
whole block of a ``classification`` bundle. Both collect every problem they find and raise one
:class:`SpecError` listing them all, so a bundle missing what its task needs is refused at load
with the full list instead of failing on the first study.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from dicom_ai.imaging.resize import Aspect

#: Normalizations of :mod:`dicom_ai.imaging` a classification bundle can ask for.
CLASSIFICATION_INPUTS = ("xray", "fundus", "dermoscopy")


class SpecError(ValueError):
    """A ``dicom_ai`` block does not say what its task needs; ``problems`` lists every reason."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class Code:
    """A coded concept (finding type or site)."""

    value: str
    scheme: str
    meaning: str


@dataclass(frozen=True)
class RequireAnatomy:
    """Images of these SOP classes must show one of these body parts or a listed region."""

    sop_class_uid: tuple[str, ...]
    body_part_examined: tuple[str, ...]


@dataclass(frozen=True)
class Accepts:
    """Routing rules (``accepts``; see :mod:`dicom_ai.inference.routing`)."""

    modality: tuple[str, ...]
    sop_class_uid: tuple[str, ...] = ()
    photometric_interpretation: tuple[str, ...] = ()
    body_part_examined: tuple[str, ...] = ()
    anatomic_region: tuple[str, ...] = ()
    reject_anatomic_region: tuple[str, ...] = ()
    require_anatomy: RequireAnatomy | None = None
    reject_view_position: tuple[str, ...] = ()
    reject_image_type: tuple[str, ...] = ()
    min_instances: int = 1
    max_slice_thickness_mm: float | None = None


@dataclass(frozen=True)
class Decision:
    """``threshold`` (``label`` positive iff p ≥ ``threshold``) or ``argmax``."""

    kind: str
    label: str | None = None
    threshold: float | None = None
    criterion: str = ""


@dataclass(frozen=True)
class DerivedFinding:
    """A finding whose probability is the sum of class probabilities."""

    label: str
    sum_of: tuple[str, ...]
    threshold: float
    criterion: str = ""


@dataclass(frozen=True)
class InputFit:
    """The Mahalanobis input-fit check."""

    layers: tuple[str, ...]
    stats: str
    threshold: float


@dataclass(frozen=True)
class ClassificationSpec:
    """Everything a ``classification`` bundle declares."""

    input: str
    size: tuple[int, int]
    aspect: Aspect
    labels: tuple[str, ...]
    temperature: float
    decision: Decision
    derived_findings: tuple[DerivedFinding, ...]
    codes: Mapping[str, Code]
    accepts: Accepts
    finding_site: Code | None = None
    #: Layers whose Grad-CAM maps are summed (one per ensemble member); empty: no Grad-CAM.
    gradcam_layers: tuple[str, ...] = ()
    input_fit: InputFit | None = None


@dataclass(frozen=True)
class BoxRule:
    """Which heatmap peaks of a positive image become boxes (``boxes``)."""

    max_boxes: int
    min_score: float
    iou_threshold: float


@dataclass(frozen=True)
class FractureSpec:
    """Everything an ``xr-fracture`` bundle declares."""

    size: tuple[int, int]
    stride: int
    temperature: float
    #: ``image_score.peak_weight``: the heatmap peak's share of the image score
    #: (:func:`dicom_ai.inference.fracture_net.image_score`).
    peak_weight: float
    decision: Decision
    boxes: BoxRule
    codes: Mapping[str, Code]
    accepts: Accepts
    finding_site: Code | None = None
    input_fit: InputFit | None = None


def _strings(value: Any, where: str, problems: list[str], *, required: bool = False
             ) -> tuple[str, ...]:
    if value is None:
        if required:
            problems.append(f"{where} is missing")
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        problems.append(f"{where} must be a list of strings")
        return ()
    if required and not value:
        problems.append(f"{where} is empty")
    return tuple(value)


def _number(value: Any, where: str, problems: list[str]) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        problems.append(f"{where} must be a number, got {value!r}")
        return None
    return float(value)


def _code(value: Any, where: str, problems: list[str]) -> Code | None:
    if not isinstance(value, Mapping) or not all(isinstance(value.get(k), str) and value.get(k)
                                                 for k in ("value", "scheme", "meaning")):
        problems.append(f"{where} must have string value, scheme and meaning")
        return None
    return Code(str(value["value"]), str(value["scheme"]), str(value["meaning"]))


def parse_accepts(block: Mapping[str, Any], problems: list[str]) -> Accepts:
    """``accepts`` of any task; problems are appended to ``problems``."""
    from dicom_ai.inference.routing import region_codes

    raw = block.get("accepts")
    if not isinstance(raw, Mapping):
        problems.append("accepts must be an object with the routing rules")
        raw = {}
    lists = {key: _strings(raw.get(key), f"accepts.{key}", problems)
             for key in ("sop_class_uid", "photometric_interpretation", "body_part_examined",
                         "anatomic_region", "reject_anatomic_region", "reject_view_position",
                         "reject_image_type")}
    modality = _strings(raw.get("modality"), "accepts.modality", problems, required=True)
    for key in ("anatomic_region", "reject_anatomic_region"):
        try:
            region_codes(lists[key])
        except ValueError as exc:
            problems.append(f"accepts.{key}: {exc}")
    require = None
    if raw.get("require_anatomy") is not None:
        spec = raw["require_anatomy"]
        if not isinstance(spec, Mapping):
            problems.append("accepts.require_anatomy must be an object")
        else:
            require = RequireAnatomy(
                _strings(spec.get("sop_class_uid"), "accepts.require_anatomy.sop_class_uid",
                         problems, required=True),
                _strings(spec.get("body_part_examined"),
                         "accepts.require_anatomy.body_part_examined", problems))
    minimum = raw.get("min_instances", 1)
    if isinstance(minimum, bool) or not isinstance(minimum, int) or minimum < 1:
        problems.append(f"accepts.min_instances must be a positive integer, got {minimum!r}")
        minimum = 1
    thickness = raw.get("max_slice_thickness_mm")
    limit = None if thickness is None else _number(thickness, "accepts.max_slice_thickness_mm",
                                                   problems)
    return Accepts(modality=modality, require_anatomy=require, min_instances=minimum,
                   max_slice_thickness_mm=limit, **lists)


def _decision(raw: Any, labels: tuple[str, ...], problems: list[str]) -> Decision:
    if not isinstance(raw, Mapping) or raw.get("kind") not in ("threshold", "argmax"):
        problems.append("decision.kind must be 'threshold' or 'argmax'")
        return Decision("argmax")
    criterion = str(raw.get("criterion", ""))
    if raw["kind"] == "argmax":
        return Decision("argmax", criterion=criterion)
    label = raw.get("label")
    if label not in labels:
        problems.append(f"decision.label {label!r} is not a label")
    threshold = _number(raw.get("threshold"), "decision.threshold", problems)
    return Decision("threshold", str(label), threshold, criterion)


def _derived(raw: Any, labels: tuple[str, ...], problems: list[str]
             ) -> tuple[DerivedFinding, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        problems.append("derived_findings must be a list")
        return ()
    out = []
    for i, item in enumerate(raw):
        where = f"derived_findings[{i}]"
        if not isinstance(item, Mapping) or not isinstance(item.get("label"), str):
            problems.append(f"{where} must be an object with a label")
            continue
        members = _strings(item.get("sum_of"), f"{where}.sum_of", problems, required=True)
        unknown = [m for m in members if m not in labels]
        if unknown:
            problems.append(f"{where}.sum_of names unknown label(s) {', '.join(unknown)}")
        threshold = _number(item.get("threshold"), f"{where}.threshold", problems)
        out.append(DerivedFinding(item["label"], members, threshold or 0.0,
                                  str(item.get("criterion", ""))))
    return tuple(out)


def _input_fit(raw: Any, problems: list[str]) -> InputFit | None:
    if raw is None:
        return None
    if not isinstance(raw, Mapping):
        problems.append("input_fit must be an object")
        return None
    layer = raw.get("layer")
    layers = (layer,) if isinstance(layer, str) else _strings(layer, "input_fit.layer", problems,
                                                             required=True)
    if not isinstance(raw.get("stats"), str):
        problems.append("input_fit.stats must name the statistics file")
    threshold = _number(raw.get("threshold"), "input_fit.threshold", problems)
    return InputFit(layers, str(raw.get("stats", "")), threshold or 0.0)


def _size(pre: Mapping[str, Any], problems: list[str]) -> tuple[int, int]:
    size = pre.get("size")
    if not (isinstance(size, list) and len(size) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size)):
        problems.append(f"preprocessing.size must be [height, width] in pixels, got {size!r}")
        return (1, 1)
    return (int(size[0]), int(size[1]))


def _temperature(block: Mapping[str, Any], problems: list[str], *, required: bool = False
                 ) -> float:
    if required and "temperature" not in block:
        problems.append("temperature is missing")
        return 1.0
    temperature = _number(block.get("temperature", 1.0), "temperature", problems)
    if temperature is not None and temperature <= 0:
        problems.append(f"temperature must be positive, got {temperature}")
    return float(temperature or 1.0)


def _codes(block: Mapping[str, Any], needed: list[str], problems: list[str]
           ) -> dict[str, Code]:
    raw_codes = block.get("codes")
    raw_codes = raw_codes if isinstance(raw_codes, Mapping) else {}
    missing = [lab for lab in needed if lab not in raw_codes]
    if missing:
        problems.append(f"no finding code for label(s) {', '.join(missing)}")
    codes: dict[str, Code] = {}
    # Codes for labels a task adds itself (multiple_fractures) are parsed too when given.
    for lab in [*needed, *(k for k in raw_codes if k not in needed)]:
        if lab in raw_codes and (code := _code(raw_codes[lab], f"codes.{lab}", problems)):
            codes[lab] = code
    return codes


def _site(block: Mapping[str, Any], problems: list[str]) -> Code | None:
    if block.get("finding_site") is None:
        return None
    return _code(block["finding_site"], "finding_site", problems)


def parse_fracture(block: Mapping[str, Any]) -> FractureSpec:
    """The ``dicom_ai`` block of an ``xr-fracture`` bundle.

    Raises
    ------
    SpecError
        Listing every problem found.
    """
    problems: list[str] = []
    accepts = parse_accepts(block, problems)
    if block.get("input") != "xray":
        problems.append(f"input must be 'xray', got {block.get('input')!r}")
    pre = block.get("preprocessing")
    pre = pre if isinstance(pre, Mapping) else {}
    size = _size(pre, problems)
    if pre.get("aspect") != "pad":
        problems.append(f"preprocessing.aspect must be 'pad' (boxes map back through the "
                        f"padding), got {pre.get('aspect')!r}")
    stride = pre.get("stride")
    if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1:
        problems.append(f"preprocessing.stride (the heatmap's) must be a positive integer, "
                        f"got {stride!r}")
        stride = 1
    temperature = _temperature(block, problems, required=True)
    score = block.get("image_score")
    weight = None
    if not isinstance(score, Mapping) or "peak_weight" not in score:
        problems.append("image_score.peak_weight (the heatmap peak's share of the image "
                        "score) is missing")
    else:
        weight = _number(score["peak_weight"], "image_score.peak_weight", problems)
    if weight is not None and not 0.0 <= weight <= 1.0:
        problems.append(f"image_score.peak_weight must be in [0, 1], got {weight}")
    decision = _decision(block.get("decision"), ("fracture",), problems)
    if decision.kind != "threshold":
        problems.append("decision must be a threshold on 'fracture'")
    raw = block.get("boxes")
    raw = raw if isinstance(raw, Mapping) else {}
    numbers = {key: _number(raw.get(key), f"boxes.{key}", problems)
               for key in ("max_boxes", "min_score", "iou_threshold")}
    codes = _codes(block, ["fracture"], problems)
    site = _site(block, problems)
    fit = _input_fit(block.get("input_fit"), problems)
    if problems:
        raise SpecError(problems)
    return FractureSpec(
        size=size, stride=int(stride), temperature=temperature,
        peak_weight=float(weight or 0.0), decision=decision,
        boxes=BoxRule(int(numbers["max_boxes"] or 0), float(numbers["min_score"] or 0.0),
                      float(numbers["iou_threshold"] or 0.0)),
        codes=codes, accepts=accepts, finding_site=site, input_fit=fit)


def parse_classification(block: Mapping[str, Any]) -> ClassificationSpec:
    """The ``dicom_ai`` block of a ``classification`` bundle.

    Raises
    ------
    SpecError
        Listing every problem found.
    """
    problems: list[str] = []
    accepts = parse_accepts(block, problems)
    kind = block.get("input")
    if kind not in CLASSIFICATION_INPUTS:
        problems.append(f"input must be one of {', '.join(CLASSIFICATION_INPUTS)}, got {kind!r}")
    pre = block.get("preprocessing")
    pre = pre if isinstance(pre, Mapping) else {}
    size = _size(pre, problems)
    aspect = pre.get("aspect", "pad")
    if aspect not in ("pad", "stretch"):
        problems.append(f"preprocessing.aspect must be 'pad' or 'stretch', got {aspect!r}")
    labels = _strings(block.get("labels"), "labels", problems, required=True)
    if len(labels) < 2 or len(set(labels)) != len(labels):
        problems.append("a classification bundle lists at least two distinct labels")
    temperature = _temperature(block, problems)
    decision = _decision(block.get("decision"), labels, problems)
    derived = _derived(block.get("derived_findings"), labels, problems)
    codes = _codes(block, [*labels, *(d.label for d in derived)], problems)
    site = _site(block, problems)
    layer = block.get("gradcam_layer")
    # One network names its layer; an ensemble lists one per member.
    layers = (layer,) if isinstance(layer, str) else _strings(layer, "gradcam_layer", problems)
    fit = _input_fit(block.get("input_fit"), problems)
    if problems:
        raise SpecError(problems)
    return ClassificationSpec(
        input=str(kind), size=size, aspect="stretch" if aspect == "stretch" else "pad",
        labels=labels,
        temperature=temperature, decision=decision, derived_findings=derived,
        codes=codes, accepts=accepts, finding_site=site,
        gradcam_layers=layers, input_fit=fit)
