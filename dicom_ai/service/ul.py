"""DICOM Upper Layer framing for the listener (PS3.8 §9.3): PDUs off the wire, P-DATA values, and
the PDUs an acceptor sends besides A-ASSOCIATE-AC/RJ (release, abort, responses in P-DATA-TF).

pynetdicom's PDU classes encode and decode the variable association PDUs (A-ASSOCIATE-RQ/AC/RJ).
This module only frames the byte stream and splits P-DATA-TF PDUs into presentation data values —
the hot path of every C-STORE — reading each PDU with one ``recv_into`` loop into its own buffer and
handing out views of it, without per-fragment objects or copies.
"""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass
from enum import IntEnum

#: PDU header: type (1), reserved (1), length of what follows (4, big endian).
_HEADER = struct.Struct(">BxL")
#: PDV item header: length of what follows (4, big endian), presentation context ID (1), and
#: the message control header (1): bit 0 command, bit 1 last fragment.
_PDV = struct.Struct(">LBB")
_COMMAND_LAST, _COMMAND_MORE = 0x03, 0x01


class PDUType(IntEnum):
    """PS3.8 Table 9-11: the PDU types."""

    A_ASSOCIATE_RQ = 0x01
    A_ASSOCIATE_AC = 0x02
    A_ASSOCIATE_RJ = 0x03
    P_DATA_TF = 0x04
    A_RELEASE_RQ = 0x05
    A_RELEASE_RP = 0x06
    A_ABORT = 0x07


class AbortReason(IntEnum):
    """PS3.8 Table 9-26: the reason of an A-ABORT whose source is the service provider."""

    NOT_SPECIFIED = 0
    UNRECOGNIZED_PDU = 1
    UNEXPECTED_PDU = 2
    UNRECOGNIZED_PDU_PARAMETER = 4
    UNEXPECTED_PDU_PARAMETER = 5
    INVALID_PDU_PARAMETER_VALUE = 6


class ProtocolError(Exception):
    """The peer broke the Upper Layer protocol; the association is aborted with ``reason``."""

    def __init__(self, message: str, reason: AbortReason) -> None:
        super().__init__(message)
        self.reason = reason


class PeerClosed(Exception):
    """The peer closed the TCP connection."""


class DeadlineExceeded(TimeoutError):
    """The association's overall time is up, however recently the peer sent something."""


#: (seconds a read may wait for data, monotonic time by which the whole exchange must be over).
Timeouts = tuple[float, float]


#: A-RELEASE-RP: fixed form, 4 reserved bytes.
RELEASE_RP = _HEADER.pack(PDUType.A_RELEASE_RP, 4) + bytes(4)


def abort_pdu(reason: AbortReason) -> bytes:
    """An A-ABORT from the service provider (source 2) with ``reason``."""
    return _HEADER.pack(PDUType.A_ABORT, 4) + bytes((0, 0, 2, reason))


def recv_exact(sock: socket.socket, buffer: memoryview, timeouts: Timeouts) -> None:
    """Fill ``buffer`` from ``sock``.

    Parameters
    ----------
    sock:
        The connection.
    buffer:
        Where the bytes go.
    timeouts:
        Each read waits at most the first for data; all reads end by the second (monotonic), so
        a peer sending a byte at a time cannot hold the connection past it.

    Raises
    ------
    PeerClosed
        The connection ended first.
    DeadlineExceeded
        The deadline passed.
    TimeoutError
        A read waited its whole timeout without data.
    """
    idle, deadline = timeouts
    while buffer:
        left = deadline - time.monotonic()
        if left <= 0:
            raise DeadlineExceeded("association deadline (scp.association_deadline_s or "
                                   "scp.request_timeout_s) passed")
        sock.settimeout(min(idle, left))
        try:
            n = sock.recv_into(buffer)
        except TimeoutError:
            if time.monotonic() >= deadline:
                continue  # reported as the deadline above
            raise
        if n == 0:
            raise PeerClosed("connection closed by the peer")
        buffer = buffer[n:]


@dataclass(frozen=True)
class PDU:
    """One PDU as received: ``raw`` holds the header too, as pynetdicom's decoders expect."""

    type: int
    raw: bytearray

    @property
    def body(self) -> memoryview:
        """The variable field, after the 6-byte header."""
        return memoryview(self.raw)[_HEADER.size:]


def read_pdu(sock: socket.socket, max_length: int, timeouts: Timeouts) -> PDU:
    """Read one whole PDU.

    Parameters
    ----------
    sock:
        The connection (plain or TLS).
    max_length:
        Largest variable field accepted; a longer PDU is a protocol error, so a peer cannot make
        us allocate what it likes.
    timeouts:
        See :func:`recv_exact`.
    """
    header = bytearray(_HEADER.size)
    recv_exact(sock, memoryview(header), timeouts)
    pdu_type, length = _HEADER.unpack(header)
    if pdu_type not in PDUType.__members__.values():
        raise ProtocolError(f"unrecognised PDU type 0x{pdu_type:02x}",
                            AbortReason.UNRECOGNIZED_PDU)
    if length > max_length:
        raise ProtocolError(f"PDU of {length} bytes exceeds the {max_length} agreed",
                            AbortReason.INVALID_PDU_PARAMETER_VALUE)
    # One allocation per PDU, filled in place: P-DATA PDUs are the bulk of every C-STORE.
    raw = bytearray(_HEADER.size + length)
    raw[:_HEADER.size] = header
    recv_exact(sock, memoryview(raw)[_HEADER.size:], timeouts)
    return PDU(pdu_type, raw)


@dataclass(frozen=True)
class PDV:
    """One presentation data value of a P-DATA-TF (PS3.8 §9.3.5.1, Annex E.2)."""

    context_id: int
    is_command: bool
    is_last: bool
    fragment: memoryview


def split_pdata(body: memoryview) -> list[PDV]:
    """The presentation data values in a P-DATA-TF variable field.

    Raises
    ------
    ProtocolError
        An item overruns the PDU or is too short for its header.
    """
    values: list[PDV] = []
    offset = 0
    while offset < len(body):
        if len(body) - offset < _PDV.size:
            raise ProtocolError("truncated PDV item", AbortReason.INVALID_PDU_PARAMETER_VALUE)
        length, context_id, control = _PDV.unpack_from(body, offset)
        end = offset + 4 + length
        if length < 2 or end > len(body):
            raise ProtocolError("PDV item length does not fit the PDU",
                                AbortReason.INVALID_PDU_PARAMETER_VALUE)
        values.append(PDV(context_id, bool(control & 0x01), bool(control & 0x02),
                          body[offset + _PDV.size:end]))
        offset = end
    if not values:
        raise ProtocolError("P-DATA-TF without a PDV", AbortReason.INVALID_PDU_PARAMETER_VALUE)
    return values


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
    room = max(peer_max_pdu - _PDV.size, 1) if peer_max_pdu else len(command)
    for start in range(0, len(command), room):
        fragment = command[start:start + room]
        control = _COMMAND_LAST if start + room >= len(command) else _COMMAND_MORE
        item = _PDV.pack(len(fragment) + 2, context_id, control) + fragment
        yield _HEADER.pack(PDUType.P_DATA_TF, len(item)) + item
