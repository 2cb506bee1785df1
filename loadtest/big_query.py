"""CPU cost of one large Query through the proxy, against the server's own cost for it (issue 9 item 4).

`python -m loadtest.big_query [--sizes 8,32,64,128,256] [--proxy-src DIR]` starts a throwaway PostgreSQL and a
proxy, sends `SELECT length('xxx...')` of each size in 64 kB writes and prints the CPU seconds the proxy process
and the server backend spent on it. `--proxy-src` runs the proxy from another source tree (e.g. an older commit).
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.synchronize import Event
from pathlib import Path

import psutil

from devtools.servers import free_port, start_postgres
from proxy.auth.scram import MECHANISM, ScramClient
from proxy.protocol.pg import messages as pg

MB = 1024 * 1024
WRITE_SIZE = 64 * 1024
PREFIX = b"SELECT length('"
SUFFIX = b"')\x00"


@dataclass
class BigQueryResult:
    size: int
    proxy_cpu: float  # seconds of CPU (user + system) the proxy process spent
    server_cpu: float  # seconds of CPU the server backend spent
    elapsed: float


class PlainClient:
    """Just enough of a PostgreSQL client over a raw socket: SCRAM login, simple queries, raw sends."""

    def __init__(self, port: int, user: str, password: str, timeout: float = 300.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.buffer = b""
        self.sock.sendall(pg.startup_message({"user": user, "database": user}))
        self.message()
        scram = ScramClient(password.encode())
        self.sock.sendall(pg.sasl_initial_response(MECHANISM, scram.client_first()))
        _, body = self.message()
        self.sock.sendall(pg.password_message(scram.client_final(body[4:])))
        self.until("Z")

    def message(self) -> tuple[str, bytes]:
        while True:
            if len(self.buffer) >= 5:
                length = int.from_bytes(self.buffer[1:5], "big")
                if len(self.buffer) >= length + 1:
                    kind, body = chr(self.buffer[0]), self.buffer[5 : length + 1]
                    self.buffer = self.buffer[length + 1 :]
                    if kind == "E":
                        raise RuntimeError(pg.parse_error_fields(body).get("M"))
                    return kind, body
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed by the peer")
            self.buffer += chunk

    def until(self, kind: str) -> list[tuple[str, bytes]]:
        seen = []
        while True:
            seen.append(self.message())
            if seen[-1][0] == kind:
                return seen

    def scalar(self, sql: str) -> str:
        self.sock.sendall(pg.query(sql))
        rows = [body for kind, body in self.until("Z") if kind == "D"]
        return rows[-1][6:].decode()

    def send_big_query(self, size: int) -> str:
        """`SELECT length('x...')` of `size` bytes in all, sent in 64 kB writes; returns the server's answer."""
        filler = size - len(PREFIX) - len(SUFFIX) - 5
        self.sock.sendall(b"Q" + (size - 1).to_bytes(4, "big") + PREFIX)
        block = b"x" * WRITE_SIZE
        while filler > 0:
            self.sock.sendall(block if filler >= WRITE_SIZE else block[:filler])
            filler -= WRITE_SIZE
        self.sock.sendall(SUFFIX)
        rows = [body for kind, body in self.until("Z") if kind == "D"]
        return rows[-1][6:].decode()

    def close(self) -> None:
        self.sock.close()


def cpu(process: psutil.Process) -> float:
    times = process.cpu_times()
    return float(times.user + times.system)


def measure(port: int, proxy_pid: int, size: int, user: str = "app", password: str = "app-secret") -> BigQueryResult:
    """One large Query inside a transaction (so the backend is known), with both sides' CPU measured."""
    client = PlainClient(port, user, password)
    try:
        client.sock.sendall(pg.query("BEGIN"))
        client.until("Z")
        backend = psutil.Process(int(client.scalar("SELECT pg_backend_pid()")))
        proxy = psutil.Process(proxy_pid)
        proxy_before, server_before, started = cpu(proxy), cpu(backend), time.monotonic()
        answer = client.send_big_query(size)
        elapsed = time.monotonic() - started
        proxy_cpu, server_cpu = cpu(proxy) - proxy_before, cpu(backend) - server_before
        assert int(answer) == size - len(PREFIX) - len(SUFFIX) - 5, answer
        client.sock.sendall(pg.query("COMMIT"))
        client.until("Z")
    finally:
        client.close()
    return BigQueryResult(size, proxy_cpu, server_cpu, elapsed)


def bystander(port: int, ready: Connection, stop: Event, user: str = "app", password: str = "app-secret") -> None:
    """Run in its own process: `SELECT 1` every 10 ms inside one transaction (so its backend stays the same);
    sends (own pid, backend pid) once logged in, then the list of round-trip times in seconds at the end."""
    client = PlainClient(port, user, password, timeout=30)
    try:
        client.sock.sendall(pg.query("BEGIN"))
        client.until("Z")
        ready.send((os.getpid(), int(client.scalar("SELECT pg_backend_pid()"))))
        round_trips: list[float] = []
        while not stop.is_set():
            started = time.monotonic()
            client.scalar("SELECT 1")
            round_trips.append(time.monotonic() - started)
            time.sleep(0.01)
        ready.send(round_trips)
    finally:
        client.close()


def start_proxy(folder: Path, listener: str, proxy_src: Path | None) -> tuple[subprocess.Popen[str], int]:
    """Run the proxy on `folder/proxy.toml` (from `proxy_src`, or this tree); return it and `listener`'s port."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if proxy_src is not None:
        env["PYTHONPATH"] = str(proxy_src)
    proxy = subprocess.Popen([sys.executable, "-m", "proxy", "run", "-c", str(folder / "proxy.toml")],
                             stdout=subprocess.PIPE, text=True, env=env,
                             cwd=proxy_src or Path(__file__).resolve().parent.parent)
    assert proxy.stdout is not None
    line = proxy.stdout.readline()
    match = re.search(rf"{listener} port (\d+)", line)
    if match is None:
        proxy.terminate()
        proxy.wait(15)
        raise RuntimeError(f"proxy did not start: {line!r}")
    return proxy, int(match.group(1))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="8,32,64,128,256", help="query sizes in MB, comma-separated")
    parser.add_argument("--proxy-src", type=Path, help="source tree to run the proxy from (default: this one)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bigquery-") as folder_name:
        folder = Path(folder_name)
        server = start_postgres(folder / "pg", users={"app": "app-secret"}, auth="scram-sha-256")
        try:
            (folder / "secrets.toml").write_text('[users]\napp = "app-secret"\n')
            (folder / "proxy.toml").write_text(
                f'[server]\nworkers = 1\nlog_level = "warning"\n[secrets]\nfile = "secrets.toml"\n'
                f"[postgresql]\nport = {free_port()}\nbackend_port = {server.port}\n[mysql]\nenabled = false\n"
            )
            proxy, port = start_proxy(folder, "postgresql", args.proxy_src)
            try:
                print(f"{'size MB':>8} {'proxy CPU s':>12} {'server CPU s':>13} {'elapsed s':>10}")
                for size_mb in (int(s) for s in args.sizes.split(",")):
                    result = measure(port, proxy.pid, size_mb * MB)
                    print(f"{size_mb:>8} {result.proxy_cpu:>12.2f} {result.server_cpu:>13.2f} {result.elapsed:>10.2f}",
                          flush=True)
            finally:
                proxy.terminate()
                proxy.wait(15)
        finally:
            server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
