"""The systems under test: throwaway PostgreSQL and MariaDB, PgBouncer and the proxy, started and torn down together."""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Self

import psutil

from devtools.servers import (
    PG_OS_USER,
    DevServerError,
    MariaDBInstance,
    PostgresInstance,
    free_port,
    start_mariadb,
    start_postgres,
)
from loadtest.machine import PGBOUNCER, raise_open_files_to_hard_limit

BENCH_USER = "bench"
BENCH_PASSWORD = "bench-secret"
#: Enough for 1,000 direct clients plus the harness's own monitoring sessions.
BACKEND_MAX_CONNECTIONS = 1100
#: Client connections PgBouncer accepts; it needs about that many open files (the hard limit may be 20,000).
PGBOUNCER_MAX_CLIENTS = 10_000
START_TIMEOUT = 30.0
#: Seconds the MySQL port may lag behind the ready line before the listener is taken to be missing.
MYSQL_LISTENER_GRACE = 3.0
STOP_TIMEOUT = 15.0
REPO_ROOT = Path(__file__).resolve().parent.parent

POSTGRESQL = "postgresql"
MYSQL = "mysql"
DIRECT = "direct"
PGBOUNCER_TARGET = "pgbouncer"
PROXY = "proxy"
TARGET_ORDER = (DIRECT, PGBOUNCER_TARGET, PROXY)


class TargetError(RuntimeError):
    """A system under test failed to start or stop."""


def proxy_server_setting_exists(name: str) -> bool:
    """True when the proxy's ``[server]`` section knows ``name`` (e.g. ``workers``, which came later)."""
    from proxy.config import ServerSettings

    return name in ServerSettings.model_fields


def mysql_listener_available() -> bool:
    """True once the proxy's configuration has a ``[mysql]`` section (the MySQL listener exists)."""
    from proxy.config import Config

    return "mysql" in Config.model_fields


@dataclass
class Endpoint:
    """Where a load generator connects for one (engine, target) pair, and who sits in the middle."""

    engine: str  # POSTGRESQL or MYSQL
    target: str  # DIRECT, PGBOUNCER_TARGET or PROXY
    host: str = "127.0.0.1"
    port: int = 0
    user: str = BENCH_USER
    password: str = BENCH_PASSWORD
    database: str = BENCH_USER
    #: The middleman process (PgBouncer or the proxy) whose CPU and memory are sampled; None when direct.
    process: psutil.Process | None = None
    #: Why this pair cannot be measured in this run ("" when it can).
    unavailable: str = ""


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as exc:
        return f"<no log at {path}: {exc}>"


def _wait_port(host: str, port: int, proc: subprocess.Popen[bytes] | subprocess.Popen[str], what: str,
               log: Path) -> None:
    import socket

    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise TargetError(f"{what} exited with code {proc.returncode} while starting\n--- {log} ---\n{_tail(log)}")
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=1.0):
            return
        time.sleep(0.05)
    raise TargetError(f"{what} did not listen on {host}:{port} within {START_TIMEOUT:.0f}s\n"
                      f"--- {log} ---\n{_tail(log)}")


def _listening(host: str, port: int, within: float) -> bool:
    import socket

    deadline = time.monotonic() + within
    while True:
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=1.0):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)


