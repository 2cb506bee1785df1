"""read_only and custom endpoints spread their work over their eligible instances (PostgreSQL primary and two
streaming standbys, MariaDB primary and two replicas): reads balanced over the readers, a reader past
max_replica_lag left out until it catches up, the writer as fallback (or the borrow timeout without it)."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import mysql.connector
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
from replicated import MONITOR, MONITOR_PASSWORD, monitor_user_sql
from support import ProxyProcess, metric_value, scrape, write_config

INTERVAL = 0.2
MAX_LAG = 1.0
STRICT_TIMEOUT = 2.0  # the borrow timeout of the endpoint without fallback
FAIR = 0.3  # each of two readers gets at least this share of the reads


def _spread(readers: list[Callable[[], int]], reads: int) -> Counter[int]:
    """Each reader (its own connection) in its own thread doing `reads` reads at once; the server port of each."""
    counts: Counter[int] = Counter()
    lock = threading.Lock()
    errors: list[BaseException] = []

    def run(read: Callable[[], int]) -> None:
        try:
            for _ in range(reads):
                port = read()
                with lock:
                    counts[port] += 1
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(read,), daemon=True) for read in readers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors, errors
    assert sum(counts.values()) == reads * len(readers), counts
    return counts


def _calls(read: Callable[[], int], times: int) -> Counter[int]:
    return Counter(read() for _ in range(times))


def _fair(counts: Counter[int], ports: set[int]) -> None:
    total = sum(counts.values())
    assert set(counts) == ports, counts
    assert all(counts[port] >= FAIR * total for port in ports), counts


class Logs:
    """Waiting for a proxy log line written after a point."""

    def __init__(self, proxy: ProxyProcess) -> None:
        self.proxy = proxy
        self.offset = len(proxy.log())

    def mark(self) -> None:
        self.offset = len(self.proxy.log())

    def wait(self, pattern: str, timeout: float = 10.0) -> str:
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.proxy.log()[self.offset:].splitlines():
                if regex.search(line):
                    return line
            time.sleep(0.05)
        raise AssertionError(f"no log line matches {pattern!r}:\n{self.proxy.log()[-3000:]}")


class Writes:
    """A thread writing to the primary every few milliseconds (so that a paused replica falls behind)."""

    def __init__(self, write: Callable[[], None]) -> None:
        self._write = write
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.errors: list[BaseException] = []

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._write()
            except BaseException as exc:
                self.errors.append(exc)
            time.sleep(0.05)

    def __enter__(self) -> Writes:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(10)


def _endpoints(engine: str) -> dict[str, dict[str, Any]]:
    return {
        f"{engine}.endpoints.rw": {"port": free_port(), "cluster": "main", "role": "read_write"},
        f"{engine}.endpoints.ro": {"port": free_port(), "cluster": "main", "role": "read_only"},
        f"{engine}.endpoints.strict": {"port": free_port(), "cluster": "main", "role": "read_only",
                                       "reader_fallback": False,
                                       "pool": {"connection_borrow_timeout": STRICT_TIMEOUT}},
        f"{engine}.endpoints.others": {"port": free_port(), "cluster": "main", "role": "custom", "exclude": ["s2"]},
        f"{engine}.endpoints.ro_session": {"port": free_port(), "cluster": "main", "role": "read_only",
                                           "pool": {"mode": "session"}},
    }


def _start_proxy(folder: Path, engine: str, instances: list[dict[str, Any]], monitor_user: str) -> ProxyProcess:
    folder.mkdir(parents=True, exist_ok=True)
    sections: dict[str, dict[str, Any]] = {
        "server": {"log_level": "info", "client_login_timeout": 5.0, "workers": 1, "metrics_port": 0},
        "secrets": {"file": "secrets.toml"},
        **({"postgresql": {"enabled": False}} if engine == "mysql" else {}),
        f"{engine}.pool": {"max_connections": 4, "connection_borrow_timeout": 10.0},
        f"{engine}.clusters.main": {"instances": instances, "monitor_interval": INTERVAL,
                                    "monitor_user": monitor_user, "max_replica_lag": MAX_LAG},
        **_endpoints(engine),
    }
    proxy = ProxyProcess(write_config(folder, sections), folder / "proxy.log")
    proxy.sections = sections  # type: ignore[attr-defined]  # what a reload test rewrites
    proxy.start()
    return proxy


def _reload(proxy: ProxyProcess, changes: dict[str, dict[str, Any]]) -> None:
    """Rewrite the proxy's configuration with `changes` (whole sections) and signal it to reload."""
    sections: dict[str, dict[str, Any]] = proxy.sections  # type: ignore[attr-defined]
    sections.update(changes)
    write_config(proxy.config.parent, sections)
    os.kill(proxy.pid, signal.SIGHUP)


