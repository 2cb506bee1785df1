"""lastval()/currval() through a pool: a client reads its own sequence values or none, never another client's.

PostgreSQL keeps them per server session; only nextval() sets them (often implicitly, in a serial or identity
default), so the proxy can neither carry them to another backend nor see every change. Instead, from the
statements a client sends at the start of each transaction (its first batch, looked at once per transaction):
- When they name a sequence function, INSERT, COPY or MERGE, or open a transaction block, and the backend's
  sequence values may be another client's, `DISCARD SEQUENCES` goes ahead of them (pipelined, its replies
  swallowed): whatever the transaction reads or sets is then this client's alone.
- After a transaction whose first batch may call nextval() without fetching the value (no RETURNING), the client
  keeps its backend reserved for `sequence_hold` seconds (0.2 by default, 0 for none; renewed by each such
  transaction; pin reason "sequence value"), so that `INSERT ...` then `SELECT lastval()` works under contention;
  while others wait for a backend, a hold is not renewed after HOLD_LIMIT_SECONDS.
- A transaction that reads lastval()/currval() goes back to the backend of the client's previous transaction
  when nobody has used it since; anywhere else the server says the value is not yet defined (55000).
Not seen: sequences reached only inside functions or triggers, and statements of an implicit transaction that
come after its first batch without a BEGIN (extended-protocol pipelines without Sync).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

from proxy.pool.pg_backend import PostgresBackend
from proxy.pool.pool import Pool
from proxy.protocol import sql_words
from proxy.protocol.pg import extended as ext
from proxy.protocol.pg import messages as pg

# Looked for in the first batch of each transaction (one pass of one pattern over the folded text, see
# proxy.protocol.sql_words; `start transaction` is found with any non-word bytes between its words).
WORDS = sql_words.spaced(rb"nextval|setval|lastval|currval|insert|copy|merge|returning|begin|start +transaction")
READ_WORDS = frozenset({b"lastval", b"currval"})
WRITE_WORDS = frozenset({b"nextval", b"setval", b"insert", b"copy", b"merge"})
DISCARD_SEQUENCES = pg.query("DISCARD SEQUENCES")
HOLD_REASON = "sequence value"
HOLD_LIMIT_SECONDS = 0.5  # while others wait, a hold is not renewed after this long
NOBODY, SHARED = 0, -1  # Backend.seq_owner: a new session / values possibly from several clients


class NamedStatement(Protocol):
    """A client's named statement: its Parse body after the name, and the words above in it (found once)."""

    rest: bytes
    seq_words: frozenset[bytes] | None


def _found(text: bytes | bytearray) -> set[bytes]:
    found = WORDS.findall(sql_words.folded(text))
    return set(found) if found else set()


def words_in(held: bytes | bytearray, statements: Mapping[Any, NamedStatement]) -> set[bytes]:
    """The words above in `held`, and in the named statements its Bind messages execute (their SQL is not in it)."""
    found = _found(held)
    if not statements:
        return found
    pos, end = 0, len(held)
    while end - pos >= 5:
        stop = pos + 1 + int.from_bytes(held[pos + 1 : pos + 5], "big")
        if held[pos] == 0x42 and stop <= end:  # 'B': portal name, statement name
            name_start = held.find(b"\x00", pos + 5) + 1
            statement = statements.get(bytes(held[name_start : held.find(b"\x00", name_start)]))
            if statement is not None:
                words = statement.seq_words
                if words is None:
                    words = statement.seq_words = frozenset(_found(ext.parse_query_text(statement.rest)))
                found |= words
        pos = stop
    return found


def reads_values(words: set[bytes]) -> bool:
    return not READ_WORDS.isdisjoint(words)


def attach(backend: PostgresBackend, client_id: int, words: set[bytes]) -> tuple[bytes, bool]:
    """A client starts a transaction on the backend with statements using `words`: count the use; return what
    to send first (`DISCARD SEQUENCES`, its replies swallowed, when needed) and whether to hold the backend
    after the transaction."""
    backend.count_use()
    hold = not WRITE_WORDS.isdisjoint(words) and b"returning" not in words
    owner = backend.seq_owner
    if owner == client_id:
        return b"", hold
    if owner == NOBODY:
        backend.sequences_belong_to(client_id)
        return b"", hold
    if not words or words == {b"returning"}:
        backend.sequences_belong_to(SHARED)
        return b"", hold
    backend.sequences_belong_to(client_id)
    backend.expect_reply(ext.Expectation(ext.QUERY, ext.SWALLOW))
    return DISCARD_SEQUENCES, hold


def take_if_unused(pool: Pool, backend: PostgresBackend | None, use: int) -> PostgresBackend | None:
    """The backend that ran the client's previous transaction, when it is idle and nobody has used it since."""
    if backend is None or backend.uses != use or not pool.borrow_this(backend):
        return None
    return backend