def _stop_process(proc: subprocess.Popen[bytes] | subprocess.Popen[str], sig: signal.Signals) -> None:
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(sig)
    try:
        proc.wait(STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(STOP_TIMEOUT)


class PgBouncer:
    """PgBouncer in transaction mode in front of one PostgreSQL, SCRAM auth from a plaintext userlist."""

    def __init__(self, workdir: Path, backend: PostgresInstance, pool_size: int) -> None:
        self.workdir = workdir
        self.backend = backend
        self.pool_size = pool_size
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def log_file(self) -> Path:
        return self.workdir / "pgbouncer.log"

    def config_text(self) -> str:
        return "\n".join([
            "[databases]",
            f"{BENCH_USER} = host=127.0.0.1 port={self.backend.port} dbname={BENCH_USER}",
            "",
            "[pgbouncer]",
            "listen_addr = 127.0.0.1",
            f"listen_port = {self.port}",
            "unix_socket_dir =",
            f"logfile = {self.log_file}",
            f"pidfile = {self.workdir / 'pgbouncer.pid'}",
            "auth_type = scram-sha-256",
            f"auth_file = {self.workdir / 'userlist.txt'}",
            "pool_mode = transaction",
            f"default_pool_size = {self.pool_size}",
            "min_pool_size = 0",
            "reserve_pool_size = 0",
            f"max_client_conn = {PGBOUNCER_MAX_CLIENTS}",
            "max_db_connections = 0",
            "log_connections = 0",
            "log_disconnections = 0",
            "log_pooler_errors = 1",
            "stats_period = 3600",
            "ignore_startup_parameters = extra_float_digits,options",
            "server_login_retry = 1",
            "",
        ])

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "userlist.txt").write_text(f'"{BENCH_USER}" "{BENCH_PASSWORD}"\n')
        cmd = [PGBOUNCER]
        if os.geteuid() == 0:  # PgBouncer refuses to run as root; -u drops to the database's OS account
            account = pwd.getpwnam(PG_OS_USER)
            cmd += ["-u", PG_OS_USER]
            os.chmod(self.workdir, 0o755)
            for path in (self.workdir, self.workdir / "userlist.txt"):
                os.chown(path, account.pw_uid, account.pw_gid)
        for _attempt in range(3):
            self.port = free_port()
            ini = self.workdir / "pgbouncer.ini"
            ini.write_text(self.config_text())
            self.log_file.unlink(missing_ok=True)
            with (self.workdir / "pgbouncer.out").open("ab") as out:
                self.proc = subprocess.Popen([*cmd, str(ini)], stdin=subprocess.DEVNULL, stdout=out,
                                             stderr=subprocess.STDOUT, start_new_session=True,
                                             preexec_fn=raise_open_files_to_hard_limit)
            try:
                _wait_port("127.0.0.1", self.port, self.proc, "pgbouncer", self.log_file)
                return
            except TargetError:
                self.stop()
                if "Address already in use" not in _tail(self.log_file):
                    raise
        raise TargetError("pgbouncer: no free port after 3 attempts")

    def stop(self) -> None:
        if self.proc is not None:
            _stop_process(self.proc, signal.SIGINT)  # SIGINT: "safe shutdown" without waiting for clients
            self.proc = None


