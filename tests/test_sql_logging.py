"""Enhanced SQL logging switched on per endpoint through the API: each statement's text, timing, rows and backend
are logged on that endpoint only, on both engines, and it switches itself off when its time is up."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pymysql
import pytest

from devtools.servers import MariaDBInstance, PostgresInstance
from support import API_TOKEN, Api, ProxyProcess, running_proxy


@pytest.fixture()
def proxy(tmp_path: Path, pg_server: PostgresInstance, mariadb_server: MariaDBInstance) -> Iterator[ProxyProcess]:
    with running_proxy(tmp_path / "proxy", pg_server, mariadb_server, server={"workers": 2},
                       api={"port": 0, "token": API_TOKEN}) as running:
        yield running


def sql_lines(proxy: ProxyProcess, marker: str) -> list[str]:
    return [line for line in proxy.log().splitlines() if " sql: client " in line and marker in line]


def test_statements_are_logged_for_a_while_on_one_endpoint(proxy: ProxyProcess) -> None:
    api = Api(proxy)
    assert api.call("POST", "/v1/endpoints/nosuch/sql-logging", {"seconds": 5})[0] == 404
    assert api.call("POST", "/v1/endpoints/postgresql/sql-logging", {"seconds": -1})[0] == 400
    assert api.post("/v1/endpoints/postgresql/sql-logging", {"seconds": 3})["seconds"] == 3
    dsn = f"host=127.0.0.1 port={proxy.ports['postgresql']} user=app password=app-secret dbname=app"
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SELECT 41 + 1 AS sqllog_simple", prepare=False)
        conn.execute("SELECT %s::int AS sqllog_bound", (7,))
        with pytest.raises(psycopg.errors.DivisionByZero):
            conn.execute("SELECT 1 / 0 AS sqllog_fails")
    with pymysql.connect(host="127.0.0.1", port=proxy.ports["mysql"], user="app", password="app-secret",
                         database="app", ssl_disabled=True, autocommit=True) as conn, conn.cursor() as cursor:
        cursor.execute("SELECT 5 AS sqllog_mysql")  # the mysql endpoint is not logged
    deadline = time.monotonic() + 5
    while not sql_lines(proxy, "sqllog_fails") and time.monotonic() < deadline:
        time.sleep(0.1)
    simple = sql_lines(proxy, "sqllog_simple")
    assert len(simple) == 1 and "SELECT 41 + 1 AS sqllog_simple" in simple[0], simple
    assert "on endpoint postgresql ran on " in simple[0] and "(1 rows)" in simple[0] and " ms " in simple[0]
    bound = sql_lines(proxy, "sqllog_bound")
    assert len(bound) == 1 and "$1" in bound[0], bound  # an extended-query statement: its text with parameters
    fails = sql_lines(proxy, "sqllog_fails")
    assert len(fails) == 1 and ", failed)" in fails[0], fails
    assert not sql_lines(proxy, "sqllog_mysql")
    time.sleep(3.2)  # its time is up
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SELECT 2 AS sqllog_after", prepare=False)
    time.sleep(0.3)
    assert not sql_lines(proxy, "sqllog_after")
    assert api.post("/v1/endpoints/mysql/sql-logging", {"seconds": 30})["ok"]
    with pymysql.connect(host="127.0.0.1", port=proxy.ports["mysql"], user="app", password="app-secret",
                         database="app", ssl_disabled=True, autocommit=True) as conn, conn.cursor() as cursor:
        cursor.execute("SELECT 6 AS sqllog_mysql_on")
    deadline = time.monotonic() + 5
    while not sql_lines(proxy, "sqllog_mysql_on") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(sql_lines(proxy, "sqllog_mysql_on")) == 1
    assert api.post("/v1/endpoints/mysql/sql-logging", {"seconds": 0})["seconds"] == 0
