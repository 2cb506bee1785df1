"""Hostile MySQL clients: leaving in the middle of a packet, and stalling in the middle of one (issue 9)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from devtools.servers import MariaDBInstance
from proxy.protocol.mysql import constants as my
from proxy.protocol.mysql.packets import frame
from rawmysql import RawClient
from support import running_proxy


def rows_of(packets: list[bytes]) -> list[bytes]:
    """Text-protocol rows of a one-column result: the packets between the two EOFs, without their length byte."""
    eofs = [i for i, p in enumerate(packets) if p[0] == 0xFE and len(p) < 9]
    return [p[1:] for p in packets[eofs[0] + 1 : eofs[1]]]


def test_client_leaving_mid_packet_does_not_hand_its_backend_on(tmp_path: Path,
                                                                 mariadb_server: MariaDBInstance) -> None:
    with running_proxy(tmp_path, mariadb=mariadb_server,
                       mysql__pool={"max_connections": 1, "connection_borrow_timeout": 10.0}) as proxy:
        port = proxy.ports["mysql"]
        for sent in (10, 3000):  # inside the part the proxy looks at, and past it (already passed to the server)
            leaver = RawClient(port)
            leaver.login()
            text = b"SELECT '" + b"x" * 99_000 + b"'"
            whole = frame(bytes((my.COM_QUERY,)) + b"SELECT 1", 0)
            leaver.send(whole + frame(bytes((my.COM_QUERY,)) + text, 0)[:sent])
            leaver.packet()  # the first answer has begun: the proxy has read both
            time.sleep(0.2)
            leaver.close()
            victim = RawClient(port)
            victim.login()
            assert rows_of(victim.query("SELECT 'mine'")) == [b"mine"]
            victim.close()


@pytest.mark.parametrize("partial", [b"\x64\x00\x00\x00\x03SELECT", b"\x64\x00"])
def test_client_stalled_mid_packet_is_disconnected(tmp_path: Path, mariadb_server: MariaDBInstance,
                                                   partial: bytes) -> None:
    with running_proxy(tmp_path, mariadb=mariadb_server, server={"client_message_timeout": 2.0}) as proxy:
        port = proxy.ports["mysql"]
        idle = RawClient(port)
        idle.login()
        stalled = RawClient(port)
        stalled.login()
        started = time.monotonic()
        stalled.send(partial)
        error = stalled.error()
        waited = time.monotonic() - started
        assert error.error_code == 1159 and "middle of a packet" in error.message, error
        assert 1.5 < waited < 6, waited
        assert stalled.closed_by_peer()
        assert rows_of(idle.query("SELECT 'idle is fine'")) == [b"idle is fine"]
        proxy.wait_for_log(r"middle of a packet")


def test_internal_wait_on_a_backend_has_a_deadline(tmp_path: Path, mariadb_server: MariaDBInstance) -> None:
    """Session mode, a reset query that never ends: the backend is closed at the deadline and its slot freed."""
    with running_proxy(tmp_path, mariadb=mariadb_server, mysql__pool={
        "max_connections": 1, "connection_borrow_timeout": 20.0, "mode": "session",
        "reset_query": "SELECT SLEEP(600)", "internal_query_timeout": 1.0,
    }) as proxy:
        port = proxy.ports["mysql"]
        first = RawClient(port)
        first.login()
        first.query("BEGIN")  # left inside a transaction: reset, then the reset query runs
        first.close()
        started = time.monotonic()
        second = RawClient(port, timeout=20)
        second.login()
        assert rows_of(second.query("SELECT 'next'")) == [b"next"]
        assert time.monotonic() - started < 8
        second.close()
        proxy.wait_for_log(r"did not answer within")