class ProxyProcess:
    """``python -m proxy run -c CONFIG`` in front of one PostgreSQL (and MariaDB once there is a MySQL listener)."""

    def __init__(self, workdir: Path, postgres: PostgresInstance | None, mariadb: MariaDBInstance | None,
                 pool_size: int, code_dir: Path = REPO_ROOT, workers: int | None = None) -> None:
        self.workdir = workdir
        #: ``[server] workers`` to write (None: leave the proxy's default, one worker per core).
        self.workers = workers
        self.code_dir = code_dir  # holds the ``proxy`` package this process runs
        self.postgres = postgres
        self.mariadb = mariadb
        self.pool_size = pool_size
        self.ports: dict[str, int] = {}
        #: Why the MySQL listener cannot be measured although the configuration has a [mysql] section.
        self.mysql_problem = ""
        #: Worker processes found still running after the main process had stopped (a proxy shutdown problem).
        self.orphans_seen = 0
        #: TOML appended to the configuration (sections the code in code_dir knows, e.g. [auth]).
        self.extra_config = ""
        self.proc: subprocess.Popen[str] | None = None
        self._stdout: list[str] = []
        self._reader: threading.Thread | None = None

    @property
    def log_file(self) -> Path:
        return self.workdir / "proxy.log"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def _pool_lines(self, section: str) -> list[str]:
        return [
            f"[{section}.pool]",
            'mode = "transaction"',
            f"max_connections = {self.pool_size}",
            f"max_idle_connections = {self.pool_size}",
        ]

    def config_text(self) -> str:
        lines = [
            "[server]",
            'log_level = "warning"',
            "shutdown_grace = 1.0",
        ]
        if self.workers is not None and proxy_server_setting_exists("workers"):
            lines.append(f"workers = {self.workers}")
        lines += ["[secrets]", 'file = "secrets.toml"']
        if self.postgres is not None:
            lines += [
                "[postgresql]",
                f"port = {self.ports[POSTGRESQL]}",
                'backend_host = "127.0.0.1"',
                f"backend_port = {self.postgres.port}",
                'auth_method = "scram-sha-256"',
                *self._pool_lines("postgresql"),
            ]
        else:
            lines += ["[postgresql]", "enabled = false"]
        if mysql_listener_available():
            from proxy.config import Config

            mysql_fields = Config.model_fields["mysql"].annotation
            known = getattr(mysql_fields, "model_fields", {})
            if self.mariadb is not None:
                lines += ["[mysql]", "enabled = true", f"port = {self.ports[MYSQL]}",
                          f"backend_port = {self.mariadb.port}"]
                if "backend_host" in known:
                    lines.append('backend_host = "127.0.0.1"')
                lines += self._pool_lines("mysql")
            elif "enabled" in known:
                lines += ["[mysql]", "enabled = false"]  # never the default port 6033 when nothing is behind it
        return "\n".join(lines) + "\n" + self.extra_config

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "secrets.toml").write_text(f'[users]\n{BENCH_USER} = "{BENCH_PASSWORD}"\n')
        self.ports = {}
        if self.postgres is not None:
            self.ports[POSTGRESQL] = free_port()
        if self.mariadb is not None and mysql_listener_available():
            self.ports[MYSQL] = free_port()
        if not self.ports:
            raise TargetError("the proxy needs PostgreSQL, or MariaDB and a proxy with a MySQL listener")
        config = self.workdir / "proxy.toml"
        config.write_text(self.config_text())
        with self.log_file.open("ab") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "proxy", "run", "-c", str(config)],
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err, text=True, cwd=self.code_dir,
                start_new_session=True, preexec_fn=raise_open_files_to_hard_limit,
            )
        ready = threading.Event()
        self._stdout = []
        stdout = self.proc.stdout
        assert stdout is not None

        def read_stdout() -> None:  # also keeps the pipe drained for the life of the process
            for line in stdout:
                self._stdout.append(line.rstrip("\n"))
                if line.startswith("dbproxy ready"):
                    ready.set()
            ready.set()  # EOF: the process is gone; start() notices

        self._reader = threading.Thread(target=read_stdout, name="proxy-stdout", daemon=True)
        self._reader.start()
        if not ready.wait(START_TIMEOUT) or self.proc.poll() is not None:
            code = self.proc.poll()
            self.stop()
            state = f"exited with code {code}" if code is not None else f"not ready after {START_TIMEOUT:.0f}s"
            raise TargetError(f"proxy {state}\nstdout: {self._stdout}\n--- {self.log_file} ---\n{_tail(self.log_file)}")
        if POSTGRESQL in self.ports:
            _wait_port("127.0.0.1", self.ports[POSTGRESQL], self.proc, "proxy", self.log_file)
        self.mysql_problem = ""
        if MYSQL in self.ports and not _listening("127.0.0.1", self.ports[MYSQL], MYSQL_LISTENER_GRACE):
            # The configuration knows [mysql] but nothing listens: the listener itself is not there yet.
            self.mysql_problem = (f"n/a (no MySQL listener yet: [mysql] is accepted in the config but port "
                                  f"{self.ports.pop(MYSQL)} is not listening)")

    @property
    def ready_line(self) -> str:
        return next((line for line in self._stdout if line.startswith("dbproxy ready")), "")

    def process_count(self) -> int:
        """Processes of the running proxy: 1, or a supervisor plus its workers."""
        if not self.alive():
            return 0
        try:
            return 1 + len(psutil.Process(self.pid).children(recursive=True))
        except psutil.Error:
            return 0

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        """SIGTERM the proxy; then end any of its worker processes that outlived it (orphans keep the port)."""
        if self.proc is not None:
            try:
                workers = psutil.Process(self.proc.pid).children(recursive=True)
            except psutil.Error:
                workers = []
            _stop_process(self.proc, signal.SIGTERM)
            self.proc = None
            survivors = [w for w in workers if w.is_running() and w.status() != psutil.STATUS_ZOMBIE]
            if survivors:
                self.orphans_seen += len(survivors)
                print(f"[bench] {len(survivors)} proxy worker(s) outlived the proxy's main process; ending them",
                      file=sys.stderr)
                for worker in survivors:
                    with contextlib.suppress(psutil.Error):
                        worker.terminate()
                _, alive = psutil.wait_procs(survivors, timeout=STOP_TIMEOUT)
                for worker in alive:
                    with contextlib.suppress(psutil.Error):
                        worker.kill()
        if self._reader is not None:
            self._reader.join(2.0)
            self._reader = None

    def restart(self) -> None:
        """A fresh proxy process (new ports): used by the idle-connection probe to measure from a clean start."""
        self.stop()
        self.start()

    def log_errors(self, since: int = 0) -> list[str]:
        """Lines of the proxy's log (warnings and worse, as configured) from byte offset ``since``."""
        try:
            with self.log_file.open("rb") as fh:
                fh.seek(since)
                return fh.read().decode(errors="replace").splitlines()
        except OSError:
            return []

    def log_size(self) -> int:
        try:
            return self.log_file.stat().st_size
        except OSError:
            return 0


