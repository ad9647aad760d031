"""DIMSE command sets of the listener (PS3.7 §9.3, Annex E): decoding requests, encoding responses.

A command set is always Implicit VR Little Endian, a handful of elements in group 0000. Both
directions are coded here directly — requests read with the element walk of
:mod:`dicom_ai.dicom.elements`, the responses the listener sends (C-ECHO-RSP, C-STORE-RSP,
N-CREATE-RSP, N-SET-RSP) written element by element — because the generic pydicom route cost
more per C-STORE than the rest of the protocol handling together. Tests check both against
pynetdicom's own codec.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from dicom_ai.dicom.elements import ScanError, encode_element, even_text, top_level_values
from dicom_ai.service.ul import AbortReason, ProtocolError

C_STORE_RQ = 0x0001
C_ECHO_RQ = 0x0030
#: N-SET and N-CREATE, served for Modality Performed Procedure Step (:mod:`dicom_ai.service.mpps`).
N_SET_RQ = 0x0120
N_CREATE_RQ = 0x0140
#: A response's Command Field is its request's with bit 15 set.
RESPONSE_BIT = 0x8000
#: CommandDataSetType value meaning "no data set follows".
NO_DATASET = 0x0101

_US = struct.Struct("<H")
_UL = struct.Struct("<L")


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
        Affected SOP Class UID; omitted when empty.
    status:
        Status (PS3.7 Annex C).
    sop_instance_uid:
        Affected SOP Instance UID, for C-STORE.
    error_comment:
        Error Comment (LO, cut to 64 characters), for failures.
    error_id:
        Error ID (0000,0903), for the failures that define one (0: omitted).
    """

    command_field: int
    message_id: int
    sop_class_uid: str
    status: int
    sop_instance_uid: str = ""
    error_comment: str = ""
    error_id: int = 0

    def encode(self) -> bytes:
        """The command set, Command Group Length first, elements in tag order."""
        elements = [
            *([encode_element(0x00000002, even_text(self.sop_class_uid, b"\x00"))]
              if self.sop_class_uid else []),
            encode_element(0x00000100, _US.pack(self.command_field | RESPONSE_BIT)),
            encode_element(0x00000120, _US.pack(self.message_id)),
            encode_element(0x00000800, _US.pack(NO_DATASET)),
            encode_element(0x00000900, _US.pack(self.status)),
        ]
        if self.error_comment:
            elements.append(encode_element(0x00000902, even_text(self.error_comment[:64], b" ")))
        if self.error_id:
            elements.append(encode_element(0x00000903, _US.pack(self.error_id)))
        if self.sop_instance_uid:
            elements.append(encode_element(0x00001000, even_text(self.sop_instance_uid, b"\x00")))
        body = b"".join(elements)
        return encode_element(0x00000000, _UL.pack(len(body))) + body


@dataclass(frozen=True)
class Command:
    """The parts of a request's command set the listener acts on (PS3.7 §9.3)."""

    command_field: int
    message_id: int
    affected_sop_class_uid: str
    affected_sop_instance_uid: str
    has_dataset: bool
    #: N-SET addresses its object by Requested SOP Class/Instance UID (0000,0003), (0000,1001).
    requested_sop_class_uid: str = ""
    requested_sop_instance_uid: str = ""


_COMMAND_FIELD, _MESSAGE_ID, _DATASET_TYPE = 0x00000100, 0x00000110, 0x00000800
_AFFECTED_CLASS, _AFFECTED_INSTANCE = 0x00000002, 0x00001000
_REQUESTED_CLASS, _REQUESTED_INSTANCE = 0x00000003, 0x00001001


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
            data, (_AFFECTED_CLASS, _REQUESTED_CLASS, _COMMAND_FIELD, _MESSAGE_ID,
                   _DATASET_TYPE, _AFFECTED_INSTANCE, _REQUESTED_INSTANCE), implicit_vr=True,
            little_endian=True)
        return Command(
            command_field=_US.unpack(values[_COMMAND_FIELD])[0],
            message_id=_US.unpack(values[_MESSAGE_ID])[0],
            affected_sop_class_uid=_uid(values.get(_AFFECTED_CLASS, b"")),
            affected_sop_instance_uid=_uid(values.get(_AFFECTED_INSTANCE, b"")),
            has_dataset=_US.unpack(values.get(_DATASET_TYPE, _US.pack(NO_DATASET)))[0]
            != NO_DATASET,
            requested_sop_class_uid=_uid(values.get(_REQUESTED_CLASS, b"")),
            requested_sop_instance_uid=_uid(values.get(_REQUESTED_INSTANCE, b"")))
    except (ScanError, KeyError, struct.error) as exc:
        raise ProtocolError(f"malformed DIMSE command set ({type(exc).__name__})",
                            AbortReason.INVALID_PDU_PARAMETER_VALUE) from exc


def _uid(raw: bytes) -> str:
    return raw.decode("ascii", errors="replace").rstrip("\0 ")
