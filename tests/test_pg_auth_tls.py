"""Client authentication methods and TLS on both sides of the proxy, against real servers."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import asyncpg
import psycopg
import pytest

from devtools.servers import PostgresInstance, start_postgres
from proxy.tls import self_signed_pair
from support import ProxyProcess, running_proxy


def connect(proxy: ProxyProcess, password: str = "app-secret", **extra: object) -> psycopg.Connection:
    params: dict[str, object] = {"sslmode": "disable", "host": "127.0.0.1", **extra}
    return psycopg.connect(port=proxy.ports["postgresql"], user="app", password=password,
                           dbname="app", autocommit=True, prepare_threshold=None, **params)


def test_scram_over_tls(pg_proxy: ProxyProcess) -> None:
    with connect(pg_proxy, sslmode="require") as conn:
        assert conn.pgconn.ssl_in_use
        assert conn.execute("SELECT 1").fetchone() == (1,)


async def test_asyncpg_wrong_password_gets_28P01(pg_proxy: ProxyProcess) -> None:
    with pytest.raises(asyncpg.InvalidPasswordError) as info:
        await asyncpg.connect(host="127.0.0.1", port=pg_proxy.ports["postgresql"], user="app", password="nope",
                              database="app", ssl=False)
    assert info.value.sqlstate == "28P01"


def test_md5_client_auth(tmp_path: Path, pg_server: PostgresInstance) -> None:
    with running_proxy(tmp_path, pg_server, postgresql={"auth_method": "md5"}) as proxy:
        with connect(proxy) as conn:
            assert conn.execute("SELECT current_user").fetchone() == ("app",)
        with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
            connect(proxy, password="wrong")


def test_cleartext_only_over_tls(tmp_path: Path, pg_server: PostgresInstance) -> None:
    with running_proxy(tmp_path, pg_server, postgresql={"auth_method": "password"}) as proxy:
        with pytest.raises(psycopg.OperationalError, match="only over TLS"):
            connect(proxy)
        with connect(proxy, sslmode="require") as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
        proxy.wait_for_log(r"cleartext password authentication is allowed only over TLS \[28000\]")


def test_tls_required_refuses_plaintext(tmp_path: Path, pg_server: PostgresInstance) -> None:
    cert, key = self_signed_pair()
    (tmp_path / "cert.pem").write_bytes(cert)
    (tmp_path / "key.pem").write_bytes(key)
    (tmp_path / "ca.pem").write_bytes(cert)
    with running_proxy(tmp_path, pg_server, tls={"mode": "require", "cert_file": "cert.pem",
                                                  "key_file": "key.pem"}) as proxy:
        with pytest.raises(psycopg.OperationalError, match="requires TLS"):
            connect(proxy)
        with connect(proxy, sslmode="verify-full", sslrootcert=str(tmp_path / "ca.pem"), host="localhost") as conn:
            assert conn.pgconn.ssl_in_use


def test_md5_backend(tmp_path: Path, pg_md5_server: PostgresInstance) -> None:
    with running_proxy(tmp_path, pg_md5_server) as proxy, connect(proxy) as conn:
        assert conn.execute("SELECT 'via md5 backend'").fetchone() == ("via md5 backend",)


@pytest.fixture(scope="module")
def pg_tls_server(tmp_path_factory: pytest.TempPathFactory) -> PostgresInstance:
    """A server that only accepts TLS (hostssl), with a certificate for localhost."""
    folder = tmp_path_factory.mktemp("pgtls")
    cert, key = self_signed_pair()
    certs = folder / "certs"
    certs.mkdir()
    (certs / "server.crt").write_bytes(cert)
    (certs / "server.key").write_bytes(key)
    os.chmod(certs / "server.key", 0o600)
    if os.geteuid() == 0:
        shutil.chown(certs, "postgres")
        for name in ("server.crt", "server.key"):
            shutil.chown(certs / name, "postgres")
    server = start_postgres(folder, users={"app": "app-secret"}, settings={
        "ssl": "on", "ssl_cert_file": str(certs / 'server.crt'), "ssl_key_file": str(certs / 'server.key')})
    hba = server.datadir / "pg_hba.conf"
    only_tls = "".join(f"hostssl all app {net} scram-sha-256\nhost all app {net} reject\n"
                       for net in ("127.0.0.1/32", "::1/128"))
    hba.write_text(only_tls + hba.read_text())
    server.stop()
    server.start()
    (folder / "ca.pem").write_bytes(cert)
    return server


def test_backend_tls_require_and_verify_full(tmp_path: Path, pg_tls_server: PostgresInstance) -> None:
    with running_proxy(tmp_path / "plain", pg_tls_server) as proxy:
        with pytest.raises(psycopg.OperationalError, match="no encryption|refused the login"):
            connect(proxy)
    with running_proxy(tmp_path / "require", pg_tls_server, postgresql={"backend_tls": "require"}) as proxy:
        with connect(proxy) as conn:
            assert conn.execute("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()").fetchone() == (True,)
    ca = pg_tls_server.datadir.parent.parent / "ca.pem"
    with running_proxy(tmp_path / "verify", pg_tls_server, postgresql={
            "backend_tls": "verify-full", "backend_ca_file": str(ca), "backend_host": "localhost"}) as proxy:
        with connect(proxy) as conn:
            assert conn.execute("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()").fetchone() == (True,)
    wrong_ca, _ = self_signed_pair()
    (tmp_path / "wrong.pem").write_bytes(wrong_ca)
    with running_proxy(tmp_path / "wrong", pg_tls_server, postgresql={
            "backend_tls": "verify-full", "backend_ca_file": str(tmp_path / "wrong.pem"),
            "backend_host": "localhost"}) as proxy:
        with pytest.raises(psycopg.OperationalError, match="certificate|closed the connection"):
            connect(proxy)
