"""The admin console (database `dbproxy`, alias `pgbouncer`) through psql, the mariadb client, psycopg, asyncpg and
PyMySQL, on a proxy of two workers: its tables cover the whole proxy, only admin users get in, and PAUSE, RESUME
and KILL act on clients in any worker."""

from __future__ import annotations

import asyncio
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import psycopg
import pymysql
import pytest

from devtools.servers import MariaDBInstance, PostgresInstance
from leakcheck import record_output
from support import ProxyProcess, running_proxy

ADMIN_PASSWORD = "admin-secret"
API_TOKEN = "console-test-api-token-0123456789"


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory, pg_bench_tables: PostgresInstance,
          mariadb_server: MariaDBInstance) -> Iterator[ProxyProcess]:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DBPROXY_PASSWORD_ADMIN", ADMIN_PASSWORD)
        with running_proxy(tmp_path_factory.mktemp("console"), pg_bench_tables, mariadb_server,
                           server={"workers": 2}, admin={"users": ["admin"]},
                           api={"token": API_TOKEN}) as running:
            yield running


def psql(proxy: ProxyProcess, *commands: str, user: str = "admin", password: str = ADMIN_PASSWORD,
         database: str = "dbproxy") -> subprocess.CompletedProcess[str]:
    """psql in unaligned mode (header kept, fields split by '|'), each command in the same session."""
    args = ["psql", "-X", "-A", "-h", "127.0.0.1", "-p", str(proxy.ports["postgresql"]), "-U", user, database]
    for command in commands:
        args += ["-c", command]
    env = dict(os.environ, PGPASSWORD=password, PGSSLMODE="disable")
    done = subprocess.run(args, capture_output=True, text=True, timeout=30, env=env)
    record_output(f"psql console {' '.join(commands)}", done.stdout + done.stderr)
    return done


def mariadb(proxy: ProxyProcess, sql: str, *args: str, user: str = "admin",
            password: str = ADMIN_PASSWORD) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MYSQL")}
    done = subprocess.run(["mariadb", "--no-defaults", "--protocol=TCP", "--skip-ssl", "-h", "127.0.0.1", "-P",
                           str(proxy.ports["mysql"]), "-u", user, f"-p{password}", "dbproxy", *args, "-e", sql],
                          capture_output=True, text=True, timeout=30, env=env)
    record_output(f"mariadb console {sql}", done.stdout + done.stderr)
    return done


def table(output: str, separator: str = "|") -> list[dict[str, str]]:
    """psql -A (or mariadb batch) output as rows by column name (the row-count footer left out)."""
    lines = [line for line in output.splitlines() if line and not (line.startswith("(") and line.endswith(")"))]
    header = lines[0].split(separator)
    return [dict(zip(header, line.split(separator), strict=True)) for line in lines[1:]]


def pg_table(proxy: ProxyProcess, command: str) -> list[dict[str, str]]:
    done = psql(proxy, command)
    assert done.returncode == 0, done.stderr
    return table(done.stdout)


def pg_connect(proxy: ProxyProcess) -> psycopg.Connection:
    return psycopg.connect(host="127.0.0.1", port=proxy.ports["postgresql"], user="app", password="app-secret",
                           dbname="app", sslmode="disable", autocommit=True)


def my_connect(proxy: ProxyProcess, **extra: object) -> pymysql.connections.Connection:
    return pymysql.connect(host="127.0.0.1", port=proxy.ports["mysql"], user="app", password="app-secret",
                           database="app", **extra)


POOL_COLUMNS = ["database", "user", "cl_active", "cl_waiting", "sv_active", "sv_idle", "sv_used", "maxwait",
                "pool_mode", "endpoint", "instance"]


