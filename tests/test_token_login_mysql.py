"""Signed tokens as the MySQL password (mysql_clear_password over TLS: mariadb, PyMySQL, mysql-connector), per
endpoint and user, against a real MariaDB."""

from __future__ import annotations

import os
import ssl
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import mysql.connector
import pymysql
import pytest
from token_support import (
    Issuer,
    JwksServer,
    bad_tokens,
    generate_token,
    init_keys,
    token_proxy,
    tokens_section,
    write_projected_token,
)

from devtools.servers import MariaDBInstance, free_port
from support import ProxyProcess, mysql_backend_connections

NAMESPACE, ACCOUNT = "shop", "orders"  # the service account the policy lets log in as app
POOL_SIZE = 2


@pytest.fixture(scope="module")
def issuer() -> Issuer:
    return Issuer()


@pytest.fixture(scope="module")
def jwks(issuer: Issuer) -> Iterator[JwksServer]:
    with JwksServer([issuer]) as server:
        yield server


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return init_keys(tmp_path_factory.mktemp("keys") / "keys")


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory, mariadb_server: MariaDBInstance, keys: Path,
          jwks: JwksServer) -> Iterator[ProxyProcess]:
    """Endpoints tok (tokens required), either (token or password) and secure (TLS required; bench by token)."""
    sections: dict[str, dict[str, Any]] = {
        "server": {"log_level": "info", "client_login_timeout": 5.0, "workers": 1},
        "secrets": {"file": "secrets.toml"},
        "postgresql": {"enabled": False},
        "mysql.pool": {"max_connections": POOL_SIZE, "connection_borrow_timeout": 30.0},
        "mysql.clusters.main": {"instances": [{"host": "127.0.0.1", "port": mariadb_server.port}]},
        "mysql.endpoints.tok": {"port": free_port(), "cluster": "main", "token_auth": "required"},
        "mysql.endpoints.either": {"port": free_port(), "cluster": "main", "token_auth": "optional"},
        "mysql.endpoints.secure": {"port": free_port(), "cluster": "main", "require_tls": True,
                                   "token_auth_users": {"bench": "required"}},
    }
    toml = tokens_section(keys, jwks.url, "app", [(NAMESPACE, ACCOUNT)])
    with token_proxy(tmp_path_factory.mktemp("proxy"), sections, toml) as running:
        yield running


def connect(proxy: ProxyProcess, endpoint: str, password: str, *, user: str = "app",
            tls: bool = True) -> pymysql.Connection:
    return pymysql.connect(host="127.0.0.1", port=proxy.ports[endpoint], user=user, password=password,
                           database=user, ssl_disabled=not tls)


def current_user(proxy: ProxyProcess, endpoint: str, password: str, *, user: str = "app", tls: bool = True) -> str:
    with connect(proxy, endpoint, password, user=user, tls=tls) as conn, conn.cursor() as cur:
        assert isinstance(conn._sock, ssl.SSLSocket) == tls
        cur.execute("SELECT CURRENT_USER()")
        row = cur.fetchone()
        assert row is not None
        return str(row[0])


def refused(proxy: ProxyProcess, endpoint: str, password: str, *, user: str = "app",
            tls: bool = True) -> tuple[int, str]:
    with pytest.raises(pymysql.err.OperationalError) as info:
        current_user(proxy, endpoint, password, user=user, tls=tls)
    return info.value.args[0], info.value.args[1]


def mariadb(proxy: ProxyProcess, endpoint: str, password: str, *tls: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["mariadb", "-h", "127.0.0.1", "-P", str(proxy.ports[endpoint]), "-u", "app", *tls, "-N", "-B",
         "-e", "SELECT CURRENT_USER(), 6 * 7", "app"],
        env=dict(os.environ, MYSQL_PWD=password), capture_output=True, text=True, timeout=30)


