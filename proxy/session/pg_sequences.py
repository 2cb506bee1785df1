"""lastval()/currval() through a pool: a client reads its own sequence values or none, never another client's.

PostgreSQL keeps them per server session; only nextval() sets them (often implicitly, in a serial or identity
default), so the proxy can neither carry them to another backend nor see every change. Instead:
- Before statements that name a sequence function, INSERT, COPY or MERGE, or a transaction block, run on a
  backend whose sequence values may be another client's, `DISCARD SEQUENCES` goes ahead of them (pipelined, its
  replies swallowed): what they read or set is then only this client's. Should such statements still come where
  no DISCARD can go first (extended protocol inside a transaction the proxy did not see begin), the pool learns
  to discard at every hand-over between clients.
- After a transaction that may have called nextval() without fetching the value (no RETURNING), the client keeps
  its backend for its next transaction if that starts within HOLD_SECONDS (pin reason "sequence value"), so that
  `INSERT ...` then `SELECT lastval()` works under contention; while others wait for a backend, a transaction
  run in a hold does not start another one.
- A transaction that reads lastval()/currval() goes back to the backend of the client's previous transaction
  when nobody has used it since; anywhere else the server says the value is not yet defined (55000).
Statements that reach sequences only inside functions or triggers are not seen: their values stay with the
backend (as with any server-side function that reads them).
"""

from __future__ import annotations

import logging
import re
import weakref
from collections.abc import Mapping

from proxy.pool.pg_backend import PostgresBackend
from proxy.pool.pool import Pool
from proxy.protocol.pg import extended as ext
from proxy.protocol.pg import messages as pg

# Words of statements that set or read a session's sequence values (matched as part of SESSION_WORDS).
SEQUENCE_WORDS_PATTERN = rb"nextval|setval|lastval|currval|insert|copy|merge|returning"
READ_WORDS = frozenset({b"lastval", b"currval"})
WRITE_WORDS = frozenset({b"nextval", b"setval", b"insert", b"copy", b"merge"})
SEQUENCE_WORDS = READ_WORDS | WRITE_WORDS | {b"returning"}
ANY_WORD = re.compile(rb"(?i)\b(?:" + SEQUENCE_WORDS_PATTERN + rb")\b")
READS = re.compile(rb"(?i)\b(?:lastval|currval)\b")
WRITES = re.compile(rb"(?i)\b(?:nextval|setval|insert|copy|merge)\b")
RETURNING = re.compile(rb"(?i)\breturning\b")
# A transaction block: its later statements come after the backend was chosen, where no DISCARD can go first.
TRANSACTION_START = re.compile(rb"(?i)\b(?:begin|start\s+transaction)\b")
DISCARD_SEQUENCES = pg.query("DISCARD SEQUENCES")
HOLD_REASON = "sequence value"
HOLD_SECONDS = 0.1  # how long a client keeps its backend after a statement that may have set a sequence value
NOBODY, SHARED = 0, -1  # Backend.seq_owner: a new session / values possibly from several clients
STRICT_POOLS: weakref.WeakSet[Pool] = weakref.WeakSet()  # pools whose backends discard at every hand-over

log = logging.getLogger(__name__)


def writes_without_returning(words: set[bytes]) -> bool:
    """Whether a statement with these (lower-case) words may set a sequence value the client does not see."""
    return bool(words & WRITE_WORDS) and b"returning" not in words


def bound_statement_texts(held: bytes | bytearray, statements: Mapping[bytes, tuple[bytes, bytes]]
                          ) -> list[bytes]:
    """The SQL of the named statements the Bind messages in `held` execute (their text is not in `held`)."""
    texts = []
    pos, end = 0, len(held)
    while end - pos >= 5:
        stop = pos + 1 + int.from_bytes(held[pos + 1 : pos + 5], "big")
        if held[pos] == 0x42 and stop <= end:  # 'B': portal name, statement name
            name_start = held.find(b"\x00", pos + 5) + 1
            statement = statements.get(bytes(held[name_start : held.find(b"\x00", name_start)]))
            if statement is not None:
                texts.append(ext.parse_query_text(statement[1]))
        pos = stop
    return texts


def reads_values(held: bytes | bytearray, statements: Mapping[bytes, tuple[bytes, bytes]]) -> bool:
    """Whether the statements in `held` call lastval() or currval() by name."""
    return READS.search(held) is not None or (
        bool(statements) and any(READS.search(text) for text in bound_statement_texts(held, statements))
    )


def attach(backend: PostgresBackend, client_id: int, held: bytes, statements: Mapping[bytes, tuple[bytes, bytes]]
           ) -> tuple[bytes, bool]:
    """A client starts a transaction on the backend with `held`: count the use and return what to send first
    (`DISCARD SEQUENCES`, its replies swallowed, when the statements use sequences and the session's values may
    be another client's), and whether a named statement the client binds may set a value it does not see."""
    backend.uses += 1
    bound = bound_statement_texts(held, statements) if statements else []
    hold = any(WRITES.search(text) and not RETURNING.search(text) for text in bound)
    owner = backend.seq_owner
    if owner == client_id:
        return b"", hold
    if owner == NOBODY:
        backend.seq_owner = client_id
        return b"", hold
    if (backend.pool in STRICT_POOLS or ANY_WORD.search(held) or TRANSACTION_START.search(held)
            or any(ANY_WORD.search(text) for text in bound)):
        return discard_now(backend, client_id), hold
    backend.seq_owner = SHARED
    return b"", hold


def discard_now(backend: PostgresBackend, client_id: int) -> bytes:
    """`DISCARD SEQUENCES` to send next (its replies swallowed): the session's values become the client's."""
    backend.seq_owner = client_id
    backend.expect.append(ext.Expectation(ext.QUERY, ext.SWALLOW))
    return DISCARD_SEQUENCES


def make_strict(pool: Pool) -> None:
    """Sequence statements ran where no DISCARD could go before them (extended protocol, mid-transaction):
    from now on every hand-over of this pool's backends between clients discards first."""
    if pool not in STRICT_POOLS:
        STRICT_POOLS.add(pool)
        log.info("pool %s: sequence statements inside extended-protocol transactions; backends now run "
                 "DISCARD SEQUENCES whenever they change clients", pool.name)


def take_if_unused(pool: Pool, backend: PostgresBackend | None, use: int) -> PostgresBackend | None:
    """The backend that ran the client's previous transaction, when it is idle and nobody has used it since."""
    if backend is None or backend.uses != use or backend.closed or backend not in pool.idle:
        return None
    pool.idle.remove(backend)
    pool.busy.add(backend)
    pool.stats.borrows += 1
    return backend
