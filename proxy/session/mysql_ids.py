"""One id space for MySQL clients: the proxy's connection ids, session functions answered with the client's values,
and the client's own wait_timeout.

Connection ids. The proxy greets each client with an id of its own, in a range MariaDB/MySQL thread ids do not
reach in practice: PROXY_ID_BASE + (worker << 24) + a per-worker counter (1 .. 2**24 - 1). So a number in
KILL says what it names: a proxy id is a client of this proxy (in the worker its bits name); any other number
is a server thread id, as SHOW PROCESSLIST shows them, acted on only if it is one of this proxy's backend
connections (KILL QUERY: the statement that backend runs; KILL: also the client it serves is closed and the
connection dropped), in whichever worker owns it; else 1094 Unknown thread id. In a fleet ([fleet] port set) the
ids carry the proxy too: FLEET_ID_BASE (bit 31) + (proxy << 24) + (worker << 18) + a per-worker counter
(1 .. 2**18 - 1), so a KILL that reaches another proxy of the fleet is passed to the one owning the client.
SHOW PROCESSLIST and information_schema.PROCESSLIST are the server's: they list backend connections (Id: the server
thread id, User: the pool's user, Host: the proxy's address, Info: the statement a client runs on it now), not the
proxy's clients.

Session functions. CONNECTION_ID(), ROW_COUNT() and FOUND_ROWS() read per-connection values of the server. With
backends shared between clients, the backend that runs a statement is not the one that ran the client's previous
statement, so the proxy replaces the calls in the statement text with the client's own values (only in
statements that contain them). A select item that is just the call keeps its column name (`AS` the call's text).
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Container

from proxy.errors import TooManyClients

PROXY_ID_BASE = 0x40000000
WORKER_SHIFT = 24
COUNTER_MASK = (1 << WORKER_SHIFT) - 1
PROXY_ID_END = PROXY_ID_BASE + (64 << WORKER_SHIFT)  # workers <= 64 (config)
# The fleet's layout: bit 31, then the proxy id (7 bits), the worker (6 bits) and the counter (18 bits).
FLEET_ID_BASE = 0x80000000
FLEET_PROXY_SHIFT = 24
FLEET_WORKER_SHIFT = 18
FLEET_COUNTER_MASK = (1 << FLEET_WORKER_SHIFT) - 1
FLEET_ID_END = 1 << 32

# function flags (QueryEffect.functions)
CONNECTION_ID, ROW_COUNT, FOUND_ROWS = 1, 2, 4
FUNCTION_FLAGS = {b"connection_id": CONNECTION_ID, b"row_count": ROW_COUNT, b"found_rows": FOUND_ROWS}
# Calls of them (the inspector's ATTENTION pattern catches their `_id(`, `_count(`, `_rows(` first).
FUNCTION_CALL = re.compile(rb"\b(connection_id|row_count|found_rows)\s*\(\s*\)", re.I)

# What may stand around a call: quoted text and comments (skipped), parentheses (nesting), the call itself.
_TOKENS = re.compile(
    rb"""'(?:[^'\\]|\\.|'')*'|"(?:[^"\\]|\\.|"")*"|`(?:[^`]|``)*`|/\*(?![!M]).*?\*/|(?:--[ \t]|#)[^\n]*"""
    rb"""|(?P<open>\()|(?P<close>\))|(?P<semi>;)|\b(?P<call>(?P<name>connection_id|row_count|found_rows)\s*\(\s*\))""",
    re.I | re.S)
_ITEM_BEFORE = re.compile(rb"(?:\bSELECT(?:\s+(?:ALL|DISTINCT|DISTINCTROW|HIGH_PRIORITY|STRAIGHT_JOIN|SQL_\w+))*|,)"
                          rb"\s*\Z", re.I)
_ITEM_AFTER = re.compile(rb"\s*(?:,|;|\Z|(?:FROM|INTO|WHERE|GROUP|HAVING|ORDER|LIMIT|UNION|EXCEPT|INTERSECT|FOR|LOCK"
                         rb"|WINDOW)\b)", re.I)


