"""The source header as our objects copy it: complete, and every value valid for its VR.

highdicom copies the Patient and General Study modules (and, for a Secondary Capture, the
equipment) from a reference dataset, parses dates and times, turns Patient's Sex into an enum
and pydicom validates every value it writes. Real sources carry values that fail one of those
(an ACR-NEMA style time ``15:18:59``, a birth date ``00000000``, Patient's Sex ``Male``, a name
group over 64 characters); none of them may stop a result from being written. So every text
element of the copy is checked against its VR (PS3.5 6.2) and, where the standard enumerates
the values, against those: a value that can be repaired without guessing (date and time
separators removed) is repaired; anything else is dropped, leaving a Type 2 attribute present
and empty ("unknown"), and any other attribute absent. The identifying UIDs are never touched:
the reader has already refused a file whose UIDs are invalid.
"""

from __future__ import annotations

from copy import deepcopy
from typing import Any

from pydicom import config
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.valuerep import DA, DT, TM, validate_value

#: Type 2 patient/study attributes highdicom copies from the reference dataset.
COPIED_TYPE2 = ("PatientID", "PatientName", "PatientBirthDate", "PatientSex",
                "AccessionNumber", "StudyID", "StudyDate", "StudyTime")
#: Attributes whose values the standard enumerates (and highdicom parses as an enum).
ENUMERATED = {"PatientSex": frozenset({"M", "F", "O"})}
#: Value representations of text, which pydicom validates by pattern and length.
_TEXT_VRS = frozenset({"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST",
                       "TM", "UC", "UI", "UR", "UT"})
#: What identifies the objects; checked by the reader, never dropped here.
_IDENTIFYING = frozenset({"SOPClassUID", "SOPInstanceUID", "StudyInstanceUID",
                          "SeriesInstanceUID"})
#: ACR-NEMA separators that may be removed from dates and times without changing their meaning.
#: (A date-time is not repaired: its "-" may be the sign of a UTC offset.)
_SEPARATORS = {"DA": "-./", "TM": ":", "DT": ""}
_PARSERS: dict[str, type[DA | TM | DT]] = {"DA": DA, "TM": TM, "DT": DT}


def reference_header(header: Dataset) -> Dataset:
    """A copy of ``header`` that highdicom and pydicom accept whatever the source held.

    Parameters
    ----------
    header:
        The source instance's header; not changed.

    Returns
    -------
    Dataset
        Every :data:`COPIED_TYPE2` attribute present (empty when absent or invalid); every
        other text value, in sequence items too, valid for its VR and enumeration, repaired
        or removed.
    """
    ref = deepcopy(header)
    _conform(ref, top_level=True)
    for keyword in COPIED_TYPE2:
        if keyword not in ref:
            setattr(ref, keyword, None)
    return ref


def _conform(ds: Dataset, *, top_level: bool) -> None:
    for elem in list(ds):
        if elem.tag.is_private:
            continue
        if elem.VR == "SQ":
            for item in elem.value or []:
                _conform(item, top_level=False)
            continue
        if elem.VR not in _TEXT_VRS or elem.value in (None, "") or \
                (top_level and elem.keyword in _IDENTIFYING):
            continue
        values = list(elem.value) if isinstance(elem.value, MultiValue) else [elem.value]
        kept = [v for v in (_conformant(elem.VR, elem.keyword, v) for v in values)
                if v is not None]
        if len(kept) == len(values) and all(type(k) is type(v) and k == v
                                            for k, v in zip(kept, values, strict=True)):
            continue
        if kept:
            elem.value = kept if len(kept) > 1 else kept[0]
        elif top_level and elem.keyword in COPIED_TYPE2:
            elem.value = None
        else:
            del ds[elem.tag]


def _conformant(vr: str, keyword: str, value: Any) -> Any:
    """``value`` if valid, a repaired value (a date or time without separators), or None.

    Dates and times must also parse: ``00000000`` matches the DA pattern but is no date.
    """
    allowed = ENUMERATED.get(keyword)
    if allowed is not None:
        return value if str(value) in allowed else None
    if vr in _PARSERS:
        return _conformant_temporal(vr, str(value))
    try:
        validate_value(vr, str(value), config.RAISE)
    except ValueError:
        return None
    return value


def _conformant_temporal(vr: str, value: str) -> str | None:
    candidate = value.strip().translate({ord(c): None for c in _SEPARATORS[vr]})
    try:
        validate_value(vr, candidate, config.RAISE)
        _PARSERS[vr](candidate)
    except ValueError:
        return None
    return candidate
