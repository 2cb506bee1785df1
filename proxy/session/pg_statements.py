"""A PostgreSQL client's prepared statements, kept as a direct server would keep them on whichever backend serves it.

Named statements. Each client name maps to one backend-side statement shared by every client that prepares the
same text and parameter types under the same name-resolution settings (search_path, role, encoding, date and
time styles: `NAME_SETTINGS`), so a backend prepares a statement once for many clients. A client's Parse always
reaches the server (Close + Parse of the shared name, then a Describe whose reply the proxy keeps): the server
checks the text against the current schema exactly as it would directly, and the description it gives is the one
the client's statement has from then on (the server fixes a statement's result type at Parse time too).

Every backend copy records the description the server gave when it was prepared. A Bind or Describe (or SQL
`EXECUTE`) of a client statement goes straight through when the backend's copy is the one the client prepared, or
was described identically. Otherwise the backend lacks the statement, or it was prepared under another schema:
the proxy prepares it afresh there (Close + Parse + Describe + Flush) and *holds the client's following bytes*
until the Describe's reply is known. Holding is the simplest design that is exactly right: nothing the client
sent after the check reaches the server before the proxy knows whether the statement still has the shape the
client was shown, so the server's state (transaction block, implicit transaction, skip-to-Sync) always equals a
direct server's. Then:
  - same description: the held bytes go on (the statement is in place);
  - a different one: the client's statement no longer matches the schema. A direct server answers every use of
    such a statement with `0A000 cached plan must not change result type`, and drivers re-prepare on it. The proxy
    gives the same answer at the same point: it sends a Describe of a statement no backend has (`FAIL_TARGET`),
    which fails, and replaces that error with the 0A000. Because the server itself failed there, an enclosing
    transaction block is aborted and the rest of the pipeline skipped up to Sync, as directly;
  - the Parse failed (say the table is gone): its error is the client's error, as a direct revalidation would
    report it; the server skips to Sync and the proxy drops the held messages up to the client's Sync.
No shared statement needs dropping when the server itself reports a cached plan changed: a client is only ever
bound to a backend copy whose description equals the one it was shown, so the server's 0A000 is then exactly the
direct answer, and the client's next Parse prepares the statement afresh.

Unnamed statements. The proxy remembers the client's last unnamed Parse (text and a serial number; no allocation
on this hot path) and which client's Parse each backend's unnamed statement is. A Bind or Describe of the unnamed
statement on a backend whose unnamed statement is not the client's latest re-sends the client's Parse first
(checked as above when the client was shown its description); a client that has no unnamed statement gets
`26000 unnamed prepared statement does not exist`, never another client's leftover. A simple Query or a Close
ends it, as on the server. After an unnamed Parse fails or is skipped the proxy forgets the client's unnamed
statement (a later Bind of it gets 26000, never a statement the server did not prepare).
"""

from __future__ import annotations

import re
import weakref
from typing import TYPE_CHECKING, Protocol

from proxy.errors import ProxyError
from proxy.protocol.pg import extended as ext
from proxy.protocol.pg import messages as pg
from proxy.protocol.pg.extended import (
    DESCRIBE_STATEMENT,
    EXPECT_BIND,
    EXPECT_CLOSE_QUIET,
    EXPECT_DESCRIBE_STATEMENT,
    EXPECT_PARSE_QUIET,
    EXPECT_PARSE_RESENT,
    EXPECT_PARSE_UNNAMED,
    EXPECT_QUERY,
    EXPECT_SYNC,
    EXPECT_SYNC_QUIET,
    FLUSH,
    FORWARD,
    PARSE,
    QUIET,
    REPLACE,
    SWALLOW,
    SYNC_MESSAGE,
    TRACK,
    Expectation,
    Prepared,
)

if TYPE_CHECKING:
    from proxy.pool.pg_backend import PostgresBackend
    from proxy.pool.pool import Pool
    from proxy.session.state import SessionState

STATEMENT = ord("S")
HOLD = b"\x00hold\x00"  # the answer "a check was sent: hold the client's bytes from this message on" (by identity)
FAIL_TARGET = b"dbproxy_no_such_statement"  # a statement no backend has: a Describe of it always fails
# As the server words it, routine included: drivers (asyncpg) recognise it by that and re-prepare.
CACHED_PLAN_CHANGED = pg.message(b"E", b"SERROR\x00VERROR\x00C0A000\x00Mcached plan must not change result type\x00"
                                 b"Fplancache.c\x00RRevalidateCachedQuery\x00\x00")
UNNAMED_MISSING = pg.error_response("26000", "unnamed prepared statement does not exist")
PLACEHOLDER = b"SELECT\x00\x00\x00"  # a Parse rest: a statement that exists only to be deallocated

