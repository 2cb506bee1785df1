"""lastval()/currval() through a pool: a client reads its own sequence values or none, never another client's.

PostgreSQL keeps them per server session; only nextval() sets them (often implicitly, in a serial or identity
default, a trigger or a function), so the proxy can neither see every change nor carry the values elsewhere.
- A backend that starts a transaction for a client other than the one whose sequence values it holds first runs
  `DISCARD SEQUENCES` (pipelined ahead of the client's messages, its replies swallowed): a server session's
  values are only ever its current client's, whatever statement or function reads them.
- After a transaction with a statement that may call nextval() (INSERT, COPY, MERGE, nextval, setval) and does
  not fetch the value with RETURNING, the client keeps its backend for up to HOLD_SECONDS of its following
  transactions (counted as pins with reason "sequence value"), so that `INSERT ...` then `SELECT lastval()`
  works under contention.
- A later transaction that reads lastval()/currval() goes back to the backend of the client's previous
  transaction when nobody has used it since; anywhere else the server says the value is not yet defined (55000).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping

from proxy.pool.pg_backend import PostgresBackend
from proxy.pool.pool import Pool
from proxy.protocol.pg import extended as ext
from proxy.protocol.pg import messages as pg

# Words of statements that set or read a session's sequence values (matched as part of SESSION_WORDS).
SEQUENCE_WORDS_PATTERN = rb"nextval|setval|lastval|currval|insert|copy|merge|returning"
READ_WORDS = frozenset({b"lastval", b"currval"})
WRITE_WORDS = frozenset({b"nextval", b"setval", b"insert", b"copy", b"merge"})
SEQUENCE_WORDS = READ_WORDS | WRITE_WORDS | {b"returning"}
READS = re.compile(rb"(?i)\b(?:lastval|currval)\b")
WRITES = re.compile(rb"(?i)\b(?:nextval|setval|insert|copy|merge)\b")
RETURNING = re.compile(rb"(?i)\breturning\b")
DISCARD_SEQUENCES = pg.query("DISCARD SEQUENCES")
HOLD_REASON = "sequence value"
HOLD_SECONDS = 0.1  # how long a client keeps its backend after a statement that may have set a sequence value
NOBODY = 0  # Backend.seq_owner of a new session


def writes_without_returning(words: set[bytes]) -> bool:
    """Whether a statement with these (lower-case) words may set a sequence value the client does not see."""
    return bool(words & WRITE_WORDS) and b"returning" not in words


def attach(backend: PostgresBackend, client_id: int) -> bytes:
    """A client starts a transaction on the backend: count the use; returns a `DISCARD SEQUENCES` to send
    first (its replies swallowed) when the session's sequence values may be another client's."""
    backend.uses += 1
    owner = backend.seq_owner
    backend.seq_owner = client_id
    if owner in (NOBODY, client_id):
        return b""
    backend.expect.append(ext.Expectation(ext.QUERY, ext.SWALLOW))
    return DISCARD_SEQUENCES


def statement_texts(held: bytes | bytearray, statements: Mapping[bytes, tuple[bytes, bytes]]
                    ) -> Iterator[bytes | bytearray]:
    """The SQL of the Query, Parse and Bind (by its statement's name) messages in `held`."""
    pos, end = 0, len(held)
    while end - pos >= 5:
        kind = held[pos]
        stop = pos + 1 + int.from_bytes(held[pos + 1 : pos + 5], "big")
        if stop > end:
            stop = end  # (a message still arriving: what there is of it)
        body = held[pos + 5 : stop]
        if kind == 0x51:  # 'Q'
            yield body
        elif kind == 0x50:  # 'P': name, then the query
            yield ext.parse_query_text(bytes(body[body.find(b"\x00") + 1 :]))
        elif kind == 0x42 and statements:  # 'B': portal, statement name
            name_start = body.find(b"\x00") + 1
            statement = statements.get(bytes(body[name_start : body.find(b"\x00", name_start)]))
            if statement is not None:
                yield ext.parse_query_text(statement[1])
        pos = stop


def take_if_unused(pool: Pool, backend: PostgresBackend | None, use: int) -> PostgresBackend | None:
    """The backend that ran the client's previous transaction, when it is idle and nobody has used it since."""
    if backend is None or backend.uses != use or backend.closed or backend not in pool.idle:
        return None
    pool.idle.remove(backend)
    pool.busy.add(backend)
    pool.stats.borrows += 1
    return backend
