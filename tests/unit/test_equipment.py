"""The algorithm's Contributing Equipment item (IHE AIR "Processing Algorithm")."""

from __future__ import annotations

from datetime import datetime

from highdicom import ContributingEquipment

from dicom_ai.inference.findings import ModelInfo
from dicom_ai.results.equipment import AlgorithmEquipment

MODEL = ModelInfo(name="cxr-pneumonia", version="1.0.0", device_uid="2.25.42",
                  manufacturer="dicom-ai")


def test_item_carries_what_ihe_air_asks() -> None:
    item = AlgorithmEquipment(MODEL, institution_name="Test Hospital",
                              contribution_datetime=datetime(2026, 11, 29, 12, 30, 15))
    assert isinstance(item, ContributingEquipment)
    (purpose,) = item.PurposeOfReferenceCodeSequence
    assert (purpose.CodeValue, purpose.CodingSchemeDesignator, purpose.CodeMeaning) == (
        "Newcode1", "99IHE", "Processing Algorithm")
    assert item.Manufacturer == "dicom-ai"
    assert item.ManufacturerModelName == "cxr-pneumonia"
    assert item.SoftwareVersions == "1.0.0"
    assert item.DeviceUID == "2.25.42"
    assert item.InstitutionName == "Test Hospital"
    assert str(item.ContributionDateTime).startswith("20261129123015")


def test_empty_institution_is_omitted() -> None:
    assert "InstitutionName" not in AlgorithmEquipment(MODEL)
