"""The causal-read step at borrow time, per engine: the replica's backend once it caught up, else the writer's."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from proxy.pool.mysql_backend import MySQLBackend, Profile
from proxy.pool.pg_backend import PostgresBackend
from proxy.session.causal import checked, from_writer, mariadb_replayed, pg_replayed
from proxy.session.mysql_service import MySQLService
from proxy.session.pg_service import PostgresService


async def postgres_ready(service: PostgresService, backend: PostgresBackend,
                         sync: Callable[[PostgresBackend], Awaitable[None]], peer: str) -> PostgresBackend:
    """The backend a PostgreSQL transaction of a causal read_only endpoint runs on: `backend` once its standby has
    caught up, else one of the writer's in the client's session (`sync` gives it the session)."""
    reads = service.causal
    if reads is None or backend.pool.session_mode:
        return backend
    pool = backend.pool
    if await checked(reads, backend, service.endpoint.causal_read_timeout, pg_replayed, peer):
        return backend
    writer = reads.writer_service()
    assert isinstance(writer, PostgresService)
    return await from_writer(writer.pool_for(pool.database, pool.user), sync, PostgresBackend)


async def mariadb_ready(service: MySQLService, backend: MySQLBackend, sync: Callable[[MySQLBackend], Awaitable[None]],
                        profile: Profile, peer: str) -> MySQLBackend:
    """The backend a MariaDB transaction of a causal read_only endpoint runs on: `backend` once its replica has
    applied the writer's GTID position, else one of the writer's in the client's session."""
    reads = service.causal
    if reads is None or backend.pool.session_mode:
        return backend
    pool = backend.pool
    if await checked(reads, backend, service.endpoint.causal_read_timeout, mariadb_replayed, peer):
        return backend
    writer = reads.writer_service()
    assert isinstance(writer, MySQLService)
    return await from_writer(writer.pool_for(pool.database, pool.user, profile), sync, MySQLBackend)

