"""Causal reads: after a write through the read_write endpoint, a read through a read_only endpoint with causal_reads
sees it, on a replica that visibly lags (PostgreSQL standby with an apply delay; MariaDB replica whose SQL thread
stops and starts); the same reads without causal_reads are stale."""

from __future__ import annotations

import asyncio
import os
import signal
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pymysql
import pytest

from devtools.servers import MariaDBInstance, PostgresInstance
from proxy.config import parse_config
from proxy.errors import ConfigError
from proxy.topology.writer_position import SingleFlight, pg_replay_target
from replicated import (
    cluster_config,
    connect_my,
    connect_pg,
    mariadb_pair,
    monitor_secret,
    postgres_pair,
    running_proxy,
)
from support import ProxyProcess

ITERATIONS = 1000
CLIENTS = 8  # concurrent clients, more than the 4 backends of each endpoint ...
CLIENT_ITERATIONS = 40  # ... each writing its own row and reading it back this many times
INTERVAL = 0.2
APPLY_DELAY_MS = 15  # the standby applies each commit this long after the primary made it

Reads = tuple[int, list[float]]  # (stale reads, read latencies in seconds)
Client = tuple[Callable[[int], None], Callable[[], int], Callable[[], None]]  # write, read, close


ENDPOINTS: dict[str, str | dict[str, Any]] = {
    "rw": "read_write",
    "causal": {"role": "read_only", "causal_reads": True, "causal_read_timeout": 1.0},
    "plain": "read_only",
}


def _write_then_read(write: Callable[[int], None], plain: Callable[[], int], causal: Callable[[], int],
                     count: int) -> tuple[Reads, Reads]:
    """`count` times: write a new value (committed), then at once read it back through the plain endpoint, then
    through the causal one; for each, (stale reads, read latencies)."""
    results: tuple[Reads, Reads] = ((0, []), (0, []))
    stale = [0, 0]
    for value in range(1, count + 1):
        write(value)
        for number, read in enumerate((plain, causal)):
            started = time.perf_counter()
            seen = read()
            results[number][1].append(time.perf_counter() - started)
            stale[number] += seen != value
    return (stale[0], results[0][1]), (stale[1], results[1][1])


def _concurrent_stale_reads(client: Callable[[int], Client]) -> int:
    """CLIENTS threads at once, each `client(row)` -> (write, read, close) writing then reading its own row
    CLIENT_ITERATIONS times: how many reads were stale in all."""
    stale = [0] * CLIENTS
    errors: list[BaseException] = []

    def run(row: int) -> None:
        try:
            write, read, close = client(row)
            try:
                stale[row - 1] = _write_then_read(write, read, read, CLIENT_ITERATIONS)[1][0]
            finally:
                close()
        except BaseException as exc:  # reported by the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(row,), daemon=True) for row in range(1, CLIENTS + 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not errors, errors
    return sum(stale)


def _reads(plain: Callable[[], int], causal: Callable[[], int], count: int) -> tuple[list[float], list[float]]:
    """Latencies of `count` reads through each endpoint, taken in turns, with no write before them (the replica
    has caught up)."""
    latencies: tuple[list[float], list[float]] = ([], [])
    for _ in range(count):
        for number, read in enumerate((plain, causal)):
            started = time.perf_counter()
            read()
            latencies[number].append(time.perf_counter() - started)
    return latencies


def _us(latencies: list[float]) -> float:
    return statistics.median(latencies) * 1e6


def _on_writer(ports: list[int], replica: int) -> int:
    """How many causal reads the writer served (the rest ran on the replica); the replica must serve nearly all
    (the writer takes a read only when the replica is more than causal_read_timeout behind, on a busy machine)."""
    served = sum(port != replica for port in ports)
    assert served <= len(ports) // 20, f"{served} of {len(ports)} causal reads ran on the writer"
    return served


def _report(engine: str, off: Reads, on: Reads, quiet_off: list[float],
            quiet_on: list[float], on_writer: int) -> None:
    print(f"\n{engine}: {ITERATIONS} write-then-read iterations: stale reads without causal reads {off[0]}, with "
          f"{on[0]}; median read latency {_us(off[1]):.0f} us without, {_us(on[1]):.0f} us with (added "
          f"{_us(on[1]) - _us(off[1]):.0f} us, the wait for the replica); reads with no write pending: median "
          f"{_us(quiet_off):.0f} us without, {_us(quiet_on):.0f} us with (added {_us(quiet_on) - _us(quiet_off):.0f} "
          "us)")
    print(f"{engine}: each iteration reads through the plain endpoint first, then through the causal one; "
          f"causal reads served by the writer: {on_writer}")


# --- PostgreSQL ---

