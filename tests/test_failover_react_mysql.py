"""A MySQL read_write endpoint reacts to what client traffic shows at once: a MariaDB writer turned read-only
(errno 1290) or killed makes the proxy probe now and follow the promoted replica within about a second, with
the monitor interval set far longer than that."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pymysql
import pytest

from devtools.servers import MariaDBInstance
from replicated import (
    cluster_config,
    connect_my,
    kill_mariadb,
    mariadb_pair,
    monitor_secret,
    running_proxy,
    writers_around,
)
from support import ProxyProcess

CLIENTS = 3
INTERVAL = 30.0  # far longer than the test: only the reaction to traffic can explain a fast switch
FOLLOW_WITHIN = 2.0  # seconds from the promotion until every client writes to the new writer
LOST = -1  # a record's "errno" when its insert is not on the writer that read it back


@dataclass
class Record:
    started: float
    ended: float
    port: int | None = None  # @@port of the server that ran a committed insert
    errno: int = 0


@dataclass
class Writer:
    """One client connection through the proxy running autocommit inserts in a loop."""

    connect: Callable[[], pymysql.connections.Connection]  # type: ignore[type-arg]
    records: list[Record] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.conn = self.connect()

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            started = time.monotonic()
            try:
                with self.conn.cursor() as cursor:
                    cursor.execute("INSERT INTO t (port) SELECT @@port")
                    cursor.execute("SELECT port FROM t WHERE id = LAST_INSERT_ID()")
                    row = cursor.fetchone()
                # (no row: the insert reached the old writer but not, before it died, the new one)
                self.records.append(Record(started, time.monotonic(), port=row[0] if row else None,
                                           errno=0 if row else LOST))
            except pymysql.MySQLError as exc:
                self.records.append(Record(started, time.monotonic(), errno=exc.args[0] if exc.args else 0))
                if not self.conn.open:
                    self.conn = self.connect()
            time.sleep(0.02)


@pytest.fixture()
def cluster(tmp_path: Path) -> Iterator[tuple[MariaDBInstance, MariaDBInstance]]:
    with mariadb_pair(tmp_path) as pair:
        yield pair


@pytest.fixture()
def proxy(tmp_path: Path, cluster: tuple[MariaDBInstance, MariaDBInstance],
          monkeypatch: pytest.MonkeyPatch) -> Iterator[ProxyProcess]:
    primary, replica = cluster
    config = cluster_config(primary, replica, pool={"max_connections": 2, "connection_borrow_timeout": 20.0},
                            monitor_interval=INTERVAL, monitor_user=monitor_secret(monkeypatch, primary))
    with running_proxy(tmp_path / "proxy", config) as process:
        process.wait_for_log(rf"instance .*:{primary.port} is now writer")
        yield process


def _run_writers(proxy: ProxyProcess, event: Callable[[], float]) -> tuple[list[Writer], float]:
    """Clients writing through the proxy around `event` (which returns when the new writer accepts writes)."""
    writers = [Writer(lambda: connect_my(proxy)) for _ in range(CLIENTS)]
    return writers, writers_around(writers, event, FOLLOW_WITHIN + 0.5)


def _check_followed(writers: list[Writer], old: MariaDBInstance, new: MariaDBInstance, promoted_at: float) -> float:
    """Every client wrote to the old writer before and to the new one within FOLLOW_WITHIN after the promotion,
    nothing started after it to the old one; returns the first write's delay in seconds. (A record's insert and
    its read-back are two statements: an insert made on the old writer may be read back, replicated, from the
    new one after the promotion.)"""
    for number, w in enumerate(writers):
        assert any(r.port == old.port for r in w.records), number
        assert not [r for r in w.records if r.port == old.port and r.started > promoted_at], number
        first = next((r for r in w.records if r.port == new.port), None)
        assert first is not None, (number, w.records[-3:])
        assert first.ended - promoted_at <= FOLLOW_WITHIN, (number, first.ended - promoted_at)
        assert w.records[-1].port == new.port, (number, w.records[-1])
    return min(r.ended for w in writers for r in w.records if r.port == new.port) - promoted_at


def test_a_writer_turned_read_only_is_left_at_its_first_errors(
    cluster: tuple[MariaDBInstance, MariaDBInstance], proxy: ProxyProcess
) -> None:
    primary, replica = cluster

    def demote_and_promote() -> float:
        primary.sql("SET GLOBAL read_only = 1")  # behind the proxy's back
        time.sleep(0.5)  # clients see errno 1290; the proxy sees no writer and holds new statements
        replica.promote()
        return time.monotonic()

    writers, promoted_at = _run_writers(proxy, demote_and_promote)
    first_write = _check_followed(writers, primary, replica, promoted_at)
    errors = [r for w in writers for r in w.records if r.errno]
    assert errors and {r.errno for r in errors} == {1290}, errors
    assert not [r for r in errors if r.started > promoted_at], errors  # held while there is no writer, not failed
    proxy.wait_for_log(r"read-only error \(errno 1290\) from .*; probing the instances now")
    proxy.wait_for_log(r"endpoint rw: cluster main has no healthy writer")
    proxy.wait_for_log(rf"endpoint rw: writer is now 127\.0\.0\.1:{replica.port}")
    print(f"MySQL read-only writer: first write on the promoted replica {first_write * 1000:.0f} ms after the "
          f"promotion; {len(errors)} read-only error(s) in all")


def test_a_killed_writer_is_left_at_once(
    cluster: tuple[MariaDBInstance, MariaDBInstance], proxy: ProxyProcess
) -> None:
    primary, replica = cluster

    def kill_and_promote() -> float:
        kill_mariadb(primary)
        replica.promote()
        return time.monotonic()

    writers, promoted_at = _run_writers(proxy, kill_and_promote)
    first_write = _check_followed(writers, primary, replica, promoted_at)
    errors = [r for w in writers for r in w.records if r.errno]
    assert not [r for r in errors if r.started > promoted_at], errors
    proxy.wait_for_log(r"; probing the instances now")
    print(f"MySQL killed writer: first write on the promoted replica {first_write * 1000:.0f} ms after the "
          f"promotion; {len(errors)} failed statement(s) around the kill")
