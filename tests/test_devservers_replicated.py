"""devtools.servers: every throwaway server runs as users run theirs (replication ready, TLS on)."""

from __future__ import annotations

import time
from pathlib import Path

import psycopg
import pymysql
import pytest

from devtools.servers import (
    DevServerError,
    MariaDBInstance,
    PostgresInstance,
    start_mariadb,
    start_mariadb_replica,
    start_postgres,
    start_postgres_standby,
)


def test_mariadb_has_a_binary_log_gtids_and_tls(mariadb_server: MariaDBInstance) -> None:
    row = mariadb_server.sql("SELECT @@log_bin, @@binlog_format, @@gtid_strict_mode, @@server_id, @@have_ssl")
    assert row.split("\t") == ["1", "ROW", "1", "1", "YES"]
    mariadb_server.sql("CREATE TABLE IF NOT EXISTS app.devserver_gtid (a INT); INSERT INTO app.devserver_gtid "
                       "VALUES (1)")
    assert mariadb_server.sql("SELECT @@gtid_binlog_pos").startswith("0-1-")
    assert "mariadb-bin" in mariadb_server.sql("SHOW BINARY LOGS")
    tls = pymysql.connect(**mariadb_server.connect_kwargs("app"), ssl={"check_hostname": False})  # type: ignore[arg-type]
    try:
        with tls.cursor() as cur:
            cur.execute("SHOW SESSION STATUS LIKE 'Ssl_version'")
            assert (cur.fetchone() or ("", ""))[1].startswith("TLS")
    finally:
        tls.close()


def test_postgres_allows_streaming_replication_and_tls(pg_server: PostgresInstance) -> None:
    assert pg_server.psql("SHOW wal_level") == "replica"
    assert int(pg_server.psql("SHOW max_wal_senders")) >= 1
    assert pg_server.psql("SHOW ssl") == "on"
    with psycopg.connect(pg_server.dsn("app") + " sslmode=require", connect_timeout=10) as conn:
        row = conn.execute("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()").fetchone()
        assert row == (True,)
    with psycopg.connect(pg_server.dsn("app") + " sslmode=disable", connect_timeout=10) as conn:
        row = conn.execute("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()").fetchone()
        assert row == (False,)
    # a physical replication connection (what a standby or pg_basebackup opens) is accepted
    replication = psycopg.connect(pg_server.dsn(pg_server.superuser) + " replication=true sslmode=disable",
                                  connect_timeout=10, autocommit=True)
    try:
        result = replication.pgconn.exec_(b"IDENTIFY_SYSTEM")
        assert result.ntuples == 1
        assert result.get_value(0, 0)  # the system identifier
    finally:
        replication.close()


def test_mariadb_replica_follows_is_read_only_and_can_be_promoted(tmp_path_factory: pytest.TempPathFactory) -> None:
    primary = start_mariadb(tmp_path_factory.mktemp("mdb-primary"), users={"app": "app-secret"})
    try:
        replica = start_mariadb_replica(primary, tmp_path_factory.mktemp("mdb-replica"))
        try:
            assert replica.sql("SELECT @@server_id, @@read_only") == "2\t1"
            primary.sql("CREATE TABLE app.follow (a INT PRIMARY KEY); INSERT INTO app.follow VALUES (7)")
            replica.wait_caught_up(primary.sql("SELECT @@gtid_binlog_pos"))
            assert replica.sql("SELECT a FROM app.follow") == "7"
            with pytest.raises(DevServerError, match="read-only|--read-only"):
                replica.sql("INSERT INTO app.follow VALUES (8)", user="app")
            replica.pause_replay()
            primary.sql("INSERT INTO app.follow VALUES (9)")
            assert replica.slave_status()["Slave_SQL_Running"] == "No"
            assert replica.sql("SELECT COUNT(*) FROM app.follow") == "1"
            replica.resume_replay()
            replica.wait_caught_up(primary.sql("SELECT @@gtid_binlog_pos"))
            assert replica.sql("SELECT COUNT(*) FROM app.follow") == "2"
            replica.promote()
            assert replica.slave_status() == {}
            replica.sql("INSERT INTO app.follow VALUES (10)", user="app")
            assert replica.sql("SELECT @@read_only, COUNT(*) FROM app.follow") == "0\t3"
        finally:
            replica.stop()
    finally:
        primary.stop()


def _wait_for(sql: str, instance: PostgresInstance, expected: str, timeout: float = 15.0) -> str:
    deadline = time.monotonic() + timeout
    while True:
        got = instance.psql(sql, db="app")
        if got == expected or time.monotonic() > deadline:
            return got
        time.sleep(0.05)


def test_postgres_standby_streams_and_promotes(tmp_path: Path) -> None:
    primary = start_postgres(tmp_path, users={"app": "app-secret"})
    try:
        standby = start_postgres_standby(primary, tmp_path)
        try:
            assert standby.port != primary.port
            assert standby.psql("SELECT pg_is_in_recovery()") == "t"
            assert standby.psql("SHOW ssl") == "on"
            primary.psql("CREATE TABLE t (a int); INSERT INTO t VALUES (42)", user="app", db="app")
            assert _wait_for("SELECT count(*) FROM pg_tables WHERE tablename = 't'", standby, "1") == "1"
            assert standby.psql("SELECT a FROM t", user="app", db="app") == "42"
            standby.promote()
            assert standby.psql("SELECT pg_is_in_recovery()") == "f"
            standby.psql("INSERT INTO t VALUES (43)", user="app", db="app")
            assert standby.psql("SELECT sum(a) FROM t", user="app", db="app") == "85"
        finally:
            standby.stop()
    finally:
        primary.stop()
