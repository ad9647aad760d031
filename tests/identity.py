"""Patient identity planted where pydicom will complain about it, for tests that no log shows it.

pydicom validates the values of these VRs when it converts a raw element and logs (and warns)
``Invalid value for VR XX: '<the value>'``. Each planted value below is invalid for its VR and
made of fragments that occur nowhere else, so any log line holding one of
:data:`FRAGMENTS` quoted the data.
"""

from __future__ import annotations

from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import Tag

#: Pieces of the planted identity; none may appear in any log output.
FRAGMENTS = ("Zzqx", "Yyvw", "8675309", "1961-07-04", "19610704", "ZZQXYYVW")

#: Keyword → (VR, value invalid for that VR) for every text VR pydicom validates, on elements
#: that do not decide routing or geometry (so the instance is still analysed).
TEXT_VRS: dict[str, tuple[str, str]] = {
    "RetrieveAETitle": ("AE", "PID-8675309-ZZQXYYVW"),           # over 16 characters
    "PatientAge": ("AS", "Zzqx^Yyvw"),                           # not nnnD/W/M/Y
    "PatientSex": ("CS", "Zzqx^Yyvw"),                           # lower case, caret
    "PatientBirthDate": ("DA", "1961-07-04"),                    # separators
    "AcquisitionDateTime": ("DT", "Zzqx^Yyvw 19610704"),         # not a date-time
    "OtherPatientIDs": ("LO", "PID-8675309-" * 6),               # over 64 characters
    "PatientName": ("PN", "Zzqx^Yyvw^" + "Q" * 70),              # a group over 64 characters
    "AccessionNumber": ("SH", "PID-8675309-ZZQXYYVW"),           # over 16 characters
    "InstitutionAddress": ("ST", "Zzqx^Yyvw " * 120),            # over 1024 characters
    "AcquisitionTime": ("TM", "Zzqx^Yyvw"),                      # not a time
    "FrameOfReferenceUID": ("UI", "PID-8675309.1961"),           # not digits and dots
    "RetrieveURL": ("UR", "http://pacs/Zzqx^Yyvw PID-8675309"),  # a space
    "PatientComments": ("LT", "Zzqx^Yyvw\\" * 1200),             # over 10240 characters
}

#: Numbers that are not numbers: a file holding these is refused by the reader ("invalid value
#: for VR IS in (0020,0013)"), which converts them first.
NUMBER_VRS: dict[str, tuple[str, str]] = {
    "InstanceNumber": ("IS", "1961-07-04"),
    "PatientWeight": ("DS", "Zzqx^Yyvw"),
}


def plant(ds: Dataset, values: dict[str, tuple[str, str]]) -> Dataset:
    """Set each keyword of ``values`` on ``ds`` with its VR, as raw (unvalidated) bytes.

    Parameters
    ----------
    ds:
        The dataset to change in place.
    values:
        :data:`TEXT_VRS`, :data:`NUMBER_VRS` or a mapping like them.

    Returns
    -------
    Dataset
        ``ds``.
    """
    for keyword, (vr, value) in values.items():
        # Raw bytes, exactly as a careless sender writes them: pydicom converts (and complains)
        # only when the element is read.
        data = value.encode("latin-1")
        if len(data) % 2:
            data += b"\0" if vr == "UI" else b" "
        tag = Tag(keyword)
        ds[tag] = RawDataElement(tag, vr, len(data), data, 0, False, True)
    return ds


def leaks(text: str) -> list[str]:
    """The planted fragments found in ``text``.

    Parameters
    ----------
    text:
        Captured log output.

    Returns
    -------
    list of str
        Empty when nothing leaked.
    """
    return [fragment for fragment in FRAGMENTS if fragment in text]
