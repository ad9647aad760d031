"""DIMSE command sets of the listener (PS3.7 §9.3, Annex E): decoding requests, encoding responses.

A command set is always Implicit VR Little Endian, a handful of elements in group 0000. Both
directions are coded here directly — requests read with the element walk of
:mod:`dicom_ai.dicom.scan`, the two responses the listener sends (C-ECHO-RSP, C-STORE-RSP)
written element by element — because the generic pydicom route cost more per C-STORE than the
rest of the protocol handling together. Tests check both against pynetdicom's own codec.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass

from dicom_ai.dicom.scan import ScanError, top_level_values
from dicom_ai.service.ul import AbortReason, ProtocolError

C_STORE_RQ = 0x0001
C_ECHO_RQ = 0x0030
#: A response's Command Field is its request's with bit 15 set.
RESPONSE_BIT = 0x8000
#: CommandDataSetType value meaning "no data set follows".
NO_DATASET = 0x0101

_TAG_LENGTH = struct.Struct("<HHL")
_US = struct.Struct("<H")
_UL = struct.Struct("<L")
_PDU_HEADER = struct.Struct(">BxL")
_PDV_HEADER = struct.Struct(">LBB")
#: PDV message control header: command, last fragment.
_COMMAND_LAST = 0x03
_COMMAND_MORE = 0x01


@dataclass(frozen=True)
class Response:
    """A response command set.

    Parameters
    ----------
    command_field:
        The request's Command Field; the response bit is added when encoding.
    message_id:
        The request's Message ID (Message ID Being Responded To).
    sop_class_uid:
        Affected SOP Class UID.
    status:
        Status (PS3.7 Annex C).
    sop_instance_uid:
        Affected SOP Instance UID, for C-STORE.
    error_comment:
        Error Comment (LO, cut to 64 characters), for failures.
    """

    command_field: int
    message_id: int
    sop_class_uid: str
    status: int
    sop_instance_uid: str = ""
    error_comment: str = ""

    def encode(self) -> bytes:
        """The command set, Command Group Length first, elements in tag order."""
        elements = [
            _element(0x0002, _text(self.sop_class_uid, b"\x00")),
            _element(0x0100, _US.pack(self.command_field | RESPONSE_BIT)),
            _element(0x0120, _US.pack(self.message_id)),
            _element(0x0800, _US.pack(NO_DATASET)),
            _element(0x0900, _US.pack(self.status)),
        ]
        if self.error_comment:
            elements.append(_element(0x0902, _text(self.error_comment[:64], b" ")))
        if self.sop_instance_uid:
            elements.append(_element(0x1000, _text(self.sop_instance_uid, b"\x00")))
        body = b"".join(elements)
        return _element(0x0000, _UL.pack(len(body))) + body


def _element(element: int, value: bytes) -> bytes:
    """An Implicit VR Little Endian element of group 0000."""
    return _TAG_LENGTH.pack(0x0000, element, len(value)) + value


def _text(value: str, pad: bytes) -> bytes:
    """A string value padded to even length (UI with NUL, other text with a space)."""
    raw = value.encode("ascii")
    return raw + pad if len(raw) % 2 else raw


def command_pdus(context_id: int, command: bytes, peer_max_pdu: int) -> Iterator[bytes]:
    """P-DATA-TF PDUs carrying a command set, fragmented to the peer's maximum PDU length.

    Parameters
    ----------
    context_id:
        The presentation context of the request.
    command:
        The encoded command set.
    peer_max_pdu:
        The peer's Maximum Length Received (0: unlimited).
    """
    # The PDV item header (4-byte length, context ID, control byte) counts against the maximum.
    room = max(peer_max_pdu - 6, 1) if peer_max_pdu else len(command)
    for start in range(0, len(command), room):
        fragment = command[start:start + room]
        control = _COMMAND_LAST if start + room >= len(command) else _COMMAND_MORE
        item = _PDV_HEADER.pack(len(fragment) + 2, context_id, control) + fragment
        yield _PDU_HEADER.pack(0x04, len(item)) + item


@dataclass(frozen=True)
class Command:
    """The parts of a request's command set the listener acts on (PS3.7 §9.3)."""

    command_field: int
    message_id: int
    affected_sop_class_uid: str
    affected_sop_instance_uid: str
    has_dataset: bool


_COMMAND_FIELD, _MESSAGE_ID, _DATASET_TYPE = 0x00000100, 0x00000110, 0x00000800
_AFFECTED_CLASS, _AFFECTED_INSTANCE = 0x00000002, 0x00001000


def decode_command(fragments: list[memoryview]) -> Command:
    """A request's command set from its PDV fragments.

    Raises
    ------
    ProtocolError
        The bytes are not a command set with a Command Field and a Message ID.
    """
    data = b"".join(fragments)
    try:
        values = top_level_values(
            data, (_AFFECTED_CLASS, _COMMAND_FIELD, _MESSAGE_ID, _DATASET_TYPE,
                   _AFFECTED_INSTANCE), implicit_vr=True, little_endian=True)
        return Command(
            command_field=_US.unpack(values[_COMMAND_FIELD])[0],
            message_id=_US.unpack(values[_MESSAGE_ID])[0],
            affected_sop_class_uid=_uid(values.get(_AFFECTED_CLASS, b"")),
            affected_sop_instance_uid=_uid(values.get(_AFFECTED_INSTANCE, b"")),
            has_dataset=_US.unpack(values.get(_DATASET_TYPE, _US.pack(NO_DATASET)))[0]
            != NO_DATASET)
    except (ScanError, KeyError, struct.error) as exc:
        raise ProtocolError(f"malformed DIMSE command set ({type(exc).__name__})",
                            AbortReason.INVALID_PDU_PARAMETER_VALUE) from exc


def _uid(raw: bytes) -> str:
    return raw.decode("ascii", errors="replace").rstrip("\0 ")