def knows_auth_section(code_dir: Path) -> bool:
    """Whether the proxy code in `code_dir` has an [auth] section (the failed-login throttle came with it)."""
    config = code_dir / "proxy" / "config.py"
    return config.exists() and "class AuthSettings" in config.read_text()


def snapshot_proxy_code(destination: Path) -> Path:
    """Copy the ``proxy`` package as it is now; every proxy process of the run imports this copy.

    Others may be editing proxy/ while a run takes its quarter of an hour; a proxy restarted mid-run (the idle
    probe starts a fresh one) must not pick up a half-made change, and the whole run measures one version.
    The compiled hot path comes along: the extension modules inside ``proxy/`` and mypyc's group library, which
    ``pip install -e .`` leaves in the repository root (``*__mypyc*.so``) and the extensions import by name.
    Modification times are kept (``copy2``), so the copy judges a stale build exactly as the checkout would.
    """
    shutil.copytree(REPO_ROOT / "proxy", destination / "proxy", ignore=shutil.ignore_patterns("__pycache__"),
                    dirs_exist_ok=True)
    for library in REPO_ROOT.glob("*__mypyc*.so"):
        shutil.copy2(library, destination / library.name)
    return destination


COMPILED_PROBE = "import proxy.compiled as c; print(c.in_use())"


