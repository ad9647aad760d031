"""findings.json: shape, disclaimer, and the same rounding as the SR."""

from __future__ import annotations

import json

from dicom_ai import DISCLAIMER
from dicom_ai.results import findings_document
from tests import results_fixtures as fx


def test_document_shape_and_rounding() -> None:
    dx, rejected = fx.dx_result(), fx.rejected_result()
    doc = findings_document("1.2.3", [dx, rejected])
    assert list(doc) == ["study_instance_uid", "disclaimer", "impression", "results"]
    assert doc["study_instance_uid"] == "1.2.3"
    assert doc["disclaimer"] == DISCLAIMER
    first, second = doc["results"]
    assert first["model"] == {"name": "cxr-pneumonia", "version": "1.0.0"}
    assert first["findings"][0] == {"label": "pneumonia", "probability": 0.873457,
                                     "positive": True, "operating_point": 0.54,
                                     "image_uid": dx.series.instances[0].SOPInstanceUID}
    assert second["status"] == "rejected" and second["findings"] == []
    assert second["reason"] == rejected.reason
    assert json.loads(json.dumps(doc)) == doc
    assert doc["impression"] == (
        "AI-drafted impression — not for diagnostic use. cxr-pneumonia 1.0.0: pneumonia "
        "suggested (probability 0.87, operating point 0.54). "
        f"cxr-pneumonia 1.0.0: not analysed — {rejected.reason}.")


def test_localized_and_quantitative_findings_keep_their_keys() -> None:
    doc = findings_document("1.2.3", [fx.ct_result()])
    findings = {f["label"]: f for f in doc["results"][0]["findings"][:4]}
    assert findings["lung_volume_left_ml"] == {"label": "lung_volume_left_ml",
                                               "value": 2345.6789, "unit": "mL"}
    nodule = findings["nodule"]
    assert nodule["center_mm"] == [12.35, -40.5, 100.25]
    assert nodule["extent_mm"] == [8.0, 6.5, 9.25]
    assert len(nodule["slices"]) == 3
    assert nodule["bbox_px"] == [280.0, 180.0, 320.0, 220.0]
    assert "mask" not in nodule  # the SEG's pixels, not part of findings.json


def test_box_findings_carry_bbox_px_in_the_xr_fracture_contract() -> None:
    result = fx.fracture_result()
    doc = findings_document("1.2.3", [result])
    box = doc["results"][0]["findings"][1]
    assert set(box) == {"label", "probability", "positive", "operating_point", "image_uid",
                        "bbox_px"}
    assert box["label"] == "fracture"
    c0, r0, c1, r1 = box["bbox_px"]
    assert c0 < c1 and r0 < r1
