"""The query result cache on PostgreSQL, through real clients: hits, invalidation by writes, what never hits."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from devtools.servers import PostgresInstance
from support import ProxyProcess, metric_value, running_proxy, scrape

RULES = [{"endpoint": "postgresql", "regex": "FROM qc_(items|row)", "ttl": 60.0}]


def cache_proxy(folder: Path, pg: PostgresInstance, **cache: object) -> Iterator[ProxyProcess]:
    settings = {"enabled": True, "rules": RULES, "hints": True, **cache}
    return running_proxy(folder, pg, query_cache=settings, server={"metrics_port": 0},
                         postgresql__pool={"max_connections": 3})  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory, pg_server: PostgresInstance) -> Iterator[ProxyProcess]:
    with psycopg.connect(host="127.0.0.1", port=pg_server.port, user="app", password="app-secret",
                         dbname="app", autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS qc_items; DROP TABLE IF EXISTS qc_other; DROP SCHEMA IF EXISTS qc_s CASCADE")
        conn.execute("CREATE TABLE qc_items (id int PRIMARY KEY, value int NOT NULL)")
        conn.execute("INSERT INTO qc_items SELECT g, 0 FROM generate_series(1, 20) g")
        conn.execute("CREATE TABLE qc_other (id int)")
        for row in range(10, 16):  # one table per client of the read-after-write test
            conn.execute(f"DROP TABLE IF EXISTS qc_row{row}; CREATE TABLE qc_row{row} (id int, value int); "
                         f"INSERT INTO qc_row{row} VALUES ({row}, 0)")
        conn.execute("CREATE SCHEMA qc_s; CREATE TABLE qc_s.qc_items (id int, value int); "
                     "INSERT INTO qc_s.qc_items VALUES (1, 1000)")
    with cache_proxy(tmp_path_factory.mktemp("qcache"), pg_server) as running:
        yield running


def connect(proxy: ProxyProcess, **kwargs: object) -> psycopg.Connection:
    return psycopg.connect(host="127.0.0.1", port=proxy.ports["postgresql"], user="app", password="app-secret",
                           dbname="app", autocommit=True, cursor_factory=psycopg.ClientCursor, **kwargs)  # type: ignore[arg-type]


def counter(proxy: ProxyProcess, name: str) -> float:
    return metric_value(scrape(proxy), f"dbproxy_{name}_total", endpoint="postgresql")


def test_a_hit_returns_the_same_rows_and_types(proxy: ProxyProcess) -> None:
    query = "SELECT id, value, value::text AS t, NULL::int AS n FROM qc_items WHERE id <= 3 ORDER BY id"
    hits = counter(proxy, "query_cache_hits")
    with connect(proxy) as conn:
        first = conn.execute(query).fetchall()
        second = conn.execute(query).fetchall()
        cursor = conn.execute(query)
        third = cursor.fetchall()
        assert [d.name for d in cursor.description or []] == ["id", "value", "t", "n"]
        assert cursor.statusmessage == "SELECT 3"
    assert first == second == third == [(1, 0, "0", None), (2, 0, "0", None), (3, 0, "0", None)]
    assert counter(proxy, "query_cache_hits") >= hits + 2


def test_a_write_through_the_proxy_invalidates(proxy: ProxyProcess) -> None:
    query = "SELECT value FROM qc_items WHERE id = 5"
    with connect(proxy) as reader, connect(proxy) as writer:
        assert reader.execute(query).fetchone() == (0,)
        assert reader.execute(query).fetchone() == (0,)
        writer.execute("UPDATE qc_items SET value = 7 WHERE id = 5")
        assert reader.execute(query).fetchone() == (7,)
        with writer.transaction():  # a write in a transaction: invalidated again at its commit
            writer.execute("UPDATE qc_items SET value = 8 WHERE id = 5")
            assert reader.execute(query).fetchone() == (7,)
        assert reader.execute(query).fetchone() == (8,)
        writer.execute("UPDATE qc_items SET value = %s WHERE id = %s", (9, 5))  # extended protocol
        assert reader.execute(query).fetchone() == (9,)
        writer.execute("UPDATE qc_items SET value = 0 WHERE id = 5")
        assert reader.execute(query).fetchone() == (0,)


def test_reads_that_never_hit(proxy: ProxyProcess) -> None:
    hits = counter(proxy, "query_cache_hits")
    with connect(proxy) as conn:
        for _ in range(3):
            conn.execute("SELECT now(), count(*) FROM qc_items").fetchone()
            conn.execute("SELECT random(), count(*) FROM qc_items").fetchone()
            conn.execute("SELECT current_user, count(*) FROM qc_items").fetchone()
            with conn.transaction():
                conn.execute("SELECT count(*) FROM qc_items WHERE id < 4").fetchone()
    assert counter(proxy, "query_cache_hits") == hits


def test_session_state_is_part_of_the_key(proxy: ProxyProcess) -> None:
    query = "SELECT value FROM qc_items WHERE id = 1"
    with connect(proxy) as conn:
        assert conn.execute(query).fetchone() == (0,)
        assert conn.execute(query).fetchone() == (0,)
        conn.execute("SET search_path = qc_s, public")
        assert conn.execute(query).fetchone() == (1000,)
        assert conn.execute(query).fetchone() == (1000,)
        conn.execute("RESET search_path")
        assert conn.execute(query).fetchone() == (0,)
    with connect(proxy, options="-c search_path=qc_s") as other:
        assert other.execute(query).fetchone() == (1000,)


def test_a_hint_caches_a_statement_no_rule_names(proxy: ProxyProcess) -> None:
    query = "SELECT count(*) FROM qc_other /* dbproxy:cache ttl=30 */"
    hits = counter(proxy, "query_cache_hits")
    with connect(proxy) as conn:
        assert conn.execute(query).fetchone() == (0,)
        assert conn.execute(query).fetchone() == (0,)
        assert counter(proxy, "query_cache_hits") == hits + 1
        conn.execute("INSERT INTO qc_other VALUES (1)")
        assert conn.execute(query).fetchone() == (1,)
        conn.execute("TRUNCATE qc_other")
        assert conn.execute(query).fetchone() == (0,)


def test_no_stale_read_after_a_write_many_clients(proxy: ProxyProcess) -> None:
    """10,000 read-after-write checks by 6 clients at once over 3 backends: every read sees the last write (each
    client its own table, so that the second read of each value is a hit)."""
    stale: list[str] = []
    checks = [0]
    hits = counter(proxy, "query_cache_hits")
    lock = threading.Lock()

    def client(row: int) -> None:
        with connect(proxy) as conn:
            for value in range(1, 834):
                conn.execute(f"UPDATE qc_row{row} SET value = {value} WHERE id = {row}")
                for _ in range(2):
                    got = conn.execute(f"SELECT value FROM qc_row{row} WHERE id = {row}").fetchone()
                    if got != (value,):
                        stale.append(f"row {row}: wrote {value}, read {got}")
                with lock:
                    checks[0] += 2

    threads = [threading.Thread(target=client, args=(row,)) for row in range(10, 16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert checks[0] >= 9996
    assert stale == []
    assert counter(proxy, "query_cache_hits") - hits >= 4000  # (the second read of each value is a hit)


def test_readers_never_see_a_value_older_than_a_finished_write(proxy: ProxyProcess) -> None:
    """A writer bumps a value 300 times; 4 readers (other clients, sharing 3 backends with it) never read a value
    older than the last write that had finished when their read began."""
    acknowledged = [0]
    done = threading.Event()
    stale: list[str] = []
    reads = [0]

    def writer() -> None:
        with connect(proxy) as conn:
            conn.execute("UPDATE qc_items SET value = 0 WHERE id = 20")
            for value in range(1, 301):
                conn.execute(f"UPDATE qc_items SET value = {value} WHERE id = 20")
                acknowledged[0] = value
        done.set()

    def reader() -> None:
        with connect(proxy) as conn:
            while not done.is_set():
                floor = acknowledged[0]
                row = conn.execute("SELECT value FROM qc_items WHERE id = 20").fetchone()
                reads[0] += 1
                if row is None or row[0] < floor:
                    stale.append(f"read {row} after {floor} was written")

    threads = [threading.Thread(target=writer)] + [threading.Thread(target=reader) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert reads[0] > 300
    assert stale == []


def test_extended_protocol_batches_hit_and_are_invalidated(proxy: ProxyProcess) -> None:
    """psycopg's parameterized queries (Parse/Bind/Describe/Execute/Sync, unnamed): a hit per parameter value."""
    query = "SELECT id, value FROM qc_items WHERE id = %s"
    hits = counter(proxy, "query_cache_hits")
    with psycopg.connect(host="127.0.0.1", port=proxy.ports["postgresql"], user="app", password="app-secret",
                         dbname="app", autocommit=True, prepare_threshold=None) as conn:
        assert conn.execute(query, (3,)).fetchall() == [(3, 0)]
        assert conn.execute(query, (3,)).fetchall() == [(3, 0)]
        assert conn.execute(query, (4,)).fetchall() == [(4, 0)]  # another value: another key
        assert conn.execute(query, (4,), binary=True).fetchall() == [(4, 0)]  # binary results: another key
        assert conn.execute(query, (4,), binary=True).fetchall() == [(4, 0)]
        assert counter(proxy, "query_cache_hits") == hits + 2
        conn.execute("UPDATE qc_items SET value = %s WHERE id = %s", (6, 3))
        assert conn.execute(query, (3,)).fetchall() == [(3, 6)]
        conn.execute("UPDATE qc_items SET value = 0 WHERE id = 3")
        assert conn.execute(query, (3,)).fetchall() == [(3, 0)]
        cursor = conn.cursor()
        assert cursor.execute(query, (3,)).fetchall() == [(3, 0)]  # a hit, then the session goes on
        assert conn.execute("SELECT %s::int + 1", (1,)).fetchone() == (2,)


