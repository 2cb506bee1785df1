"""Throwaway PostgreSQL and MariaDB instances on free loopback ports, for the demo, the tests \
and the benchmarks."""

from __future__ import annotations

import atexit
import contextlib
import os
import pwd
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Self
from urllib.parse import quote

from proxy.tls import self_signed_pair

__all__ = [
    "DevServerError",
    "MariaDBInstance",
    "PostgresInstance",
    "free_port",
    "start_mariadb",
    "start_postgres",
    "start_postgres_standby",
]

#: Upper bound, in seconds, for every wait (server start, stop, client commands).
TIMEOUT = 30.0


def _newest_pg_bin_dir() -> Path:
    """Debian's layout, /usr/lib/postgresql/<major>/bin: the newest major version installed (15 if none)."""
    installed = [path for path in Path("/usr/lib/postgresql").glob("*/bin") if path.parent.name.isdigit()]
    return max(installed, key=lambda path: int(path.parent.name), default=Path("/usr/lib/postgresql/15/bin"))


PG_BIN_DIR = Path(os.environ.get("DBPROXY_PG_BIN_DIR") or _newest_pg_bin_dir())
#: OS account that owns PostgreSQL data directories when we run as root (initdb refuses root).
PG_OS_USER = "postgres"
PG_AUTH_METHODS = ("scram-sha-256", "md5", "password", "trust")

MARIADB_INSTALL_DB = os.environ.get("DBPROXY_MARIADB_INSTALL_DB", "/usr/bin/mariadb-install-db")
MARIADBD = os.environ.get("DBPROXY_MARIADBD", "/usr/sbin/mariadbd")
MARIADB_CLIENT = os.environ.get("DBPROXY_MARIADB_CLIENT", "/usr/bin/mariadb")

# Linux sun_path is 108 bytes including the terminating NUL.
_MAX_UNIX_SOCKET_PATH = 107
_RETRY_PORT_ATTEMPTS = 3


class DevServerError(RuntimeError):
    """A throwaway server failed to initialise, start, stop or run a command."""


# --------------------------------------------------------------------------- helpers


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port that is currently free on ``host`` (the OS picks it; racy but good enough)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def _log_tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"<no log at {path}: {exc}>"
    tail = text.splitlines()[-lines:]
    return "\n".join(tail) if tail else f"<log {path} is empty>"


def _clean_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The current environment without libpq/MySQL client variables that could redirect our commands."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("PG") and k not in ("MYSQL_PWD", "MYSQL_HOST", "MYSQL_TCP_PORT", "MYSQL_UNIX_PORT")
    }
    if extra:
        env.update(extra)
    return env


