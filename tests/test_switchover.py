"""Blue/green switchover of a read_write endpoint in the running proxy (`dbproxy switchover`): clients writing
through the proxy keep their connections, lose no acknowledged write and see no error; a switchover that cannot
finish leaves them on blue, writable again; a reload of the file that still names blue keeps them on green."""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mysql.connector
import psycopg
import pytest

from devtools.servers import (
    MariaDBInstance,
    PostgresInstance,
    free_port,
)
from replicated import mariadb_pair, monitor_secret, postgres_pair
from support import ProxyProcess, write_config

CLIENTS = 8
BACKENDS = 4  # fewer backends than clients
INTERVAL = 0.3


@dataclass
class Client:
    """One client connection through the proxy writing numbered rows in a loop: even clients one row per
    autocommit statement, odd ones two rows per transaction."""

    number: int
    conn: Any
    write: Callable[[Any, int, int, bool], None]
    acked: list[tuple[int, float]] = field(default_factory=list)  # (n, when the write was acknowledged)
    errors: list[str] = field(default_factory=list)
    slowest: tuple[float, float] = (0.0, 0.0)  # (seconds, when it started) of the slowest write
    n: int = 0  # the next row's number

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            multi = self.number % 2 == 1
            started = time.monotonic()
            try:
                self.write(self.conn, self.number, self.n, multi)
            except Exception as exc:  # every error counts against the switchover
                self.errors.append(f"{type(exc).__name__}: {exc}")
                return
            ended = time.monotonic()
            self.acked.extend((m, ended) for m in range(self.n, self.n + (2 if multi else 1)))
            self.slowest = max(self.slowest, (ended - started, started))
            self.n += 2 if multi else 1
            time.sleep(0.005)


def _switchover(config: Path, *args: str) -> tuple[subprocess.CompletedProcess[str], float]:
    """Run the command; returns its result and when it started."""
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "proxy", "switchover", "-c", str(config), *args],
                          capture_output=True, text=True, timeout=60)
    return done, started


def _run_clients(clients: list[Client], action: Callable[[], None]) -> float:
    """Run `action` while the clients write (one second before, one after); returns when it finished."""
    stop = threading.Event()
    threads = [threading.Thread(target=client.run, args=(stop,), daemon=True) for client in clients]
    for thread in threads:
        thread.start()
    try:
        time.sleep(1.0)
        action()
        finished = time.monotonic()
        time.sleep(1.0)
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
    return finished


def _attempt(proxy: ProxyProcess, clients: list[Client], runs: list[tuple[subprocess.CompletedProcess[str], float]],
             timeout: str) -> float:
    """`dbproxy switchover --to green` while the clients write; returns when the command finished."""
    return _run_clients(clients, lambda: runs.append(_switchover(proxy.config, "--to", "green", "--timeout", timeout)))


def _check_clients(clients: list[Client], rows: dict[tuple[int, int], int], after: float, port: int) -> None:
    """No client error, every acknowledged row stored, every row acknowledged after `after` written on `port`."""
    # (a test is one story with the same clients: failed attempts first, then the switchover)
    assert not [c.errors for c in clients if c.errors], [c.errors for c in clients if c.errors]
    for client in clients:
        lost = [n for n, _ in client.acked if (client.number, n) not in rows]
        assert not lost, (client.number, lost[:10])
        late = [n for n, ended in client.acked if ended > after]
        assert late, f"client {client.number} wrote nothing after the command"
        assert all(rows[(client.number, n)] == port for n in late), client.number


