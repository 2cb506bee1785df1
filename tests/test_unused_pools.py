"""What pools keep for names and values clients choose is bounded: unused pools are forgotten, and the startup
settings a pool remembers are capped."""

from __future__ import annotations

import time
import urllib.request
from pathlib import Path

import psycopg
import pymysql
import pytest
import uvloop
from prometheus_client.parser import text_string_to_metric_families

from devtools.servers import MariaDBInstance, PostgresInstance, free_port
from proxy.config import parse_config
from proxy.secrets import SecretStore
from proxy.server import ProxyServer
from proxy.session import pg_login as login_module
from support import ProxyProcess, running_proxy

ASKED = 40  # logins, each to a database of its own that does not exist


def pools(proxy: ProxyProcess, engine: str) -> set[str]:
    """The databases the proxy has pools for right now (from its metrics)."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{proxy.ports['metrics']}/metrics").read().decode()
    return {sample.labels["database"] for family in text_string_to_metric_families(text) for sample in family.samples
            if sample.name == "dbproxy_database_connections" and sample.labels.get("engine") == engine
            and sample.labels.get("database")}


def pg_login(proxy: ProxyProcess, database: str) -> psycopg.Connection:
    return psycopg.connect(host="127.0.0.1", port=proxy.ports["postgresql"], user="app", password="app-secret",
                           dbname=database, autocommit=True, connect_timeout=10)


def mysql_login(proxy: ProxyProcess, database: str) -> pymysql.Connection:
    return pymysql.connect(host="127.0.0.1", port=proxy.ports["mysql"], user="app", password="app-secret",
                           database=database, autocommit=True, ssl_disabled=True)


def settled_pools(proxy: ProxyProcess, engine: str, expected: set[str], seconds: float = 15.0) -> set[str]:
    deadline = time.monotonic() + seconds
    found = pools(proxy, engine)
    while found != expected and time.monotonic() < deadline:
        time.sleep(0.2)
        found = pools(proxy, engine)
    return found


def test_pg_pools_of_unknown_databases_are_forgotten(tmp_path: Path, pg_server: PostgresInstance) -> None:
    """Each login to another database made a pool that stayed for ever, even when the database does not exist
    (40 logins: 40 pools more, for the life of the process)."""
    with running_proxy(tmp_path, pg_server, server={"metrics_port": 0},
                       postgresql__pool={"max_connections": 3, "unused_pool_timeout": 3.0}) as proxy:
        held = pg_login(proxy, "app")  # a session that stays: its pool stays too, with or without backends
        try:
            for index in range(ASKED):
                with pytest.raises(psycopg.OperationalError, match="does not exist"):
                    pg_login(proxy, f"nodb_{index}")
            assert len(pools(proxy, "postgresql")) > ASKED
            assert settled_pools(proxy, "postgresql", {"app"}) == {"app"}
            assert held.execute("SELECT current_database()").fetchone() == ("app",)
            with pytest.raises(psycopg.OperationalError, match="does not exist"):  # asked again: the same answer
                pg_login(proxy, "nodb_0")
            with pg_login(proxy, "app") as other:
                assert other.execute("SELECT 1").fetchone() == (1,)
        finally:
            held.close()
        assert "Traceback" not in proxy.log()


def test_mysql_pools_of_unknown_databases_are_forgotten(tmp_path: Path, mariadb_server: MariaDBInstance) -> None:
    """The same for MySQL, whose pools are also per client capability flags: none of them was ever removed."""
    with running_proxy(tmp_path, mariadb=mariadb_server, server={"metrics_port": 0},
                       mysql__pool={"max_connections": 3, "unused_pool_timeout": 3.0}) as proxy:
        held = mysql_login(proxy, "app")
        try:
            for index in range(ASKED):
                with pytest.raises(pymysql.err.OperationalError) as info:
                    mysql_login(proxy, f"nodb_{index}")
                assert info.value.args[0] in (1044, 1049)  # no access to that database, or no such database
            assert len(pools(proxy, "mysql")) > ASKED
            assert settled_pools(proxy, "mysql", {"app"}) == {"app"}
            with held.cursor() as cur:
                cur.execute("SELECT DATABASE()")
                assert cur.fetchone() == ("app",)
            with pytest.raises(pymysql.err.OperationalError) as info:
                mysql_login(proxy, "nodb_0")
            assert info.value.args[0] in (1044, 1049)
            other = mysql_login(proxy, "app")
            with other.cursor() as cur:
                cur.execute("SELECT 1")
                assert cur.fetchone() == (1,)
            other.close()
        finally:
            held.close()
        assert "Traceback" not in proxy.log()


def test_pg_remembered_startup_settings_are_bounded(pg_server: PostgresInstance,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A pool remembers which startup settings the server accepted (to check each once); the values are the
    clients' own (application_name), so what it remembers is bounded (here at 5 instead of 10 000)."""
    monkeypatch.setattr(login_module, "VALIDATED_SETTINGS_LIMIT", 5)
    config = parse_config({"server": {"client_login_timeout": 3.0, "workers": 1},
                           "postgresql": {"port": free_port(), "backend_port": pg_server.port},
                           "mysql": {"enabled": False}})

    async def main() -> int:
        server = ProxyServer(config, SecretStore({"app": "app-secret"}))
        await server.start()
        try:
            for index in range(12):
                conn = await psycopg.AsyncConnection.connect(
                    host="127.0.0.1", port=server.ports["postgresql"], user="app", password="app-secret",
                    dbname="app", application_name=f"app-{index}")
                await conn.close()
            return max(len(pool.validated_settings) for pool in server.postgres.target.pools.values())
        finally:
            await server.stop()

    assert uvloop.run(main()) <= 5
