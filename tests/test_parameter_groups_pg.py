"""Parameter groups (PostgreSQL): a group's values are every client's defaults, a client's SET is its own, a reload
changes dynamic values at the next transaction and replaces backends for static ones, bad values fail cleanly."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import pytest

from devtools.servers import PostgresInstance
from proxy.control import ask_control, control_socket_path
from support import ProxyProcess, running_proxy, write_config

GROUP = {"parameters": {"statement_timeout": "7s", "work_mem": "3MB", "TimeZone": "Asia/Tokyo"}}


def connect(proxy: ProxyProcess) -> psycopg.Connection[Any]:
    return psycopg.connect(host="127.0.0.1", port=proxy.ports["postgresql"], user="app", password="app-secret",
                           dbname="app", sslmode="disable", autocommit=True)


def show(conn: psycopg.Connection[Any], name: str) -> str:
    row = conn.execute(f"SHOW {name}").fetchone()
    assert row is not None
    return str(row[0])


def reload(proxy: ProxyProcess, edit: Callable[[dict[str, Any]], None]) -> None:
    """Edit the running configuration, reload it, and wait until the reload is done."""
    data = tomllib.loads(proxy.config.read_text())
    edit(data)
    write_config(proxy.config.parent, data)
    done = proxy.log().count("reload: serving")
    os.kill(proxy.pid, signal.SIGHUP)
    deadline = time.monotonic() + 10
    while proxy.log().count("reload: serving") == done:
        assert time.monotonic() < deadline, proxy.log()[-3000:]
        time.sleep(0.05)


def test_group_defaults_overrides_and_reload(tmp_path: Path, pg_server: PostgresInstance) -> None:
    with running_proxy(tmp_path, pg_server, postgresql={"parameter_group": "app"},
                       postgresql__pool={"max_connections": 2},
                       postgresql__parameter_groups__app=GROUP) as proxy:
        clients = [connect(proxy) for _ in range(6)]  # more clients than backends
        try:
            for conn in clients:
                assert (show(conn, "statement_timeout"), show(conn, "work_mem"), show(conn, "TimeZone")) == (
                    "7s", "3MB", "Asia/Tokyo")
            clients[0].execute("SET work_mem = '5MB'")
            clients[1].execute("SET TimeZone = 'UTC'")
            for _ in range(3):  # each client's transactions move between the two backends
                for number, conn in enumerate(clients):
                    assert show(conn, "work_mem") == ("5MB" if number == 0 else "3MB")
                    assert show(conn, "TimeZone") == ("UTC" if number == 1 else "Asia/Tokyo")

            def change(data: dict[str, Any]) -> None:
                data["postgresql"]["parameter_groups"]["app"]["parameters"].update(work_mem="9MB", TimeZone="UTC")

            reload(proxy, change)
            for number, conn in enumerate(clients):  # the next transaction sees the new values
                assert show(conn, "work_mem") == ("5MB" if number == 0 else "9MB")
                assert show(conn, "TimeZone") == "UTC"
                assert show(conn, "statement_timeout") == "7s"
            clients[3].execute("RESET work_mem")  # back to the server's default, for this client only
            assert show(clients[3], "work_mem") == "4MB"
            assert [show(conn, "work_mem") for conn in clients[4:]] == ["9MB", "9MB"]
        finally:
            for conn in clients:
                conn.close()


async def _asyncpg_sleeps(port: int, count: int) -> list[str]:
    """Each client sleeps 0.5 s; the first raised its own statement_timeout, the group's is 300 ms."""
    async def one(number: int) -> str:
        conn = await asyncpg.connect(host="127.0.0.1", port=port, user="app", password="app-secret",
                                     database="app", ssl=False)
        try:
            if number == 0:
                await conn.execute("SET statement_timeout = '1min'")
            try:
                await conn.execute("SELECT pg_sleep(0.5)")
            except asyncpg.QueryCanceledError:
                return "canceled " + str(await conn.fetchval("SHOW statement_timeout"))
            return "slept " + str(await conn.fetchval("SHOW statement_timeout"))
        finally:
            await conn.close()

    return await asyncio.gather(*(one(number) for number in range(count)))


