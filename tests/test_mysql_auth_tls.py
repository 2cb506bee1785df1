"""Client-facing MySQL auth through the proxy: TLS, native, caching_sha2 (fast, full over TLS, RSA), clear text."""

from __future__ import annotations

import os
import ssl
import subprocess
from pathlib import Path

import mysql.connector
import pymysql
import pytest

from devtools.servers import MariaDBInstance
from support import ProxyProcess, running_proxy


def pymysql_connect(proxy: ProxyProcess, password: str = "app-secret", **extra: object) -> pymysql.Connection:
    kwargs: dict[str, object] = {"host": "127.0.0.1", "port": proxy.ports["mysql"], "user": "app",
                                 "password": password, "database": "app"}
    kwargs.update(extra)
    return pymysql.connect(**kwargs)  # type: ignore[arg-type]


def tls_in_use(conn: pymysql.Connection) -> str:
    with conn.cursor() as cur:
        cur.execute("SELECT CURRENT_USER()")
        assert cur.fetchone() == ("app@%",)
    sock = conn._sock
    return sock.version() if isinstance(sock, ssl.SSLSocket) else ""  # type: ignore[return-value]


def test_native_password_with_and_without_tls(mysql_proxy: ProxyProcess) -> None:
    with pymysql_connect(mysql_proxy) as conn:  # PyMySQL prefers TLS when offered
        assert tls_in_use(conn).startswith("TLS")
    with pymysql_connect(mysql_proxy, ssl_disabled=True) as conn:
        assert tls_in_use(conn) == ""


def test_tls_required_refuses_plaintext(tmp_path: Path, mariadb_server: MariaDBInstance) -> None:
    with running_proxy(tmp_path, mariadb=mariadb_server, tls={"mode": "require"}) as proxy:
        with pymysql_connect(proxy) as conn:
            assert tls_in_use(conn).startswith("TLS")
        with pytest.raises(pymysql.err.OperationalError) as info:
            pymysql_connect(proxy, ssl_disabled=True)
        assert info.value.args[0] == 1045 and "insecure transport" in info.value.args[1]


@pytest.fixture(scope="module")
def sha2_proxy(tmp_path_factory: pytest.TempPathFactory, mariadb_server: MariaDBInstance):  # type: ignore[no-untyped-def]
    with running_proxy(tmp_path_factory.mktemp("sha2"), mariadb=mariadb_server,
                       mysql={"auth_method": "caching_sha2_password"}) as proxy:
        yield proxy


@pytest.fixture(scope="module")
def sha2_full_proxy(tmp_path_factory: pytest.TempPathFactory, mariadb_server: MariaDBInstance):  # type: ignore[no-untyped-def]
    with running_proxy(tmp_path_factory.mktemp("sha2full"), mariadb=mariadb_server,
                       mysql={"auth_method": "caching_sha2_password", "caching_sha2_full_auth": True}) as proxy:
        yield proxy


def test_caching_sha2_fast_path(sha2_proxy: ProxyProcess) -> None:
    with pymysql_connect(sha2_proxy, ssl_disabled=True) as conn:
        assert tls_in_use(conn) == ""
    conn2 = mysql.connector.connect(host="127.0.0.1", port=sha2_proxy.ports["mysql"], user="app",
                                    password="app-secret", database="app", use_pure=True, ssl_disabled=True)
    try:
        cur = conn2.cursor()
        cur.execute("SELECT 'sha2 fast'")
        assert cur.fetchall() == [("sha2 fast",)]
    finally:
        conn2.close()
    with pytest.raises(pymysql.err.OperationalError) as info:
        pymysql_connect(sha2_proxy, "wrong", ssl_disabled=True)
    assert info.value.args[0] == 1045


def test_caching_sha2_full_auth_with_rsa_key_exchange(sha2_full_proxy: ProxyProcess) -> None:
    with pymysql_connect(sha2_full_proxy, ssl_disabled=True) as conn:  # asks for the public key, sends RSA
        assert tls_in_use(conn) == ""
    with pytest.raises(pymysql.err.OperationalError) as info:
        pymysql_connect(sha2_full_proxy, "wrong", ssl_disabled=True)
    assert info.value.args[0] == 1045


def test_caching_sha2_full_auth_over_tls(sha2_full_proxy: ProxyProcess) -> None:
    with pymysql_connect(sha2_full_proxy) as conn:  # the password goes in clear inside TLS
        assert tls_in_use(conn).startswith("TLS")
    conn2 = mysql.connector.connect(host="127.0.0.1", port=sha2_full_proxy.ports["mysql"], user="app",
                                    password="app-secret", database="app", use_pure=True)
    try:
        cur = conn2.cursor()
        cur.execute("SELECT 'sha2 full over TLS'")
        assert cur.fetchall() == [("sha2 full over TLS",)]
    finally:
        conn2.close()


def test_mariadb_cli_with_caching_sha2(sha2_proxy: ProxyProcess) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MYSQL")}
    env["MYSQL_PWD"] = "app-secret"
    out = subprocess.run(["mariadb", "--no-defaults", "--protocol=TCP", "-h", "127.0.0.1", "-P",
                          str(sha2_proxy.ports["mysql"]), "-u", "app", "-N", "-B", "-e", "SELECT 'cli sha2'"],
                         capture_output=True, text=True, timeout=30, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "cli sha2"


def test_clear_password_only_over_tls(tmp_path: Path, mariadb_server: MariaDBInstance) -> None:
    with running_proxy(tmp_path, mariadb=mariadb_server, mysql={"auth_method": "mysql_clear_password"}) as proxy:
        with pymysql_connect(proxy) as conn:
            assert tls_in_use(conn).startswith("TLS")
        with pytest.raises(pymysql.err.OperationalError) as info:
            pymysql_connect(proxy, ssl_disabled=True)
        assert info.value.args[0] == 1045 and "only over TLS" in info.value.args[1]
        proxy.wait_for_log(r"mysql_clear_password is allowed only over TLS \[1045 28000\]")
