"""One serverless invocation (connect, log in, 1-3 queries, close) per engine, its outcome, and backend sampling."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import random
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiomysql
import asyncpg
import psycopg
import pymysql

POSTGRESQL = "postgresql"
MYSQL = "mysql"
ENGINES = (POSTGRESQL, MYSQL)


@dataclass(frozen=True)
class Address:
    """Where an invocation connects and who it logs in as; `password` may come from a token command."""

    engine: str
    host: str
    port: int
    user: str
    database: str
    tls: bool = False


@dataclass
class Outcome:
    """One invocation: seconds from the run's start, connect and query latencies, and what went wrong if anything."""

    start: float
    connected: float | None = None  # when the login finished
    end: float | None = None
    queries: list[float] = field(default_factory=list)  # seconds each query took
    error: str = ""  # the kind of failure (see classify); "" for a served invocation

    @property
    def ok(self) -> bool:
        return not self.error and self.end is not None

    @property
    def connect_latency(self) -> float | None:
        return None if self.connected is None else self.connected - self.start


def _client_tls() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False  # the proxy's certificate may be self-signed; the harness measures, not trusts
    context.verify_mode = ssl.CERT_NONE
    return context


def classify(exc: BaseException) -> str:
    """A short, stable name for the kind of failure (the report counts by it)."""
    if isinstance(exc, asyncpg.TooManyConnectionsError):
        return "too many connections (53300)"
    if isinstance(exc, asyncpg.PostgresError):
        state = getattr(exc, "sqlstate", "") or "?"
        if state.startswith("28"):
            return f"authentication ({state})"
        return f"server error {state}"
    if isinstance(exc, pymysql.err.MySQLError) and exc.args and isinstance(exc.args[0], int):
        code = exc.args[0]
        names = {1040: "too many connections (1040)", 1045: "authentication (1045)",
                 2003: "cannot connect (2003)", 2013: "connection lost (2013)"}
        return names.get(code, f"server error {code}")
    if isinstance(exc, TimeoutError | asyncio.TimeoutError):
        return "timeout"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, ConnectionError | asyncpg.exceptions.ConnectionDoesNotExistError | EOFError):
        return "connection lost"
    if isinstance(exc, OSError):
        return f"os error {exc.errno}"
    return type(exc).__name__


async def _pg_invocation(address: Address, password: str, queries: int, query_seconds: float,
                         timeout: float, outcome: Outcome, clock: Callable[[], float]) -> None:
    conn = await asyncpg.connect(host=address.host, port=address.port, user=address.user, password=password,
                                 database=address.database, timeout=timeout,
                                 ssl=_client_tls() if address.tls else False, statement_cache_size=0)
    outcome.connected = clock()
    try:
        for number in range(queries):
            began = time.perf_counter()
            if number == 0:
                await asyncio.wait_for(conn.fetchval("SELECT $1::int + 1", number), timeout)
            else:
                await asyncio.wait_for(conn.execute(f"SELECT pg_sleep({query_seconds})"), timeout)
            outcome.queries.append(time.perf_counter() - began)
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(conn.close(), timeout)


async def _mysql_invocation(address: Address, password: str, queries: int, query_seconds: float,
                            timeout: float, outcome: Outcome, clock: Callable[[], float]) -> None:
    conn = await asyncio.wait_for(
        aiomysql.connect(host=address.host, port=address.port, user=address.user, password=password,
                         db=address.database, connect_timeout=timeout, autocommit=True,
                         ssl=_client_tls() if address.tls else None),
        timeout)
    outcome.connected = clock()
    try:
        async with conn.cursor() as cursor:
            for number in range(queries):
                began = time.perf_counter()
                if number == 0:
                    await asyncio.wait_for(cursor.execute("SELECT %s + 1", (number,)), timeout)
                else:
                    await asyncio.wait_for(cursor.execute(f"SELECT SLEEP({query_seconds})"), timeout)
                await cursor.fetchall()
                outcome.queries.append(time.perf_counter() - began)
    finally:
        conn.close()


async def invoke(address: Address, password: str, rng: random.Random, query_seconds: float, timeout: float,
                 start: float, clock: Callable[[], float]) -> Outcome:
    """One function invocation: connect and log in, run one to three queries, close; never raises."""
    outcome = Outcome(start=start)
    queries = rng.randint(1, 3)
    run = _pg_invocation if address.engine == POSTGRESQL else _mysql_invocation
    try:
        await run(address, password, queries, query_seconds, timeout, outcome, clock)
        outcome.end = clock()
    except asyncio.CancelledError:
        outcome.error = "cancelled at the end of the run"
    except Exception as exc:
        outcome.error = classify(exc)
    return outcome


class BackendSampler:
    """Counts the database sessions of one user from a thread of its own (the invocations' event loop may be busy),
    over one connection opened before the load (a superuser's, so it holds a reserved slot while the invocations
    fill the others)."""

    def __init__(self, address: Address, password: str) -> None:
        self.address = address
        self.password = password
        self.conn: Any = None
        self.thread: threading.Thread | None = None
        self.stopping = threading.Event()

    def open(self) -> None:
        a = self.address
        if a.engine == POSTGRESQL:
            self.conn = psycopg.connect(host=a.host, port=a.port, user=a.user, password=self.password,
                                        dbname=a.database, connect_timeout=10, autocommit=True)
        else:
            self.conn = pymysql.connect(host=a.host, port=a.port, user=a.user, password=self.password,
                                        database=a.database, connect_timeout=10, autocommit=True)

    def count(self, user: str) -> int:
        with self.conn.cursor() as cursor:
            if self.address.engine == POSTGRESQL:
                cursor.execute("SELECT count(*) FROM pg_stat_activity WHERE usename = %s "
                               "AND backend_type = 'client backend'", (user,))
            else:
                cursor.execute("SELECT COUNT(*) FROM information_schema.processlist WHERE user = %s", (user,))
            row = cursor.fetchone()
            return int(row[0])

    def start(self, user: str, interval: float, into: list[tuple[float, int]], clock: Callable[[], float]) -> None:
        """Append (time, sessions) to `into` every `interval` seconds until stop()."""
        def loop() -> None:
            while not self.stopping.is_set():
                with contextlib.suppress(Exception):
                    into.append((clock(), self.count(user)))
                self.stopping.wait(interval)

        self.stopping.clear()
        self.thread = threading.Thread(target=loop, name="backend-sampler", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.stopping.set()
        if self.thread is not None:
            self.thread.join(5.0)
            self.thread = None

    def close(self) -> None:
        self.stop()
        if self.conn is not None:
            with contextlib.suppress(Exception):
                self.conn.close()
            self.conn = None


def cache_client_key_derivation() -> None:
    """Derive each (password, salt, iterations) SCRAM key once in this process.

    Every real serverless function runs its PBKDF2 (4096 rounds, about a millisecond) on its own CPU; a harness
    driving a thousand of them from one process would run them one after the other on one core and measure its
    own queue. asyncpg calls hashlib.pbkdf2_hmac at each login: the cache goes there.
    """
    if getattr(hashlib.pbkdf2_hmac, "cache_info", None) is not None:
        return
    hashlib.pbkdf2_hmac = functools.lru_cache(maxsize=64)(hashlib.pbkdf2_hmac)  # type: ignore[assignment]
