"""Large transfers: COPY of 100 MB both ways byte-identical, and a slow reader of 500 MB with bounded proxy memory."""

from __future__ import annotations

import hashlib
import os
import subprocess
import threading
import time
from pathlib import Path

from proxy.protocol.pg import messages as pg
from rawpg import RawClient
from support import ProxyProcess

ENV = dict(os.environ, PGPASSWORD="app-secret")
MB = 1024 * 1024


def psql(proxy: ProxyProcess, command: str) -> None:
    result = subprocess.run(
        ["psql", "-X", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1", "-p", str(proxy.ports["postgresql"]),
         "-U", "app", "app", "-c", command], env=ENV, capture_output=True, timeout=300)
    assert result.returncode == 0, result.stderr


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as source:
        while chunk := source.read(MB):
            digest.update(chunk)
    return digest.hexdigest()


def test_copy_100mb_round_trip_is_byte_identical(pg_proxy: ProxyProcess, tmp_path: Path) -> None:
    source = tmp_path / "in.tsv"
    filler = "abcdefghij" * 10
    with source.open("w") as out:
        row = 0
        while out.tell() < 100 * MB:
            out.writelines(f"{row + i}\t{filler}\t{(row + i) * 7 % 1000003}\n" for i in range(10000))
            row += 10000
    psql(pg_proxy, "DROP TABLE IF EXISTS big_copy; CREATE UNLOGGED TABLE big_copy(id bigint, pad text, n int)")
    psql(pg_proxy, f"\\copy big_copy FROM '{source}'")
    back = tmp_path / "out.tsv"
    psql(pg_proxy, f"\\copy (SELECT * FROM big_copy ORDER BY id) TO '{back}'")
    assert back.stat().st_size == source.stat().st_size >= 100 * MB
    assert sha256(back) == sha256(source)
    psql(pg_proxy, "DROP TABLE big_copy")


def test_slow_reader_of_500mb_keeps_proxy_memory_bounded(pg_proxy: ProxyProcess) -> None:
    client = RawClient(pg_proxy.ports["postgresql"], timeout=60)
    client.login()
    client.query("SELECT 1")
    baseline = pg_proxy.rss()
    peak = baseline
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, pg_proxy.rss())
            time.sleep(0.05)

    sampler = threading.Thread(target=sample)
    sampler.start()
    rows = 500_000
    client.send(pg.query(f"SELECT repeat('x', 1000) FROM generate_series(1, {rows})"))
    received = 0
    try:
        slow_until = time.monotonic() + 4
        while time.monotonic() < slow_until:  # a slow reader: 16 KiB every 10 ms
            received += len(client.sock.recv(16384))
            time.sleep(0.01)
        slow_peak = peak
        tail = b""
        while True:  # then drain at full speed, keeping only the tail to find ReadyForQuery
            chunk = client.sock.recv(1 << 20)
            assert chunk, "proxy closed the connection"
            received += len(chunk)
            tail = (tail + chunk)[-16:]
            if tail.endswith(b"Z\x00\x00\x00\x05I"):
                break
    finally:
        stop.set()
        sampler.join()
    assert received > rows * 1000  # ~510 MB of DataRows really went through
    assert slow_peak - baseline < 32 * MB, (baseline, slow_peak)
    assert peak - baseline < 64 * MB, (baseline, peak)
    assert client.query("SELECT 2")[-1][0] == "Z"