@pytest.fixture()
def pg_cluster(tmp_path: Path) -> Iterator[tuple[PostgresInstance, PostgresInstance]]:
    # Commits acknowledged once flushed, as in production (the development default, off, makes the standby trail
    # by up to wal_writer_delay on top of its apply delay).
    with postgres_pair(tmp_path, "CREATE TABLE t (id int PRIMARY KEY, v int NOT NULL); "
                       f"INSERT INTO t SELECT generate_series(1, {CLIENTS}), 0",
                       settings={"synchronous_commit": "on"},
                       standby_settings={"recovery_min_apply_delay": f"{APPLY_DELAY_MS}ms"}) as pair:
        yield pair


@pytest.fixture()
def pg_proxy(tmp_path: Path, pg_cluster: tuple[PostgresInstance, PostgresInstance],
             monkeypatch: pytest.MonkeyPatch) -> Iterator[ProxyProcess]:
    primary, standby = pg_cluster
    config = cluster_config(primary, standby, login_timeout=None, pool={"max_connections": 4}, endpoints=ENDPOINTS,
                            monitor_interval=INTERVAL, monitor_user=monitor_secret(monkeypatch, primary),
                            max_replica_lag=0)
    with running_proxy(tmp_path / "proxy", config) as process:
        process.wait_for_log(rf"instance .*:{standby.port} is now reader")
        yield process


def _pg(proxy: ProxyProcess, endpoint: str) -> psycopg.Connection[Any]:
    return connect_pg(proxy, endpoint, autocommit=True)


def test_postgres_causal_reads_see_the_write_before_them(
    pg_cluster: tuple[PostgresInstance, PostgresInstance], pg_proxy: ProxyProcess
) -> None:
    _primary, standby = pg_cluster
    with _pg(pg_proxy, "rw") as writer, _pg(pg_proxy, "causal") as causal, _pg(pg_proxy, "plain") as plain:
        assert plain.execute("SELECT inet_server_port()").fetchone() == (standby.port,)
        assert causal.execute("SELECT inet_server_port()").fetchone() == (standby.port,)

        def write(value: int) -> None:
            writer.execute("UPDATE t SET v = %s WHERE id = 1", (value,))

        ports: list[int] = []  # the server of each causal read

        def reader(conn: psycopg.Connection[Any], seen: list[int]) -> Callable[[], int]:
            def read() -> int:
                row = conn.execute("SELECT v, inet_server_port() FROM t WHERE id = 1").fetchone()
                assert row is not None
                seen.append(row[1])
                return row[0]
            return read

        off, on = _write_then_read(write, reader(plain, []), reader(causal, ports), ITERATIONS)
        time.sleep(APPLY_DELAY_MS / 1000 + 3 * INTERVAL)  # the standby caught up and the monitor saw it
        quiet_off, quiet_on = _reads(reader(plain, []), reader(causal, ports), 500)
    _report("PostgreSQL", off, on, quiet_off, quiet_on, _on_writer(ports, standby.port))
    assert off[0] > 0, "the standby never lagged: the test proves nothing"
    assert on[0] == 0

    def client(row: int) -> Client:
        w, r = _pg(pg_proxy, "rw"), _pg(pg_proxy, "causal")

        def write(value: int) -> None:
            w.execute("UPDATE t SET v = %s WHERE id = %s", (value, row))

        def read() -> int:
            found = r.execute("SELECT v FROM t WHERE id = %s", (row,)).fetchone()
            assert found is not None
            return found[0]

        def close() -> None:
            w.close()
            r.close()

        return write, read, close

    concurrent_stale = _concurrent_stale_reads(client)
    print(f"PostgreSQL: {CLIENTS} concurrent clients x {CLIENT_ITERATIONS}: {concurrent_stale} stale causal reads")
    assert concurrent_stale == 0


def test_postgres_causal_read_goes_to_the_writer_when_the_standby_stays_behind(
    pg_cluster: tuple[PostgresInstance, PostgresInstance], pg_proxy: ProxyProcess
) -> None:
    primary, standby = pg_cluster
    with _pg(pg_proxy, "rw") as writer, _pg(pg_proxy, "causal") as causal:
        standby.pause_replay()
        try:
            writer.execute("UPDATE t SET v = 42 WHERE id = 1")
            started = time.monotonic()
            row = causal.execute("SELECT v, inet_server_port() FROM t WHERE id = 1").fetchone()
            took = time.monotonic() - started
        finally:
            standby.resume_replay()
        assert row == (42, primary.port)
        assert 1.0 <= took < 5.0, took  # causal_read_timeout, then the writer
        pg_proxy.wait_for_log(r"causal read on endpoint causal served by the writer: the replica did not replay")
        # The standby caught up: the next causal read runs on it again.
        time.sleep(APPLY_DELAY_MS / 1000 + 0.2)
        assert causal.execute("SELECT v, inet_server_port() FROM t WHERE id = 1").fetchone() == (42, standby.port)


