"""Several worker processes sharing the listening ports (SO_REUSEPORT), and the supervisor that runs them."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import logging
import os
import select
import shutil
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path

import uvloop

from proxy import channel
from proxy.config import Config
from proxy.errors import ConfigError
from proxy.metrics import serve_metrics
from proxy.rundir import worker_channel
from proxy.server import ProxyServer
from proxy.startup import StartupError, describe_start_error
from proxy.stats import Snapshot, WorkerSum

log = logging.getLogger(__name__)

READY_TIMEOUT = 60.0  # seconds the workers have to start listening
_READY = "ready"  # a worker's line on the pipe when it listens
_FAILED = "failed "  # a worker's line when it cannot start, followed by why


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


class _WorkerStartFailed(Exception):
    """A worker could not start serving; the message is the one line the supervisor shows."""


def _tell_supervisor(ready_fd: int, line: str) -> None:
    """One line on the shared pipe (a single write below PIPE_BUF, so lines of several workers never mix)."""
    data = line.replace("\n", " ").encode(errors="replace")[: select.PIPE_BUF - 1] + b"\n"
    with contextlib.suppress(BlockingIOError):  # nobody reads it any more: the supervisor is past starting
        os.write(ready_fd, data)


async def _serve_worker(config: Config, index: int, ready_fd: int) -> None:
    loop = asyncio.get_running_loop()
    try:
        server = ProxyServer(config)
        await server.start(reuse_port=True)
        # Keep references: a listening server that is garbage-collected stops listening.
        server.servers.append(await channel.serve(worker_channel(index), _channel_handlers(server)))
    except Exception as exc:
        raise _WorkerStartFailed(describe_start_error(exc)) from exc
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    _tell_supervisor(ready_fd, _READY)
    await stop.wait()
    await server.stop()


def _channel_handlers(server: ProxyServer) -> dict[str, channel.Handler]:
    """What a worker answers on its internal channel: its stats for the supervisor; cancels and KILLs for its own
    clients asked on another worker."""

    async def stats(_message: channel.Message) -> channel.Message:
        return {"pid": os.getpid(), "snapshot": server.stats.snapshot()}

    handlers: dict[str, channel.Handler] = {"stats": stats}
    if server.config.postgresql.enabled:
        handlers["cancel"] = server.postgres.serve_cancel
    if server.config.mysql.enabled:
        handlers["kill"] = server.mysql.serve_kill
    return handlers


def _worker_snapshot(folder: Path, index: int) -> tuple[int, Snapshot] | None:
    """Ask one worker for its pid and stats over its channel (None if it does not answer)."""
    try:
        answer = channel.ask_blocking(worker_channel(index, folder), {"kind": "stats"}, 2)
        return int(answer["pid"]), dict(answer["snapshot"])
    except (channel.ChannelError, KeyError, TypeError, ValueError) as exc:
        log.warning("metrics: worker %d did not answer: %s", index, exc)
        return None


def _die_with_parent() -> None:
    """Linux: a worker gets SIGTERM when the supervisor dies, so no worker outlives it holding the ports."""
    supervisor = os.getppid()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PDEATHSIG
    if os.getppid() != supervisor:  # it died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


def _start_worker(config: Config, index: int, count: int, folder: Path, ready_fd: int, restart: bool = False) -> int:
    """Fork worker `index`. At first start it reports success or its start error on `ready_fd`; restarted, it logs."""
    pid = os.fork()
    if pid:
        return pid
    status = 0
    try:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        _die_with_parent()
        os.environ.update(DBPROXY_WORKER=str(index), DBPROXY_WORKERS=str(count), DBPROXY_RUNDIR=str(folder))
        uvloop.run(_serve_worker(config, index, ready_fd))
    except _WorkerStartFailed as exc:
        status = 1
        cause = exc.__cause__
        if not isinstance(cause, ConfigError | OSError):  # not a setting or the system: a bug, keep its traceback
            log.error("worker %d failed to start", index, exc_info=cause)
        if restart:
            log.error("worker %d cannot start again: %s", index, exc)
        else:
            _tell_supervisor(ready_fd, f"{_FAILED}worker {index}: {exc}")
    except BaseException:
        log.exception("worker %d failed", index)
        status = 1
    finally:
        os._exit(status)


def _stop_workers(workers: dict[int, int], signum: int = signal.SIGTERM) -> None:
    for pid in workers:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)


def _reap_all(workers: dict[int, int]) -> None:
    """Wait for every worker to exit."""
    while workers:
        try:
            pid, _ = os.wait()
        except ChildProcessError:
            break
        workers.pop(pid, None)


def _exit_description(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"killed by signal {os.WTERMSIG(status)}"
    return f"exit status {os.waitstatus_to_exitcode(status)}"


class _ReadyLines:
    """Reads the workers' one-line reports from the pipe: how many are ready, and the first failure."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.ready = 0
        self.failure: str | None = None
        self._partial = b""

    def read(self, timeout: float) -> None:
        readable, _, _ = select.select([self.fd], [], [], max(0.0, timeout))
        if not readable:
            return
        *lines, self._partial = (self._partial + os.read(self.fd, 65536)).split(b"\n")
        for line in lines:
            text = line.decode(errors="replace")
            if text == _READY:
                self.ready += 1
            elif text.startswith(_FAILED) and self.failure is None:
                self.failure = text[len(_FAILED):]


