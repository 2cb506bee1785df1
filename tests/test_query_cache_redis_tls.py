"""The query cache's Redis over TLS with AUTH (as ElastiCache with in-transit encryption and an AUTH token): a
throwaway redis-server of the test's own; a wrong password or a Redis that is gone only costs the cache."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import redis

from devtools.servers import PostgresInstance, free_port
from proxy.tls import self_signed_pair
from support import ProxyProcess, metric_value, running_proxy, scrape

REDIS_PASSWORD = "redis-auth-token-4b1d9e"


@pytest.fixture(scope="module")
def tls_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, Path]]:
    """redis-server with TLS only (a self-signed certificate) and a password; its port and CA file."""
    folder = tmp_path_factory.mktemp("redis")
    cert, key = self_signed_pair("127.0.0.1")
    (folder / "cert.pem").write_bytes(cert)
    (folder / "key.pem").write_bytes(key)
    port = free_port()
    process = subprocess.Popen(
        ["redis-server", "--port", "0", "--tls-port", str(port), "--tls-cert-file", str(folder / "cert.pem"),
         "--tls-key-file", str(folder / "key.pem"), "--tls-ca-cert-file", str(folder / "cert.pem"),
         "--tls-auth-clients", "no", "--requirepass", REDIS_PASSWORD, "--save", "", "--appendonly", "no",
         "--dir", str(folder), "--bind", "127.0.0.1"],
        stdout=(folder / "redis.log").open("w"), stderr=subprocess.STDOUT)
    client = redis.Redis(host="127.0.0.1", port=port, password=REDIS_PASSWORD, ssl=True,
                         ssl_ca_certs=str(folder / "cert.pem"))
    deadline = time.monotonic() + 10
    while True:
        try:
            client.ping()
            break
        except redis.RedisError:
            if time.monotonic() > deadline:
                process.kill()
                raise
            time.sleep(0.1)
    client.close()
    yield port, folder / "cert.pem"
    process.terminate()
    process.wait(10)


def cache_settings(port: int, ca_file: Path, password: str) -> dict[str, object]:
    return {"enabled": True, "store": "redis", "redis_url": f"rediss://127.0.0.1:{port}/0",
            "redis_password": password, "redis_ca_file": str(ca_file), "redis_key_prefix": "t:",
            "rules": [{"regex": "FROM qct_items", "ttl": 60.0}]}


def run_queries(proxy: ProxyProcess) -> list[object]:
    with psycopg.connect(host="127.0.0.1", port=proxy.ports["postgresql"], user="app", password="app-secret",
                         dbname="app", autocommit=True, cursor_factory=psycopg.ClientCursor) as conn:
        return [conn.execute("SELECT count(*) FROM qct_items").fetchone() for _ in range(3)]


def counter(proxy: ProxyProcess, name: str) -> float:
    return metric_value(scrape(proxy), f"dbproxy_query_cache_{name}_total", endpoint="postgresql")


@pytest.fixture(scope="module", autouse=True)
def table(pg_server: PostgresInstance) -> None:
    with psycopg.connect(host="127.0.0.1", port=pg_server.port, user="app", password="app-secret",
                         dbname="app", autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS qct_items; CREATE TABLE qct_items (id int); "
                     "INSERT INTO qct_items VALUES (1)")


def test_tls_and_auth(tmp_path: Path, pg_server: PostgresInstance, tls_redis: tuple[int, Path]) -> None:
    port, ca_file = tls_redis
    with running_proxy(tmp_path, pg_server, query_cache=cache_settings(port, ca_file, REDIS_PASSWORD),
                       server={"metrics_port": 0}) as proxy:
        assert run_queries(proxy) == [(1,), (1,), (1,)]
        assert counter(proxy, "hits") == 2 and counter(proxy, "errors") == 0
        page = scrape(proxy)
        log = proxy.log()
    assert REDIS_PASSWORD not in log and REDIS_PASSWORD not in page


def test_a_wrong_password_costs_only_the_cache(tmp_path: Path, pg_server: PostgresInstance,
                                               tls_redis: tuple[int, Path]) -> None:
    port, ca_file = tls_redis
    with running_proxy(tmp_path, pg_server, query_cache=cache_settings(port, ca_file, "not-the-token"),
                       server={"metrics_port": 0}) as proxy:
        assert run_queries(proxy) == [(1,), (1,), (1,)]
        assert counter(proxy, "hits") == 0 and counter(proxy, "errors") >= 1
        line = proxy.wait_for_log("query cache: Redis lookup failed")
    assert "not-the-token" not in line


def test_writes_go_on_while_redis_is_unreachable(tmp_path: Path, pg_server: PostgresInstance) -> None:
    """Nothing listens at the Redis address: reads come from the database, and a write waits for one failed
    invalidation attempt at most (then the error is logged: other proxies may serve old results until their TTL)."""
    settings = {"enabled": True, "store": "redis", "redis_url": f"redis://127.0.0.1:{free_port()}/0",
                "rules": [{"regex": "FROM qct_items", "ttl": 60.0}]}
    with running_proxy(tmp_path, pg_server, query_cache=settings, server={"metrics_port": 0}) as proxy:
        assert run_queries(proxy) == [(1,), (1,), (1,)]
        with psycopg.connect(host="127.0.0.1", port=proxy.ports["postgresql"], user="app", password="app-secret",
                             dbname="app", autocommit=True) as conn:
            for _ in range(3):
                started = time.monotonic()
                conn.execute("UPDATE qct_items SET id = 1")
                assert time.monotonic() - started < 1.5
        proxy.wait_for_log("query cache: invalidation of .* could not reach Redis")
        assert counter(proxy, "errors") >= 2
