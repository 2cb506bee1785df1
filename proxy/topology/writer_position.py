"""The writer's current replication position, asked over a kept admin connection, one question in flight at a time."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Generic, TypeVar

import aiomysql
import asyncpg

from proxy.topology.monitor import Address, TopologyMonitor

log = logging.getLogger(__name__)

T = TypeVar("T")


class NoWriter(Exception):
    """The cluster has no healthy writer now: its position cannot be asked."""


class PositionUnknown(Exception):
    """The writer's position could not be asked (refused, timed out, lost); the message names no secret."""


def _unknown(exc: BaseException, password: str) -> PositionUnknown:
    if isinstance(exc, TimeoutError):
        return PositionUnknown("the writer did not answer in time")
    text = str(exc).splitlines()[0] if str(exc) else ""
    if password:
        text = text.replace(password, "***")
    return PositionUnknown(f"{type(exc).__name__}: {text}"[:200] if text else type(exc).__name__)


class SingleFlight(Generic[T]):
    """One question in flight at a time; a caller gets the answer of a question that started after its call.

    A caller arriving while a question runs waits for the next one, which starts when the running one ends and
    answers everyone who arrived meanwhile: concurrent callers share one round trip, and none of them gets an
    answer older than its own arrival.
    """

    def __init__(self, ask: Callable[[], Awaitable[T]]) -> None:
        self._ask = ask
        self._running = False
        self._next: asyncio.Future[T] | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def after_now(self) -> asyncio.Future[T]:
        """A future of an answer to a question started no earlier than this call (await it through a shield)."""
        if not self._running:
            return self._start(None)
        if self._next is None:
            self._next = asyncio.get_running_loop().create_future()
            self._next.add_done_callback(_consume)
        return self._next

    def _start(self, future: asyncio.Future[T] | None) -> asyncio.Future[T]:
        loop = asyncio.get_running_loop()
        if future is None:
            future = loop.create_future()
            future.add_done_callback(_consume)
        self._running = True
        task = loop.create_task(self._run(future))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return future

    async def _run(self, future: asyncio.Future[T]) -> None:
        try:
            answer = await self._ask()
        except asyncio.CancelledError:
            if not future.done():
                future.set_exception(NoWriter("the question was cancelled"))
            raise
        except Exception as exc:
            if not future.done():
                future.set_exception(exc)
        else:
            if not future.done():
                future.set_result(answer)
        finally:
            self._running = False
            waiting, self._next = self._next, None
            if waiting is not None and not waiting.done():
                self._start(waiting)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(BaseException):
                await task


def _consume(future: asyncio.Future[Any]) -> None:
    """Read a future's exception so that one nobody waits for any more is not reported as never retrieved."""
    if not future.cancelled():
        future.exception()


# --- the engines: a kept connection to the writer and the question asked on it ---

PG_POSITION_SQL = "SELECT (pg_current_wal_insert_lsn() - '0/0'::pg_lsn)::bigint"
PG_LAYOUT_SQL = ("SELECT current_setting('wal_block_size')::bigint,"
                 " (SELECT setting::bigint FROM pg_settings WHERE name = 'wal_segment_size')")
MARIADB_POSITION_SQL = "SELECT @@GLOBAL.gtid_binlog_pos"


def pg_replay_target(insert_lsn: int, block_size: int, segment_size: int) -> int:
    """The replay position a standby reaches once it has replayed everything written before `insert_lsn`.

    The writer's insert position names where the next record starts: at the very start of a WAL page that is just
    after the page header, while a standby's replay position is where the last record it replayed ends (the page
    boundary itself). Waiting for the header's end would wait for a record nobody may write soon.
    """
    offset = insert_lsn % block_size
    header = 40 if insert_lsn % segment_size == offset else 24  # long header on a segment's first page
    return insert_lsn - offset if offset == header else insert_lsn


