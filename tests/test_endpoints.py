"""Clusters, instances and endpoints: validation, which instance each endpoint serves, and real clients on each."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pymysql
import pytest

from devtools.servers import MariaDBInstance, PostgresInstance, free_port, start_mariadb, start_postgres
from proxy.config import EndpointRole, load_config, parse_config
from proxy.endpoints import resolve_endpoints
from proxy.errors import ConfigError
from support import SECRETS, ProxyProcess, write_config

SOURCE = Path(__file__).resolve().parents[1]


def cluster(*ports: int, roles: tuple[str | None, ...] = ()) -> dict[str, Any]:
    instances = []
    for number, port in enumerate(ports):
        instance: dict[str, Any] = {"name": f"i{number + 1}", "host": "127.0.0.1", "port": port}
        role = roles[number] if number < len(roles) else None
        if role:
            instance["role"] = role
        instances.append(instance)
    return {"instances": instances}


def two_endpoints(engine: str, first: int, second: int, **extra: dict[str, Any]) -> dict[str, Any]:
    """An engine section with one cluster of two instances, a read_write and a read_only endpoint."""
    return {engine: {"clusters": {"main": cluster(first, second, roles=("writer", "reader"))},
                     "endpoints": {"rw": {"port": 7001, "cluster": "main", "role": "read_write"},
                                   "ro": {"port": 7002, "cluster": "main", "role": "read_only"}, **extra}}}


# --- validation: each refusal names the key, the file and the reason ---

REFUSALS = [
    ("unknown key", {"postgresql": {"clusters": {"main": {**cluster(5432), "colour": "red"}},
                                    "endpoints": {"rw": {"port": 7001, "cluster": "main"}}}},
     "unknown key 'postgresql.clusters.main.colour'"),
    ("unknown endpoint key", {"postgresql": {"clusters": {"main": cluster(5432)},
                                             "endpoints": {"rw": {"port": 7001, "cluster": "main", "weight": 1}}}},
     "unknown key 'postgresql.endpoints.rw.weight'"),
    ("no such cluster", {"postgresql": {"clusters": {"main": cluster(5432)},
                                        "endpoints": {"rw": {"port": 7001, "cluster": "other"}}}},
     "'postgresql.endpoints.rw.cluster': no cluster 'other'"),
    ("member not in cluster", {"mysql": {"clusters": {"main": cluster(3306, 3307)},
                                         "endpoints": {"c": {"port": 7001, "cluster": "main", "role": "custom",
                                                             "members": ["i1", "i9"]}}}},
     "'mysql.endpoints.c.members': 'i9' is not an instance of cluster 'main'"),
    ("excluded not in cluster", {"mysql": {"clusters": {"main": cluster(3306, 3307)},
                                           "endpoints": {"c": {"port": 7001, "cluster": "main", "role": "custom",
                                                               "exclude": ["i9"]}}}},
     "'mysql.endpoints.c.exclude': 'i9' is not an instance of cluster 'main'"),
    ("two endpoints on one port", two_endpoints("postgresql", 5432, 5433,
                                                ro={"port": 7001, "cluster": "main", "role": "read_only"}),
     "'postgresql.endpoints.ro.port': port 7001 is already taken by 'postgresql.endpoints.rw.port'"),
    ("one port across engines", {**two_endpoints("postgresql", 5432, 5433),
                                 "mysql": {"enabled": True, "port": 7002}},
     "'mysql.port': port 7002 is already taken by 'postgresql.endpoints.ro.port'"),
    ("shorthand mixed with clusters", {"postgresql": {"backend_port": 5433, **two_endpoints("postgresql", 5432,
                                                                                            5433)["postgresql"]}},
     "'postgresql.backend_port': the single-backend form"),
    ("custom without a list", {"postgresql": {"clusters": {"main": cluster(5432)},
                                              "endpoints": {"c": {"port": 7001, "cluster": "main",
                                                                  "role": "custom"}}}},
     "'postgresql.endpoints.c': a custom endpoint needs exactly one of 'members' or 'exclude'"),
    ("members on a read_only endpoint", {"postgresql": {"clusters": {"main": cluster(5432)},
                                                        "endpoints": {"c": {"port": 7001, "cluster": "main",
                                                                            "role": "read_only",
                                                                            "members": ["i1"]}}}},
     "'postgresql.endpoints.c.members': only a custom endpoint"),
    ("two writers", {"postgresql": {"clusters": {"main": cluster(5432, 5433, roles=("writer", "writer"))},
                                    "endpoints": {"rw": {"port": 7001, "cluster": "main"}}}},
     "'postgresql.clusters.main.instances': more than one instance has role \"writer\""),
    ("monitoring without a user", {"postgresql": {"clusters": {"main": {**cluster(5432), "monitor_interval": 1.0}},
                                                  "endpoints": {"rw": {"port": 7001, "cluster": "main"}}}},
     "'postgresql.clusters.main.monitor_user': monitor_interval is set but no monitor_user is given"),
    ("reader keys on a custom endpoint", {"postgresql": {"clusters": {"main": cluster(5432)},
                                                         "endpoints": {"c": {"port": 7001, "cluster": "main",
                                                                             "role": "custom", "members": ["i1"],
                                                                             "reader_fallback": False}}}},
     "'postgresql.endpoints.c.reader_fallback': only a read_only endpoint chooses among readers"),
    ("negative lag limit", {"postgresql": {"clusters": {"main": {**cluster(5432), "max_replica_lag": -1}},
                                           "endpoints": {"rw": {"port": 7001, "cluster": "main"}}}},
     "postgresql.clusters.main.max_replica_lag"),
    ("clusters without endpoints", {"postgresql": {"clusters": {"main": cluster(5432)}}},
     "'postgresql.endpoints': clusters are given but no endpoint serves them"),
    ("same name in both engines", {**two_endpoints("postgresql", 5432, 5433),
                                   "mysql": {"clusters": {"main": cluster(3306)},
                                             "endpoints": {"rw": {"port": 7003, "cluster": "main"}}}},
     "'mysql.endpoints.rw.port': a second endpoint named 'rw'"),
]


@pytest.mark.parametrize(("data", "expected"), [(data, expected) for _, data, expected in REFUSALS],
                         ids=[name for name, _, _ in REFUSALS])
def test_a_bad_cluster_config_is_refused_with_the_key_the_file_and_the_reason(data: dict[str, Any],
                                                                              expected: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(data, "where.toml")
    assert str(caught.value).startswith("where.toml: "), caught.value
    assert expected in str(caught.value)


def test_check_reports_an_endpoint_naming_a_missing_cluster(tmp_path: Path) -> None:
    config = write_config(tmp_path, {"secrets": {"file": "secrets.toml"}, "postgresql.clusters.main": cluster(5432),
                                     "postgresql.endpoints.rw": {"port": 7001, "cluster": "mian"}})
    result = subprocess.run([sys.executable, "-m", "proxy", "run", "-c", str(config), "--check"],
                            capture_output=True, text=True, cwd=SOURCE, timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip() == (f"dbproxy: configuration error: {config}: 'postgresql.endpoints.rw.cluster': "
                                     "no cluster 'mian' in [postgresql.clusters] (known: main)")


def test_the_example_cluster_config_passes_check() -> None:
    result = subprocess.run([sys.executable, "-m", "proxy", "run", "-c", "config/clusters.toml", "--check"],
                            capture_output=True, text=True, cwd=SOURCE, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "config/clusters.toml: OK"


# --- which instance an endpoint serves, and with which settings ---

ROLE_TABLE = [  # instance role hints, endpoint role and list -> the instance served
    ((None, None, None), "read_write", {}, "i1"),
    ((None, "writer", None), "read_write", {}, "i2"),
    (("reader", "writer", "reader"), "read_write", {}, "i2"),
    ((None, None, "reader"), "read_only", {}, "i3"),
    (("writer", None, None), "read_only", {}, "i2"),
    ((None, None, None), "read_only", {}, "i2"),
    (("writer",), "read_only", {}, "i1"),
    ((None, None, None), "custom", {"members": ["i3", "i1"]}, "i3"),
    ((None, None, None), "custom", {"exclude": ["i1"]}, "i2"),
    ((None, None, None), "custom", {"exclude": ["i1", "i2"]}, "i3"),
]


@pytest.mark.parametrize(("roles", "role", "lists", "served"), ROLE_TABLE)
def test_each_endpoint_serves_the_instance_its_role_picks(roles: tuple[str | None, ...], role: str,
                                                          lists: dict[str, list[str]], served: str) -> None:
    ports = [5432 + number for number in range(len(roles))]
    config = parse_config({"postgresql": {"clusters": {"main": cluster(*ports, roles=roles)},
                                          "endpoints": {"e": {"port": 7001, "cluster": "main", "role": role,
                                                              **lists}}}})
    (endpoint,) = resolve_endpoints(config)
    assert (endpoint.instance, endpoint.role) == (served, EndpointRole(role))
    assert endpoint.address == ("127.0.0.1", ports[int(served[1:]) - 1])


SPREAD_TABLE = [  # instance role hints, endpoint role and list -> the instances it may use, those it serves at start
    ((None, None, None), "read_write", {}, ["i1"], ["i1"]),
    (("reader", "writer", "reader"), "read_only", {}, ["i1", "i2", "i3"], ["i1", "i3"]),
    (("writer", None, None), "read_only", {}, ["i1", "i2", "i3"], ["i2", "i3"]),
    (("writer",), "read_only", {}, ["i1"], ["i1"]),
    ((None, None, None), "custom", {"members": ["i3", "i1"]}, ["i3", "i1"], ["i3", "i1"]),
    ((None, None, None), "custom", {"exclude": ["i2"]}, ["i1", "i3"], ["i1", "i3"]),
]


@pytest.mark.parametrize(("roles", "role", "lists", "members", "serving"), SPREAD_TABLE)
def test_each_endpoint_may_use_the_instances_its_role_allows(roles: tuple[str | None, ...], role: str,
                                                             lists: dict[str, list[str]], members: list[str],
                                                             serving: list[str]) -> None:
    ports = [5432 + number for number in range(len(roles))]
    config = parse_config({"postgresql": {"clusters": {"main": cluster(*ports, roles=roles)},
                                          "endpoints": {"e": {"port": 7001, "cluster": "main", "role": role,
                                                              **lists}}}})
    (endpoint,) = resolve_endpoints(config)
    assert [m.label for m in endpoint.members] == members
    assert all(m.address == ("127.0.0.1", ports[int(m.label[1:]) - 1]) for m in endpoint.members)
    assert list(endpoint.serving) == serving
    assert endpoint.instance == serving[0]


def test_reader_keys_fall_back_from_endpoint_to_cluster() -> None:
    config = parse_config({"postgresql": {
        "clusters": {"main": {**cluster(5432, 5433), "max_replica_lag": 5.0, "reader_fallback": False}},
        "endpoints": {"a": {"port": 7001, "cluster": "main", "role": "read_only"},
                      "b": {"port": 7002, "cluster": "main", "role": "read_only", "max_replica_lag": 0,
                            "reader_fallback": True}},
    }, "mysql": {"enabled": True, "clusters": {"main": cluster(3306, 3307)},
                 "endpoints": {"c": {"port": 7003, "cluster": "main", "role": "read_only"}}}})
    a, b, c = resolve_endpoints(config)
    assert (a.max_replica_lag, a.reader_fallback) == (5.0, False)
    assert (b.max_replica_lag, b.reader_fallback) == (0.0, True)
    assert (c.max_replica_lag, c.reader_fallback) == (30.0, True)  # the defaults


def test_pool_and_auth_keys_fall_back_from_endpoint_to_cluster_to_engine() -> None:
    config = parse_config({"postgresql": {
        "auth_method": "md5", "backend_connect_timeout": 3.0,
        "pool": {"max_connections": 9, "connection_borrow_timeout": 7.0, "init_query": "SELECT 1"},
        "clusters": {"main": {**cluster(5432, 5433), "pool": {"max_connections": 5, "mode": "session"},
                              "auth_method": "password"}},
        "endpoints": {"a": {"port": 7001, "cluster": "main", "pool": {"max_connections": 2}},
                      "b": {"port": 7002, "cluster": "main", "role": "read_only", "auth_method": "scram-sha-256"}}}})
    a, b = resolve_endpoints(config)
    assert (a.settings.pool.max_connections, b.settings.pool.max_connections) == (2, 5)
    assert a.settings.pool.mode == b.settings.pool.mode == "session"
    assert a.settings.pool.connection_borrow_timeout == b.settings.pool.connection_borrow_timeout == 7.0
    assert a.settings.pool.init_query == "SELECT 1"
    assert (a.settings.auth_method, b.settings.auth_method) == ("password", "scram-sha-256")
    assert a.settings.backend_connect_timeout == 3.0
    assert (a.settings.port, b.settings.port) == (7001, 7002)


def test_the_single_backend_form_is_one_read_write_endpoint_named_after_its_engine() -> None:
    config = parse_config({"postgresql": {"port": 7001, "backend_host": "db", "backend_port": 5440},
                           "mysql": {"enabled": True, "port": 7002, "backend_port": 3310}})
    pg, my = resolve_endpoints(config)
    assert (pg.name, pg.engine, pg.role, pg.address, pg.settings.port) == (
        "postgresql", "postgresql", EndpointRole.READ_WRITE, ("db", 5440), 7001)
    assert (my.name, my.engine, my.address, my.settings.port) == ("mysql", "mysql", ("127.0.0.1", 3310), 7002)
    assert [e.name for e in resolve_endpoints(parse_config({}))] == ["postgresql"]


def test_the_example_configs_resolve(tmp_path: Path) -> None:
    names = [e.name for e in resolve_endpoints(load_config(SOURCE / "config" / "clusters.toml"))]
    assert names == ["main_rw", "main_ro", "reports_ro", "reporting", "not_the_writer", "shop_rw", "shop_ro"]
    assert [e.name for e in resolve_endpoints(load_config(SOURCE / "config" / "dbproxy.toml"))] == [
        "postgresql", "mysql"]


# --- real servers: clients on each endpoint reach the instance they should ---


@pytest.fixture(scope="module")
def pg_second(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostgresInstance]:
    server = start_postgres(tmp_path_factory.mktemp("pg2"), users=SECRETS, auth="scram-sha-256")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def mariadb_second(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MariaDBInstance]:
    server = start_mariadb(tmp_path_factory.mktemp("mariadb2"), users=SECRETS)
    yield server
    server.stop()


def start_cluster_proxy(folder: Path, engine: str, first: int, second: int, workers: int = 1) -> ProxyProcess:
    section = two_endpoints(engine, first, second)[engine]
    sections: dict[str, dict[str, Any]] = {
        "server": {"log_level": "info", "workers": workers}, "secrets": {"file": "secrets.toml"},
        **({"postgresql": {"enabled": False}} if engine == "mysql" else {}),
        f"{engine}.pool": {"max_connections": 4, "connection_borrow_timeout": 20.0},
        f"{engine}.clusters.main": section["clusters"]["main"],
    }
    for name, endpoint in section["endpoints"].items():
        sections[f"{engine}.endpoints.{name}"] = {**endpoint, "port": free_port()}
    proxy = ProxyProcess(write_config(folder, sections), folder / "proxy.log")
    proxy.start()
    return proxy


@pytest.mark.parametrize("workers", [1, 2])
def test_postgres_clients_on_each_endpoint_reach_their_instance(tmp_path: Path, pg_server: PostgresInstance,
                                                                pg_second: PostgresInstance, workers: int) -> None:
    proxy = start_cluster_proxy(tmp_path, "postgresql", pg_server.port, pg_second.port, workers)
    try:
        assert set(proxy.ports) == {"rw", "ro"}
        for name, server in (("rw", pg_server), ("ro", pg_second)):
            for _ in range(3):
                with psycopg.connect(host="127.0.0.1", port=proxy.ports[name], user="app", password="app-secret",
                                     dbname="app", sslmode="disable") as conn:
                    assert conn.execute("SELECT inet_server_port()").fetchone() == (server.port,)
            # A CancelRequest reaches the query of that client, whichever endpoint and worker it came through.
            for _ in range(3):
                with psycopg.connect(host="127.0.0.1", port=proxy.ports[name], user="app", password="app-secret",
                                     dbname="app", sslmode="disable", autocommit=True) as conn:
                    timer = threading.Timer(0.3, conn.cancel)
                    timer.start()
                    started = time.monotonic()
                    with pytest.raises(psycopg.errors.QueryCanceled):
                        conn.execute("SELECT pg_sleep(10)")
                    assert time.monotonic() - started < 5
    finally:
        proxy.stop()


def test_mariadb_clients_on_each_endpoint_reach_their_instance(tmp_path: Path, mariadb_server: MariaDBInstance,
                                                               mariadb_second: MariaDBInstance) -> None:
    proxy = start_cluster_proxy(tmp_path, "mysql", mariadb_server.port, mariadb_second.port)
    try:
        assert set(proxy.ports) == {"rw", "ro"}
        for name, server in (("rw", mariadb_server), ("ro", mariadb_second)):
            for _ in range(3):
                conn = pymysql.connect(host="127.0.0.1", port=proxy.ports[name], user="app", password="app-secret",
                                       database="app")
                try:
                    with conn.cursor() as cur:
                        cur.execute("SELECT @@port")
                        assert cur.fetchone() == (server.port,)
                finally:
                    conn.close()
    finally:
        proxy.stop()