def _run(
    cmd: Sequence[str],
    *,
    what: str,
    env: Mapping[str, str] | None = None,
    input_text: str | None = None,
    cwd: Path | None = None,
    timeout: float = TIMEOUT,
    log: Path | None = None,
) -> str:
    """Run ``cmd``; return its stdout or raise :class:`DevServerError` with stderr (and a log tail)."""
    try:
        proc = subprocess.run(
            list(cmd),
            input=input_text,
            capture_output=True,
            text=True,
            env=dict(env) if env is not None else _clean_env(),
            cwd=cwd,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        msg = f"{what}: timed out after {timeout:.0f}s: {' '.join(cmd)}"
        if log is not None:
            msg += f"\n--- {log} (tail) ---\n{_log_tail(log)}"
        raise DevServerError(msg) from exc
    except OSError as exc:
        raise DevServerError(f"{what}: cannot run {cmd[0]}: {exc}") from exc
    if proc.returncode != 0:
        output = proc.stderr.strip() or proc.stdout.strip()
        msg = f"{what}: exit code {proc.returncode}: {' '.join(cmd)}\n{output}"
        if log is not None:
            msg += f"\n--- {log} (tail) ---\n{_log_tail(log)}"
        raise DevServerError(msg)
    return proc.stdout


def _pid_alive(pid: int) -> bool:
    """True while ``pid`` runs. Zombies count as gone: PID 1 may take seconds to reap the daemons."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            # "pid (comm) S ..." -- comm may contain spaces/parens, the state follows the last ")".
            if fh.read().rpartition(b")")[2].split()[:1] == [b"Z"]:
                return False
    except OSError:
        pass
    # A zombie child of ours still "exists"; reap it if it is ours.
    with contextlib.suppress(ChildProcessError, OSError):
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return False
    return True


def _read_pid(path: Path) -> int | None:
    try:
        first = path.read_text().split("\n", 1)[0].strip()
        return int(first)
    except (OSError, ValueError):
        return None


def _kill_and_wait(pid: int, sig: signal.Signals, timeout: float) -> bool:
    """Send ``sig`` to ``pid`` and wait up to ``timeout`` for it to go away. True when gone."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _pid_alive(pid):
            return True
        time.sleep(0.05)
    return not _pid_alive(pid)


def _check_socket_path(path: Path) -> None:
    if len(os.fsencode(path)) > _MAX_UNIX_SOCKET_PATH:
        raise DevServerError(
            f"unix socket path too long (> {_MAX_UNIX_SOCKET_PATH} bytes): {path}; use a shorter basedir"
        )


def _pg_literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _pg_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _libpq_value(value: str) -> str:
    if value and not any(c in value for c in " '\\\t\n\r"):
        return value
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _my_literal(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _my_ident(name: str) -> str:
    return "`" + name.replace("`", "``") + "`"


def _write_certificate(cert_path: Path, key_path: Path, account: pwd.struct_passwd | None = None) -> None:
    """A fresh self-signed certificate and key for a server's TLS (key 0600, owned by ``account`` if given)."""
    cert_pem, key_pem = self_signed_pair("dbproxy-devserver")
    cert_path.write_bytes(cert_pem)
    key_path.touch(mode=0o600)
    key_path.write_bytes(key_pem)
    os.chmod(key_path, 0o600)
    if account is not None:
        for path in (cert_path, key_path):
            os.chown(path, account.pw_uid, account.pw_gid)


# --------------------------------------------------------------------------- templates
# initdb and mariadb-install-db take seconds; each runs once per process into a template data directory, and every
# new server starts from a copy of it (sparse: an empty redo log or WAL segment costs no writes).

_templates: dict[str, Path] = {}
_templates_lock = threading.Lock()
_template_root: Path | None = None


def _remove_templates(owner_pid: int, root: Path) -> None:
    if os.getpid() == owner_pid:  # not in a forked child that inherited the atexit hook
        shutil.rmtree(root, ignore_errors=True)


def _template(kind: str, make: Callable[[Path], None]) -> Path:
    """The template data directory ``kind``: ``make(folder)`` fills ``folder``/data the first time this process asks."""
    global _template_root
    with _templates_lock:
        if kind in _templates and _templates[kind].exists():
            return _templates[kind]
        if _template_root is None or not _template_root.exists():
            _template_root = Path(tempfile.mkdtemp(prefix="dbproxy-templates-"))
            os.chmod(_template_root, 0o711)  # the postgres account must reach its template
            atexit.register(_remove_templates, os.getpid(), _template_root)
        folder = _template_root / kind
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(mode=0o711)
        make(folder)
        _templates[kind] = folder / "data"
        return _templates[kind]


def _copy_datadir(template: Path, datadir: Path) -> None:
    """``cp -a --sparse=always``: owner, modes and times kept, runs of zeros left as holes."""
    _run(["cp", "-a", "--sparse=always", str(template), str(datadir)], what="copy of the template data directory")


# --------------------------------------------------------------------------- PostgreSQL


def _pg_bin(name: str) -> str:
    path = PG_BIN_DIR / name
    if not path.exists():
        found = shutil.which(name)
        if found is None:
            raise DevServerError(f"PostgreSQL binary {name!r} not found in {PG_BIN_DIR} or PATH")
        return found
    return str(path)


def _pg_os_account() -> pwd.struct_passwd | None:
    """The account PostgreSQL server processes must run as: ``postgres`` when we are root, else ourselves."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam(PG_OS_USER)
    except KeyError as exc:
        raise DevServerError(f"running as root but there is no {PG_OS_USER!r} OS user to run PostgreSQL") from exc


def _as_pg_user(cmd: list[str]) -> list[str]:
    if os.geteuid() == 0:
        return ["runuser", "-u", PG_OS_USER, "--", *cmd]
    return cmd


def _make_traversable(path: Path, account: pwd.struct_passwd) -> None:
    """Add o+x to each ancestor of ``path`` that ``account`` could not search (e.g. pytest's 0700 dirs)."""
    for parent in path.resolve().parents:
        st = parent.stat()
        if st.st_uid == account.pw_uid or st.st_mode & stat.S_IXOTH:
            continue
        if st.st_gid == account.pw_gid and st.st_mode & stat.S_IXGRP:
            continue
        os.chmod(parent, stat.S_IMODE(st.st_mode) | stat.S_IXOTH)


@dataclass(eq=False)
class PostgresInstance:
    """A PostgreSQL cluster in ``datadir`` (its parent holds the log and the unix socket directory)."""

    datadir: Path
    port: int
    host: str = "127.0.0.1"
    superuser: str = "postgres"
    superuser_password: str = "postgres"
    auth: str = "scram-sha-256"
    #: Login roles created by :func:`start_postgres` (each owns a database of the same name).
    passwords: dict[str, str] = field(default_factory=dict)
    _owner_pid: int = field(default=0, init=False, repr=False)

    @property
    def basedir(self) -> Path:
        return self.datadir.parent

    @property
    def socket_dir(self) -> Path:
        return self.basedir / "run"

    @property
    def log_file(self) -> Path:
        return self.basedir / "server.log"

    @property
    def pid(self) -> int | None:
        """PID of the postmaster, if it is running."""
        pid = _read_pid(self.datadir / "postmaster.pid")
        return pid if pid is not None and _pid_alive(pid) else None

    @property
    def running(self) -> bool:
        return self.pid is not None

    # -- lifecycle ------------------------------------------------------------------

    def start(self, *, tcp_login: bool = True) -> None:
        """Start the server (no-op if it runs) and wait until it accepts TCP logins (``tcp_login`` False: logins
        over the unix socket, for a fresh copy whose superuser has no password yet)."""
        if self.running:
            return
        stale = self.datadir / "postmaster.pid"
        if stale.exists():
            stale.unlink()
        self._owner_pid = os.getpid()
        atexit.register(self._stop_at_exit)
        try:
            _run(
                _as_pg_user(
                    [
                        _pg_bin("pg_ctl"),
                        *("-D", str(self.datadir), "-l", str(self.log_file)),
                        *("-w", "-t", str(int(TIMEOUT)), "-s", "start"),
                    ]
                ),
                what=f"pg_ctl start (port {self.port})",
                cwd=self.basedir,
                timeout=TIMEOUT + 5,
                log=self.log_file,
            )
            self.wait_ready(tcp_login=tcp_login)
        except BaseException:
            self.stop()
            raise

    def wait_ready(self, timeout: float = TIMEOUT, *, tcp_login: bool = True) -> None:
        """Retry ``SELECT 1`` over TCP as the superuser (``tcp_login`` False: over the unix socket) until it works."""
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            if not self.running:
                break
            try:
                if tcp_login:
                    self.psql("SELECT 1")
                else:
                    self.psql_local("SELECT 1")
                return
            except DevServerError as exc:
                last = exc
                time.sleep(0.1)
        raise DevServerError(
            f"PostgreSQL on {self.host}:{self.port} not ready after {timeout:.0f}s: {last}\n"
            f"--- {self.log_file} (tail) ---\n{_log_tail(self.log_file)}"
        )

    def _stop_at_exit(self) -> None:
        if os.getpid() == self._owner_pid:  # not in a forked child that inherited the atexit hook
            self.stop()

    def stop(self) -> None:
        """``pg_ctl stop -m fast``; SIGKILL the postmaster if that fails. Idempotent."""
        atexit.unregister(self._stop_at_exit)
        pid = self.pid
        if pid is None:
            return
        try:
            _run(
                _as_pg_user(
                    [
                        _pg_bin("pg_ctl"),
                        *("-D", str(self.datadir), "-m", "fast"),
                        *("-w", "-t", str(int(TIMEOUT)), "-s", "stop"),
                    ]
                ),
                what="pg_ctl stop",
                cwd=self.basedir if self.basedir.exists() else None,
                timeout=TIMEOUT + 5,
            )
        except DevServerError:
            pass
        else:
            return  # pg_ctl saw postmaster.pid go away: the postmaster has shut down
        if _pid_alive(pid) and not _kill_and_wait(pid, signal.SIGKILL, 5.0):
            raise DevServerError(f"PostgreSQL postmaster {pid} survived SIGKILL")
        with contextlib.suppress(OSError):
            (self.datadir / "postmaster.pid").unlink()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def kill(self) -> None:
        """SIGKILL the postmaster (a crash, not a shutdown); its backends exit as they notice. Idempotent."""
        atexit.unregister(self._stop_at_exit)
        pid = self.pid
        if pid is not None and not _kill_and_wait(pid, signal.SIGKILL, 5.0):
            raise DevServerError(f"PostgreSQL postmaster {pid} survived SIGKILL")
        # The crash leaves its lock files; an unreaped (zombie) postmaster would make a restart refuse them.
        for leftover in (self.datadir / "postmaster.pid", self.socket_dir / f".s.PGSQL.{self.port}.lock"):
            with contextlib.suppress(OSError):
                leftover.unlink()

    # -- replication ----------------------------------------------------------------

    def promote(self) -> None:
        """Promote this standby (``pg_ctl promote -w``): it leaves recovery on a new timeline."""
        _pg_promote(self)

    def pause_replay(self) -> None:
        """A standby keeps receiving WAL but stops applying it (``pg_wal_replay_pause()``)."""
        self.psql("SELECT pg_wal_replay_pause()")

    def resume_replay(self) -> None:
        """A standby applies WAL again (``pg_wal_replay_resume()``)."""
        self.psql("SELECT pg_wal_replay_resume()")

    # -- clients --------------------------------------------------------------------

    def _psql(self, sql: str, *, user: str, db: str, host: str, password: str | None) -> str:
        env = _clean_env({"PGCONNECT_TIMEOUT": "10", "PGSSLMODE": "disable"})
        if password is not None:
            env["PGPASSWORD"] = password
        cmd = [_pg_bin("psql"), "-X", "-q", "-A", "-t", "-w", "-v", "ON_ERROR_STOP=1"]
        cmd += ["-h", host, "-p", str(self.port), "-U", user, "-d", db, "-f", "-"]
        out = _run(cmd, what=f"psql as {user}@{db}", env=env, input_text=sql)
        return out.rstrip("\n")

    def psql(self, sql: str, *, user: str = "postgres", db: str = "postgres") -> str:
        """Run ``sql`` (one or more statements) with ``psql -At`` over TCP; return stdout.

        The superuser authenticates with :attr:`superuser_password`, roles made by
        :func:`start_postgres` with theirs. Raises :class:`DevServerError` on any error.
        """
        password = self.superuser_password if user == self.superuser else self.passwords.get(user)
        return self._psql(sql, user=user, db=db, host=self.host, password=password)

    def psql_local(self, sql: str, *, user: str = "postgres", db: str = "postgres") -> str:
        """Like :meth:`psql` but over the unix socket, where every role is trusted (auth-independent)."""
        return self._psql(sql, user=user, db=db, host=str(self.socket_dir), password=None)

    def dsn(self, user: str, password: str | None = None, db: str | None = None) -> str:
        """libpq keyword DSN; ``password`` defaults to the role's known password, ``db`` to ``user``."""
        if password is None:
            password = self.superuser_password if user == self.superuser else self.passwords.get(user, "")
        parts = {
            "host": self.host,
            "port": str(self.port),
            "user": user,
            "password": password,
            "dbname": db if db is not None else user,
        }
        return " ".join(f"{k}={_libpq_value(v)}" for k, v in parts.items())

    def url(self, user: str, password: str | None = None, db: str | None = None) -> str:
        """``postgresql://`` URL (for asyncpg and friends); defaults as in :meth:`dsn`."""
        if password is None:
            password = self.superuser_password if user == self.superuser else self.passwords.get(user, "")
        db = db if db is not None else user
        auth = f"{quote(user, safe='')}:{quote(password, safe='')}"
        return f"postgresql://{auth}@{self.host}:{self.port}/{quote(db)}"


def _write_pg_conf(
    datadir: Path, *, port: int, host: str, socket_dir: Path, auth: str, settings: dict[str, str]
) -> None:
    conf: dict[str, str] = {
        "listen_addresses": host,
        "port": str(port),
        "unix_socket_directories": str(socket_dir),
        "password_encryption": "md5" if auth == "md5" else "scram-sha-256",
        "fsync": "off",
        "synchronous_commit": "off",
        "full_page_writes": "off",
        "max_connections": "200",
        "logging_collector": "off",
        "log_line_prefix": "%m [%p] %e %q%u@%d ",
        # As users run theirs: streaming replication available, TLS on (server.crt/server.key in the datadir).
        "wal_level": "replica",
        "max_wal_senders": "10",
        "max_replication_slots": "10",
        "ssl": "on",
    }
    conf.update(settings)
    lines = ["# generated by devtools.servers; included from postgresql.conf"]
    lines += [f"{key} = {_pg_literal(value)}" for key, value in conf.items()]
    (datadir / "devserver.conf").write_text("\n".join(lines) + "\n")


def _initdb_template(folder: Path) -> None:
    """initdb ``folder``/data as the PostgreSQL account; its postgresql.conf includes devserver.conf.

    Authentication is set per server (pg_hba.conf, devserver.conf, the superuser's password) after the copy.
    """
    account = _pg_os_account()
    if account is not None:
        _make_traversable(folder, account)
        os.chown(folder, account.pw_uid, account.pw_gid)
    datadir = folder / "data"
    _run(
        _as_pg_user(
            [
                _pg_bin("initdb"),
                *("-D", str(datadir), f"--username={PG_OS_USER}", "--auth-local=trust", "--auth-host=trust"),
                *("--encoding=UTF8", "--no-locale", "--no-sync", "--no-instructions"),
            ]
        ),
        what="initdb",
        cwd=folder,
    )
    with (datadir / "postgresql.conf").open("a") as fh:
        fh.write("\ninclude = 'devserver.conf'\n")


def start_postgres(
    basedir: Path,
    *,
    users: dict[str, str] | None = None,
    auth: str = "scram-sha-256",
    settings: dict[str, str] | None = None,
    superuser_password: str = "postgres",
) -> PostgresInstance:
    """A fresh cluster (a copy of this process's initdb template) in a new directory under ``basedir``, started on
    a free 127.0.0.1 port.

    ``auth`` is the pg_hba method for TCP (scram-sha-256, md5, password or trust; unix socket
    is always trust); ``password_encryption`` follows it. For every ``users`` entry a LOGIN role
    with that password and a database of the same name owned by it are created. ``settings``
    are extra postgresql.conf parameters (they override ours, e.g. ``max_connections``).
    """
    if auth not in PG_AUTH_METHODS:
        raise ValueError(f"auth must be one of {PG_AUTH_METHODS}, not {auth!r}")
    host = "127.0.0.1"
    basedir = Path(basedir)
    basedir.mkdir(parents=True, exist_ok=True)
    instance_dir = Path(tempfile.mkdtemp(prefix="pg-", dir=basedir))
    datadir = instance_dir / "data"
    socket_dir = instance_dir / "run"
    _check_socket_path(socket_dir / ".s.PGSQL.65535.lock")
    socket_dir.mkdir()
    account = _pg_os_account()
    if account is not None:
        _make_traversable(instance_dir, account)
        for path in (instance_dir, socket_dir):
            os.chown(path, account.pw_uid, account.pw_gid)
    os.chmod(instance_dir, 0o700)
    _copy_datadir(_template("postgres", _initdb_template), datadir)

    hba = [
        "# generated by devtools.servers",
        "local   all          all                  trust",
        "local   replication  all                  trust",
        f"host    all          all   127.0.0.1/32   {auth}",
        f"host    all          all   ::1/128        {auth}",
        f"host    replication  all   127.0.0.1/32   {auth}",
        f"host    replication  all   ::1/128        {auth}",
    ]
    (datadir / "pg_hba.conf").write_text("\n".join(hba) + "\n")
    _write_certificate(datadir / "server.crt", datadir / "server.key", account)

    extra = dict(settings or {})
    last_error: DevServerError | None = None
    for _attempt in range(_RETRY_PORT_ATTEMPTS):
        port = free_port(host)
        _write_pg_conf(datadir, port=port, host=host, socket_dir=socket_dir, auth=auth, settings=extra)
        if account is not None:
            for path in (datadir / "devserver.conf", datadir / "pg_hba.conf"):
                os.chown(path, account.pw_uid, account.pw_gid)
        inst = PostgresInstance(
            datadir=datadir,
            port=port,
            host=host,
            superuser=PG_OS_USER,
            superuser_password=superuser_password,
            auth=auth,
        )
        try:
            inst.start(tcp_login=False)  # the superuser gets its password below
        except DevServerError as exc:
            inst.stop()
            if "already in use" not in _log_tail(inst.log_file, 20):
                raise
            last_error = exc  # lost the race for the port; pick another
            continue
        break
    else:
        assert last_error is not None
        raise last_error

    try:
        # Over the (trusted) socket so it works whatever ``auth`` is. Re-setting the superuser
        # password re-hashes it with this cluster's password_encryption (initdb used scram).
        stmts = [f"ALTER ROLE {_pg_ident(PG_OS_USER)} PASSWORD {_pg_literal(superuser_password)};"]
        for name, password in (users or {}).items():
            stmts.append(f"CREATE ROLE {_pg_ident(name)} LOGIN PASSWORD {_pg_literal(password)};")
            stmts.append(f"CREATE DATABASE {_pg_ident(name)} OWNER {_pg_ident(name)};")
        inst.psql_local("\n".join(stmts))
        inst.passwords.update(users or {})
        inst.psql("SELECT 1")  # the superuser can log in over TCP with its password
    except BaseException:
        inst.stop()
        raise
    return inst


def start_postgres_standby(
    primary: PostgresInstance, basedir: Path, *, settings: dict[str, str] | None = None, synchronous: bool = False
) -> PostgresInstance:
    """A streaming standby of ``primary``: ``pg_basebackup -R`` over loopback, started on a free port, TLS on.
    ``settings`` are extra postgresql.conf settings (e.g. ``recovery_min_apply_delay``: a standby that visibly lags).

    The standby shares the primary's roles and passwords (it is a physical copy) and has its own
    certificate. It replicates as the primary's superuser over TCP (the primary's replication hba).
    ``synchronous``: once it streams, the primary waits for it at every commit (``synchronous_standby_names``
    ``*``, ``synchronous_commit`` ``on``), so that what the primary acknowledged is on the standby.
    """
    host = primary.host
    basedir = Path(basedir)
    basedir.mkdir(parents=True, exist_ok=True)
    instance_dir = Path(tempfile.mkdtemp(prefix="pg-standby-", dir=basedir))
    datadir = instance_dir / "data"
    socket_dir = instance_dir / "run"
    _check_socket_path(socket_dir / ".s.PGSQL.65535.lock")
    socket_dir.mkdir()
    account = _pg_os_account()
    if account is not None:
        _make_traversable(instance_dir, account)
        for path in (instance_dir, socket_dir):
            os.chown(path, account.pw_uid, account.pw_gid)
    os.chmod(instance_dir, 0o700)
    env = _clean_env({"PGPASSWORD": primary.superuser_password, "PGSSLMODE": "disable", "PGCONNECT_TIMEOUT": "10"})
    _run(
        _as_pg_user(
            [
                _pg_bin("pg_basebackup"),
                *("-h", primary.host, "-p", str(primary.port), "-U", primary.superuser, "-w"),
                *("-D", str(datadir), "-R", "-X", "stream", "-c", "fast", "--no-sync"),
            ]
        ),
        what=f"pg_basebackup from port {primary.port}",
        env=env,
        cwd=instance_dir,
        timeout=TIMEOUT * 2,
    )
    _write_certificate(datadir / "server.crt", datadir / "server.key", account)
    last_error: DevServerError | None = None
    for _attempt in range(_RETRY_PORT_ATTEMPTS):
        port = free_port(host)
        _write_pg_conf(datadir, port=port, host=host, socket_dir=socket_dir, auth=primary.auth, settings={
            "hot_standby": "on", "wal_receiver_status_interval": "1s", "hot_standby_feedback": "on",
            **(settings or {})})
        if account is not None:
            os.chown(datadir / "devserver.conf", account.pw_uid, account.pw_gid)
        inst = PostgresInstance(
            datadir=datadir,
            port=port,
            host=host,
            superuser=primary.superuser,
            superuser_password=primary.superuser_password,
            auth=primary.auth,
            passwords=dict(primary.passwords),
        )
        try:
            inst.start()
        except DevServerError as exc:
            inst.stop()
            if "already in use" not in _log_tail(inst.log_file, 20):
                raise
            last_error = exc
            continue
        if synchronous:
            try:
                _make_synchronous(primary)
            except BaseException:
                inst.stop()
                raise
        return inst
    assert last_error is not None
    raise last_error


def _make_synchronous(primary: PostgresInstance, timeout: float = TIMEOUT) -> None:
    """The primary waits for its standby at every commit; returns once the standby is its synchronous one."""
    primary.psql_local("ALTER SYSTEM SET synchronous_standby_names = '*';\n"
                       "ALTER SYSTEM SET synchronous_commit = 'on';\nSELECT pg_reload_conf();")
    deadline = time.monotonic() + timeout
    while primary.psql_local("SELECT count(*) FROM pg_stat_replication WHERE sync_state = 'sync'") != "1":
        if time.monotonic() > deadline:
            raise DevServerError(f"the standby of port {primary.port} did not become synchronous in {timeout:g} s")
        time.sleep(0.1)


def _pg_promote(instance: PostgresInstance) -> None:
    """``pg_ctl promote -w``: the standby leaves recovery and accepts writes on a new timeline."""
    _run(
        _as_pg_user([_pg_bin("pg_ctl"), "-D", str(instance.datadir), "-w", "-t", str(int(TIMEOUT)), "-s", "promote"]),
        what=f"pg_ctl promote (port {instance.port})",
        cwd=instance.basedir,
        timeout=TIMEOUT + 5,
        log=instance.log_file,
    )


# --------------------------------------------------------------------------- MariaDB


_MARIADB_DEFAULTS: dict[str, str] = {
    "innodb-buffer-pool-size": "128M",
    "max-connections": "500",
    "innodb-flush-log-at-trx-commit": "0",
    "max-connect-errors": "1000000",
    "character-set-server": "utf8mb4",
    "collation-server": "utf8mb4_general_ci",
    # Replication is the normal case: a binary log with GTIDs (MariaDB logs GTIDs whenever log-bin is on).
    "server-id": "1",
    "binlog-format": "ROW",
    "log-slave-updates": "",
    "gtid-strict-mode": "ON",
    "gtid-domain-id": "0",
    "expire-logs-days": "1",
}


def _norm_option(name: str) -> str:
    return name.lstrip("-").replace("_", "-")


@dataclass(eq=False)
class MariaDBInstance:
    """A mariadbd in ``datadir`` (its parent holds the log, pid file and socket)."""

    datadir: Path
    port: int
    socket_path: Path
    host: str = "127.0.0.1"
    root_password: str = "root"
    #: Users created by :func:`start_mariadb` (each has ALL on a database of the same name).
    passwords: dict[str, str] = field(default_factory=dict)
    #: Extra ``--key=value`` server options (merged over our defaults; ``""`` means a bare ``--key``).
    settings: dict[str, str] = field(default_factory=dict)
    _process: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)
    _owner_pid: int = field(default=0, init=False, repr=False)

    @property
    def basedir(self) -> Path:
        return self.datadir.parent

    @property
    def log_file(self) -> Path:
        return self.basedir / "error.log"

    @property
    def pid_file(self) -> Path:
        return self.basedir / "mariadbd.pid"

    @property
    def pid(self) -> int | None:
        if self._process is not None:
            if self._process.poll() is None:
                return self._process.pid
            self._process = None
            return None
        pid = _read_pid(self.pid_file)
        return pid if pid is not None and _pid_alive(pid) else None

    @property
    def running(self) -> bool:
        return self.pid is not None

    def command(self) -> list[str]:
        """The mariadbd command line."""
        opts = dict(_MARIADB_DEFAULTS)
        opts.update({_norm_option(k): v for k, v in self.settings.items()})
        cmd = [
            MARIADBD,
            "--no-defaults",
            f"--datadir={self.datadir}",
            f"--port={self.port}",
            f"--bind-address={self.host}",
            f"--socket={self.socket_path}",
            f"--pid-file={self.pid_file}",
            f"--log-error={self.log_file}",
            f"--tmpdir={self.basedir / 'tmp'}",
            f"--log-bin={self.basedir / 'binlog' / 'mariadb-bin'}",
            f"--ssl-cert={self.basedir / 'server.crt'}",
            f"--ssl-key={self.basedir / 'server.key'}",
            "--skip-name-resolve",
        ]
        if os.geteuid() == 0:
            cmd.append("--user=root")
        cmd += [f"--{k}={v}" if v != "" else f"--{k}" for k, v in opts.items()]
        return cmd

    # -- lifecycle ------------------------------------------------------------------

    def start(self) -> None:
        """Start mariadbd (no-op if it runs) and wait until ``SELECT 1`` works over TCP as root."""
        if self.running:
            return
        (self.basedir / "tmp").mkdir(exist_ok=True)
        (self.basedir / "binlog").mkdir(exist_ok=True)
        if not (self.basedir / "server.key").exists():
            _write_certificate(self.basedir / "server.crt", self.basedir / "server.key")
        self.socket_path.unlink(missing_ok=True)  # stale after a SIGKILL; its reappearance means "bound"
        with (self.basedir / "stdout.log").open("ab") as out:
            try:
                self._process = subprocess.Popen(
                    self.command(),
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    cwd=self.basedir,
                    env=_clean_env(),
                    start_new_session=True,
                )
            except OSError as exc:
                raise DevServerError(f"cannot run {MARIADBD}: {exc}") from exc
        self._owner_pid = os.getpid()
        atexit.register(self._stop_at_exit)
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise

    def wait_ready(self, timeout: float = TIMEOUT) -> None:
        """Wait for the unix socket (created only after the TCP bind worked), then ``SELECT 1`` over TCP.

        Checking the socket first keeps us from talking to whoever else may listen on the port.
        """
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self._process is not None and self._process.poll() is not None:
                raise DevServerError(
                    f"mariadbd exited with code {self._process.returncode} during startup\n"
                    f"--- {self.log_file} (tail) ---\n{_log_tail(self.log_file)}"
                )
            try:
                if not self.socket_path.exists():
                    raise DevServerError(f"{self.socket_path} does not exist yet")
                with socket.create_connection((self.host, self.port), timeout=1.0):
                    pass
                self.sql("SELECT 1")
                return
            except (OSError, DevServerError) as exc:
                last = exc
                time.sleep(0.05)
        raise DevServerError(
            f"MariaDB on {self.host}:{self.port} not ready after {timeout:.0f}s: {last}\n"
            f"--- {self.log_file} (tail) ---\n{_log_tail(self.log_file)}"
        )

    def _stop_at_exit(self) -> None:
        if os.getpid() == self._owner_pid:  # not in a forked child that inherited the atexit hook
            self.stop()

    def stop(self) -> None:
        """SIGTERM and wait, then SIGKILL. Idempotent."""
        atexit.unregister(self._stop_at_exit)
        proc, self._process = self._process, None
        if proc is not None:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(TIMEOUT)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(TIMEOUT)
        else:
            pid = _read_pid(self.pid_file)
            if (
                pid is not None
                and _pid_alive(pid)
                and not _kill_and_wait(pid, signal.SIGTERM, TIMEOUT)
                and not _kill_and_wait(pid, signal.SIGKILL, 5.0)
            ):
                raise DevServerError(f"mariadbd {pid} survived SIGKILL")
        with contextlib.suppress(OSError):
            self.pid_file.unlink()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # -- clients --------------------------------------------------------------------

    def sql(self, sql: str, *, user: str = "root", db: str | None = None, column_names: bool = False) -> str:
        """Run ``sql`` with the ``mariadb`` client (``-N -B``; ``-B`` with ``column_names``) over TCP; return stdout.

        root authenticates with :attr:`root_password`, users made by :func:`start_mariadb`
        with theirs. Raises :class:`DevServerError` on any error.
        """
        password = self.root_password if user == "root" else self.passwords.get(user, "")
        env = _clean_env({"MYSQL_PWD": password} if password else None)
        cmd = [MARIADB_CLIENT, "--no-defaults", "--protocol=TCP", "-h", self.host, "-P", str(self.port)]
        cmd += ["-u", user, "-B", "--connect-timeout=10"] + ([] if column_names else ["-N"])
        if db is not None:
            cmd += ["-D", db]
        return _run(cmd, what=f"mariadb as {user}", env=env, input_text=sql).rstrip("\n")

    # -- replication ----------------------------------------------------------------

    def wait_replicating(self, timeout: float = TIMEOUT) -> None:
        """Wait until both replication threads run (raise with the last error if they do not)."""
        deadline = time.monotonic() + timeout
        status: dict[str, str] = {}
        while time.monotonic() < deadline:
            status = self.slave_status()
            if status.get("Slave_IO_Running") == "Yes" and status.get("Slave_SQL_Running") == "Yes":
                return
            time.sleep(0.05)
        errors = {k: v for k, v in status.items() if k.endswith("_Error") and v}
        raise DevServerError(f"replica on {self.host}:{self.port} not replicating after {timeout:.0f}s: {errors}")

    def slave_status(self) -> dict[str, str]:
        """``SHOW SLAVE STATUS`` as a dict (empty when not a replica)."""
        lines = self.sql("SHOW SLAVE STATUS", column_names=True).split("\n")
        if len(lines) < 2:
            return {}
        return dict(zip(lines[0].split("\t"), lines[1].split("\t"), strict=True))

    def wait_caught_up(self, position: str, timeout: float = TIMEOUT) -> None:
        """Wait until this replica has applied the GTID position ``position`` (MASTER_GTID_WAIT)."""
        result = self.sql(f"SELECT MASTER_GTID_WAIT({_my_literal(position)}, {timeout})")
        if result != "0":
            raise DevServerError(f"replica on {self.host}:{self.port} did not reach {position} in {timeout:.0f}s")

    def pause_replay(self) -> None:
        """Stop applying replicated events (the IO thread keeps receiving them)."""
        self.sql("STOP SLAVE SQL_THREAD")

    def resume_replay(self) -> None:
        self.sql("START SLAVE SQL_THREAD")

    def promote(self, timeout: float = TIMEOUT) -> None:
        """Make this replica a writer: stop receiving, let the SQL thread (when it runs) apply what was received
        (RESET SLAVE ALL would delete that relay log: acknowledged semi-synchronous commits with it), then stop
        replication, forget the primary, clear read_only."""
        status = self.slave_status()
        if status.get("Slave_SQL_Running") == "Yes":
            self.sql("STOP SLAVE IO_THREAD")
            received = self.slave_status().get("Gtid_IO_Pos", "")
            if received:
                self.wait_caught_up(received, timeout)
        self.sql("STOP SLAVE;\nRESET SLAVE ALL;\nSET GLOBAL read_only = OFF;")

    def connect_kwargs(
        self, user: str = "root", password: str | None = None, db: str | None = None
    ) -> dict[str, object]:
        """Keyword arguments for PyMySQL / mysql-connector ``connect()``.

        ``password`` defaults to the user's known password, ``db`` to ``user`` (none for root).
        """
        if password is None:
            password = self.root_password if user == "root" else self.passwords.get(user, "")
        kwargs: dict[str, object] = {"host": self.host, "port": self.port, "user": user, "password": password}
        database = db if db is not None else (None if user == "root" else user)
        if database is not None:
            kwargs["database"] = database
        return kwargs

    def url(self, user: str = "root", password: str | None = None, db: str | None = None) -> str:
        """``mysql://user:password@host:port/db`` (``db`` defaults to ``user``, none for root)."""
        if password is None:
            password = self.root_password if user == "root" else self.passwords.get(user, "")
        database = db if db is not None else ("" if user == "root" else user)
        auth = f"{quote(user, safe='')}:{quote(password, safe='')}"
        return f"mysql://{auth}@{self.host}:{self.port}/{quote(database)}"


def _install_db_template(folder: Path) -> None:
    """mariadb-install-db ``folder``/data (root@localhost, 127.0.0.1 and ::1 without a password; no test db).

    Its own temporary folder: concurrent installs would collide on /tmp/#sql-temptable-* files.
    """
    tmpdir = folder / "tmp"
    tmpdir.mkdir()
    cmd = [
        MARIADB_INSTALL_DB,
        "--no-defaults",
        f"--datadir={folder / 'data'}",
        "--auth-root-authentication-method=normal",
    ]
    cmd += ["--skip-test-db", "--skip-name-resolve", f"--tmpdir={tmpdir}"]
    if os.geteuid() == 0:
        cmd.append("--user=root")
    (folder / "install.log").write_text(_run(cmd, what="mariadb-install-db", cwd=folder, timeout=TIMEOUT * 2))


def start_mariadb(
    basedir: Path,
    *,
    users: dict[str, str] | None = None,
    settings: dict[str, str] | None = None,
    root_password: str = "root",
) -> MariaDBInstance:
    """A fresh datadir (a copy of this process's mariadb-install-db template) under ``basedir``, mariadbd started on
    a free 127.0.0.1 port.

    root gets ``root_password`` for localhost, 127.0.0.1, ::1 and '%'. For every ``users`` entry
    ``user@'%'`` is created (mysql_native_password) with ALL on a database of the same name
    plus the global PROCESS privilege (to see the whole processlist). ``settings`` are extra
    mariadbd ``--key=value`` options overriding ours (e.g. ``max_connections``).
    """
    host = "127.0.0.1"
    basedir = Path(basedir)
    basedir.mkdir(parents=True, exist_ok=True)
    instance_dir = Path(tempfile.mkdtemp(prefix="mariadb-", dir=basedir))
    datadir = instance_dir / "data"
    socket_path = instance_dir / "mysqld.sock"
    _check_socket_path(socket_path)
    _copy_datadir(_template("mariadb", _install_db_template), datadir)

    last_error: DevServerError | None = None
    for _attempt in range(_RETRY_PORT_ATTEMPTS):
        # Freshly installed: root@127.0.0.1 exists with an empty password.
        inst = MariaDBInstance(
            datadir=datadir,
            port=free_port(host),
            socket_path=socket_path,
            host=host,
            root_password="",
            settings=dict(settings or {}),
        )
        try:
            inst.start()
        except DevServerError as exc:
            if "already in use" not in _log_tail(inst.log_file, 30):
                raise
            last_error = exc  # lost the race for the port; pick another
            continue
        break
    else:
        assert last_error is not None
        raise last_error

    try:
        hosts = inst.sql("SELECT host FROM mysql.user WHERE user = 'root'").split("\n")
        pw = _my_literal(root_password)
        stmts = []
        for h in hosts:
            if h in ("localhost", "127.0.0.1", "::1"):
                stmts.append(f"ALTER USER 'root'@{_my_literal(h)} IDENTIFIED BY {pw};")
            elif h and h != "%":
                stmts.append(f"DROP USER 'root'@{_my_literal(h)};")  # root@<hostname>: useless here
        stmts.append(f"CREATE USER IF NOT EXISTS 'root'@'%' IDENTIFIED BY {pw};")
        stmts.append("GRANT ALL PRIVILEGES ON *.* TO 'root'@'%' WITH GRANT OPTION;")
        for name, password in (users or {}).items():
            account = f"{_my_literal(name)}@'%'"
            hashed = f"PASSWORD({_my_literal(password)})"
            stmts.append(f"CREATE USER {account} IDENTIFIED VIA mysql_native_password USING {hashed};")
            stmts.append(f"CREATE DATABASE IF NOT EXISTS {_my_ident(name)};")
            stmts.append(f"GRANT ALL PRIVILEGES ON {_my_ident(name)}.* TO {account};")
            stmts.append(f"GRANT PROCESS ON *.* TO {account};")
        inst.sql("\n".join(stmts))
        inst.root_password = root_password
        inst.passwords.update(users or {})
        inst.sql("SELECT 1")  # root over TCP with the new password
    except BaseException:
        inst.stop()
        raise
    return inst


REPLICATION_USER = "replicator"
SEMI_SYNC_TIMEOUT_MS = 3_600_000  # a semi-synchronous primary waits this long for its replica's acknowledgement


def _wait_semi_sync_client(primary: MariaDBInstance, timeout: float = TIMEOUT) -> None:
    """Wait until a semi-synchronous replica is connected to ``primary`` and semi-sync is on."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = dict(line.split("\t", 1) for line in primary.sql(
            "SHOW GLOBAL STATUS WHERE Variable_name IN "
            "('Rpl_semi_sync_master_clients', 'Rpl_semi_sync_master_status')").split("\n") if line)
        if status.get("Rpl_semi_sync_master_clients", "0") != "0" and status.get("Rpl_semi_sync_master_status") == "ON":
            return
        time.sleep(0.05)
    raise DevServerError(f"no semi-synchronous replica connected to {primary.host}:{primary.port} in {timeout:.0f}s")


def start_mariadb_replica(
    primary: MariaDBInstance,
    basedir: Path,
    *,
    server_id: int = 2,
    settings: dict[str, str] | None = None,
    replication_password: str = "replicator-secret",
    semi_sync: bool = False,
) -> MariaDBInstance:
    """A read-only GTID replica of ``primary`` (a fresh one: see below) under ``basedir``.

    The replica is made by :func:`start_mariadb` with the primary's root password and users (so it
    holds what a fresh primary holds), its own binary log emptied, then set to replicate from the
    primary's current ``gtid_binlog_pos`` (``MASTER_USE_GTID=slave_pos``) as ``replicator``, a user
    with REPLICATION SLAVE made on the primary (and so replicated). Tables the primary already has
    are not copied: call it before writing data, and with nothing writing to the primary meanwhile.

    ``semi_sync``: the primary commits only once this replica has its transaction in its relay log
    (``AFTER_SYNC``, with a timeout long enough that it never falls back to asynchronous replication): an
    acknowledged commit survives the primary's loss, provided the promotion applies the relay log
    (:meth:`MariaDBInstance.promote` does).
    """
    opts = {"server-id": str(server_id), **(settings or {})}
    if semi_sync:
        opts["rpl-semi-sync-slave-enabled"] = "ON"
    replica = start_mariadb(basedir, users=dict(primary.passwords), settings=opts,
                            root_password=primary.root_password)
    try:
        position = primary.sql("SELECT @@GLOBAL.gtid_binlog_pos")
        account = f"{_my_literal(REPLICATION_USER)}@'%'"
        primary.sql(
            f"CREATE USER IF NOT EXISTS {account} IDENTIFIED BY {_my_literal(replication_password)};\n"
            f"GRANT REPLICATION SLAVE, REPLICATION CLIENT ON *.* TO {account};"
        )
        if semi_sync:
            primary.sql(
                f"SET GLOBAL rpl_semi_sync_master_timeout = {SEMI_SYNC_TIMEOUT_MS};\n"
                "SET GLOBAL rpl_semi_sync_master_wait_point = AFTER_SYNC;\n"
                "SET GLOBAL rpl_semi_sync_master_enabled = ON;"
            )
        replica.sql(
            "RESET MASTER;\n"  # its own setup is not history the primary has: no GTIDs of server_id here
            f"SET GLOBAL gtid_slave_pos = {_my_literal(position)};\n"
            f"CHANGE MASTER TO MASTER_HOST={_my_literal(primary.host)}, MASTER_PORT={primary.port}, "
            f"MASTER_USER={_my_literal(REPLICATION_USER)}, MASTER_PASSWORD={_my_literal(replication_password)}, "
            "MASTER_CONNECT_RETRY=1, MASTER_USE_GTID=slave_pos;\n"
            "SET GLOBAL read_only = ON;\n"
            "START SLAVE;"
        )
        replica.wait_replicating()
        if semi_sync:
            _wait_semi_sync_client(primary)
    except BaseException:
        replica.stop()
        raise
    return replica
