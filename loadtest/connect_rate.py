"""Connects per second one proxy process sustains, and its CPU per login: SCRAM-SHA-256 in plaintext, SCRAM over
TLS, and a signed token over TLS, measured one after the other in one run.

    python -m loadtest.connect_rate [--logins 3000] [--concurrency 64] [--clients 2]

Starts a throwaway PostgreSQL and a one-worker proxy (restarted per mode with that mode's settings). Each login is
a new TCP connection, the full startup and authentication up to ReadyForQuery, then Terminate; the clients run in
--clients processes of their own (the machine's cores are shared with the proxy, so the wall-clock rate is what
this machine did, while the proxy's CPU seconds per login say what a core of the proxy can do).
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import time
from dataclasses import dataclass

import psutil

from loadtest.idle_probe import LoginError, client_tls, login
from loadtest.machine import raise_open_files_limit
from loadtest.targets import BENCH_PASSWORD, BENCH_USER, POSTGRESQL, REPO_ROOT, Stack, temporary_workdir

MODES = ("scram", "scram-tls", "token-tls")
TERMINATE = b"X\x00\x00\x00\x04"


async def _logins(port: int, count: int, concurrency: int, secret: str, tls: bool) -> tuple[int, int]:
    """Client process body: `count` logins, `concurrency` at a time; (done, failed)."""
    context = client_tls() if tls else None
    gate = asyncio.Semaphore(concurrency)
    done = failed = 0

    async def one() -> None:
        nonlocal done, failed
        async with gate:
            try:
                _, writer = await login("127.0.0.1", port, BENCH_USER, secret, BENCH_USER, tls=context)
            except (OSError, LoginError, asyncio.IncompleteReadError, ValueError):
                failed += 1
                return
            writer.write(TERMINATE)
            writer.close()
            done += 1

    await asyncio.gather(*(one() for _ in range(count)))
    return done, failed


@dataclass
class Rate:
    mode: str
    logins: int
    failed: int
    seconds: float  # the slowest client process's time, from its first login to its last
    proxy_cpu: float  # user + system seconds of the proxy process

    def line(self) -> str:
        per_login = self.proxy_cpu / self.logins * 1e3 if self.logins else 0.0
        per_core = self.logins / self.proxy_cpu if self.proxy_cpu else 0.0
        return (f"{self.mode:>10}: {self.logins} logins ({self.failed} failed) in {self.seconds:.1f} s = "
                f"{self.logins / self.seconds:,.0f}/s; proxy CPU {self.proxy_cpu:.2f} s = {per_login:.2f} ms per "
                f"login, {per_core:,.0f} logins/s per proxy core")


def _configure(stack: Stack, mode: str, keys: str) -> None:
    """The proxy's settings for `mode`: SCRAM (TLS allowed, the default), or tokens required over TLS."""
    proxy = stack.proxy
    assert proxy is not None
    proxy.extra_config = ""
    if mode == "token-tls":
        proxy.extra_config = f'[tokens]\nkeys_dir = "{keys}"\n'
    base = type(proxy).config_text

    def config_text() -> str:
        text = base(proxy)
        if mode == "token-tls":
            text = text.replace('auth_method = "scram-sha-256"',
                                'auth_method = "scram-sha-256"\ntoken_auth = "required"', 1)
        return text

    proxy.config_text = config_text  # type: ignore[method-assign]
    proxy.workers = 1
    proxy.restart()


def _measure(stack: Stack, mode: str, secret: str, logins: int, concurrency: int, clients: int) -> Rate:
    proxy = stack.proxy
    assert proxy is not None
    port = proxy.ports[POSTGRESQL]
    process = psutil.Process(proxy.pid)
    tls = mode != "scram"
    asyncio.run(_logins(port, 20, 4, secret, tls))  # warm up: the pool's first backend, the key caches
    time.sleep(0.5)
    cpu = process.cpu_times()
    workers = [subprocess.Popen([sys.executable, "-m", "loadtest.connect_rate", "--worker", str(port),
                                 str(logins // clients), str(max(1, concurrency // clients)), "1" if tls else "0"],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO_ROOT)
               for _ in range(clients)]
    done = failed = 0
    seconds = 0.0
    for worker in workers:
        out, _ = worker.communicate(secret, timeout=600)
        got, lost, took = out.split()
        done, failed, seconds = done + int(got), failed + int(lost), max(seconds, float(took))
    after = process.cpu_times()
    used = (after.user - cpu.user) + (after.system - cpu.system)
    return Rate(mode, done, failed, seconds, used)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.connect_rate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--logins", type=int, default=3000, help="logins per mode")
    parser.add_argument("--concurrency", type=int, default=64, help="logins in flight, over all client processes")
    parser.add_argument("--clients", type=int, default=2, help="client processes")
    parser.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    raise_open_files_limit()
    if args.worker:
        port, count, concurrency, tls = (int(part) for part in args.worker)
        secret = sys.stdin.read()
        import uvloop

        started = time.perf_counter()
        done, failed = uvloop.run(_logins(port, count, concurrency, secret, bool(tls)))
        print(done, failed, time.perf_counter() - started)
        return 0
    with temporary_workdir() as workdir, Stack(workdir, pool_size=20, with_mariadb=False,
                                               with_pgbouncer=False) as stack:
        keys = str(workdir / "keys")
        subprocess.run([sys.executable, "-m", "proxy", "keys", "init", "--dir", keys], check=True, cwd=REPO_ROOT,
                       capture_output=True)
        token = subprocess.run([sys.executable, "-m", "proxy", "token", "generate", "--user", BENCH_USER,
                                "--endpoint", POSTGRESQL, "--keys", keys, "--ttl", "15m"], check=True,
                               cwd=REPO_ROOT, capture_output=True, text=True).stdout.strip()
        for mode in MODES:
            _configure(stack, mode, keys)
            rate = _measure(stack, mode, token if mode == "token-tls" else BENCH_PASSWORD, args.logins,
                            args.concurrency, args.clients)
            print(rate.line(), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
