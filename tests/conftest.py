"""Shared pytest fixtures."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator

import pytest

from devtools.servers import MariaDBInstance, PostgresInstance, start_mariadb, start_postgres
from support import ProxyProcess, running_proxy

pytest_plugins = ["leakcheck"]  # after the run: no test secret in any proxy log or interface output

# --- database servers ---
# Throwaway servers on free 127.0.0.1 ports, started once per session (never the machine's :5432/:3306).


@pytest.fixture(scope="session")
def pg_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostgresInstance]:
    """PostgreSQL, scram-sha-256; roles+dbs app (app-secret), bench (bench-secret); superuser postgres."""
    server = start_postgres(
        tmp_path_factory.mktemp("pg"),
        users={"app": "app-secret", "bench": "bench-secret"},
        auth="scram-sha-256",
    )
    yield server
    server.stop()


@pytest.fixture(scope="session")
def pg_md5_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostgresInstance]:
    """PostgreSQL, md5 auth and md5-hashed passwords; role/db app (app-secret)."""
    server = start_postgres(tmp_path_factory.mktemp("pgmd5"), users={"app": "app-secret"}, auth="md5")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def mariadb_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MariaDBInstance]:
    """MariaDB; users/dbs app (app-secret) and bench (bench-secret), mysql_native_password, + PROCESS; root/root."""
    server = start_mariadb(tmp_path_factory.mktemp("mariadb"), users={"app": "app-secret", "bench": "bench-secret"},
                           settings={"max_allowed_packet": "256M"})
    yield server
    server.stop()


# --- the proxy ---
# A proxy subprocess in transaction mode in front of pg_server, shared by a test module.


@pytest.fixture(scope="module")
def pg_proxy(tmp_path_factory: pytest.TempPathFactory, pg_server: PostgresInstance) -> Iterator[ProxyProcess]:
    with running_proxy(tmp_path_factory.mktemp("proxy"), pg_server) as proxy:
        yield proxy


@pytest.fixture(scope="module")
def mysql_proxy(tmp_path_factory: pytest.TempPathFactory, mariadb_server: MariaDBInstance) -> Iterator[ProxyProcess]:
    """A proxy subprocess in transaction mode in front of mariadb_server (MySQL listener only)."""
    with running_proxy(tmp_path_factory.mktemp("myproxy"), mariadb=mariadb_server) as proxy:
        yield proxy


@pytest.fixture(scope="module")
def pg_bench_tables(pg_server: PostgresInstance) -> PostgresInstance:
    """pgbench tables (scale 1) in database app, made directly on the server."""
    env = dict(os.environ, PGPASSWORD="app-secret")
    subprocess.run(
        ["pgbench", "-i", "-q", "-s", "1", "-h", pg_server.host, "-p", str(pg_server.port), "-U", "app", "app"],
        env=env,
        check=True,
        capture_output=True,
    )
    return pg_server
