"""What a PostgreSQL client had in flight when its server was lost, and whether it may run again elsewhere.

A lost server leaves the client's work in one of four states (`judge`):
  - NOTHING: no transaction open, nothing in flight: the client simply borrows another backend next time;
  - REPLAY: an open transaction (nothing of it committed), or an autocommit request that only reads: its messages
    run again on another server, and the replies are compared with what the client was given;
  - ROLLED_BACK: the same, but the transaction cannot be replayed (too large to record): 40001, retry it;
  - UNKNOWN: the server may have committed before it was lost (a COMMIT, or an autocommit statement that may
    write, was in flight; or what was in flight is not known): 08007, the client must check.

Reads (`statement_kinds`): a statement whose first keyword is SELECT, SHOW, VALUES, TABLE or WITH and whose text,
string literals and comments left out, names none of INSERT, UPDATE, DELETE, MERGE, INTO, nextval, setval,
pg_advisory*, txid_current*, pg_current_xact_id*. A function that writes behind a SELECT is not seen: replaying a
read is only as safe as this rule (a changed result is still caught by the reply comparison).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

from proxy.errors import ProtocolViolation
from proxy.protocol.pg import extended as ext

NOTHING, REPLAY, ROLLED_BACK, UNKNOWN = range(4)
READ, BEGIN, COMMIT, ROLLBACK, NEUTRAL, WRITE = range(6)  # what one statement is, for `judge`

# Left out before looking at words: string literals, quoted identifiers, dollar-quoted bodies, comments.
_NOT_WORDS = re.compile(
    rb"(?s)[Ee]'(?:[^'\\]|\\.|'')*'|'(?:[^']|'')*'|\"(?:[^\"]|\"\")*\"|--[^\n]*|/\*.*?\*/"
    rb"|\$(?P<tag>[A-Za-z_][A-Za-z0-9_]*|)\$.*?\$(?P=tag)\$")
_FIRST_WORDS = re.compile(rb"\s*([A-Za-z_]+)(?:\s+([A-Za-z_]+))?")
_WRITES = re.compile(rb"(?i)\b(?:insert|update|delete|merge|into|nextval|setval|pg_advisory\w*|txid_current\w*"
                     rb"|pg_current_xact_id\w*)\b")
_READ_FIRST = frozenset({b"select", b"show", b"values", b"table", b"with"})
_KINDS = {b"begin": BEGIN, b"start": BEGIN, b"commit": COMMIT, b"end": COMMIT, b"rollback": ROLLBACK,
          b"abort": ROLLBACK, b"savepoint": NEUTRAL, b"release": NEUTRAL}
RFQ_KINDS = frozenset(b"QSF")  # client messages that each get one ReadyForQuery
EXTENDED_KINDS = frozenset(b"PBDECH")


def statement_kinds(text: bytes) -> list[int]:
    """The kind of each statement of an SQL text (READ, BEGIN, COMMIT, ROLLBACK, NEUTRAL or WRITE)."""
    kinds = []
    for statement in _NOT_WORDS.sub(b" x ", text).split(b";"):
        match = _FIRST_WORDS.match(statement)
        if match is None:
            continue  # an empty statement
        first = match.group(1).lower()
        second = (match.group(2) or b"").lower()
        kind = _KINDS.get(first)
        if kind is not None:
            if first in (b"commit", b"rollback") and second == b"prepared":
                kind = COMMIT if first == b"commit" else WRITE
            elif first == b"rollback" and second == b"to":
                kind = NEUTRAL
            kinds.append(kind)
        elif first == b"prepare" and second == b"transaction":
            kinds.append(COMMIT)
        elif first in _READ_FIRST and _WRITES.search(statement) is None:
            kinds.append(READ)
        else:
            kinds.append(WRITE)
    return kinds


def is_read(text: bytes) -> bool:
    """Every statement of `text` only reads (see the module docstring); an empty text is no read."""
    kinds = statement_kinds(text)
    return bool(kinds) and all(kind == READ for kind in kinds)


def split_messages(data: bytes) -> tuple[list[tuple[int, bytes]], bytes]:
    """Frontend messages (type, body) of `data`, and the incomplete message at its end (b"" if none)."""
    messages = []
    pos = 0
    end = len(data)
    while end - pos >= 5:
        length = int.from_bytes(data[pos + 1 : pos + 5], "big")
        if pos + 1 + length > end:
            break
        messages.append((data[pos], data[pos + 5 : pos + 1 + length]))
        pos += 1 + length
    return messages, data[pos:]


@dataclass
class Loss:
    """What a lost server leaves: the plan, and what the client waits for if it is answered with an error."""

    plan: int
    owed: int = 0  # ReadyForQuery messages the client still waits for
    in_transaction: bool = False  # the client is inside a transaction block at the point of the loss
    open_batch: bool = False  # extended-query messages after the client's last Sync: its Sync is still to come
    tail: bytes = b""  # the start of a message the client has not finished sending
    cut_reply: bool = False  # the client was given part of a reply (nothing can take its place)
    parsed: list[bytes] = field(default_factory=list)  # names of the statements whose Parse was in flight


def judge(recorded: bytes, answered: int, tx_status_idle: bool,
          statement_text: Callable[[bytes], bytes | None]) -> Loss:
    """The loss of a server, given the client's recorded messages of the transaction, how many ReadyForQuery it
    was given among them, whether the last one said idle, and the text of a named statement (b"" for the unnamed
    one; None: unknown)."""
    messages, tail = split_messages(recorded)
    producers = [i for i, (kind, _) in enumerate(messages) if kind in RFQ_KINDS]
    first = producers[answered - 1] + 1 if 0 < answered <= len(producers) else 0
    in_flight = messages[first:]
    last_producer = producers[-1] if producers else -1
    open_batch = any(kind in EXTENDED_KINDS for kind, _ in messages[last_producer + 1 :])
    loss = Loss(NOTHING, owed=max(len(producers) - answered, 0), open_batch=open_batch, tail=tail)
    in_transaction = not tx_status_idle
    parsed: dict[bytes, bytes] = {}
    try:
        for kind, body in in_flight:
            if kind == ord("P"):
                name, rest = ext.split_parse(body)
                parsed[name] = ext.parse_query_text(rest)
                if name:
                    loss.parsed.append(name)
                continue
            if kind == ord("B"):
                _, name, _ = ext.split_bind(body)
                text = parsed.get(name)
                if text is None:
                    text = statement_text(name)
                kinds = statement_kinds(text) if text is not None else [WRITE]
            elif kind == ord("Q"):
                kinds = statement_kinds(body[:-1])
            elif kind == ord("F"):
                kinds = [WRITE]
            else:
                continue
            for statement in kinds:
                if statement == BEGIN:
                    in_transaction = True
                elif statement == ROLLBACK:
                    in_transaction = False
                elif statement == COMMIT:
                    if in_transaction:
                        loss.plan = UNKNOWN
                        return loss
                elif statement == WRITE and not in_transaction:
                    loss.plan = UNKNOWN
                    return loss
    except ProtocolViolation:  # a malformed message: what it would have done is not known
        loss.plan = UNKNOWN
        return loss
    loss.in_transaction = in_transaction
    if in_flight or tail or not tx_status_idle:
        loss.plan = REPLAY
    return loss
