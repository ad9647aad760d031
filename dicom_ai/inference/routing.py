"""Which models apply to a series, and whether a series is fit for a model that applies.

Two different answers, on purpose:

* **applies** — modality, SOP class and photometric interpretation. A series no model applies
  to is *skipped* with a reason ("no model accepts modality MR"); it is not an error.
* **fit** — body part, view position, image type, slice count. A series a model applies to but
  should not judge (a lateral or hand radiograph for the chest X-ray model) is *rejected* by
  that model with a reason, and the SR says so. The image-based input-fit check of
  :mod:`dicom_ai.inference.input_fit` comes on top, at inference time.

Rules come from each bundle's ``dicom_ai.accepts`` block; a new bundle needs no code change.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from dicom_ai.dicom.model import Series


def _upper_set(values: Iterable[Any]) -> set[str]:
    return {str(v).strip().upper() for v in values}


def _values(header_value: Any) -> list[str]:
    if header_value is None:
        return []
    if isinstance(header_value, str):
        return [header_value]
    try:
        return [str(v) for v in header_value]
    except TypeError:
        return [str(header_value)]


def not_applicable(accepts: Mapping[str, Any], series: Series) -> str | None:
    """Why the model does not apply to ``series`` (modality, SOP class, photometric), or None."""
    header = series.header
    modality = series.modality or "(none)"
    if modality not in _upper_set(accepts.get("modality", [])):
        return f"modality {modality}"
    sop_classes = accepts.get("sop_class_uid")
    if sop_classes and str(header.get("SOPClassUID", "")) not in set(sop_classes):
        return f"SOP class {header.get('SOPClassUID', '(none)')}"
    # Headers are read without pixel data, so an image is recognised by its Image Pixel module.
    if "Rows" not in header or "Columns" not in header:
        return "no image pixel data"
    photometric = accepts.get("photometric_interpretation")
    value = str(header.get("PhotometricInterpretation", "")).upper()
    if photometric and value not in _upper_set(photometric):
        return f"photometric interpretation {value or '(none)'}"
    return None


def unfit(accepts: Mapping[str, Any], series: Series) -> str | None:
    """Why a model that applies should not judge ``series``, or None when it is fit."""
    header = series.header
    body_parts = accepts.get("body_part_examined")
    body_part = str(header.get("BodyPartExamined", "") or "").strip().upper()
    # An absent Body Part Examined is common (it is Type 3 in many IODs): the image-based
    # input-fit check decides then.
    if body_parts and body_part and body_part not in _upper_set(body_parts):
        return f"body part examined is {body_part}, the model reads {', '.join(body_parts)}"
    view = str(header.get("ViewPosition", "") or "").strip().upper()
    if view and view in _upper_set(accepts.get("reject_view_position", [])):
        return f"view position {view} is not a frontal (PA/AP) view"
    rejected_types = _upper_set(accepts.get("reject_image_type", []))
    image_type = _upper_set(_values(header.get("ImageType")))
    if rejected_types & image_type:
        return f"image type {'/'.join(sorted(rejected_types & image_type))} is not analysed"
    minimum = int(accepts.get("min_instances", 1))
    if len(series.instances) < minimum:
        return f"{len(series.instances)} image(s), the model needs at least {minimum}"
    thickness_limit = accepts.get("max_slice_thickness_mm")
    thickness = header.get("SliceThickness")
    if thickness_limit is not None and thickness not in (None, "") and \
            float(thickness) > float(thickness_limit):
        return (f"slice thickness {float(thickness):g} mm exceeds the model's limit of "
                f"{float(thickness_limit):g} mm")
    return None


def skip_reason(series: Series, reasons: Sequence[str]) -> str:
    """One line for a series no model applies to, built from each model's reason."""
    if not reasons:
        return "no model is installed"
    distinct = sorted(set(reasons))
    if all(r.startswith("modality ") for r in distinct):
        return f"no model accepts modality {series.modality or '(none)'}"
    return "no model accepts this series: " + "; ".join(distinct)