def _reload(proxy: ProxyProcess, wait_for: str) -> None:
    done = subprocess.run([sys.executable, "-m", "proxy", "reload", "-c", str(proxy.config)], capture_output=True,
                          text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    proxy.wait_for_log(wait_for)


def _reload_keeps_the_switch(proxy: ProxyProcess) -> None:
    """`dbproxy reload` of the file that still says blue: the endpoint stays on green."""
    _reload(proxy, r"reload: the configuration file still puts endpoint rw on cluster blue; it stays on cluster green")


def _held_ms(output: str) -> float:
    found = re.search(r"writes (?:were )?held (\d+) ms", output)
    assert found, output
    return float(found.group(1))


# --------------------------------------------------------------------------- PostgreSQL


@pytest.fixture()
def pg_pair(tmp_path: Path) -> Iterator[tuple[PostgresInstance, PostgresInstance]]:
    with postgres_pair(tmp_path, "CREATE TABLE t (client int, n int, port int, PRIMARY KEY (client, n))") as pair:
        yield pair


def _pg_config(folder: Path, blue: PostgresInstance, green: PostgresInstance, port: int, green_user: str) -> Path:
    return write_config(folder, {
        "server": {"log_level": "info", "workers": 2, "pid_file": str(folder / "dbproxy.pid")},
        "secrets": {"file": "secrets.toml"},
        "mysql": {"enabled": False},
        "postgresql.pool": {"max_connections": BACKENDS, "connection_borrow_timeout": 20.0},
        "postgresql.clusters.blue": {"instances": [{"name": "blue-1", "host": blue.host, "port": blue.port}],
                                     "monitor_interval": INTERVAL, "monitor_user": blue.superuser},
        "postgresql.clusters.green": {"instances": [{"name": "green-1", "host": green.host, "port": green.port}],
                                      "monitor_interval": INTERVAL, "monitor_user": green_user},
        "postgresql.endpoints.rw": {"port": port, "cluster": "blue", "role": "read_write"},
    })


def _pg_write(conn: psycopg.Connection[Any], client: int, n: int, multi: bool) -> None:
    insert = "INSERT INTO t (client, n, port) VALUES (%s, %s, inet_server_port())"
    if multi:
        with conn.transaction():
            conn.execute(insert, (client, n))
            conn.execute(insert, (client, n + 1))
    else:
        conn.execute(insert, (client, n))  # prepared by psycopg after a few runs: a named statement


def _pg_clients(proxy: ProxyProcess) -> list[Client]:
    clients = []
    for number in range(CLIENTS):
        conn = psycopg.connect(host="127.0.0.1", port=proxy.ports["rw"], user="app", password="app-secret",
                               dbname="app", autocommit=True, connect_timeout=10)
        conn.execute(f"SET application_name = 'writer-{number}'")
        clients.append(Client(number, conn, _pg_write))
    return clients


def _pg_rows(instance: PostgresInstance) -> dict[tuple[int, int], int]:
    with psycopg.connect(instance.dsn("app", "app-secret", "app")) as conn:
        return {(c, n): p for c, n, p in conn.execute("SELECT client, n, port FROM t").fetchall()}


def test_postgres_switchover_to_a_standby(
    tmp_path: Path, pg_pair: tuple[PostgresInstance, PostgresInstance], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two workers. Called off twice (green's monitor_user may not promote; green does not catch up), then done
    once the file names a monitor_user that may."""
    blue, green = pg_pair
    monkeypatch.setenv("DBPROXY_PASSWORD_" + blue.superuser.upper(), blue.superuser_password)
    folder = tmp_path / "proxy"
    folder.mkdir()
    port = free_port()
    proxy = ProxyProcess(_pg_config(folder, blue, green, port, green_user="app"), folder / "proxy.log")
    proxy.start()
    try:
        clients = _pg_clients(proxy)
        runs: list[tuple[subprocess.CompletedProcess[str], float]] = []

        # Blue was read-only for a moment and is writable again; the clients go on on blue.
        finished = _attempt(proxy, clients, runs, "3")
        done = runs[-1][0]
        assert done.returncode == 1, (done.stdout, done.stderr)
        assert "permission denied for function pg_promote" in done.stderr, done.stderr
        assert "is writable again; the endpoints stay on cluster blue" in done.stderr, done.stderr
        _check_clients(clients, _pg_rows(blue), finished, blue.port)
        assert blue.psql("SHOW default_transaction_read_only") == "off"
        assert green.psql("SELECT pg_is_in_recovery()") == "t"
        called_off = _held_ms(done.stderr)

        # Green not catching up: refused before anything is held.
        green.pause_replay()
        finished = _attempt(proxy, clients, runs, "1")
        done = runs[-1][0]
        assert done.returncode == 1 and "not" in done.stderr and "within 1.0s" in done.stderr, done.stderr
        assert "held" not in done.stderr, done.stderr
        _check_clients(clients, _pg_rows(blue), finished, blue.port)
        green.resume_replay()

        _pg_config(folder, blue, green, port, green_user=blue.superuser)
        _reload(proxy, r"reload: serving rw port")
        for client in clients:
            client.slowest = (0.0, 0.0)  # measured around the switchover only
        finished = _attempt(proxy, clients, runs, "5")
        done, started = runs[-1]
        took = finished - started
        assert done.returncode == 0, (done.stdout, done.stderr, proxy.log()[-3000:])
        _check_clients(clients, _pg_rows(green), finished, green.port)
        _reload_keeps_the_switch(proxy)
        for client in clients:  # the same connections: settings and prepared statements still work
            assert not client.conn.closed
            assert client.conn.execute("SHOW application_name").fetchone() == (f"writer-{client.number}",)
            assert client.conn.execute("SELECT %s::int + 1", (41,), prepare=True).fetchone() == (42,)
            assert client.conn.execute("SELECT inet_server_port()").fetchone() == (green.port,)
            client.conn.close()
        assert blue.psql("SHOW default_transaction_read_only") == "on"
        assert green.psql("SELECT pg_is_in_recovery()") == "f"
        slowest = max(client.slowest for client in clients)
        print(f"PostgreSQL switchover: writes held {_held_ms(done.stdout):.0f} ms (called off: {called_off:.0f} ms); "
              f"slowest client write {slowest[0] * 1000:.0f} ms, begun {slowest[1] - started:.2f} s into the command; "
              f"command took {took * 1000:.0f} ms; "
              f"{sum(len(c.acked) for c in clients)} rows acknowledged by {CLIENTS} clients, none lost")
    finally:
        proxy.stop()


# --------------------------------------------------------------------------- MariaDB


@pytest.fixture()
def blue_green(tmp_path: Path) -> Iterator[tuple[MariaDBInstance, MariaDBInstance]]:
    with mariadb_pair(tmp_path, "CREATE TABLE app.t (client INT, n INT, port INT, PRIMARY KEY (client, n));") as pair:
        yield pair


def _mariadb_config(folder: Path, blue: MariaDBInstance, green: MariaDBInstance, port: int, green_user: str) -> Path:
    return write_config(folder, {
        "server": {"log_level": "info", "workers": 1},
        "secrets": {"file": "secrets.toml"},
        "postgresql": {"enabled": False},
        "mysql.pool": {"max_connections": BACKENDS, "connection_borrow_timeout": 20.0},
        "mysql.clusters.blue": {"instances": [{"host": blue.host, "port": blue.port}],
                                "monitor_interval": INTERVAL, "monitor_user": "root"},
        "mysql.clusters.green": {"instances": [{"host": green.host, "port": green.port}],
                                 "monitor_interval": INTERVAL, "monitor_user": green_user},
        "mysql.endpoints.rw": {"port": port, "cluster": "blue", "role": "read_write"},
    })


def _mariadb_write(conn: Any, client: int, n: int, multi: bool) -> None:
    cursor = conn.cursor(prepared=True)  # COM_STMT_PREPARE / EXECUTE
    insert = "INSERT INTO t (client, n, port) VALUES (%s, %s, @@port)"
    try:
        if multi:
            conn.start_transaction()
            cursor.execute(insert, (client, n))
            cursor.execute(insert, (client, n + 1))
            conn.commit()
        else:
            cursor.execute(insert, (client, n))
    finally:
        cursor.close()


def _mariadb_clients(proxy: ProxyProcess) -> list[Client]:
    clients = []
    for number in range(CLIENTS):
        conn = mysql.connector.connect(host="127.0.0.1", port=proxy.ports["rw"], user="app", password="app-secret",
                                       database="app", autocommit=True)
        cursor = conn.cursor()
        cursor.execute(f"SET SESSION time_zone = '+0{number}:00'")
        cursor.close()
        clients.append(Client(number, conn, _mariadb_write))
    return clients


def _mariadb_rows(instance: MariaDBInstance) -> dict[tuple[int, int], int]:
    rows = instance.sql("SELECT client, n, port FROM app.t")
    return {(int(c), int(n)): int(p) for c, n, p in (line.split("\t") for line in rows.splitlines() if line)}


def test_mariadb_switchover_to_a_replica(
    tmp_path: Path, blue_green: tuple[MariaDBInstance, MariaDBInstance], monkeypatch: pytest.MonkeyPatch
) -> None:
    """One process. Called off twice (green's monitor_user may watch replication but not stop it; green does not
    catch up), then done once the file names a monitor_user that may."""
    blue, green = blue_green
    monkeypatch.setenv("DBPROXY_PASSWORD_ROOT", blue.root_password)
    watcher = monitor_secret(monkeypatch, blue)  # may watch replication, not stop it
    folder = tmp_path / "proxy"
    folder.mkdir()
    port = free_port()
    proxy = ProxyProcess(_mariadb_config(folder, blue, green, port, green_user=watcher), folder / "proxy.log")
    proxy.start()
    try:
        clients = _mariadb_clients(proxy)
        runs: list[tuple[subprocess.CompletedProcess[str], float]] = []

        finished = _attempt(proxy, clients, runs, "3")
        done = runs[-1][0]
        assert done.returncode == 1, (done.stdout, done.stderr)
        assert "promoting it" in done.stderr and "is writable again" in done.stderr, done.stderr
        _check_clients(clients, _mariadb_rows(blue), finished, blue.port)
        assert blue.sql("SELECT @@GLOBAL.read_only") == "0"
        called_off = _held_ms(done.stderr)

        green.sql("START SLAVE")  # (the failed promotion stopped it)
        green.pause_replay()
        finished = _attempt(proxy, clients, runs, "1")
        done = runs[-1][0]
        assert done.returncode == 1 and "within 1.0s" in done.stderr and "held" not in done.stderr, done.stderr
        _check_clients(clients, _mariadb_rows(blue), finished, blue.port)
        green.resume_replay()

        _mariadb_config(folder, blue, green, port, green_user="root")
        _reload(proxy, r"reload: serving rw port")
        for client in clients:
            client.slowest = (0.0, 0.0)  # measured around the switchover only
        finished = _attempt(proxy, clients, runs, "5")
        done, started = runs[-1]
        took = finished - started
        assert done.returncode == 0, (done.stdout, done.stderr, proxy.log()[-3000:])
        _check_clients(clients, _mariadb_rows(green), finished, green.port)
        _reload_keeps_the_switch(proxy)
        for client in clients:  # the same connections: settings and prepared statements still work
            assert client.conn.is_connected()
            cursor = client.conn.cursor(prepared=True)
            cursor.execute("SELECT @@session.time_zone, @@port, ? + 1", (41,))
            assert cursor.fetchone() == (f"+0{client.number}:00", green.port, 42)
            cursor.close()
            client.conn.close()
        assert blue.sql("SELECT @@GLOBAL.read_only") == "1"
        assert green.sql("SELECT @@GLOBAL.read_only") == "0" and green.slave_status() == {}
        slowest = max(client.slowest for client in clients)
        print(f"MariaDB switchover: writes held {_held_ms(done.stdout):.0f} ms (called off: {called_off:.0f} ms); "
              f"slowest client write {slowest[0] * 1000:.0f} ms, begun {slowest[1] - started:.2f} s into the command; "
              f"command took {took * 1000:.0f} ms; "
              f"{sum(len(c.acked) for c in clients)} rows acknowledged by {CLIENTS} clients, none lost")
    finally:
        proxy.stop()