def test_mariadb_client_with_the_cleartext_plugin_over_tls(proxy: ProxyProcess, keys: Path) -> None:
    token = generate_token(keys, "app", "tok")
    done = mariadb(proxy, "tok", token, "--ssl", "--skip-ssl-verify-server-cert", "--enable-cleartext-plugin")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "app@%\t42"  # after a note that MariaDB's client no longer needs it
    done = mariadb(proxy, "tok", token, "--skip-ssl", "--enable-cleartext-plugin")
    assert done.returncode == 1 and "ERROR 1045 (28000)" in done.stderr
    assert "token authentication requires TLS" in done.stderr


def test_pymysql_with_a_token(proxy: ProxyProcess, keys: Path) -> None:
    assert current_user(proxy, "tok", generate_token(keys, "app", "tok")) == "app@%"


@pytest.mark.parametrize("plugin", ["mysql_native_password", "mysql_clear_password"])
def test_mysql_connector_with_a_token(proxy: ProxyProcess, keys: Path, plugin: str) -> None:
    """Switched to mysql_clear_password, or sending it in its first answer (over TLS, so no switch)."""
    conn = mysql.connector.connect(host="127.0.0.1", port=proxy.ports["tok"], user="app", database="app",
                                   password=generate_token(keys, "app", "tok"), use_pure=True, auth_plugin=plugin)
    try:
        cur = conn.cursor()
        cur.execute("SELECT CURRENT_USER()")
        assert cur.fetchone() == ("app@%",)
    finally:
        conn.close()


def test_kubernetes_projected_token_through_jwks(proxy: ProxyProcess, issuer: Issuer, tmp_path: Path) -> None:
    path = write_projected_token(tmp_path, issuer.service_account_token(NAMESPACE, ACCOUNT))
    assert current_user(proxy, "tok", path.read_text()) == "app@%"


@pytest.mark.parametrize("kind", ["expired", "not yet valid", "wrong audience", "wrong issuer", "wrong key",
                                  "alg none", "HS256 with the public key", "tampered"])
def test_bad_tokens_are_refused_with_1045(proxy: ProxyProcess, issuer: Issuer, kind: str) -> None:
    assert current_user(proxy, "tok", issuer.service_account_token(NAMESPACE, ACCOUNT)) == "app@%"
    assert refused(proxy, "tok", bad_tokens(issuer, NAMESPACE, ACCOUNT)[kind]) == (
        1045, 'token authentication failed for user "app"')


def test_subjects_the_policy_does_not_allow_are_refused(proxy: ProxyProcess, issuer: Issuer, keys: Path) -> None:
    for token in (issuer.service_account_token(NAMESPACE, "intruder"),
                  issuer.service_account_token("elsewhere", ACCOUNT), generate_token(keys, "bench", "tok")):
        assert refused(proxy, "tok", token)[0] == 1045


def test_a_token_without_tls_is_refused(proxy: ProxyProcess, issuer: Issuer) -> None:
    token = issuer.service_account_token(NAMESPACE, ACCOUNT)
    assert refused(proxy, "tok", token, tls=False) == (
        1045, "Access denied for user 'app': token authentication requires TLS")
    assert refused(proxy, "either", token, tls=False)[0] == 1045  # mysql_native_password: the token is no password


def test_required_mode_refuses_a_password(proxy: ProxyProcess) -> None:
    assert refused(proxy, "tok", "app-secret") == (1045, 'token authentication failed for user "app"')


def test_optional_mode_takes_a_password_or_a_token(proxy: ProxyProcess, issuer: Issuer) -> None:
    assert current_user(proxy, "either", issuer.service_account_token(NAMESPACE, ACCOUNT)) == "app@%"
    assert current_user(proxy, "either", "app-secret") == "app@%"  # mysql_clear_password over TLS
    assert current_user(proxy, "either", "app-secret", tls=False) == "app@%"  # mysql_native_password
    assert refused(proxy, "either", "wrong-secret")[0] == 1045
    assert refused(proxy, "either", bad_tokens(issuer, NAMESPACE, ACCOUNT)["expired"])[0] == 1045


