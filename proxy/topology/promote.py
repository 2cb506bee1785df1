"""Promoting a reader to writer over the proxy's own admin connection, and choosing which reader to promote."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import aiomysql
import asyncpg

from proxy.topology.model import InstanceStatus

CONNECT_TIMEOUT = 5.0  # seconds to log in to the instance to promote
PG_PROMOTE_WAIT = 60  # seconds pg_promote(true, ...) waits for the standby to leave recovery
CATCH_UP_TIMEOUT = 30.0  # seconds a MariaDB replica may take to apply the events it has received
CATCH_UP_POLL = 0.1

# Promote the instance at (host, port); raises PromotionError (or one of its kinds) when it cannot.
Promoter = Callable[[str, int], Awaitable[None]]


class PromotionError(Exception):
    """The instance could not be promoted; the message says why (never a password)."""


class AlreadyWriter(PromotionError):
    """The instance is a writer already: nothing was done."""


class InstanceUnreachable(PromotionError):
    """No admin connection to the instance could be opened."""


def promotion_candidate(readers: Iterable[InstanceStatus]) -> InstanceStatus | None:
    """The reader to promote: furthest ahead by (timeline, position), a tie going to the lowest (host, port), so
    every worker and every proxy seeing the same positions picks the same instance."""
    return min(readers, key=lambda s: (-s.timeline, -s.position, s.host, s.port), default=None)


def _reason(exc: BaseException, password: str) -> str:
    if isinstance(exc, TimeoutError):
        return f"no answer within {CONNECT_TIMEOUT:g} s"
    text = str(exc).splitlines()[0] if str(exc) else ""
    text = f"{type(exc).__name__}: {text}"[:200]
    return text.replace(password, "***") if password else text


async def promote_postgres(host: str, port: int, user: str, password: str, database: str = "postgres") -> None:
    """Promote a PostgreSQL standby with ``pg_promote(true, 60)`` and return once it accepts writes.

    ``user`` needs to be a superuser or to have been granted EXECUTE on ``pg_promote``.
    """
    try:
        conn = await asyncio.wait_for(asyncpg.connect(host=host, port=port, user=user, password=password,
                                                      database=database, timeout=CONNECT_TIMEOUT,
                                                      statement_cache_size=0), CONNECT_TIMEOUT)
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        raise InstanceUnreachable(f"cannot connect to {host}:{port}: {_reason(exc, password)}") from None
    try:
        if not await conn.fetchval("SELECT pg_is_in_recovery()"):
            raise AlreadyWriter(f"{host}:{port} is not a standby (not in recovery): it is a writer already")
        try:
            done = await conn.fetchval("SELECT pg_promote(true, $1)", PG_PROMOTE_WAIT)
        except asyncpg.ObjectNotInPrerequisiteStateError:  # promoted meanwhile (by another proxy or worker)
            raise AlreadyWriter(f"{host}:{port} left recovery meanwhile: it is a writer already") from None
        if not done:
            raise PromotionError(f"{host}:{port} did not leave recovery within {PG_PROMOTE_WAIT} s")
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        raise PromotionError(f"promoting {host}:{port} failed: {_reason(exc, password)}") from None
    finally:
        conn.terminate()


async def _replica_status(cursor: Any) -> dict[str, Any] | None:
    await cursor.execute("SHOW SLAVE STATUS")
    row: dict[str, Any] | None = await cursor.fetchone()
    return row


def _applied_all_received(replica: dict[str, Any]) -> bool:
    """The SQL thread has executed everything the IO thread has read from the primary."""
    return (replica.get("Relay_Master_Log_File") == replica.get("Master_Log_File")
            and replica.get("Exec_Master_Log_Pos") == replica.get("Read_Master_Log_Pos"))


async def promote_mysql(host: str, port: int, user: str, password: str,
                        catch_up_timeout: float = CATCH_UP_TIMEOUT) -> None:
    """Promote a MariaDB replica: wait (at most ``catch_up_timeout`` seconds) until it has applied every event it
    received, then ``STOP SLAVE; RESET SLAVE ALL; SET GLOBAL read_only = 0``.

    ``user`` needs REPLICA MONITOR, REPLICATION SLAVE ADMIN, RELOAD (for RESET SLAVE) and READ_ONLY ADMIN.
    """
    try:
        conn = await asyncio.wait_for(aiomysql.connect(host=host, port=port, user=user, password=password,
                                                       connect_timeout=CONNECT_TIMEOUT, autocommit=True),
                                      CONNECT_TIMEOUT)
    except (OSError, TimeoutError, aiomysql.Error) as exc:
        raise InstanceUnreachable(f"cannot connect to {host}:{port}: {_reason(exc, password)}") from None
    try:
        async with conn.cursor(aiomysql.DictCursor) as cursor:
            replica = await _replica_status(cursor)
            await cursor.execute("SELECT @@read_only AS read_only")
            read_only = (await cursor.fetchone())["read_only"]
            if replica is None and not int(read_only):
                raise AlreadyWriter(f"{host}:{port} replicates from no primary and is not read-only: it is a writer "
                                    "already")
            deadline = time.monotonic() + catch_up_timeout
            while replica is not None and not _applied_all_received(replica):
                if replica.get("Slave_SQL_Running") != "Yes":
                    raise PromotionError(f"{host}:{port}: the replica's SQL thread is stopped before applying all "
                                         f"it received ({replica.get('Last_SQL_Error') or 'no error given'})")
                if time.monotonic() >= deadline:
                    raise PromotionError(f"{host}:{port} did not apply the events it received within "
                                         f"{catch_up_timeout:g} s")
                await asyncio.sleep(CATCH_UP_POLL)
                replica = await _replica_status(cursor)
            threads = (None, None) if replica is None else (replica.get("Slave_IO_Running"),
                                                            replica.get("Slave_SQL_Running"))
            if replica is not None and threads != ("No", "No"):
                await cursor.execute("STOP SLAVE")  # (with both threads stopped already it would only warn)
            await cursor.execute("RESET SLAVE ALL")
            await cursor.execute("SET GLOBAL read_only = 0")
    except (OSError, aiomysql.Error) as exc:
        raise PromotionError(f"promoting {host}:{port} failed: {_reason(exc, password)}") from None
    finally:
        conn.close()


def promoter(engine: str, user: str, password: str) -> Promoter:
    """The promotion of `engine` ("postgresql" or "mysql"), logging in as `user`."""
    if engine == "postgresql":
        return lambda host, port: promote_postgres(host, port, user, password)
    return lambda host, port: promote_mysql(host, port, user, password)
