"""DROP DATABASE and ALTER DATABASE ... RENAME through the proxy: the pools' idle backends on it leave first."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable

from proxy.pool.pg_backend import PostgresBackend
from proxy.pool.pool import Pool

log = logging.getLogger(__name__)

# The statements PostgreSQL refuses while other sessions are connected to the database they name.
DATABASE_DDL = re.compile(
    rb'(?is)^\s*(?P<verb>drop|alter)\s+database\s+(?:if\s+exists\s+)?(?P<name>"(?:[^"]|"")+"|[^\s;"]+)'
    rb"(?P<rename>\s+rename\b)?"
)


def database_ddl_target(sql: bytes) -> str | None:
    """The database a DROP DATABASE / ALTER DATABASE ... RENAME statement names (as the server folds it), else None."""
    match = DATABASE_DDL.match(sql)
    if match is None or (match.group("verb").lower() == b"alter" and match.group("rename") is None):
        return None
    name = match.group("name").decode(errors="replace")
    if name.startswith('"'):
        return name[1:-1].replace('""', '"')
    return name.lower()


def close_idle_backends(pools: Iterable[Pool], database: str) -> int:
    """Log off and close every idle backend connected to `database`; returns how many were closed."""
    closed = 0
    for pool in list(pools):
        if pool.database != database:
            continue
        for backend in list(pool.idle):
            if isinstance(backend, PostgresBackend):
                backend.log_off()
            pool.discard(backend)
            closed += 1
    if closed:
        log.info("closed %d idle backend(s) of database %r before DROP/RENAME DATABASE", closed, database)
    return closed