def test_postgres_a_reload_turns_causal_reads_on(
    pg_cluster: tuple[PostgresInstance, PostgresInstance], pg_proxy: ProxyProcess
) -> None:
    primary, standby = pg_cluster
    config = pg_proxy.config.read_text()
    header = "[postgresql.endpoints.plain]\n"
    pg_proxy.config.write_text(config.replace(header, header + "causal_reads = true\ncausal_read_timeout = 0.3\n"))
    os.kill(pg_proxy.pid, signal.SIGHUP)
    pg_proxy.wait_for_log(r"reload: serving")
    with _pg(pg_proxy, "rw") as writer, _pg(pg_proxy, "plain") as plain:
        standby.pause_replay()
        try:
            writer.execute("UPDATE t SET v = 7 WHERE id = 1")
            row = plain.execute("SELECT v, inet_server_port() FROM t WHERE id = 1").fetchone()
        finally:
            standby.resume_replay()
        assert row == (7, primary.port)
    pg_proxy.wait_for_log(r"causal read on endpoint plain served by the writer: the replica did not replay the "
                          r"writer's position \S+ within 0\.3 s")


# --- MariaDB ---

@pytest.fixture()
def my_cluster(tmp_path: Path) -> Iterator[tuple[MariaDBInstance, MariaDBInstance]]:
    with mariadb_pair(tmp_path, "CREATE TABLE app.t (id INT PRIMARY KEY, v INT NOT NULL);\nINSERT INTO app.t VALUES "
                      + ", ".join(f"({row}, 0)" for row in range(1, CLIENTS + 1)) + ";") as pair:
        yield pair


@pytest.fixture()
def my_proxy(tmp_path: Path, my_cluster: tuple[MariaDBInstance, MariaDBInstance],
             monkeypatch: pytest.MonkeyPatch) -> Iterator[ProxyProcess]:
    primary, replica = my_cluster
    # No lag limit: the replica's SQL thread stops and starts (its lag is then unknown), yet it serves.
    config = cluster_config(primary, replica, login_timeout=None, pool={"max_connections": 4}, endpoints=ENDPOINTS,
                            monitor_interval=INTERVAL, monitor_user=monitor_secret(monkeypatch, primary),
                            max_replica_lag=0)
    with running_proxy(tmp_path / "proxy", config) as process:
        process.wait_for_log(rf"instance .*:{replica.port} is now reader")
        yield process


def _my(proxy: ProxyProcess, endpoint: str) -> pymysql.Connection[Any]:
    return connect_my(proxy, endpoint)


class ReplayFlicker:
    """Stops and starts the replica's SQL thread over and over (each pause PAUSE seconds), so that it lags."""

    PAUSE = 0.05

    def __init__(self, replica: MariaDBInstance) -> None:
        self.conn = pymysql.connect(host=replica.host, port=replica.port, user="root",
                                    password=replica.root_password, autocommit=True)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with self.conn.cursor() as cursor:
            while not self.stop.is_set():
                cursor.execute("STOP SLAVE SQL_THREAD")
                time.sleep(self.PAUSE)
                cursor.execute("START SLAVE SQL_THREAD")
                time.sleep(self.PAUSE / 5)

    def __enter__(self) -> ReplayFlicker:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(10)
        self.conn.close()


def test_mariadb_causal_reads_see_the_write_before_them(
    my_cluster: tuple[MariaDBInstance, MariaDBInstance], my_proxy: ProxyProcess
) -> None:
    primary, replica = my_cluster
    writer, causal, plain = _my(my_proxy, "rw"), _my(my_proxy, "causal"), _my(my_proxy, "plain")
    try:
        with writer.cursor() as w, causal.cursor() as c, plain.cursor() as p:
            for cursor in (c, p):
                cursor.execute("SELECT @@port")
                assert cursor.fetchone() == (replica.port,)

            def write(value: int) -> None:
                w.execute("UPDATE t SET v = %s WHERE id = 1", (value,))

            ports: list[int] = []  # the server of each causal read

            def reader(cursor: Any, seen: list[int]) -> Callable[[], int]:
                def read() -> int:
                    cursor.execute("SELECT v, @@port FROM t WHERE id = 1")
                    value, port = cursor.fetchone()
                    seen.append(int(port))
                    return int(value)
                return read

            with ReplayFlicker(replica):
                off, on = _write_then_read(write, reader(p, []), reader(c, ports), ITERATIONS)
                concurrent_stale = _concurrent_stale_reads(_my_client(my_proxy))
            replica.wait_caught_up(primary.sql("SELECT @@gtid_binlog_pos"))
            time.sleep(3 * INTERVAL)
            quiet_off, quiet_on = _reads(reader(p, []), reader(c, ports), 500)
    finally:
        for conn in (writer, causal, plain):
            conn.close()
    _report("MariaDB", off, on, quiet_off, quiet_on, _on_writer(ports, replica.port))
    assert off[0] > 0, "the replica never lagged: the test proves nothing"
    assert on[0] == 0
    print(f"MariaDB: {CLIENTS} concurrent clients x {CLIENT_ITERATIONS}: {concurrent_stale} stale causal reads")
    assert concurrent_stale == 0


