"""devtools.servers: every throwaway server runs as users run theirs (replication ready, TLS on)."""

from __future__ import annotations

import psycopg
import pymysql

from devtools.servers import MariaDBInstance, PostgresInstance


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
