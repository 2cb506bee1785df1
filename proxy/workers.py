"""Several worker processes sharing the listening ports (SO_REUSEPORT), and the supervisor that runs them."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import json
import logging
import os
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import cast

import uvloop

from proxy.config import Config
from proxy.metrics import merge, read_worker_snapshot, serve_metrics, snapshot
from proxy.rundir import worker_socket
from proxy.server import ProxyServer

log = logging.getLogger(__name__)


def _free_reusable_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _fixed_ports(config: Config) -> Config:
    """Workers must all bind the same ports: turn port 0 into a concrete free port once."""
    host = config.server.host
    update = {}
    for section in ("postgresql", "mysql"):
        settings = getattr(config, section, None)
        if settings is not None and settings.enabled and settings.port == 0:
            update[section] = settings.model_copy(update={"port": _free_reusable_port(host)})
    return config.model_copy(update=update) if update else config


class _SnapshotServer(asyncio.Protocol):
    """Answers every connection on the stats socket with this worker's snapshot as JSON, then closes."""

    def __init__(self, server: ProxyServer) -> None:
        self.server = server

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        cast(asyncio.WriteTransport, transport).write(json.dumps(snapshot(self.server)).encode())
        transport.close()


async def _serve_worker(config: Config, index: int, ready_fd: int) -> None:
    server = ProxyServer(config)
    await server.start(reuse_port=True)
    loop = asyncio.get_running_loop()
    # Keep references: a listening server that is garbage-collected stops listening.
    server.servers.append(
        await loop.create_unix_server(lambda: _SnapshotServer(server), str(worker_socket("stats", index))))
    if server.postgres.make_client is not None:  # CancelRequests passed on by the other workers
        server.servers.append(
            await loop.create_unix_server(server.postgres.make_client, str(worker_socket("cancel", index))))
    if config.mysql.enabled:  # KILLs for this worker's clients asked on another worker
        server.servers.append(
            await asyncio.start_unix_server(server.mysql.serve_forwarded_kill, str(worker_socket("kill", index))))
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    os.write(ready_fd, b"R")
    await stop.wait()
    await server.stop()


def _die_with_parent() -> None:
    """Linux: a worker gets SIGTERM when the supervisor dies, so no worker outlives it holding the ports."""
    supervisor = os.getppid()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PDEATHSIG
    if os.getppid() != supervisor:  # it died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


def _start_worker(config: Config, index: int, count: int, folder: Path, ready_fd: int) -> int:
    pid = os.fork()
    if pid:
        return pid
    status = 0
    try:
        _die_with_parent()
        os.environ.update(DBPROXY_WORKER=str(index), DBPROXY_WORKERS=str(count), DBPROXY_RUNDIR=str(folder))
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        uvloop.run(_serve_worker(config, index, ready_fd))
    except BaseException:
        log.exception("worker %d failed", index)
        status = 1
    finally:
        os._exit(status)


def run_supervisor(config: Config, count: int, ready_message: str) -> None:
    """Start `count` workers, print the ready line, restart workers that die, stop them all on SIGTERM/SIGINT."""
    config = _fixed_ports(config)
    metrics_port = config.server.metrics_port
    worker_config = config.model_copy(update={"server": config.server.model_copy(update={"metrics_port": -1})})
    folder = Path(tempfile.mkdtemp(prefix="dbproxy-"))
    ready_read, ready_write = os.pipe()
    workers = {_start_worker(worker_config, index, count, folder, ready_write): index for index in range(count)}
    deadline = time.monotonic() + 60
    ready = 0
    while ready < count and time.monotonic() < deadline:
        ready += len(os.read(ready_read, count - ready))
    ports = {}
    if config.postgresql.enabled:
        ports["postgresql"] = config.postgresql.port
    mysql = getattr(config, "mysql", None)
    if mysql is not None and mysql.enabled:
        ports["mysql"] = mysql.port
    if metrics_port >= 0:
        sockets = [folder / f"stats-{index}.sock" for index in range(count)]

        def merged() -> dict[str, object]:
            return merge([part for path in sockets if (part := read_worker_snapshot(path)) is not None])

        ports["metrics"] = serve_metrics(merged, config.server.host, metrics_port)
    listeners = " ".join(f"{name} port {port}" for name, port in ports.items())
    print(ready_message.format(listeners=listeners, **ports), flush=True)
    log.info("%d workers serving", count)
    stopping = False

    def stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for pid in workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    while workers:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        index = workers.pop(pid, None)
        if index is None or stopping:
            continue
        log.error("worker %d exited (status %d); starting it again", index, status)
        time.sleep(0.5)
        workers[_start_worker(worker_config, index, count, folder, ready_write)] = index
    for path in folder.iterdir():
        path.unlink()
    folder.rmdir()
    sys.stdout.flush()