# --- PostgreSQL ---


class PgCluster:
    def __init__(self, primary: PostgresInstance, standbys: list[PostgresInstance], proxy: ProxyProcess) -> None:
        self.primary = primary
        self.standbys = standbys
        self.proxy = proxy

    def connect(self, endpoint: str, **options: Any) -> psycopg.Connection[Any]:
        return psycopg.connect(host="127.0.0.1", port=self.proxy.ports[endpoint], user="app", password="app-secret",
                               dbname="app", sslmode="disable", connect_timeout=10, autocommit=True, **options)

    def read(self, endpoint: str) -> Callable[[], int]:
        """A reader on its own connection: each call is one transaction."""
        conn = self.connect(endpoint)

        def read() -> int:
            row = conn.execute("SELECT inet_server_port()").fetchone()
            assert row is not None
            return int(row[0])
        return read

    def ports(self) -> set[int]:
        return {standby.port for standby in self.standbys}


@pytest.fixture(scope="module")
def pg(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PgCluster]:
    base = tmp_path_factory.mktemp("pg")
    primary = start_postgres(base / "primary", users={"app": "app-secret"})
    standbys: list[PostgresInstance] = []
    proxy: ProxyProcess | None = None
    os.environ["DBPROXY_PASSWORD_" + primary.superuser.upper()] = primary.superuser_password
    try:
        primary.psql("CREATE TABLE t (id serial PRIMARY KEY, at timestamptz DEFAULT now())", db="app", user="app")
        standbys = [start_postgres_standby(primary, base / f"standby{n}") for n in (1, 2)]
        instances = [{"name": "p", "host": primary.host, "port": primary.port, "role": "writer"},
                     *({"name": f"s{n}", "host": s.host, "port": s.port, "role": "reader"}
                       for n, s in enumerate(standbys, 1))]
        proxy = _start_proxy(base / "proxy", "postgresql", instances, primary.superuser)
        for standby in standbys:
            proxy.wait_for_log(rf"instance .*:{standby.port} is now reader")
        yield PgCluster(primary, standbys, proxy)
    finally:
        if proxy is not None:
            proxy.stop()
        for standby in standbys:
            standby.stop()
        primary.stop()
        del os.environ["DBPROXY_PASSWORD_" + primary.superuser.upper()]


def test_postgres_reads_spread_over_both_standbys(pg: PgCluster) -> None:
    counts = _spread([pg.read("ro") for _ in range(4)], 50)
    _fair(counts, pg.ports())
    # One client alone, one statement after another: its transactions alternate.
    alone = pg.read("ro")
    sequential = _calls(alone, 20)
    assert set(sequential) == pg.ports() and min(sequential.values()) >= 8, sequential
    # The custom endpoint excluding s2 spreads over the writer and s1.
    others = _calls(pg.read("others"), 20)
    assert set(others) == {pg.primary.port, pg.standbys[0].port}, others
    # Each instance's counters carry its label.
    text = scrape(pg.proxy)
    for label in ("s1", "s2"):
        assert metric_value(text, "dbproxy_database_connection_borrows_total", endpoint="ro", instance=label) >= 40
    assert metric_value(text, "dbproxy_database_connection_borrows_total", endpoint="ro", instance="p") == 0
    print(f"PostgreSQL reads over the standbys, 4 clients: {dict(counts)}; one client: {dict(sequential)}")


def _session_pooling_spreads_sessions(read: Callable[[], Callable[[], int]], ports: set[int]) -> Counter[int]:
    """In session pooling the choice is per client session: each stays on its instance, the sessions spread."""
    sessions = [read() for _ in range(6)]
    per_session = [_calls(session, 5) for session in sessions]
    assert all(len(counts) == 1 for counts in per_session), per_session
    spread = Counter(next(iter(counts)) for counts in per_session)
    assert spread == dict.fromkeys(ports, 3), spread
    return spread


def test_postgres_session_pooling_spreads_sessions(pg: PgCluster) -> None:
    _session_pooling_spreads_sessions(lambda: pg.read("ro_session"), pg.ports())


