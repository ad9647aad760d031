"""Source headers with non-conformant patient/study values still give valid references."""

from __future__ import annotations

from pydicom.dataset import Dataset

from dicom_ai.results.reference import COPIED_TYPE2, reference_header


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