def test_require_tls_and_per_user_modes(proxy: ProxyProcess, keys: Path) -> None:
    code, message = refused(proxy, "secure", "app-secret", tls=False)
    assert code == 1045 and "endpoint secure requires TLS" in message
    assert current_user(proxy, "secure", "app-secret") == "app@%"  # tokens are off for app
    assert refused(proxy, "secure", generate_token(keys, "app", "secure"))[0] == 1045
    assert refused(proxy, "secure", "bench-secret", user="bench")[0] == 1045  # bench: tokens only
    assert current_user(proxy, "secure", generate_token(keys, "bench", "secure"), user="bench") == "bench@%"


def test_a_session_outlives_its_token(proxy: ProxyProcess, issuer: Issuer) -> None:
    now = int(time.time())
    token = issuer.service_account_token(NAMESPACE, ACCOUNT, iat=now, nbf=now, exp=now + 2)
    with connect(proxy, "tok", token) as conn, conn.cursor() as cur:
        while time.time() < now + 2 + 1 + 1:  # past its expiry and the proxy's leeway of one second
            cur.execute("SELECT 1")
            assert cur.fetchone() == (1,)
            time.sleep(0.25)
        cur.execute("SELECT CURRENT_USER()")
        assert cur.fetchone() == ("app@%",)
        assert refused(proxy, "tok", token)[0] == 1045  # no new login with it


def test_more_token_clients_than_backends(proxy: ProxyProcess, issuer: Issuer,
                                          mariadb_server: MariaDBInstance) -> None:
    clients = 5 * POOL_SIZE
    conns = [connect(proxy, "tok", issuer.service_account_token(NAMESPACE, ACCOUNT)) for _ in range(clients)]

    def work(number: int) -> list[int]:
        seen = []
        with conns[number].cursor() as cur:
            for step in range(20):
                cur.execute("BEGIN")
                cur.execute("SELECT %s + %s", (number, step))
                row = cur.fetchone()
                assert row is not None
                seen.append(int(row[0]))
                cur.execute("COMMIT")
        return seen

    try:
        with ThreadPoolExecutor(clients) as pool:
            results = list(pool.map(work, range(clients)))
        assert results == [[n + step for step in range(20)] for n in range(clients)]
        assert mysql_backend_connections(mariadb_server) <= 3 * POOL_SIZE  # a pool of POOL_SIZE per endpoint
    finally:
        for conn in conns:
            conn.close()


def test_no_token_in_the_log(proxy: ProxyProcess, issuer: Issuer, keys: Path) -> None:
    tokens = [generate_token(keys, "app", "tok"), issuer.service_account_token("elsewhere", ACCOUNT),
              *bad_tokens(issuer, NAMESPACE, ACCOUNT).values()]
    for token in tokens:
        mariadb(proxy, "tok", token, "--ssl", "--skip-ssl-verify-server-cert")
    log = proxy.log()
    assert "token authentication failed" in log
    for token in tokens:
        for part in token.split("."):
            assert not part or part not in log


def test_change_user_with_a_token(proxy: ProxyProcess, keys: Path) -> None:
    conn = mysql.connector.connect(host="127.0.0.1", port=proxy.ports["secure"], user="app", database="app",
                                   password="app-secret", use_pure=True)
    try:
        conn.cmd_change_user(username="bench", password=generate_token(keys, "bench", "secure"), database="bench")
        cur = conn.cursor()
        cur.execute("SELECT CURRENT_USER()")
        assert cur.fetchone() == ("bench@%",)
        with pytest.raises(mysql.connector.errors.ProgrammingError) as info:
            conn.cmd_change_user(username="bench", password="bench-secret", database="bench")
        assert info.value.errno == 1045
    finally:
        conn.close()
