"""The TID 1500 SR, written to disk and read back with highdicom, against findings.json."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import highdicom as hd
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
    assert procedures == [codes.XR_CHEST_SINGLE_VIEW]
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
    _, _, report = build(result, tmp_path)
    expected = findings_by_label(result)
    groups = {label_of(g): g
              for g in report.get_image_measurement_groups()}
    volume = groups["lung_volume_left_ml"]
    assert volume.finding_type == codes.LEFT_LUNG
    (measurement,) = volume.get_measurements(name=codes.VOLUME)
    assert measurement.value == expected["lung_volume_left_ml"]["value"]
    assert measurement.unit == codes.ucum("mL")
    (density,) = groups["mean_lung_density_hu"].get_measurements()
    assert density.unit.value == "[hnsf'U]"
    assert len(volume.source_images) == len(result.series.instances)

    nodule = groups["nodule"]
    assert nodule.finding_type == hd.sr.CodedConcept("27925004", "SCT", "Nodule")
    (probability,) = nodule.get_measurements(name=codes.PROBABILITY)
    assert probability.value == expected["nodule"]["probability"]
    (size,) = nodule.get_measurements(name=codes.LONG_AXIS)
    assert size.value == max(expected["nodule"]["extent_mm"])
    (point,) = probability.referenced_coordinates
    assert point.graphic_type == hd.sr.GraphicTypeValues3D.POINT
    assert point.frame_of_reference_uid == result.series.header.FrameOfReferenceUID
    assert point.value[0] == pytest.approx(expected["nodule"]["center_mm"], abs=1e-4)
    assert [s.referenced_sop_instance_uid for s in nodule.source_images] == list(
        expected["nodule"]["slices"])


def test_unmeasurable_quantity_is_stated_not_encoded(tmp_path: Path) -> None:
    result = fx.ct_result()
    result.findings = [Finding("mean_lung_density_hu", value=float("nan"), unit="[hnsf'U]")]
    _, sr, report = build(result, tmp_path)
    (group,) = report.get_image_measurement_groups()
    assert group.get_measurements() == []
    assert group.finding_type == codes.BOTH_LUNGS
    assert "Mean Attenuation Coefficient: not measurable" in text_values(sr)


def test_rejected_result_states_why_and_has_no_finding(tmp_path: Path) -> None:
    result = fx.rejected_result()
    datasets, sr, report = build(result, tmp_path)
    assert len(datasets) == 1  # no Secondary Capture for an input that was not analysed
    (group,) = report.get_image_measurement_groups()
    assert group.finding_type is None
    assert group.get_measurements() == []
    (evaluation,) = group.get_qualitative_evaluations()
    assert evaluation.name == codes.ANALYSIS_PERFORMED
    assert evaluation[0].ConceptCodeSequence[0].CodeValue == codes.NOT_PERFORMED.value
    assert f"Not analysed: {result.reason}" in text_values(sr)
    assert DISCLAIMER in text_values(sr)


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
