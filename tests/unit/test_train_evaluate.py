"""Validation report: figures from the bundle's decision rules, and the printed form."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from dicom_ai.train.evaluate import build_report, format_report, write_plots


def _binary_meta(threshold: float) -> dict[str, Any]:
    return {"name": "toy", "dicom_ai": {
        "labels": ["normal", "pneumonia"], "temperature": 1.0,
        "decision": {"kind": "threshold", "label": "pneumonia", "threshold": threshold,
                     "criterion": "test"},
        "derived_findings": []}}


def test_binary_report_by_hand() -> None:
    labels = np.array([0, 0, 1, 1])
    # p(pneumonia) = sigmoid(z): 0.2, 0.6, 0.7, 0.9 (logits [0, logit(p)]).
    p = np.array([0.2, 0.6, 0.7, 0.9])
    logits = np.stack([np.zeros(4), np.log(p / (1 - p))], axis=1)
    report = build_report(_binary_meta(0.65), labels, logits)
    assert report.auc == 1.0
    b = report.binary[0]
    assert (b.sensitivity, b.specificity) == (1.0, 1.0)
    assert report.confusion == [[2, 0], [0, 2]]
    # Top-label confidences 0.8, 0.6, 0.7, 0.9 in separate bins; argmax is right except for
    # the normal case at p = 0.6: (|1 − 0.8| + |0 − 0.6| + |1 − 0.7| + |1 − 0.9|) / 4 = 0.3.
    assert report.ece_raw == pytest.approx(0.3)
    low = build_report(_binary_meta(0.5), labels, logits)
    assert low.binary[0].specificity == 0.5
    assert low.confusion == [[1, 1], [0, 2]]
    text = format_report(report)
    assert "AUC: 1.0000" in text and "slightly optimistic" in text


def test_multiclass_report_with_derived_finding(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(5), 8)
    logits = rng.normal(size=(40, 5)) + 3.0 * np.eye(5)[labels]
    meta = {"name": "toy5", "dicom_ai": {
        "labels": [f"dr_grade_{g}" for g in range(5)], "temperature": 1.5,
        "decision": {"kind": "argmax"},
        "derived_findings": [{"label": "referable_dr",
                              "sum_of": ["dr_grade_2", "dr_grade_3", "dr_grade_4"],
                              "threshold": 0.5, "criterion": "test"}]}}
    report = build_report(meta, labels, logits)
    assert 0.8 < report.auc <= 1.0
    assert report.auc_ci[0] <= report.auc <= report.auc_ci[1]
    assert np.array(report.confusion).sum() == 40
    ref = report.binary[0]
    assert ref.label == "referable_dr"
    assert np.array(ref.confusion).tolist()[1][0] + np.array(ref.confusion)[1][1] == 24
    metrics = report.metrics()
    assert metrics["split"] == "validation" and "referable_dr" in metrics
    paths = write_plots(report, labels, logits, meta, tmp_path)
    assert [p.name for p in paths] == ["roc.png", "calibration.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in paths)


def test_one_vs_rest_and_mean_auc_by_hand() -> None:
    # Class 0 is ranked perfectly (AUC 1); class 2's score puts one negative (image 1) above
    # one of its two positives: 7 of 8 pairs in order → 0.875; their mean 0.9375.
    labels = np.array([0, 0, 1, 1, 2, 2])
    probs = np.array([[0.8, 0.1, 0.1], [0.6, 0.1, 0.3], [0.1, 0.8, 0.1], [0.2, 0.7, 0.1],
                      [0.1, 0.1, 0.8], [0.3, 0.5, 0.2]])
    meta = {"name": "toy3", "dicom_ai": {
        "labels": ["melanoma", "nevus", "seborrheic_keratosis"], "temperature": 1.0,
        "decision": {"kind": "argmax"}, "derived_findings": [],
        "mean_auc_of": ["melanoma", "seborrheic_keratosis"]}}
    report = build_report(meta, labels, np.log(probs))
    by = {c.label: c for c in report.per_class}
    assert by["melanoma"].auc == 1.0
    assert by["seborrheic_keratosis"].auc == pytest.approx(0.875)
    assert report.mean_auc is not None
    assert report.mean_auc.auc == pytest.approx(0.9375)
    assert report.mean_auc.auc_ci[0] <= report.mean_auc.auc <= report.mean_auc.auc_ci[1]
    text = format_report(report)
    assert "seborrheic_keratosis vs rest: AUC 0.8750" in text
    assert "mean AUC of melanoma + seborrheic_keratosis: 0.9375" in text
    assert report.metrics()["mean_auc"]["auc"] == 0.9375