def _my_client(proxy: ProxyProcess) -> Callable[[int], Client]:
    def client(row: int) -> Client:
        w, r = _my(proxy, "rw"), _my(proxy, "causal")

        def write(value: int) -> None:
            with w.cursor() as cursor:
                cursor.execute("UPDATE t SET v = %s WHERE id = %s", (value, row))

        def read() -> int:
            with r.cursor() as cursor:
                cursor.execute("SELECT v FROM t WHERE id = %s", (row,))
                return int(cursor.fetchone()[0])

        def close() -> None:
            w.close()
            r.close()

        return write, read, close
    return client


def test_mariadb_causal_read_goes_to_the_writer_when_the_replica_stays_behind(
    my_cluster: tuple[MariaDBInstance, MariaDBInstance], my_proxy: ProxyProcess
) -> None:
    primary, replica = my_cluster
    writer, causal = _my(my_proxy, "rw"), _my(my_proxy, "causal")
    try:
        with writer.cursor() as w, causal.cursor() as c:
            replica.pause_replay()
            try:
                w.execute("UPDATE t SET v = 42 WHERE id = 1")
                started = time.monotonic()
                c.execute("SELECT v, @@port FROM t WHERE id = 1")
                took = time.monotonic() - started
                assert c.fetchone() == (42, primary.port)
            finally:
                replica.resume_replay()
            assert 1.0 <= took < 3.0, took
            my_proxy.wait_for_log(r"causal read on endpoint causal served by the writer: the replica did not replay")
            replica.wait_caught_up(primary.sql("SELECT @@gtid_binlog_pos"))
            c.execute("SELECT v, @@port FROM t WHERE id = 1")
            assert c.fetchone() == (42, replica.port)
    finally:
        writer.close()
        causal.close()


# --- the parts without a server ---

def test_replay_target_of_an_insert_position_just_after_a_page_header() -> None:
    block, segment = 8192, 16 << 20
    assert pg_replay_target(5 * block + 24, block, segment) == 5 * block  # after a short page header
    assert pg_replay_target(3 * segment + 40, block, segment) == 3 * segment  # after a segment's long header
    assert pg_replay_target(5 * block + 40, block, segment) == 5 * block + 40  # a record's end on a short page
    assert pg_replay_target(5 * block + 1000, block, segment) == 5 * block + 1000


def test_single_flight_answers_only_with_a_question_started_after_the_call() -> None:
    async def scenario() -> None:
        started: list[int] = []
        release = asyncio.Event()

        async def ask() -> int:
            started.append(len(started) + 1)
            number = len(started)
            await release.wait()
            release.clear()
            return number

        flight = SingleFlight(ask)
        first = flight.after_now()  # starts question 1
        await asyncio.sleep(0)
        second, third = flight.after_now(), flight.after_now()  # arrive while 1 runs: both wait for question 2
        assert second is third and len(started) == 1
        release.set()
        assert await first == 1
        await asyncio.sleep(0)
        assert len(started) == 2
        release.set()
        assert await second == 2 and await third == 2
        await flight.close()

    asyncio.run(scenario())


@pytest.mark.parametrize(("change", "problem"), [
    ({"postgresql.endpoints.rw": {"port": 7001, "cluster": "main", "causal_reads": True}},
     "only a read_only endpoint has causal reads"),
    ({"postgresql.clusters.main": {"instances": [{"host": "127.0.0.1", "port": 5999}]}},
     "is not monitored"),
    ({"postgresql.endpoints.rw": {"port": 7001, "cluster": "main", "role": "custom", "members": ["127.0.0.1:5999"]}},
     "has no read_write endpoint"),
])
def test_causal_reads_configuration_is_checked(change: dict[str, dict[str, Any]], problem: str) -> None:
    sections: dict[str, dict[str, Any]] = {
        "postgresql.clusters.main": {"instances": [{"host": "127.0.0.1", "port": 5999}], "monitor_interval": 1.0,
                                     "monitor_user": "monitor"},
        "postgresql.endpoints.rw": {"port": 7001, "cluster": "main"},
        "postgresql.endpoints.ro": {"port": 7002, "cluster": "main", "role": "read_only", "causal_reads": True},
    }
    sections.update(change)
    data: dict[str, Any] = {}
    for dotted, values in sections.items():
        part = data
        for key in dotted.split("."):
            part = part.setdefault(key, {})
        part.update(values)
    with pytest.raises(ConfigError, match=problem):
        parse_config(data)
