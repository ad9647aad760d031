"""The one UID check of the product (PS3.5 §9.1).

A UID is one or more components separated by ``.``; each component is ``0`` or digits without a
leading zero; the whole is at most 64 characters. Every identifier read from a file or the wire
passes this check before it names anything on disk (spool paths, replay output folders), and
the organization root of output UIDs is checked with it when the settings are read, so no value
that could hold ``/``, ``..``, a drive letter or patient text ever becomes a path.
"""

from __future__ import annotations

import re

from dicom_ai.dicom.errors import DicomInputError

#: Longest UID PS3.5 §9.1 allows.
MAX_LENGTH = 64

_UID = re.compile(r"(?:0|[1-9][0-9]*)(?:\.(?:0|[1-9][0-9]*))*")


class InvalidUIDError(DicomInputError, ValueError):
    """A value that must be a UID is not one. The message names the attribute, never the value,
    since an invalid "UID" may be patient text written into the wrong element."""


def is_valid_uid(value: str) -> bool:
    """Whether ``value`` is a UID as PS3.5 §9.1 defines it.

    Parameters
    ----------
    value:
        The text, without trailing NUL padding (pydicom strips it).

    Returns
    -------
    bool
        True for digits-and-dots components without leading zeros, at most 64 characters.
    """
    return len(value) <= MAX_LENGTH and _UID.fullmatch(value) is not None


def require_uid(value: str, what: str) -> str:
    """``value`` if it is a valid UID, else raise.

    Parameters
    ----------
    value:
        The text to check.
    what:
        What the value is, for the message (e.g. ``"Study Instance UID (0020,000D)"``).

    Returns
    -------
    str
        ``value`` unchanged.

    Raises
    ------
    InvalidUIDError
        Naming ``what``; the value itself is not repeated.
    """
    if not is_valid_uid(value):
        raise InvalidUIDError(f"{what} is not a valid UID (PS3.5 9.1: digits and dots, "
                              f"no leading zeros, at most {MAX_LENGTH} characters)")
    return value


__all__ = ["MAX_LENGTH", "InvalidUIDError", "is_valid_uid", "require_uid"]