def test_asyncpg_clients_get_the_group_statement_timeout(tmp_path: Path, pg_server: PostgresInstance) -> None:
    group = {"parameters": {"statement_timeout": "300ms"}}
    with running_proxy(tmp_path, pg_server, postgresql={"parameter_group": "app"},
                       postgresql__pool={"max_connections": 2},
                       postgresql__parameter_groups__app=group) as proxy:
        results = asyncio.run(_asyncpg_sleeps(proxy.ports["postgresql"], 6))
        assert results == ["slept 1min"] + ["canceled 300ms"] * 5

def _dbproxy(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "proxy", *args], capture_output=True, text=True, timeout=60)


def _pids(clients: list[psycopg.Connection[Any]]) -> set[int]:
    return {int(conn.execute("SELECT pg_backend_pid()").fetchone()[0]) for conn in clients}  # type: ignore[index]


def test_static_parameters_reconnect_on_reload(tmp_path: Path, pg_server: PostgresInstance) -> None:
    group = {"static_parameters": {"lock_timeout": "2s"}, "parameters": {"work_mem": "3MB"}}
    with running_proxy(tmp_path, pg_server, postgresql={"parameter_group": "app"},
                       postgresql__pool={"max_connections": 2}, postgresql__parameter_groups__app=group) as proxy:
        clients = [connect(proxy) for _ in range(4)]
        try:
            assert {show(conn, "lock_timeout") for conn in clients} == {"2s"}
            clients[0].execute("SET lock_timeout = '9s'")
            assert [show(conn, "lock_timeout") for conn in clients] == ["9s", "2s", "2s", "2s"]
            clients[0].execute("RESET lock_timeout")  # back to the group's static value
            assert show(clients[0], "lock_timeout") == "2s"
            before = _pids(clients)

            def change(data: dict[str, Any]) -> None:
                data["postgresql"]["parameter_groups"]["app"]["static_parameters"]["lock_timeout"] = "3s"

            reload(proxy, change)
            assert {show(conn, "lock_timeout") for conn in clients} == {"3s"}
            assert not _pids(clients) & before  # every backend was replaced
            assert {show(conn, "work_mem") for conn in clients} == {"3MB"}
            proxy.wait_for_log("static parameters changed, replacing its backend connections")
        finally:
            for conn in clients:
                conn.close()


def test_diff_and_apply_through_the_control_socket(tmp_path: Path, pg_server: PostgresInstance) -> None:
    group = {"static_parameters": {"lock_timeout": "2s"}, "parameters": {"work_mem": "3MB"},
             "static_apply": "command"}
    with running_proxy(tmp_path, pg_server, postgresql={"parameter_group": "app"},
                       server={"pid_file": str(tmp_path / "dbproxy.pid")},
                       postgresql__pool={"max_connections": 2}, postgresql__parameter_groups__app=group) as proxy:
        config = str(proxy.config)
        clients = [connect(proxy) for _ in range(4)]
        try:
            assert {show(conn, "work_mem") for conn in clients} == {"3MB"}
            socket = control_socket_path(tmp_path / "dbproxy.pid")
            assert ask_control(socket, {"kind": "params", "action": "diff"}, 10)["rows"] == []

            def change(data: dict[str, Any]) -> None:
                app = data["postgresql"]["parameter_groups"]["app"]
                app["static_parameters"]["lock_timeout"] = "3s"
                app["parameters"]["work_mem"] = "5MB"

            reload(proxy, change)
            diff = _dbproxy("control", "params", "diff", "-c", config)
            assert diff.returncode == 0, diff.stderr
            assert re.search(r"app@app group app: static lock_timeout = 3s; backends run 2s x\d; applies at "
                             r"`dbproxy control params apply`", diff.stdout), diff.stdout
            assert re.search(r"group app: dynamic work_mem = 5MB; backends run 3072 x\d; applies at each client's "
                             r"next transaction", diff.stdout), diff.stdout
            before = _pids(clients)
            assert {show(conn, "lock_timeout") for conn in clients} == {"2s"}  # waits for `params apply`
            assert {show(conn, "work_mem") for conn in clients} == {"5MB"}  # dynamic: at once
            applied = _dbproxy("control", "params", "apply", "--group", "app", "-c", config)
            assert applied.returncode == 0 and "replacing the backend connections of postgresql/" in applied.stdout, (
                applied.stdout + applied.stderr)
            assert {show(conn, "lock_timeout") for conn in clients} == {"3s"}
            assert not _pids(clients) & before
            assert ask_control(socket, {"kind": "params", "action": "diff", "group": "app"}, 10)["rows"] == []
            none = ask_control(socket, {"kind": "params", "action": "apply"}, 10)
            assert none["replaced"] == [] and "no backend runs other static parameters" in none["message"], none
            assert ask_control(socket, {"kind": "params", "action": "undo"}, 10)["error"] == "bad_request"
        finally:
            for conn in clients:
                conn.close()


