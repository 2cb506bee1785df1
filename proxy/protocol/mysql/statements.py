"""Binary-protocol statement commands: where the statement id and parameter types sit, and rewrites of them."""

from __future__ import annotations

import struct
from typing import Final

from proxy.protocol.mysql.constants import (
    COM_STMT_BULK_EXECUTE,
    COM_STMT_EXECUTE,
    ER_UNKNOWN_STMT_HANDLER,
)
from proxy.protocol.mysql.packets import Buffer, ErrPacket

# Every statement command (EXECUTE, SEND_LONG_DATA, CLOSE, RESET, FETCH, BULK_EXECUTE) carries the statement id
# as 4 little-endian bytes right after the command byte.
STATEMENT_ID_AT: Final = 1
STATEMENT_HEAD: Final = 5  # command byte + statement id
LAST_PREPARED: Final = 0xFFFFFFFF  # MariaDB: "the statement this connection prepared last"

# COM_STMT_EXECUTE: command, id, flags (1), iteration count (4), then with parameters a NULL bitmap, the
# new-params-bound flag and, when it is 1, two type bytes per parameter.
EXECUTE_FLAGS_AT: Final = 5
EXECUTE_CURSOR_FLAGS: Final = 0x07  # CURSOR_TYPE_READ_ONLY | FOR_UPDATE | SCROLLABLE
# COM_STMT_BULK_EXECUTE (MariaDB): command, id, flags (2), types when flags has SEND_TYPES, then values.
BULK_FLAGS_AT: Final = 5
BULK_SEND_TYPES: Final = 128
BULK_TYPES_AT: Final = 7

_HEADER = struct.Struct("<I")


def statement_id(buf: Buffer, payload_at: int) -> int:
    """The statement id of a statement command whose payload starts at buf[payload_at]."""
    at = payload_at + STATEMENT_ID_AT
    return buf[at] | (buf[at + 1] << 8) | (buf[at + 2] << 16) | (buf[at + 3] << 24)


def bound_flag_at(num_params: int) -> int:
    """Payload offset of COM_STMT_EXECUTE's new-params-bound flag for a statement with num_params (> 0)."""
    return 10 + (num_params + 7) // 8


def relabelled_head(buf: Buffer, frame_at: int, new_id: int) -> bytes:
    """The first 9 bytes of a statement command frame (header, command, id) with another statement id."""
    return bytes(buf[frame_at : frame_at + 5]) + new_id.to_bytes(4, "little")


def head_with_types(buf: Buffer, frame_at: int, length: int, new_id: int, types_at: int, types: bytes) -> bytes:
    """A statement command's frame start, relabelled and carrying parameter types it was sent without.

    For COM_STMT_EXECUTE types_at is the new-params-bound flag's payload offset (the flag becomes 1 and the
    types follow it); for COM_STMT_BULK_EXECUTE it is BULK_TYPES_AT (SEND_TYPES is set, the types go there).
    The returned bytes replace the frame's first 4 + types_at (+1 for EXECUTE) bytes; the caller forwards
    the rest of the frame unchanged. The frame must stay below 16 MiB with the types added.
    """
    command = buf[frame_at + 4]
    header = _HEADER.pack((length + len(types)) | (buf[frame_at + 3] << 24))
    head = bytearray(header)
    head.append(command)
    head += new_id.to_bytes(4, "little")
    if command == COM_STMT_EXECUTE:
        head += buf[frame_at + 9 : frame_at + 4 + types_at]
        head.append(1)
    else:
        assert command == COM_STMT_BULK_EXECUTE
        flags = buf[frame_at + 4 + BULK_FLAGS_AT] | (buf[frame_at + 5 + BULK_FLAGS_AT] << 8)
        head += (flags | BULK_SEND_TYPES).to_bytes(2, "little")
    head += types
    return bytes(head)


def unknown_statement(statement: int, command: str, capabilities: int) -> bytes:
    """The ERR payload a server sends for a statement id it does not know."""
    return ErrPacket(ER_UNKNOWN_STMT_HANDLER, f"Unknown prepared statement handler ({statement}) given to {command}",
                     "HY000").build(capabilities)
