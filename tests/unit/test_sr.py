"""The TID 1500 SR, written to disk and read back with highdicom, against findings.json."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pytest
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes as dcm_codes
from pydicom.uid import SecondaryCaptureImageStorage

from dicom_ai import DISCLAIMER
from dicom_ai.inference.findings import Finding, ModelResult
from dicom_ai.results import build_outputs, codes, findings_document
from tests import results_fixtures as fx


def build(result: ModelResult, tmp_path: Path, **settings: Any
          ) -> tuple[list[Dataset], Dataset, hd.sr.MeasurementReport]:
    """Build the outputs, write the SR and read it back: (outputs, SR read back, its report)."""
    datasets = build_outputs([result], fx.settings(**settings), codes=fx.CODES,
                             finding_site=fx.LUNG)
    path = tmp_path / "sr.dcm"
    datasets[-1].save_as(path, enforce_file_format=True)
    sr = hd.sr.srread(path)
    assert isinstance(sr, hd.sr.Comprehensive3DSR)
    report = sr.content
    assert isinstance(report, hd.sr.MeasurementReport)
    return datasets, sr, report


def findings_by_label(result: ModelResult) -> dict[str, dict[str, Any]]:
    doc = findings_document(result.series.study_instance_uid, [result])
    return {f["label"]: f for f in doc["results"][0]["findings"]}


def label_of(group: hd.sr.MeasurementsAndQualitativeEvaluations) -> str:
    """The finding label in our tracking identifier "<model> <label> #<n>"."""
    identifier = group.tracking_identifier
    assert identifier is not None
    return identifier.split()[1]


def by_identifier(report: hd.sr.MeasurementReport
                  ) -> dict[str, hd.sr.MeasurementsAndQualitativeEvaluations]:
    return {str(g.tracking_identifier): g for g in report.get_image_measurement_groups()}


def comments(group: Dataset) -> list[str]:
    return [str(i.TextValue) for i in group[0].ContentSequence
            if i.ValueType == "TEXT" and i.ConceptNameCodeSequence[0].CodeValue == "121106"]


def region_of(measurement: hd.sr.Measurement) -> tuple[list[list[float]], str]:
    """The 2D SCOORD a NUM is INFERRED FROM: its points and the image it is SELECTED FROM."""
    (scoord,) = [c for c in measurement.referenced_coordinates or []
                 if c.value_type == hd.sr.ValueTypeValues.SCOORD]
    assert scoord.relationship_type == hd.sr.RelationshipTypeValues.INFERRED_FROM
    (image,) = scoord.ContentSequence
    assert image.RelationshipType == "SELECTED FROM" and image.ValueType == "IMAGE"
    return np.asarray(scoord.value).tolist(), str(
        image.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)


def text_values(ds: Dataset) -> list[str]:
    out: list[str] = []
    for item in ds.get("ContentSequence", []):
        if item.ValueType == "TEXT":
            out.append(str(item.TextValue))
        out.extend(text_values(item))
    return out


def test_classification_groups_match_findings_json(tmp_path: Path) -> None:
    result = fx.dx_result()
    _, _, report = build(result, tmp_path)
    expected = findings_by_label(result)
    groups = report.get_image_measurement_groups()
    assert len(groups) == 2
    seen = {}
    for group in groups:
        label = label_of(group)
        seen[label] = group
        probability = group.get_measurements(name=dcm_codes.DCM.Probability)
        assert len(probability) == 1
        assert probability[0].value == expected[label]["probability"]
        assert probability[0].unit == codes.NO_UNITS
        evaluation = group.get_qualitative_evaluations()
        assert len(evaluation) == 1
        assert evaluation[0].value == (codes.PRESENT if expected[label]["positive"]
                                       else codes.ABSENT)
        assert [s.value for s in group.finding_sites] == [codes.LUNG]
        assert group.tracking_uid is not None
    assert seen["pneumonia"].finding_type == hd.sr.CodedConcept("233604007", "SCT",
                                                                "Pneumonia")
    # A label without a bundle code is still coded, privately, never dropped.
    normal = seen["normal"].finding_type
    assert normal is not None and normal.scheme_designator == codes.PRIVATE_SCHEME


def test_sr_document_attributes(tmp_path: Path) -> None:
    result = fx.dx_result()
    datasets, sr, report = build(result, tmp_path, institution_name="Test Hospital")
    source = result.series.header
    assert sr.StudyInstanceUID == source.StudyInstanceUID
    assert sr.SeriesInstanceUID != source.SeriesInstanceUID
    assert sr.PatientID == source.PatientID
    assert (sr.VerificationFlag, sr.CompletionFlag) == ("UNVERIFIED", "COMPLETE")
    assert "AI" in sr.SeriesDescription and "not for diagnostic use" in sr.SeriesDescription
    assert [str(sr.SeriesDate), str(sr.ContentDate), str(sr.ContentTime)] == [
        "20261129", "20261129", "123015"]
    assert sr.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"
    assert DISCLAIMER in text_values(sr)
    observers = report.get_observer_contexts(observer_type=dcm_codes.DCM.Device)
    device = observers[0].observer_identifying_attributes
    assert isinstance(device, hd.sr.DeviceObserverIdentifyingAttributes)
    assert device.uid == result.model.device_uid
    procedures = [item.value for item in report[0].ContentSequence
                  if item.name == dcm_codes.DCM.ProcedureReported]
    assert procedures == [codes.IMAGING_PROCEDURE]
    # The SC is referenced from the group of its source image and listed as evidence.
    sc = datasets[0]
    assert sc.SOPClassUID == SecondaryCaptureImageStorage
    evidence = {uid for _, _, uid, _ in sr.get_evidence()}
    assert {sc.SOPInstanceUID, source.SOPInstanceUID} <= evidence
    group = report.get_image_measurement_groups()[0]
    illustrations = [item for item in group[0].ContentSequence
                     if item.name == codes.BEST_ILLUSTRATION]
    assert [i.referenced_sop_instance_uid for i in illustrations] == [sc.SOPInstanceUID]


def test_contributing_equipment_names_the_algorithm(tmp_path: Path) -> None:
    result = fx.dx_result()
    _, sr, _ = build(result, tmp_path, institution_name="Test Hospital")
    items = [i for i in sr.ContributingEquipmentSequence
             if i.PurposeOfReferenceCodeSequence[0].CodeValue == "Newcode1"]
    assert len(items) == 1
    item = items[0]
    assert item.PurposeOfReferenceCodeSequence[0].CodingSchemeDesignator == "99IHE"
    assert item.PurposeOfReferenceCodeSequence[0].CodeMeaning == "Processing Algorithm"
    assert item.DeviceUID == result.model.device_uid
    assert item.ManufacturerModelName == result.model.name
    assert item.SoftwareVersions == result.model.version
    assert item.InstitutionName == "Test Hospital"
    schemes = {i.CodingSchemeDesignator for i in sr.CodingSchemeIdentificationSequence}
    assert {"99IHE", codes.PRIVATE_SCHEME} <= schemes


def test_quantities_and_localized_candidate(tmp_path: Path) -> None:
    result = fx.ct_result()
    datasets, _, report = build(result, tmp_path)
    expected = findings_by_label(result)
    groups = by_identifier(report)
    volume = groups["ct-lung lung_volume_left_ml #1"]
    assert volume.finding_type == codes.LEFT_LUNG
    (measurement,) = volume.get_measurements(name=codes.VOLUME)
    assert measurement.value == expected["lung_volume_left_ml"]["value"]
    assert measurement.unit == codes.ucum("mL")
    (density,) = groups["ct-lung mean_lung_density_hu #2"].get_measurements()
    assert density.unit.value == "[hnsf'U]"
    assert len(volume.source_images) == len(result.series.instances)
    # A whole-series measurement is drawn on the middle slice, as a marker at its left edge;
    # the next measurement's marker sits below it (OHIF puts each label right of its region).
    middle = result.series.instances[len(result.series.instances) // 2]
    points, image = region_of(measurement)
    assert image == middle.SOPInstanceUID
    cols, rows = float(middle.header.Columns), float(middle.header.Rows)
    assert np.allclose(points[0], [0.02 * cols, 0.04 * rows])
    assert np.allclose(points[2], [0.06 * cols, 0.08 * rows])
    next_points, _ = region_of(density)
    assert np.allclose(next_points[0], [0.02 * cols, 0.11 * rows])

    nodule = groups["ct-lung nodule #4"]
    finding = result.findings[3]
    assert nodule.finding_type == hd.sr.CodedConcept("27925004", "SCT", "Nodule")
    (probability,) = nodule.get_measurements(name=codes.PROBABILITY)
    assert probability.value == finding.to_json()["probability"]
    # The first NUM carries the key slice's box, 2D; the 3D point is on the second.
    points, image = region_of(probability)
    assert image == finding.image_uid
    assert points == [[280, 180], [320, 180], [320, 220], [280, 220], [280, 180]]
    (size,) = nodule.get_measurements(name=codes.LONG_AXIS)
    assert size.value == max(finding.to_json()["extent_mm"])
    (point,) = size.referenced_coordinates
    assert point.graphic_type == hd.sr.GraphicTypeValues3D.POINT
    assert point.frame_of_reference_uid == result.series.header.FrameOfReferenceUID
    assert point.value[0] == pytest.approx(finding.to_json()["center_mm"], abs=1e-4)
    assert [s.referenced_sop_instance_uid for s in nodule.source_images] == list(finding.slices)
    (evaluation,) = nodule.get_qualitative_evaluations()
    assert evaluation.value == codes.PRESENT
    assert comments(nodule) == ["AI: nodule — probability 0.71 (operating point 0.60): "
                                "present"]
    # The reported candidate is segmented; its group points to the segment.
    (seg,) = [d for d in datasets if d.Modality == "SEG"]
    (ref,) = [i for i in nodule[0].ContentSequence if i.ValueType == "IMAGE"
              and i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == seg.SOPInstanceUID]
    assert ref.ReferencedSOPSequence[0].ReferencedSegmentNumber == 1
    assert seg.SegmentSequence[0].TrackingUID == nodule.tracking_uid


def test_candidate_below_operating_point_is_never_absent(tmp_path: Path) -> None:
    result = fx.ct_result()
    _, _, report = build(result, tmp_path)
    groups = report.get_image_measurement_groups()
    assert not [g for g in groups if "below operating point" in g.tracking_identifier]
    assert not [line for g in groups for line in comments(g) if "probability 0.45" in line]
    assert all(item.value != codes.ABSENT for g in groups
               for item in g.get_qualitative_evaluations()
               if g.finding_type == codes.concept(fx.NODULE))


def test_boxes_are_regions_on_their_image(tmp_path: Path) -> None:
    result = fx.fracture_result()
    _, _, report = build(result, tmp_path)
    groups = report.get_image_measurement_groups()
    assert [g.tracking_identifier for g in groups] == [
        "xr-fracture fracture #1", "xr-fracture fracture #2"]
    image = result.series.instances[0]
    for group, finding in zip(groups, result.findings[:2], strict=True):
        (probability,) = group.get_measurements(name=codes.PROBABILITY)
        points, uid = region_of(probability)
        assert uid == image.SOPInstanceUID
        cols, rows = image.header.Columns, image.header.Rows
        c0, r0, c1, r1 = finding.bbox_px or (0.02 * cols, 0.04 * rows, 0.06 * cols, 0.08 * rows)
        assert np.allclose(points, [[c0, r0], [c1, r0], [c1, r1], [c0, r1], [c0, r0]])
    assert comments(groups[0]) == [
        "AI: fracture — probability 0.91 (operating point 0.50): present"]
    # A verdict without a number is stated at report level: Present, and its line.
    assert report.get_planar_roi_measurement_groups() == []
    evaluations = report[0].ContentSequence[-1].ContentSequence
    (verdict,) = [i for i in evaluations if i.ValueType == "CODE"]
    assert verdict.name.value == "multiple_fractures"
    assert verdict.value == codes.PRESENT
    assert "AI: multiple fractures — present" in [
        str(i.TextValue) for i in evaluations if i.ValueType == "TEXT"]


def test_classification_lines_and_impression(tmp_path: Path) -> None:
    result = fx.dx_result()
    _, _, report = build(result, tmp_path)
    groups = by_identifier(report)
    assert comments(groups["cxr-pneumonia pneumonia #1"]) == [
        "AI: pneumonia — probability 0.87 (operating point 0.54): present"]
    (impression,) = [i for i in report[0].ContentSequence[-1].ContentSequence
                     if i.ConceptNameCodeSequence[0].CodeValue == codes.IMPRESSION.value]
    assert impression.TextValue.startswith("AI-drafted impression — not for diagnostic use.")
    assert "pneumonia suggested (probability 0.87, operating point 0.54)" in impression.TextValue


def test_chinese_text_and_language_of_content(tmp_path: Path) -> None:
    result = fx.dx_result()
    _, sr, report = build(result, tmp_path, language="zh")
    language = report[0].ContentSequence[0]
    assert language.ConceptCodeSequence[0].CodeValue == "zh-CN"
    assert comments(by_identifier(report)["cxr-pneumonia pneumonia #1"]) == [
        "AI：肺炎 — 概率 0.87 (工作点 0.54): 阳性"]
    assert any(t.startswith("AI 起草的印象 — 不用于诊断") for t in text_values(sr))


def test_unmeasurable_quantity_gets_no_group(tmp_path: Path) -> None:
    result = fx.ct_result()
    result.findings = [Finding("mean_lung_density_hu", value=float("nan"), unit="[hnsf'U]"),
                       Finding("laa950_percent", value=7.25, unit="%")]
    _, sr, report = build(result, tmp_path)
    (group,) = report.get_image_measurement_groups()
    assert group.tracking_identifier == "ct-lung laa950_percent #2"
    assert any("mean lung density hu not measurable" in t for t in text_values(sr))


def test_rejected_result_states_why_and_has_no_finding(tmp_path: Path) -> None:
    result = fx.rejected_result()
    datasets, sr, report = build(result, tmp_path)
    assert len(datasets) == 1  # no Secondary Capture for an input that was not analysed
    assert report.get_image_measurement_groups() == []
    # Alone in its SR: a TID 1410 group over the image that was not analysed.
    (group,) = report.get_planar_roi_measurement_groups()
    assert group.finding_type is None
    assert group.get_measurements() == []
    image = result.series.instances[0]
    assert group.roi is not None
    assert group.roi.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID \
        == image.SOPInstanceUID
    (evaluation,) = group.get_qualitative_evaluations()
    assert evaluation.name == codes.ANALYSIS_PERFORMED
    assert evaluation[0].ConceptCodeSequence[0].CodeValue == codes.NOT_PERFORMED.value
    assert comments(group) == [f"cxr-pneumonia 1.0.0: not analysed — {result.reason}"]
    assert DISCLAIMER in text_values(sr)


def test_rejected_beside_analysed_is_stated_at_report_level(tmp_path: Path) -> None:
    dx, rejected = fx.dx_result(), fx.rejected_result(path=fx.data_path(fx.DX_FILE))
    datasets = build_outputs([dx, rejected], fx.settings(), codes=fx.CODES,
                             finding_site=fx.LUNG)
    datasets[-1].save_as(tmp_path / "sr.dcm", enforce_file_format=True)
    report = hd.sr.srread(tmp_path / "sr.dcm").content
    assert len(report.get_image_measurement_groups()) == 2
    assert report.get_planar_roi_measurement_groups() == []
    evaluations = report[0].ContentSequence[-1].ContentSequence
    (performed,) = [i for i in evaluations if i.ValueType == "CODE"]
    assert performed.value == codes.NOT_PERFORMED
    assert f"cxr-pneumonia 1.0.0: not analysed — {rejected.reason}" in [
        str(i.TextValue) for i in evaluations if i.ValueType == "TEXT"]


def test_different_content_never_shares_a_sop_instance_uid(tmp_path: Path) -> None:
    first = build(fx.dx_result(), tmp_path)[1]
    again = build(fx.dx_result(), tmp_path)[1]
    assert again.SOPInstanceUID == first.SOPInstanceUID  # a replay: same UID
    changed = fx.dx_result()
    changed.findings[0] = Finding("pneumonia", probability=0.5, positive=False,
                                  operating_point=0.54,
                                  image_uid=changed.findings[0].image_uid)
    other = build(changed, tmp_path)[1]
    assert other.SOPInstanceUID != first.SOPInstanceUID
    assert other.SeriesInstanceUID == first.SeriesInstanceUID


def test_without_secondary_captures_only_the_sr_is_built(tmp_path: Path) -> None:
    result = fx.dx_result()
    datasets, sr, report = build(result, tmp_path, secondary_captures=False)
    assert len(datasets) == 1
    assert result.outputs == [f"sr-{sr.SOPInstanceUID}.dcm"]
    group = report.get_image_measurement_groups()[0]
    assert all(item.name != codes.BEST_ILLUSTRATION for item in group[0].ContentSequence)


def test_outputs_are_recorded_in_order(tmp_path: Path) -> None:
    result = fx.dx_result()
    datasets, _, _ = build(result, tmp_path)
    assert result.outputs == [f"sc-{datasets[0].SOPInstanceUID}.dcm",
                              f"sr-{datasets[1].SOPInstanceUID}.dcm"]
