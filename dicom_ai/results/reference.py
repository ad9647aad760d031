"""The source header as our objects copy it: complete and conformant patient/study attributes.

highdicom copies the Patient and General Study modules from a reference dataset and parses
their dates and times. Real sources carry non-conformant values (an ACR-NEMA style time
``15:18:59``, a birth date ``00000000``); they must not stop a result from being written. A
value that can be repaired without guessing (separators removed) is repaired, anything else
becomes empty — these attributes are Type 2, so empty is valid and says "unknown".
"""

from __future__ import annotations

from copy import deepcopy

from pydicom.dataset import Dataset
from pydicom.valuerep import DA, TM

#: Type 2 patient/study attributes highdicom copies from the reference dataset.
COPIED_TYPE2 = ("PatientID", "PatientName", "PatientBirthDate", "PatientSex",
                "AccessionNumber", "StudyID", "StudyDate", "StudyTime")
_DATES = ("PatientBirthDate", "StudyDate")
_TIMES = ("StudyTime",)


def _conformant(value: str, parse: type[DA | TM], separators: str) -> str | None:
    """``value`` without the ACR-NEMA ``separators`` if it then parses, else None."""
    candidate = value.strip().translate({ord(c): None for c in separators})
    try:
        parse(candidate)
    except ValueError:
        return None
    return candidate


def reference_header(header: Dataset) -> Dataset:
    """A copy of ``header`` with every :data:`COPIED_TYPE2` attribute present (empty
    when absent) and dates/times conformant (repaired or emptied)."""
    ref = deepcopy(header)
    for keyword in COPIED_TYPE2:
        if keyword not in ref:
            setattr(ref, keyword, None)
    for keywords, parse, separators in ((_DATES, DA, "-./"), (_TIMES, TM, ":")):
        for keyword in keywords:
            raw = ref[keyword].value
            if raw in (None, ""):
                continue
            setattr(ref, keyword, _conformant(str(raw), parse, separators))
    return ref