def test_psql_shows_pools_while_pgbench_runs(proxy: ProxyProcess) -> None:
    env = dict(os.environ, PGPASSWORD="app-secret", PGSSLMODE="disable")
    bench = subprocess.Popen(["pgbench", "-n", "-S", "-c", "6", "-T", "6", "-h", "127.0.0.1", "-p",
                              str(proxy.ports["postgresql"]), "-U", "app", "app"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        seen: list[dict[str, str]] = []
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not seen:
            rows = [row for row in pg_table(proxy, "SHOW POOLS") if row["database"] == "app"]
            if rows and int(rows[0]["cl_active"]) + int(rows[0]["cl_waiting"]) == 6:
                seen = rows
            time.sleep(0.2)
        assert seen, "SHOW POOLS never showed pgbench's 6 clients"
        row = seen[0]
        assert all(name in row for name in POOL_COLUMNS)
        assert row["user"] == "app" and row["pool_mode"] == "transaction" and row["endpoint"] == "postgresql"
        assert int(row["sv_active"]) + int(row["sv_idle"]) >= 1
        clients = [row for row in pg_table(proxy, "SHOW CLIENTS") if row["user"] == "app"]
        assert len(clients) == 6 and {row["type"] for row in clients} == {"C"}
        assert all(row["addr"] == "127.0.0.1" and row["connect_time"] and row["request_time"] for row in clients)
        servers = pg_table(proxy, "SHOW SERVERS")
        assert servers and all(row["type"] == "S" and int(row["remote_pid"]) > 0 for row in servers)
        # the alias PgBouncer's exporters use
        assert table(psql(proxy, "show pools;", database="pgbouncer").stdout)[0]["database"]
    finally:
        _out, err = bench.communicate(timeout=30)
    assert bench.returncode == 0, err
    stats = [row for row in pg_table(proxy, "SHOW STATS") if row["database"] == "app"]
    assert stats and int(stats[0]["total_xact_count"]) > 0 and int(stats[0]["total_query_count"]) > 0
    assert int(stats[0]["total_query_time"]) > 0 and stats[0]["total_received"] == "0"


def test_mariadb_client_shows_pools(proxy: ProxyProcess) -> None:
    held = [my_connect(proxy) for _ in range(2)]
    try:
        for connection in held:
            with connection.cursor() as cursor:
                cursor.execute("BEGIN")
                cursor.execute("SELECT 1")
        done = mariadb(proxy, "SHOW POOLS", "-B")
        assert done.returncode == 0, done.stderr
        rows = [row for row in table(done.stdout, "\t") if row["endpoint"] == "mysql"]
        assert rows and all(name in rows[0] for name in POOL_COLUMNS)
        assert rows[0]["database"] == "app" and int(rows[0]["sv_active"]) == 2 and int(rows[0]["cl_active"]) == 2
    finally:
        for connection in held:
            connection.close()


def test_only_admins_get_in(proxy: ProxyProcess) -> None:
    before = {row["endpoint"]: int(row["logins_failed"]) for row in pg_table(proxy, "SHOW ENDPOINTS")}
    refused = psql(proxy, "SHOW POOLS", user="app", password="app-secret")
    assert refused.returncode != 0 and "access to the admin console denied" in refused.stderr
    wrong = psql(proxy, "SHOW POOLS", password="not-it")
    assert wrong.returncode != 0 and "password authentication failed" in wrong.stderr
    denied = mariadb(proxy, "SHOW POOLS", user="app", password="app-secret")
    assert denied.returncode != 0 and "ERROR 1044 (42000)" in denied.stderr
    after = {row["endpoint"]: int(row["logins_failed"]) for row in pg_table(proxy, "SHOW ENDPOINTS")}
    assert after["postgresql"] == before["postgresql"] + 2 and after["mysql"] == before["mysql"] + 1
    proxy.wait_for_log(r"access to the admin console denied for user \"app\"")


def test_unknown_command_errors_and_session_goes_on(proxy: ProxyProcess) -> None:
    done = psql(proxy, "SHOW NONSENSE", "SHOW HELP")
    assert "ERROR:  unknown admin console command" in done.stderr
    assert "SHOW POOLS" in done.stdout
    with pymysql.connect(host="127.0.0.1", port=proxy.ports["mysql"], user="admin", password=ADMIN_PASSWORD,
                         database="dbproxy") as connection, connection.cursor() as cursor:
        with pytest.raises(pymysql.err.ProgrammingError) as failed:
            cursor.execute("PAUSE TWICE NOW")
        assert failed.value.args[0] == 1064
        cursor.execute("show help;")
        assert any(row[0] == "SHOW TOP [N]" for row in cursor.fetchall())
        connection.ping()

    several = mariadb(proxy, "SHOW VERSION; SHOW LISTS; SHOW NONSENSE; SHOW HELP", "-B")
    assert "dbproxy " in several.stdout and "used_clients" in several.stdout and "SHOW TOP" not in several.stdout
    assert "ERROR 1064 (42000)" in several.stderr
    done = psql(proxy, "show version; show lists;")
    assert done.returncode == 0 and "dbproxy " in done.stdout and "used_clients" in done.stdout

    async def extended() -> None:
        connection = await asyncpg.connect(host="127.0.0.1", port=proxy.ports["postgresql"], user="admin",
                                           password=ADMIN_PASSWORD, database="dbproxy", ssl=False)
        try:
            with pytest.raises(asyncpg.FeatureNotSupportedError, match="simple query protocol only"):
                await connection.fetch("SHOW POOLS")
            assert (await connection.execute("SHOW HELP")) == "SHOW"  # (simple query protocol)
        finally:
            await connection.close()

    asyncio.run(extended())


def test_pause_holds_transactions_until_resume(proxy: ProxyProcess) -> None:
    connection = pg_connect(proxy)
    try:
        connection.execute("SELECT 1")
        assert psql(proxy, "PAUSE postgresql").returncode == 0
        finished: list[float] = []

        def run() -> None:
            connection.execute("SELECT 2")
            finished.append(time.monotonic())

        worker = threading.Thread(target=run)
        worker.start()
        time.sleep(1.5)
        assert not finished, "a transaction went through while the endpoint was paused"
        paused = [row for row in pg_table(proxy, "SHOW ENDPOINTS") if row["endpoint"] == "postgresql"]
        assert paused[0]["paused"] == "1"
        resumed_at = time.monotonic()
        assert psql(proxy, "RESUME").returncode == 0
        worker.join(10)
        assert finished and finished[0] - resumed_at < 2.0
    finally:
        psql(proxy, "RESUME")
        connection.close()


def test_kill_ends_clients_in_any_worker(proxy: ProxyProcess) -> None:
    connections = [pg_connect(proxy) for _ in range(4)]
    for connection in connections:
        connection.execute("SELECT 1")
        ids = {row["id"] for row in pg_table(proxy, "SHOW CLIENTS")}
        assert str(connection.info.backend_pid) in ids
        done = psql(proxy, f"KILL {connection.info.backend_pid}")
        assert done.returncode == 0, done.stderr
        with pytest.raises(psycopg.OperationalError) as ended:
            connection.execute("SELECT 1")
        assert "administrator command" in str(ended.value)
        connection.close()
    missing = psql(proxy, "KILL 12345")
    assert missing.returncode != 0 and "no client with id 12345" in missing.stderr
    for _ in range(3):
        mysql_connection = my_connect(proxy)
        done = mariadb(proxy, f"KILL {mysql_connection.thread_id()}")
        assert done.returncode == 0, done.stderr
        with pytest.raises(pymysql.err.OperationalError) as killed:
            with mysql_connection.cursor() as cursor:
                cursor.execute("SELECT 1")
        assert killed.value.args[0] == 1927, killed.value
        mysql_connection.close()


def test_show_top_lists_statements(proxy: ProxyProcess) -> None:
    with pg_connect(proxy) as connection:
        for _ in range(5):
            connection.execute("SELECT 42 AS console_top_marker")
    with my_connect(proxy) as connection, connection.cursor() as cursor:
        cursor.execute("SELECT 43 AS console_top_mysql")
    deadline = time.monotonic() + 5
    rows: list[dict[str, str]] = []
    while time.monotonic() < deadline:
        rows = pg_table(proxy, "SHOW TOP 1000")
        if any("console_top_marker" in row["statement"] for row in rows) and any(
                "console_top_mysql" in row["statement"] for row in rows):
            break
        time.sleep(0.2)
    marker = [row for row in rows if "console_top_marker" in row["statement"]]
    assert marker and int(marker[0]["calls"]) == 5 and marker[0]["user"] == "app"
    assert any("console_top_mysql" in row["statement"] for row in rows)
    done = mariadb(proxy, "SHOW TOP 3", "-B")
    assert done.returncode == 0 and len(table(done.stdout, "\t")) <= 3


def test_show_config_and_the_rest(proxy: ProxyProcess, tmp_path: Path) -> None:
    config = {row["key"]: row for row in pg_table(proxy, "SHOW CONFIG")}
    assert config["server.workers"]["value"] == "2" and config["server.workers"]["changeable"] == "no"
    assert config["admin.users"]["value"] == "['admin']"
    assert config["api.token"]["value"] in ("", "<redacted>")  # (the workers are not given the API's token)
    assert API_TOKEN not in psql(proxy, "SHOW CONFIG").stdout
    assert config["postgresql.pool.connection_borrow_timeout"]["changeable"] == "yes"
    mode = config["postgresql.pool.mode"]
    assert mode["value"] == "transaction" and mode["changeable"] == "no"
    with pg_connect(proxy) as connection:
        connection.execute("SELECT 1")
        databases = [row for row in pg_table(proxy, "SHOW DATABASES") if row["endpoint"] == "postgresql"]
        assert databases and databases[0]["name"] == "app" and databases[0]["host"] == "127.0.0.1"
        assert databases[0]["server_lifetime"] == "86400" and int(databases[0]["pool_size"]) == 10
        lists = {row["list"]: int(row["items"]) for row in pg_table(proxy, "SHOW LISTS")}
        assert lists["used_clients"] >= 2 and lists["pools"] >= 1 and lists["dns_names"] == 0
    assert pg_table(proxy, "SHOW VERSION")[0]["version"].startswith("dbproxy ")
    for command in ("SHOW INSTANCES", "SHOW PINS", "RECONNECT", "RELOAD"):
        done = psql(proxy, command)
        assert done.returncode == 0, (command, done.stderr)
    proxy.wait_for_log("reload: passed to 2 workers")
    with pg_connect(proxy) as connection:  # after RECONNECT: new backends serve
        assert connection.execute("SELECT 7").fetchone() == (7,)


def test_single_process_console(tmp_path: Path, pg_server: PostgresInstance) -> None:
    """One process (no supervisor): the console asks its own handlers; RELOAD re-reads the file."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DBPROXY_PASSWORD_ADMIN", ADMIN_PASSWORD)
        with running_proxy(tmp_path, pg_server, admin={"users": ["admin"]}, api={"token": API_TOKEN}) as single:
            with pg_connect(single) as connection:
                connection.execute("SELECT 1")
                rows = [row for row in pg_table(single, "SHOW POOLS") if row["database"] == "app"]
                assert rows and int(rows[0]["cl_active"]) == 1 and int(rows[0]["sv_idle"]) == 1
                assert {row["worker_pid"] for row in pg_table(single, "SHOW CLIENTS")} == {str(single.pid)}
                assert psql(single, f"KILL {connection.info.backend_pid}").returncode == 0
                with pytest.raises(psycopg.OperationalError, match="administrator command"):
                    connection.execute("SELECT 1")
            config = {row["key"]: row["value"] for row in pg_table(single, "SHOW CONFIG")}
            assert config["api.token"] == "<redacted>" and API_TOKEN not in str(config)
            done = psql(single, "RELOAD")
            assert done.returncode == 0 and "reloaded" in done.stderr  # (the notice)
            single.wait_for_log("reload: reading")
