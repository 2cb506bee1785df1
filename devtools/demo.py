"""`dbproxy demo`: a throwaway replicated PostgreSQL pair and MariaDB pair, and the proxy in front of them."""

from __future__ import annotations

import logging
import secrets as random_source
import shlex
import shutil
import signal
import time
from collections.abc import Callable, Coroutine
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

import uvloop

from devtools.servers import (
    DevServerError,
    MariaDBInstance,
    PostgresInstance,
    start_mariadb,
    start_mariadb_replica,
    start_postgres,
    start_postgres_standby,
)
from proxy.config import Config, parse_config
from proxy.startup import StartupError

log = logging.getLogger(__name__)

Serve = Callable[[Config, str], Coroutine[Any, Any, None]]  # serve a configuration, printing a ready message

NEEDS = (" (the demo needs the PostgreSQL and MariaDB server packages;"
         " Debian: apt-get install postgresql mariadb-server)")
USER = "app"
MONITOR_USER = "monitor"
MONITOR_INTERVAL = 1.0  # seconds between the proxy's probes of each instance
MAX_CONNECTIONS = 10  # backend connections per endpoint
PG_NAMES = ("pg1", "pg2")
MARIADB_NAMES = ("mariadb1", "mariadb2")


@dataclass
class DemoPorts:
    """The proxy's client-facing ports: a read_write and a read_only endpoint per engine."""

    postgresql: int
    postgresql_read_only: int
    mysql: int
    mysql_read_only: int


@dataclass
class Passwords:
    """Made at each start: the demo user's, the administrators', the monitor's and MariaDB's replication user's."""

    user: str
    admin: str
    monitor: str
    replication: str

    @classmethod
    def fresh(cls) -> Passwords:
        return cls(*(random_source.token_urlsafe(12) for _ in range(4)))


Instance = TypeVar("Instance", PostgresInstance, MariaDBInstance)


@dataclass
class Pair(Generic[Instance]):
    """A writer and the reader replicating from it (None until it has started)."""

    writer: Instance
    reader: Instance | None = None

    @property
    def started_reader(self) -> Instance:
        assert self.reader is not None, "the reader has not started"
        return self.reader

    def stop(self) -> None:
        for instance in (self.reader, self.writer):
            if instance is not None:
                instance.stop()


def start_postgres_pair(folder: Path, passwords: Passwords) -> Pair[PostgresInstance]:
    """A PostgreSQL writer with the demo user and the monitor (pg_monitor), and a streaming standby of it."""
    writer = start_postgres(folder, users={USER: passwords.user}, superuser_password=passwords.admin)
    pair = Pair(writer)
    try:
        writer.psql_local(f"CREATE ROLE {MONITOR_USER} LOGIN PASSWORD '{passwords.monitor}' IN ROLE pg_monitor")
        pair.reader = start_postgres_standby(writer, folder)
    except BaseException:
        pair.stop()
        raise
    return pair


def start_mariadb_pair(folder: Path, passwords: Passwords) -> Pair[MariaDBInstance]:
    """A MariaDB writer with the demo user, a GTID replica of it, and the monitor (REPLICA MONITOR) on both."""
    writer = start_mariadb(folder / "1", users={USER: passwords.user}, root_password=passwords.admin)
    pair = Pair(writer)
    try:
        replica = pair.reader = start_mariadb_replica(writer, folder / "2", replication_password=passwords.replication)
        writer.sql(f"CREATE USER {MONITOR_USER}@'%' IDENTIFIED BY '{passwords.monitor}';\n"
                   f"GRANT REPLICA MONITOR, REPLICATION CLIENT ON *.* TO {MONITOR_USER}@'%';")
        replica.wait_caught_up(writer.sql("SELECT @@gtid_binlog_pos"))
    except BaseException:
        pair.stop()
        raise
    return pair


def start_pairs(folder: Path, passwords: Passwords) -> tuple[Pair[PostgresInstance], Pair[MariaDBInstance]]:
    """Both pairs, side by side; when one fails to start, or the start is interrupted, everything started stops."""
    executor = ThreadPoolExecutor(2)
    pg_start = executor.submit(start_postgres_pair, folder / "postgresql", passwords)
    mariadb_start = executor.submit(start_mariadb_pair, folder / "mariadb", passwords)
    starts: list[Future[Any]] = [pg_start, mariadb_start]
    try:
        wait(starts)
    except BaseException:  # Ctrl-C or SIGTERM: let the starts finish (each is bounded), then stop what they made
        print("interrupted: stopping the databases started so far ...", flush=True)
        executor.shutdown(wait=True)
        _stop_started(starts)
        raise
    executor.shutdown(wait=True)
    problems: list[str] = []
    for future, engine in zip(starts, ("PostgreSQL", "MariaDB"), strict=True):
        exc = future.exception()
        if isinstance(exc, DevServerError):
            problems.append(f"the demo's {engine} did not start{NEEDS}: {exc}")
        elif exc is not None:
            problems.append(f"the demo's {engine} did not start: {type(exc).__name__}: {exc}")
    if problems:
        _stop_started(starts)
        raise StartupError("; ".join(problems))
    return pg_start.result(), mariadb_start.result()


