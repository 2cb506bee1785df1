"""DROP DATABASE / ALTER DATABASE ... RENAME through the proxy after the database's clients have left."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from devtools.servers import PostgresInstance
from proxy.session.pg_databases import database_ddl_target
from support import ProxyProcess, running_proxy


@pytest.fixture
def proxy(tmp_path: Path, pg_server: PostgresInstance) -> Iterator[ProxyProcess]:
    # A high idle limit: the pool keeps every backend it opened (the case that blocked DROP DATABASE).
    with running_proxy(tmp_path, pg_server, postgresql__pool={"max_connections": 6,
                                                             "max_idle_connections": 6}) as running:
        yield running


def connect(proxy: ProxyProcess, dbname: str) -> psycopg.Connection:
    return psycopg.connect(host="127.0.0.1", port=proxy.ports["postgresql"], user="app", password="app-secret",
                           dbname=dbname, sslmode="disable", autocommit=True)


def use_and_leave(proxy: ProxyProcess, dbname: str, clients: int = 3) -> None:
    """Several clients at once (so the pool opens several backends on `dbname`), then all leave."""
    conns = [connect(proxy, dbname) for _ in range(clients)]
    try:
        for conn in conns:
            conn.execute("BEGIN")
            conn.execute("SELECT 1")
        for conn in conns:
            conn.execute("COMMIT")
    finally:
        for conn in conns:
            conn.close()


def server_sessions(pg: PostgresInstance, dbname: str) -> int:
    return int(pg.psql(f"SELECT count(*) FROM pg_stat_activity WHERE datname = '{dbname}'").strip())


@pytest.fixture
def scratch_db(pg_server: PostgresInstance) -> Iterator[str]:
    name = f"dropme_{int(time.time() * 1000) % 10_000_000}"
    pg_server.psql(f"ALTER ROLE app CREATEDB; CREATE DATABASE {name} OWNER app")
    yield name
    for candidate in (name, name + "_renamed"):
        pg_server.psql(f"DROP DATABASE IF EXISTS {candidate} WITH (FORCE)")


def test_database_ddl_target() -> None:
    assert database_ddl_target(b"DROP DATABASE x") == "x"
    assert database_ddl_target(b"  drop database if exists Mixed;") == "mixed"
    assert database_ddl_target(b'DROP DATABASE "We""ird" WITH (FORCE)') == 'We"ird'
    assert database_ddl_target(b"ALTER DATABASE x RENAME TO y") == "x"
    assert database_ddl_target(b"ALTER DATABASE x SET work_mem = '1MB'") is None
    assert database_ddl_target(b"DROP TABLE x") is None


def test_drop_database_after_its_clients_left(proxy: ProxyProcess, pg_server: PostgresInstance,
                                              scratch_db: str) -> None:
    use_and_leave(proxy, scratch_db)
    assert server_sessions(pg_server, scratch_db) >= 1  # the pool keeps them idle
    with connect(proxy, "app") as admin:
        started = time.monotonic()
        admin.execute(f"DROP DATABASE {scratch_db}")
        assert time.monotonic() - started < 4  # not the server's 5 s wait for other sessions
    assert pg_server.psql(f"SELECT count(*) FROM pg_database WHERE datname = '{scratch_db}'").strip() == "0"


def test_drop_database_with_force(proxy: ProxyProcess, pg_server: PostgresInstance, scratch_db: str) -> None:
    use_and_leave(proxy, scratch_db)
    with connect(proxy, "app") as admin:
        admin.execute(f"DROP DATABASE IF EXISTS {scratch_db} WITH (FORCE)")
        admin.execute("SELECT 1")
    assert pg_server.psql(f"SELECT count(*) FROM pg_database WHERE datname = '{scratch_db}'").strip() == "0"


def test_rename_database_after_its_clients_left(proxy: ProxyProcess, pg_server: PostgresInstance,
                                                scratch_db: str) -> None:
    use_and_leave(proxy, scratch_db)
    with connect(proxy, "app") as admin:
        admin.execute(f"ALTER DATABASE {scratch_db} RENAME TO {scratch_db}_renamed")
    with connect(proxy, scratch_db + "_renamed") as conn:
        assert conn.execute("SELECT current_database()").fetchone() == (scratch_db + "_renamed",)
