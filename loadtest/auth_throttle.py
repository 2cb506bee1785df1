"""Login latency of good clients before and during a wrong-password burst from another address, with the
failed-login throttle on.

    python -m loadtest.auth_throttle --engine postgresql|mysql [--attempts 1000] [--concurrency 50]
                                     [--good-rate 100] [--quiet 3] [--limit 20] [--lockout 60]

Starts a throwaway PostgreSQL or MariaDB and a one-worker proxy ([auth] failed_login_limit --limit within 60 s,
lockout --lockout s). Good clients log in from 127.0.0.1 (paced at --good-rate per second) for --quiet seconds,
then again while an attacker process sends --attempts wrong-password logins from 127.0.0.2 (--concurrency at
once). Prints the good logins' p50/p99 in both phases and how many attacking attempts were throttled (refused
before any password check: PostgreSQL 28000, MySQL 1129) or failed (28P01, 1045).
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from multiprocessing.connection import Connection
from pathlib import Path

from devtools.servers import start_mariadb, start_postgres
from loadtest.latency import percentile
from loadtest.source_logins import Outcome, mysql_login, pg_login
from loadtest.targets import BENCH_PASSWORD, BENCH_USER, ProxyProcess

GOOD_SOURCE, ATTACKER_SOURCE = "127.0.0.1", "127.0.0.2"
THROTTLED = {"postgresql": "28000", "mysql": "1129"}
FAILED = {"postgresql": "28P01", "mysql": "1045"}

Login = Callable[[str, str | None], Awaitable[Outcome]]  # (source, password or None for a wrong one)


def login_function(engine: str, port: int) -> Login:
    async def pg(source: str, password: str | None) -> Outcome:
        return await pg_login(port, BENCH_USER, password, source=source, database=BENCH_USER)

    async def my(source: str, password: str | None) -> Outcome:
        return await mysql_login(port, BENCH_USER, password or "wrong-password", source=source, database=BENCH_USER)

    return pg if engine == "postgresql" else my


async def attack(engine: str, port: int, attempts: int, concurrency: int) -> tuple[Counter[str], float]:
    """`attempts` wrong-password logins from ATTACKER_SOURCE, `concurrency` at once: their outcomes by code, and
    the time they took."""
    login = login_function(engine, port)
    gate = asyncio.Semaphore(concurrency)
    codes: Counter[str] = Counter()

    async def one() -> None:
        async with gate:
            try:
                outcome = await login(ATTACKER_SOURCE, None)
            except (OSError, asyncio.IncompleteReadError) as exc:
                codes[type(exc).__name__] += 1
                return
            codes["ok" if outcome.ok else outcome.code] += 1

    started = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(attempts)))
    return codes, time.perf_counter() - started


def _attack_process(engine: str, port: int, attempts: int, concurrency: int, pipe: Connection) -> None:
    codes, seconds = asyncio.run(attack(engine, port, attempts, concurrency))
    pipe.send((dict(codes), seconds))


async def good_logins(engine: str, port: int, rate: float, done: Callable[[], bool]) -> list[float]:
    """Good logins from GOOD_SOURCE started at `rate` per second until `done()`: their times in ms (a failed one
    raises: the throttle must not touch other addresses)."""
    login = login_function(engine, port)
    loop = asyncio.get_running_loop()
    started, slot, times = loop.time(), 0, []
    while not done():
        delay = started + slot / rate - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        outcome = await login(GOOD_SOURCE, BENCH_PASSWORD)
        if not outcome.ok:
            raise RuntimeError(f"a good login failed: {outcome.code} {outcome.message}")
        times.append(outcome.seconds * 1000)
        slot = max(slot + 1, int((loop.time() - started) * rate))
    return times


def summary(times: list[float]) -> str:
    ordered = sorted(times)
    return f"n={len(ordered):5d}  p50 {percentile(ordered, 50):6.2f} ms  p99 {percentile(ordered, 99):6.2f} ms"


def measure(engine: str, port: int, args: argparse.Namespace) -> int:
    ends = time.monotonic() + 0.5
    asyncio.run(good_logins(engine, port, args.good_rate, lambda: time.monotonic() >= ends))  # warm up
    ends = time.monotonic() + args.quiet
    before = asyncio.run(good_logins(engine, port, args.good_rate, lambda: time.monotonic() >= ends))
    receiver, sender = multiprocessing.Pipe(duplex=False)
    attacker = multiprocessing.Process(target=_attack_process,
                                       args=(engine, port, args.attempts, args.concurrency, sender))
    attacker.start()
    during = asyncio.run(good_logins(engine, port, args.good_rate, lambda: not attacker.is_alive()))
    codes, seconds = receiver.recv()
    attacker.join()
    throttled, failed = codes.get(THROTTLED[engine], 0), codes.get(FAILED[engine], 0)
    print(f"[{engine}] good logins from {GOOD_SOURCE}, before the burst: {summary(before)}")
    print(f"[{engine}] good logins from {GOOD_SOURCE}, during the burst: {summary(during)}")
    print(f"[{engine}] burst from {ATTACKER_SOURCE}: {args.attempts} wrong-password attempts ({args.concurrency} at "
          f"once) in {seconds:.2f} s: {throttled} throttled, {failed} failed the password check"
          + "".join(f", {count} {code}" for code, count in sorted(codes.items())
                    if code not in (THROTTLED[engine], FAILED[engine])))
    # (attempts in flight when the address was locked out are refused too, whatever their answer)
    return 0 if throttled == args.attempts - args.limit else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engine", choices=("postgresql", "mysql"), required=True)
    parser.add_argument("--attempts", type=int, default=1000, help="wrong-password attempts of the burst")
    parser.add_argument("--concurrency", type=int, default=50, help="attempts in flight at once")
    parser.add_argument("--good-rate", type=float, default=100.0, help="good logins started per second")
    parser.add_argument("--quiet", type=float, default=3.0, help="seconds of good logins before the burst")
    parser.add_argument("--limit", type=int, default=20, help="[auth] failed_login_limit")
    parser.add_argument("--lockout", type=float, default=60.0, help="[auth] failed_login_lockout, seconds")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="auth_throttle-") as folder:
        root = Path(folder)
        users = {BENCH_USER: BENCH_PASSWORD}
        server = (start_postgres(root / "pg", users=users, auth="scram-sha-256") if args.engine == "postgresql"
                  else start_mariadb(root / "mariadb", users=users))
        proxy = ProxyProcess(root / "proxy", server if args.engine == "postgresql" else None,  # type: ignore[arg-type]
                             server if args.engine == "mysql" else None, pool_size=5, workers=1)  # type: ignore[arg-type]
        proxy.extra_config = (f"[auth]\nfailed_login_limit = {args.limit}\nfailed_login_window = 60.0\n"
                              f"failed_login_lockout = {args.lockout}\n")
        try:
            proxy.start()
            print(f"load average at start: {' '.join(f'{v:.2f}' for v in os.getloadavg())} ({os.cpu_count()} "
                  "cores)")
            return measure(args.engine, proxy.ports[args.engine], args)
        finally:
            proxy.stop()
            server.stop()


if __name__ == "__main__":
    sys.exit(main())
