"""Bad input on the MySQL listener: garbage, wrong sequence ids, impossible lengths, silence, unknown commands."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pymysql
import pytest

from proxy.protocol.mysql import constants as my
from proxy.protocol.mysql.packets import frame
from rawmysql import RawClient
from support import ProxyProcess


@pytest.fixture(scope="module")
def bystander(mysql_proxy: ProxyProcess) -> Iterator[pymysql.Connection]:
    """A well-behaved client connected through every bad-input test: it must keep working."""
    conn = pymysql.connect(host="127.0.0.1", port=mysql_proxy.ports["mysql"], user="app", password="app-secret",
                           database="app", autocommit=True)
    yield conn
    conn.close()


def still_works(conn: pymysql.Connection) -> None:
    with conn.cursor() as cur:
        cur.execute("SELECT 'fine', 1 + 1")
        assert cur.fetchone() == ("fine", 2)


def test_garbage_instead_of_the_handshake_response(mysql_proxy: ProxyProcess, bystander: pymysql.Connection) -> None:
    client = RawClient(mysql_proxy.ports["mysql"])
    client.read_greeting()
    client.send(b"GET / HTTP/1.1\r\nHost: example\r\n\r\n")
    err = client.error()
    assert err.error_code == my.ER_HANDSHAKE_ERROR and err.sql_state == "08S01"
    assert "Bad handshake" in err.message
    assert client.closed_by_peer()
    mysql_proxy.wait_for_log(r"Bad handshake: a login packet of \d+ bytes \[1043 08S01\]")
    still_works(bystander)


def test_garbage_before_the_greeting_is_read(mysql_proxy: ProxyProcess, bystander: pymysql.Connection) -> None:
    client = RawClient(mysql_proxy.ports["mysql"])
    client.send(b"\x05\x00\x00\x01hello" + b"\x00" * 40)  # a frame that is no handshake response
    client.read_greeting()
    err = client.error()
    assert err.error_code == my.ER_HANDSHAKE_ERROR
    assert "malformed handshake response" in err.message
    assert client.closed_by_peer()
    still_works(bystander)


def test_wrong_sequence_id_in_login(mysql_proxy: ProxyProcess, bystander: pymysql.Connection) -> None:
    client = RawClient(mysql_proxy.ports["mysql"])
    client.read_greeting()
    client.send(frame(b"\x00" * 40, 7))
    err = client.error()
    assert err.error_code == my.ER_NET_PACKETS_OUT_OF_ORDER
    assert "sequence id 7, expected 1" in err.message
    assert client.closed_by_peer()
    mysql_proxy.wait_for_log(r"Got packets out of order: sequence id 7, expected 1")
    still_works(bystander)


def test_wrong_sequence_id_of_a_command(mysql_proxy: ProxyProcess, bystander: pymysql.Connection) -> None:
    client = RawClient(mysql_proxy.ports["mysql"])
    client.login()
    client.send(frame(b"\x03SELECT 1", 3))
    err = client.error()
    assert err.error_code == my.ER_NET_PACKETS_OUT_OF_ORDER
    assert client.closed_by_peer()
    still_works(bystander)


def test_impossible_length(mysql_proxy: ProxyProcess, bystander: pymysql.Connection) -> None:
    client = RawClient(mysql_proxy.ports["mysql"])
    client.read_greeting()
    client.send(b"\xff\xff\xff\x01" + b"x" * 100)  # a 16 MB login packet
    err = client.error()
    assert err.error_code == my.ER_HANDSHAKE_ERROR and "16777215 bytes" in err.message
    assert client.closed_by_peer()
    still_works(bystander)


def test_empty_command_packet(mysql_proxy: ProxyProcess, bystander: pymysql.Connection) -> None:
    client = RawClient(mysql_proxy.ports["mysql"])
    client.login()
    client.send(frame(b"", 0))
    err = client.error()
    assert err.error_code == my.ER_MALFORMED_PACKET and "empty command" in err.message
    assert client.closed_by_peer()
    still_works(bystander)


def test_client_that_never_answers_the_handshake(mysql_proxy: ProxyProcess, bystander: pymysql.Connection) -> None:
    client = RawClient(mysql_proxy.ports["mysql"])
    client.read_greeting()
    started = time.monotonic()
    err = client.error()  # the fixture's client_login_timeout is 3 s
    assert 2.5 < time.monotonic() - started < 8
    assert err.error_code == my.ER_NET_READ_INTERRUPTED
    assert client.closed_by_peer()
    mysql_proxy.wait_for_log(r"did not complete its login in time \[1159 08S01\]")
    still_works(bystander)


def test_unknown_command_byte_keeps_the_connection(mysql_proxy: ProxyProcess, bystander: pymysql.Connection) -> None:
    client = RawClient(mysql_proxy.ports["mysql"])
    client.login()
    for command in (0x40, my.COM_BINLOG_DUMP, my.COM_SLEEP):
        client.send(frame(bytes((command,)) + b"junk", 0))
        err = client.error()
        assert err.error_code == my.ER_UNKNOWN_COM_ERROR and err.sql_state == "08S01"
        assert f"Unknown command 0x{command:02x}" in err.message
    packets = client.query("SELECT 41 + 1")
    assert any(b"42" in p for p in packets)
    mysql_proxy.wait_for_log(r"Unknown command 0x40")
    client.close()
    still_works(bystander)


def test_truncated_login_then_hang_up(mysql_proxy: ProxyProcess, bystander: pymysql.Connection) -> None:
    client = RawClient(mysql_proxy.ports["mysql"])
    client.read_greeting()
    client.send(b"\x40\x00\x00\x01\x00\x00")  # a header promising 64 bytes, then the client is gone
    client.close()
    mysql_proxy.wait_for_log(r"closed the connection during login")
    still_works(bystander)


def test_wrong_password_is_1045_with_a_log_line(mysql_proxy: ProxyProcess) -> None:
    with pytest.raises(pymysql.err.OperationalError) as info:
        pymysql.connect(host="127.0.0.1", port=mysql_proxy.ports["mysql"], user="app", password="wrong",
                        database="app")
    assert info.value.args[0] == 1045
    assert "Access denied for user 'app'" in info.value.args[1]
    line = mysql_proxy.wait_for_log(r"Access denied for user 'app'.*\[1045 28000\]")
    assert "wrong" not in line
    with pytest.raises(pymysql.err.OperationalError) as info:
        pymysql.connect(host="127.0.0.1", port=mysql_proxy.ports["mysql"], user="nobody", password="x")
    assert info.value.args[0] == 1045
