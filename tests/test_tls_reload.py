"""Client TLS certificates replaced on disk and reloaded (SIGHUP) without a restart, on both protocols: new
connections get the new certificate, connections already open carry on, TLS below 1.2 is refused."""

from __future__ import annotations

import os
import signal
import socket
import ssl
import struct
import time
from pathlib import Path

import psycopg
import pymysql
import pytest

from devtools.servers import MariaDBInstance, PostgresInstance
from proxy.tls import self_signed_pair
from support import ProxyProcess, running_proxy

SSL_REQUEST = struct.pack("!ii", 8, 80877103)


def write_pair(folder: Path, name: str) -> bytes:
    """A fresh certificate and key written over cert.pem/key.pem (as cert-manager does); the certificate (DER)."""
    cert, key = self_signed_pair(name)
    (folder / "key.pem").write_bytes(key)
    (folder / "cert.pem").write_bytes(cert)
    return ssl.PEM_cert_to_DER_cert(cert.decode())


def client_context(maximum: ssl.TLSVersion | None = None) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    if maximum is not None:
        context.set_ciphers("DEFAULT:@SECLEVEL=0")  # so that it is the proxy, not this client, that refuses
        context.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
        context.maximum_version = maximum
    return context


def pg_certificate(port: int, context: ssl.SSLContext | None = None) -> bytes:
    """The certificate the proxy's PostgreSQL listener shows after an SSLRequest (DER)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        raw.sendall(SSL_REQUEST)
        assert raw.recv(1) == b"S"
        with (context or client_context()).wrap_socket(raw) as tls:
            der = tls.getpeercert(binary_form=True)
            assert der is not None
            return der


def mysql_certificate(port: int) -> bytes:
    """The certificate the proxy's MySQL listener shows to PyMySQL over TLS (DER)."""
    conn = pymysql.connect(host="127.0.0.1", port=port, user="app", password="app-secret", database="app",
                           ssl=client_context(), connect_timeout=10)
    try:
        sock = conn._sock
        assert isinstance(sock, ssl.SSLSocket)
        der = sock.getpeercert(binary_form=True)
        assert der is not None
        return der
    finally:
        conn.close()


def reload(proxy: ProxyProcess) -> None:
    before = proxy.log().count("reload: serving")
    os.kill(proxy.pid, signal.SIGHUP)
    deadline = time.monotonic() + 15
    while proxy.log().count("reload: serving") == before:
        assert time.monotonic() < deadline, f"no reload:\n{proxy.log()[-3000:]}"
        time.sleep(0.05)


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1_1 is deprecated:DeprecationWarning")
def test_certificates_are_reloaded_without_a_restart(tmp_path: Path, pg_server: PostgresInstance,
                                                     mariadb_server: MariaDBInstance) -> None:
    first = write_pair(tmp_path, "dbproxy-first")
    with running_proxy(tmp_path, pg_server, mariadb_server,
                       tls={"mode": "allow", "cert_file": "cert.pem", "key_file": "key.pem"}) as proxy:
        pg_port, my_port = proxy.ports["postgresql"], proxy.ports["mysql"]
        assert pg_certificate(pg_port) == first and mysql_certificate(my_port) == first
        with psycopg.connect(host="127.0.0.1", port=pg_port, user="app", password="app-secret", dbname="app",
                             sslmode="require", autocommit=True) as open_before:
            second = write_pair(tmp_path, "dbproxy-second")
            reload(proxy)
            assert pg_certificate(pg_port) == second and mysql_certificate(my_port) == second
            assert open_before.execute("SELECT 1").fetchone() == (1,)  # the connection made before carries on
        assert pg_certificate(pg_port, client_context(maximum=ssl.TLSVersion.TLSv1_2)) == second
        with pytest.raises(ssl.SSLError, match="PROTOCOL_VERSION|UNEXPECTED_EOF"):  # the proxy wants TLS 1.2 at least
            pg_certificate(pg_port, client_context(maximum=ssl.TLSVersion.TLSv1_1))
        assert proxy.alive