def compiled_state(code_dir: Path) -> str:
    """Whether a proxy started from ``code_dir`` (same interpreter and environment) runs the compiled hot path."""
    try:
        done = subprocess.run([sys.executable, "-W", "always", "-c", COMPILED_PROBE], cwd=code_dir,
                              capture_output=True, text=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unknown ({exc})"
    answer = done.stdout.strip()
    if done.returncode != 0 or answer not in ("True", "False"):
        return "unknown (this proxy has no proxy.compiled)" if "proxy.compiled" in done.stderr else "unknown"
    if answer == "True":
        return "compiled (mypyc build of the hot path)"
    if os.environ.get("DBPROXY_COMPILED") == "0":
        return "interpreted (DBPROXY_COMPILED=0)"
    warning = next((line.split("RuntimeWarning:", 1)[1].strip() for line in done.stderr.splitlines()
                    if "RuntimeWarning:" in line), "")
    return f"interpreted ({warning})" if warning else "interpreted (no compiled build: `pip install -e .` makes one)"


def _process_tree(pid: int) -> psutil.Process | None:
    try:
        return psutil.Process(pid)
    except psutil.Error:
        return None


@dataclass
class Stack:
    """Every system of one run, on free loopback ports; a context manager that always tears them all down."""

    workdir: Path
    pool_size: int = 20
    with_postgres: bool = True
    with_mariadb: bool = True
    with_pgbouncer: bool = True
    with_proxy: bool = True
    proxy_workers: int | None = None
    postgres: PostgresInstance | None = None
    mariadb: MariaDBInstance | None = None
    pgbouncer: PgBouncer | None = None
    proxy: ProxyProcess | None = None
    _stack: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.workdir, 0o711)  # the postgres OS account (PostgreSQL, PgBouncer) must traverse it
        users = {BENCH_USER: BENCH_PASSWORD}
        limit = str(BACKEND_MAX_CONNECTIONS)
        if self.with_postgres:
            self._say("starting PostgreSQL")
            self.postgres = start_postgres(
                self.workdir / "pg", users=users, auth="scram-sha-256",
                settings={"max_connections": limit, "shared_buffers": "256MB"},
            )
            self._stack.callback(self.postgres.stop)
        if self.with_mariadb:
            self._say("starting MariaDB")
            self.mariadb = start_mariadb(
                self.workdir / "mariadb", users=users,
                settings={"max_connections": limit, "thread_cache_size": "1100", "innodb_buffer_pool_size": "256M"},
            )
            self._stack.callback(self.mariadb.stop)
        if self.with_pgbouncer and self.postgres is not None:
            self._say("starting PgBouncer")
            self.pgbouncer = PgBouncer(self.workdir / "pgbouncer", self.postgres, self.pool_size)
            self._stack.callback(self.pgbouncer.stop)
            self.pgbouncer.start()
        if self.with_proxy and (self.postgres is not None or self.mariadb is not None):
            self._say("starting the proxy")
            self.proxy = ProxyProcess(self.workdir / "proxy", self.postgres, self.mariadb, self.pool_size,
                                      code_dir=snapshot_proxy_code(self.workdir / "code"),
                                      workers=self.proxy_workers)
            self._stack.callback(self.proxy.stop)
            self.proxy.start()

    @staticmethod
    def _say(text: str) -> None:
        print(f"[bench] {text}", file=sys.stderr, flush=True)

    def close(self) -> None:
        """Stop everything that was started, in reverse order; errors are reported, not raised."""
        try:
            self._stack.close()
        except (DevServerError, TargetError, OSError) as exc:
            print(f"[bench] teardown problem: {exc}", file=sys.stderr)

    def endpoint(self, engine: str, target: str) -> Endpoint:
        """The endpoint for (engine, target); its ``unavailable`` says why it cannot be measured, if so."""
        if engine == POSTGRESQL:
            if self.postgres is None:
                return Endpoint(engine, target, unavailable="PostgreSQL not started")
            if target == DIRECT:
                return Endpoint(engine, target, port=self.postgres.port)
            if target == PGBOUNCER_TARGET:
                if self.pgbouncer is None or self.pgbouncer.proc is None:
                    return Endpoint(engine, target, unavailable="PgBouncer not started")
                return Endpoint(engine, target, port=self.pgbouncer.port,
                                process=_process_tree(self.pgbouncer.proc.pid))
            if target == PROXY:
                if self.proxy is None or not self.proxy.alive() or POSTGRESQL not in self.proxy.ports:
                    return Endpoint(engine, target, unavailable="proxy not running")
                return Endpoint(engine, target, port=self.proxy.ports[POSTGRESQL],
                                process=_process_tree(self.proxy.pid))
        if engine == MYSQL:
            if self.mariadb is None:
                return Endpoint(engine, target, unavailable="MariaDB not started")
            if target == DIRECT:
                return Endpoint(engine, target, port=self.mariadb.port)
            if target == PGBOUNCER_TARGET:
                return Endpoint(engine, target, unavailable="PgBouncer is PostgreSQL only")
            if target == PROXY:
                if not mysql_listener_available():
                    return Endpoint(engine, target, unavailable="n/a (no MySQL listener yet)")
                if self.proxy is None or not self.proxy.alive():
                    return Endpoint(engine, target, unavailable="proxy not running")
                if MYSQL not in self.proxy.ports:
                    return Endpoint(engine, target, unavailable=self.proxy.mysql_problem or "no MySQL port")
                return Endpoint(engine, target, port=self.proxy.ports[MYSQL], process=_process_tree(self.proxy.pid))
        raise ValueError(f"unknown engine/target {engine}/{target}")


@contextlib.contextmanager
def temporary_workdir(keep: bool = False) -> Iterator[Path]:
    """A fresh directory under /tmp (short paths: unix sockets live there), removed afterwards unless ``keep``."""
    import tempfile

    path = Path(tempfile.mkdtemp(prefix="dbproxy-bench-"))
    try:
        yield path
    finally:
        if keep:
            print(f"[bench] kept work directory {path}", file=sys.stderr)
        else:
            shutil.rmtree(path, ignore_errors=True)
