"""Source headers with non-conformant patient/study values still give valid references."""

from __future__ import annotations

from pydicom import config
from pydicom.dataset import Dataset
from pydicom.valuerep import validate_value

from dicom_ai.results.reference import COPIED_TYPE2, reference_header
from tests.identity import TEXT_VRS, plant


def test_missing_type2_become_present_and_empty() -> None:
    ref = reference_header(Dataset())
    for keyword in COPIED_TYPE2:
        assert keyword in ref and ref[keyword].value in (None, "")


def test_repairable_values_are_repaired_others_emptied() -> None:
    header = Dataset()
    header.StudyTime = "15:18:59"
    header.StudyDate = "2001.02.03"
    header.PatientBirthDate = "00000000"
    ref = reference_header(header)
    assert ref.StudyTime == "151859"
    assert ref.StudyDate == "20010203"
    assert ref.PatientBirthDate in (None, "")
    # The source itself is untouched.
    assert header.StudyTime == "15:18:59" and header.PatientBirthDate == "00000000"


def test_conformant_values_are_kept() -> None:
    header = Dataset()
    header.StudyDate, header.StudyTime, header.PatientBirthDate = "20240102", "101112.5", "19700101"
    ref = reference_header(header)
    assert (ref.StudyDate, ref.StudyTime, ref.PatientBirthDate) == \
        ("20240102", "101112.5", "19700101")


def test_patient_sex_outside_its_enumeration_is_emptied() -> None:
    # "Male" is not even a valid CS (lower case); "MALE" is a CS but not M, F or O. Either
    # failed the whole study in highdicom's enum.
    for sex in ("Male", "MALE", "X"):
        header = Dataset()
        header.PatientSex = sex
        assert reference_header(header).PatientSex in (None, "")
    header.PatientSex = "F"
    assert reference_header(header).PatientSex == "F"


def test_every_text_vr_is_validated_in_items_too() -> None:
    header = Dataset()
    plant(header, TEXT_VRS)
    header.Manufacturer = "ACME"
    header.ReferencedStudySequence = [Dataset()]
    item = header.ReferencedStudySequence[0]
    item.ReferencedSOPClassUID = "1.2.840.10008.3.1.2.3.1"
    plant(item, {"ReferencedSOPInstanceUID": ("UI", "PID-8675309.1961"),
                 "AccessionNumber": ("SH", "PID-8675309-ZZQXYYVW")})
    ref = reference_header(header)
    for keyword in COPIED_TYPE2:
        assert keyword in ref
    assert ref.PatientBirthDate == "19610704"  # "1961-07-04" repaired
    for keyword, (vr, _value) in TEXT_VRS.items():
        if keyword != "PatientBirthDate" and keyword in ref and \
                ref[keyword].value not in (None, ""):
            raise AssertionError(f"{keyword} ({vr}) kept an invalid value")
    assert "RetrieveAETitle" not in ref and "FrameOfReferenceUID" not in ref  # not Type 2
    assert ref.Manufacturer == "ACME"
    (kept,) = ref.ReferencedStudySequence
    assert kept.ReferencedSOPClassUID == "1.2.840.10008.3.1.2.3.1"
    assert "ReferencedSOPInstanceUID" not in kept and "AccessionNumber" not in kept
    with config.strict_reading():
        for elem in ref.iterall():
            if elem.VR in ("SQ", "UN") or elem.value in (None, ""):
                continue
            validate_value(elem.VR, elem.value, config.RAISE)


def test_valid_multi_values_are_kept_invalid_ones_dropped() -> None:
    header = Dataset()
    header.OtherPatientIDs = ["A1", "B2"]
    plant(header, {"ImageType": ("CS", "ORIGINAL\\primary\\AXIAL")})
    ref = reference_header(header)
    assert list(ref.OtherPatientIDs) == ["A1", "B2"]
    assert list(ref.ImageType) == ["ORIGINAL", "AXIAL"]
