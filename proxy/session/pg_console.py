"""The admin console over the PostgreSQL protocol: the simple query protocol answered by the proxy itself."""

from __future__ import annotations

import logging
import struct

from proxy.console import Console, ConsoleResult, Value, split_commands
from proxy.errors import ProtocolViolation, ProxyError
from proxy.netio import Connection, ConnectionClosed
from proxy.protocol.pg import messages as pg

log = logging.getLogger(__name__)
I16, I32 = struct.Struct("!h"), struct.Struct("!i")

CONSOLE_MESSAGE_LIMIT = 64 * 1024  # a console command is one short line
EXTENDED_ONLY = frozenset(b"PBDECF")  # Parse, Bind, Describe, Execute, Close, FunctionCall
SIMPLE_ONLY = "the admin console speaks the simple query protocol only"
TEXT_OID, INT8_OID, FLOAT8_OID = 25, 20, 701
# The server parameters a client expects after its login (psql reads server_version for its features).
PARAMETERS = {"server_version": "16.0", "server_encoding": "UTF8", "client_encoding": "UTF8", "DateStyle": "ISO",
              "integer_datetimes": "on", "standard_conforming_strings": "on", "application_name": "dbproxy"}


def _type_oid(rows: list[list[Value]], index: int) -> tuple[int, int]:
    """(type oid, size) of a column: int8 or float8 when its values are numbers, else text."""
    for row in rows:
        value = row[index]
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float):
            return TEXT_OID, -1
        return (INT8_OID if isinstance(value, int) else FLOAT8_OID), 8
    return TEXT_OID, -1


def _cell(value: Value) -> bytes:
    if value is None:
        return I32.pack(-1)
    data = str(value).encode()
    return I32.pack(len(data)) + data


def encode_result(result: ConsoleResult) -> bytes:
    """RowDescription, DataRows and CommandComplete of a table; a notice and CommandComplete of an action."""
    if result.tag == "EMPTY":
        return pg.message(b"I")
    if not result.columns:
        notice = pg.notice_response("00000", result.message) if result.message else b""
        return notice + pg.message(b"C", pg.cstring(result.tag))
    fields = [I16.pack(len(result.columns))]
    for index, name in enumerate(result.columns):
        oid, size = _type_oid(result.rows, index)
        fields.append(pg.cstring(name) + I32.pack(0) + I16.pack(0) + I32.pack(oid)
                      + I16.pack(size) + I32.pack(-1) + I16.pack(0))
    out = [pg.message(b"T", b"".join(fields))]
    count = I16.pack(len(result.columns))
    out.extend(pg.message(b"D", count + b"".join(_cell(value) for value in row)) for row in result.rows)
    out.append(pg.message(b"C", pg.cstring(f"{result.tag} {len(result.rows)}" if result.tag == "SELECT"
                                           else result.tag)))
    return b"".join(out)


async def _answer(console: Console, text: str, who: str) -> bytes:
    """Each command of a Query in turn; an error ends the Query there, as the server's does."""
    replies: list[bytes] = []
    for command in split_commands(text):
        try:
            replies.append(encode_result(await console.execute(command, who)))
        except ProxyError as exc:
            log.warning("admin console %s: %s [%s]", who, exc.message, exc.sqlstate)
            replies.append(pg.error_response(exc.sqlstate, exc.message))
            break
    return b"".join(replies)


async def serve_console(client: Connection, console: Console, who: str) -> None:
    """Answer the console client's queries until it leaves (an extended-protocol message gets 0A000 once, until
    its Sync). `who` names the client (user@address) in the log."""
    discarding = False  # an extended-protocol batch was refused: skip to its Sync
    try:
        while not client.closed:
            kind, body = await client.read_typed(CONSOLE_MESSAGE_LIMIT)
            if kind == ord("Q"):
                client.write(await _answer(console, body.rstrip(b"\0").decode("utf-8", "replace"), who)
                             + pg.READY_FOR_QUERY_IDLE)
            elif kind == ord("X"):
                client.close()
                return
            elif kind == ord("S"):
                discarding = False
                client.write(pg.READY_FOR_QUERY_IDLE)
            elif kind == ord("H"):
                continue
            elif kind in EXTENDED_ONLY:
                if kind == ord("F"):
                    client.write(pg.error_response("0A000", SIMPLE_ONLY) + pg.READY_FOR_QUERY_IDLE)
                elif not discarding:
                    discarding = True
                    log.warning("admin console %s: %s", who, SIMPLE_ONLY)
                    client.write(pg.error_response("0A000", SIMPLE_ONLY))
            else:
                raise ProtocolViolation(f"unexpected message type {chr(kind)!r} on the admin console")
    except ConnectionClosed:
        client.close()
