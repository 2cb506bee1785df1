"""The admin console over the MySQL protocol: COM_QUERY answered with text result sets by the proxy itself."""

from __future__ import annotations

import logging
import struct
from typing import Protocol

from proxy.console import Console, ConsoleResult, Value, split_commands
from proxy.errors import ProxyError, UnknownCommand
from proxy.netio import ConnectionClosed
from proxy.protocol.mysql import constants as my
from proxy.protocol.mysql.packets import EofPacket, OkPacket, frame, frame_many, write_lenenc_int, write_lenenc_str


class ConsoleClient(Protocol):
    """What the console needs of a MySQL client connection."""

    capabilities: int
    closed: bool

    async def read_exact(self, size: int) -> bytes: ...

    def write(self, data: bytes) -> None: ...

    def close(self) -> None: ...

    def _send_error(self, error: ProxyError, seq: int) -> None: ...

log = logging.getLogger(__name__)

CONSOLE_PACKET_LIMIT = 64 * 1024  # a console command is one short line
TYPE_VAR_STRING, TYPE_LONGLONG, TYPE_DOUBLE = 0xFD, 0x08, 0x05
NUM_FLAG = 0x8000
UTF8_GENERAL_CI = 33
STATUS = my.SERVER_STATUS_AUTOCOMMIT
# Either lets the server leave the column definitions out: it then says whether they follow (here always).
METADATA_OPTIONAL = my.CLIENT_OPTIONAL_RESULTSET_METADATA | my.MARIADB_CLIENT_CACHE_METADATA
COLUMN_TAIL = struct.Struct("<BHIBHB2x")  # 0x0c, charset, length, type, flags, decimals, filler


def _column(name: str, rows: list[list[Value]], index: int, capabilities: int) -> bytes:
    """A column definition (protocol 4.1): numbers as BIGINT or DOUBLE, the rest as VARCHAR."""
    kind, flags, decimals = TYPE_VAR_STRING, 0, 0x1F
    for row in rows:
        value = row[index]
        if value is None:
            continue
        if isinstance(value, int) and not isinstance(value, bool):
            kind, flags, decimals = TYPE_LONGLONG, NUM_FLAG, 0
        elif isinstance(value, float):
            kind, flags, decimals = TYPE_DOUBLE, NUM_FLAG, 0x1F
        break
    text = name.encode()
    extended = b"\x00" if capabilities & my.MARIADB_CLIENT_EXTENDED_METADATA else b""  # (no type info)
    return (write_lenenc_str(b"def") + write_lenenc_str(b"") * 3 + write_lenenc_str(text) + write_lenenc_str(text)
            + extended + COLUMN_TAIL.pack(0x0C, UTF8_GENERAL_CI, 1024, kind, flags, decimals))


def _row(row: list[Value]) -> bytes:
    return b"".join(b"\xfb" if value is None else write_lenenc_str(str(value).encode()) for value in row)


def encode_result(result: ConsoleResult, capabilities: int, seq: int = 1, more: bool = False) -> tuple[bytes, int]:
    """A text result set of a table, an OK with the message of an action; `more`: another result follows. Returns
    the bytes and the next sequence id."""
    status = STATUS | (my.SERVER_MORE_RESULTS_EXISTS if more else 0)
    if not result.columns:
        return frame_many([OkPacket(status_flags=status, info=result.message).build(capabilities)], seq)
    deprecate_eof = bool(capabilities & my.CLIENT_DEPRECATE_EOF)
    metadata_follows = b"\x01" if capabilities & METADATA_OPTIONAL else b""
    packets = [write_lenenc_int(len(result.columns)) + metadata_follows]
    packets.extend(_column(name, result.rows, index, capabilities) for index, name in enumerate(result.columns))
    if not deprecate_eof:
        packets.append(EofPacket(0, status).build())
    packets.extend(_row(row) for row in result.rows)
    packets.append(OkPacket(status_flags=status, header=my.EOF_HEADER).build(capabilities) if deprecate_eof
                   else EofPacket(0, status).build())
    return frame_many(packets, seq)


async def _answer(client: ConsoleClient, console: Console, text: str, who: str) -> None:
    """Each statement of a COM_QUERY in turn (several only with CLIENT_MULTI_STATEMENTS); an error ends it there."""
    commands = split_commands(text) if client.capabilities & my.CLIENT_MULTI_STATEMENTS else [text]
    seq = 1
    for index, command in enumerate(commands):
        try:
            result = await console.execute(command, who)
        except ProxyError as exc:
            log.warning("admin console %s: %s [%d]", who, exc.message, exc.mysql_errno)
            client._send_error(exc, seq)
            return
        data, seq = encode_result(result, client.capabilities, seq, index + 1 < len(commands))
        client.write(data)


async def _read_command(client: ConsoleClient) -> bytes:
    header = await client.read_exact(4)
    length = header[0] | (header[1] << 8) | (header[2] << 16)
    payload = await client.read_exact(length)
    if length >= CONSOLE_PACKET_LIMIT:
        raise UnknownCommand("a command of 64 kB or more on the admin console")
    return payload


async def serve_console(client: ConsoleClient, console: Console, who: str) -> None:
    """Answer the console client's commands until it leaves: COM_QUERY, COM_PING, COM_QUIT; others get 1047.
    `who` names the client (user@address) in the log."""
    try:
        while not client.closed:
            payload = await _read_command(client)
            command = payload[0] if payload else -1
            if command == my.COM_QUIT:
                client.close()
                return
            try:
                if command == my.COM_QUERY:
                    await _answer(client, console, payload[1:].decode("utf-8", "replace"), who)
                elif command == my.COM_PING:
                    client.write(frame(OkPacket(status_flags=STATUS).build(client.capabilities), 1))
                else:
                    raise UnknownCommand(f"command {command} is not served by the admin console (COM_QUERY, "
                                         "COM_PING and COM_QUIT are)")
            except ProxyError as exc:
                log.warning("admin console %s: %s [%d]", who, exc.message, exc.mysql_errno)
                client._send_error(exc, 1)
    except ConnectionClosed:
        client.close()