def make_proxy_id(worker: int, serial: int, fleet_proxy: int | None = None) -> int:
    """The proxy connection id of a worker's `serial`-th client (the counter wraps, never reaching 0); with
    `fleet_proxy`, in the fleet's layout naming that proxy."""
    if fleet_proxy is not None:
        return (FLEET_ID_BASE + (fleet_proxy << FLEET_PROXY_SHIFT) + (worker << FLEET_WORKER_SHIFT)
                + ((serial - 1) % FLEET_COUNTER_MASK) + 1)
    return PROXY_ID_BASE + (worker << WORKER_SHIFT) + ((serial - 1) % COUNTER_MASK) + 1


def next_proxy_id(worker: int, counter: itertools.count[int], in_use: Container[int],
                  fleet_proxy: int | None = None) -> int:
    """A new connection id for a client of `worker`, not held by a connected client."""
    for _ in range(FLEET_COUNTER_MASK if fleet_proxy is not None else COUNTER_MASK):
        candidate = make_proxy_id(worker, next(counter), fleet_proxy)
        if candidate not in in_use:
            return candidate
    raise TooManyClients("too many clients in this worker process: every client id is taken")


def is_proxy_id(number: int) -> bool:
    return PROXY_ID_BASE <= number < PROXY_ID_END or FLEET_ID_BASE <= number < FLEET_ID_END


def worker_of(proxy_id: int) -> int:
    if proxy_id >= FLEET_ID_BASE:
        return (proxy_id >> FLEET_WORKER_SHIFT) & 0x3F
    return (proxy_id - PROXY_ID_BASE) >> WORKER_SHIFT


def fleet_proxy_of(proxy_id: int) -> int | None:
    """The fleet proxy a connection id names (None: an id of the single-proxy layout)."""
    if FLEET_ID_BASE <= proxy_id < FLEET_ID_END:
        return (proxy_id >> FLEET_PROXY_SHIFT) & 0x7F
    return None


def function_flags(lowered: bytes) -> int:
    """Which of CONNECTION_ID(), ROW_COUNT(), FOUND_ROWS() a statement text calls (lowered: text.lower())."""
    if not (b"connection_id" in lowered or b"row_count" in lowered or b"found_rows" in lowered):
        return 0
    flags = 0
    for call in FUNCTION_CALL.finditer(lowered):
        flags |= FUNCTION_FLAGS[call.group(1)]
    return flags


def substitute(text: bytes, values: dict[int, int], whole: bool) -> bytes:
    """`text` with calls of the functions in `values` (flag -> value) replaced by the value.

    Quoted strings, identifiers and comments are left alone. whole: the text is one statement; otherwise only its
    first statement is changed (later ones read what the statements before them in the same text did)."""
    out: list[bytes] = []
    depth = 0
    copied = 0
    for token in _TOKENS.finditer(text):
        if token.group("open") is not None:
            depth += 1
        elif token.group("close") is not None:
            depth -= 1
        elif token.group("semi") is not None:
            if not whole:
                break
        elif token.group("call") is not None:
            flag = FUNCTION_FLAGS[token.group("name").lower()]
            value = values.get(flag)
            if value is None:
                continue
            start, end = token.span()
            out.append(text[copied:start])
            out.append(b"%d" % value)
            if depth == 0 and _ITEM_BEFORE.search(text, 0, start) and _ITEM_AFTER.match(text, end):
                out.append(b" AS `" + token.group("call") + b"`")  # the column name the server would give
            copied = end
    if not out:
        return text
    out.append(text[copied:])
    return b"".join(out)


def session_timeout(body: bytes | None) -> float | None:
    """The client's wait_timeout in seconds from its tracked setting body (`@@SESSION.wait_timeout=N`)."""
    if body is None:
        return None
    _, _, value = body.rpartition(b"=")
    value = value.strip().strip(b"'\"")
    try:
        seconds = float(value)
    except ValueError:
        return None  # DEFAULT or an expression the server did not report: the proxy's own limit applies
    return seconds if seconds > 0 else None
