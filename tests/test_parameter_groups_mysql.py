"""Parameter groups (MySQL/MariaDB): time_zone and sql_mode of a group are every client's defaults, a client's SET
is its own, a reload reaches every client's next transaction, a refused value reaches the client logging in."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

import pymysql
import pytest

from devtools.servers import MariaDBInstance
from support import ProxyProcess, running_proxy, write_config

GROUP = {"parameters": {"time_zone": "+09:00", "sql_mode": "STRICT_ALL_TABLES", "max_heap_table_size": 1048576}}


def connect(proxy: ProxyProcess, user: str = "app") -> pymysql.Connection:
    return pymysql.connect(host="127.0.0.1", port=proxy.ports["mysql"], user=user, password=f"{user}-secret",
                           database=user, autocommit=True)


def values(conn: pymysql.Connection) -> tuple[Any, ...]:
    with conn.cursor() as cur:
        cur.execute("SELECT @@time_zone, @@sql_mode, @@max_heap_table_size")
        row = cur.fetchone()
        assert row is not None
        return tuple(row)


def reload(proxy: ProxyProcess, parameters: dict[str, Any]) -> None:
    data = tomllib.loads(proxy.config.read_text())
    data["mysql"]["parameter_groups"]["app"]["parameters"].update(parameters)
    write_config(proxy.config.parent, data)
    done = proxy.log().count("reload: serving")
    os.kill(proxy.pid, signal.SIGHUP)
    deadline = time.monotonic() + 10
    while proxy.log().count("reload: serving") == done:
        assert time.monotonic() < deadline, proxy.log()[-3000:]
        time.sleep(0.05)


def test_mysql_group_defaults_overrides_reload_and_refusal(tmp_path: Path, mariadb_server: MariaDBInstance) -> None:
    groups = {"mysql__parameter_groups__app": GROUP,
              "mysql__parameter_groups__bad": {"users": ["bench"], "parameters": {"time_zone": "nowhere"}}}
    with running_proxy(tmp_path, mariadb=mariadb_server, mysql={"parameter_group": "app"},
                       server={"pid_file": str(tmp_path / "dbproxy.pid")}, mysql__pool={"max_connections": 2},
                       **groups) as proxy:
        clients = [connect(proxy) for _ in range(5)]  # more clients than backends
        try:
            default = ("+09:00", "STRICT_ALL_TABLES", 1048576)
            assert [values(conn) for conn in clients] == [default] * 5
            with clients[0].cursor() as cur:
                cur.execute("SET time_zone = '+01:00'")
            with clients[1].cursor() as cur:
                cur.execute("SET sql_mode = 'ANSI_QUOTES'")
            for _ in range(3):  # transactions move between the two backends: a SET stays its client's
                found = [values(conn) for conn in clients]
                assert found[0] == ("+01:00", "STRICT_ALL_TABLES", 1048576)
                assert found[1] == ("+09:00", "ANSI_QUOTES", 1048576)
                assert found[2:] == [default] * 3
            clients[2].ping()
            reload(proxy, {"time_zone": "+02:00", "max_heap_table_size": 2097152})
            diff = subprocess.run([sys.executable, "-m", "proxy", "control", "params", "diff", "-c", str(proxy.config)],
                                  capture_output=True, text=True, timeout=60)
            assert re.search(r"mysql/\S+ app@app group app: dynamic time_zone = \+02:00; backends run .*'\+09:00' x\d",
                             diff.stdout), diff.stdout + diff.stderr
            found = [values(conn) for conn in clients]  # the next transaction sees the new values
            assert found[0] == ("+01:00", "STRICT_ALL_TABLES", 2097152)
            assert found[1] == ("+02:00", "ANSI_QUOTES", 2097152)
            assert found[2:] == [("+02:00", "STRICT_ALL_TABLES", 2097152)] * 3
            with pytest.raises(pymysql.err.MySQLError, match="Unknown or incorrect time zone: 'nowhere'"):
                connect(proxy, "bench")
            assert [values(conn)[0] for conn in clients[2:]] == ["+02:00"] * 3  # the others go on
            reload(proxy, {"time_zone": "Nowhere/Else"})  # refused at the next borrow: logged, the previous kept
            for _ in range(2):
                assert [values(conn)[0] for conn in clients[1:]] == ["+02:00"] * 4
            proxy.wait_for_log(r"keeps its previous time_zone: the server refuses its parameter group's \(Unknown or "
                               r"incorrect time zone: 'Nowhere/Else'\)")
            assert values(clients[0])[0] == "+01:00"  # its own
            reload(proxy, {"time_zone": "+03:00"})
            assert [values(conn)[0] for conn in clients] == ["+01:00"] + ["+03:00"] * 4
        finally:
            for conn in clients:
                conn.close()
