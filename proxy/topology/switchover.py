"""Engine operations of a blue/green switchover: make the old writer read-only, read its position, wait until the
new writer has applied it, promote the new writer (and undo the read-only when the switch is called off)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable
from typing import Protocol, TypeVar

import aiomysql
import asyncpg

log = logging.getLogger(__name__)
T = TypeVar("T")

POLL_INTERVAL = 0.005  # seconds between two looks at a PostgreSQL standby's replay position


class SwitchoverError(Exception):
    """A step of the switchover failed; the message says which and why (never a secret)."""


class AdminConnection(Protocol):
    """An administrative connection to one instance, as the monitor user of its cluster."""

    where: str  # host:port, for messages

    async def is_replica(self) -> bool:
        """Whether the instance replicates from another (a PostgreSQL standby, a MariaDB replica)."""

    async def make_read_only(self) -> None:
        """New transactions on the instance are read-only (for every application, not only the proxy's)."""

    async def make_writable(self) -> None:
        """Undo `make_read_only`."""

    async def position(self) -> str:
        """Where the instance's history ends now, in the form the other side's `wait_applied` takes."""

    async def wait_applied(self, position: str, timeout: float) -> None:
        """Return once this replica has applied `position`; SwitchoverError when it has not within `timeout`."""

    async def promote(self, timeout: float) -> None:
        """Stop replicating and accept writes."""

    async def close(self) -> None: ...


def _reason(exc: BaseException, password: str) -> str:
    """Why a statement or a connect failed, in words without the password."""
    if isinstance(exc, TimeoutError):
        return "no answer in time"
    text = (str(exc).splitlines() or [""])[0]
    text = f"{type(exc).__name__}: {text}"[:300]
    return text.replace(password, "***") if password else text


def _lsn(text: str) -> int:
    high, low = text.split("/")
    return (int(high, 16) << 32) | int(low, 16)


class PostgresAdmin:
    """A PostgreSQL instance over asyncpg (the user needs ALTER SYSTEM, pg_reload_conf and pg_promote: a
    superuser, or those granted)."""

    def __init__(self, conn: asyncpg.Connection, where: str) -> None:
        self.conn = conn
        self.where = where

    async def is_replica(self) -> bool:
        return bool(await self.conn.fetchval("SELECT pg_is_in_recovery()"))

    async def make_read_only(self) -> None:
        await self.conn.execute("ALTER SYSTEM SET default_transaction_read_only = on")
        await self.conn.execute("SELECT pg_reload_conf()")

    async def make_writable(self) -> None:
        await self.conn.execute("ALTER SYSTEM RESET default_transaction_read_only")
        await self.conn.execute("SELECT pg_reload_conf()")

    async def position(self) -> str:
        # Clients may commit asynchronously (synchronous_commit off): an empty synchronous commit flushes what came
        # before it, and a standby receives only flushed WAL.
        async with self.conn.transaction(readonly=False):
            await self.conn.execute("SET LOCAL synchronous_commit = on; SELECT txid_current()")
        # The end of the WAL inserted so far. Right after a page header it is the page boundary a standby's replay
        # position stops at when the last record ends the page before (else it would never reach it).
        insert, block = await self.conn.fetchrow(
            "SELECT pg_current_wal_insert_lsn()::text, current_setting('wal_block_size')::int")
        lsn, offset = _lsn(insert), _lsn(insert) % int(block)
        if offset in (24, 40):  # a short page header, or the long one a segment starts with
            lsn -= offset
        return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"

    async def wait_applied(self, position: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            replayed = await self.conn.fetchval(
                "SELECT COALESCE(pg_last_wal_replay_lsn() >= $1::text::pg_lsn, false)", position)
            if replayed:
                return
            if time.monotonic() >= deadline:
                behind = await self.conn.fetchval("SELECT pg_last_wal_replay_lsn()::text")
                raise SwitchoverError(f"{self.where} had replayed up to {behind}, not {position}, "
                                      f"within {timeout:.1f}s")
            await asyncio.sleep(POLL_INTERVAL)

    async def promote(self, timeout: float) -> None:
        # pg_promote(wait => true) looks every 100 ms whether it is done: look more often here.
        await self.conn.execute("SELECT pg_promote(false)")
        deadline = time.monotonic() + timeout
        while await self.conn.fetchval("SELECT pg_is_in_recovery()"):
            if time.monotonic() >= deadline:
                raise SwitchoverError(f"{self.where} was asked to promote but still replays after {timeout:.1f}s")
            await asyncio.sleep(POLL_INTERVAL)

    async def close(self) -> None:
        try:
            await self.conn.close(timeout=1.0)
        except Exception:
            self.conn.terminate()


class MariaDBAdmin:
    """A MariaDB instance over aiomysql (the user needs SUPER or READ_ONLY ADMIN, REPLICATION SLAVE ADMIN and
    REPLICA MONITOR)."""

    def __init__(self, conn: aiomysql.Connection, where: str) -> None:
        self.conn = conn
        self.where = where

    async def _one(self, sql: str, *args: object) -> object:
        async with self.conn.cursor() as cursor:
            await cursor.execute(sql, args or None)
            row = await cursor.fetchone()
        return None if row is None else row[0]

    async def _run(self, sql: str) -> None:
        async with self.conn.cursor() as cursor:
            await cursor.execute(sql)

    async def is_replica(self) -> bool:
        async with self.conn.cursor() as cursor:
            await cursor.execute("SHOW SLAVE STATUS")
            return await cursor.fetchone() is not None

    async def make_read_only(self) -> None:
        await self._run("SET GLOBAL read_only = 1")

    async def make_writable(self) -> None:
        await self._run("SET GLOBAL read_only = 0")

    async def position(self) -> str:
        return str(await self._one("SELECT @@GLOBAL.gtid_binlog_pos") or "")

    async def wait_applied(self, position: str, timeout: float) -> None:
        answer = await self._one("SELECT MASTER_GTID_WAIT(%s, %s)", position, max(0.0, timeout))
        if answer != 0:
            current = await self._one("SELECT @@GLOBAL.gtid_slave_pos")
            raise SwitchoverError(f"{self.where} had applied {current}, not {position}, within {timeout:.1f}s")

    async def promote(self, timeout: float) -> None:
        await self._run("STOP SLAVE")
        await self._run("RESET SLAVE ALL")
        await self._run("SET GLOBAL read_only = 0")

    async def close(self) -> None:
        self.conn.close()


async def connect_admin(engine: str, host: str, port: int, user: str, password: str,
                        timeout: float) -> AdminConnection:
    """An administrative connection to `host:port`; SwitchoverError (without the password) if it fails."""
    where = f"{host}:{port}"
    try:
        async with asyncio.timeout(timeout):
            if engine == "postgresql":
                conn = await asyncpg.connect(host=host, port=port, user=user, password=password,
                                             database="postgres", ssl="prefer", timeout=None,
                                             statement_cache_size=0)
                return PostgresAdmin(conn, where)
            mysql = await aiomysql.connect(host=host, port=port, user=user, password=password,
                                           connect_timeout=timeout, autocommit=True)
            return MariaDBAdmin(mysql, where)
    except Exception as exc:
        raise SwitchoverError(f"cannot connect to {where} as {user}: {_reason(exc, password)}") from None


async def guarded(step: str, where: str, password: str, work: Awaitable[T], timeout: float) -> T:
    """Await `work` for at most `timeout` seconds; any failure but a SwitchoverError becomes one that names the step
    and the instance."""
    try:
        return await asyncio.wait_for(work, max(0.1, timeout))
    except SwitchoverError:
        raise
    except Exception as exc:
        raise SwitchoverError(f"{step} on {where} failed: {_reason(exc, password)}") from None
