"""Bad input reaches the proxy: each case gets the right error or close, a log line, and hurts nobody else."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.protocol.pg import messages as pg
from rawpg import RawClient
from support import ProxyProcess


@pytest.fixture(scope="module")
def bystander(pg_proxy: ProxyProcess) -> Iterator[psycopg.Connection]:
    """A well-behaved client that must keep working through every bad case."""
    with psycopg.connect(host="127.0.0.1", port=pg_proxy.ports["postgresql"], user="app", password="app-secret",
                         dbname="app", sslmode="disable", autocommit=True, prepare_threshold=None) as conn:
        conn.execute("BEGIN")  # it even holds a transaction open across the bad cases
        conn.execute("SELECT 1")
        yield conn


def still_fine(conn: psycopg.Connection) -> None:
    assert conn.execute("SELECT 'fine'").fetchone() == ("fine",)


def test_garbage_first_packet(pg_proxy: ProxyProcess, bystander: psycopg.Connection) -> None:
    client = RawClient(pg_proxy.ports["postgresql"])
    client.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert client.error()["C"] == "08P01"
    assert client.closed_by_peer()
    pg_proxy.wait_for_log(r"invalid startup packet length")
    still_fine(bystander)


@pytest.mark.parametrize("length", [0xFFFFFFFF, 0x80000000, 3, 2_000_000_000])
def test_impossible_startup_length(pg_proxy: ProxyProcess, bystander: psycopg.Connection, length: int) -> None:
    client = RawClient(pg_proxy.ports["postgresql"])
    client.send(length.to_bytes(4, "big") + pg.INT32.pack(pg.PROTOCOL_V3))
    assert client.error()["C"] == "08P01"
    still_fine(bystander)


@pytest.mark.parametrize("length", [0xFFFFFFFF, 0x80000000, 2, 1_500_000_000])
def test_impossible_message_length_after_login(pg_proxy: ProxyProcess, bystander: psycopg.Connection,
                                               length: int) -> None:
    client = RawClient(pg_proxy.ports["postgresql"])
    client.login()
    client.send(b"Q" + length.to_bytes(4, "big") + b"SELECT 1\x00")
    fields = client.error()
    assert fields["C"] == "08P01" and "invalid message length" in fields["M"]
    assert client.closed_by_peer()
    pg_proxy.wait_for_log(rf"invalid message length {length if length < 2**31 else ''}")
    still_fine(bystander)


def test_unknown_message_type(pg_proxy: ProxyProcess, bystander: psycopg.Connection) -> None:
    client = RawClient(pg_proxy.ports["postgresql"])
    client.login()
    client.query("SELECT 1")
    client.send(b"?\x00\x00\x00\x04")
    fields = client.error()
    assert fields["C"] == "08P01" and "invalid frontend message type" in fields["M"]
    assert client.closed_by_peer()
    pg_proxy.wait_for_log("invalid frontend message type 63")
    still_fine(bystander)


def test_truncated_startup_then_close(pg_proxy: ProxyProcess, bystander: psycopg.Connection) -> None:
    client = RawClient(pg_proxy.ports["postgresql"])
    client.send((100).to_bytes(4, "big") + b"\x00\x03\x00\x00user")
    client.sock.shutdown(socket.SHUT_WR)
    assert client.closed_by_peer()
    pg_proxy.wait_for_log("closed the connection during login")
    still_fine(bystander)


def test_truncated_message_mid_session(pg_proxy: ProxyProcess, bystander: psycopg.Connection) -> None:
    client = RawClient(pg_proxy.ports["postgresql"])
    client.login()
    client.send(b"Q" + (100).to_bytes(4, "big") + b"SELECT")  # 95 more bytes promised, never sent
    time.sleep(0.2)
    client.close()
    pg_proxy.wait_for_log("left in the middle of a message")
    still_fine(bystander)


def test_silent_client_hits_the_login_timeout(pg_proxy: ProxyProcess, bystander: psycopg.Connection) -> None:
    client = RawClient(pg_proxy.ports["postgresql"])
    started = time.monotonic()
    fields = client.error()
    assert fields["C"] == "08006" and "login in time" in fields["M"]
    assert 2.5 < time.monotonic() - started < 8  # client_login_timeout is 3 s in the test config
    assert client.closed_by_peer()
    pg_proxy.wait_for_log("did not complete its login in time")
    still_fine(bystander)


def test_wrong_password(pg_proxy: ProxyProcess, bystander: psycopg.Connection) -> None:
    client = RawClient(pg_proxy.ports["postgresql"])
    with pytest.raises(PermissionError, match='password authentication failed for user "app"'):
        client.login(password="not-the-secret")
    pg_proxy.wait_for_log(r'password authentication failed for user "app" \[28P01\]')
    unknown = RawClient(pg_proxy.ports["postgresql"])
    with pytest.raises(PermissionError, match="password authentication failed"):
        unknown.login(user="nobody", password="x")
    still_fine(bystander)


def test_plaintext_after_ssl_request_is_refused(pg_proxy: ProxyProcess, bystander: psycopg.Connection) -> None:
    """Bytes sent in the clear right behind SSLRequest must not be taken as part of the TLS session."""
    client = RawClient(pg_proxy.ports["postgresql"])
    client.send(pg.ssl_request() + pg.startup_message({"user": "app"}))
    assert client.sock.recv(1) == b"S"
    assert client.error()["C"] == "08P01"  # in the clear, since no TLS session was set up
    assert client.closed_by_peer()
    pg_proxy.wait_for_log("unencrypted data received after the TLS request")
    still_fine(bystander)


def test_replication_and_old_protocols_are_refused(pg_proxy: ProxyProcess) -> None:
    client = RawClient(pg_proxy.ports["postgresql"])
    client.send(pg.startup_message({"user": "app", "replication": "database"}))
    assert "replication" in client.error()["M"]
    old = RawClient(pg_proxy.ports["postgresql"])
    body = (2 << 16).to_bytes(4, "big") + b"\x00" * 8
    old.send((len(body) + 4).to_bytes(4, "big") + body)
    assert "unsupported frontend protocol 2.0" in old.error()["M"]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(noise=st.binary(min_size=1, max_size=300))
def test_fuzzed_bytes_after_login_never_hurt_others(pg_proxy: ProxyProcess, bystander: psycopg.Connection,
                                                    noise: bytes) -> None:
    client = RawClient(pg_proxy.ports["postgresql"], timeout=5)
    client.login()
    try:
        client.send(noise + pg.query("SELECT 1"))
        client.sock.settimeout(0.5)
        client.sock.recv(65536)
    except (TimeoutError, ConnectionError):
        pass
    finally:
        client.close()
    still_fine(bystander)
    assert pg_proxy.alive


def test_gssenc_request_is_declined_then_login_proceeds(pg_proxy: ProxyProcess) -> None:
    client = RawClient(pg_proxy.ports["postgresql"])
    client.send(pg.INT32_PAIR.pack(8, pg.GSSENC_REQUEST_CODE))
    assert client.sock.recv(1) == b"N"
    client.login()
    assert client.query("SELECT 1")[-1][0] == "Z"