# Settings that change what a statement's text means (name resolution, literal parsing): part of the shared key.
NAME_SETTINGS = frozenset({
    "search_path", "role", "session_authorization", "client_encoding", "datestyle", "intervalstyle", "timezone",
    "standard_conforming_strings", "default_text_search_config", "backslash_quote", "transform_null_equals",
    "array_nulls", "lc_monetary", "lc_numeric", "lc_time",
})

IDENTIFIER = rb'(?:"(?P<quoted>(?:[^"]|"")+)"|(?P<plain>[A-Za-z_\x80-\xff][A-Za-z0-9_$\x80-\xff]*))'
EXECUTE_SQL = re.compile(rb"(?is)\s*execute\s+" + IDENTIFIER + rb"(?=\s|\(|;|$)")
DEALLOCATE_SQL = re.compile(rb"(?is)\s*deallocate\s+(?:prepare\s+)?" + IDENTIFIER + rb"\s*;?\s*$")
DEALLOCATE_ALL = re.compile(rb"(?is)\s*deallocate\s+(?:prepare\s+)?all\s*;?\s*$")


def sql_name(match: re.Match[bytes]) -> bytes:
    """The statement name an SQL identifier denotes: quoted as written, unquoted folded to lower case."""
    quoted = match.group("quoted")
    return quoted.replace(b'""', b'"') if quoted is not None else match.group("plain").lower()


def _close(name: bytes) -> bytes:
    return ext.build_target(b"C", STATEMENT, name)


def _describe(name: bytes) -> bytes:
    return ext.build_target(b"D", STATEMENT, name)


class ClientStatement:
    """A client's named statement: the shared backend name, its Parse, and the Parse the client was shown."""

    __slots__ = ("backend_name", "origin", "rest", "seq_words", "stale")

    def __init__(self, backend_name: bytes, rest: bytes, origin: Prepared) -> None:
        self.backend_name = backend_name
        self.rest = rest
        self.seq_words: frozenset[bytes] | None = None  # sequence words in its text (see pg_sequences), once
        self.origin = origin  # its description is the one the client's statement has
        self.stale = False  # the schema changed under it: every use gets 0A000, as directly


class StatementsClient(Protocol):
    """The side of a client session its statement book reads (the session implements it)."""

    @property
    def in_extended(self) -> bool: ...
    def note_session_words(self, sql: bytes) -> None: ...


