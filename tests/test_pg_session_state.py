"""Session state without pinning (PostgreSQL): named prepared statements and settings follow each client."""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
import urllib.request
from pathlib import Path

import asyncpg
import psycopg
import pytest
from psycopg import errors

from devtools.servers import PostgresInstance
from support import ProxyProcess, backend_connections, metric_value, running_proxy

ENV = dict(os.environ, PGPASSWORD="app-secret", PGSSLMODE="disable")


def connect(proxy: ProxyProcess, **extra: object) -> psycopg.Connection:
    return psycopg.connect(host="127.0.0.1", port=proxy.ports["postgresql"], user="app", password="app-secret",
                           dbname="app", sslmode="disable", autocommit=True, **extra)


@pytest.fixture
def small_pool(tmp_path: Path, pg_server: PostgresInstance) -> ProxyProcess:
    with running_proxy(tmp_path, pg_server, postgresql__pool={"max_connections": 3,
                                                             "max_prepared_statements": 8}) as proxy:
        yield proxy  # type: ignore[misc]


async def test_asyncpg_default_statement_cache(small_pool: ProxyProcess, pg_server: PostgresInstance) -> None:
    port = small_pool.ports["postgresql"]

    async def client(n: int) -> list[int]:
        conn = await asyncpg.connect(host="127.0.0.1", port=port, user="app", password="app-secret",
                                     database="app", ssl=False)  # default statement_cache_size=100
        try:
            out = []
            for i in range(20):
                # 12 distinct statements per client: more than the per-backend cap of 8
                out.append(await conn.fetchval(f"SELECT $1::int + {i % 12}", n))
                async with conn.transaction():
                    out.append(await conn.fetchval("SELECT $1::int * 2", i))
            stmt = await conn.prepare("SELECT $1::text || '!'")
            out.append(len(await stmt.fetchval("x")))
            return out
        finally:
            await conn.close()

    results = await asyncio.gather(*(client(n) for n in range(12)))
    for n, values in enumerate(results):
        expected = []
        for i in range(20):
            expected += [n + i % 12, i * 2]
        assert values == [*expected, 2]
    assert backend_connections(pg_server) <= 3 + 10  # the module proxy may hold its own
    count = pg_server.psql("SELECT count(*) FROM pg_prepared_statements")  # the superuser's own session: 0
    assert count == "0"
    assert "pinned" not in small_pool.log()


def test_psycopg_prepare_threshold_zero(small_pool: ProxyProcess) -> None:
    conns = [connect(small_pool, prepare_threshold=0) for _ in range(6)]
    try:
        for round_ in range(10):
            for n, conn in enumerate(conns):
                assert conn.execute("SELECT %s::int + %s::int", (n, round_)).fetchone() == (n + round_,)
                with conn.transaction():
                    assert conn.execute("SELECT %s::text", (f"c{n}",)).fetchone() == (f"c{n}",)
        conns[0].execute("DEALLOCATE ALL")
        assert conns[0].execute("SELECT %s::int", (5,)).fetchone() == (5,)
        with pytest.raises(errors.UndefinedTable):
            conns[1].execute("SELECT * FROM no_such_table WHERE a = %s", (1,))
        assert conns[1].execute("SELECT %s::int", (6,)).fetchone() == (6,)
    finally:
        for conn in conns:
            conn.close()
    assert "pinned" not in small_pool.log()