def _await_workers(workers: dict[int, int], lines: _ReadyLines, count: int, stopping: list[bool]) -> None:
    """Return once all `count` workers are ready; StartupError at the first that fails, dies or is too slow."""
    deadline = time.monotonic() + READY_TIMEOUT
    while lines.ready < count and not stopping:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise StartupError(f"the workers were not ready within {READY_TIMEOUT:.0f} seconds")
        lines.read(min(remaining, 0.2))
        if lines.failure is not None:
            raise StartupError(lines.failure)
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            pid, status = 0, 0
        if pid:
            index = workers.pop(pid, None)
            lines.read(0)  # its report, if it wrote one before exiting
            raise StartupError(lines.failure or f"worker {index} exited while starting ({_exit_description(status)})")


def run_supervisor(config: Config, count: int, ready_message: str) -> None:
    """Start `count` workers, print the ready line, restart workers that die, stop them all on SIGTERM/SIGINT.

    A worker that cannot start stops the others and raises StartupError; the run folder is removed in every case.
    """
    config = _fixed_ports(config)
    metrics_port = config.server.metrics_port
    worker_config = config.model_copy(update={"server": config.server.model_copy(update={"metrics_port": -1})})
    workers: dict[int, int] = {}  # pid -> worker index
    stopping: list[bool] = []

    def stop(signum: int, _frame: object) -> None:
        stopping.append(True)
        _stop_workers(workers, signum)

    folder = Path(tempfile.mkdtemp(prefix="dbproxy-"))
    ready_read, ready_write = os.pipe()
    os.set_blocking(ready_write, False)  # restarted workers announce themselves to nobody: never block on that
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        try:
            for number in range(count):
                workers[_start_worker(worker_config, number, count, folder, ready_write)] = number
            _await_workers(workers, _ReadyLines(ready_read), count, stopping)
            if stopping:  # a signal while starting: pass it to the workers forked after it, too
                _stop_workers(workers)
            ports = {}
            if config.postgresql.enabled:
                ports["postgresql"] = config.postgresql.port
            mysql = getattr(config, "mysql", None)
            if mysql is not None and mysql.enabled:
                ports["mysql"] = mysql.port
            if metrics_port >= 0 and not stopping:
                totals = WorkerSum()

                def merged() -> Snapshot:
                    return totals.add({index: _worker_snapshot(folder, index) for index in range(count)})

                try:
                    ports["metrics"] = serve_metrics(merged, config.server.host, metrics_port)
                except OSError as exc:
                    raise StartupError(f"metrics port {metrics_port}: {describe_start_error(exc)}") from None
        except BaseException as exc:
            _stop_workers(workers)
            _reap_all(workers)
            if isinstance(exc, StartupError | OSError):
                raise StartupError(describe_start_error(exc)) from None
            raise
        if not stopping:
            listeners = " ".join(f"{name} port {port}" for name, port in ports.items())
            print(ready_message.format(listeners=listeners, **ports), flush=True)
            log.info("%d workers serving", count)
        while workers:
            try:
                pid, status = os.wait()
            except ChildProcessError:
                break
            index = workers.pop(pid, None)
            if index is None or stopping:
                continue
            log.error("worker %d exited (%s); starting it again", index, _exit_description(status))
            time.sleep(0.5)
            workers[_start_worker(worker_config, index, count, folder, ready_write, restart=True)] = index
    finally:
        os.close(ready_read)
        os.close(ready_write)
        shutil.rmtree(folder, ignore_errors=True)
        sys.stdout.flush()
