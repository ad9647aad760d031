"""The plain-language lines and the AI-drafted Impression (templates, no I/O)."""

from __future__ import annotations

import pytest

from dicom_ai.config import OUTPUT_LANGUAGES, Settings, validate
from dicom_ai.inference.findings import Finding
from dicom_ai.results.impression import TEMPLATES, finding_line, impression, templates
from tests import results_fixtures as fx


def test_classification_line_states_the_operating_point() -> None:
    f = Finding("pneumonia", probability=0.974706, positive=True, operating_point=0.54)
    assert finding_line(f) == "AI: pneumonia — probability 0.97 (operating point 0.54): present"
    f = Finding("pneumonia", probability=0.2, positive=False, operating_point=0.54)
    assert finding_line(f).endswith("(operating point 0.54): absent")


def test_argmax_class_without_operating_point() -> None:
    top = Finding("dr_grade_3", probability=0.61, positive=True)
    other = Finding("dr_grade_1", probability=0.2, positive=False)
    assert finding_line(top) == "AI: dr grade 3 — probability 0.61: most probable class"
    # Not the most probable class: no verdict that a reader could take for "absent".
    assert finding_line(other) == "AI: dr grade 1 — probability 0.20"


def test_candidate_below_the_operating_point_is_called_so() -> None:
    f = Finding("nodule", probability=0.99, positive=False, operating_point=0.9987,
                center_mm=(1.0, 2.0, 3.0), extent_mm=(5.0, 6.0, 4.0))
    line = finding_line(f)
    assert line == "AI: nodule — probability 0.99; below operating point 1.00, not reported"
    assert "absent" not in line


def test_measurement_lines() -> None:
    assert finding_line(Finding("mean_lung_density_hu", value=-845.1, unit="[hnsf'U]")) == \
        "AI: mean lung density hu — -845.1 HU"
    assert finding_line(Finding("laa950_percent", value=float("nan"), unit="%")) == \
        "AI: laa950 percent — not measurable"


def test_impression_lists_found_not_found_and_not_analysed() -> None:
    text = impression([fx.dx_result(), fx.ct_result(), fx.rejected_result()],
                      skipped={"1.2.3": "no model applies to modality MR"})
    assert text.startswith("AI-drafted impression — not for diagnostic use. ")
    assert "cxr-pneumonia 1.0.0: pneumonia suggested (probability 0.87, operating point 0.54)" \
        in text
    assert ("1 nodule candidate(s) above the operating point: probability 0.71, operating "
            "point 0.60, about 9 mm") in text
    assert "1 candidate(s) below the operating point, not reported" in text
    assert "lung volume left ml 2345.7 mL" in text
    assert "not analysed — input out of distribution" in text
    assert text.endswith("series 1.2.3 not analysed — no model applies to modality MR.")


def test_regions_without_an_operating_point_are_marked_not_judged() -> None:
    result = fx.fracture_result()
    image_level, box = result.findings[0], result.findings[1]
    result.findings = [image_level, Finding("fracture", probability=0.36, positive=True,
                                            image_uid=box.image_uid, bbox_px=box.bbox_px)]
    text = impression([result])
    assert ("xr-fracture 0.1.0: fracture suggested (probability 0.91, operating point 0.50); "
            "1 fracture region(s) marked: probability 0.36.") in text
    assert "candidate(s) above" not in text
    assert "标出 1 处骨折区域：概率 0.36" in impression([result], "zh")


def test_impression_when_nothing_is_above_the_operating_point() -> None:
    text = impression([fx.fundus_result()])
    assert "fundus-dr 2.0.0: no finding above the operating point (probability 0.40)" in text


def test_chinese_template_set() -> None:
    text = impression([fx.dx_result()], "zh")
    assert text.startswith("AI 起草的印象 — 不用于诊断。")
    assert "提示肺炎（概率 0.87, 工作点 0.54）" in text
    assert text.endswith("。")


def test_every_configurable_language_has_templates_and_others_are_refused() -> None:
    assert set(TEMPLATES) == set(OUTPUT_LANGUAGES)
    with pytest.raises(ValueError, match="no templates for language 'fr'"):
        templates("fr")
    settings = Settings()
    settings.output.language = "fr"
    assert any(p.startswith("output.language") for p in validate(settings))
