"""Limits: oversize messages refused at their header before and after login, max_client_connections, memory."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pymysql
import pytest

from devtools.servers import MariaDBInstance, PostgresInstance, free_port
from proxy.auth.scram import MECHANISM, ScramClient
from proxy.protocol.mysql.packets import ErrPacket, SSLRequest, frame
from proxy.protocol.pg import messages as pg
from rawmysql import CAPS
from rawmysql import RawClient as RawMySQL
from rawpg import RawClient as RawPG
from support import ProxyProcess, metric_value, running_proxy, scrape

MB = 1 << 20
QUERY_SIZE = 200 * MB  # a large Query streams through (its text scanned on the way)


@pytest.fixture(scope="module")
def both_proxy(tmp_path_factory: pytest.TempPathFactory, pg_server: PostgresInstance,
               mariadb_server: MariaDBInstance) -> Iterator[ProxyProcess]:
    with running_proxy(tmp_path_factory.mktemp("limits"), pg_server, mariadb_server) as proxy:
        yield proxy


def stream(sock: socket.socket, total: int) -> int:
    """Send up to `total` bytes of filler; returns how many went out before the proxy stopped taking them."""
    chunk = b"\x00" * MB
    sent = 0
    sock.settimeout(3)
    try:
        while sent < total:
            sock.sendall(chunk)
            sent += len(chunk)
    except OSError:  # reset, broken pipe, or a proxy that stopped reading (timeout)
        pass
    return sent


def metric(proxy: ProxyProcess, name: str) -> float:
    text = scrape(proxy)
    assert f"{name}{{" in text, text
    return metric_value(text, name)


def settle_rss(proxy: ProxyProcess) -> int:
    time.sleep(0.3)
    return proxy.rss()


# --- before authentication ---


def test_pg_900mb_password_of_unknown_user_is_refused_at_the_header(both_proxy: ProxyProcess) -> None:
    before = settle_rss(both_proxy)
    client = RawPG(both_proxy.ports["postgresql"])
    client.send(pg.startup_message({"user": "nobody", "database": "app"}))
    kind, body = client.recv_message()
    assert kind == "R" and int.from_bytes(body[:4], "big") == pg.AUTH_SASL
    client.send(b"p" + (900_000_000 + 4).to_bytes(4, "big"))
    kind, body = client.recv_message()
    fields = pg.parse_error_fields(body)
    assert kind == "E" and fields["C"] == "08P01" and fields["S"] == "FATAL", fields
    sent = stream(client.sock, 300 * MB)
    assert sent < 300 * MB
    assert both_proxy.rss() - before < 20 * MB
    both_proxy.wait_for_log(r"invalid message length 900000004")


def test_pg_oversize_startup_packet_is_refused_at_the_header(both_proxy: ProxyProcess) -> None:
    before = settle_rss(both_proxy)
    client = RawPG(both_proxy.ports["postgresql"])
    client.send((900_000_000).to_bytes(4, "big") + pg.INT32.pack(pg.PROTOCOL_V3))
    kind, body = client.recv_message()
    assert kind == "E" and pg.parse_error_fields(body)["C"] == "08P01"
    assert stream(client.sock, 300 * MB) < 300 * MB
    assert both_proxy.rss() - before < 20 * MB


def test_pg_bytes_sent_ahead_during_login_are_not_buffered_without_bound(tmp_path: Path) -> None:
    """While the proxy waits for the database during a login, a client streaming bytes is paused, not buffered."""
    nowhere = {"enabled": True, "port": free_port(), "backend_port": free_port()}  # no database listens there
    with running_proxy(tmp_path, postgresql=nowhere) as proxy:
        before = settle_rss(proxy)
        client = RawPG(proxy.ports["postgresql"])
        client.send(pg.startup_message({"user": "app", "database": "app"}))
        client.recv_message()  # AuthenticationSASL
        scram = ScramClient(b"app-secret")
        client.send(pg.sasl_initial_response(MECHANISM, scram.client_first()))
        kind, body = client.recv_message()
        client.send(pg.password_message(scram.client_final(body[4:])))
        kind, body = client.recv_message()
        assert kind == "R" and int.from_bytes(body[:4], "big") == pg.AUTH_SASL_FINAL
        # the proxy now connects to a database that is not there (and retries); the client sends ahead
        assert stream(client.sock, 300 * MB) < 300 * MB
        assert proxy.rss() - before < 20 * MB


def test_mysql_oversize_login_packet_is_refused_at_the_header(both_proxy: ProxyProcess) -> None:
    before = settle_rss(both_proxy)
    client = RawMySQL(both_proxy.ports["mysql"])
    client.read_greeting()
    client.send(b"\xff\xff\xff\x01")  # a 16 MB frame, the first of a login packet of any size
    _, payload = client.packet()
    assert payload[0] == 0xFF and ErrPacket.parse(payload).error_code == 1043
    assert stream(client.sock, 300 * MB) < 300 * MB
    assert both_proxy.rss() - before < 20 * MB


# --- max_client_connections ---


def test_max_client_connections_refuses_the_next_client_and_counts_it(
    tmp_path: Path, pg_server: PostgresInstance, mariadb_server: MariaDBInstance
) -> None:
    with running_proxy(tmp_path, pg_server, mariadb_server,
                       server={"max_client_connections": 3, "metrics_port": 0}) as proxy:
        pg_port, my_port = proxy.ports["postgresql"], proxy.ports["mysql"]
        held = [psycopg.connect(host="127.0.0.1", port=pg_port, user="app", password="app-secret", dbname="app")
                for _ in range(2)]
        my_held = pymysql.connect(host="127.0.0.1", port=my_port, user="app", password="app-secret", database="app")
        raw = RawPG(pg_port)
        raw.send(pg.startup_message({"user": "app", "database": "app"}))
        kind, body = raw.recv_message()
        fields = pg.parse_error_fields(body)
        assert kind == "E" and fields["C"] == "53300" and "too many clients" in fields["M"], fields
        with pytest.raises(psycopg.OperationalError, match="too many clients"):
            psycopg.connect(host="127.0.0.1", port=pg_port, user="app", password="app-secret", dbname="app")
        with pytest.raises(pymysql.err.OperationalError) as refused:
            pymysql.connect(host="127.0.0.1", port=my_port, user="app", password="app-secret", database="app")
        assert refused.value.args[0] == 1040
        refusals = metric(proxy, "dbproxy_client_connections_refused_total")
        assert refusals >= 3  # (libpq tries again without TLS after the refusal over TLS: one more)
        for conn in held:  # the clients let in keep working
            assert conn.execute("SELECT 1").fetchone() == (1,)
            conn.close()
        with my_held.cursor() as cursor:
            cursor.execute("SELECT 2")
            assert cursor.fetchone() == (2,)
        deadline = time.monotonic() + 5  # a slot frees once the proxy has seen a client leave
        while True:
            try:
                again = psycopg.connect(host="127.0.0.1", port=pg_port, user="app", password="app-secret",
                                        dbname="app")
                break
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        assert again.execute("SELECT 3").fetchone() == (3,)
        again.close()
        my_held.close()
        assert proxy.log().count("too many clients") == refusals  # one line per refusal


# --- after authentication ---


def test_pg_oversize_message_after_login_is_refused_at_the_header(tmp_path: Path, pg_server: PostgresInstance) -> None:
    with running_proxy(tmp_path, pg_server, server={"max_message_size": 64 * MB}) as proxy:
        before = settle_rss(proxy)
        client = RawPG(proxy.ports["postgresql"])
        client.login()
        client.send(b"Q" + (500 * MB).to_bytes(4, "big"))
        kind, body = client.recv_message()
        fields = pg.parse_error_fields(body)
        assert kind == "E" and fields["C"] == "08P01" and "invalid message length" in fields["M"], fields
        assert stream(client.sock, 300 * MB) < 300 * MB
        assert proxy.rss() - before < 20 * MB


# --- TLS ---


def _lines_about(proxy: ProxyProcess, peer_port: int) -> list[str]:
    time.sleep(0.5)
    text = proxy.log()
    return [line for line in text.splitlines() if f":{peer_port}" in line]


def test_failed_tls_handshakes_log_one_warning_line(both_proxy: ProxyProcess) -> None:
    client = RawPG(both_proxy.ports["postgresql"])
    client.send(pg.ssl_request())
    assert client.sock.recv(1) == b"S"
    client.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")  # not a TLS ClientHello
    with pytest.raises(OSError):
        while client.sock.recv(65536):
            pass
        raise ConnectionError("closed")
    port = client.sock.getsockname()[1]
    lines = _lines_about(both_proxy, port)
    assert len(lines) == 1 and " WARNING " in lines[0] and "TLS handshake failed" in lines[0], lines

    my_client = RawMySQL(both_proxy.ports["mysql"])
    my_client.read_greeting()
    my_client.send(frame(SSLRequest(CAPS).build(), 1))
    my_client.send(b"\x16\x03\x01\x00\x05hello")  # a TLS record header with a broken handshake in it
    with pytest.raises(OSError):
        while my_client.sock.recv(65536):
            pass
        raise ConnectionError("closed")
    port = my_client.sock.getsockname()[1]
    lines = _lines_about(both_proxy, port)
    assert len(lines) == 1 and " WARNING " in lines[0] and "TLS handshake failed" in lines[0], lines
    assert "Traceback" not in both_proxy.log()


# --- memory after large messages ---


def test_pg_200mb_copy_data_message_after_login_leaves_memory_near_baseline(both_proxy: ProxyProcess) -> None:
    client = RawPG(both_proxy.ports["postgresql"])
    client.login()
    client.query("CREATE TEMP TABLE big (t text)")
    before = settle_rss(both_proxy)
    client.send(pg.query("COPY big FROM STDIN"))
    assert client.recv_message()[0] == "G"
    row = b"x" * (200 * MB) + b"\n"
    client.send(b"d" + (4 + len(row)).to_bytes(4, "big"))
    client.sock.settimeout(120)
    client.sock.sendall(row)
    client.send(b"c\x00\x00\x00\x04")
    replies = client.until("Z")
    assert replies[0] == ("C", b"COPY 1\x00"), replies
    del row
    time.sleep(1.5)
    assert both_proxy.rss() - before < 20 * MB


def test_pg_large_query_after_login_leaves_memory_near_baseline(both_proxy: ProxyProcess) -> None:
    """A 200 MB Query streams through; whatever the proxy buffered on the way is released after."""
    conn = psycopg.connect(host="127.0.0.1", port=both_proxy.ports["postgresql"], user="app", password="app-secret",
                           dbname="app", autocommit=True)
    conn.execute("SELECT 1")
    before = settle_rss(both_proxy)
    literal = "x" * QUERY_SIZE
    assert conn.execute("SELECT length('" + literal + "')").fetchone() == (QUERY_SIZE,)
    del literal
    time.sleep(1.5)
    assert both_proxy.rss() - before < 20 * MB
    conn.close()
