"""findings.json: shape, disclaimer, and the same rounding as the SR."""

from __future__ import annotations

import json

from dicom_ai import DISCLAIMER
from dicom_ai.results import findings_document
from tests import results_fixtures as fx


def test_document_shape_and_rounding() -> None:
    dx, rejected = fx.dx_result(), fx.rejected_result()
    doc = findings_document("1.2.3", [dx, rejected])
    assert list(doc) == ["study_instance_uid", "disclaimer", "results"]
    assert doc["study_instance_uid"] == "1.2.3"
    assert doc["disclaimer"] == DISCLAIMER
    first, second = doc["results"]
    assert first["model"] == {"name": "cxr-pneumonia", "version": "1.0.0"}
    assert first["findings"][0] == {"label": "pneumonia", "probability": 0.873457,
                                     "positive": True}
    assert second["status"] == "rejected" and second["findings"] == []
    assert second["reason"] == rejected.reason
    assert json.loads(json.dumps(doc)) == doc


def test_localized_and_quantitative_findings_keep_their_keys() -> None:
    doc = findings_document("1.2.3", [fx.ct_result()])
    findings = {f["label"]: f for f in doc["results"][0]["findings"]}
    assert findings["lung_volume_left_ml"] == {"label": "lung_volume_left_ml",
                                               "value": 2345.6789, "unit": "mL"}
    nodule = findings["nodule"]
    assert nodule["center_mm"] == [12.35, -40.5, 100.25]
    assert nodule["extent_mm"] == [8.0, 6.5, 9.25]
    assert len(nodule["slices"]) == 3