def test_pgbench_prepared(small_pool: ProxyProcess, pg_bench_tables: PostgresInstance) -> None:
    result = subprocess.run(
        ["pgbench", "-n", "-h", "127.0.0.1", "-p", str(small_pool.ports["postgresql"]), "-U", "app", "-M",
         "prepared", "-S", "-c", "12", "-j", "2", "-t", "200", "app"],
        env=ENV, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "number of transactions actually processed: 2400/2400" in result.stdout
    assert "number of failed transactions: 0" in result.stdout
    assert "pinned" not in small_pool.log()


def test_settings_follow_the_client_and_never_leak(tmp_path: Path, pg_server: PostgresInstance) -> None:
    with running_proxy(tmp_path, pg_server, postgresql__pool={"max_connections": 1}) as proxy:
        a = connect(proxy, prepare_threshold=None)
        b = connect(proxy, prepare_threshold=None)
        with a, b:
            a.execute("CREATE SCHEMA IF NOT EXISTS app_a; CREATE TABLE IF NOT EXISTS app_a.t(v text)")
            a.execute("SET search_path = app_a, public")
            a.execute("SET statement_timeout = '4s'")
            a.execute("SET TimeZone = 'Pacific/Auckland'")
            a.execute("SELECT set_config('work_mem', '9MB', false)")
            a.execute("BEGIN; SET LOCAL lock_timeout = '7s'; COMMIT")
            for _ in range(3):  # b runs right after a on the only backend
                assert b.execute("SHOW search_path").fetchone() == ('"$user", public',)
                assert b.execute("SHOW statement_timeout").fetchone() == ("0",)
                assert b.execute("SHOW TimeZone").fetchone() != ("Pacific/Auckland",)
                assert b.execute("SHOW work_mem").fetchone() == ("4MB",)
                assert a.execute("SHOW search_path").fetchone() == ("app_a, public",)
                assert a.execute("SHOW statement_timeout").fetchone() == ("4s",)
                assert a.execute("SHOW TimeZone").fetchone() == ("Pacific/Auckland",)
                assert a.execute("SHOW work_mem").fetchone() == ("9MB",)
                assert a.execute("SHOW lock_timeout").fetchone() == ("0",)
                a.execute("INSERT INTO t VALUES ('found via search_path')")
            with pytest.raises(errors.QueryCanceled):
                a.execute("SELECT pg_sleep(10)")  # a's statement_timeout holds on the shared backend
            a.execute("RESET statement_timeout")
            a.execute("BEGIN; SET search_path = nowhere; ROLLBACK")  # rolled back: not kept
            assert a.execute("SHOW search_path").fetchone() == ("app_a, public",)
            assert a.execute("SHOW statement_timeout").fetchone() == ("0",)
            assert a.info.parameter_status("TimeZone") == "Pacific/Auckland"
            assert b.info.parameter_status("TimeZone") != "Pacific/Auckland"
        assert "pinned" not in proxy.log()


def test_listen_and_temp_tables_pin_then_unpin(tmp_path: Path, pg_server: PostgresInstance) -> None:
    with running_proxy(tmp_path, pg_server, server={"metrics_port": 0},
                       postgresql__pool={"max_connections": 2, "connection_borrow_timeout": 3.0}) as proxy:
        with connect(proxy, prepare_threshold=None) as listener, connect(proxy, prepare_threshold=None) as other:
            listener.execute("LISTEN news")
            proxy.wait_for_log("pinned to backend .*: LISTEN")
            pid = listener.execute("SELECT pg_backend_pid()").fetchone()
            for _ in range(5):
                other.execute("SELECT 1")
                assert listener.execute("SELECT pg_backend_pid()").fetchone() == pid
            other.execute("NOTIFY news, 'hello'")
            assert [n.payload for n in listener.notifies(timeout=2, stop_after=1)] == ["hello"]
            listener.execute("UNLISTEN *")
            proxy.wait_for_log("unpinned")
            listener.execute("CREATE TEMP TABLE scratch(a int)")
            proxy.wait_for_log("pinned to backend .*: temporary table")
            listener.execute("INSERT INTO scratch VALUES (1)")
            for _ in range(5):
                other.execute("SELECT 1")
                assert listener.execute("SELECT count(*) FROM scratch").fetchone() == (1,)
            listener.execute("DISCARD TEMP")
            deadline = time.monotonic() + 5
            while proxy.log().count("unpinned") < 2 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert proxy.log().count("unpinned") == 2
            other.execute("BEGIN")  # holds one of the two backends
            other.execute("SELECT 1")
            with connect(proxy, prepare_threshold=None) as third:  # gets the other only if listener let go
                assert third.execute("SELECT 3").fetchone() == (3,)
            other.execute("COMMIT")
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{proxy.ports['metrics']}/metrics").read().decode()
        assert metric_value(metrics, "dbproxy_session_pins_total", reason="LISTEN") == 1
        assert metric_value(metrics, "dbproxy_session_pins_total", reason="temporary table") == 1
        assert metric_value(metrics, "dbproxy_database_connections_currently_session_pinned") == 0
        assert metric_value(metrics, "dbproxy_database_connections", database="app", engine="postgresql",
                            user="app") == 2


def test_pinning_filter_exclude_variable_sets(tmp_path: Path, pg_server: PostgresInstance) -> None:
    """With the filter, SETs are not tracked: the documented risk is real, and no read-back happens."""
    with running_proxy(tmp_path, pg_server, postgresql={"session_pinning_filters": ["exclude_variable_sets"]},
                       postgresql__pool={"max_connections": 1}) as proxy:
        with connect(proxy, prepare_threshold=None) as a, connect(proxy, prepare_threshold=None) as b:
            a.execute("SET work_mem = '9MB'")
            assert b.execute("SHOW work_mem").fetchone() == ("9MB",)  # leaked, as documented


@pytest.mark.parametrize(("start", "use", "stop", "reason"), [
    ("PREPARE q AS SELECT 41 + 1", "EXECUTE q", "DEALLOCATE q", "SQL PREPARE"),
    ("SELECT pg_advisory_lock(4242)", "SELECT 1", "SELECT pg_advisory_unlock_all()", "session advisory lock"),
    ("BEGIN; DECLARE c CURSOR WITH HOLD FOR SELECT generate_series(1, 3); COMMIT", "FETCH 1 FROM c", "CLOSE c",
     "cursor WITH HOLD"),
])
def test_other_session_state_pins_until_released(tmp_path: Path, pg_server: PostgresInstance, start: str, use: str,
                                                 stop: str, reason: str) -> None:
    with running_proxy(tmp_path, pg_server, postgresql__pool={"max_connections": 2}) as proxy, \
            connect(proxy, prepare_threshold=None) as holder, connect(proxy, prepare_threshold=None) as other:
        holder.execute(start)
        proxy.wait_for_log(f"pinned to backend .*: {reason}")
        pid = holder.execute("SELECT pg_backend_pid()").fetchone()
        for _ in range(3):
            other.execute("SELECT 1")
            assert holder.execute(use).fetchone() is not None
            assert holder.execute("SELECT pg_backend_pid()").fetchone() == pid
        holder.execute(stop)
        proxy.wait_for_log("unpinned")
