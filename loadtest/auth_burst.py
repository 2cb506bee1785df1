"""Login latency of good clients while a burst of failed SCRAM logins for unknown users hits the proxy.

    python -m loadtest.auth_burst [--before REV] [--attempts 1000] [--rate 500] [--good-rate 200] [--rounds 3]
                                  [--nice -10]

Starts a throwaway PostgreSQL and, per code version, a one-worker proxy. Per round and proxy: the proxy's CPU time
per failed attempt (the burst with nobody else), then a good client's login p50/p99 quietly and during the burst.
The attacker runs in its own process, the good client (paced at --good-rate, alike in both phases) in this one;
the CPU each of them used is reported beside the proxy's. With --before, a second proxy runs the code of git
revision REV (exported with git archive) and the two take turns within each round, side by side in one run.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import multiprocessing
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from devtools.servers import start_postgres
from loadtest.idle_probe import login
from loadtest.latency import percentile
from loadtest.monitor import cpu_seconds
from loadtest.targets import BENCH_PASSWORD, BENCH_USER, REPO_ROOT, ProxyProcess, knows_auth_section
from proxy.auth.scram import MECHANISM
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


async def _good_logins(port: int, count: int) -> list[float]:
    """`count` logins one after the other as the good user; their times in ms."""
    times: list[float] = []
    for _ in range(count):
        started = time.perf_counter()
        _, writer = await login("127.0.0.1", port, BENCH_USER, BENCH_PASSWORD, BENCH_USER)
        times.append((time.perf_counter() - started) * 1000)
        writer.close()
    return times


async def _paced_logins(port: int, rate: float, done: Callable[[], bool]) -> list[float]:
    """Good logins started at `rate` per second (a slot missed by a slow login is skipped, not made up) until
    `done()`; their times in ms. Paced, so that the good client is one light client as in the quiet phase, not a
    loop that keeps a core busy and makes the measurement one of the machine's scheduling."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    times: list[float] = []
    slot = 0
    while not done():
        delay = started + slot / rate - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        begin = time.perf_counter()
        _, writer = await login("127.0.0.1", port, BENCH_USER, BENCH_PASSWORD, BENCH_USER)
        times.append((time.perf_counter() - begin) * 1000)
        writer.close()
        slot = max(slot + 1, int((loop.time() - started) * rate))
    return times


def _p99(times: list[float]) -> float:
    return percentile(sorted(times), 99)


def _summary(times: list[float]) -> str:
    ordered = sorted(times)
    return (f"n={len(ordered):4d}  p50 {percentile(ordered, 50):6.2f} ms  "
            f"p99 {percentile(ordered, 99):6.2f} ms")


def _children_cpu() -> float:
    """CPU seconds of this process's children that have been waited for (the attacker processes)."""
    times = os.times()
    return times.children_user + times.children_system


