"""Failover and switchover through the HTTP API against a real PostgreSQL primary and its streaming standby: the
same code as `dbproxy failover` and `dbproxy switchover`, with the answers and statuses the API documents."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from devtools.servers import PostgresInstance, free_port
from replicated import monitor_secret, postgres_pair
from support import API_TOKEN as TOKEN
from support import Api, ProxyProcess, write_config

INTERVAL = 0.3


@pytest.fixture()
def pair(tmp_path: Path) -> Iterator[tuple[PostgresInstance, PostgresInstance]]:
    with postgres_pair(tmp_path) as found:
        yield found


def _proxy(folder: Path, sections: dict[str, dict[str, Any]]) -> ProxyProcess:
    folder.mkdir()
    base = {"server": {"log_level": "info", "workers": 2}, "secrets": {"file": "secrets.toml"},
            "api": {"port": 0, "token": TOKEN}, "mysql": {"enabled": False},
            "postgresql.pool": {"max_connections": 4, "connection_borrow_timeout": 20.0}}
    proxy = ProxyProcess(write_config(folder, {**base, **sections}), folder / "proxy.log")
    proxy.start()
    return proxy


def _write(conn: psycopg.Connection[Any]) -> int:
    row = conn.execute("INSERT INTO t (port) SELECT inet_server_port() RETURNING port").fetchone()
    assert row is not None
    return int(row[0])


def _wait_for_writer(api: Api, name: str) -> None:
    deadline = time.monotonic() + 10
    while not any(row["name"] == name and row["role"] == "writer" and row["healthy"]
                  for row in api.get("/v1/instances")):
        assert time.monotonic() < deadline, api.get("/v1/instances")
        time.sleep(0.1)


def test_failover_through_the_api(tmp_path: Path, pair: tuple[PostgresInstance, PostgresInstance],
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    primary, standby = pair
    user = monitor_secret(monkeypatch, primary)
    proxy = _proxy(tmp_path / "proxy", {
        "postgresql.clusters.main": {"instances": [{"name": "one", "host": primary.host, "port": primary.port},
                                                   {"name": "two", "host": standby.host, "port": standby.port}],
                                     "monitor_interval": INTERVAL, "monitor_user": user},
        "postgresql.endpoints.rw": {"port": free_port(), "cluster": "main"}})
    try:
        api = Api(proxy)
        _wait_for_writer(api, "one")
        status, answer = api.call("POST", "/v1/failover", {"to": "one"})
        assert status == 409 and "is the writer already" in answer["error"]
        primary.kill()
        status, answer = api.call("POST", "/v1/failover", {"to": "one"})
        assert status == 502 and "is unreachable" in answer["error"]
        assert primary.superuser_password not in str(answer)
        promoted = api.post("/v1/failover", {"to": "two", "cluster": "main"})
        assert promoted["ok"] and promoted["cluster"] == "main" and "promoted two" in promoted["message"]
        assert standby.psql("SELECT pg_is_in_recovery()") == "f"
        _wait_for_writer(api, "two")
        with psycopg.connect(host="127.0.0.1", port=proxy.ports["rw"], user="app", password="app-secret",
                             dbname="app", autocommit=True, connect_timeout=30) as conn:
            deadline = time.monotonic() + 10
            while True:  # each worker follows at its own monitor round
                try:
                    assert _write(conn) == standby.port
                    break
                except (psycopg.Error, AssertionError):
                    assert time.monotonic() < deadline
                    time.sleep(0.2)
        assert api.endpoint("rw")["serving"] == ["two"]
        one = next(row for row in api.get("/v1/instances") if row["name"] == "one")
        assert one["healthy"] is False and one["fenced"] is True
    finally:
        proxy.stop()


def test_switchover_through_the_api(tmp_path: Path, pair: tuple[PostgresInstance, PostgresInstance],
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    blue, green = pair
    user = monitor_secret(monkeypatch, blue)
    proxy = _proxy(tmp_path / "proxy", {
        "postgresql.clusters.blue": {"instances": [{"name": "blue-1", "host": blue.host, "port": blue.port}],
                                     "monitor_interval": INTERVAL, "monitor_user": user},
        "postgresql.clusters.green": {"instances": [{"name": "green-1", "host": green.host, "port": green.port}],
                                      "monitor_interval": INTERVAL, "monitor_user": user},
        "postgresql.endpoints.rw": {"port": free_port(), "cluster": "blue"}})
    try:
        api = Api(proxy)
        _wait_for_writer(api, "blue-1")
        with psycopg.connect(host="127.0.0.1", port=proxy.ports["rw"], user="app", password="app-secret",
                             dbname="app", autocommit=True, connect_timeout=30) as conn:
            assert _write(conn) == blue.port
            status, answer = api.call("POST", "/v1/switchover", {"to": "blue"})
            assert status == 409 and "outside cluster 'blue'" in answer["error"], answer
            done = api.post("/v1/switchover", {"to": "green", "endpoint": "rw", "timeout": 10})
            assert done["ok"] and done["cluster"] == "green" and done["endpoints"] == ["rw"], done
            assert done["held_ms"] < 10_000
            assert _write(conn) == green.port  # the same client connection, now on green
        endpoint = api.endpoint("rw")
        assert endpoint["cluster"] == "green" and endpoint["serving"] == ["green-1"]
        assert api.get("/v1/config")["postgresql"]["endpoints"]["rw"]["cluster"] == "green"
        assert blue.psql("SHOW default_transaction_read_only") == "on"
    finally:
        proxy.stop()
