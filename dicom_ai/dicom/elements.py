"""Data elements at the byte level, below pydicom (PS3.5 §7): walking an encoded data set's
top-level elements, and encoding single little-endian elements.

The receiver needs five attributes from the start of every instance it acknowledges, and writes a
file meta header and a DIMSE response per instance. pydicom builds a ``DataElement`` per element
on the way there; reading only element headers and the wanted values, and writing the few fixed
elements directly, costs a small fraction of that on the receiver's hot path. Anything the walk
does not handle raises :class:`ScanError`, and the caller falls back to pydicom, which does.

Sequences of undefined length are skipped item by item, nested to any depth. An explicit-VR
``UN`` of undefined length (its content is Implicit VR, PS3.5 §6.2.2) is not walked.
"""

from __future__ import annotations

import struct
from collections.abc import Collection

#: Item, Item Delimitation and Sequence Delimitation tags (PS3.5 §7.5).
ITEM = 0xFFFEE000
ITEM_END = 0xFFFEE00D
SEQUENCE_END = 0xFFFEE0DD
UNDEFINED_LENGTH = 0xFFFFFFFF
#: Explicit VRs with a 2-byte reserved field and a 4-byte length (PS3.5 Table 7.1-1).
_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN",
                       b"UR", b"UT", b"UV"})
#: Every VR of PS3.5 Table 6.2-1; anything else means the bytes are not what the transfer syntax
#: says (a sender writing Implicit VR under an Explicit VR syntax, which pydicom detects).
_VRS = _LONG_VRS | frozenset({b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FD", b"FL",
                              b"IS", b"LO", b"LT", b"PN", b"SH", b"SL", b"SS", b"ST", b"TM",
                              b"UI", b"UL", b"US"})


class ScanError(ValueError):
    """The bytes are truncated, malformed, or use an encoding this walk leaves to pydicom."""


class _Walk:
    def __init__(self, data: bytes, *, implicit_vr: bool, little_endian: bool) -> None:
        self.data = data
        self.pos = 0
        self.implicit_vr = implicit_vr
        order = "<" if little_endian else ">"
        self.tag = struct.Struct(f"{order}HH")
        self.u16 = struct.Struct(f"{order}H")
        self.u32 = struct.Struct(f"{order}L")

    def header(self) -> tuple[int, bytes | None, int]:
        """Tag, VR (explicit VR only) and value length of the element at the position."""
        data, pos = self.data, self.pos
        if pos + 8 > len(data):
            raise ScanError("data set ends inside an element header")
        group, element = self.tag.unpack_from(data, pos)
        if group == 0xFFFE or self.implicit_vr:
            # Item tags have no VR in either encoding.
            self.pos = pos + 8
            return (group << 16) | element, None, self.u32.unpack_from(data, pos + 4)[0]
        vr = data[pos + 4:pos + 6]
        if vr not in _VRS:
            raise ScanError("not an explicit VR")
        if vr in _LONG_VRS:
            if pos + 12 > len(data):
                raise ScanError("data set ends inside an element header")
            self.pos = pos + 12
            return (group << 16) | element, vr, self.u32.unpack_from(data, pos + 8)[0]
        self.pos = pos + 8
        return (group << 16) | element, vr, self.u16.unpack_from(data, pos + 6)[0]

    def skip(self, length: int) -> None:
        if self.pos + length > len(self.data):
            raise ScanError("data set ends inside a value")
        self.pos += length

    def skip_undefined(self, vr: bytes | None) -> None:
        """Skip a sequence of undefined length: items up to the Sequence Delimitation Item."""
        if vr not in (None, b"SQ"):
            raise ScanError("undefined length outside a sequence")
        while True:
            tag, _, length = self.header()
            if tag == SEQUENCE_END:
                return
            if tag != ITEM:
                raise ScanError("a sequence holds something other than items")
            if length != UNDEFINED_LENGTH:
                self.skip(length)
                continue
            while True:
                tag, inner_vr, length = self.header()
                if tag == ITEM_END:
                    break
                if length == UNDEFINED_LENGTH:
                    self.skip_undefined(inner_vr)
                else:
                    self.skip(length)


def top_level_values(data: bytes, tags: Collection[int], *, implicit_vr: bool,
                     little_endian: bool) -> dict[int, bytes]:
    """Raw values of ``tags`` among the top-level elements of ``data``.

    The walk stops after the largest wanted tag (data sets are in ascending tag order) or at the
    end of ``data``; a tag absent from the result was not found before either.

    Parameters
    ----------
    data:
        An encoded data set (no preamble or file meta), or a leading part of one.
    tags:
        Wanted tags as ``0xggggeeee``.
    implicit_vr, little_endian:
        The transfer syntax's encoding.

    Raises
    ------
    ScanError
        See the class.
    """
    return scan_top_level(data, tags, implicit_vr=implicit_vr, little_endian=little_endian)[0]


def scan_top_level(data: bytes, tags: Collection[int], *, implicit_vr: bool,
                   little_endian: bool) -> tuple[dict[int, bytes], bool]:
    """:func:`top_level_values`, and whether the walk went past the largest wanted tag.

    When it did, a wanted tag absent from the values is absent from the data set; when it did
    not, ``data`` ended first and a leading part may not have reached it.

    Raises
    ------
    ScanError
        See the class.
    """
    walk = _Walk(data, implicit_vr=implicit_vr, little_endian=little_endian)
    last = max(tags)
    found: dict[int, bytes] = {}
    while walk.pos < len(data):
        tag, vr, length = walk.header()
        if tag > last:
            return found, True
        if length == UNDEFINED_LENGTH:
            walk.skip_undefined(vr)
            continue
        start = walk.pos
        walk.skip(length)
        if tag in tags:
            found[tag] = data[start:walk.pos]
    return found, False


_SHORT_EXPLICIT = struct.Struct("<HH2sH")
_LONG_EXPLICIT = struct.Struct("<HH2s2xL")
_IMPLICIT = struct.Struct("<HHL")


def encode_element(tag: int, value: bytes, vr: bytes | None = None) -> bytes:
    """One little-endian element: Implicit VR when ``vr`` is ``None``, else Explicit VR.

    Parameters
    ----------
    tag:
        ``0xggggeeee``.
    value:
        The encoded value, already of even length (see :func:`even_text`).
    vr:
        The two-letter VR for Explicit VR; OB, SQ, UN and the other long forms get the reserved
        field and a 4-byte length.
    """
    group, element = tag >> 16, tag & 0xFFFF
    if vr is None:
        return _IMPLICIT.pack(group, element, len(value)) + value
    header = _LONG_EXPLICIT if vr in _LONG_VRS else _SHORT_EXPLICIT
    return header.pack(group, element, vr, len(value)) + value


def even_text(value: str, pad: bytes) -> bytes:
    """A text value in ASCII, padded to even length: UI with NUL, other text VRs with a space."""
    raw = value.encode("ascii")
    return raw + pad if len(raw) % 2 else raw
