"""Re-pointing, pausing and resizing the MySQL target under load (two real MariaDB servers, PyMySQL, aiomysql and
mysql-connector's prepared cursors)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiomysql
import mysql.connector
import pymysql
import pytest

from devtools.servers import MariaDBInstance, free_port, start_mariadb
from inprocess import Load, check_pause_and_resize, proxy_in_process, wait_until
from support import mysql_backend_connections

SCHEMA = ("CREATE TABLE IF NOT EXISTS moves (id bigint AUTO_INCREMENT PRIMARY KEY, port int NOT NULL, "
          "client varchar(40) NOT NULL)")
CLIENTS = 3  # of each library; the pool has fewer backends than clients
SESSION = "SET @tag = %s, SESSION lock_wait_timeout = 4321"
CHECK = "SELECT @@port, @tag, @@lock_wait_timeout"


@pytest.fixture(scope="module")
def second_mariadb(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MariaDBInstance]:
    """A second MariaDB with the same users and schema as mariadb_server: where the target moves to."""
    server = start_mariadb(tmp_path_factory.mktemp("mariadb2"), users={"app": "app-secret", "bench": "bench-secret"})
    yield server
    server.stop()


@pytest.fixture(scope="module")
def servers(mariadb_server: MariaDBInstance, second_mariadb: MariaDBInstance) -> tuple[MariaDBInstance,
                                                                                         MariaDBInstance]:
    for server in (mariadb_server, second_mariadb):
        server.sql(SCHEMA, user="app", db="app")
    return mariadb_server, second_mariadb


def proxy_sections(backend: MariaDBInstance, **pool: Any) -> dict[str, dict[str, Any]]:
    return {
        "server": {"log_level": "info", "workers": 1},
        "secrets": {"file": "secrets.toml"},
        "postgresql": {"enabled": False},
        "mysql": {"enabled": True, "port": free_port(), "backend_port": backend.port},
        "mysql.pool": {"max_connections": 3, "connection_borrow_timeout": 30.0, **pool},
    }


def checked(load: Load, name: str, row: Any) -> int:
    port, tag, timeout = row
    if (tag.decode() if isinstance(tag, bytes) else tag) != name or int(timeout) != 4321:
        load.errors.append(f"{name}: session state lost: @tag={tag!r}, lock_wait_timeout={timeout}")
    return int(port)


def run_pymysql(load: Load, name: str) -> None:
    try:
        with pymysql.connect(host="127.0.0.1", port=load.port, user="app", password="app-secret", database="app",
                             autocommit=True) as conn, conn.cursor() as cur:
            cur.execute(SESSION, (name,))
            while not load.stop.is_set():
                started = time.monotonic()
                conn.begin()
                cur.execute("INSERT INTO moves (port, client) VALUES (@@port, %s)", (name,))
                cur.execute(CHECK)
                row = cur.fetchone()
                conn.commit()
                load.record(name, started, checked(load, name, row))
    except Exception as exc:
        load.errors.append(f"{name}: {exc!r}")


def run_connector(load: Load, name: str) -> None:
    try:
        conn = mysql.connector.connect(host="127.0.0.1", port=load.port, user="app", password="app-secret",
                                       database="app", use_pure=True, autocommit=True)
        try:
            conn.cursor().execute(SESSION, (name,))
            cur = conn.cursor(prepared=True)  # COM_STMT_PREPARE once, EXECUTE on whatever backend serves it
            while not load.stop.is_set():
                started = time.monotonic()
                conn.start_transaction()
                cur.execute("INSERT INTO moves (port, client) VALUES (@@port, ?)", (name,))
                cur.execute(CHECK)
                row = cur.fetchone()
                conn.commit()
                load.record(name, started, checked(load, name, row))
        finally:
            conn.close()
    except Exception as exc:
        load.errors.append(f"{name}: {exc!r}")


async def run_aiomysql(load: Load, name: str) -> None:
    try:
        conn = await aiomysql.connect(host="127.0.0.1", port=load.port, user="app", password="app-secret",
                                      db="app", autocommit=True)
        try:
            async with conn.cursor() as cur:
                await cur.execute(SESSION, (name,))
                while not load.stop.is_set():
                    started = time.monotonic()
                    await conn.begin()
                    await cur.execute("INSERT INTO moves (port, client) VALUES (@@port, %s)", (name,))
                    await cur.execute(CHECK)
                    row = await cur.fetchone()
                    await conn.commit()
                    load.record(name, started, checked(load, name, row))
        finally:
            conn.close()
    except Exception as exc:
        load.errors.append(f"{name}: {exc!r}")


def start_load(port: int) -> Load:
    load = Load(port, 3 * CLIENTS)

    def aiomysql_clients() -> None:
        async def main() -> None:
            await asyncio.gather(*(run_aiomysql(load, f"aiomysql{i}") for i in range(CLIENTS)))

        asyncio.run(main())

    load.threads.append(threading.Thread(target=aiomysql_clients))
    load.threads.extend(threading.Thread(target=run_pymysql, args=(load, f"pymysql{i}")) for i in range(CLIENTS))
    load.threads.extend(threading.Thread(target=run_connector, args=(load, f"connector{i}")) for i in range(CLIENTS))
    return load.start()


def rows(server: MariaDBInstance) -> int:
    return int(server.sql("SELECT count(*) FROM moves", user="app", db="app"))


def test_repoint_under_load_moves_every_client_without_an_error(
    tmp_path: Path, servers: tuple[MariaDBInstance, MariaDBInstance]
) -> None:
    old, new = servers
    with proxy_in_process(tmp_path, proxy_sections(old)) as proxy:
        service = proxy.server.mysql
        target = service.target
        load = start_load(proxy.ports["mysql"])
        try:
            load.wait_all(lambda r: len(r) >= 5)
            learned = proxy.call(lambda: (service.greeting, service.collations))
            assert learned[0] is not None and learned[1]

            def repoint() -> tuple[object, frozenset[int]]:
                target.repoint(new.host, new.port)
                return service.greeting, service.collations

            assert proxy.call(repoint) == (None, frozenset())
            moved_at = time.monotonic()
            load.wait_all(lambda r: sum(1 for started, _ in r if started > moved_at) >= 5)
            wait_until(lambda: mysql_backend_connections(old) == 0)  # closed once given back
            rows_on_old = rows(old)
            load.wait_all(lambda r: sum(1 for started, _ in r if started > moved_at) >= 10)
        finally:
            load.finish()
        assert rows(old) == rows_on_old  # the old server saw no transaction after the move
        for client, records in load.records.items():
            assert {port for started, port in records if started > moved_at} == {new.port}, client
            assert {port for _, port in records[:5]} == {old.port}, client
        # What the service learned comes from the new server: learned again by its first connection there.
        relearned = proxy.call(lambda: (service.greeting, service.collations))
        assert relearned[0] is not None and relearned[0] is not learned[0] and relearned[1] == learned[1]


def test_pause_holds_transactions_and_resize_follows(
    tmp_path: Path, servers: tuple[MariaDBInstance, MariaDBInstance]
) -> None:
    _, server = servers
    with proxy_in_process(tmp_path, proxy_sections(server, max_connections=4)) as proxy:
        target = proxy.server.mysql.target
        load = start_load(proxy.ports["mysql"])
        try:
            check_pause_and_resize(proxy, target, load, lambda: mysql_backend_connections(server))
        finally:
            load.finish()


def test_a_paused_borrow_ends_with_the_borrow_timeout_error(
    tmp_path: Path, servers: tuple[MariaDBInstance, MariaDBInstance]
) -> None:
    _, server = servers
    with proxy_in_process(tmp_path, proxy_sections(server, connection_borrow_timeout=1.0)) as proxy:
        target = proxy.server.mysql.target
        port = proxy.ports["mysql"]
        with pymysql.connect(host="127.0.0.1", port=port, user="app", password="app-secret", database="app") as conn:
            with conn.cursor() as cur:
                cur.execute("SELECT 1")
            conn.commit()
            proxy.call(target.pause)
            with pytest.raises(pymysql.MySQLError, match="timed out after 1 s waiting for a backend"), \
                    conn.cursor() as cur:
                cur.execute("SELECT 2")
            proxy.call(target.resume)
        with pymysql.connect(host="127.0.0.1", port=port, user="app", password="app-secret", database="app") as conn:
            with conn.cursor() as cur:
                cur.execute("SELECT 3")
                assert cur.fetchone() == (3,)


def test_kill_query_after_a_repoint_reaches_the_server_running_the_query(
    tmp_path: Path, servers: tuple[MariaDBInstance, MariaDBInstance]
) -> None:
    old, new = servers
    with proxy_in_process(tmp_path, proxy_sections(old)) as proxy:
        target = proxy.server.mysql.target
        port = proxy.ports["mysql"]
        with pymysql.connect(host="127.0.0.1", port=port, user="app", password="app-secret", database="app") as conn, \
                pymysql.connect(host="127.0.0.1", port=port, user="app", password="app-secret") as killer:
            conn.begin()
            with conn.cursor() as cur:
                cur.execute("SELECT @@port")
                assert cur.fetchone() == (old.port,)
            proxy.call(target.repoint, new.host, new.port)
            outcome: list[object] = []

            def sleep() -> None:
                try:
                    with conn.cursor() as cur:
                        cur.execute("SELECT SLEEP(60)")
                        outcome.append(cur.fetchone())
                except pymysql.MySQLError as exc:
                    outcome.append(exc)

            thread = threading.Thread(target=sleep)
            thread.start()
            wait_until(lambda: old.sql("SELECT count(*) FROM information_schema.processlist "
                                       "WHERE info = 'SELECT SLEEP(60)'") == "1")
            with killer.cursor() as cur:
                cur.execute(f"KILL QUERY {conn.thread_id()}")
            thread.join(60)
            # Interrupted on the server it runs on: SLEEP answers 1 (or the query is refused as interrupted).
            assert outcome == [(1,)] or (isinstance(outcome[0], pymysql.MySQLError) and outcome[0].args[0] == 1317)
            conn.rollback()
            with conn.cursor() as cur:
                cur.execute("SELECT @@port")
                assert cur.fetchone() == (new.port,)
