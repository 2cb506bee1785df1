"""Extended-query bookkeeping: statement names in Parse/Bind/Describe/Close, and which reply ends which request."""

from __future__ import annotations

from proxy.errors import ProtocolViolation
from proxy.protocol.pg.messages import INT32

# Requests whose replies the proxy follows, in the order the backend will answer them.
QUERY, SYNC, FUNCTION_CALL, PARSE, BIND, DESCRIBE_STATEMENT, DESCRIBE_PORTAL, EXECUTE, CLOSE = range(9)
# What the proxy does with the replies to one request. FORWARD: pass them on. SWALLOW: drop them, but pass an
# ErrorResponse on (the client must see why its request failed). INJECT: give the client `payload` in its place.
# QUIET: drop everything, errors too (recorded on `record`). REPLACE: an ErrorResponse becomes `payload`.
# TRACK: pass them on and tell the client's statement book when the request ends (see PostgresBackend).
FORWARD, SWALLOW, INJECT, QUIET, REPLACE, TRACK = range(6)

# For each request kind: the reply types that end it (an ErrorResponse also ends extended-query requests).
ENDS: tuple[frozenset[int], ...] = (
    frozenset(b"Z"),  # QUERY
    frozenset(b"Z"),  # SYNC
    frozenset(b"Z"),  # FUNCTION_CALL
    frozenset(b"1"),  # PARSE: ParseComplete
    frozenset(b"2"),  # BIND: BindComplete
    frozenset(b"Tn"),  # DESCRIBE_STATEMENT: ParameterDescription, then RowDescription or NoData
    frozenset(b"Tn"),  # DESCRIBE_PORTAL
    frozenset(b"CIs"),  # EXECUTE: CommandComplete, EmptyQueryResponse, PortalSuspended
    frozenset(b"3"),  # CLOSE: CloseComplete
)
# After an ErrorResponse to one of these, the server skips everything up to the next Sync.
SKIPS_TO_SYNC = frozenset({PARSE, BIND, DESCRIBE_STATEMENT, DESCRIBE_PORTAL, EXECUTE, CLOSE})

STATEMENT = ord("S")  # Describe/Close of a statement (b'P': of a portal)
PARSE_COMPLETE = b"1\x00\x00\x00\x04"
CLOSE_COMPLETE = b"3\x00\x00\x00\x04"
FLUSH = b"H\x00\x00\x00\x04"
SYNC_MESSAGE = b"S\x00\x00\x00\x04"
SKIPPED = b""  # Prepared.error of a request the server skipped after an earlier error


class Prepared:
    """One Parse of a statement on a backend: its text and types, and what the server described for it."""

    __slots__ = ("description", "error", "parameters", "rest", "session_words", "stale")

    def __init__(self, rest: bytes, session_words: bool = False) -> None:
        self.rest = rest  # the Parse body after the name: query text, parameter count and types
        self.session_words = session_words  # its text may change session state: note it each time it runs
        self.parameters = b""  # the ParameterDescription message, once seen
        self.description: bytes | None = None  # ParameterDescription + RowDescription/NoData, once described
        self.error: bytes | None = None  # the ErrorResponse (or SKIPPED) if the Parse or Describe did not happen
        self.stale = False  # (unnamed statements) the client's statement no longer matches the schema

    def __repr__(self) -> str:
        return f"Prepared({parse_query_text(self.rest)[:40]!r})"


class Expectation:
    """One request the backend will answer: its kind, what to do with the replies, and bookkeeping."""

    __slots__ = ("action", "kind", "payload", "prepared_name", "record", "resume")

    def __init__(self, kind: int, action: int = FORWARD, payload: bytes = b"", prepared_name: bytes = b"",
                 record: Prepared | None = None, resume: bool = False) -> None:
        self.kind = kind
        self.action = action
        self.payload = payload  # bytes to send to the client, for INJECT and REPLACE
        self.prepared_name = prepared_name  # a statement this Parse creates on the backend (undone on error)
        self.record = record  # the statement this Parse creates or this Describe describes
        self.resume = resume  # the client holds its bytes until this request ends


