"""Network allow-lists: a client outside an endpoint's allowed_cidrs is closed at connect with no byte sent, counted
and logged once; the lists inherit engine -> cluster -> endpoint, and a reload applies a new list."""

from __future__ import annotations

import os
import signal
import socket
from pathlib import Path

import psycopg
import pymysql
import pytest

from devtools.servers import MariaDBInstance, PostgresInstance
from proxy.auth.networks import AllowList
from proxy.config import parse_config
from proxy.endpoints import resolve_endpoints
from proxy.errors import ConfigError
from support import metric_value, running_proxy, scrape

OUTSIDER = "127.0.0.2"  # a loopback source address outside 127.0.0.1/32


def _first_bytes(port: int, source: str) -> bytes:
    """Connect from `source` and read what the proxy sends first (b"" when it closes at once)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5, source_address=(source, 0)) as sock:
        sock.sendall(b"\x00\x00\x00\x08\x04\xd2\x16\x2f")  # a PostgreSQL SSLRequest (MySQL: the server speaks first)
        try:
            return sock.recv(64)
        except ConnectionResetError:
            return b""


def _reload(proxy_config: Path, pid: int, old: str, new: str) -> None:
    text = proxy_config.read_text()
    assert old in text
    proxy_config.write_text(text.replace(old, new))
    os.kill(pid, signal.SIGHUP)


def test_allowed_cidrs_validation_and_inheritance() -> None:
    base = {"instances": [{"host": "127.0.0.1", "port": 5432}]}
    config = parse_config({"postgresql": {
        "allowed_cidrs": ["10.0.0.0/8"],
        "clusters": {"a": {**base, "allowed_cidrs": ["192.168.0.0/16", "2001:db8::/32"]}, "b": base},
        "endpoints": {"a1": {"port": 7001, "cluster": "a"}, "a2": {"port": 7002, "cluster": "a", "allowed_cidrs": []},
                      "b1": {"port": 7003, "cluster": "b"}}}})
    found = {e.name: e.settings.allowed_cidrs for e in resolve_endpoints(config)}
    assert found == {"a1": ["192.168.0.0/16", "2001:db8::/32"], "a2": [], "b1": ["10.0.0.0/8"]}
    assert parse_config({}).postgresql.allowed_cidrs is None
    with pytest.raises(ConfigError, match=r"postgresql.allowed_cidrs.0.*'10.0.0.1/8' is not an IPv4 or IPv6 network"):
        parse_config({"postgresql": {"allowed_cidrs": ["10.0.0.1/8"]}})
    with pytest.raises(ConfigError, match=r"not an IPv4 or IPv6 network"):
        parse_config({"mysql": {"allowed_cidrs": ["example.com"]}})
    allowed = AllowList(("10.0.0.0/8", "2001:db8::/32"))
    assert allowed.admits("10.1.2.3") and allowed.admits("::ffff:10.1.2.3") and allowed.admits("2001:db8::1")
    assert not allowed.admits("11.0.0.1") and not allowed.admits("::1")
    assert allowed.admits("/tmp/socket")  # no IP address: a unix socket


def test_only_allowed_addresses_connect_and_a_reload_changes_the_list(
        tmp_path: Path, pg_server: PostgresInstance, mariadb_server: MariaDBInstance) -> None:
    narrow = {"allowed_cidrs": ["127.0.0.1/32"]}
    with running_proxy(tmp_path, pg_server, mariadb_server, server={"metrics_port": 0},
                       postgresql=narrow, mysql=narrow) as proxy:
        pg_port, my_port = proxy.ports["postgresql"], proxy.ports["mysql"]
        # Outside the list: closed before a byte is read or written.
        for _ in range(3):
            assert _first_bytes(pg_port, OUTSIDER) == b""
            assert _first_bytes(my_port, OUTSIDER) == b""
        # Inside: a normal login on each engine.
        with psycopg.connect(host="127.0.0.1", port=pg_port, user="app", password="app-secret", dbname="app") as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
        conn2 = pymysql.connect(host="127.0.0.1", port=my_port, user="app", password="app-secret", database="app")
        with conn2.cursor() as cursor:
            cursor.execute("SELECT 1")
            assert cursor.fetchone() == (1,)
        conn2.close()
        metrics = scrape(proxy)
        name = "dbproxy_client_connections_refused_network_total"
        assert metric_value(metrics, name, engine="postgresql") == 3
        assert metric_value(metrics, name, engine="mysql") == 3
        assert metric_value(metrics, "dbproxy_client_connections", engine="postgresql") == 0
        # Logged: the first refusal per address in full, the rest summed up later (not one line each).
        log = proxy.log()
        assert log.count("connection to endpoint postgresql refused: the address is not in its allowed_cidrs "
                         "(127.0.0.1/32)") == 1
        assert log.count("connection to endpoint mysql refused") == 0  # same address, same interval: summed up

        # The list changes in the file; after a reload 127.0.0.2 is allowed.
        _reload(proxy.config, proxy.pid, '["127.0.0.1/32"]', '["127.0.0.0/30"]')
        proxy.wait_for_log(r"reload: serving")
        assert _first_bytes(pg_port, OUTSIDER) in (b"S", b"N")  # the SSLRequest answered: the login goes on
        assert _first_bytes(my_port, OUTSIDER)[4:5] == b"\x0a"  # the MySQL greeting (protocol 10)
        assert metric_value(scrape(proxy), name) == 6