@dataclass
class Target:
    """One proxy under test and what was measured on it."""

    label: str
    proxy: ProxyProcess
    failed_cpu_us: list[float] = field(default_factory=list)  # proxy CPU per failed login, burst alone
    quiet: list[list[float]] = field(default_factory=list)  # per round: login times in ms
    during: list[list[float]] = field(default_factory=list)
    attacker_cpu: float = 0.0
    good_client_cpu: float = 0.0
    proxy_cpu_latency: float = 0.0  # proxy CPU during the latency bursts (failed and good logins)
    burst_seconds: float = 0.0

    @property
    def port(self) -> int:
        return self.proxy.ports["postgresql"]

    def cpu(self) -> float:
        return cpu_seconds(psutil.Process(self.proxy.pid))

    def burst_alone(self, attempts: int, rate: float) -> None:
        """The burst with no good client: the proxy's CPU time per failed login."""
        before = self.cpu()
        burst = multiprocessing.Process(target=_burst_process, args=(self.port, attempts, rate))
        burst.start()
        burst.join()
        self.failed_cpu_us.append((self.cpu() - before) / attempts * 1e6)

    def quiet_logins(self, seconds: float, good_rate: float) -> list[float]:
        ends = time.monotonic() + seconds
        return asyncio.run(_paced_logins(self.port, good_rate, lambda: time.monotonic() >= ends))

    def round(self, attempts: int, rate: float, good_rate: float) -> None:
        """The burst alone, then good logins: quietly for half the burst's time, during the burst, quietly again
        (the quiet phases around the burst, so that load from elsewhere on the machine falls on both alike)."""
        self.burst_alone(attempts, rate)
        seconds = attempts / rate / 2
        quiet = self.quiet_logins(seconds, good_rate)
        self.during.append(self.logins_during_burst(attempts, rate, good_rate))
        self.quiet.append(quiet + self.quiet_logins(seconds, good_rate))

    def logins_during_burst(self, attempts: int, rate: float, good_rate: float) -> list[float]:
        cpu, client, attackers = self.cpu(), time.process_time(), _children_cpu()
        burst = multiprocessing.Process(target=_burst_process, args=(self.port, attempts, rate))
        started = time.perf_counter()
        burst.start()
        during = asyncio.run(_paced_logins(self.port, good_rate, lambda: not burst.is_alive()))
        burst.join()
        self.burst_seconds += time.perf_counter() - started
        self.good_client_cpu += time.process_time() - client
        self.attacker_cpu += _children_cpu() - attackers
        self.proxy_cpu_latency += self.cpu() - cpu
        return during

    def report(self, attempts: int, rounds: int) -> None:
        quiet = [t for times in self.quiet for t in times]
        during = [t for times in self.during for t in times]
        ratio = _p99(during) / _p99(quiet)
        per_round = ", ".join(f"{value:.0f}" for value in self.failed_cpu_us)
        ratios = [_p99(d) / _p99(q) for q, d in zip(self.quiet, self.during, strict=True)]
        print(f"[{self.label}] proxy CPU per failed login (burst alone): "
              f"{statistics.median(self.failed_cpu_us):.0f} us (median; rounds: {per_round})")
        print(f"[{self.label}] quiet        {_summary(quiet)}")
        print(f"[{self.label}] during burst {_summary(during)}   p99 ratio {ratio:.2f}x "
              f"(per round: {', '.join(f'{r:.2f}' for r in ratios)}; median {statistics.median(ratios):.2f}x)")
        print(f"[{self.label}] {rounds} burst(s) of {attempts} failed logins in {self.burst_seconds:.2f} s: CPU "
              f"proxy {self.proxy_cpu_latency:.2f} s, attacker process {self.attacker_cpu:.2f} s, "
              f"good client {self.good_client_cpu:.2f} s")


def measure(targets: list[Target], attempts: int, rate: float, good_rate: float, rounds: int) -> None:
    """Rounds of: per proxy, the burst alone (CPU), then good logins quietly and during the burst. The proxies take
    turns, so that the load the machine has from elsewhere falls on each alike."""
    for target in targets:
        asyncio.run(_good_logins(target.port, 20))  # warm: keys derived, pool open
    for _ in range(rounds):
        for target in targets:
            target.round(attempts, rate, good_rate)


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
    parser.add_argument("--before", help="git revision to measure too, side by side (the proxies take turns)")
    parser.add_argument("--attempts", type=int, default=1000, help="failed logins in the burst")
    parser.add_argument("--rate", type=float, default=500.0, help="failed logins started per second")
    parser.add_argument("--good-rate", type=float, default=200.0, help="good logins started per second")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of quiet and burst per proxy")
    parser.add_argument("--nice", type=int, default=0,
                        help="scheduling niceness for this run and all it starts (negative: ahead of the machine's "
                             "other work, which on a shared machine otherwise sets the tail latencies; needs root)")
    args = parser.parse_args(argv)
    if args.nice:
        os.setpriority(os.PRIO_PROCESS, 0, args.nice)  # inherited by the proxies, PostgreSQL and the attackers
    print(f"load average at start: {' '.join(f'{v:.2f}' for v in os.getloadavg())} ({os.cpu_count()} cores, "
          f"niceness {os.getpriority(os.PRIO_PROCESS, 0)})")
    with tempfile.TemporaryDirectory(prefix="auth_burst-") as folder:
        root = Path(folder)
        postgres = start_postgres(root / "pg", users={BENCH_USER: BENCH_PASSWORD}, auth="scram-sha-256")
        targets: list[Target] = []
        try:
            if args.before:
                code = _export(args.before, root / "before")
                targets.append(Target(f"before {args.before}", ProxyProcess(
                    root / "proxy-before", postgres, None, pool_size=5, code_dir=code, workers=1)))
            targets.append(Target("this tree", ProxyProcess(root / "proxy-now", postgres, None, pool_size=5,
                                                            code_dir=REPO_ROOT, workers=1)))
            for target in targets:
                if knows_auth_section(target.proxy.code_dir):  # the burst comes from the good client's address:
                    target.proxy.extra_config = "[auth]\nfailed_login_limit = 0\n"  # no throttle, the cost
                target.proxy.start()
            measure(targets, args.attempts, args.rate, args.good_rate, args.rounds)
        finally:
            for target in targets:
                target.proxy.stop()
            postgres.stop()
    for target in targets:
        target.report(args.attempts, args.rounds)
    print(f"load average at end: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
