"""Parameter groups (PostgreSQL): a group's values are every client's defaults, a client's SET is its own, a reload
changes dynamic values at the next transaction and replaces backends for static ones, bad values fail cleanly."""

from __future__ import annotations

import asyncio
import os
import signal
import time
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
from psycopg import errors

from devtools.servers import PostgresInstance
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
            with clients[2].transaction():  # the group's statement_timeout is in force
                clients[2].execute("SET LOCAL statement_timeout = 200")
                try:
                    clients[2].execute("SELECT pg_sleep(1)")
                    raise AssertionError("statement_timeout did not cancel")
                except errors.QueryCanceled:
                    pass

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


async def _asyncpg_values(port: int, count: int) -> list[tuple[str, str]]:
    async def one(number: int) -> tuple[str, str]:
        conn = await asyncpg.connect(host="127.0.0.1", port=port, user="app", password="app-secret",
                                     database="app", ssl=False)
        try:
            if number == 0:
                await conn.execute("SET statement_timeout = '1min'")
            await asyncio.sleep(0.05)
            return str(await conn.fetchval("SHOW statement_timeout")), str(await conn.fetchval("SHOW work_mem"))
        finally:
            await conn.close()

    return await asyncio.gather(*(one(number) for number in range(count)))


def test_asyncpg_clients_see_the_group(tmp_path: Path, pg_server: PostgresInstance) -> None:
    with running_proxy(tmp_path, pg_server, postgresql={"parameter_group": "app"},
                       postgresql__pool={"max_connections": 2},
                       postgresql__parameter_groups__app=GROUP) as proxy:
        values = asyncio.run(_asyncpg_values(proxy.ports["postgresql"], 8))
        assert values[0] == ("1min", "3MB")
        assert values[1:] == [("7s", "3MB")] * 7
