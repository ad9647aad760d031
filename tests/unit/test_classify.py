"""Classification decisions: operating point, argmax, derived findings, captions."""

from __future__ import annotations

from typing import Any

import numpy as np

from dicom_ai.inference.classify import caption, decide, decision_score, explained_class
from dicom_ai.inference.runner import calibrated_softmax
from dicom_ai.inference.spec import ClassificationSpec, parse_classification


def _spec(**block: Any) -> ClassificationSpec:
    labels = block["labels"]
    derived = [d["label"] for d in block.get("derived_findings", [])]
    return parse_classification({
        "task": "classification", "input": "xray", "accepts": {"modality": ["CR"]},
        "preprocessing": {"size": [8, 8]},
        "codes": {lab: {"value": lab, "scheme": "99TEST", "meaning": lab}
                  for lab in [*labels, *derived]},
        **block})


BINARY = _spec(labels=["normal", "pneumonia"],
               decision={"kind": "threshold", "label": "pneumonia", "threshold": 0.3})
GRADES = _spec(labels=[f"dr_grade_{i}" for i in range(5)], decision={"kind": "argmax"},
               derived_findings=[{"label": "referable_dr",
                                  "sum_of": ["dr_grade_2", "dr_grade_3", "dr_grade_4"],
                                  "threshold": 0.4}])


def probs(*values: float) -> np.ndarray:
    return np.array(values, dtype=np.float32)


def test_threshold_decision_at_operating_point() -> None:
    below = decide(BINARY, probs(0.75, 0.25))
    assert [(f.label, f.positive) for f in below] == [("normal", True), ("pneumonia", False)]
    at = decide(BINARY, probs(0.7, 0.3))
    assert [(f.label, f.positive) for f in at] == [("normal", False), ("pneumonia", True)]
    assert decision_score(BINARY, at) == np.float32(0.3)
    assert explained_class(BINARY, probs(0.9, 0.1)) == 1


def test_argmax_and_derived_referable() -> None:
    findings = decide(GRADES, probs(0.5, 0.1, 0.2, 0.15, 0.05))
    by = {f.label: f for f in findings}
    assert by["dr_grade_0"].positive and not by["dr_grade_2"].positive
    assert abs(by["referable_dr"].probability - 0.4) < 1e-6
    assert by["referable_dr"].positive  # 0.4 >= threshold 0.4
    assert len(findings) == 6
    assert decision_score(GRADES, findings) == by["referable_dr"].probability
    assert explained_class(GRADES, probs(0.5, 0.1, 0.2, 0.15, 0.05)) == 0


def test_caption_names_decision_and_derived() -> None:
    assert caption(BINARY, decide(BINARY, probs(0.2, 0.8))) == "pneumonia: p=0.80 POSITIVE"
    text = caption(GRADES, decide(GRADES, probs(0.1, 0.1, 0.6, 0.1, 0.1)))
    assert text == "dr_grade_2: p=0.60 POSITIVE; referable_dr: p=0.80 POSITIVE"


def test_calibrated_softmax_by_hand() -> None:
    # softmax([0, ln 3]) = [1/4, 3/4]; at temperature 2 → softmax([0, ln 3 / 2]) = [1/(1+√3), …]
    logits = np.array([[0.0, np.log(3.0)]], dtype=np.float32)
    assert np.allclose(calibrated_softmax(logits), [[0.25, 0.75]], atol=1e-6)
    expected = 1.0 / (1.0 + np.sqrt(3.0))
    assert np.allclose(calibrated_softmax(logits, 2.0)[0, 0], expected, atol=1e-6)
