"""Pooling behaviour against a real server: cancel, borrow timeout, vanished clients, session mode, timeouts."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from pathlib import Path

import asyncpg
import psycopg
import pytest
from psycopg import errors

from devtools.servers import PostgresInstance
from support import ProxyProcess, backend_connections, running_proxy


def connect(proxy: ProxyProcess, user: str = "app", **extra: object) -> psycopg.Connection:
    return psycopg.connect(host="127.0.0.1", port=proxy.ports["postgresql"], user=user, password=f"{user}-secret",
                           dbname=user, sslmode="disable", autocommit=True, prepare_threshold=None, **extra)


def test_cancel_hits_only_that_clients_query(pg_proxy: ProxyProcess) -> None:
    with connect(pg_proxy) as victim, connect(pg_proxy) as bystander:
        outcome: dict[str, object] = {}

        def bystander_sleep() -> None:
            started = time.monotonic()
            bystander.execute("SELECT pg_sleep(1.5)")
            outcome["bystander"] = time.monotonic() - started

        thread = threading.Thread(target=bystander_sleep)
        thread.start()
        timer = threading.Timer(0.5, victim.cancel)
        timer.start()
        started = time.monotonic()
        with pytest.raises(errors.QueryCanceled):
            victim.execute("SELECT pg_sleep(20)")
        assert time.monotonic() - started < 5
        thread.join()
        assert 1.4 < float(outcome["bystander"]) < 5  # type: ignore[arg-type]
        assert victim.execute("SELECT 'still usable'").fetchone() == ("still usable",)
    pg_proxy.wait_for_log(r"cancel request for client \d+ sent to backend pid \d+")


async def test_asyncpg_timeout_cancels_the_query(pg_proxy: ProxyProcess) -> None:
    conn = await asyncpg.connect(host="127.0.0.1", port=pg_proxy.ports["postgresql"], user="app",
                                 password="app-secret", database="app", statement_cache_size=0, ssl=False)
    try:
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            await conn.fetchval("SELECT pg_sleep(20)", timeout=0.5)
        assert await conn.fetchval("SELECT 7") == 7
        assert time.monotonic() - started < 5
    finally:
        await conn.close()


def test_borrow_timeout_gives_a_clear_error(tmp_path: Path, pg_server: PostgresInstance) -> None:
    with running_proxy(tmp_path, pg_server, postgresql__pool={"max_connections": 1,
                                                             "connection_borrow_timeout": 1.0}) as proxy:
        with connect(proxy) as holder, connect(proxy) as waiter:
            holder.execute("BEGIN")
            holder.execute("SELECT 1")
            started = time.monotonic()
            with pytest.raises(psycopg.OperationalError) as info:
                waiter.execute("SELECT 1")
            assert 0.9 < time.monotonic() - started < 5
            assert info.value.sqlstate == "53300"
            assert "waiting for a backend connection" in str(info.value)
            holder.execute("COMMIT")
        proxy.wait_for_log(r"timed out after 1 s waiting for a backend")


def test_vanished_client_mid_transaction_is_rolled_back(tmp_path: Path, pg_server: PostgresInstance) -> None:
    with running_proxy(tmp_path, pg_server, postgresql__pool={"max_connections": 1}) as proxy:
        with connect(proxy) as setup:
            setup.execute("DROP TABLE IF EXISTS vanish; CREATE TABLE vanish(a int)")
        conn = connect(proxy)
        conn.execute("BEGIN")
        conn.execute("INSERT INTO vanish VALUES (1)")
        sock = socket.socket(fileno=conn.pgconn.socket)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        sock.close()  # RST: the client is gone without Terminate
        with connect(proxy) as other:  # the one backend must come back clean
            assert other.execute("SELECT count(*) FROM vanish").fetchone() == (0,)
            assert other.execute("SELECT 1").fetchone() == (1,)
        proxy.wait_for_log("left inside a transaction or session; cleaning")
        idle_in_tx = pg_server.psql("SELECT count(*) FROM pg_stat_activity WHERE state LIKE 'idle in transaction%'")
        assert idle_in_tx == "0"


def test_vanished_client_mid_query_drops_the_backend(tmp_path: Path, pg_server: PostgresInstance) -> None:
    with running_proxy(tmp_path, pg_server, postgresql__pool={"max_connections": 2}) as proxy:
        conn = connect(proxy, "bench")
        thread = threading.Thread(target=lambda: _swallow(conn, "SELECT pg_sleep(30)"))
        thread.start()
        time.sleep(0.5)
        sock = socket.socket(fileno=conn.pgconn.socket)
        sock.shutdown(socket.SHUT_RDWR)
        thread.join()
        with connect(proxy, "bench") as other:
            assert other.execute("SELECT 2").fetchone() == (2,)
        deadline = time.monotonic() + 10
        while "pg_sleep" in _bench_queries(pg_server) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "pg_sleep" not in _bench_queries(pg_server)  # cancelled, not left running for 30 s
        assert backend_connections(pg_server, "bench") <= 2
        proxy.wait_for_log("left while a query was running; cancelling it")


def _bench_queries(pg: PostgresInstance) -> str:
    return pg.psql("SELECT string_agg(query, ';') FROM pg_stat_activity WHERE usename = 'bench' AND state = 'active'")


def _swallow(conn: psycopg.Connection, sql: str) -> None:
    with contextlib.suppress(psycopg.Error):
        conn.execute(sql)


def test_session_mode_keeps_one_backend_and_resets_it(tmp_path: Path, pg_server: PostgresInstance) -> None:
    with running_proxy(tmp_path, pg_server, postgresql__pool={"mode": "session", "max_connections": 1}) as proxy:
        with connect(proxy) as first:
            pid = first.execute("SELECT pg_backend_pid()").fetchone()
            first.execute("SET work_mem = '7MB'")
            first.execute("PREPARE p AS SELECT 1")
            first.execute("LISTEN chan")
            first.execute("NOTIFY chan, 'payload'")
            assert [n.payload for n in first.notifies(timeout=1, stop_after=1)] == ["payload"]
            for _ in range(5):
                assert first.execute("SELECT pg_backend_pid()").fetchone() == pid
        with connect(proxy) as second:
            assert second.execute("SELECT pg_backend_pid()").fetchone() == pid  # reused...
            assert second.execute("SHOW work_mem").fetchone() == ("4MB",)  # ...after DISCARD ALL
            with pytest.raises(errors.InvalidSqlStatementName):
                second.execute("EXECUTE p")


def test_idle_client_timeout(tmp_path: Path, pg_server: PostgresInstance) -> None:
    with running_proxy(tmp_path, pg_server, server={"idle_client_timeout": 1.5}) as proxy:
        with connect(proxy) as conn:
            conn.execute("SELECT 1")
            time.sleep(4)
            with pytest.raises(psycopg.OperationalError):
                conn.execute("SELECT 1")
        proxy.wait_for_log(r"closing the connection after 1.5 s of inactivity")


def test_init_query_runs_on_each_new_backend(tmp_path: Path, pg_server: PostgresInstance) -> None:
    with running_proxy(tmp_path, pg_server, postgresql__pool={"init_query": "SET lock_timeout = '1234ms'"}) as proxy:
        with connect(proxy) as conn:
            assert conn.execute("SHOW lock_timeout").fetchone() == ("1234ms",)


def test_max_connection_lifetime_replaces_backends(tmp_path: Path, pg_server: PostgresInstance) -> None:
    with running_proxy(tmp_path, pg_server, postgresql__pool={"max_connection_lifetime": 1.0,
                                                             "max_connections": 1}) as proxy, connect(proxy) as conn:
        first = conn.execute("SELECT pg_backend_pid()").fetchone()
        time.sleep(2.5)
        conn.execute("SELECT 1")  # the old backend is retired on release or by the janitor
        second = conn.execute("SELECT pg_backend_pid()").fetchone()
        assert first != second


def test_max_connections_as_percent_of_server_limit(tmp_path: Path, pg_server: PostgresInstance) -> None:
    with running_proxy(tmp_path, pg_server, postgresql__pool={"max_connections": "10%"}) as proxy:
        with connect(proxy) as conn:
            conn.execute("SELECT 1")
        server_max = int(pg_server.psql("SHOW max_connections"))
        expected = (server_max - 3) * 10 // 100
        proxy.wait_for_log(rf"target postgresql: max {expected} backend connections")


def test_dead_backend_is_dropped_not_handed_out(tmp_path: Path, pg_server: PostgresInstance) -> None:
    with running_proxy(tmp_path, pg_server, postgresql__pool={"max_connections": 2}) as proxy:
        with connect(proxy) as conn:
            conn.execute("SELECT 1")
            pg_server.psql("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = 'app'")
            time.sleep(0.3)
            for _ in range(5):
                assert conn.execute("SELECT 5").fetchone() == (5,)


def test_max_idle_connections_trims_the_pool(tmp_path: Path, pg_server: PostgresInstance) -> None:
    with running_proxy(tmp_path, pg_server, postgresql__pool={"max_connections": 6,
                                                             "max_idle_connections": 2}) as proxy:
        conns = [connect(proxy, "bench") for _ in range(6)]
        try:
            for conn in conns:
                conn.execute("BEGIN")
                conn.execute("SELECT 1")
            assert backend_connections(pg_server, "bench") == 6
            for conn in conns:
                conn.execute("COMMIT")
            deadline = time.monotonic() + 8
            while backend_connections(pg_server, "bench") > 2 and time.monotonic() < deadline:
                time.sleep(0.2)
            assert backend_connections(pg_server, "bench") == 2
            assert conns[0].execute("SELECT 'still served'").fetchone() == ("still served",)
        finally:
            for conn in conns:
                conn.close()


def test_trust_backend(tmp_path: Path) -> None:
    from devtools.servers import start_postgres

    server = start_postgres(tmp_path / "pg", users={"app": "app-secret"}, auth="trust")
    try:
        with running_proxy(tmp_path / "proxy", server) as proxy, connect(proxy) as conn:
            assert conn.execute("SELECT current_user").fetchone() == ("app",)
    finally:
        server.stop()


async def test_query_after_an_unsynced_prepare_gives_the_backend_back(tmp_path: Path,
                                                                     pg_server: PostgresInstance) -> None:
    """asyncpg prepares with Parse + Describe + Flush (no Sync), and copy_records_to_table then sends its COPY as a
    simple Query: the server ends the extended-query batch there, so the one backend goes back to the pool at the
    Query's ReadyForQuery, not at the client's next Sync."""
    pg_server.psql("CREATE TABLE IF NOT EXISTS unsynced_copy (id int, who int)", user="app", db="app")
    with running_proxy(tmp_path, pg_server, postgresql__pool={"max_connections": 1,
                                                              "connection_borrow_timeout": 3.0}) as proxy:
        port = proxy.ports["postgresql"]
        first = await asyncpg.connect(host="127.0.0.1", port=port, user="app", password="app-secret",
                                      database="app", ssl=False)
        second = await asyncpg.connect(host="127.0.0.1", port=port, user="app", password="app-secret",
                                       database="app", ssl=False)
        try:
            await first.prepare("SELECT 1")
            await first.execute("SELECT 2")
            assert await second.fetchval("SELECT 3") == 3
            await first.copy_records_to_table("unsynced_copy", records=[(1, 7), (2, 7)], columns=["id", "who"])
            assert await second.fetchval("SELECT count(*) FROM unsynced_copy WHERE who = 7") >= 2
        finally:
            await first.close()
            await second.close()
