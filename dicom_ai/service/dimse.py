"""DIMSE command sets of the listener (PS3.7 §9.3, Annex E): decoding requests, encoding responses.

A command set is always Implicit VR Little Endian. Requests are decoded with pynetdicom's decoder;
the two responses the listener sends (C-ECHO-RSP, C-STORE-RSP) are encoded here directly: five or
six fixed elements whose generic encoding through pydicom cost more per C-STORE than the rest of
the protocol handling together. Tests decode what this module encodes with pynetdicom.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass
from io import BytesIO

from pydicom.dataset import Dataset
from pynetdicom.dsutils import decode

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


def decode_command(fragments: list[memoryview]) -> Dataset:
    """A request's command set from its PDV fragments.

    Raises
    ------
    ProtocolError
        The bytes are not a command set with a Command Field.
    """
    try:
        command = decode(BytesIO(b"".join(fragments)), True, True)
        command.CommandField  # noqa: B018 - a command without one is not a DIMSE message
    except Exception as exc:  # pydicom raises anything on a malformed command set
        raise ProtocolError(f"malformed DIMSE command set ({type(exc).__name__})",
                            AbortReason.INVALID_PDU_PARAMETER_VALUE) from exc
    return command
