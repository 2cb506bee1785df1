"""Re-pointing, pausing and resizing the PostgreSQL target under load (two real servers, asyncpg and psycopg)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import pytest

from devtools.servers import PostgresInstance, free_port, start_postgres
from inprocess import Load, check_pause_and_resize, proxy_in_process, wait_until
from support import backend_connections

SCHEMA = "CREATE TABLE IF NOT EXISTS moves (id bigserial PRIMARY KEY, port int NOT NULL, client text NOT NULL)"
CLIENTS = 4  # of each library; the pool has fewer backends than clients
INSERT = "INSERT INTO moves (port, client) VALUES (inet_server_port(), {}) RETURNING port"


@pytest.fixture(scope="module")
def second_pg(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostgresInstance]:
    """A second PostgreSQL with the same roles and schema as pg_server: where the target moves to."""
    server = start_postgres(tmp_path_factory.mktemp("pg2"), users={"app": "app-secret", "bench": "bench-secret"},
                            auth="scram-sha-256")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def servers(pg_server: PostgresInstance, second_pg: PostgresInstance) -> tuple[PostgresInstance, PostgresInstance]:
    for server in (pg_server, second_pg):
        server.psql(SCHEMA, user="app", db="app")
    return pg_server, second_pg


def proxy_sections(backend: PostgresInstance, **pool: Any) -> dict[str, dict[str, Any]]:
    return {
        "server": {"log_level": "info", "workers": 1},
        "secrets": {"file": "secrets.toml"},
        "postgresql": {"port": free_port(), "backend_port": backend.port},
        "postgresql.pool": {"max_connections": 3, "connection_borrow_timeout": 30.0, **pool},
        "mysql": {"enabled": False},
    }


def run_psycopg(load: Load, name: str) -> None:
    try:
        with psycopg.connect(host="127.0.0.1", port=load.port, user="app", password="app-secret", dbname="app",
                             autocommit=True) as conn:
            conn.execute("SET statement_timeout = '12345ms'")
            while not load.stop.is_set():
                started = time.monotonic()
                with conn.transaction():
                    row = conn.execute(INSERT.format("%s"), (name,)).fetchone()
                    setting = conn.execute("SHOW statement_timeout").fetchone()
                assert row is not None and setting is not None
                if setting[0] != "12345ms":
                    load.errors.append(f"{name}: statement_timeout is {setting[0]}")
                load.record(name, started, int(row[0]))
    except Exception as exc:
        load.errors.append(f"{name}: {exc!r}")


async def run_asyncpg(load: Load, name: str) -> None:
    try:
        conn = await asyncpg.connect(host="127.0.0.1", port=load.port, user="app", password="app-secret",
                                     database="app", server_settings={"application_name": name})
        try:
            while not load.stop.is_set():
                started = time.monotonic()
                async with conn.transaction():
                    port = await conn.fetchval(INSERT.format("$1"), name)  # prepared once, asyncpg's cache
                    application = await conn.fetchval("SELECT current_setting('application_name')")
                if application != name:
                    load.errors.append(f"{name}: application_name is {application}")
                load.record(name, started, port)
        finally:
            await conn.close()
    except Exception as exc:
        load.errors.append(f"{name}: {exc!r}")


def start_load(port: int) -> Load:
    load = Load(port, 2 * CLIENTS)

    def asyncpg_clients() -> None:
        async def main() -> None:
            await asyncio.gather(*(run_asyncpg(load, f"asyncpg{i}") for i in range(CLIENTS)))

        asyncio.run(main())

    load.threads.append(threading.Thread(target=asyncpg_clients))
    load.threads.extend(threading.Thread(target=run_psycopg, args=(load, f"psycopg{i}")) for i in range(CLIENTS))
    return load.start()


def rows(server: PostgresInstance) -> int:
    return int(server.psql("SELECT count(*) FROM moves", user="app", db="app"))


def test_repoint_under_load_moves_every_client_without_an_error(
    tmp_path: Path, servers: tuple[PostgresInstance, PostgresInstance]
) -> None:
    old, new = servers
    with proxy_in_process(tmp_path, proxy_sections(old)) as proxy:
        target = proxy.server.postgres.target
        load = start_load(proxy.ports["postgresql"])
        try:
            load.wait_all(lambda r: len(r) >= 5)
            proxy.call(target.repoint, new.host, new.port)
            moved_at = time.monotonic()
            load.wait_all(lambda r: sum(1 for started, _ in r if started > moved_at) >= 5)
            wait_until(lambda: backend_connections(old) == 0)  # the old server's backends closed once given back
            rows_on_old = rows(old)
            load.wait_all(lambda r: sum(1 for started, _ in r if started > moved_at) >= 10)
        finally:
            load.finish()
        assert rows(old) == rows_on_old  # the old server saw no transaction after the move
        for client, records in load.records.items():
            after = {port for started, port in records if started > moved_at}
            assert after == {new.port}, client
            assert {port for _, port in records[:5]} == {old.port}, client
        assert proxy.call(lambda: target.generation) == 1


def test_pause_holds_transactions_and_resize_follows(
    tmp_path: Path, servers: tuple[PostgresInstance, PostgresInstance]
) -> None:
    _, server = servers
    with proxy_in_process(tmp_path, proxy_sections(server, max_connections=4)) as proxy:
        target = proxy.server.postgres.target
        load = start_load(proxy.ports["postgresql"])
        try:
            check_pause_and_resize(proxy, target, load, lambda: backend_connections(server))
        finally:
            load.finish()


def test_a_paused_borrow_ends_with_the_borrow_timeout_error(
    tmp_path: Path, servers: tuple[PostgresInstance, PostgresInstance]
) -> None:
    _, server = servers
    with proxy_in_process(tmp_path, proxy_sections(server, connection_borrow_timeout=1.0)) as proxy:
        target = proxy.server.postgres.target
        port = proxy.ports["postgresql"]
        with psycopg.connect(host="127.0.0.1", port=port, user="app", password="app-secret", dbname="app",
                             autocommit=True) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
            proxy.call(target.pause)
            with pytest.raises(psycopg.OperationalError, match="timed out after 1 s waiting for a backend"):
                conn.execute("SELECT 1")
            proxy.call(target.resume)
        with psycopg.connect(host="127.0.0.1", port=port, user="app", password="app-secret", dbname="app") as conn:
            assert conn.execute("SELECT 2").fetchone() == (2,)


def test_cancel_after_a_repoint_reaches_the_server_running_the_query(
    tmp_path: Path, servers: tuple[PostgresInstance, PostgresInstance]
) -> None:
    old, new = servers
    with proxy_in_process(tmp_path, proxy_sections(old)) as proxy:
        target = proxy.server.postgres.target
        with psycopg.connect(host="127.0.0.1", port=proxy.ports["postgresql"], user="app", password="app-secret",
                             dbname="app") as conn:
            assert conn.execute("SELECT inet_server_port()").fetchone() == (old.port,)  # a transaction opens
            proxy.call(target.repoint, new.host, new.port)
            outcome: list[BaseException] = []

            def sleep() -> None:
                try:
                    conn.execute("SELECT pg_sleep(60)")
                except BaseException as exc:
                    outcome.append(exc)

            thread = threading.Thread(target=sleep)
            thread.start()
            wait_until(lambda: old.psql("SELECT count(*) FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(60)'"
                                        " AND state = 'active'") == "1")
            conn.cancel_safe()
            thread.join(60)
            assert len(outcome) == 1 and isinstance(outcome[0], psycopg.errors.QueryCanceled)
            conn.rollback()
            assert conn.execute("SELECT inet_server_port()").fetchone() == (new.port,)


def test_a_pinned_client_keeps_its_backend_until_it_lets_go(
    tmp_path: Path, servers: tuple[PostgresInstance, PostgresInstance]
) -> None:
    old, new = servers
    with proxy_in_process(tmp_path, proxy_sections(old)) as proxy:
        target = proxy.server.postgres.target
        with psycopg.connect(host="127.0.0.1", port=proxy.ports["postgresql"], user="app", password="app-secret",
                             dbname="app", autocommit=True) as conn:
            conn.execute("CREATE TEMP TABLE pinned (x int)")  # a temporary table pins the client to its backend
            proxy.call(target.repoint, new.host, new.port)
            assert conn.execute("SELECT inet_server_port()").fetchone() == (old.port,)
            assert conn.execute("SELECT count(*) FROM pinned").fetchone() == (0,)
            conn.execute("DISCARD TEMP")  # the pin is gone: the backend is given back, and closed
            assert conn.execute("SELECT inet_server_port()").fetchone() == (new.port,)
            wait_until(lambda: backend_connections(old) == 0)


@pytest.mark.parametrize("mode", ["prepared", "extended"])
def test_pgbench_keeps_running_across_a_repoint(
    tmp_path: Path, servers: tuple[PostgresInstance, PostgresInstance], mode: str
) -> None:
    old, new = servers
    env = dict(os.environ, PGPASSWORD="app-secret")
    for server in servers:
        subprocess.run(["pgbench", "-i", "-q", "-s", "1", "-h", server.host, "-p", str(server.port), "-U", "app",
                        "app"], env=env, check=True, capture_output=True)
    with proxy_in_process(tmp_path, proxy_sections(old)) as proxy:
        target = proxy.server.postgres.target
        # A thread per client: pgbench prepares with a blocking call, which would stall the other clients of its
        # thread (holding backends meanwhile) while it waits for a backend.
        bench = subprocess.Popen(
            ["pgbench", "-M", mode, "-c", "6", "-j", "6", "-T", "6", "-n", "-h", "127.0.0.1", "-p",
             str(proxy.ports["postgresql"]), "-U", "app", "app"],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        history = "SELECT count(*) FROM pgbench_history"
        wait_until(lambda: int(old.psql(history, user="app", db="app")) >= 50)
        proxy.call(target.repoint, new.host, new.port)
        wait_until(lambda: backend_connections(old) == 0)
        on_old = old.psql(history, user="app", db="app")
        out, err = bench.communicate(timeout=60)
        assert bench.returncode == 0, err
        assert "error" not in err.lower() and "number of failed transactions: 0" in out, (out, err)
        assert old.psql(history, user="app", db="app") == on_old  # nothing ran on the old server after the move
        assert int(new.psql(history, user="app", db="app")) > 0


def test_session_pooling_clients_keep_their_server_until_they_leave(
    tmp_path: Path, servers: tuple[PostgresInstance, PostgresInstance]
) -> None:
    old, new = servers
    with proxy_in_process(tmp_path, proxy_sections(old, mode="session")) as proxy:
        target = proxy.server.postgres.target
        port = proxy.ports["postgresql"]
        with psycopg.connect(host="127.0.0.1", port=port, user="app", password="app-secret", dbname="app",
                             autocommit=True) as first:
            assert first.execute("SELECT inet_server_port()").fetchone() == (old.port,)
            proxy.call(target.repoint, new.host, new.port)
            with psycopg.connect(host="127.0.0.1", port=port, user="app", password="app-secret", dbname="app",
                                 autocommit=True) as second:
                assert second.execute("SELECT inet_server_port()").fetchone() == (new.port,)
                assert first.execute("SELECT inet_server_port()").fetchone() == (old.port,)
        wait_until(lambda: backend_connections(old) == 0)  # the old server's backend closed when its client left
        assert backend_connections(new) == 1  # the new one stays pooled
