"""CPU cost of one large MySQL COM_QUERY through the proxy, against the server's own cost for it (issue 9 item 4).

`python -m loadtest.big_mysql_query [--sizes 8,32,64,128,200] [--proxy-src DIR]` starts a throwaway MariaDB
(max_allowed_packet 1G) and a proxy, sends `SELECT LENGTH('xxx...')` of each size (frames of 16 MB - 1, sent in
64 kB writes) and prints the CPU seconds the proxy process and the mariadbd process spent on it. `--proxy-src`
runs the proxy from another source tree (e.g. an older commit).
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import tempfile
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.synchronize import Event
from pathlib import Path

import psutil

from devtools.servers import free_port, start_mariadb
from loadtest.big_query import cpu, start_proxy
from proxy.auth.mysql import scramble_native_password
from proxy.protocol.mysql import constants as my
from proxy.protocol.mysql.packets import ErrPacket, HandshakeResponse41, HandshakeV10, PacketReader, frame

MB = 1024 * 1024
WRITE_SIZE = 64 * 1024
PREFIX = b"\x03SELECT LENGTH('"
SUFFIX = b"')"
CAPS = (my.CLIENT_PROTOCOL_41 | my.CLIENT_SECURE_CONNECTION | my.CLIENT_PLUGIN_AUTH | my.CLIENT_CONNECT_WITH_DB
        | my.CLIENT_TRANSACTIONS | my.CLIENT_LONG_PASSWORD | my.CLIENT_MULTI_RESULTS)


@dataclass
class BigQueryResult:
    size: int
    proxy_cpu: float  # seconds of CPU (user + system) the proxy process spent
    server_cpu: float  # seconds of CPU the mariadbd process spent
    elapsed: float


class PlainClient:
    """Just enough of a MySQL client over a raw socket: native-password login, text queries, raw sends."""

    def __init__(self, port: int, user: str, password: str, timeout: float = 300.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.reader = PacketReader(1 << 30)
        greeting = HandshakeV10.parse(self.packet())
        scramble = scramble_native_password(password.encode(), greeting.auth_plugin_data)
        self.sock.sendall(frame(HandshakeResponse41(CAPS, user, scramble, user, my.MYSQL_NATIVE_PASSWORD).build(), 1))
        answer = self.packet()
        if answer[:1] != b"\x00":
            raise PermissionError(ErrPacket.parse(answer).message if answer[:1] == b"\xff" else repr(answer[:20]))

    def packet(self) -> bytes:
        while True:
            packet = self.reader.next_packet()
            if packet is not None:
                return packet[1]
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed by the peer")
            self.reader.feed(chunk)

    def result(self) -> list[bytes]:
        """The packets of one answer: an OK, or a text result set's rows (each one column, length byte removed)."""
        first = self.packet()
        if first[0] == 0xFF:
            raise RuntimeError(ErrPacket.parse(first).message)
        if first[0] == 0x00:
            return []
        rows, eofs = [], 0
        while eofs < 2:
            payload = self.packet()
            if payload[0] == 0xFF:
                raise RuntimeError(ErrPacket.parse(payload).message)
            if payload[0] == 0xFE and len(payload) < 9:
                eofs += 1
            elif eofs == 1:
                rows.append(payload[1:])
        return rows

    def execute(self, sql: str) -> list[bytes]:
        self.sock.sendall(frame(bytes((my.COM_QUERY,)) + sql.encode(), 0))
        return self.result()

    def send_big_query(self, size: int) -> None:
        """`SELECT LENGTH('x...')` of `size` payload bytes, as frames of 16 MB - 1, sent in 64 kB writes."""
        block = b"x" * WRITE_SIZE
        left = size
        seq = 0
        while True:
            length = min(left, my.MAX_PACKET)
            self.sock.sendall(bytes((length & 0xFF, (length >> 8) & 0xFF, length >> 16, seq)))
            body = length
            if seq == 0:
                self.sock.sendall(PREFIX)
                body -= len(PREFIX)
            if left == length:
                body -= len(SUFFIX)
            while body > 0:
                self.sock.sendall(block if body >= WRITE_SIZE else block[:body])
                body -= WRITE_SIZE
            if left == length:
                self.sock.sendall(SUFFIX)
            left -= length
            seq = (seq + 1) & 0xFF
            if length < my.MAX_PACKET:
                return

    def big_query(self, size: int) -> str:
        self.send_big_query(size)
        return self.result()[-1].decode()

    def close(self) -> None:
        self.sock.close()