def test_bad_values_fail_cleanly(tmp_path: Path, pg_server: PostgresInstance) -> None:
    groups = {"postgresql__parameter_groups__app": GROUP,
              "postgresql__parameter_groups__bad": {"users": ["bench"], "parameters": {"work_mem": "lots"}}}
    with running_proxy(tmp_path, pg_server, postgresql={"parameter_group": "app"},
                       postgresql__pool={"max_connections": 2}, **groups) as proxy:
        clients = [connect(proxy) for _ in range(3)]
        try:
            with pytest.raises(psycopg.OperationalError, match=r'invalid value for parameter "work_mem": "lots"'):
                psycopg.connect(host="127.0.0.1", port=proxy.ports["postgresql"], user="bench",
                                password="bench-secret", dbname="app", sslmode="disable")
            assert {show(conn, "work_mem") for conn in clients} == {"3MB"}  # the others go on

            def bad(data: dict[str, Any]) -> None:
                data["postgresql"]["parameter_groups"]["app"]["parameters"]["work_mem"] = "a lot"

            reload(proxy, bad)
            assert {show(conn, "work_mem") for conn in clients} == {"3MB"}  # connected clients keep their values
            proxy.wait_for_log(r'keeps its previous parameter values: parameter group of user app: invalid value '
                               r'for parameter "work_mem"')
            with pytest.raises(psycopg.OperationalError, match=r'invalid value for parameter "work_mem": "a lot"'):
                connect(proxy)

            def fixed(data: dict[str, Any]) -> None:
                data["postgresql"]["parameter_groups"]["app"]["parameters"]["work_mem"] = "6MB"

            reload(proxy, fixed)
            clients.append(connect(proxy))
            assert {show(conn, "work_mem") for conn in clients} == {"6MB"}
        finally:
            for conn in clients:
                conn.close()


def test_reload_during_a_transaction_reaches_the_next_one(tmp_path: Path, pg_server: PostgresInstance) -> None:
    with running_proxy(tmp_path, pg_server, postgresql={"parameter_group": "app"},
                       postgresql__pool={"max_connections": 2},
                       postgresql__parameter_groups__app=GROUP) as proxy:
        conn, other = connect(proxy), connect(proxy)
        try:
            with conn.transaction():  # its session state is read back when it ends, after the reload
                conn.execute("SET application_name = 'mine'")

                def change(data: dict[str, Any]) -> None:
                    data["postgresql"]["parameter_groups"]["app"]["parameters"]["work_mem"] = "9MB"

                reload(proxy, change)
                assert show(conn, "work_mem") == "3MB"  # the transaction under way keeps its backend's
            assert (show(conn, "work_mem"), show(conn, "application_name")) == ("9MB", "mine")
            assert (show(other, "work_mem"), show(other, "application_name")) == ("9MB", "")
        finally:
            conn.close()
            other.close()
