"""Large MySQL packets through the proxy: refused at the header over max_message_size, streamed in linear cost
below it, without stalling other clients (issue 9 items 3 and 4)."""

from __future__ import annotations

import multiprocessing
import time
from pathlib import Path

import psutil
import pytest

from devtools.servers import MariaDBInstance
from loadtest.big_mysql_query import MB, PlainClient, bystander, cpu, measure
from proxy.protocol.mysql import constants as my
from proxy.protocol.mysql.packets import frame
from rawmysql import RawClient
from support import mysql_backend_connections, running_proxy


def rows_of(packets: list[bytes]) -> list[bytes]:
    """Text-protocol rows of a one-column result: the packets between the two EOFs, without their length byte."""
    eofs = [i for i, p in enumerate(packets) if p[0] == 0xFE and len(p) < 9]
    return [p[1:] for p in packets[eofs[0] + 1 : eofs[1]]]


def _favour(pids: list[int]) -> None:
    """Raise the scheduling priority of the processes whose latency is measured, when allowed (this machine's
    cores are shared: the test measures stalls of the proxy's event loop, not the other work)."""
    for pid in pids:
        try:
            psutil.Process(pid).nice(-10)
        except (psutil.AccessDenied, PermissionError):
            return


def _header(length: int, seq: int) -> bytes:
    return bytes((length & 0xFF, (length >> 8) & 0xFF, length >> 16, seq))


# (max_message_size, what the client sends: the start of a logical packet larger than the limit)
OVERSIZE = {
    "continued": (20 * MB, [_header(my.MAX_PACKET, 0), b"\x03SELECT LENGTH('", b"x" * (my.MAX_PACKET - 16),
                            _header(my.MAX_PACKET, 1)]),  # a 40 MB query: its second frame's header passes 20 MB
    "one frame": (1 * MB, [_header(5 * MB, 0), b"\x03SELECT '" + b"x" * 1000]),
}


@pytest.mark.parametrize("case", OVERSIZE)
def test_oversize_packet_is_refused_at_its_header(tmp_path: Path, mariadb_server: MariaDBInstance,
                                                  case: str) -> None:
    limit, parts = OVERSIZE[case]
    with running_proxy(tmp_path, mariadb=mariadb_server,
                       server={"max_message_size": limit, "client_message_timeout": 60.0},
                       mysql__pool={"max_connections": 2}) as proxy:
        port = proxy.ports["mysql"]
        bystander_client = RawClient(port)
        bystander_client.login()
        bystander_client.query("BEGIN")  # holds one backend throughout
        assert rows_of(bystander_client.query("SELECT 'before'")) == [b"before"]
        baseline = proxy.rss()
        sender = RawClient(port, timeout=20)
        sender.login()
        block = 64 * 1024
        for part in parts:  # nothing past the header that passes the limit: the proxy is not waiting for it
            for at in range(0, len(part), block):
                sender.send(part[at : at + block])
        error = sender.error()
        assert error.error_code == my.ER_NET_PACKET_TOO_LARGE and error.sql_state == "08S01", error
        assert "max_message_size" in error.message, error
        assert sender.closed_by_peer()
        assert proxy.rss() - baseline < 24 * MB, (baseline, proxy.rss())  # streamed, not gathered
        proxy.wait_for_log(r"WARNING.*max_message_size")
        assert len([line for line in proxy.log().splitlines() if "max_message_size" in line]) == 1
        assert rows_of(bystander_client.query("SELECT 'after'")) == [b"after"]
        # the backend that received part of the packet is closed, not reused: only the bystander's is left
        deadline = time.monotonic() + 10
        while mysql_backend_connections(mariadb_server) > 1 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert mysql_backend_connections(mariadb_server) == 1
        bystander_client.query("COMMIT")
        follower = RawClient(port)
        follower.login()
        assert rows_of(follower.query("SELECT 'next client'")) == [b"next client"]
        follower.close()
        bystander_client.close()


def test_200mb_query_is_cheaper_for_the_proxy_than_for_the_server(tmp_path: Path,
                                                                  mariadb_server: MariaDBInstance) -> None:
    server_pid = mariadb_server.pid
    assert server_pid is not None
    with running_proxy(tmp_path, mariadb=mariadb_server, server={"log_level": "warning"}) as proxy:
        port = proxy.ports["mysql"]
        context = multiprocessing.get_context("spawn")
        ours, theirs = context.Pipe()
        stop = context.Event()
        process = context.Process(target=bystander, args=(port, theirs, stop))
        process.start()
        try:
            assert ours.poll(30), "the bystander did not log in"
            _favour([proxy.pid, ours.recv()])
            time.sleep(0.5)
            baseline = proxy.rss()
            result = measure(port, proxy.pid, server_pid, 200 * MB)
        finally:
            stop.set()
        assert ours.poll(30)
        round_trips = sorted(ours.recv())
        process.join(10)
        print(f"200 MB COM_QUERY: proxy {result.proxy_cpu:.2f} s CPU, server {result.server_cpu:.2f} s CPU, "
              f"{result.elapsed:.2f} s; bystander round trips: {len(round_trips)}, "
              f"p99 {round_trips[len(round_trips) * 99 // 100] * 1000:.0f} ms, max {round_trips[-1] * 1000:.0f} ms")
        assert result.proxy_cpu < result.server_cpu, result
        assert len(round_trips) > 50
        # No stop-the-world while the big packet passes: no bystander round trip over 50 ms, except scheduler
        # noise of this shared machine tolerated for one round trip in a hundred.
        assert round_trips[len(round_trips) * 99 // 100] < 0.05, round_trips[-10:]
        assert round_trips[-1] < 0.25, round_trips[-10:]
        time.sleep(0.5)
        assert proxy.rss() - baseline < 32 * MB, (baseline, proxy.rss())  # memory released afterwards


def test_15mb_prepare_is_gathered_in_linear_time(tmp_path: Path, mariadb_server: MariaDBInstance) -> None:
    """A COM_STMT_PREPARE is inspected whole: the proxy gathers its text as it arrives (64 kB writes), in a
    buffer that grows, never re-copying what it has on every read."""
    server_pid = mariadb_server.pid
    assert server_pid is not None
    with running_proxy(tmp_path, mariadb=mariadb_server, server={"log_level": "warning"}) as proxy:
        client = PlainClient(proxy.ports["mysql"], "app", "app-secret")
        try:
            client.execute("BEGIN")
            text = b"SELECT LENGTH('" + b"x" * (15 * MB) + b"')"
            packet = frame(bytes((my.COM_STMT_PREPARE,)) + text, 0)
            proxy_process, server = psutil.Process(proxy.pid), psutil.Process(server_pid)
            proxy_before, server_before = cpu(proxy_process), cpu(server)
            for at in range(0, len(packet), 64 * 1024):
                client.sock.sendall(packet[at : at + 64 * 1024])
                time.sleep(0)
            answer = client.packet()
            proxy_cpu, server_cpu = cpu(proxy_process) - proxy_before, cpu(server) - server_before
            assert answer[0] == 0x00, answer[:80]
            print(f"15 MB COM_STMT_PREPARE: proxy {proxy_cpu:.2f} s CPU, server {server_cpu:.2f} s CPU")
            assert proxy_cpu < max(server_cpu, 0.3), (proxy_cpu, server_cpu)
        finally:
            client.close()
