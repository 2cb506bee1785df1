"""Several worker processes sharing the listening ports (SO_REUSEPORT), and the supervisor that runs them."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import json
import logging
import os
import select
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

import uvloop

from proxy import channel
from proxy.api.context import ApiContext
from proxy.api.serve import ApiThread
from proxy.commands import Commands, Fanout, SwitchoverPlan, channel_fanout
from proxy.config import ApiSettings, Config, parse_config
from proxy.console_local import ConsoleLocal, install_console
from proxy.control import ControlThread, control_socket_path
from proxy.endpoint_edits import EndpointEdits
from proxy.endpoints import resolve_endpoints, with_ports
from proxy.errors import ConfigError
from proxy.local_commands import LocalCommands, SwitchedEndpoints
from proxy.metrics import serve_metrics
from proxy.reload import Reloads, keep_ports, prepare
from proxy.reload import apply as apply_config
from proxy.rundir import (
    pid_file_path,
    remove_pid_file,
    worker_channel,
    worker_config_path,
    worker_index,
    write_pid_file,
)
from proxy.server import ProxyServer
from proxy.session.mysql_service import MySQLService
from proxy.startup import StartupError, describe_start_error
from proxy.stats import Snapshot, WorkerSum

log = logging.getLogger(__name__)

READY_TIMEOUT = 60.0  # seconds the workers have to start listening
_READY = "ready"  # a worker's line on the pipe when it listens
_FAILED = "failed "  # a worker's line when it cannot start, followed by why
RELOAD_ANSWER_TIMEOUT = 30.0  # seconds each worker has to apply a reload the API asked for


def _free_reusable_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _fixed_ports(config: Config, running: dict[str, int] | None = None) -> Config:
    """Workers must all bind the same ports: turn port 0 into a concrete free port once (an endpoint already
    listening keeps its port)."""
    config = keep_ports(config, running or {})
    host = config.server.host
    ports = {endpoint.name: _free_reusable_port(host) for endpoint in resolve_endpoints(config)
             if endpoint.settings.port == 0}
    return with_ports(config, ports) if ports else config


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
        handlers = _channel_handlers(server)
        server.servers.append(await channel.serve(worker_channel(index), handlers))
        install_console(server)
    except Exception as exc:
        raise _WorkerStartFailed(describe_start_error(exc)) from exc
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    reloading = asyncio.Lock()  # a SIGHUP's reload and one the API asks for over the channel, one at a time

    async def reload_once() -> str | None:
        async with reloading:
            return await _reload_worker(server)

    async def reload_asked(_message: channel.Message) -> channel.Message:
        error = await reload_once()
        if error is not None:
            return {"error": "reload_refused", "message": f"worker {index}: {error}", "pid": os.getpid()}
        return {"pid": os.getpid(), "ports": dict(server.ports)}

    async def reload_signalled() -> None:
        await reload_once()

    handlers["reload"] = reload_asked
    reloads = Reloads(reload_signalled)
    loop.add_signal_handler(signal.SIGHUP, reloads.request)
    if _early_reloads:  # the supervisor asked before this worker could listen for it
        reloads.request()
    _tell_supervisor(ready_fd, _READY)
    await stop.wait()
    await server.stop()


def _channel_handlers(server: ProxyServer) -> dict[str, channel.Handler]:
    """What a worker answers on its internal channel: its stats for the supervisor; cancels and KILLs for its own
    clients asked on another worker (looked up when asked: a reload may add or remove endpoints); its part of the
    operator commands the supervisor fans out."""

    async def cancel(message: channel.Message) -> channel.Message:
        service = server.postgres
        return {} if service is None else await service.serve_cancel(message)

    async def kill(message: channel.Message) -> channel.Message:
        listener = server.listeners.get(str(message.get("endpoint", "")))
        service = listener.service if listener is not None else server.mysql
        if not isinstance(service, MySQLService):
            return {"error": "unknown", "message": "no such MySQL endpoint in this worker"}
        return await service.serve_kill(message)

    return {"cancel": cancel, "kill": kill, **LocalCommands(server).handlers(), **ConsoleLocal(server).handlers()}


def _worker_snapshot(folder: Path, index: int) -> tuple[int, Snapshot] | None:
    """Ask one worker for its pid and stats over its channel (None if it does not answer)."""
    try:
        answer = channel.ask_blocking(worker_channel(index, folder), {"kind": "stats"}, 2)
        return int(answer["pid"]), dict(answer["snapshot"])
    except (channel.ChannelError, KeyError, TypeError, ValueError) as exc:
        log.warning("metrics: worker %d did not answer: %s", index, exc)
        return None


async def _reload_worker(server: ProxyServer) -> str | None:
    """Serve the configuration the supervisor validated and wrote into the run folder (secrets re-read here);
    returns why not, if it could not."""
    path = worker_config_path()
    try:
        config = parse_config(json.loads(path.read_text()), str(path))
        await apply_config(server, config)
    except (OSError, ValueError, ConfigError) as exc:
        log.error("worker %d: reload refused, the running configuration stays: %s", worker_index(), exc)
        return f"reload refused: {exc}"
    return None


_early_reloads: list[int] = []  # SIGHUPs a worker got before its event loop listened for them


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
        signal.signal(signal.SIGHUP, lambda signum, _frame: _early_reloads.append(signum))
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


class _SupervisorReload:
    """SIGHUP in the supervisor: validate the file once, fix its ports, write it for the workers, signal them.

    Runs inside the signal handler (the supervisor's main loop only waits for workers); one at a time, and a
    SIGHUP during a reload or before the workers are ready makes one more reload when that is over."""

    def __init__(self, config_path: Path | None, config: Config, folder: Path, workers: dict[int, int]) -> None:
        self.config_path = config_path
        self.config = config
        self.worker_config = _for_workers(config)
        self.folder = folder
        self.workers = workers
        self.ready = False
        self.busy = False
        self.pending = False
        self.switched = SwitchedEndpoints()  # a reload keeps what switchovers moved until the file follows
        self.edits = EndpointEdits()  # and the control API's endpoint edits until the process restarts
        self._lock = threading.Lock()  # the signal handler (main thread) and the API (its thread)

    def ports(self) -> dict[str, int]:
        return {endpoint.name: endpoint.settings.port for endpoint in resolve_endpoints(self.config)}

    def request(self, _signum: int = signal.SIGHUP, _frame: object = None) -> None:
        if self.config_path is None:
            log.warning("reload: started without a configuration file; nothing to reload")
            return
        if self.busy or not self.ready or not self._lock.acquire(blocking=False):
            self.pending = True
            return
        self.busy = True
        try:
            self._pending_reloads(self.config_path)
        finally:
            self.busy = False
            self._lock.release()

    def _pending_reloads(self, path: Path) -> None:
        self.pending = True
        while self.pending:
            self.pending = False
            if self._reload(path, self.edits) is None:
                _stop_workers(self.workers, signal.SIGHUP)
                log.info("reload: passed to %d workers", len(self.workers))

    def for_api(self, edits: EndpointEdits | None) -> str | None:
        """The API's reload (in its thread): validate the file with `edits` over it (None: those kept) and write
        it for the workers, which the API then asks to reload; returns why not, if it does not validate. A SIGHUP
        that came meanwhile is served after it."""
        if self.config_path is None:
            return "started without a configuration file: nothing to reload"
        with self._lock:
            candidate = self.edits if edits is None else edits
            error = self._reload(self.config_path, candidate)
            if error is None:
                self.edits = candidate
            if self.pending:
                self._pending_reloads(self.config_path)
            return error

    def _reload(self, path: Path, edits: EndpointEdits) -> str | None:
        log.info("reload: reading %s%s", path, " with the API's endpoint edits" if edits else "")
        running = self.ports()
        try:
            config = _fixed_ports(self.switched.keep(prepare(path, self.config, running,
                                                             edits.apply if edits else None)), running)
        except ConfigError as exc:
            log.error("reload refused, the running configuration stays: %s", exc)
            return f"reload refused: {exc}"
        self.config = config
        self.worker_config = _for_workers(config)
        target = worker_config_path(self.folder)
        partial = target.with_name(target.name + ".new")
        partial.write_text(self.worker_config.model_dump_json(exclude_unset=True))
        partial.replace(target)
        return None


def fleet_ports(config: Config) -> dict[str, int]:
    """The fleet listener's port for the ready line (worker 0 listens on it), if there is a fleet."""
    return {"fleet": config.fleet.port} if config.fleet.enabled else {}


def _for_workers(config: Config) -> Config:
    """The workers' configuration: the supervisor serves the metrics and the API."""
    return config.model_copy(update={"server": config.server.model_copy(update={"metrics_port": -1}),
                                     "api": ApiSettings()})


def _commands(reload: _SupervisorReload, folder: Path, count: int) -> Commands:
    """The operator commands, fanned out to every worker's channel (made in the loop that runs them)."""

    def switched(config: Config, plan: SwitchoverPlan) -> None:
        reload.switched.record(plan.engine, plan.endpoints, plan.blue_name, plan.green_name)
        reload.config = config
        reload.worker_config = _for_workers(config)

    return Commands(lambda: reload.config, _fanout(folder, count), switched)


def _fanout(folder: Path, count: int) -> Fanout:
    return channel_fanout(lambda: [worker_channel(index, folder) for index in range(count)])


def _api_context(reload: _SupervisorReload, folder: Path, count: int, totals: WorkerSum) -> ApiContext:
    """What the API thread asks of the workers: over their channels, like the control socket's commands."""
    fanout = _fanout(folder, count)

    async def stats() -> Snapshot:
        answers = await fanout({"kind": "stats"}, 2.0)
        return totals.add({index: None if "error" in answer else (int(answer["pid"]), dict(answer["snapshot"]))
                           for index, answer in enumerate(answers)})

    async def reload_workers(edits: EndpointEdits | None) -> channel.Message:
        error = reload.for_api(edits)
        if error is not None:
            return {"error": "reload_refused", "message": error}
        answers = await fanout({"kind": "reload"}, RELOAD_ANSWER_TIMEOUT)
        failed = [str(answer.get("message", answer["error"])) for answer in answers if "error" in answer]
        if failed:
            return {"error": "failed", "message": "not every worker reloaded: " + "; ".join(failed)}
        log.info("reload: %d workers serve the new configuration", len(answers))
        return {"ok": True, "message": "reloaded", "ports": answers[0].get("ports", {}) if answers else {}}

    return ApiContext(lambda: reload.config, _commands(reload, folder, count), fanout, stats, reload_workers,
                      lambda: reload.edits, count)


def _start_control(pid_file: Path, reload: _SupervisorReload, folder: Path, count: int) -> ControlThread | None:
    """The control socket beside the pid file: operator commands, fanned out to every worker's channel."""

    def handlers() -> dict[str, channel.Handler]:
        return _commands(reload, folder, count).handlers()

    control = ControlThread(control_socket_path(pid_file), handlers)
    try:
        control.start()
    except OSError as exc:
        log.error("no control socket at %s: %s", control.socket.path, exc.strerror or exc)
        return None
    return control


def run_supervisor(config: Config, count: int, ready_message: str, config_path: Path | None = None) -> None:
    """Start `count` workers, print the ready line, restart workers that die, stop them all on SIGTERM/SIGINT.

    A worker that cannot start stops the others and raises StartupError; the run folder is removed in every case.
    """
    config = _fixed_ports(config)
    metrics_port = config.server.metrics_port
    workers: dict[int, int] = {}  # pid -> worker index
    stopping: list[bool] = []

    def stop(signum: int, _frame: object) -> None:
        stopping.append(True)
        _stop_workers(workers, signum)

    folder = Path(tempfile.mkdtemp(prefix="dbproxy-"))
    reload = _SupervisorReload(config_path, config, folder, workers)
    pid_file = pid_file_path(config_path, config.server.pid_file) if config_path is not None else None
    control: ControlThread | None = None
    api: ApiThread | None = None
    ready_read, ready_write = os.pipe()
    os.set_blocking(ready_write, False)  # restarted workers announce themselves to nobody: never block on that
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGHUP, reload.request)
    try:
        try:
            for number in range(count):
                workers[_start_worker(reload.worker_config, number, count, folder, ready_write)] = number
            _await_workers(workers, _ReadyLines(ready_read), count, stopping)
            if stopping:  # a signal while starting: pass it to the workers forked after it, too
                _stop_workers(workers)
            ports: dict[str, int] = {**reload.ports(), **fleet_ports(config)}
            totals = WorkerSum()
            if metrics_port >= 0 and not stopping:

                def merged() -> Snapshot:
                    return totals.add({index: _worker_snapshot(folder, index) for index in range(count)})

                try:
                    ports["metrics"] = serve_metrics(merged, config.server.host, metrics_port)
                except OSError as exc:
                    raise StartupError(f"metrics port {metrics_port}: {describe_start_error(exc)}") from None
            if (config.api.port >= 0 or config.api.health_port >= 0) and not stopping:
                api = ApiThread(config.api, lambda: _api_context(reload, folder, count, totals))
                try:
                    ports.update(api.start())
                except (OSError, ConfigError) as exc:
                    api = None
                    raise StartupError(f"[api]: {describe_start_error(exc)}") from None
        except BaseException as exc:
            if api is not None:
                api.stop()
            _stop_workers(workers)
            _reap_all(workers)
            if isinstance(exc, StartupError | OSError):
                raise StartupError(describe_start_error(exc)) from None
            raise
        if not stopping:
            if pid_file is not None:
                control = _start_control(pid_file, reload, folder, count)
                write_pid_file(pid_file)
            listeners = " ".join(f"{name} port {port}" for name, port in ports.items())
            print(ready_message.format(listeners=listeners, **ports), flush=True)
            log.info("%d workers serving", count)
        reload.ready = True
        if reload.pending:
            reload.request()
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
            workers[_start_worker(reload.worker_config, index, count, folder, ready_write, restart=True)] = index
    finally:
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        if api is not None:
            api.stop()
        if control is not None:
            control.stop()
        if pid_file is not None:
            remove_pid_file(pid_file)
        os.close(ready_read)
        os.close(ready_write)
        shutil.rmtree(folder, ignore_errors=True)
        sys.stdout.flush()
