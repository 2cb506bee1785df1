"""Replicated clusters for failover tests: a PostgreSQL primary with a standby, a MariaDB primary with a replica
and a monitor user, the proxy config and process for such a cluster, and the times of proxy log lines."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol, TypeVar

import psycopg
import pymysql
import pytest

from devtools.servers import (
    MariaDBInstance,
    PostgresInstance,
    free_port,
    start_mariadb,
    start_mariadb_replica,
    start_postgres,
    start_postgres_standby,
)
from support import ProxyProcess, write_config

PG_PORT_TABLE = "CREATE TABLE t (id serial PRIMARY KEY, port int)"  # rows saying which server wrote them
MY_PORT_TABLE = "CREATE TABLE app.t (id INT AUTO_INCREMENT PRIMARY KEY, port INT);"
MONITOR = "monitor"  # the MariaDB monitor_user (PostgreSQL clusters use the superuser)
MONITOR_PASSWORD = "Monitor-Secret-7c1d"
MONITOR_GRANTS = "REPLICA MONITOR"  # enough to probe
PROMOTER_GRANTS = "REPLICA MONITOR, REPLICATION SLAVE ADMIN, RELOAD, READ_ONLY ADMIN"  # and to promote a replica


@contextmanager
def postgres_pair(tmp_path: Path, setup_sql: str = PG_PORT_TABLE, *, settings: dict[str, str] | None = None,
                  standby_settings: dict[str, str] | None = None,
                  synchronous: bool = False) -> Iterator[tuple[PostgresInstance, PostgresInstance]]:
    """A PostgreSQL primary (user app, `setup_sql` run in database app) and its streaming standby."""
    primary = start_postgres(tmp_path, users={"app": "app-secret"}, settings=settings)
    try:
        if setup_sql:
            primary.psql(setup_sql, db="app", user="app")
        standby = start_postgres_standby(primary, tmp_path, settings=standby_settings, synchronous=synchronous)
        try:
            yield primary, standby
        finally:
            standby.stop()
    finally:
        primary.stop()


def monitor_user_sql(grants: str = MONITOR_GRANTS) -> str:
    """The MariaDB statements creating the MONITOR user with `grants` (run on a primary: they replicate)."""
    return (f"CREATE USER {MONITOR}@'%' IDENTIFIED BY '{MONITOR_PASSWORD}';\n"
            f"GRANT {grants} ON *.* TO {MONITOR}@'%';\n")


@contextmanager
def mariadb_pair(tmp_path: Path, setup_sql: str = MY_PORT_TABLE, *, grants: str = MONITOR_GRANTS,
                 **replica_options: Any) -> Iterator[tuple[MariaDBInstance, MariaDBInstance]]:
    """A MariaDB primary (user app, `setup_sql` run as root) and its replica, caught up, with the MONITOR user."""
    primary = start_mariadb(tmp_path / "primary", users={"app": "app-secret"})
    replica = None
    try:
        replica = start_mariadb_replica(primary, tmp_path / "replica", **replica_options)
        primary.sql(monitor_user_sql(grants) + setup_sql)
        replica.wait_caught_up(primary.sql("SELECT @@gtid_binlog_pos"))
        yield primary, replica
    finally:
        if replica is not None:
            replica.stop()
        primary.stop()


def monitor_secret(monkeypatch: pytest.MonkeyPatch, primary: PostgresInstance | MariaDBInstance) -> str:
    """Give the proxy the monitor_user's password (from the environment); returns the user's name."""
    if isinstance(primary, PostgresInstance):
        user, password = primary.superuser, primary.superuser_password
    else:
        user, password = MONITOR, MONITOR_PASSWORD
    monkeypatch.setenv("DBPROXY_PASSWORD_" + user.upper(), password)
    return user


def cluster_config(primary: PostgresInstance | MariaDBInstance, replica: PostgresInstance | MariaDBInstance, *,
                   pool: dict[str, Any] | None = None, endpoints: dict[str, str | dict[str, Any]] | None = None,
                   login_timeout: float | None = 3.0, names: bool = False, roles: bool = True,
                   **cluster: Any) -> dict[str, dict[str, Any]]:
    """The config of one proxy worker with cluster main (the primary, then the replica) and its endpoints (name ->
    role, or -> the endpoint's keys with its role; default: rw, read_write); `cluster` adds keys to the cluster
    (monitor_interval, ...)."""
    engine = "postgresql" if isinstance(primary, PostgresInstance) else "mysql"
    instances: list[dict[str, Any]] = []
    for name, role, instance in (("one", "writer", primary), ("two", "reader", replica)):
        entry: dict[str, Any] = {"name": name} if names else {}
        entry.update({"host": instance.host, "port": instance.port})
        if roles:
            entry["role"] = role
        instances.append(entry)
    server: dict[str, Any] = {"log_level": "info"}
    if login_timeout is not None:
        server["client_login_timeout"] = login_timeout
    server["workers"] = 1
    sections: dict[str, dict[str, Any]] = {"server": server, "secrets": {"file": "secrets.toml"}}
    if engine == "mysql":
        sections["postgresql"] = {"enabled": False}
    if pool is not None:
        sections[f"{engine}.pool"] = pool
    sections[f"{engine}.clusters.main"] = {"instances": instances, **cluster}
    for endpoint, keys in (endpoints or {"rw": "read_write"}).items():
        sections[f"{engine}.endpoints.{endpoint}"] = {"port": free_port(), "cluster": "main",
                                                      **({"role": keys} if isinstance(keys, str) else keys)}
    return sections


@contextmanager
def running_proxy(folder: Path, sections: dict[str, dict[str, Any]]) -> Iterator[ProxyProcess]:
    """The proxy started with `sections` written to `folder` (created), stopped at the end."""
    folder.mkdir()
    process = ProxyProcess(write_config(folder, sections), folder / "proxy.log")
    process.start()
    try:
        yield process
    finally:
        process.stop()


def kill_mariadb(primary: MariaDBInstance) -> None:
    """SIGKILL a MariaDB server (a crash) and reap it."""
    pid = primary.pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    primary.stop()  # reaps the killed process


def log_time(line: str) -> float:
    """The wall-clock time of a proxy log line (its asctime prefix)."""
    return datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()


def log_monotonic(line: str) -> float:
    """The time.monotonic() reading at the wall-clock time of a proxy log line."""
    return log_time(line) - time.time() + time.monotonic()


def connect_pg(proxy: ProxyProcess, endpoint: str = "rw", autocommit: bool = False) -> psycopg.Connection[Any]:
    """A psycopg connection as app through an endpoint of the proxy."""
    return psycopg.connect(host="127.0.0.1", port=proxy.ports[endpoint], user="app", password="app-secret",
                           dbname="app", connect_timeout=10, autocommit=autocommit)


def connect_my(proxy: ProxyProcess, endpoint: str = "rw") -> pymysql.Connection[Any]:
    """A PyMySQL connection (autocommit) as app through an endpoint of the proxy."""
    return pymysql.connect(host="127.0.0.1", port=proxy.ports[endpoint], user="app", password="app-secret",
                           database="app", autocommit=True)


class LoopingWriter(Protocol):
    conn: Any

    def run(self, stop: threading.Event) -> None: ...


Looping = TypeVar("Looping", bound=LoopingWriter)


def writers_around(writers: list[Looping], event: Callable[[], float], after: float) -> float:
    """Run `writers` in threads from 0.5 s before `event` (which returns when the new writer accepts writes) until
    `after` seconds after it, then close their connections; returns what `event` returned."""
    stop = threading.Event()
    threads = [threading.Thread(target=w.run, args=(stop,), daemon=True) for w in writers]
    try:
        for thread in threads:
            thread.start()
        time.sleep(0.5)
        promoted_at = event()
        time.sleep(after)
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
    for w in writers:
        w.conn.close()
    return promoted_at


@dataclass
class Record:
    started: float
    ended: float
    port: int | None = None  # inet_server_port() of a committed transaction
    error: str = ""
    sqlstate: str = ""


@dataclass
class PortWriter:
    """One client connection through the proxy running short write transactions into table t in a loop."""

    connect: Callable[[], psycopg.Connection[tuple[int]]]
    records: list[Record] = field(default_factory=list)
    closed: list[Record] = field(default_factory=list)  # the transactions after which the connection was gone

    def __post_init__(self) -> None:
        self.conn = self.connect()

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            started = time.monotonic()
            try:
                with self.conn.transaction():
                    row = self.conn.execute("INSERT INTO t (port) SELECT inet_server_port() RETURNING port").fetchone()
                assert row is not None
                self.records.append(Record(started, time.monotonic(), port=row[0]))
            except psycopg.Error as exc:
                self.records.append(Record(started, time.monotonic(), error=f"{type(exc).__name__}: {exc}",
                                           sqlstate=exc.sqlstate or ""))
                if self.conn.closed:  # as an application does: note it and connect again
                    self.closed.append(self.records[-1])
                    self.conn = self.connect()
            time.sleep(0.02)