def test_postgres_session_state_follows_the_client_across_standbys(pg: PgCluster) -> None:
    """Settings and prepared statements are the client's: whichever standby a transaction runs on has them."""
    with pg.connect("ro", prepare_threshold=0) as conn:
        conn.execute("SET application_name = 'spread-check'")
        conn.execute("SET search_path = pg_catalog, public")
        seen: Counter[int] = Counter()
        for number in range(20):
            row = conn.execute("SELECT inet_server_port(), current_setting('application_name'), %s::int",
                               (number,), prepare=True).fetchone()
            assert row is not None and row[1:] == ("spread-check", number), row
            seen[row[0]] += 1
        assert set(seen) == pg.ports(), seen

    async def named_statements() -> Counter[int]:
        conn = await asyncpg.connect(host="127.0.0.1", port=pg.proxy.ports["ro"], user="app", password="app-secret",
                                     database="app", ssl=False)
        try:
            ports: Counter[int] = Counter()
            for number in range(20):
                for query in ("SELECT inet_server_port(), $1::int", "SELECT inet_server_port(), $1::int + 1"):
                    port, value = await conn.fetchrow(query, number)
                    assert value == number + (1 if "+ 1" in query else 0)
                    ports[port] += 1
            statement = await conn.prepare("SELECT inet_server_port(), $1::text")
            for number in range(10):
                port, text = await statement.fetchrow(str(number))
                assert text == str(number)
                ports[port] += 1
            return ports
        finally:
            await conn.close()

    ports = asyncio.run(named_statements())
    assert set(ports) == pg.ports(), ports


def test_postgres_a_lagging_standby_is_left_out_until_it_catches_up(pg: PgCluster) -> None:
    s1, s2 = pg.standbys
    logs = Logs(pg.proxy)
    writer = pg.connect("rw")
    ro, strict = pg.read("ro"), pg.read("strict")
    with Writes(lambda: writer.execute("INSERT INTO t DEFAULT VALUES") and None) as writes:
        # Its lag is counted from its last replayed commit: let it replay one first (else the lag is unknown).
        deadline = time.monotonic() + 10
        while s1.psql("SELECT pg_last_xact_replay_timestamp() IS NOT NULL").strip() != "t":
            assert time.monotonic() < deadline, "the standby replayed no commit"
            time.sleep(0.05)
        s1.pause_replay()
        paused_at = time.monotonic()
        try:
            line = logs.wait(r"endpoint ro: now serving s2 \(.*\); left out: p \(writer\), s1 \(lag \d")
            left_after = time.monotonic() - paused_at
            logs.wait(r"endpoint strict: now serving s2 ")
            assert Counter(ro() for _ in range(20)) == {s2.port: 20}
            assert Counter(strict() for _ in range(20)) == {s2.port: 20}
        finally:
            logs.mark()
            s1.resume_replay()
        resumed_at = time.monotonic()
        logs.wait(r"endpoint ro: now serving s1 \(.*\), s2 \(")
        back_after = time.monotonic() - resumed_at
    assert not writes.errors, writes.errors[:3]
    writer.close()
    assert set(Counter(ro() for _ in range(20))) == pg.ports()
    # Left out once its lag (counted from its last replayed commit, just before the pause) passed the limit,
    # within a probe round or two; back within a round or two.
    assert MAX_LAG - 0.3 <= left_after < MAX_LAG + 2.0, (left_after, line)
    assert back_after < 2.0, back_after
    print(f"PostgreSQL: paused standby left out {left_after:.2f} s after the pause, back {back_after:.2f} s after "
          f"the resume")


def test_postgres_a_reload_changes_a_custom_endpoints_members(pg: PgCluster) -> None:
    """Instances that stay keep their pools; a client of the endpoint moves at its next transaction."""
    logs = Logs(pg.proxy)
    others = pg.read("others")
    assert set(_calls(others, 10)) == {pg.primary.port, pg.standbys[0].port}
    section = dict(pg.proxy.sections["postgresql.endpoints.others"])  # type: ignore[attr-defined]
    changed = {key: value for key, value in section.items() if key != "exclude"}
    _reload(pg.proxy, {"postgresql.endpoints.others": {**changed, "members": ["s2"]}})
    logs.wait(r"reload: endpoint others now uses s2 at .* \(serving s2\); no longer others/p, others/s1")
    assert _calls(others, 10) == {pg.standbys[1].port: 10}
    assert pg.read("others")() == pg.standbys[1].port
    logs.mark()
    _reload(pg.proxy, {"postgresql.endpoints.others": section})
    logs.wait(r"reload: endpoint others now uses p at .*, s1 at .* \(serving p, s1\); no longer others/s2")
    assert set(_calls(others, 10)) == {pg.primary.port, pg.standbys[0].port}


