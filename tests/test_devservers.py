"""devtools.servers: throwaway PostgreSQL / MariaDB instances really accept the logins they promise."""

from __future__ import annotations

from pathlib import Path

import asyncpg
import psycopg
import pymysql
import pytest

from devtools.servers import (
    DevServerError,
    MariaDBInstance,
    PostgresInstance,
    free_port,
    start_mariadb,
    start_postgres,
)

MACHINE_PORTS = {5432, 3306}


def test_free_port_is_bindable() -> None:
    import socket

    port = free_port()
    assert 1024 < port < 65536
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


# --------------------------------------------------------------------------- PostgreSQL


def _pg_error(dsn: str) -> psycopg.OperationalError:
    with pytest.raises(psycopg.OperationalError) as info:
        psycopg.connect(dsn, connect_timeout=10).close()
    return info.value


def test_pg_scram_login(pg_server: PostgresInstance) -> None:
    assert pg_server.port not in MACHINE_PORTS
    assert pg_server.host == "127.0.0.1"
    with psycopg.connect(pg_server.dsn("app", "app-secret", "app"), connect_timeout=10) as conn:
        row = conn.execute("SELECT current_user, current_database(), inet_server_port()").fetchone()
        assert row == ("app", "app", pg_server.port)
        assert conn.execute("SHOW password_encryption").fetchone() == ("scram-sha-256",)
        assert conn.execute("SHOW max_connections").fetchone() == ("200",)
        assert conn.execute("SHOW fsync").fetchone() == ("off",)
    # the stored verifier is SCRAM and TCP logins go through the scram-sha-256 hba rule
    verifier = pg_server.psql("SELECT rolpassword FROM pg_authid WHERE rolname = 'app'")
    assert verifier.startswith("SCRAM-SHA-256$")
    methods = pg_server.psql("SELECT DISTINCT auth_method FROM pg_hba_file_rules WHERE type = 'host'")
    assert methods == "scram-sha-256"


def test_pg_second_user_and_dsn_defaults(pg_server: PostgresInstance) -> None:
    with psycopg.connect(pg_server.dsn("bench"), connect_timeout=10) as conn:
        assert conn.execute("SELECT current_user, current_database()").fetchone() == ("bench", "bench")
        row = conn.execute("SELECT rolsuper FROM pg_roles WHERE rolname = current_user").fetchone()
        assert row == (False,)
    assert pg_server.psql("SELECT datdba::regrole FROM pg_database WHERE datname = 'bench'") == "bench"
    assert pg_server.psql("SELECT current_user", user="app", db="app") == "app"


async def _pg_login_sqlstate(server: PostgresInstance, user: str, password: str) -> str:
    """SQLSTATE of a failed login (psycopg has none for connection errors; asyncpg has)."""
    with pytest.raises(asyncpg.PostgresError) as info:
        await asyncpg.connect(server.url(user, password), timeout=10)
    return str(info.value.sqlstate)


async def test_pg_wrong_password_is_28P01(pg_server: PostgresInstance) -> None:
    assert "password authentication failed" in str(_pg_error(pg_server.dsn("app", "wrong", "app")))
    assert await _pg_login_sqlstate(pg_server, "app", "wrong") == "28P01"
    conn = await asyncpg.connect(pg_server.url("app"), timeout=10)  # scram via a second client library
    try:
        assert await conn.fetchval("SELECT current_user") == "app"
    finally:
        await conn.close()


def test_pg_superuser_psql(pg_server: PostgresInstance) -> None:
    assert pg_server.psql("SELECT 1; SELECT 2") == "1\n2"
    assert pg_server.psql("SELECT rolsuper FROM pg_roles WHERE rolname = current_user") == "t"
    with psycopg.connect(pg_server.dsn("postgres", db="postgres"), connect_timeout=10) as conn:
        assert conn.execute("SELECT current_user").fetchone() == ("postgres",)
    with pytest.raises(DevServerError, match="syntax error"):
        pg_server.psql("SELEC 1")


def test_pg_md5(pg_md5_server: PostgresInstance) -> None:
    server = pg_md5_server
    with psycopg.connect(server.dsn("app", "app-secret", "app"), connect_timeout=10) as conn:
        assert conn.execute("SELECT current_user").fetchone() == ("app",)
        assert conn.execute("SHOW password_encryption").fetchone() == ("md5",)
    assert server.psql("SELECT left(rolpassword, 3) FROM pg_authid WHERE rolname = 'app'") == "md5"
    # the superuser's initdb-time (scram) password was re-hashed as md5 too
    assert server.psql("SELECT left(rolpassword, 3) FROM pg_authid WHERE rolname = 'postgres'") == "md5"
    assert server.psql("SELECT DISTINCT auth_method FROM pg_hba_file_rules WHERE type = 'host'") == "md5"
    assert "password authentication failed" in str(_pg_error(server.dsn("app", "wrong", "app")))


