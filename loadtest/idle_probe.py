"""Memory probe: hold N idle, authenticated client connections to the proxy and report its RSS per connection.

Usage::

    python -m loadtest.idle_probe --counts 1000,10000,50000 [--pool-size 20] [--workers 1] [--tls]

It starts its own throwaway PostgreSQL and proxy (a fresh proxy process for every count), logs N clients in
with the real PostgreSQL startup and SCRAM-SHA-256 exchange (the project's own message builders and
``proxy.auth.scram.ScramClient``), keeps them idle, and reports ``(RSS after - RSS before) / N``. The clients
are spread over several processes (each is bound by its own open-file limit) and over source addresses
127.0.0.2, 127.0.0.3, ... (each source address has its own ephemeral port range). The proxy runs as one
process (``[server] workers = 1``, where the proxy has that setting) unless ``--workers`` says otherwise: the
target is about what one process holds. ``bench`` calls :func:`probe` for its idle-connection row.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import resource
import socket
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass

import psutil

from loadtest.machine import raise_open_files_limit
from loadtest.monitor import rss_bytes
from loadtest.targets import (
    BENCH_PASSWORD,
    BENCH_USER,
    POSTGRESQL,
    REPO_ROOT,
    ProxyProcess,
    Stack,
    TargetError,
    temporary_workdir,
)
from proxy.auth.md5 import md5_response
from proxy.auth.scram import MECHANISM, ScramClient
from proxy.protocol.pg import messages as pg

#: Client connections per worker process (each needs an open file; limits are per process).
PER_WORKER_CEILING = 15_000
#: Logins in flight per worker process.
LOGIN_CONCURRENCY = 200
LOGIN_TIMEOUT = 60.0
SETTLE_SECONDS = 1.0
#: Open files the proxy needs beyond one per client (listener, backends, logs, Python itself).
PROXY_FD_MARGIN = 200


IP_BIND_ADDRESS_NO_PORT: int = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)  # Linux <netinet/in.h>


class LoginError(Exception):
    """The server refused or broke a login."""


async def _read_message(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    header = await reader.readexactly(pg.HEADER.size)
    kind, length = pg.HEADER.unpack(header)
    body = await reader.readexactly(length - 4)
    return kind[0], body


async def _connect(host: str, port: int, source: str | None) -> socket.socket:
    """A connected non-blocking socket, from ``source`` if given.

    IP_BIND_ADDRESS_NO_PORT lets the kernel pick the source port at connect time (unique per 4-tuple)
    instead of at bind time, where each bind searches the bound ports and slows down as thousands are held.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        if source:
            sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
            sock.bind((source, 0))
        await asyncio.get_running_loop().sock_connect(sock, (host, port))
    except BaseException:
        sock.close()
        raise
    return sock


def client_tls() -> ssl.SSLContext:
    """TLS for the probe's clients: encrypted, the proxy's certificate not checked (it may be self-signed)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


async def _open(host: str, port: int, source: str | None,
                tls: ssl.SSLContext | None) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection to the proxy; with `tls`, SSLRequest first and then the TLS handshake."""
    sock = await _connect(host, port, source)
    if tls is None:
        return await asyncio.open_connection(sock=sock)
    loop = asyncio.get_running_loop()
    try:
        await loop.sock_sendall(sock, pg.ssl_request())
        if await loop.sock_recv(sock, 1) != b"S":
            raise LoginError("the server does not offer TLS")
        return await asyncio.open_connection(sock=sock, ssl=tls, server_hostname="")
    except BaseException:
        sock.close()
        raise