# Shared expectations for the common requests (no per-message allocation).
EXPECT_QUERY = Expectation(QUERY)
EXPECT_SYNC = Expectation(SYNC)
EXPECT_FUNCTION_CALL = Expectation(FUNCTION_CALL)
EXPECT_PARSE = Expectation(PARSE)
EXPECT_BIND = Expectation(BIND)
EXPECT_DESCRIBE_STATEMENT = Expectation(DESCRIBE_STATEMENT)
EXPECT_DESCRIBE_PORTAL = Expectation(DESCRIBE_PORTAL)
EXPECT_EXECUTE = Expectation(EXECUTE)
EXPECT_CLOSE = Expectation(CLOSE)
EXPECT_CLOSE_SWALLOW = Expectation(CLOSE, SWALLOW)
EXPECT_CLOSE_QUIET = Expectation(CLOSE, QUIET)
EXPECT_PARSE_QUIET = Expectation(PARSE, QUIET)
EXPECT_PARSE_UNNAMED = Expectation(PARSE)  # a client's own unnamed Parse (told apart by identity when it fails)
EXPECT_PARSE_RESENT = Expectation(PARSE, SWALLOW)  # the proxy re-sends a client's unnamed Parse
EXPECT_SYNC_QUIET = Expectation(SYNC, QUIET)


def result_shape(reply: bytes) -> bytes:
    """A RowDescription (or NoData) reduced to what fixes a statement's result type, as the server compares it:
    column names, types, type modifiers; not the table and column a value came from."""
    if not reply or reply[0] != ord("T"):
        return reply
    count = int.from_bytes(reply[5:7], "big")
    pos = 7
    out = [reply[5:7]]
    for _ in range(count):
        end = reply.find(b"\x00", pos)
        if end < 0 or end + 19 > len(reply):
            return reply  # malformed: compared as sent
        out.append(reply[pos : end + 1])  # name
        out.append(reply[end + 7 : end + 19])  # type, size, modifier, format (skipping table and column)
        pos = end + 19
    return b"".join(out)


def _name_end(body: bytes, start: int, what: str) -> int:
    end = body.find(b"\x00", start)
    if end < 0:
        raise ProtocolViolation(f"{what} has no NUL-terminated name")
    return end


def split_parse(body: bytes) -> tuple[bytes, bytes]:
    """Parse body -> (statement name, the rest: query, parameter count and types), its layout checked."""
    end = body.find(b"\x00")
    query_end = body.find(b"\x00", end + 1) if end >= 0 else -1
    tail = len(body) - query_end - 3  # after the query's NUL and the parameter count: 4 bytes per type
    if query_end < 0 or tail < 0 or tail != (body[query_end + 1] << 10 | body[query_end + 2] << 2):
        raise ProtocolViolation("malformed Parse message: expected a name, a query and its parameter types")
    return body[:end], body[end + 1 :]


def build_parse(name: bytes, rest: bytes) -> bytes:
    return b"P" + INT32.pack(len(name) + len(rest) + 5) + name + b"\x00" + rest


def parse_query_text(rest: bytes) -> bytes:
    """The SQL text at the start of a Parse body's rest."""
    end = rest.find(b"\x00")
    return rest[:end] if end >= 0 else rest


def split_bind(body: bytes) -> tuple[bytes, bytes, bytes]:
    """Bind body -> (portal, statement name, the rest)."""
    portal_end = _name_end(body, 0, "Bind")
    statement_end = _name_end(body, portal_end + 1, "Bind")
    return body[:portal_end], body[portal_end + 1 : statement_end], body[statement_end + 1 :]


def build_bind(portal: bytes, statement: bytes, rest: bytes) -> bytes:
    size = len(portal) + len(statement) + len(rest) + 6
    return b"B" + INT32.pack(size) + portal + b"\x00" + statement + b"\x00" + rest


def split_target(body: bytes, what: str) -> tuple[int, bytes]:
    """Describe/Close body -> (b'S' or b'P' as int, name)."""
    if len(body) < 2 or body[0] not in b"SP" or body.find(b"\x00") != len(body) - 1:
        raise ProtocolViolation(f"malformed {what} message: expected 'S' or 'P' and one NUL-terminated name")
    return body[0], body[1:-1]


def build_target(kind: bytes, target: int, name: bytes) -> bytes:
    return kind + INT32.pack(len(name) + 6) + bytes((target,)) + name + b"\x00"