async def test_pg_md5_wrong_password_is_28P01(pg_md5_server: PostgresInstance) -> None:
    assert await _pg_login_sqlstate(pg_md5_server, "app", "wrong") == "28P01"


def test_pg_trust_settings_and_lifecycle(tmp_path: Path) -> None:
    settings = {"max_connections": "50"}
    with start_postgres(tmp_path, users={"app": "x"}, auth="trust", settings=settings) as server:
        assert server.running
        # trust: any password is accepted
        with psycopg.connect(server.dsn("app", "not-the-password", "app"), connect_timeout=10) as conn:
            assert conn.execute("SHOW max_connections").fetchone() == ("50",)
        server.stop()
        assert not server.running
        server.stop()  # idempotent
        server.start()  # restartable, same port
        assert server.psql("SELECT current_user", user="app", db="app") == "app"
    assert not server.running
    server.stop()


def test_pg_bad_auth_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        start_postgres(tmp_path, auth="ident")


# --------------------------------------------------------------------------- MariaDB


def test_mariadb_app_login(mariadb_server: MariaDBInstance) -> None:
    assert mariadb_server.port not in MACHINE_PORTS
    conn = pymysql.connect(**mariadb_server.connect_kwargs("app"), connect_timeout=10)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT 1, CURRENT_USER(), DATABASE(), @@port")
            assert cur.fetchone() == (1, "app@%", "app", mariadb_server.port)
            cur.execute("CREATE TABLE IF NOT EXISTS t (id INT PRIMARY KEY)")
            cur.execute("SELECT @@max_connections")
            assert cur.fetchone() == (500,)
    finally:
        conn.close()
    assert mariadb_server.sql("SELECT plugin FROM mysql.user WHERE user = 'app'") == "mysql_native_password"


def test_mariadb_wrong_password_is_1045(mariadb_server: MariaDBInstance) -> None:
    kwargs = mariadb_server.connect_kwargs("app", "wrong")
    with pytest.raises(pymysql.err.OperationalError) as info:
        pymysql.connect(**kwargs, connect_timeout=10)
    assert info.value.args[0] == 1045


def test_mariadb_root_over_tcp(mariadb_server: MariaDBInstance) -> None:
    assert mariadb_server.sql("SELECT CURRENT_USER()") == "root@127.0.0.1"
    conn = pymysql.connect(host="127.0.0.1", port=mariadb_server.port, user="root", password="root")
    conn.close()
    with pytest.raises(DevServerError, match="1064"):
        mariadb_server.sql("SELEC 1")


def test_mariadb_processlist_visible(mariadb_server: MariaDBInstance) -> None:
    root = pymysql.connect(**mariadb_server.connect_kwargs("root"), connect_timeout=10)
    app = pymysql.connect(**mariadb_server.connect_kwargs("app"), connect_timeout=10)
    try:
        root_id = root.thread_id()
        with app.cursor() as cur:
            cur.execute("SELECT ID, USER FROM information_schema.PROCESSLIST")
            rows = {row[0]: row[1] for row in cur.fetchall()}
            assert rows.get(root_id) == "root"  # PROCESS privilege: other users' threads are visible
            cur.execute("SHOW FULL PROCESSLIST")
            assert any(row[0] == root_id for row in cur.fetchall())
    finally:
        app.close()
        root.close()


def test_mariadb_settings_and_lifecycle(tmp_path: Path) -> None:
    with start_mariadb(tmp_path, settings={"max_connections": "42"}, root_password="pw") as server:
        assert server.running
        assert server.sql("SELECT @@max_connections") == "42"
        server.stop()
        assert not server.running
        server.stop()  # idempotent
        server.start()
        assert server.sql("SELECT @@max_connections") == "42"
    assert not server.running
    server.stop()


def test_servers_are_separate_copies_of_one_template(pg_server: PostgresInstance, pg_md5_server: PostgresInstance,
                                                     mariadb_server: MariaDBInstance, tmp_path: Path) -> None:
    """initdb and mariadb-install-db run once per process: every server starts from a copy of that template (the
    same cluster identity) and keeps its own roles, users and data."""
    identity = "SELECT system_identifier FROM pg_control_system()"
    assert pg_server.psql(identity) == pg_md5_server.psql(identity)
    bench = "SELECT count(*) FROM pg_roles WHERE rolname = 'bench'"
    assert (pg_server.psql(bench), pg_md5_server.psql(bench)) == ("1", "0")
    with start_mariadb(tmp_path, users={"other": "other-secret"}) as fresh:
        users = "SELECT group_concat(DISTINCT user ORDER BY user) FROM mysql.user WHERE user IN ('app', 'other')"
        assert (mariadb_server.sql(users), fresh.sql(users)) == ("app", "other")
