"""Top SQL: pgbench and sysbench through a two-worker proxy; `dbproxy top` lists their statements with the call
counts the tools report, errors and rows counted, for both engines and both protocols' prepared statements."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import psycopg
import pymysql
import pytest

from devtools.servers import MariaDBInstance, PostgresInstance
from support import ProxyProcess, running_proxy

PGBENCH_SELECT = "SELECT abalance FROM pgbench_accounts WHERE aid = "


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory, pg_bench_tables: PostgresInstance,
          mariadb_server: MariaDBInstance) -> Iterator[ProxyProcess]:
    folder = tmp_path_factory.mktemp("topsql")
    with running_proxy(folder, pg_bench_tables, mariadb_server, server={"workers": 2}) as running:
        yield running


def top(proxy: ProxyProcess, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "proxy", "top", "-c", str(proxy.config), *extra],
                          capture_output=True, text=True, timeout=30)


def statements(proxy: ProxyProcess) -> list[dict[str, Any]]:
    result = top(proxy, "--json", "--by", "calls", "-n", "200")
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    assert answer["enabled"] and answer["processes_answered"] == answer["processes"] == 2, answer
    return list(answer["statements"])


def calls(rows: list[dict[str, Any]], statement: str, user: str) -> int:
    return sum(row["calls"] for row in rows if row["statement"] == statement and row["user"] == user)


def pgbench(proxy: ProxyProcess, mode: str, clients: int, per_client: int) -> int:
    out = subprocess.run(["pgbench", "-n", "-S", "-M", mode, "-c", str(clients), "-t", str(per_client), "-h",
                          "127.0.0.1", "-p", str(proxy.ports["postgresql"]), "-U", "app", "app"],
                         env=dict(os.environ, PGPASSWORD="app-secret"), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    return int(re.search(r"number of transactions actually processed: (\d+)", out.stdout).group(1))  # type: ignore[union-attr]


def test_pgbench_statements_are_counted(proxy: ProxyProcess) -> None:
    simple = pgbench(proxy, "simple", 4, 300)
    prepared = pgbench(proxy, "prepared", 4, 300)
    extended = pgbench(proxy, "extended", 2, 300)
    rows = statements(proxy)
    counted_simple = calls(rows, PGBENCH_SELECT + "?", "app")
    counted_bound = calls(rows, PGBENCH_SELECT + "$1", "app")
    assert abs(counted_simple - simple) <= simple / 100, rows[:5]
    assert abs(counted_bound - (prepared + extended)) <= (prepared + extended) / 100, rows[:5]
    for row in rows:
        if row["statement"].startswith(PGBENCH_SELECT):
            assert row["rows"] == row["calls"] and row["errors"] == 0, row  # one row per point select
            assert row["database"] == "app" and row["endpoint"] == "postgresql", row
            assert 0 < row["p95_ms"] <= row["p99_ms"] and row["mean_ms"] > 0, row
    table = top(proxy, "--by", "load")
    assert table.returncode == 0 and "pgbench_accounts WHERE aid = " in table.stdout, table.stdout


def test_errors_rows_and_literals(proxy: ProxyProcess) -> None:
    dsn = f"host=127.0.0.1 port={proxy.ports['postgresql']} user=app password=app-secret dbname=app"
    with psycopg.connect(dsn, autocommit=True) as conn:
        for n in range(3):
            conn.execute(f"SELECT * FROM generate_series(1, {5 + n}) AS toprows").fetchall()  # 5, 6, 7 rows
        for n in range(4):
            with pytest.raises(psycopg.errors.DivisionByZero):
                conn.execute(f"SELECT {n} / 0 AS topfail")
    rows = statements(proxy)
    series = [row for row in rows if "toprows" in row["statement"]]
    assert len(series) == 1 and series[0]["calls"] == 3 and series[0]["rows"] == 18, series
    assert series[0]["statement"] == "SELECT * FROM generate_series(...) AS toprows", series
    failing = [row for row in rows if "topfail" in row["statement"]]
    assert len(failing) == 1 and failing[0]["calls"] == 4 and failing[0]["errors"] == 4, failing


def sysbench(proxy: ProxyProcess, ps_mode: str, events: int) -> int:
    base = ["sysbench", "oltp_point_select", "--db-driver=mysql", "--mysql-host=127.0.0.1",
            f"--mysql-port={proxy.ports['mysql']}", "--mysql-user=bench", "--mysql-password=bench-secret",
            "--mysql-db=bench", "--tables=1", "--table-size=1000", "--mysql-ssl=off", f"--db-ps-mode={ps_mode}",
            "--threads=4", f"--events={events}", "--time=0"]
    out = subprocess.run([*base, "run"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    return int(re.search(r"read:\s+(\d+)", out.stdout).group(1))  # type: ignore[union-attr]


def test_sysbench_statements_are_counted(proxy: ProxyProcess, mariadb_server: MariaDBInstance) -> None:
    prepare = ["sysbench", "oltp_point_select", "--db-driver=mysql", "--mysql-host=127.0.0.1",
               f"--mysql-port={mariadb_server.port}", "--mysql-user=bench", "--mysql-password=bench-secret",
               "--mysql-db=bench", "--tables=1", "--table-size=1000", "--mysql-ssl=off"]
    subprocess.run([*prepare, "cleanup"], capture_output=True, timeout=60)
    subprocess.run([*prepare, "prepare"], capture_output=True, timeout=120, check=True)
    plain = sysbench(proxy, "disable", 2000)
    prepared = sysbench(proxy, "auto", 2000)
    rows = statements(proxy)
    select = [row for row in rows if row["statement"] == "SELECT c FROM sbtest1 WHERE id=?" and row["user"] == "bench"]
    counted = sum(row["calls"] for row in select)
    assert select and abs(counted - (plain + prepared)) <= (plain + prepared) / 100, rows[:5]
    assert all(row["rows"] == row["calls"] and row["errors"] == 0 and row["endpoint"] == "mysql" for row in select)
    with pymysql.connect(host="127.0.0.1", port=proxy.ports["mysql"], user="app", password="app-secret",
                         database="app", ssl_disabled=True, autocommit=True) as conn, conn.cursor() as cursor:
        for _ in range(2):
            with pytest.raises(pymysql.err.ProgrammingError):
                cursor.execute("SELECT * FROM no_such_table_for_top WHERE id = 7")
    failing = [row for row in statements(proxy) if "no_such_table_for_top" in row["statement"]]
    assert len(failing) == 1 and failing[0]["errors"] == failing[0]["calls"] == 2, failing
    assert failing[0]["statement"].endswith("id = ?"), failing


def test_top_refuses_a_bad_limit(proxy: ProxyProcess) -> None:
    result = top(proxy, "-n", "0")
    assert result.returncode != 0 and "limit is 1 to" in result.stderr, result.stderr