class Statements:
    """The statement book of one client; PostgresClient asks it about each Parse/Bind/Describe/Close."""

    def __init__(self, client: StatementsClient, session: SessionState[str, ClientStatement]) -> None:
        # weakly: the client holds its book, and a cycle would keep every closed client (with its transport, login
        # task and statements) until the next full garbage collection
        self._client = weakref.ref(client)
        self.session = session  # its settings are part of a shared statement's key
        self.named = session.statements  # the client's name -> its statement
        self.unnamed_rest: bytes | None = None  # the client's unnamed statement (its Parse rest), if it has one
        self.unnamed_serial = 0  # counts the client's unnamed Parses; a backend notes the one it holds
        self.unnamed_words = False  # its text may change session state
        self.unnamed_shown: Prepared | None = None  # its description, once the client asked for it (and .stale)
        self.check: Prepared | None = None  # a backend copy prepared to check, while the client's bytes are held
        self.check_bytes = b""  # what to send the backend for that check
        self.check_in_query = False  # the check is for a simple Query (ends with its own Sync)
        self.discarding = False  # the check failed: the server skips to Sync, and so do the held messages
        self._context_of = -1
        self._context = 0

    @property
    def client(self) -> StatementsClient:
        client = self._client()
        assert client is not None, "a client's statement book is used only while the client is"
        return client

    # --- the key of shared statements ---

    def _context_id(self, pool: Pool) -> int:
        session = self.session
        if session.settings_id != self._context_of:
            self._context = pool.settings_id(
                {name.lower(): value for name, value in session.settings.items() if name.lower() in NAME_SETTINGS})
            self._context_of = session.settings_id
        return self._context

    # --- Parse ---

    def parse_named(self, name: bytes, rest: bytes, backend: PostgresBackend, session_words: bool) -> bytes:
        if name in self.named:  # the server would say so for its own name; say it for the client's
            quoted = name.decode(errors="replace")
            return self._fail(backend, pg.error_response("42P05", f'prepared statement "{quoted}" already exists'))
        pool = backend.pool
        backend_name = pool.statement_name(rest, self._context_id(pool))
        record = Prepared(rest, session_words)
        self.named[name] = ClientStatement(backend_name, rest, record)
        return backend.ensure_prepared(backend_name, record, FORWARD)

    def parse_unnamed(self, rest: bytes, backend: PostgresBackend, session_words: bool) -> None:
        serial = self.unnamed_serial + 1
        self.unnamed_serial = serial
        self.unnamed_rest = rest
        self.unnamed_words = session_words
        self.unnamed_shown = None
        backend.parse_unnamed(self, serial, EXPECT_PARSE_UNNAMED)

    def parse_answered(self, rest: bytes) -> None:
        """The client's unnamed Parse was answered by the proxy (a cached result): parsed on a backend before use."""
        self.unnamed_serial += 1
        self.unnamed_rest = rest
        self.unnamed_words = False
        self.unnamed_shown = None

    def unnamed_failed(self) -> None:
        """A client's unnamed Parse failed or was skipped: forget its unnamed statement (see the docstring)."""
        self.unnamed_rest = None

    def failed(self, expectation: Expectation, failing: bool) -> None:
        """A request with a record failed (`failing`) or was skipped after an earlier error."""
        record = expectation.record
        if expectation.kind == PARSE and expectation.action == FORWARD:  # the client's Parse: no such name
            for name in [n for n, s in self.named.items() if s.origin is record]:
                del self.named[name]
        if expectation.resume and record is self.check and not self.check_in_query:
            self.check = None
            self.discarding = True

    # --- Bind, Describe, Close of statements ---

    def bind(self, portal: bytes, name: bytes, rest: bytes, backend: PostgresBackend) -> bytes | None:
        if name:
            statement = self.named.get(name)
            if statement is None:  # not a protocol-level name of this client: the server answers
                backend.expect_reply(EXPECT_BIND)
                return None
            answer = self._use(statement, backend, False)
            if answer is not None:
                return answer
            if statement.origin.session_words:  # it runs again: whatever it changes is read back
                self.client.note_session_words(ext.parse_query_text(statement.rest))
            backend.expect_reply(EXPECT_BIND)
            return ext.build_bind(portal, statement.backend_name, rest)
        answer = self._use_unnamed(backend)
        if answer is not None:
            return answer
        if self.unnamed_words and self.unnamed_rest is not None:
            self.client.note_session_words(ext.parse_query_text(self.unnamed_rest))
        backend.expect_reply(EXPECT_BIND)
        return None

    def describe(self, name: bytes, backend: PostgresBackend) -> bytes | None:
        if name:
            statement = self.named.get(name)
            if statement is None:
                backend.expect_reply(EXPECT_DESCRIBE_STATEMENT)
                return None
            answer = self._use(statement, backend, False)
            if answer is not None:
                return answer
            backend.expect_reply(EXPECT_DESCRIBE_STATEMENT)
            return _describe(statement.backend_name)
        answer = self._use_unnamed(backend)
        if answer is not None:
            return answer
        shown = self.unnamed_shown
        if shown is None:  # what the client is shown: kept to check the statement on other backends
            shown = self.unnamed_shown = Prepared(b"")
            backend.expect_reply(Expectation(DESCRIBE_STATEMENT, TRACK, record=shown))
        else:
            backend.expect_reply(EXPECT_DESCRIBE_STATEMENT)
        return None

    def close_named(self, name: bytes) -> None:
        """The client's name goes; the shared backend statement stays for others."""
        self.named.pop(name, None)

    def forget_unnamed(self, backend: PostgresBackend) -> None:
        """A simple Query or Close of the unnamed statement: the session has no unnamed statement."""
        self.unnamed_rest = None
        backend.forget_unnamed()

    def forget_all(self, backend: PostgresBackend | None) -> None:
        """DEALLOCATE ALL / DISCARD ALL: every named statement of the session goes."""
        self.named.clear()
        if backend is not None:
            backend.forget_all_prepared()

    # --- SQL EXECUTE / DEALLOCATE of protocol-level names ---

    def execute_sql(self, sql: bytes, backend: PostgresBackend) -> bytes | None:
        """`EXECUTE name(...)` of a client statement: the backend's name, with the statement checked in place."""
        match = EXECUTE_SQL.match(sql)
        statement = self.named.get(sql_name(match)) if match is not None else None
        if statement is None or match is None or self.client.in_extended:
            return None
        answer = self._use(statement, backend, True)
        if answer is not None:
            return answer
        backend.expect_reply(EXPECT_QUERY)
        start, stop = match.span("quoted" if match.group("quoted") is not None else "plain")
        if match.group("quoted") is not None:
            start, stop = start - 1, stop + 1
        return pg.message(b"Q", sql[:start] + statement.backend_name + sql[stop:] + b"\x00")

    def deallocate_sql(self, sql: bytes, backend: PostgresBackend) -> bytes | None:
        """`DEALLOCATE name` of a client statement: deallocated on this backend, so the server answers."""
        if DEALLOCATE_ALL.match(sql):
            self.forget_all(backend)
            return None
        match = DEALLOCATE_SQL.match(sql)
        statement = self.named.pop(sql_name(match), None) if match is not None else None
        if statement is None:
            return None  # an SQL-level PREPAREd statement, or an error the server reports
        backend_name = statement.backend_name
        prefix = b""
        if not backend.forget_prepared(backend_name) and not self.client.in_extended:
            for expectation in (EXPECT_CLOSE_QUIET, EXPECT_PARSE_QUIET, EXPECT_SYNC_QUIET):
                backend.expect_reply(expectation)
            prefix = _close(backend_name) + ext.build_parse(backend_name, PLACEHOLDER) + SYNC_MESSAGE
        return prefix + pg.query(f"DEALLOCATE {backend_name.decode()}")

    # --- checks ---

    def _use(self, statement: ClientStatement, backend: PostgresBackend, in_query: bool) -> bytes | None:
        """None when the backend's copy is the client's statement; else a check (HOLD) or a failure to send."""
        check = self.check
        if check is not None:  # the held message again, after its check
            self.check = None
            if check.error is not None:
                return self._fail(backend, check.error or CACHED_PLAN_CHANGED, in_query)
            if check.description != statement.origin.description:
                statement.stale = True
                return self._fail(backend, CACHED_PLAN_CHANGED, in_query)
            return None
        if statement.stale:
            return self._fail(backend, CACHED_PLAN_CHANGED, in_query)
        record = backend.prepared_copy(statement.backend_name)
        if record is not None:
            origin = statement.origin
            if record is origin or (record.description is not None and record.description == origin.description):
                return None
        return self._start_check(backend, statement.backend_name, statement.origin, in_query)

    def _use_unnamed(self, backend: PostgresBackend) -> bytes | None:
        check = self.check
        shown = self.unnamed_shown
        if check is not None:
            self.check = None
            if shown is None or check.description != shown.description:
                if shown is not None:
                    shown.stale = True  # it no longer matches the schema: 0A000 on every use, as directly
                return self._fail(backend, CACHED_PLAN_CHANGED, False)
            return None
        if backend.holds_unnamed(self, self.unnamed_serial):
            return None
        rest = self.unnamed_rest
        if rest is None:
            return self._fail(backend, UNNAMED_MISSING, False)
        if shown is not None and shown.stale:
            return self._fail(backend, CACHED_PLAN_CHANGED, False)
        if shown is None or shown.description is None:  # never described to the client: nothing to compare
            backend.parse_unnamed(self, self.unnamed_serial, EXPECT_PARSE_RESENT)
            return ext.build_parse(b"", rest)
        return self._start_check(backend, b"", Prepared(rest, self.unnamed_words), False)

    def _start_check(self, backend: PostgresBackend, backend_name: bytes, source: Prepared, in_query: bool) -> bytes:
        rest = source.rest
        record = Prepared(rest, source.session_words)
        self.check = record
        self.check_in_query = in_query
        if backend_name:
            data = backend.ensure_prepared(backend_name, record, QUIET if in_query else SWALLOW, resume=True)
        else:  # the unnamed statement: the client's latest unnamed Parse again
            backend.parse_unnamed(self, self.unnamed_serial, Expectation(PARSE, SWALLOW, record=record))
            backend.expect_reply(Expectation(DESCRIBE_STATEMENT, SWALLOW, record=record, resume=True))
            data = ext.build_parse(b"", rest) + _describe(b"")
        if in_query:
            backend.expect_reply(EXPECT_SYNC_QUIET)
            self.check_bytes = data + SYNC_MESSAGE
        else:
            self.check_bytes = data + FLUSH
        return HOLD

    def take_check(self) -> bytes:
        data, self.check_bytes = self.check_bytes, b""
        return data

    def reject(self, backend: PostgresBackend, error: ProxyError) -> bytes:
        """A malformed extended-query message: the client gets `error` where the server would have failed."""
        return self._fail(backend, pg.error_response(error.sqlstate, error.message))

    def _fail(self, backend: PostgresBackend, error: bytes, in_query: bool = False) -> bytes:
        """Make the server fail here (a Describe of a statement nobody has) and give the client `error` instead."""
        backend.expect_reply(Expectation(DESCRIBE_STATEMENT, REPLACE, payload=error))
        if in_query:
            backend.expect_reply(EXPECT_SYNC)
            return _describe(FAIL_TARGET) + SYNC_MESSAGE
        return _describe(FAIL_TARGET)

    def discard_until_sync(self, data: bytes, max_message: int) -> tuple[bytes, bool]:
        """Drop whole messages before the next Sync (the server skips them): (what is left, Sync reached)."""
        pos = 0
        end = len(data)
        while end - pos >= 5:
            kind = data[pos]
            if kind in b"SX":
                self.discarding = False
                return data[pos:], True
            length = int.from_bytes(data[pos + 1 : pos + 5], "big")
            if length < 4 or length > max_message:
                self.discarding = False
                return data[pos:], True  # the forwarder reports the bad length
            if end - pos < length + 1:
                break
            pos += 1 + length
        return data[pos:], False