def test_a_temporary_table_of_the_same_name_is_never_answered_from_the_cache(proxy: ProxyProcess) -> None:
    query = "SELECT count(*) FROM qc_items"
    with connect(proxy) as shared, connect(proxy) as temporary:
        assert shared.execute(query).fetchone() == (20,)
        assert shared.execute(query).fetchone() == (20,)
        temporary.execute("CREATE TEMP TABLE qc_items (id int)")  # pins the session: its names are its own
        assert temporary.execute(query).fetchone() == (0,)
        assert temporary.execute(query).fetchone() == (0,)
        assert shared.execute(query).fetchone() == (20,)


def test_asyncpg_prepared_writes_invalidate(proxy: ProxyProcess) -> None:
    """asyncpg prepares its statements once (named) and executes them again and again: each execution (its Bind)
    invalidates what read the table, simple or extended reads alike."""
    import asyncio

    import asyncpg

    query = "SELECT value FROM qc_items WHERE id = 7"

    async def writes(reader: psycopg.Connection) -> None:
        conn = await asyncpg.connect(host="127.0.0.1", port=proxy.ports["postgresql"], user="app",
                                     password="app-secret", database="app", statement_cache_size=100)
        try:
            update = await conn.prepare("UPDATE qc_items SET value = $1 WHERE id = 7")
            for value in range(1, 31):
                await update.fetch(value)
                assert reader.execute(query).fetchone() == (value,)
                assert reader.execute(query).fetchone() == (value,)
                assert reader.execute("SELECT value FROM qc_items WHERE id = %s", (7,)).fetchone() == (value,)
            await conn.execute("UPDATE qc_items SET value = 0 WHERE id = 7")
        finally:
            await conn.close()

    hits = counter(proxy, "query_cache_hits")
    with connect(proxy) as reader:
        asyncio.run(writes(reader))
    assert counter(proxy, "query_cache_hits") >= hits + 30


def test_psql_sees_the_same_output_from_the_cache(proxy: ProxyProcess) -> None:
    import os
    import subprocess

    hits = counter(proxy, "query_cache_hits")
    command = ["psql", "-h", "127.0.0.1", "-p", str(proxy.ports["postgresql"]), "-U", "app", "-d", "app", "-X",
               "-c", "SELECT id, value, id * 1.5 AS x FROM qc_items WHERE id BETWEEN 2 AND 4 ORDER BY id"]
    outputs = [subprocess.run(command, env=dict(os.environ, PGPASSWORD="app-secret"), capture_output=True,
                              text=True, check=True, timeout=30).stdout for _ in range(2)]
    assert outputs[0] == outputs[1] and "(3 rows)" in outputs[0]
    assert counter(proxy, "query_cache_hits") == hits + 1
