"""The code table: bundle codes, UCUM units, procedure reported, private scheme items."""

from __future__ import annotations

import pytest
from highdicom.sr import CodedConcept
from pydicom.dataset import Dataset

from dicom_ai.results import codes


def header(**attrs: object) -> Dataset:
    ds = Dataset()
    for key, value in attrs.items():
        setattr(ds, key, value)
    return ds


def test_concept_from_bundle_spec() -> None:
    spec = {"value": "233604007", "scheme": "SCT", "meaning": "Pneumonia"}
    assert codes.concept(spec) == CodedConcept("233604007", "SCT", "Pneumonia")
    with pytest.raises(ValueError, match="lacks meaning"):
        codes.concept({"value": "1", "scheme": "SCT"})


def test_ucum_units() -> None:
    assert codes.ucum("mL") == CodedConcept("mL", "UCUM", "milliliter")
    assert codes.ucum("ml") == CodedConcept("mL", "UCUM", "milliliter")
    assert codes.ucum("[hnsf'U]").meaning == "Hounsfield unit"
    assert codes.ucum("1") == codes.NO_UNITS
    assert codes.ucum("kg") == CodedConcept("kg", "UCUM", "kg")


@pytest.mark.parametrize(("attrs", "expected"), [
    ({"Modality": "CT", "BodyPartExamined": "CHEST"}, codes.CT_UNSPECIFIED),
    ({"Modality": "CT"}, codes.CT_UNSPECIFIED),
    ({"Modality": "CR"}, codes.IMAGING_PROCEDURE),
    ({"Modality": "DX", "BodyPartExamined": "THORAX"}, codes.IMAGING_PROCEDURE),
    ({"Modality": "MR"}, codes.MR_UNSPECIFIED),
    ({"Modality": "OP"}, codes.IMAGING_PROCEDURE),
])
def test_procedure_reported_is_a_cid100_code_of_the_modality(
        attrs: dict[str, str], expected: CodedConcept) -> None:
    assert codes.procedure_reported(header(**attrs)) == expected


def test_procedure_code_of_the_source_wins() -> None:
    item = header(CodeValue="RPID16", CodingSchemeDesignator="RADLEX",
                  CodeMeaning="CT Chest wo IV Contrast")
    ds = header(Modality="CT", ProcedureCodeSequence=[item])
    assert codes.procedure_reported(ds) == CodedConcept("RPID16", "RADLEX",
                                                              "CT Chest wo IV Contrast")


def test_default_quantity_codes_cover_the_lung_measurements() -> None:
    for label in ("lung_volume_left_ml", "lung_volume_right_ml", "mean_lung_density_hu",
                  "laa950_percent"):
        assert label in codes.DEFAULT_QUANTITY_CODES
    assert codes.DEFAULT_QUANTITY_CODES["lung_volume_right_ml"].site == codes.RIGHT_LUNG


def test_coding_scheme_items_for_private_schemes_only() -> None:
    item = header(CodeValue="X", CodingSchemeDesignator=codes.PRIVATE_SCHEME, CodeMeaning="x")
    standard = header(CodeValue="1", CodingSchemeDesignator="SCT", CodeMeaning="y")
    ds = header(ConceptNameCodeSequence=[item, standard],
                ContentSequence=[header(ConceptCodeSequence=[codes.PROCESSING_ALGORITHM])])
    items = codes.coding_schemes([ds])
    assert [i.CodingSchemeDesignator for i in items] == ["99DICOMAI", "99IHE"]
    assert all(i.CodingSchemeName for i in items)


def test_private_code_keeps_long_labels_whole() -> None:
    code = codes.private_code("lung_volume_left_ml_extra")
    assert code.value == "lung_volume_left_ml_extra"
    assert code.scheme_designator == codes.PRIVATE_SCHEME
    assert "LongCodeValue" in code


def test_shipped_fracture_bundle_codes_multiple_fractures_privately() -> None:
    import json
    from pathlib import Path

    from dicom_ai.results.codes import MULTIPLE_FRACTURES, PRIVATE_SCHEME, finding_concept

    meta = json.loads((Path(__file__).resolve().parents[2] / "models" / "xr-fracture"
                       / "configs" / "metadata.json").read_text())
    concept = finding_concept("multiple_fractures", meta["dicom_ai"]["codes"])
    assert (concept.value, concept.scheme_designator, concept.meaning) == (
        "MULTFX", PRIVATE_SCHEME, "Multiple fractures")
    assert meta["dicom_ai"]["codes"]["multiple_fractures"] == MULTIPLE_FRACTURES
    # A private code stays within Code Value's 16 characters.
    assert len(MULTIPLE_FRACTURES["value"]) <= 16


def test_shipped_derm_bundle_codes_every_diagnosis_in_snomed_ct() -> None:
    import json
    from pathlib import Path

    from dicom_ai.results.codes import finding_concept

    meta = json.loads((Path(__file__).resolve().parents[2] / "models" / "derm-lesion"
                       / "configs" / "metadata.json").read_text())
    found = {label: finding_concept(label, meta["dicom_ai"]["codes"])
             for label in ("melanoma", "nevus", "seborrheic_keratosis", "malignant")}
    assert {c.scheme_designator for c in found.values()} == {"SCT"}
    sk = found["seborrheic_keratosis"]
    assert (sk.value, sk.meaning) == ("394726009", "Seborrheic keratosis")
