"""Which models apply to a series, and whether a series is fit for a model that applies.

Two different answers, on purpose:

* **applies** — modality, SOP class and photometric interpretation. A series no model applies
  to is *skipped* with a reason ("no model accepts modality MR"); it is not an error.
* **fit** — body part, anatomic region, view position, image type, slice count. A series a
  model applies to but should not judge (a lateral chest radiograph for the chest X-ray model)
  is *rejected* by that model with a reason, and the SR says so. The image-based input-fit
  check of :mod:`dicom_ai.inference.input_fit` comes on top, at inference time.

:func:`wrong_anatomy` is the part of *fit* that says which model a series is for: when another
model that applies reads the anatomy (a hand radiograph, for the fracture detector), the pipeline
leaves out the models that do not, instead of having each write a "not analysed" SR into the
study (:func:`dicom_ai.pipeline.analyse_series`).

Rules come from each bundle's ``dicom_ai.accepts`` block, parsed once when the bundle loads
(:class:`~dicom_ai.inference.spec.Accepts`, ``Bundle.accepts``), which is what the pipeline
passes; a new bundle needs no code change. A raw ``accepts`` mapping (a recipe or a
``metadata.json`` read by a tool) is parsed on the way in, and refused with every problem when
it is invalid.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from pydicom.sr.codedict import Collection

from dicom_ai.dicom.model import Series
from dicom_ai.inference.spec import Accepts, SpecError, parse_accepts

#: What the rule functions take: parsed rules, or a bundle's raw ``accepts`` object.
Rules = Accepts | Mapping[str, Any]


def as_accepts(rules: Rules) -> Accepts:
    """``rules`` as parsed :class:`Accepts`.

    Raises
    ------
    SpecError
        A raw mapping with invalid rules, listing every problem.
    """
    if isinstance(rules, Accepts):
        return rules
    problems: list[str] = []
    accepts = parse_accepts({"accepts": rules}, problems)
    if problems:
        raise SpecError(problems)
    return accepts


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


@functools.lru_cache(maxsize=64)
def region_codes(entries: tuple[str, ...]) -> frozenset[tuple[str, str]]:
    """(scheme, value) pairs named by an ``anatomic_region`` rule: each entry is a code
    ``"SCT:39937001"`` or a DICOM context group ``"CID4029"`` (every concept of the group, from
    pydicom's copy of PS3.16).

    Raises
    ------
    ValueError
        An entry is neither a known context group nor ``SCHEME:VALUE``.
    """
    codes: set[tuple[str, str]] = set()
    for entry in entries:
        if entry.upper().startswith("CID"):
            try:
                group = Collection(entry.upper())
            except (KeyError, ValueError) as exc:
                raise ValueError(f"unknown context group {entry!r} in an anatomic region rule") \
                    from exc
            codes.update((c.scheme_designator, str(c.value)) for c in group.concepts.values())
            continue
        scheme, sep, value = entry.partition(":")
        if not sep or not scheme or not value:
            raise ValueError(f"anatomic region {entry!r} is neither SCHEME:VALUE nor CIDnnnn")
        codes.add((scheme, value))
    return frozenset(codes)


def _anatomic_regions(header: Any) -> list[tuple[str, str, str]]:
    """(scheme, value, meaning) of each Anatomic Region Sequence item that has a code."""
    regions = []
    for item in header.get("AnatomicRegionSequence", None) or []:
        value = str(item.get("CodeValue", "") or "")
        if value:
            regions.append((str(item.get("CodingSchemeDesignator", "")), value,
                            str(item.get("CodeMeaning", "") or value)))
    return regions


#: A rejection reason names at most this many of the values a model reads: it is shown in the
#: SR, the replay table and the log, and the model card has the whole list.
REASON_MAX_VALUES = 5


def listed(values: Sequence[str]) -> str:
    """``values`` joined for a reason, the first :data:`REASON_MAX_VALUES` and a count of the
    rest ("A, B, C, D, E and 3 more")."""
    shown = ", ".join(values[:REASON_MAX_VALUES])
    rest = len(values) - REASON_MAX_VALUES
    return f"{shown} and {rest} more" if rest > 0 else shown


def wrong_anatomy(rules: Rules, series: Series) -> str | None:
    """Why ``series`` shows anatomy the model does not read (Body Part Examined, the Anatomic
    Region Sequence), or None: the first check of :func:`unfit`.

    Raises
    ------
    SpecError
        ``rules`` is a raw mapping with invalid rules.
    """
    accepts = as_accepts(rules)
    body_parts = accepts.body_part_examined
    body_part = str(series.header.get("BodyPartExamined", "") or "").strip().upper()
    # An absent Body Part Examined is common (it is Type 3 in many IODs): the image-based
    # input-fit check decides then.
    if body_parts and body_part and body_part not in _upper_set(body_parts):
        return f"body part examined is {body_part}, the model reads {listed(body_parts)}"
    regions = _anatomic_regions(series.header)
    allowed = accepts.anatomic_region
    refused = accepts.reject_anatomic_region
    for scheme, value, meaning in regions:
        if refused and (scheme, value) in region_codes(refused):
            return f"anatomic region {meaning} ({scheme} {value}) is not one the model reads"
    if allowed and regions:
        codes = region_codes(allowed)
        if not any((scheme, value) in codes for scheme, value, _ in regions):
            scheme, value, meaning = regions[0]
            return f"anatomic region {meaning} ({scheme} {value}) is not one the model reads"
    required = accepts.require_anatomy
    sop_class = str(series.header.get("SOPClassUID", ""))
    if required and sop_class in set(required.sop_class_uid):
        parts = _upper_set(required.body_part_examined)
        # The region rules above already refused a region that is not the model's.
        if body_part not in parts and not (allowed and regions):
            return (f"an image of SOP class {sop_class} is read only when Body Part Examined "
                    f"({listed(sorted(parts))}) or the Anatomic Region Sequence says it "
                    f"shows what the model reads")
    return None


def not_applicable(rules: Rules, series: Series) -> str | None:
    """Why the model does not apply to ``series`` (modality, SOP class, photometric), or None.

    Raises
    ------
    SpecError
        ``rules`` is a raw mapping with invalid rules.
    """
    accepts = as_accepts(rules)
    header = series.header
    modality = series.modality or "(none)"
    if modality not in _upper_set(accepts.modality):
        return f"modality {modality}"
    if accepts.sop_class_uid and str(header.get("SOPClassUID", "")) not in \
            set(accepts.sop_class_uid):
        return f"SOP class {header.get('SOPClassUID', '(none)')}"
    # Headers are read without pixel data, so an image is recognised by its Image Pixel module.
    if "Rows" not in header or "Columns" not in header:
        return "no image pixel data"
    value = str(header.get("PhotometricInterpretation", "")).upper()
    if accepts.photometric_interpretation and \
            value not in _upper_set(accepts.photometric_interpretation):
        return f"photometric interpretation {value or '(none)'}"
    return None


def unfit(rules: Rules, series: Series) -> str | None:
    """Why a model that applies should not judge ``series``, or None when it is fit.

    Raises
    ------
    SpecError
        ``rules`` is a raw mapping with invalid rules.
    """
    accepts = as_accepts(rules)
    anatomy = wrong_anatomy(accepts, series)
    if anatomy:
        return anatomy
    header = series.header
    view = str(header.get("ViewPosition", "") or "").strip().upper()
    if view and view in _upper_set(accepts.reject_view_position):
        return f"view position {view} is not a frontal (PA/AP) view"
    rejected_types = _upper_set(accepts.reject_image_type)
    image_type = _upper_set(_values(header.get("ImageType")))
    if rejected_types & image_type:
        return f"image type {'/'.join(sorted(rejected_types & image_type))} is not analysed"
    if len(series.instances) < accepts.min_instances:
        return (f"{len(series.instances)} image(s), the model needs at least "
                f"{accepts.min_instances}")
    limit = accepts.max_slice_thickness_mm
    thickness = header.get("SliceThickness")
    if limit is not None and thickness not in (None, "") and float(thickness) > limit:
        return (f"slice thickness {float(thickness):g} mm exceeds the model's limit of "
                f"{limit:g} mm")
    return None


def skip_reason(series: Series, reasons: Sequence[str]) -> str:
    """One line for a series no model applies to, built from each model's reason."""
    if not reasons:
        return "no model is installed"
    distinct = sorted(set(reasons))
    if all(r.startswith("modality ") for r in distinct):
        return f"no model accepts modality {series.modality or '(none)'}"
    return "no model accepts this series: " + "; ".join(distinct)