def _stop_started(starts: list[Future[Any]]) -> None:
    for future in starts:
        if future.done() and future.exception() is None:
            future.result().stop()


class Interrupted(Exception):
    """SIGTERM while the databases start: stop them as Ctrl-C would."""


def _interrupt(signum: int, frame: object) -> None:
    raise Interrupted(f"signal {signum}")


def demo_config(ports: DemoPorts, pg: Pair[PostgresInstance], mariadb: Pair[MariaDBInstance],
                secrets_file: Path) -> Config:
    """A cluster per engine with both instances, monitored every second, and its two endpoints."""
    def cluster(names: tuple[str, str], pair: Pair[Any]) -> dict[str, Any]:
        reader = pair.started_reader
        return {
            "instances": [{"name": names[0], "host": pair.writer.host, "port": pair.writer.port, "role": "writer"},
                          {"name": names[1], "host": reader.host, "port": reader.port, "role": "reader"}],
            "monitor_interval": MONITOR_INTERVAL, "monitor_user": MONITOR_USER,
            "pool": {"max_connections": MAX_CONNECTIONS},
        }

    return parse_config({
        "secrets": {"file": str(secrets_file)},
        "postgresql": {
            "clusters": {"pg": cluster(PG_NAMES, pg)},
            "endpoints": {"pg_rw": {"port": ports.postgresql, "cluster": "pg", "role": "read_write"},
                          "pg_ro": {"port": ports.postgresql_read_only, "cluster": "pg", "role": "read_only"}},
        },
        "mysql": {
            "clusters": {"mariadb": cluster(MARIADB_NAMES, mariadb)},
            "endpoints": {"mysql_rw": {"port": ports.mysql, "cluster": "mariadb", "role": "read_write"},
                          "mysql_ro": {"port": ports.mysql_read_only, "cluster": "mariadb", "role": "read_only"}},
        },
    }, "demo")


def _literal(text: object) -> str:
    """`text` as it reads once the ready message is formatted (braces doubled)."""
    return str(text).replace("{", "{{").replace("}", "}}")


def _psql(port: int | str, user: str, password: str, dbname: str) -> str:
    return f'psql "host=127.0.0.1 port={port} user={user} dbname={dbname} password={password}"'


def _mariadb(port: int | str, user: str, password: str, database: str = "") -> str:
    return f"mariadb -h 127.0.0.1 -P {port} -u {user} -p{password}" + (f" {database}" if database else "")