def test_postgres_without_readers_reads_go_to_the_writer_or_wait(pg: PgCluster) -> None:
    logs = Logs(pg.proxy)
    ro = pg.read("ro")
    waiting = pg.connect("strict")  # logged in now, while there are readers
    for standby in pg.standbys:
        standby.kill()
    logs.wait(r"endpoint ro: now serving p \(.*\); left out: s1 \(unhealthy\), s2 \(unhealthy\); no reader is "
              r"eligible; the writer serves meanwhile")
    logs.wait(r"endpoint strict: now serving nothing; .*new work waits for one")
    logs.wait(r"endpoint others: now serving p \(")
    assert Counter(ro() for _ in range(10)) == {pg.primary.port: 10}
    assert pg.read("ro")() == pg.primary.port  # a client logging in now too
    assert pg.read("others")() == pg.primary.port
    started = time.monotonic()
    with pytest.raises(psycopg.OperationalError) as failure:
        waiting.execute("SELECT inet_server_port()")
    waited = time.monotonic() - started
    assert failure.value.sqlstate == "53300", failure.value
    assert f"timed out after {STRICT_TIMEOUT:g} s waiting for a backend connection" in str(failure.value)
    assert STRICT_TIMEOUT - 0.2 <= waited < STRICT_TIMEOUT + 2.0, waited
    assert metric_value(scrape(pg.proxy), "dbproxy_database_connection_borrow_timeouts_total", endpoint="strict") >= 1
    print(f"PostgreSQL: without readers, reads on the writer; without fallback the borrow timed out after "
          f"{waited:.2f} s")


# --- MariaDB ---


class MyCluster:
    def __init__(self, primary: MariaDBInstance, replicas: list[MariaDBInstance], proxy: ProxyProcess) -> None:
        self.primary = primary
        self.replicas = replicas
        self.proxy = proxy

    def connect(self, endpoint: str) -> pymysql.Connection[Any]:
        return pymysql.connect(host="127.0.0.1", port=self.proxy.ports[endpoint], user="app", password="app-secret",
                               database="app", autocommit=True, connect_timeout=10)

    def read(self, endpoint: str) -> Callable[[], int]:
        conn = self.connect(endpoint)

        def read() -> int:
            with conn.cursor() as cursor:
                cursor.execute("SELECT @@port")
                row = cursor.fetchone()
            assert row is not None
            return int(row[0])
        return read

    def ports(self) -> set[int]:
        return {replica.port for replica in self.replicas}


@pytest.fixture(scope="module")
def my(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MyCluster]:
    base = tmp_path_factory.mktemp("mariadb")
    primary = start_mariadb(base / "primary", users={"app": "app-secret"})
    replicas: list[MariaDBInstance] = []
    proxy: ProxyProcess | None = None
    os.environ["DBPROXY_PASSWORD_" + MONITOR.upper()] = MONITOR_PASSWORD
    try:
        replicas = [start_mariadb_replica(primary, base / f"replica{n}", server_id=n + 1) for n in (1, 2)]
        primary.sql(monitor_user_sql()
                    + "CREATE TABLE app.t (id INT AUTO_INCREMENT PRIMARY KEY, at TIMESTAMP(6) DEFAULT NOW(6));")
        position = primary.sql("SELECT @@gtid_binlog_pos")
        for replica in replicas:
            replica.wait_caught_up(position)
        instances = [{"name": "p", "host": primary.host, "port": primary.port, "role": "writer"},
                     *({"name": f"s{n}", "host": r.host, "port": r.port, "role": "reader"}
                       for n, r in enumerate(replicas, 1))]
        proxy = _start_proxy(base / "proxy", "mysql", instances, MONITOR)
        for replica in replicas:
            proxy.wait_for_log(rf"instance .*:{replica.port} is now reader")
        yield MyCluster(primary, replicas, proxy)
    finally:
        if proxy is not None:
            proxy.stop()
        for replica in replicas:
            replica.stop()
        primary.stop()
        del os.environ["DBPROXY_PASSWORD_" + MONITOR.upper()]


def test_mariadb_reads_spread_over_both_replicas(my: MyCluster) -> None:
    counts = _spread([my.read("ro") for _ in range(4)], 50)
    _fair(counts, my.ports())
    sequential = _calls(my.read("ro"), 20)
    assert set(sequential) == my.ports() and min(sequential.values()) >= 8, sequential
    others = _calls(my.read("others"), 20)
    assert set(others) == {my.primary.port, my.replicas[0].port}, others
    text = scrape(my.proxy)
    for label in ("s1", "s2"):
        assert metric_value(text, "dbproxy_database_connection_borrows_total", endpoint="ro", instance=label) >= 40
    print(f"MariaDB reads over the replicas, 4 clients: {dict(counts)}; one client: {dict(sequential)}")


