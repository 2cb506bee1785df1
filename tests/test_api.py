"""The HTTP control API of a running proxy (two workers under a supervisor, and a single process): bearer auth,
the read views, reload, pause/resume holding a real client's transaction, client kill with the admin-shutdown
error on both protocols, pool reconnect, failover/switchover refusals from the real code paths, endpoint edits
served at once, the `dbproxy` subcommands over the control socket, and /readyz following a stopped instance."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pymysql
import pytest

from devtools.servers import MariaDBInstance, PostgresInstance, free_port, start_postgres
from support import API_TOKEN as TOKEN
from support import Api, ProxyProcess, write_config


def _start(folder: Path, sections: dict[str, dict[str, Any]]) -> ProxyProcess:
    folder.mkdir(parents=True, exist_ok=True)
    proxy = ProxyProcess(write_config(folder, sections), folder / "proxy.log")
    proxy.start(timeout=30)
    return proxy


def _sections(pg: PostgresInstance, workers: int, monitor_interval: float = 0.5) -> dict[str, dict[str, Any]]:
    return {
        "server": {"log_level": "info", "client_login_timeout": 3.0, "workers": workers},
        "secrets": {"file": "secrets.toml"},
        "api": {"port": 0, "token": TOKEN, "health_port": 0},
        "postgresql.pool": {"max_connections": 10, "connection_borrow_timeout": 30.0},
        "postgresql.clusters.main": {"instances": [{"host": pg.host, "port": pg.port, "name": "primary"}],
                                     "monitor_interval": monitor_interval, "monitor_user": "app"},
        "postgresql.endpoints.rw": {"port": 0, "cluster": "main"},
    }


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory, pg_server: PostgresInstance,
          mariadb_server: MariaDBInstance) -> Iterator[ProxyProcess]:
    """Two workers under a supervisor: a monitored PostgreSQL cluster behind endpoint rw, MariaDB behind mysql."""
    sections = _sections(pg_server, workers=2)
    sections["mysql"] = {"enabled": True, "port": free_port(), "backend_port": mariadb_server.port}
    sections["mysql.pool"] = {"max_connections": 10, "connection_borrow_timeout": 30.0}
    started = _start(tmp_path_factory.mktemp("api"), sections)
    yield started
    started.stop()


@pytest.fixture(scope="module")
def api(proxy: ProxyProcess) -> Api:
    client = Api(proxy)
    deadline = time.monotonic() + 15
    while client.call("GET", "/readyz")[0] != 200:  # the monitors' first round
        assert time.monotonic() < deadline, client.call("GET", "/readyz")
        time.sleep(0.1)
    return client


def _pg(port: int) -> psycopg.Connection[Any]:
    return psycopg.connect(host="127.0.0.1", port=port, user="app", password="app-secret", dbname="app",
                           autocommit=True, connect_timeout=5)


def _my(port: int) -> pymysql.connections.Connection[Any]:
    return pymysql.connect(host="127.0.0.1", port=port, user="app", password="app-secret", database="app",
                           connect_timeout=5, autocommit=True)


def test_refuses_requests_without_the_token(api: Api) -> None:
    for token in (None, "wrong", TOKEN + "x", ""):
        status, answer = api.call("GET", "/v1/stats", token=token)
        assert status == 401 and "bearer token" in answer["error"]
    status, answer = api.call("GET", "/v1/config", token=None)
    assert status == 401
    basic = urllib.request.Request(f"{api.base}/v1/pools", headers={"Authorization": f"Basic {TOKEN}"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(basic, timeout=10)
    assert refused.value.code == 401
    # health needs no token, on the API port and on the health port
    assert api.call("GET", "/healthz", token=None) == (200, {"status": "ok"})
    assert api.call("GET", "/readyz", token=None, port="health")[0] == 200


def test_read_views(api: Api, pg_server: PostgresInstance, mariadb_server: MariaDBInstance) -> None:
    with _pg(api.proxy.ports["rw"]) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
    with _my(api.proxy.ports["mysql"]) as conn, conn.cursor() as cursor:
        cursor.execute("SELECT 2")
        assert cursor.fetchone() == (2,)
    clusters = {(row["engine"], row["name"]): row for row in api.get("/v1/clusters")}
    main = clusters[("postgresql", "main")]
    assert main["monitored"] and main["writer"] == "primary" and main["endpoints"] == ["rw"]
    assert clusters[("mysql", "mysql")]["instances"][0]["port"] == mariadb_server.port
    instances = {row["name"]: row for row in api.get("/v1/instances")}
    primary = instances["primary"]
    assert (primary["role"], primary["healthy"], primary["port"]) == ("writer", True, pg_server.port)
    assert primary["lag_seconds"] is None and primary["fenced"] is False
    endpoints = {row["name"]: row for row in api.get("/v1/endpoints")}
    assert endpoints["rw"]["port"] == api.proxy.ports["rw"] and endpoints["rw"]["listening"]
    assert endpoints["rw"]["serving"] == ["primary"] and endpoints["mysql"]["engine"] == "mysql"
    pools = api.get("/v1/pools")
    assert {(p["endpoint"], p["user"]) for p in pools} >= {("rw", "app"), ("mysql", "app")}
    assert sum(p["transactions"] for p in pools if p["endpoint"] == "rw") >= 1
    stats = api.get("/v1/stats")
    assert sum(e["logins_ok"] for e in stats["endpoints"] if e["endpoint"] == "rw") >= 1
    config = api.get("/v1/config")
    assert config["api"]["token"] == "<redacted>" and config["postgresql"]["endpoints"]["rw"]["cluster"] == "main"
    assert TOKEN not in json.dumps(config) and TOKEN not in api.proxy.log()
    metrics = api.call("GET", "/metrics", token=None, port="health")
    assert metrics[0] == 200 and 'dbproxy_transactions_total{cluster="main"' in metrics[1]
    document = api.get("/v1/openapi.json")
    assert document["openapi"].startswith("3.") and "/v1/pause" in document["paths"]


def test_bad_requests_are_json_errors(api: Api) -> None:
    status, answer = api.call("POST", "/v1/pause", raw=b"{not json")
    assert status == 400 and answer["error"].startswith("the body is not valid JSON")
    status, answer = api.call("POST", "/v1/pause", raw=b"[1, 2]")
    assert status == 400 and "JSON object" in answer["error"]
    status, answer = api.call("POST", "/v1/pause", {"endpoint": "nope"})
    assert status == 404 and "nope" in answer["error"]
    status, answer = api.call("POST", "/v1/clients/abc/kill")
    assert status in (400, 404) and "error" in answer
    status, answer = api.call("GET", "/v1/nothing")
    assert status == 404 and "error" in answer
    status, answer = api.call("DELETE", "/v1/stats")
    assert status == 405 and "error" in answer


def _run_later(work: Any) -> tuple[threading.Thread, dict[str, Any]]:
    result: dict[str, Any] = {}

    def run() -> None:
        try:
            result["value"] = work()
        except Exception as exc:
            result["error"] = exc
        result["at"] = time.monotonic()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, result


def test_pause_holds_new_transactions_until_resume(api: Api) -> None:
    with _pg(api.proxy.ports["rw"]) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
        assert api.post("/v1/pause", {"endpoint": "rw"})["endpoints"] == ["rw"]
        assert api.endpoint("rw")["paused"] is True
        thread, result = _run_later(lambda: conn.execute("SELECT 42").fetchone())
        thread.join(1.0)
        assert thread.is_alive() and not result, "a paused endpoint lent a backend"
        resumed_at = time.monotonic()
        api.post("/v1/resume", {})
        thread.join(10)
        assert result.get("value") == (42,), result
        assert result["at"] >= resumed_at
    assert api.endpoint("rw")["paused"] is False


def test_kill_ends_a_postgresql_client_with_admin_shutdown(api: Api) -> None:
    victim, bystander = _pg(api.proxy.ports["rw"]), _pg(api.proxy.ports["rw"])
    try:
        victim.execute("SELECT 1")
        client_id = victim.info.backend_pid
        answer = api.post(f"/v1/clients/{client_id}/kill")
        assert answer["ok"] and answer["id"] == client_id
        with pytest.raises(psycopg.OperationalError) as ended:
            victim.execute("SELECT 1")
        assert ended.value.sqlstate == "57P01", ended.value
        assert bystander.execute("SELECT 3").fetchone() == (3,)
        status, gone = api.call("POST", f"/v1/clients/{client_id}/kill")
        assert status == 404 and str(client_id) in gone["error"]
    finally:
        victim.close()
        bystander.close()


def test_kill_ends_a_mysql_client_with_1927(api: Api) -> None:
    victim = _my(api.proxy.ports["mysql"])
    try:
        with victim.cursor() as cursor:
            cursor.execute("SELECT CONNECTION_ID()")
            (client_id,) = cursor.fetchone()
        assert client_id == victim.thread_id()
        api.post(f"/v1/clients/{client_id}/kill")
        with pytest.raises(pymysql.err.OperationalError) as ended, victim.cursor() as cursor:
            cursor.execute("SELECT 1")
        assert ended.value.args[0] == 1927, ended.value
    finally:
        victim.close()


def test_reconnect_replaces_backends(api: Api, pg_server: PostgresInstance) -> None:
    with _pg(api.proxy.ports["rw"]) as conn:
        (before,) = conn.execute("SELECT pg_backend_pid()").fetchone()
        api.post("/v1/pools/reconnect", {"endpoint": "rw"})
        (after,) = conn.execute("SELECT pg_backend_pid()").fetchone()
        assert after != before
    deadline = time.monotonic() + 5
    while pg_server.psql(f"SELECT count(*) FROM pg_stat_activity WHERE pid = {before}").strip() != "0":
        assert time.monotonic() < deadline, "the replaced backend is still connected"
        time.sleep(0.1)


def test_failover_and_switchover_refusals(api: Api) -> None:
    status, answer = api.call("POST", "/v1/failover", {"to": "nosuch"})
    assert status == 404 and "no instance 'nosuch'" in answer["error"]
    status, answer = api.call("POST", "/v1/failover", {"to": "primary"})  # probed for real: it writes already
    assert status == 409 and "is the writer already" in answer["error"]
    status, answer = api.call("POST", "/v1/failover", {})
    assert status == 400
    status, answer = api.call("POST", "/v1/switchover", {"to": "green"})
    assert status == 409 and "no cluster 'green'" in answer["error"]
    status, answer = api.call("POST", "/v1/switchover", {"to": "main", "timeout": -1})
    assert status == 400


def test_reload(api: Api) -> None:
    answer = api.post("/v1/reload")
    assert answer["ok"] and answer["ports"]["rw"] == api.proxy.ports["rw"]


def test_endpoint_add_change_remove(api: Api) -> None:
    added = api.post("/v1/endpoints", {"name": "extra", "engine": "postgresql", "port": 0, "cluster": "main"},
                     expect=201)
    assert added["listening"] and added["cluster"] == "main" and added["port"] > 0
    with _pg(added["port"]) as conn:
        assert conn.execute("SELECT 7").fetchone() == (7,)
    status, answer = api.call("POST", "/v1/endpoints", {"name": "extra", "port": 0, "cluster": "main"})
    assert status == 409
    status, answer = api.call("POST", "/v1/endpoints", {"name": "bad", "port": 0, "cluster": "nosuch"})
    assert status == 400 and "nosuch" in answer["error"]
    changed = api.call("PATCH", "/v1/endpoints/extra", {"pool": {"max_connections": 3}})
    assert changed[0] == 200, changed
    assert api.get("/v1/config")["postgresql"]["endpoints"]["extra"]["pool"]["max_connections"] == 3
    api.post("/v1/reload")  # the file is read again: the edits stay over it
    assert api.endpoint("extra")["port"] == added["port"]
    assert api.call("DELETE", "/v1/endpoints/extra")[0] == 200
    assert "extra" not in {row["name"] for row in api.get("/v1/endpoints")}
    with pytest.raises(psycopg.OperationalError):
        _pg(added["port"])
    assert api.call("DELETE", "/v1/endpoints/extra")[0] == 404


def _dbproxy(proxy: ProxyProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "proxy", *args, "-c", str(proxy.config)], capture_output=True,
                          text=True, timeout=30)


def test_cli_commands(api: Api) -> None:
    done = _dbproxy(api.proxy, "pause", "--endpoint", "rw")
    assert done.returncode == 0 and "paused: rw" in done.stdout, done.stderr
    assert api.endpoint("rw")["paused"] is True
    done = _dbproxy(api.proxy, "resume")
    assert done.returncode == 0 and "resumed" in done.stdout, done.stderr
    assert api.endpoint("rw")["paused"] is False
    with _pg(api.proxy.ports["rw"]) as conn:
        conn.execute("SELECT 1")
        done = _dbproxy(api.proxy, "kill", str(conn.info.backend_pid))
        assert done.returncode == 0, done.stderr
        with pytest.raises(psycopg.OperationalError):
            conn.execute("SELECT 1")
    missing = _dbproxy(api.proxy, "kill", "999")
    assert missing.returncode == 1 and "no client 999" in missing.stderr


def test_readyz_follows_the_only_instance(tmp_path: Path) -> None:
    """One process; its only instance stops: /readyz turns 503 naming the endpoint, /v1/instances says why."""
    pg = start_postgres(tmp_path / "pg", users={"app": "app-secret"})
    try:
        proxy = _start(tmp_path / "proxy", _sections(pg, workers=1, monitor_interval=0.3))
        try:
            api = Api(proxy)
            deadline = time.monotonic() + 10
            while api.call("GET", "/readyz", token=None, port="health")[0] != 200:
                assert time.monotonic() < deadline
                time.sleep(0.1)
            pg.stop()
            deadline = time.monotonic() + 10
            while (answer := api.call("GET", "/readyz", token=None, port="health"))[0] != 503:
                assert time.monotonic() < deadline, answer
                time.sleep(0.1)
            assert answer[1]["status"] == "not ready" and "endpoint rw" in answer[1]["reasons"][0]
            assert api.call("GET", "/healthz", token=None, port="health")[0] == 200
            (instance,) = api.get("/v1/instances")
            assert instance["healthy"] is False and instance["error"]
        finally:
            proxy.stop()
    finally:
        pg.stop()


def test_api_token_file_must_be_readable(tmp_path: Path, pg_server: PostgresInstance) -> None:
    sections = _sections(pg_server, workers=1)
    sections["api"] = {"port": 0, "token_file": "missing-token"}
    config = write_config(tmp_path, sections)
    done = subprocess.run([sys.executable, "-m", "proxy", "run", "--check", "-c", str(config)], capture_output=True,
                          text=True, timeout=30)
    assert done.returncode == 2 and "token_file" in done.stderr