def banner(pg: Pair[PostgresInstance], mariadb: Pair[MariaDBInstance], passwords: Passwords, folder: Path,
           started_in: float) -> str:
    """The ready message: the listeners (filled in by `serve`), how to connect, the instances, how to fail over."""
    user, admin = USER, passwords.admin
    pg_writer, pg_reader = pg.writer, pg.started_reader
    maria_writer, maria_reader = mariadb.writer, mariadb.started_reader
    instances = [
        (PG_NAMES[0], "writer", pg_writer.port, pg_writer.pid, pg_writer.datadir,
         _psql(pg_writer.port, pg_writer.superuser, admin, "postgres")),
        (PG_NAMES[1], "reader", pg_reader.port, pg_reader.pid, pg_reader.datadir,
         _psql(pg_reader.port, pg_reader.superuser, admin, "postgres")),
        (MARIADB_NAMES[0], "writer", maria_writer.port, maria_writer.pid, maria_writer.datadir,
         _mariadb(maria_writer.port, "root", admin)),
        (MARIADB_NAMES[1], "reader", maria_reader.port, maria_reader.pid, maria_reader.datadir,
         _mariadb(maria_reader.port, "root", admin)),
    ]
    rows = "\n".join(f"  {name:<9} {role:<7} 127.0.0.1:{port:<6} pid {pid:<8} {_literal(datadir)}\n"
                     f"            {login}"
                     for name, role, port, pid, datadir, login in instances)
    pg_promote = _psql(pg_reader.port, pg_reader.superuser, admin, "postgres") + ' -c "SELECT pg_promote()"'
    maria_promote = (_mariadb(maria_reader.port, "root", admin)
                     + ' -e "STOP SLAVE; RESET SLAVE ALL; SET GLOBAL read_only = OFF"')
    return (
        "dbproxy ready: {listeners}\n\n"
        f"The demo started in {started_in:.1f} s: a PostgreSQL writer ({PG_NAMES[0]}) with a streaming standby "
        f"({PG_NAMES[1]}),\na MariaDB writer ({MARIADB_NAMES[0]}) with a GTID replica ({MARIADB_NAMES[1]}), and "
        f"dbproxy in front of them, checking every\ninstance's role each {MONITOR_INTERVAL:g} s. Each endpoint "
        f"shares at most {MAX_CONNECTIONS} backend connections among its clients; TLS is on\n(a self-signed "
        f"certificate made at start). The demo user is {user}, password {passwords.user}.\n\n"
        "PostgreSQL, read_write endpoint (the writer) and read_only endpoint (the standby):\n\n"
        f"  {_psql('{pg_rw}', user, passwords.user, user)}\n"
        f"  {_psql('{pg_ro}', user, passwords.user, user)}\n"
        f"  PGPASSWORD={passwords.user} pgbench -i -h 127.0.0.1 -p {{pg_rw}} -U {user} {user}\n"
        f"  PGPASSWORD={passwords.user} pgbench -S -c 50 -T 10 -h 127.0.0.1 -p {{pg_ro}} -U {user} {user}\n\n"
        "MariaDB, read_write endpoint (the writer) and read_only endpoint (the replica):\n\n"
        f"  {_mariadb('{mysql_rw}', user, passwords.user, user)}\n"
        f"  {_mariadb('{mysql_ro}', user, passwords.user, user)}\n\n"
        "The instances; administrators log in to them directly, not through the proxy:\n\n"
        f"{rows}\n\n"
        "Try a failover: with clients on a read_write endpoint, kill the writer (as a crash would), then promote\n"
        "the reader. While there is no writer, new transactions wait; within a few tenths of a second of the\n"
        "promotion the endpoint sends them to the new writer. Idle clients keep their connections; a statement\n"
        "that was running on the crashed writer fails.\n\n"
        f"  PostgreSQL: kill -9 {pg_writer.pid} $(pgrep -P {pg_writer.pid})    "
        f"# {PG_NAMES[0]}, the writer, and its backends\n"
        f"              {pg_promote}    # {PG_NAMES[1]}\n"
        f"  MariaDB:    kill -9 {maria_writer.pid}    # {MARIADB_NAMES[0]}, the writer\n"
        f"              {maria_promote}    # {MARIADB_NAMES[1]}\n\n"
        f"Press Ctrl-C to stop dbproxy and the four databases. Their data stays in {_literal(folder)} until the next\n"
        f"`dbproxy demo` starts afresh; remove it with: rm -rf {_literal(shlex.quote(str(folder)))}"
    )


def run_demo(folder: Path, ports: DemoPorts, serve: Serve) -> None:
    """Start the databases, write a secrets file into `folder`, serve (the command line's `serve`) until Ctrl-C."""
    folder = folder.resolve()
    for name in ("db", "postgresql", "mariadb"):  # "db": where earlier versions kept their PostgreSQL
        shutil.rmtree(folder / name, ignore_errors=True)
    folder.mkdir(parents=True, exist_ok=True)
    passwords = Passwords.fresh()
    print("starting a throwaway PostgreSQL writer and standby, and a MariaDB writer and replica, "
          "for the demo ...", flush=True)
    began = time.monotonic()
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        pg, mariadb = start_pairs(folder, passwords)
    except KeyboardInterrupt:
        raise SystemExit(130) from None
    except Interrupted:
        raise SystemExit(128 + signal.SIGTERM) from None
    finally:
        signal.signal(signal.SIGTERM, previous)
    try:
        secrets_file = folder / "secrets.toml"
        secrets_file.unlink(missing_ok=True)
        secrets_file.touch(mode=0o600)
        secrets_file.write_text(f'[users]\n{USER} = "{passwords.user}"\n{MONITOR_USER} = "{passwords.monitor}"\n')
        config = demo_config(ports, pg, mariadb, secrets_file)
        uvloop.run(serve(config, banner(pg, mariadb, passwords, folder, time.monotonic() - began)))
    finally:
        mariadb.stop()
        pg.stop()
