"""Several worker processes: one budget of backend connections, cancels routed to the owner, merged metrics."""

from __future__ import annotations

import asyncio
import re
import threading
import time
import urllib.request
from pathlib import Path

import asyncpg
import psycopg
import pymysql
import pytest
from psycopg import errors

from proxy.devservers import MariaDBInstance, PostgresInstance
from support import ProxyProcess, backend_connections, metric_value, running_proxy


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory: pytest.TempPathFactory, pg_server: PostgresInstance) -> ProxyProcess:
    with running_proxy(tmp_path_factory.mktemp("workers"), pg_server, server={"workers": 2, "metrics_port": 0},
                       postgresql__pool={"max_connections": 4}) as proxy:
        yield proxy  # type: ignore[misc]


async def test_clients_spread_over_workers_within_one_budget(two_workers: ProxyProcess,
                                                            pg_server: PostgresInstance) -> None:
    port = two_workers.ports["postgresql"]
    peak = 0

    async def client(n: int) -> int:
        nonlocal peak
        conn = await asyncpg.connect(host="127.0.0.1", port=port, user="bench", password="bench-secret",
                                     database="bench", ssl=False)
        try:
            value = 0
            for _ in range(5):
                value = await conn.fetchval("SELECT $1::int FROM pg_sleep(0.002)", n)
            peak = max(peak, backend_connections(pg_server, "bench"))
            return int(value)
        finally:
            await conn.close()

    assert await asyncio.gather(*(client(n) for n in range(120))) == list(range(120))
    assert 0 < peak <= 4
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{two_workers.ports['metrics']}/metrics").read().decode()
    assert metric_value(metrics, "dbproxy_client_connections_received_total") >= 120
    assert len(re.findall(r"this worker's share of 4", two_workers.log())) == 2


def test_cancel_reaches_the_worker_that_owns_the_client(two_workers: ProxyProcess) -> None:
    port = two_workers.ports["postgresql"]
    for _ in range(12):  # a cancel lands on either worker; with 12 tries both routes are taken
        with psycopg.connect(host="127.0.0.1", port=port, user="app", password="app-secret", dbname="app",
                             sslmode="disable", autocommit=True) as conn:
            timer = threading.Timer(0.3, conn.cancel)
            timer.start()
            started = time.monotonic()
            with pytest.raises(errors.QueryCanceled):
                conn.execute("SELECT pg_sleep(10)")
            assert time.monotonic() - started < 5
    two_workers.wait_for_log("passed to worker")


def test_config_workers_zero_means_one_per_core(tmp_path: Path) -> None:
    from proxy.config import parse_config

    assert parse_config({}).server.workers == 0


def test_kill_query_reaches_the_worker_that_owns_the_client(tmp_path: Path, mariadb_server: MariaDBInstance) -> None:
    with running_proxy(tmp_path, mariadb=mariadb_server, server={"workers": 2}) as proxy:
        port = proxy.ports["mysql"]

        def connect() -> pymysql.Connection:
            return pymysql.connect(host="127.0.0.1", port=port, user="app", password="app-secret", database="app")

        with connect() as killer:
            for _ in range(8):  # victims land on either worker; the killer on one of them
                with connect() as victim:
                    outcome: list[object] = []
                    thread = threading.Thread(target=lambda v=victim, out=outcome: out.append(_sleep(v)))
                    started = time.monotonic()
                    thread.start()
                    time.sleep(0.4)
                    with killer.cursor() as cursor:
                        cursor.execute(f"KILL QUERY {victim.thread_id()}")
                    thread.join()
                    assert time.monotonic() - started < 4
                    assert outcome == [1] or outcome == ["interrupted"], outcome


def _sleep(conn: pymysql.Connection) -> object:
    try:
        with conn.cursor() as cursor:
            cursor.execute("SELECT SLEEP(10)")
            return cursor.fetchone()[0]  # type: ignore[index]
    except pymysql.err.OperationalError as exc:
        return "interrupted" if exc.args[0] in (1317, 1028) else exc
