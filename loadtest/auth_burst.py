"""Login latency of good clients while a burst of failed SCRAM logins for unknown users hits the proxy.

    python -m loadtest.auth_burst [--before REV] [--attempts 1000] [--rate 500] [--logins 300]

Starts a throwaway PostgreSQL and, per code version, a one-worker proxy; measures good clients' login
p50/p99 quietly and during the burst, and the proxy's CPU time per failed attempt. With --before, the same is
run first with the proxy code of git revision REV (exported with git archive), side by side in one run.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import multiprocessing
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import psutil

from loadtest.idle_probe import login
from loadtest.latency import percentile
from loadtest.monitor import cpu_seconds
from loadtest.targets import BENCH_PASSWORD, BENCH_USER, REPO_ROOT, ProxyProcess
from proxy.auth.scram import MECHANISM
from proxy.devservers import start_postgres
from proxy.protocol.pg import messages as pg

BURST_CONCURRENCY = 50


async def _failed_login(port: int, user: str) -> None:
    """One SCRAM attempt as `user` with a made-up proof (an attacker spends no PBKDF2 of its own)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(pg.startup_message({"user": user, "database": BENCH_USER}))
        nonce = base64.b64encode(os.urandom(18)).decode()
        while True:
            head = await reader.readexactly(5)
            body = await reader.readexactly(int.from_bytes(head[1:5], "big") - 4)
            if head[0] != ord("R"):
                return  # the ErrorResponse: authentication failed
            code = int.from_bytes(body[:4], "big")
            if code == pg.AUTH_SASL:
                writer.write(pg.sasl_initial_response(MECHANISM, f"n,,n=,r={nonce}".encode()))
            elif code == pg.AUTH_SASL_CONTINUE:
                server_nonce = dict(p.split("=", 1) for p in body[4:].decode().split(","))["r"]
                proof = base64.b64encode(os.urandom(32)).decode()
                writer.write(pg.password_message(f"c=biws,r={server_nonce},p={proof}".encode()))
            else:
                return
    except (OSError, asyncio.IncompleteReadError):
        return
    finally:
        writer.close()


async def _burst(port: int, attempts: int, rate: float) -> None:
    """`attempts` failed logins started at `rate` per second (at most BURST_CONCURRENCY at once)."""
    gate = asyncio.Semaphore(BURST_CONCURRENCY)
    loop = asyncio.get_running_loop()
    started = loop.time()

    async def one(index: int) -> None:
        await asyncio.sleep(max(0.0, started + index / rate - loop.time()))
        async with gate:
            await _failed_login(port, f"nobody_{index}")

    await asyncio.gather(*(one(i) for i in range(attempts)))


def _burst_process(port: int, attempts: int, rate: float) -> None:
    asyncio.run(_burst(port, attempts, rate))


async def _good_logins(port: int, count: int, stop: multiprocessing.synchronize.Event | None = None) -> list[float]:
    times: list[float] = []
    for _ in range(count):
        if stop is not None and stop.is_set():
            break
        started = time.perf_counter()
        _, writer = await login("127.0.0.1", port, BENCH_USER, BENCH_PASSWORD, BENCH_USER)
        times.append((time.perf_counter() - started) * 1000)
        writer.close()
    return times


def _summary(times: list[float]) -> str:
    ordered = sorted(times)
    return (f"n={len(ordered):4d}  p50 {percentile(ordered, 50):7.2f} ms  "
            f"p99 {percentile(ordered, 99):7.2f} ms")


def measure(label: str, code_dir: Path, workdir: Path, postgres: object, attempts: int, logins: int,
            rate: float) -> None:
    proxy = ProxyProcess(workdir, postgres, None, pool_size=5, code_dir=code_dir, workers=1)  # type: ignore[arg-type]
    proxy.start()
    try:
        port = proxy.ports["postgresql"]
        asyncio.run(_good_logins(port, 20))  # warm: keys derived, pool open
        quiet = asyncio.run(_good_logins(port, logins))
        process = psutil.Process(proxy.pid)
        cpu_before = cpu_seconds(process)
        burst = multiprocessing.Process(target=_burst_process, args=(port, attempts, rate))
        started = time.perf_counter()
        burst.start()
        during: list[float] = []
        while burst.is_alive() or not during:
            during += asyncio.run(_good_logins(port, 5))
        burst.join()
        elapsed = time.perf_counter() - started
        cpu_burst = cpu_seconds(process) - cpu_before
        ratio = percentile(sorted(during), 99) / percentile(sorted(quiet), 99)
        print(f"[{label}] quiet        {_summary(quiet)}")
        print(f"[{label}] during burst {_summary(during)}   p99 ratio {ratio:.2f}x")
        print(f"[{label}] burst: {attempts} failed logins (paced at {rate:g}/s) in {elapsed:.2f} s; "
              f"proxy CPU {cpu_burst:.2f} s "
              f"(includes the good logins meanwhile)")
    finally:
        proxy.stop()


def _export(revision: str, destination: Path) -> Path:
    archive = subprocess.run(["git", "-C", str(REPO_ROOT), "archive", revision, "proxy"], check=True,
                             capture_output=True).stdout
    destination.mkdir(parents=True, exist_ok=True)
    archive_path = destination / "code.tar"
    archive_path.write_bytes(archive)
    with tarfile.open(archive_path) as tar:
        tar.extractall(destination, filter="data")
    return destination


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", help="git revision to measure first, side by side")
    parser.add_argument("--attempts", type=int, default=1000, help="failed logins in the burst")
    parser.add_argument("--logins", type=int, default=300, help="good logins measured while quiet")
    parser.add_argument("--rate", type=float, default=500.0, help="failed logins started per second")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="auth_burst-") as folder:
        root = Path(folder)
        postgres = start_postgres(root / "pg", users={BENCH_USER: BENCH_PASSWORD}, auth="scram-sha-256")
        try:
            if args.before:
                measure(f"before {args.before}", _export(args.before, root / "before"), root / "proxy-before",
                        postgres, args.attempts, args.logins, args.rate)
            measure("this tree", REPO_ROOT, root / "proxy-now", postgres, args.attempts, args.logins, args.rate)
        finally:
            postgres.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