def test_mariadb_session_pooling_spreads_sessions(my: MyCluster) -> None:
    _session_pooling_spreads_sessions(lambda: my.read("ro_session"), my.ports())


def test_mariadb_session_state_follows_the_client_across_replicas(my: MyCluster) -> None:
    conn = my.connect("ro")
    try:
        with conn.cursor() as cursor:
            cursor.execute("SET @marker = 41, SESSION sql_mode = 'ANSI_QUOTES'")
            seen: Counter[int] = Counter()
            for _ in range(20):
                cursor.execute("SELECT @@port, @marker + 1, @@SESSION.sql_mode")
                row = cursor.fetchone()
                assert row is not None and row[1:] == (42, "ANSI_QUOTES"), row
                seen[int(row[0])] += 1
        assert set(seen) == my.ports(), seen
    finally:
        conn.close()
    # Server-side prepared statements (binary protocol) run wherever the next execution goes.
    prepared_conn = mysql.connector.connect(host="127.0.0.1", port=my.proxy.ports["ro"], user="app",
                                            password="app-secret", database="app", autocommit=True)
    try:
        cursor = prepared_conn.cursor(prepared=True)
        ports: Counter[int] = Counter()
        for number in range(20):
            cursor.execute("SELECT @@port, ? + 1", (number,))
            port, value = cursor.fetchone()
            assert int(value) == number + 1
            ports[int(port)] += 1
        cursor.close()
    finally:
        prepared_conn.close()
    assert set(ports) <= my.ports() and ports, ports


def test_mariadb_a_paused_replica_is_left_out_until_it_replays_again(my: MyCluster) -> None:
    r1, r2 = my.replicas
    logs = Logs(my.proxy)
    writer = my.connect("rw")

    def write() -> None:
        with writer.cursor() as cursor:
            cursor.execute("INSERT INTO t () VALUES ()")

    ro, strict = my.read("ro"), my.read("strict")
    with Writes(write) as writes:
        r1.pause_replay()  # its lag is not known while the SQL thread stands: left out at once
        paused_at = time.monotonic()
        try:
            logs.wait(r"endpoint ro: now serving s2 \(.*\); left out: p \(writer\), s1 \(lag unknown\)")
            left_after = time.monotonic() - paused_at
            logs.wait(r"endpoint strict: now serving s2 ")
            assert Counter(ro() for _ in range(20)) == {r2.port: 20}
            assert Counter(strict() for _ in range(20)) == {r2.port: 20}
        finally:
            logs.mark()
            r1.resume_replay()
        resumed_at = time.monotonic()
        logs.wait(r"endpoint ro: now serving s1 \(.*\), s2 \(")
        back_after = time.monotonic() - resumed_at
    assert not writes.errors, writes.errors[:3]
    writer.close()
    assert set(Counter(ro() for _ in range(20))) == my.ports()
    assert left_after < 2.0 and back_after < 2.0, (left_after, back_after)
    print(f"MariaDB: paused replica left out {left_after:.2f} s after the pause, back {back_after:.2f} s after "
          "the resume")


def test_mariadb_without_replicas_reads_go_to_the_writer_or_wait(my: MyCluster) -> None:
    logs = Logs(my.proxy)
    ro = my.read("ro")
    waiting = my.connect("strict")
    for replica in my.replicas:
        replica.stop()
    logs.wait(r"endpoint ro: now serving p \(.*\); left out: s1 \(unhealthy\), s2 \(unhealthy\); no reader is "
              r"eligible; the writer serves meanwhile")
    logs.wait(r"endpoint strict: now serving nothing; .*new work waits for one")
    assert Counter(ro() for _ in range(10)) == {my.primary.port: 10}
    assert my.read("ro")() == my.primary.port
    started = time.monotonic()
    with pytest.raises(pymysql.err.OperationalError) as failure:
        with waiting.cursor() as cursor:
            cursor.execute("SELECT @@port")
    waited = time.monotonic() - started
    assert failure.value.args[0] == 1040, failure.value
    assert f"timed out after {STRICT_TIMEOUT:g} s waiting for a backend connection" in str(failure.value)
    assert STRICT_TIMEOUT - 0.2 <= waited < STRICT_TIMEOUT + 2.0, waited
    print(f"MariaDB: without replicas, reads on the writer; without fallback the borrow timed out after "
          f"{waited:.2f} s")