async def login(host: str, port: int, user: str, password: str, database: str,
                source: str | None = None, tls: ssl.SSLContext | None = None
                ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Open a connection (over TLS with `tls`) and log in (SCRAM-SHA-256, md5 or cleartext, the password or a
    token); return it at ReadyForQuery."""
    reader, writer = await _open(host, port, source, tls)
    try:
        writer.write(pg.startup_message({"user": user, "database": database, "application_name": "idle_probe"}))
        scram: ScramClient | None = None
        while True:
            kind, body = await _read_message(reader)
            if kind == ord("E"):
                fields = pg.parse_error_fields(body)
                raise LoginError(f"{fields.get('S', 'ERROR')} {fields.get('C', '')}: {fields.get('M', '')}")
            if kind == ord("Z"):
                return reader, writer
            if kind != ord("R"):
                continue  # ParameterStatus, BackendKeyData, NoticeResponse
            (code,) = pg.INT32.unpack_from(body)
            payload = body[4:]
            if code == pg.AUTH_OK:
                continue
            if code == pg.AUTH_SASL:
                scram = ScramClient(password.encode())
                writer.write(pg.sasl_initial_response(MECHANISM, scram.client_first()))
            elif code == pg.AUTH_SASL_CONTINUE and scram is not None:
                writer.write(pg.password_message(scram.client_final(payload)))
            elif code == pg.AUTH_SASL_FINAL and scram is not None:
                scram.verify_server_final(payload)
            elif code == pg.AUTH_MD5:
                writer.write(pg.password_message(pg.cstring(md5_response(user.encode(), password.encode(), payload))))
            elif code == pg.AUTH_CLEARTEXT:
                writer.write(pg.password_message(pg.cstring(password)))
            else:
                raise LoginError(f"unsupported authentication request {code}")
    except BaseException:
        writer.close()
        raise


async def _hold(host: str, port: int, count: int, source: str | None, tls: bool = False) -> None:
    """Worker body: log ``count`` clients in (over TLS with `tls`), report on stdout, hold them until stdin
    closes."""
    context = client_tls() if tls else None
    gate = asyncio.Semaphore(LOGIN_CONCURRENCY)
    held: list[asyncio.StreamWriter] = []
    errors: list[str] = []

    async def one() -> None:
        async with gate:
            try:
                _, writer = await asyncio.wait_for(
                    login(host, port, BENCH_USER, BENCH_PASSWORD, BENCH_USER, source, context), LOGIN_TIMEOUT)
            except (OSError, LoginError, asyncio.IncompleteReadError, TimeoutError, ValueError) as exc:
                errors.append(f"{type(exc).__name__}: {exc}")
                return
            held.append(writer)

    started = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(count)))
    elapsed = time.perf_counter() - started
    first = errors[0].replace("\n", " ") if errors else ""
    print(f"ready {len(held)} {len(errors)} {elapsed:.3f} {first}", flush=True)
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.read)  # until the parent closes our stdin
    for writer in held:
        writer.close()


@dataclass
class ProbeResult:
    """The proxy's memory with ``count`` idle clients logged in."""

    count: int
    connected: int
    rss_before: int
    rss_after: int
    login_seconds: float
    error: str = ""
    processes: int = 1  # proxy processes measured (a supervisor and its workers, or 1)
    tls: bool = False  # the clients logged in over TLS
    idle_cpu: float = 0.0  # the proxy's CPU share (1.0: one core) while the clients sat idle

    @property
    def per_connection(self) -> float:
        return (self.rss_after - self.rss_before) / self.connected if self.connected else 0.0


def _client_processes_for(count: int) -> int:
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    per_worker = max(1, min(PER_WORKER_CEILING, soft - 100))
    return max(1, math.ceil(count / per_worker))


def _wait_quiet(process: psutil.Process, seconds: float) -> None:
    """Let the proxy finish what the logins left (tasks, buffers) before reading its RSS."""
    deadline = time.monotonic() + 10.0
    time.sleep(seconds)
    with contextlib.suppress(psutil.Error):
        while time.monotonic() < deadline and process.cpu_percent(interval=0.2) > 5.0:
            pass


IDLE_WINDOW = 5.0  # seconds over which the proxy's CPU with idle clients is measured


def _idle_cpu(process: psutil.Process) -> float:
    """The share of a core the proxy used over IDLE_WINDOW seconds with every client idle."""
    with contextlib.suppress(psutil.Error):
        before = process.cpu_times()
        time.sleep(IDLE_WINDOW)
        after = process.cpu_times()
        return ((after.user - before.user) + (after.system - before.system)) / IDLE_WINDOW
    return 0.0


def probe(proxy: ProxyProcess, count: int, workers: int | None = 1, tls: bool = False) -> ProbeResult:
    """Hold ``count`` idle logged-in clients on a freshly started proxy; measure its RSS before and after.

    The proxy runs with ``workers`` worker processes (default 1: the target is about one process). RSS is the
    whole process tree's (a supervisor and its workers when there are several).
    """
    previous, proxy.workers = proxy.workers, workers
    try:
        proxy.restart()
    except TargetError as exc:
        return ProbeResult(count, 0, 0, 0, 0.0, error=f"the proxy did not restart: {str(exc)[:500]}")
    finally:
        proxy.workers = previous
    if POSTGRESQL not in proxy.ports:
        return ProbeResult(count, 0, 0, 0, 0.0, error="the proxy has no PostgreSQL listener in this run")
    port = proxy.ports[POSTGRESQL]
    process = psutil.Process(proxy.pid)
    processes = proxy.process_count()
    limit = process.rlimit(psutil.RLIMIT_NOFILE)[0]
    if count + PROXY_FD_MARGIN > limit:
        return ProbeResult(count, 0, 0, 0, 0.0, error=(
            f"needs about {count + PROXY_FD_MARGIN} open files in the proxy process, but its RLIMIT_NOFILE is "
            f"{limit} (raised to the hard limit; raising that needs CAP_SYS_RESOURCE)"))

    async def warm_up() -> None:  # the first login also opens the pool's first backend connection
        _, writer = await login("127.0.0.1", port, BENCH_USER, BENCH_PASSWORD, BENCH_USER)
        writer.close()

    asyncio.run(warm_up())
    _wait_quiet(process, SETTLE_SECONDS)
    before = rss_bytes(process)
    clients: list[subprocess.Popen[str]] = []
    n_processes = _client_processes_for(count)
    shares = [count // n_processes + (1 if i < count % n_processes else 0) for i in range(n_processes)]
    connected, failed, slowest, first_error = 0, 0, 0.0, ""
    try:
        for index, share in enumerate(shares):
            source = f"127.0.0.{2 + index}"
            clients.append(subprocess.Popen(
                [sys.executable, "-m", "loadtest.idle_probe", "--worker", str(port), str(share), source,
                 *(["--tls"] if tls else [])],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO_ROOT,
            ))
        for worker, share in zip(clients, shares, strict=True):
            assert worker.stdout is not None
            line = worker.stdout.readline().split(" ", 4)
            if len(line) < 4 or line[0] != "ready":
                failed += share
                first_error = first_error or f"a client process ended early (exit code {worker.poll()})"
                continue
            connected += int(line[1])
            failed += int(line[2])
            slowest = max(slowest, float(line[3]))
            if len(line) > 4 and line[4].strip() and not first_error:
                first_error = line[4].strip()
        _wait_quiet(process, SETTLE_SECONDS)
        after = rss_bytes(process) if proxy.alive() else before
        idle_cpu = _idle_cpu(process) if proxy.alive() else 0.0
    finally:
        for worker in clients:
            with contextlib.suppress(OSError):
                if worker.stdin is not None:
                    worker.stdin.close()
        for worker in clients:
            try:
                worker.wait(60)
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait()
    error = ""
    if failed or connected < count:
        error = f"{connected} of {count} clients logged in; first error: {first_error or 'none reported'}"
    if not proxy.alive():
        error = f"the proxy process died during the probe; {error}"
    return ProbeResult(count, connected, before, after, slowest, error, processes, tls, idle_cpu)


def format_result(result: ProbeResult) -> str:
    if result.error and not result.connected:
        return f"{result.count:>7} idle clients: failed: {result.error}"
    text = (f"{result.count:>7} idle clients: RSS {result.rss_before / 2**20:.1f} MiB -> "
            f"{result.rss_after / 2**20:.1f} MiB, {result.per_connection / 1024:.2f} KiB per connection, "
            f"logins took {result.login_seconds:.1f} s, {result.processes} proxy process(es)"
            f"{', TLS' if result.tls else ''}; idle, the proxy used {result.idle_cpu:.1%} of a core")
    return text + (f" (failed: {result.error})" if result.error else "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.idle_probe", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--counts", default="1000,10000", help="comma-separated numbers of idle clients")
    parser.add_argument("--pool-size", type=int, default=20, help="proxy backend pool size")
    parser.add_argument("--workers", type=int, default=1,
                        help="proxy worker processes, if the proxy has that setting (default 1: one process; "
                             "0: the proxy's default, one per core)")
    parser.add_argument("--tls", action="store_true", help="the clients log in over TLS (the proxy's default "
                        "self-signed certificate)")
    parser.add_argument("--worker", nargs=3, metavar=("PORT", "COUNT", "SOURCE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    raise_open_files_limit()
    if args.worker:
        port, count, source = int(args.worker[0]), int(args.worker[1]), args.worker[2]
        try:
            import uvloop

            uvloop.run(_hold("127.0.0.1", port, count, source, args.tls))
        except ImportError:
            asyncio.run(_hold("127.0.0.1", port, count, source, args.tls))
        return 0
    counts = [int(c) for c in args.counts.split(",") if c.strip()]
    status = 0
    with temporary_workdir() as workdir, Stack(workdir, pool_size=args.pool_size, with_mariadb=False,
                                               with_pgbouncer=False) as stack:
        assert stack.proxy is not None
        for count in counts:
            result = probe(stack.proxy, count, args.workers or None, args.tls)
            print(format_result(result), flush=True)
            status = status or (1 if result.error else 0)
    return status


if __name__ == "__main__":
    raise SystemExit(main())
