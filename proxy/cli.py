"""Command line: `dbproxy run` serves a config file; `dbproxy demo` starts a throwaway database and serves it;
`dbproxy failover` promotes an instance of a cluster; `reload`, `pause`, `resume`, `reconnect`, `kill`, `instance
readmit` and `switchover` act on the running proxy."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shutil
import signal
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, NoReturn

import uvloop

from proxy.api.context import ApiContext
from proxy.api.serve import ApiServer
from proxy.channel import ChannelError
from proxy.commands import DEFAULT_SWITCHOVER_TIMEOUT, Commands, local_fanout
from proxy.config import Config, load_config
from proxy.console_local import install_console
from proxy.control import ControlSocket, ask_control, control_socket_path
from proxy.errors import ConfigError
from proxy.failover import AlreadyWriter, FailoverRefused, OtherWriter, PromotionError, promote_instance
from proxy.local_commands import LocalCommands, SwitchedEndpoints
from proxy.logs import setup_logging
from proxy.params_commands import format_diff
from proxy.reload import ProcessReload, Reloads
from proxy.rundir import looks_like_dbproxy, pid_file_path, read_pid_file, remove_pid_file, write_pid_file
from proxy.secret_commands import add_secret_commands, run_secret_command
from proxy.secrets import SecretStore
from proxy.server import ProxyServer
from proxy.startup import StartupError, check_host, check_startup, describe_start_error
from proxy.stats import Snapshot
from proxy.token_commands import add_token_commands, run_token_command
from proxy.top_sql import ORDERS, format_top

log = logging.getLogger("proxy")
READY_MESSAGE = "dbproxy ready: {listeners}"
CONFIG_ERROR_STATUS = 2  # exit status for a configuration that cannot work
START_ERROR_STATUS = 1  # exit status for a start that failed (a port taken, a worker that died)
# `dbproxy failover`: 1 the instance is unreachable or its promotion failed, 2 (CONFIG_ERROR_STATUS) no such
# instance or no monitor_user password, 3 the instance is the writer already, 4 (MariaDB) another instance still
# writes: the proxies could not tell which writer to follow.
FAILOVER_FAILED_STATUS = 1
ALREADY_WRITER_STATUS = 3
OTHER_WRITER_STATUS = 4


async def serve(config: Config, ready_message: str | None = None, config_path: Path | None = None) -> None:
    """Run the proxy until SIGINT/SIGTERM; SIGHUP reloads `config_path` (see proxy.reload)."""
    server = ProxyServer(config)
    try:
        await server.start()
    except OSError as exc:  # a port taken, an address not on this machine
        raise StartupError(describe_start_error(exc)) from None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    switched = SwitchedEndpoints()
    reload = ProcessReload(server, config_path, switched)
    local = LocalCommands(server).handlers()
    fanout = local_fanout(local)
    install_console(server, local, reload)
    commands = Commands(lambda: server.config, fanout,
                        lambda _config, plan: switched.record(plan.engine, plan.endpoints, plan.blue_name,
                                                              plan.green_name))
    api = await _serve_api(server, ApiContext(lambda: server.config, commands, fanout, _stats(server), reload,
                                              lambda: reload.edits))
    pid_file = None
    control: ControlSocket | None = None
    if config_path is not None:  # without a file (the demo, built-in defaults) there is nothing to reload
        loop.add_signal_handler(signal.SIGHUP, Reloads(reload.from_signal).request)
        pid_file = pid_file_path(config_path, config.server.pid_file)
        control = await _serve_control(commands, pid_file)
        write_pid_file(pid_file)
    try:
        if ready_message:
            ports = {**server.ports, **api.ports}
            listeners = " ".join(f"{name} port {port}" for name, port in ports.items())
            print(ready_message.format(**ports, listeners=listeners), flush=True)
        await stop.wait()
        log.info("shutting down")
        await api.stop()
        await server.stop()
    finally:
        if control is not None:
            control.close()
        if pid_file is not None:
            remove_pid_file(pid_file)


def _stats(server: ProxyServer) -> Callable[[], Awaitable[Snapshot]]:
    async def stats() -> Snapshot:
        return server.stats.snapshot()
    return stats


async def _serve_api(server: ProxyServer, context: ApiContext) -> ApiServer:
    """The control API and health endpoints of [api], if any; this process is its only worker."""
    api = ApiServer(context, server.config.api)
    if api.wanted:
        try:
            await api.start()
        except OSError as exc:
            await server.stop()
            raise StartupError(f"[api]: {describe_start_error(exc)}") from None
        except ConfigError:
            await server.stop()
            raise
    return api


async def _serve_control(commands: Commands, pid_file: Path) -> ControlSocket | None:
    """The control socket beside the pid file."""
    control = ControlSocket(control_socket_path(pid_file))
    try:
        await control.start(commands.handlers())
    except OSError as exc:
        log.error("no control socket at %s: %s", control.path, exc.strerror or exc)
        return None
    return control


def send_reload(config_path: Path | None, pid_file: Path | None) -> None:
    """`dbproxy reload`: check the configuration as a start would, then SIGHUP the process in the pid file."""
    try:
        config = load_config(config_path)
        check_startup(config)
    except ConfigError as exc:
        _fail(f"configuration error: {exc}; nothing sent", CONFIG_ERROR_STATUS)
    path = pid_file or pid_file_path(config_path, config.server.pid_file)
    try:
        pid = read_pid_file(path)
        if not looks_like_dbproxy(pid):
            raise ValueError(f"process {pid} is not dbproxy (a stale pid file)")
        os.kill(pid, signal.SIGHUP)
    except (OSError, ValueError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        _fail(f"no running dbproxy found through {path}: {reason}", START_ERROR_STATUS)
    print(f"dbproxy: reload sent to pid {pid} ({path})", flush=True)


def send_command(config_path: Path | None, pid_file: Path | None, message: dict[str, object],
                 timeout: float, show: Callable[[dict[str, Any]], str] | None = None) -> None:
    """Send an operator command to the running proxy's control socket (beside its pid file) and print the answer;
    exit status 1 when it failed or no proxy answers."""
    try:
        config = load_config(config_path)
    except ConfigError as exc:
        _fail(f"configuration error: {exc}; nothing sent", CONFIG_ERROR_STATUS)
    path = control_socket_path(pid_file or pid_file_path(config_path, config.server.pid_file))
    try:
        answer = ask_control(path, message, timeout)
    except ChannelError as exc:
        _fail(f"no running dbproxy answers at {path}: {exc}", START_ERROR_STATUS)
    if "error" in answer:
        _fail(f"{message['kind']} failed: {answer.get('message', answer['error'])}", START_ERROR_STATUS)
    print(show(answer) if show is not None else f"dbproxy: {answer.get('message', 'done')}", flush=True)


def failover(config_path: Path | None, wanted: str, cluster_name: str | None) -> None:
    """`dbproxy failover --to INSTANCE`: promote the instance with the cluster's monitor_user; the running proxies
    follow at their next monitor round (and fence the writer it replaces)."""
    try:
        config = load_config(config_path)
        secrets = SecretStore.from_settings(config.secrets)
    except ConfigError as exc:
        _fail(f"configuration error: {exc}", CONFIG_ERROR_STATUS)

    def warn(text: str) -> None:
        print(f"dbproxy: warning: {text}", file=sys.stderr, flush=True)

    try:
        promoted = uvloop.run(promote_instance(config, secrets, wanted, cluster_name, warn))
    except FailoverRefused as exc:
        _fail(str(exc), CONFIG_ERROR_STATUS)
    except AlreadyWriter as exc:
        _fail(str(exc), ALREADY_WRITER_STATUS)
    except OtherWriter as exc:
        _fail(str(exc), OTHER_WRITER_STATUS)
    except PromotionError as exc:  # unreachable, or the promotion itself failed
        _fail(str(exc), FAILOVER_FAILED_STATUS)
    print(f"dbproxy: {promoted.message}", flush=True)


def _parser() -> argparse.ArgumentParser:
    """The command line: run, reload, instance readmit, switchover, failover, demo."""
    parser = argparse.ArgumentParser(prog="dbproxy", description=__doc__)
    sub = parser.add_subparsers(dest="command")
    run = sub.add_parser("run", help="serve the configuration file")
    run.add_argument("-c", "--config", type=Path, default=None, help="TOML configuration file")
    run.add_argument("--check", action="store_true", help="validate the configuration and exit")
    run.add_argument("--workers", type=int, default=None,
                     help="worker processes sharing the ports with SO_REUSEPORT (default: [server] workers; 0: cores)")
    reload = sub.add_parser("reload", help="check the configuration file and make the running proxy reload it")
    reload.add_argument("-c", "--config", type=Path, default=None, help="TOML configuration file")
    reload.add_argument("--pid-file", type=Path, default=None,
                        help="pid file of the running proxy (default: [server] pid_file, else derived from -c)")
    instance = sub.add_parser("instance", help="commands about one instance of a cluster, in the running proxy")
    instance_sub = instance.add_subparsers(dest="instance_command", required=True)
    readmit = instance_sub.add_parser("readmit", help="let a fenced instance be chosen as a writer again")
    readmit.add_argument("name", help="the instance: its name in the configuration, or its host:port")
    switchover = sub.add_parser("switchover", help="move read_write endpoints to another cluster (blue/green) in "
                                                   "the running proxy, client connections kept")
    switchover.add_argument("--to", required=True, help="the cluster that becomes the writer (a replica of the "
                                                        "endpoints' cluster)")
    switchover.add_argument("--endpoint", default=None, help="the endpoint to move (default: every read_write "
                                                             "endpoint of the engine on another cluster)")
    switchover.add_argument("--timeout", type=float, default=DEFAULT_SWITCHOVER_TIMEOUT,
                            help="seconds writes may be held, and the replica may take to catch up before that "
                                 "(default: %(default)s)")
    pause = sub.add_parser("pause", help="hold new transactions (every endpoint, or one) until `dbproxy resume`; "
                                         "transactions under way finish, waiting clients wait (at most their "
                                         "borrow timeout)")
    resume = sub.add_parser("resume", help="let paused endpoints lend backend connections again")
    reconnect = sub.add_parser("reconnect", help="replace every backend connection: idle ones now, lent-out ones "
                                                 "when given back")
    for command in (pause, resume, reconnect):
        command.add_argument("--endpoint", default=None, help="only this endpoint (default: every one)")
    kill = sub.add_parser("kill", help="end a client with an admin-shutdown error (PostgreSQL 57P01, MySQL 1927)")
    kill.add_argument("id", type=int, help="the client's id: its PostgreSQL process id (the BackendKeyData "
                                           "the proxy sent it, libpq's PQbackendPID) or MySQL connection id "
                                           "(CONNECTION_ID() through the proxy)")
    top_sql = sub.add_parser("top", help="the statements with the most load (or calls, errors, rows, mean time) "
                                         "in the running proxy, over all its workers")
    top_sql.add_argument("--by", choices=ORDERS, default="load", help="order (default: %(default)s: total time)")
    top_sql.add_argument("-n", "--limit", type=int, default=20, help="statements shown (default: %(default)s)")
    top_sql.add_argument("--json", action="store_true", help="print the answer as JSON")
    control = sub.add_parser("control", help="the control module's commands, in the running proxy")
    control_sub = control.add_subparsers(dest="control_command", required=True)
    params = control_sub.add_parser("params", help="parameter groups: what backend sessions run, replacing them")
    params_sub = params.add_subparsers(dest="params_command", required=True)
    params_diff = params_sub.add_parser("diff", help="per backend pool, the parameters its backends run with "
                                                     "other values than their parameter group's")
    params_diff.add_argument("--json", action="store_true", help="print the answer as JSON")
    params_apply = params_sub.add_parser("apply", help="replace the backend connections whose static parameters "
                                                       "differ from their group's (idle now, lent-out when given "
                                                       "back)")
    for command in (params_diff, params_apply):
        command.add_argument("--group", default=None, help="only pools of users in this parameter group")
    for command in (readmit, switchover, top_sql, pause, resume, reconnect, kill, params_diff, params_apply):
        command.add_argument("-c", "--config", type=Path, default=None, help="TOML configuration file")
        command.add_argument("--pid-file", type=Path, default=None,
                             help="pid file of the running proxy; its control socket is beside it (default: "
                                  "[server] pid_file, else derived from -c)")
    promote = sub.add_parser("failover", help="promote an instance of a cluster now (the proxies follow it)",
                             description="Promote INSTANCE with the cluster's monitor_user. Exit status: 0 promoted; "
                             "1 unreachable or the promotion failed; 2 no such instance (or no password for the "
                             "monitor_user); 3 the instance is the writer already; 4 (MariaDB) another instance "
                             "still writes.")
    promote.add_argument("--to", required=True, metavar="INSTANCE", help="instance name, or host:port")
    promote.add_argument("-c", "--config", type=Path, default=None, help="TOML configuration file")
    promote.add_argument("--cluster", default=None, metavar="NAME", help="the cluster, when several have INSTANCE")
    demo = sub.add_parser("demo", help="start a throwaway replicated PostgreSQL pair and MariaDB pair and serve "
                                       "them: read_write on 127.0.0.1:6432 and :6033, read_only on :6433 and :6034")
    demo.add_argument("--port", type=int, default=6432, help="PostgreSQL read_write endpoint")
    demo.add_argument("--read-only-port", type=int, default=None, help="PostgreSQL read_only endpoint (--port + 1)")
    demo.add_argument("--mysql-port", type=int, default=6033, help="MariaDB read_write endpoint")
    demo.add_argument("--mysql-read-only-port", type=int, default=None,
                      help="MariaDB read_only endpoint (--mysql-port + 1)")
    demo.add_argument("--dir", type=Path, default=Path(".demo"))
    add_token_commands(sub)
    add_secret_commands(sub)
    return parser


def _control(args: argparse.Namespace) -> None:
    """`dbproxy control params diff|apply`."""
    message = {"kind": "params", "action": args.params_command, "group": args.group}
    show = (lambda answer: format_diff(answer, args.json)) if args.params_command == "diff" else None
    send_command(args.config, args.pid_file, message, 20.0, show)


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    if args.command == "demo":
        from devtools.demo import DemoPorts, run_demo

        setup_logging("info", "text")
        ports = DemoPorts(args.port, args.read_only_port if args.read_only_port is not None else args.port + 1,
                          args.mysql_port,
                          args.mysql_read_only_port if args.mysql_read_only_port is not None else args.mysql_port + 1)
        _exit_on_start_error(lambda: run_demo(args.dir, ports, serve))
        return
    if args.command == "reload":
        send_reload(args.config, args.pid_file)
        return
    if args.command == "instance":
        send_command(args.config, args.pid_file, {"kind": "readmit", "instance": args.name}, 10.0)
        return
    if args.command == "switchover":
        send_command(args.config, args.pid_file, {"kind": "switchover", "to": args.to, "endpoint": args.endpoint,
                                                  "timeout": args.timeout}, 2 * args.timeout + 30.0)
        return
    if args.command in ("pause", "resume", "reconnect"):
        send_command(args.config, args.pid_file, {"kind": args.command, "endpoint": args.endpoint}, 10.0)
        return
    if args.command == "kill":
        send_command(args.config, args.pid_file, {"kind": "kill-client", "id": args.id}, 10.0)
        return
    if args.command == "top":
        send_command(args.config, args.pid_file, {"kind": "top", "by": args.by, "limit": args.limit}, 15.0,
                     lambda answer: format_top(answer, args.json, shutil.get_terminal_size().columns))
        return
    if args.command == "control":
        _control(args)
        return
    if args.command == "failover":
        failover(args.config, args.to, args.cluster)
        return
    if args.command in ("keys", "token"):
        run_token_command(args)
        return
    if args.command == "secrets":
        run_secret_command(args)
        return
    config_path = getattr(args, "config", None)
    checking = getattr(args, "check", False)
    try:
        config = load_config(config_path)
        if checking:
            check_startup(config)
    except ConfigError as exc:
        _fail(f"configuration error: {exc}", CONFIG_ERROR_STATUS)
    if checking:
        print(f"{config_path}: OK" if config_path else "built-in defaults (no -c given, no configuration file): OK")
        return
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # a reload asked before the proxy listens: nothing to reload yet
    setup_logging(config.server.log_level, config.server.log_format)
    workers = args.workers if args.workers is not None else config.server.workers
    workers = workers or os.cpu_count() or 1
    if workers > 1:
        from proxy.workers import run_supervisor

        def supervise() -> None:
            check_startup(config)  # once, before forking: one line instead of a traceback from every worker
            run_supervisor(config, workers, READY_MESSAGE, config_path)

        _exit_on_start_error(supervise)
        return

    def serve_here() -> None:
        check_host(config)
        uvloop.run(serve(config, READY_MESSAGE, config_path))

    _exit_on_start_error(serve_here)


def _fail(message: str, status: int) -> NoReturn:
    print(f"dbproxy: {message}", file=sys.stderr, flush=True)
    raise SystemExit(status)


def _exit_on_start_error(start: Callable[[], None]) -> None:
    """Run `start`; a configuration or start error ends the process with one line on stderr and no traceback."""
    try:
        start()
    except ConfigError as exc:
        _fail(f"configuration error: {exc}", CONFIG_ERROR_STATUS)
    except StartupError as exc:
        _fail(f"cannot start: {describe_start_error(exc)}", START_ERROR_STATUS)