class PostgresWriter:
    """A kept asyncpg connection to the writer, asking for its WAL insert position.

    The insert position (pg_current_wal_insert_lsn) covers every commit the writer acknowledged, with
    synchronous_commit off too (pg_current_wal_lsn, the write position, trails commits not written yet).
    """

    def __init__(self, user: str, password: str, database: str = "postgres", timeout: float = 5.0) -> None:
        self._user, self._password, self._database, self._timeout = user, password, database, timeout
        self._conn: asyncpg.Connection | None = None
        self._question: asyncpg.prepared_stmt.PreparedStatement | None = None  # one round trip per question
        self._address: Address | None = None
        self._layout = (8192, 16 << 20)

    async def position(self, address: Address) -> int:
        try:
            question = await self._prepared(address)
            value = await question.fetchval(timeout=self._timeout)
        except Exception as exc:
            await self.close()
            raise _unknown(exc, self._password) from None
        except BaseException:
            await self.close()
            raise
        return pg_replay_target(int(value), *self._layout)

    async def _prepared(self, address: Address) -> asyncpg.prepared_stmt.PreparedStatement:
        if self._conn is not None and (self._address != address or self._conn.is_closed()):
            await self.close()
        if self._conn is None or self._question is None:
            host, port = address
            conn = await asyncpg.connect(host=host, port=port, user=self._user, password=self._password,
                                         database=self._database, timeout=self._timeout, statement_cache_size=0)
            try:
                row = await conn.fetchrow(PG_LAYOUT_SQL, timeout=self._timeout)
                question = await conn.prepare(PG_POSITION_SQL, timeout=self._timeout)
            except BaseException:
                conn.terminate()
                raise
            assert row is not None
            self._layout = (int(row[0]), int(row[1]))
            self._conn, self._question, self._address = conn, question, address
        return self._question

    async def close(self) -> None:
        conn, self._conn, self._question = self._conn, None, None
        if conn is not None:
            conn.terminate()


class MariaDBWriter:
    """A kept aiomysql connection to the writer, asking for its binary log GTID position (the GTIDs of every
    transaction it committed: a commit is in the binary log before the client hears of it)."""

    def __init__(self, user: str, password: str, timeout: float = 5.0) -> None:
        self._user, self._password, self._timeout = user, password, timeout
        self._conn: aiomysql.Connection | None = None
        self._address: Address | None = None

    async def position(self, address: Address) -> str:
        if self._conn is not None and (self._address != address or self._conn.closed):
            await self.close()
        try:
            if self._conn is None:
                host, port = address
                self._conn = await aiomysql.connect(host=host, port=port, user=self._user, password=self._password,
                                                    connect_timeout=self._timeout, autocommit=True)
                self._address = address
            async with self._conn.cursor() as cur:
                await asyncio.wait_for(cur.execute(MARIADB_POSITION_SQL), self._timeout)
                row = await cur.fetchone()
        except Exception as exc:
            await self.close()
            raise _unknown(exc, self._password) from None
        except BaseException:
            await self.close()
            raise
        return str(row[0] or "") if row else ""

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()


Position = int | str  # PostgreSQL: an LSN as an integer; MariaDB: a GTID position ("0-1-42")


class WriterPosition:
    """The position of the cluster's current writer (the monitor's choice), asked single-flight."""

    def __init__(self, monitor: TopologyMonitor, writer: PostgresWriter | MariaDBWriter) -> None:
        self.monitor = monitor
        self._writer = writer
        self._flight: SingleFlight[Position] = SingleFlight(self._ask)

    async def _ask(self) -> Position:
        writer = self.monitor.writer()
        if writer is None:
            raise NoWriter("the cluster has no healthy writer")
        return await self._writer.position(writer.address)

    def after_now(self) -> asyncio.Future[Position]:
        """The writer's position, asked by a question started no earlier than now."""
        return self._flight.after_now()

    async def close(self) -> None:
        await self._flight.close()
        await self._writer.close()
