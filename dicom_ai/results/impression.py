"""Plain-language text of our results: one line per finding and an AI-drafted Impression.

Template-based, no language model: every sentence is a fixed template of the configured
language (``output.language``: ``"en"`` English, ``"zh"`` Simplified Chinese) filled with the
finding's name, probability, operating point and size. The same text goes into the SR (a TEXT
Comment per measurement group, a TEXT Impression for the report), ``findings.json`` and the
Secondary Capture caption, so the three never disagree. Pure functions, no I/O.

The present/absent word always follows from the probability and the stated operating point; a
localized candidate scored below its operating point is called exactly that, never "absent".
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from dicom_ai.config import OUTPUT_LANGUAGES
from dicom_ai.inference.findings import Finding, ModelResult

Language = Literal["en", "zh"]


@dataclass(frozen=True)
class Templates:
    """The sentences of one language. ``{name}``, ``{p}``, ``{t}``, ``{size}`` … are filled in."""

    prefix: str
    probability: str
    operating_point: str
    present: str
    absent: str
    most_probable: str
    below: str
    size: str
    not_measurable: str
    header: str
    suggested: str
    none_above: str
    candidates_above: str
    regions_marked: str
    candidates_below: str
    measurements: str
    not_analysed: str
    skipped: str
    nothing: str
    separator: str
    end: str
    list_separator: str
    #: Display names of the labels our models emit; other labels are shown as written.
    names: Mapping[str, str]


EN = Templates(
    prefix="AI: ",
    probability="probability {p}",
    operating_point="operating point {t}",
    present="present",
    absent="absent",
    most_probable="most probable class",
    below="below operating point {t}, not reported",
    size="about {size} mm",
    not_measurable="not measurable",
    header="AI-drafted impression — not for diagnostic use",
    suggested="{name} suggested ({details})",
    none_above="no finding above the operating point ({details})",
    candidates_above="{n} {name} candidate(s) above the operating point: {items}",
    regions_marked="{n} {name} region(s) marked: {items}",
    candidates_below="{n} candidate(s) below the operating point, not reported",
    measurements="measurements: {items}",
    not_analysed="{model}: not analysed — {reason}",
    skipped="series {series} not analysed — {reason}",
    nothing="analysed, no findings",
    separator=". ",
    end=".",
    list_separator="; ",
    names={},
)

ZH = Templates(
    prefix="AI：",
    probability="概率 {p}",
    operating_point="工作点 {t}",
    present="阳性",
    absent="阴性",
    most_probable="概率最高的类别",
    below="低于工作点 {t}，不报告",
    size="约 {size} 毫米",
    not_measurable="无法测量",
    header="AI 起草的印象 — 不用于诊断",
    suggested="提示{name}（{details}）",
    none_above="未见高于工作点的发现（{details}）",
    candidates_above="{n} 个{name}候选高于工作点：{items}",
    regions_marked="标出 {n} 处{name}区域：{items}",
    candidates_below="{n} 个候选低于工作点，未报告",
    measurements="测量：{items}",
    not_analysed="{model}：未分析 — {reason}",
    skipped="序列 {series} 未分析 — {reason}",
    nothing="已分析，未见发现",
    separator="。",
    end="。",
    list_separator="；",
    names={
        "pneumonia": "肺炎",
        "normal": "正常",
        "nodule": "结节",
        "mass": "肿块",
        "fracture": "骨折",
        "referable_dr": "需转诊的糖尿病视网膜病变",
        "melanoma": "黑色素瘤",
        "nevus": "痣",
        "seborrheic_keratosis": "脂溢性角化病",
        "lung_volume_left_ml": "左肺容积",
        "lung_volume_right_ml": "右肺容积",
        "mean_lung_density_hu": "平均肺密度",
        "laa950_percent": "低于 -950 HU 的肺容积百分比",
    },
)

TEMPLATES: dict[Language, Templates] = {"en": EN, "zh": ZH}


def templates(language: str) -> Templates:
    """The template set of ``language``.

    Raises
    ------
    ValueError
        For a language without templates.
    """
    if language not in TEMPLATES:
        raise ValueError(f"no templates for language {language!r}; "
                         f"choose one of {', '.join(OUTPUT_LANGUAGES)}")
    return TEMPLATES[language]


def display_name(label: str, language: str) -> str:
    """What a reader calls ``label``: the template's name, else the label with underscores as
    spaces — the label itself, so that the text and ``findings.json`` name a finding alike."""
    return templates(language).names.get(label, label.replace("_", " "))


def _number(value: float) -> str:
    return f"{value:.2f}"


def _value(finding: Finding, t: Templates) -> str:
    if finding.value is None or not math.isfinite(finding.value):
        return t.not_measurable
    unit = {"[hnsf'U]": "HU", "1": ""}.get(finding.unit or "1", finding.unit or "")
    return f"{finding.value:.1f} {unit}".strip()


def _details(finding: Finding, t: Templates) -> str:
    """``probability 0.97, operating point 0.54`` (and the size of a localized candidate)."""
    parts = []
    if finding.probability is not None:
        parts.append(t.probability.format(p=_number(finding.probability)))
    if finding.operating_point is not None:
        parts.append(t.operating_point.format(t=_number(finding.operating_point)))
    if finding.extent_mm is not None:
        parts.append(t.size.format(size=f"{max(finding.extent_mm):.0f}"))
    return ", ".join(parts)


def finding_line(finding: Finding, language: str = "en") -> str:
    """The one-line reading of a finding, e.g.
    ``AI: pneumonia — probability 0.97 (operating point 0.54): present``.

    Parameters
    ----------
    finding:
        The finding.
    language:
        Template set.
    """
    t = templates(language)
    name = display_name(finding.label, language)
    if finding.probability is None and finding.value is None:
        return f"{t.prefix}{name} — {t.present if finding.positive else t.absent}"
    if finding.probability is None:
        return f"{t.prefix}{name} — {_value(finding, t)}"
    text = f"{t.prefix}{name} — {t.probability.format(p=_number(finding.probability))}"
    if finding.below_operating_point:
        # Short: OHIF does not keep a long first line inside the viewport, and a candidate box
        # may lie near the image's right edge.
        point = "" if finding.operating_point is None else _number(finding.operating_point)
        return f"{text}{t.list_separator}{t.below.format(t=point)}"
    if finding.operating_point is not None:
        text += f" ({t.operating_point.format(t=_number(finding.operating_point))})"
    if finding.positive is None:
        verdict = ""
    elif finding.operating_point is None and not finding.localized:
        verdict = t.most_probable if finding.positive else ""
    else:
        verdict = t.present if finding.positive else t.absent
    if verdict:
        text += f": {verdict}"
    # The size is not repeated here: its own NUM (Long axis) is the next line a viewer shows,
    # and OHIF does not keep a long first line inside the viewport.
    return text


def result_sentence(result: ModelResult, language: str = "en") -> str:
    """What one model said about one series, as one sentence of the Impression."""
    t = templates(language)
    model = result.model.label
    if result.status == "rejected":
        return t.not_analysed.format(model=model, reason=result.reason or "input rejected")
    parts: list[str] = []
    image_level = [f for f in result.findings if not f.localized and f.probability is not None]
    for f in image_level:
        if f.positive:
            parts.append(t.suggested.format(name=display_name(f.label, language),
                                            details=_details(f, t)))
    if image_level and not any(f.positive for f in image_level):
        # The finding the model decides on is the one with an operating point.
        key = next((f for f in image_level if f.operating_point is not None), image_level[0])
        parts.append(t.none_above.format(details=_details(key, t)))
    parts += [t.suggested.format(name=display_name(f.label, language), details=t.present)
              for f in result.findings
              if f.positive and f.probability is None and f.value is None]
    above = [f for f in result.findings if f.localized and f.positive]
    for label in dict.fromkeys(f.label for f in above):
        same = [f for f in above if f.label == label]
        # A region without an operating point of its own (a fracture box of a positive image)
        # was not judged against one, and the sentence must not say it was.
        for template, group in ((t.candidates_above, [f for f in same
                                                      if f.operating_point is not None]),
                                (t.regions_marked, [f for f in same
                                                    if f.operating_point is None])):
            if group:
                parts.append(template.format(
                    n=len(group), name=display_name(label, language),
                    items=t.list_separator.join(_details(f, t) for f in group)))
    below = [f for f in result.findings if f.below_operating_point]
    if below:
        parts.append(t.candidates_below.format(n=len(below)))
    values = [f for f in result.findings if f.value is not None and f.probability is None]
    if values:
        parts.append(t.measurements.format(items=t.list_separator.join(
            f"{display_name(f.label, language)} {_value(f, t)}"
            for f in values)))
    return f"{model}: " + (t.list_separator.join(parts) if parts else t.nothing)


def impression(results: Sequence[ModelResult], language: str = "en", *,
               skipped: Mapping[str, str] | None = None) -> str:
    """The AI-drafted Impression of a set of results (one model's SR, or a whole study).

    Parameters
    ----------
    results:
        Model results, in processing order.
    language:
        Template set (``output.language``).
    skipped:
        Series no model applies to: Series Instance UID → reason (``findings.json`` lists
        them; an SR, which is about one model, does not).

    Returns
    -------
    str
        Always starts with the template's "AI-drafted impression — not for diagnostic use".
    """
    t = templates(language)
    sentences = [t.header]
    sentences += [result_sentence(r, language) for r in results]
    sentences += [t.skipped.format(series=uid, reason=reason)
                  for uid, reason in sorted((skipped or {}).items())]
    return t.separator.join(sentences) + t.end