def measure(port: int, proxy_pid: int, server_pid: int, size: int, user: str = "app",
            password: str = "app-secret", transaction: bool = False) -> BigQueryResult:
    """One large COM_QUERY (inside a transaction, or on its own: the proxy borrows a backend for it), with both
    sides' CPU measured."""
    client = PlainClient(port, user, password)
    try:
        if transaction:
            client.execute("BEGIN")
        proxy, server = psutil.Process(proxy_pid), psutil.Process(server_pid)
        proxy_before, server_before, started = cpu(proxy), cpu(server), time.monotonic()
        answer = client.big_query(size)
        elapsed = time.monotonic() - started
        proxy_cpu, server_cpu = cpu(proxy) - proxy_before, cpu(server) - server_before
        assert int(answer) == size - len(PREFIX) - len(SUFFIX), answer
        if transaction:
            client.execute("COMMIT")
    finally:
        client.close()
    return BigQueryResult(size, proxy_cpu, server_cpu, elapsed)


def bystander(port: int, ready: Connection, stop: Event, user: str = "app", password: str = "app-secret") -> None:
    """Run in its own process: `SELECT 1` every 10 ms; sends its own pid once logged in, then the list of
    round-trip times in seconds at the end."""
    client = PlainClient(port, user, password, timeout=30)
    try:
        client.execute("SELECT 1")
        ready.send(os.getpid())
        round_trips: list[float] = []
        while not stop.is_set():
            started = time.monotonic()
            client.execute("SELECT 1")
            round_trips.append(time.monotonic() - started)
            time.sleep(0.01)
        ready.send(round_trips)
    finally:
        client.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="8,32,64,128,200", help="query sizes in MB, comma-separated")
    parser.add_argument("--proxy-src", type=Path, help="source tree to run the proxy from (default: this one)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bigmysql-") as folder_name:
        folder = Path(folder_name)
        server = start_mariadb(folder / "db", users={"app": "app-secret"}, settings={"max_allowed_packet": "1G"})
        try:
            server_pid = server.pid
            assert server_pid is not None
            (folder / "secrets.toml").write_text('[users]\napp = "app-secret"\n')
            (folder / "proxy.toml").write_text(
                f'[server]\nworkers = 1\nlog_level = "warning"\n[secrets]\nfile = "secrets.toml"\n'
                f"[postgresql]\nenabled = false\n"
                f"[mysql]\nenabled = true\nport = {free_port()}\nbackend_port = {server.port}\n"
            )
            proxy, port = start_proxy(folder, "mysql", args.proxy_src)
            try:
                print(f"{'size MB':>8} {'in':>12} {'proxy CPU s':>12} {'server CPU s':>13} {'elapsed s':>10}")
                for size_mb in (int(s) for s in args.sizes.split(",")):
                    for transaction in (False, True):
                        result = measure(port, proxy.pid, server_pid, size_mb * MB, transaction=transaction)
                        where = "transaction" if transaction else "autocommit"
                        print(f"{size_mb:>8} {where:>12} {result.proxy_cpu:>12.2f} {result.server_cpu:>13.2f} "
                              f"{result.elapsed:>10.2f}", flush=True)
            finally:
                proxy.terminate()
                proxy.wait(15)
        finally:
            server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
