"""The query cache in Redis, shared by two proxy processes (of each engine): a result one stores the other serves,
and a write through either invalidates for both."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import psycopg
import pymysql
import pytest
import redis

from devtools.servers import MariaDBInstance, PostgresInstance
from support import ProxyProcess, metric_value, running_proxy, scrape

REDIS_URL = "redis://127.0.0.1:6379/0"


@pytest.fixture(scope="module")
def prefix() -> Iterator[str]:
    """A key prefix of this test run's own; its keys are deleted afterwards."""
    name = f"dbproxy-test:{uuid.uuid4().hex}:"
    yield name
    client = redis.Redis.from_url(REDIS_URL)
    keys = list(client.scan_iter(match=name + "*", count=1000))
    if keys:
        client.delete(*keys)
    client.close()


@pytest.fixture(scope="module")
def proxies(tmp_path_factory: pytest.TempPathFactory, pg_server: PostgresInstance,
            prefix: str) -> Iterator[tuple[ProxyProcess, ProxyProcess]]:
    with psycopg.connect(host="127.0.0.1", port=pg_server.port, user="app", password="app-secret",
                         dbname="app", autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS qcr_items")
        conn.execute("CREATE TABLE qcr_items (id int PRIMARY KEY, value int NOT NULL)")
        conn.execute("INSERT INTO qcr_items SELECT g, 0 FROM generate_series(1, 20) g")
    settings = {"enabled": True, "store": "redis", "redis_url": REDIS_URL, "redis_key_prefix": prefix,
                "rules": [{"regex": "FROM qcr_items", "ttl": 60.0}]}
    with ExitStack() as stack:
        first, second = (stack.enter_context(running_proxy(Path(tmp_path_factory.mktemp(f"proxy{n}")), pg_server,
                                                           query_cache=settings, server={"metrics_port": 0},
                                                           postgresql__pool={"max_connections": 3}))
                         for n in (1, 2))
        yield first, second


def connect(proxy: ProxyProcess) -> psycopg.Connection:
    return psycopg.connect(host="127.0.0.1", port=proxy.ports["postgresql"], user="app", password="app-secret",
                           dbname="app", autocommit=True, cursor_factory=psycopg.ClientCursor)


def hits(proxy: ProxyProcess) -> float:
    return metric_value(scrape(proxy), "dbproxy_query_cache_hits_total", endpoint="postgresql")


def test_one_proxy_serves_what_the_other_stored(proxies: tuple[ProxyProcess, ProxyProcess]) -> None:
    first, second = proxies
    query = "SELECT id, value FROM qcr_items WHERE id <= 2 ORDER BY id"
    before = hits(second)
    with connect(first) as one, connect(second) as two:
        assert one.execute(query).fetchall() == [(1, 0), (2, 0)]
        assert two.execute(query).fetchall() == [(1, 0), (2, 0)]
        assert hits(second) == before + 1
        one.execute("UPDATE qcr_items SET value = 5 WHERE id = 2")  # through the first: the second misses
        assert two.execute(query).fetchall() == [(1, 0), (2, 5)]
        assert one.execute(query).fetchall() == [(1, 0), (2, 5)]


def test_writes_through_either_invalidate_for_both(proxies: tuple[ProxyProcess, ProxyProcess]) -> None:
    """4 clients, each writing through one proxy and reading through both: 4,800 checks, no stale read."""
    stale: list[str] = []
    before = hits(proxies[0]) + hits(proxies[1])

    def client(row: int) -> None:
        writer_side, reader_side = proxies if row % 2 else proxies[::-1]
        with connect(writer_side) as writer, connect(reader_side) as reader:
            for value in range(1, 301):
                writer.execute(f"UPDATE qcr_items SET value = {value} WHERE id = {row}")
                for conn in (reader, reader, writer, writer):
                    got = conn.execute(f"SELECT value FROM qcr_items WHERE id = {row}").fetchone()
                    if got != (value,):
                        stale.append(f"row {row}: wrote {value}, read {got}")

    threads = [threading.Thread(target=client, args=(row,)) for row in range(10, 14)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert stale == []
    # (every write to the table invalidates every row's entry: hits come between two clients' writes)
    assert hits(proxies[0]) + hits(proxies[1]) - before >= 500


@pytest.fixture(scope="module")
def mysql_proxies(tmp_path_factory: pytest.TempPathFactory, mariadb_server: MariaDBInstance,
                  prefix: str) -> Iterator[tuple[ProxyProcess, ProxyProcess]]:
    conn = pymysql.connect(host="127.0.0.1", port=mariadb_server.port, user="app", password="app-secret",
                           database="app", autocommit=True)
    with conn.cursor() as cursor:
        cursor.execute("DROP TABLE IF EXISTS qcr_items")
        cursor.execute("CREATE TABLE qcr_items (id int PRIMARY KEY, value int NOT NULL)")
        cursor.execute("INSERT INTO qcr_items SELECT seq, 0 FROM seq_1_to_20")
    conn.close()
    settings = {"enabled": True, "store": "redis", "redis_url": REDIS_URL, "redis_key_prefix": prefix,
                "rules": [{"regex": "FROM qcr_items", "ttl": 60.0}]}
    with ExitStack() as stack:
        first, second = (stack.enter_context(running_proxy(Path(tmp_path_factory.mktemp(f"mysql{n}")),
                                                           mariadb=mariadb_server, query_cache=settings,
                                                           server={"metrics_port": 0},
                                                           mysql__pool={"max_connections": 3}))
                         for n in (1, 2))
        yield first, second


def test_mysql_proxies_share_results_and_invalidations(mysql_proxies: tuple[ProxyProcess, ProxyProcess]) -> None:
    """2 clients, each writing through one proxy and reading through both: 2,000 checks, no stale read."""
    stale: list[str] = []

    def read(conn: pymysql.Connection, row: int) -> object:
        with conn.cursor() as cursor:
            cursor.execute(f"SELECT value FROM qcr_items WHERE id = {row}")
            return cursor.fetchone()

    def client(row: int) -> None:
        writer_side, reader_side = mysql_proxies if row % 2 else mysql_proxies[::-1]
        connect = {"user": "app", "password": "app-secret", "database": "app", "autocommit": True,
                   "host": "127.0.0.1"}
        with (pymysql.connect(port=writer_side.ports["mysql"], **connect) as writer,  # type: ignore[arg-type]
              pymysql.connect(port=reader_side.ports["mysql"], **connect) as reader):  # type: ignore[arg-type]
            for value in range(1, 251):
                with writer.cursor() as cursor:
                    cursor.execute(f"UPDATE qcr_items SET value = {value} WHERE id = {row}")
                for conn in (reader, reader, writer, writer):
                    got = read(conn, row)
                    if got != (value,):
                        stale.append(f"row {row}: wrote {value}, read {got}")

    before = sum(metric_value(scrape(p), "dbproxy_query_cache_hits_total", endpoint="mysql") for p in mysql_proxies)
    threads = [threading.Thread(target=client, args=(row,)) for row in (10, 11)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert stale == []
    after = sum(metric_value(scrape(p), "dbproxy_query_cache_hits_total", endpoint="mysql") for p in mysql_proxies)
    assert after - before >= 200
