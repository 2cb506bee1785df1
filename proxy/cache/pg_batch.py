"""A request the cache can answer whole: a simple Query, or the Parse, Bind, Describe, Execute and Sync of the
unnamed statement and portal, read from the start of a client's held bytes (sans-IO)."""

from __future__ import annotations

from dataclasses import dataclass

from proxy.errors import ProtocolViolation
from proxy.protocol.pg import extended as ext

PORTAL = ord("P")
UNLIMITED = b"\x00\x00\x00\x00"  # Execute's row limit: all rows


@dataclass(frozen=True, slots=True)
class Batch:
    """The batch's size in bytes, its Parse rest (query and parameter types), and what besides the query text
    tells its result apart (parameter types, values and formats, result formats)."""

    size: int
    parse_rest: bytes  # (b"": a simple Query)
    text: bytes
    extra: bytes
    described: bool = True  # a RowDescription comes with the result


def unnamed_batch(held: bytes | bytearray) -> Batch | None:
    """The batch at the start of `held` if it is P B D(portal) E S (Describe optional) of the unnamed statement and
    portal, all there; None otherwise (the forwarder then reads it, and answers malformed messages)."""
    messages: list[tuple[int, bytes]] = []
    pos = 0
    end = len(held)
    while len(messages) < 5 and end - pos >= 5:
        kind = held[pos]
        length = int.from_bytes(held[pos + 1 : pos + 5], "big")
        if length < 4 or end - pos < 1 + length:
            return None
        messages.append((kind, bytes(held[pos + 5 : pos + 1 + length])))
        pos += 1 + length
        if kind == ord("S"):
            break
    kinds = bytes(kind for kind, _ in messages)
    if kinds not in (b"PBDES", b"PBES"):
        return None
    try:
        name, parse_rest = ext.split_parse(messages[0][1])
        portal, statement, bind_rest = ext.split_bind(messages[1][1])
        if len(kinds) == 5 and ext.split_target(messages[2][1], "Describe") != (PORTAL, b""):
            return None
    except ProtocolViolation:
        return None
    if name or portal or statement or messages[-2][1] != b"\x00" + UNLIMITED:
        return None
    return Batch(pos, parse_rest, ext.parse_query_text(parse_rest), b"\x00extended\x00" + kinds + parse_rest +
                 bind_rest, described=len(kinds) == 5)
