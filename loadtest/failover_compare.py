"""Write unavailability after a failover, side by side: clients through the proxy and clients that reconnect.

Per engine and round: a primary and a streaming standby (PostgreSQL) or GTID replica (MariaDB) from
devtools.servers, dbproxy with a monitored cluster (``monitor_interval`` 0.2 s) and a ``read_write`` endpoint,
and N writer clients of each kind inserting one row every ~10 ms in autocommit:

* ``proxy``: connected to the proxy's ``read_write`` endpoint; it opens a new connection only when the one it
  has is gone;
* ``direct``: connected to the servers themselves, reconnecting on any error to the host list as applications
  do: psycopg with ``host=h1,h2 port=p1,p2 target_session_attrs=read-write``; for MariaDB, PyMySQL trying each
  host and keeping the first whose ``@@read_only`` is 0.

The harness kills the primary (SIGKILL to all its processes, as a crash would), waits ``--gap`` seconds, then
promotes the standby (``PostgresInstance.promote()``, ``MariaDBInstance.promote()``) while watching it, every
2 ms over a connection of its own, for the instant it takes writes. For each client it measures the time from
that instant to its first successful write (of those started after the kill), the errors it saw from the kill
until then, and the connections it had to open (none: the connection was kept). It prints a table (median and
max per kind, the ratio proxy / direct) and saves the rounds and the summary as JSON in
``loadtest/results/failover_compare.json``.

    python -m loadtest.failover_compare                      # both engines, 3 rounds, 4 clients of each kind
    python -m loadtest.failover_compare --engines postgresql --rounds 1 --clients 2 --no-write
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import psutil
import psycopg
import pymysql

from devtools.servers import (
    DevServerError,
    MariaDBInstance,
    PostgresInstance,
    free_port,
    start_mariadb,
    start_mariadb_replica,
    start_postgres,
    start_postgres_standby,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_FILE = REPO_ROOT / "loadtest" / "results" / "failover_compare.json"
POSTGRESQL = "postgresql"
MYSQL = "mysql"
ENGINES = (POSTGRESQL, MYSQL)
PROXY = "proxy"
DIRECT = "direct"
KINDS = (PROXY, DIRECT)
USER = "app"
PASSWORD = "app-failover-secret"
MONITOR_USER = "monitor"
MONITOR_PASSWORD = "monitor-failover-secret"
MONITOR_INTERVAL = 0.2
TARGET_SECONDS = 1.0  # through the proxy: the first write within this long after the promotion
START_TIMEOUT = 30.0
DRIVER_ERRORS: tuple[type[Exception], ...] = (psycopg.Error, pymysql.Error, OSError)
CONNECT_ERRORS: tuple[type[Exception], ...] = (*DRIVER_ERRORS, ConnectionError)


class Session(Protocol):
    """One client connection able to write a row."""

    def write(self, kind: str, client: int) -> None: ...
    def broken(self) -> bool: ...
    def close(self) -> None: ...


class PgSession:
    def __init__(self, conninfo: str) -> None:
        self.conn = psycopg.connect(conninfo, autocommit=True)

    def write(self, kind: str, client: int) -> None:
        self.conn.execute("INSERT INTO writes (kind, client) VALUES (%s, %s)", (kind, client))

    def broken(self) -> bool:
        return self.conn.closed or self.conn.broken

    def close(self) -> None:
        self.conn.close()


class MySQLSession:
    def __init__(self, conn: pymysql.connections.Connection[Any]) -> None:
        self.conn = conn

    def write(self, kind: str, client: int) -> None:
        with self.conn.cursor() as cursor:
            cursor.execute("INSERT INTO writes (kind, client) VALUES (%s, %s)", (kind, client))

    def broken(self) -> bool:
        return not self.conn.open

    def close(self) -> None:
        with contextlib.suppress(*DRIVER_ERRORS):
            self.conn.close()


def _mysql_connect(host: str, port: int, timeout: float = 2.0) -> pymysql.connections.Connection[Any]:
    return pymysql.connect(host=host, port=port, user=USER, password=PASSWORD, database=USER, autocommit=True,
                           connect_timeout=timeout, read_timeout=30, write_timeout=30)


class MySQLHostList:
    """An application's MariaDB failover loop: the first host that accepts a connection and is not read-only,
    starting with the one that worked last."""

    def __init__(self, hosts: list[tuple[str, int]]) -> None:
        self.hosts = hosts
        self.last_good = 0

    def connect(self) -> MySQLSession:
        count = len(self.hosts)
        for index in ((self.last_good + step) % count for step in range(count)):
            host, port = self.hosts[index]
            try:
                conn = _mysql_connect(host, port, timeout=1.0)
            except DRIVER_ERRORS:
                continue
            try:
                with conn.cursor() as cursor:
                    cursor.execute("SELECT @@read_only")
                    row = cursor.fetchone()
                if row is not None and int(row[0]) == 0:
                    self.last_good = index
                    return MySQLSession(conn)
            except DRIVER_ERRORS:
                pass
            with contextlib.suppress(*DRIVER_ERRORS):
                conn.close()
        raise ConnectionError(f"no writable instance among {self.hosts}")


@dataclass
class Writer:
    """A client writing a row every `pause` seconds until stopped, noting each success, error and new connection."""

    kind: str
    number: int
    connect: Callable[[], Session]
    reconnect_on_any_error: bool  # direct clients; proxy clients reconnect only when their connection is gone
    pause: float
    successes: list[tuple[float, float]] = field(default_factory=list)  # (started, ended) of each write
    errors: list[tuple[float, str]] = field(default_factory=list)
    connects: list[float] = field(default_factory=list)

    def run(self, stop: threading.Event) -> None:
        session: Session | None = None
        while not stop.is_set():
            if session is None:
                try:
                    session = self.connect()
                    self.connects.append(time.monotonic())
                except CONNECT_ERRORS as exc:
                    self.errors.append((time.monotonic(), _error_text(exc)))
                    time.sleep(self.pause)
                    continue
            started = time.monotonic()
            try:
                session.write(self.kind, self.number)
                self.successes.append((started, time.monotonic()))
            except DRIVER_ERRORS as exc:
                self.errors.append((time.monotonic(), _error_text(exc)))
                if self.reconnect_on_any_error or session.broken():
                    session.close()
                    session = None
            time.sleep(self.pause)
        if session is not None:
            session.close()


def _error_text(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".replace(PASSWORD, "***").replace(MONITOR_PASSWORD, "***")
    return text.splitlines()[0][:200] if text else type(exc).__name__


@dataclass
class ClientOutcome:
    kind: str
    client: int
    # From the instant the promoted standby was seen taking writes to the first successful write since the kill;
    # None: none in time. It may be a few milliseconds below 0: the standby is watched every few milliseconds.
    unavailable_s: float | None
    since_kill_s: float | None  # from the kill to that write
    errors: int  # errors seen from the kill until that write
    new_connections: int  # connections opened from the kill until that write
    writes_before_kill: int
    first_error: str


@dataclass
class Round:
    engine: str
    number: int
    gap_s: float  # from the kill to the promotion's start
    promote_s: float  # how long the promotion command took
    writable_s: float  # from the promotion's start until the standby was seen taking writes
    clients: list[ClientOutcome]
    proxy_log_lines: list[str]  # the monitor's and endpoints' view of the failover


def outcome(writer: Writer, killed_at: float, promoted_at: float) -> ClientOutcome:
    """What `writer` saw of a failover: the primary's processes were killed at `killed_at` (so a write started
    later can only have succeeded on the promoted standby), the standby took writes from `promoted_at`."""
    first = next((ended for started, ended in writer.successes if started > killed_at), None)
    until = first if first is not None else float("inf")
    errors = [text for t, text in writer.errors if killed_at <= t <= until]
    return ClientOutcome(
        kind=writer.kind, client=writer.number,
        unavailable_s=None if first is None else first - promoted_at,
        since_kill_s=None if first is None else first - killed_at,
        errors=len(errors),
        new_connections=sum(1 for t in writer.connects if killed_at <= t <= until),
        writes_before_kill=sum(1 for _, ended in writer.successes if ended < killed_at),
        first_error=errors[0] if errors else "",
    )


# ----------------------------------------------------------------------------------------------- the proxy


class Proxy:
    """``python -m proxy run -c CONFIG`` with one monitored cluster of two instances and a read_write endpoint."""

    def __init__(self, folder: Path, engine: str, writer: tuple[str, int], reader: tuple[str, int],
                 clients: int) -> None:
        self.folder = folder
        self.port = free_port()
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "secrets.toml").write_text(f'[users]\n{USER} = "{PASSWORD}"\n{MONITOR_USER} = "{MONITOR_PASSWORD}"\n')
        other = MYSQL if engine == POSTGRESQL else POSTGRESQL
        lines = [
            "[server]", 'log_level = "info"', "workers = 1", "shutdown_grace = 1.0",
            "[secrets]", 'file = "secrets.toml"',
            f"[{other}]", "enabled = false",
            f"[{engine}.pool]", f"max_connections = {clients}", "connection_borrow_timeout = 15.0",
            f"[{engine}.clusters.main]",
            "instances = [",
            f'  {{ name = "one", host = "{writer[0]}", port = {writer[1]}, role = "writer" }},',
            f'  {{ name = "two", host = "{reader[0]}", port = {reader[1]}, role = "reader" }},',
            "]",
            f"monitor_interval = {MONITOR_INTERVAL}", f'monitor_user = "{MONITOR_USER}"',
            f"[{engine}.endpoints.rw]", f"port = {self.port}", 'cluster = "main"', 'role = "read_write"',
        ]
        self.config = folder / "proxy.toml"
        self.config.write_text("\n".join(lines) + "\n")
        self.log_file = folder / "proxy.log"
        self.process: subprocess.Popen[str] | None = None

    def start(self, writer_port: int) -> None:
        with self.log_file.open("w") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "proxy", "run", "-c", str(self.config)], stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE, stderr=log, text=True, cwd=REPO_ROOT, start_new_session=True,
                env=dict(os.environ, PYTHONUNBUFFERED="1"))
        stdout = self.process.stdout
        assert stdout is not None
        ready = threading.Event()

        def drain() -> None:
            for line in stdout:
                if line.startswith("dbproxy ready"):
                    ready.set()
            ready.set()

        threading.Thread(target=drain, daemon=True).start()
        if not ready.wait(START_TIMEOUT) or self.process.poll() is not None:
            self.stop()
            raise RuntimeError(f"the proxy did not start:\n{self.log_file.read_text()[-3000:]}")
        self.wait_for_log(rf"instance \S+:{writer_port} is now writer", START_TIMEOUT)

    def wait_for_log(self, pattern: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if re.search(pattern, self.log_file.read_text()):
                return
            time.sleep(0.05)
        raise RuntimeError(f"no proxy log line matches {pattern!r}:\n{self.log_file.read_text()[-3000:]}")

    def failover_lines(self) -> list[str]:
        keep = re.compile(r"proxy\.topology|endpoint rw|writer|unhealthy")
        return [line for line in self.log_file.read_text().splitlines() if keep.search(line)][-12:]

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None


# ----------------------------------------------------------------------------------------------- the servers


@dataclass
class Pair:
    """A primary and its standby/replica, and how to kill the one and promote the other."""

    primary: PostgresInstance | MariaDBInstance
    standby: PostgresInstance | MariaDBInstance

    def kill_primary(self) -> float:
        """SIGKILL every process of the primary at once, as a crash of its machine would (PostgreSQL: the
        postmaster and its backends, which would otherwise serve their sessions until they notice); returns the
        instant the signals were sent."""
        pid = self.primary.pid
        if pid is None:
            raise RuntimeError("the primary is not running")
        pids = [pid]
        if isinstance(self.primary, PostgresInstance):
            with contextlib.suppress(psutil.Error):
                pids += [child.pid for child in psutil.Process(pid).children(recursive=True)]
        for each in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(each, signal.SIGKILL)
        killed_at = time.monotonic()
        if isinstance(self.primary, PostgresInstance):
            self.primary.kill()  # waits for the postmaster's end, removes its lock files
        else:
            self.primary.stop()  # reaps the killed process
        return killed_at

    def stop(self) -> None:
        self.standby.stop()
        self.primary.stop()


@contextlib.contextmanager
def server_pair(engine: str, folder: Path) -> Iterator[Pair]:
    primary: PostgresInstance | MariaDBInstance
    standby: PostgresInstance | MariaDBInstance
    if engine == POSTGRESQL:
        postgres = primary = start_postgres(folder, users={USER: PASSWORD})
        try:
            postgres.psql(f"CREATE ROLE {MONITOR_USER} LOGIN PASSWORD '{MONITOR_PASSWORD}' IN ROLE pg_monitor;")
            postgres.psql("CREATE TABLE writes (id bigserial PRIMARY KEY, kind text, client int, "
                          "at timestamptz DEFAULT clock_timestamp())", user=USER, db=USER)
            standby = start_postgres_standby(postgres, folder)
        except BaseException:
            postgres.stop()
            raise
    else:
        mariadb = primary = start_mariadb(folder / "primary", users={USER: PASSWORD})
        try:
            replica = standby = start_mariadb_replica(mariadb, folder / "replica")
            mariadb.sql(f"CREATE USER {MONITOR_USER}@'%' IDENTIFIED BY '{MONITOR_PASSWORD}';\n"
                        f"GRANT REPLICA MONITOR ON *.* TO {MONITOR_USER}@'%';\n"
                        f"CREATE TABLE {USER}.writes (id BIGINT AUTO_INCREMENT PRIMARY KEY, kind VARCHAR(10), "
                        "client INT, at TIMESTAMP(6) DEFAULT CURRENT_TIMESTAMP(6));")
            replica.wait_caught_up(mariadb.sql("SELECT @@gtid_binlog_pos"))
        except BaseException:
            mariadb.stop()
            raise
    pair = Pair(primary, standby)
    try:
        yield pair
    finally:
        pair.stop()


def direct_connector(engine: str, pair: Pair) -> Callable[[], Session]:
    hosts = [(pair.primary.host, pair.primary.port), (pair.standby.host, pair.standby.port)]
    if engine == POSTGRESQL:
        conninfo = (f"host={','.join(h for h, _ in hosts)} port={','.join(str(p) for _, p in hosts)} "
                    f"dbname={USER} user={USER} password={PASSWORD} target_session_attrs=read-write "
                    "connect_timeout=2")
        return lambda: PgSession(conninfo)
    return MySQLHostList(hosts).connect


def proxy_connector(engine: str, port: int) -> Callable[[], Session]:
    if engine == POSTGRESQL:
        conninfo = f"host=127.0.0.1 port={port} dbname={USER} user={USER} password={PASSWORD} connect_timeout=2"
        return lambda: PgSession(conninfo)
    return lambda: MySQLSession(_mysql_connect("127.0.0.1", port))


class WritableWatch:
    """Watches the standby over a connection of its own, from `start` on, for the instant it takes writes."""

    def __init__(self, standby: PostgresInstance | MariaDBInstance) -> None:
        self.check: Callable[[], bool]
        if isinstance(standby, PostgresInstance):
            pg = psycopg.connect(standby.dsn(standby.superuser, db="postgres"), autocommit=True)
            self.close: Callable[[], None] = pg.close
            self.check = lambda: pg.execute("SELECT NOT pg_is_in_recovery()").fetchone() == (True,)
        else:
            my = pymysql.connect(**standby.connect_kwargs(), autocommit=True)
            self.close = my.close

            def writable() -> bool:
                with my.cursor() as cursor:
                    cursor.execute("SELECT @@read_only")
                    row = cursor.fetchone()
                return row is not None and int(row[0]) == 0

            self.check = writable
        self.seen_at: float | None = None
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.deadline = 0.0

    def start(self, timeout: float = START_TIMEOUT) -> None:
        self.deadline = time.monotonic() + timeout
        self.thread.start()

    def _watch(self) -> None:
        try:
            while time.monotonic() < self.deadline:
                if self.check():
                    self.seen_at = time.monotonic()
                    return
                time.sleep(0.002)
        finally:
            with contextlib.suppress(*DRIVER_ERRORS):
                self.close()

    def wait(self) -> float:
        """The instant the standby was first seen taking writes."""
        self.thread.join(max(0.0, self.deadline - time.monotonic()) + 1.0)
        if self.seen_at is None:
            raise RuntimeError("the promoted standby never took writes")
        return self.seen_at


# ----------------------------------------------------------------------------------------------- one round


def run_round(engine: str, number: int, folder: Path, args: argparse.Namespace) -> Round:
    with server_pair(engine, folder) as pair:
        proxy = Proxy(folder / "proxy", engine, (pair.primary.host, pair.primary.port),
                      (pair.standby.host, pair.standby.port), args.clients)
        proxy.start(pair.primary.port)
        stop = threading.Event()
        threads: list[threading.Thread] = []
        try:
            writers = [Writer(PROXY, n, proxy_connector(engine, proxy.port), False, args.pause)
                       for n in range(args.clients)]
            writers += [Writer(DIRECT, n, direct_connector(engine, pair), True, args.pause)
                        for n in range(args.clients)]
            threads = [threading.Thread(target=w.run, args=(stop,), daemon=True) for w in writers]
            for thread in threads:
                thread.start()
            _wait_until(lambda: all(w.successes for w in writers), START_TIMEOUT, "every client writes")
            watch = WritableWatch(pair.standby)
            time.sleep(args.warmup)
            killed_at = pair.kill_primary()
            time.sleep(max(0.0, killed_at + args.gap - time.monotonic()))
            promoting_at = time.monotonic()
            watch.start()
            pair.standby.promote()
            promote_s = time.monotonic() - promoting_at
            promoted_at = watch.wait()
            with contextlib.suppress(TimeoutError):
                _wait_until(lambda: all(any(started > killed_at for started, _ in w.successes) for w in writers),
                            args.wait,
                            "every client writes after the promotion")
            time.sleep(0.2)
        finally:
            stop.set()
            for thread in threads:
                thread.join(10)
            proxy.stop()
        return Round(engine, number, gap_s=promoting_at - killed_at, promote_s=promote_s,
                     writable_s=promoted_at - promoting_at,
                     clients=[outcome(w, killed_at, promoted_at) for w in writers],
                     proxy_log_lines=proxy.failover_lines())


def _wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"not within {timeout:.0f} s: {what}")
        time.sleep(0.01)


# ----------------------------------------------------------------------------------------------- the report


@dataclass
class Summary:
    engine: str
    kind: str
    clients: int  # client outcomes over all rounds
    wrote_again: int  # of them, clients that wrote after the promotion within the wait
    median_s: float | None
    max_s: float | None
    errors_median: float
    errors_max: int
    kept_connection: int  # clients that needed no new connection
    target_met: bool | None  # proxy: every client wrote within TARGET_SECONDS; direct: None


def summarize(rounds: list[Round]) -> list[Summary]:
    summaries = []
    for engine in ENGINES:
        for kind in KINDS:
            outcomes = [c for r in rounds if r.engine == engine for c in r.clients if c.kind == kind]
            if not outcomes:
                continue
            times = [c.unavailable_s for c in outcomes if c.unavailable_s is not None]
            all_wrote = len(times) == len(outcomes)
            summaries.append(Summary(
                engine=engine, kind=kind, clients=len(outcomes), wrote_again=len(times),
                median_s=statistics.median(times) if times else None,
                max_s=max(times) if all_wrote and times else None,
                errors_median=statistics.median(c.errors for c in outcomes),
                errors_max=max(c.errors for c in outcomes),
                kept_connection=sum(1 for c in outcomes if c.new_connections == 0),
                target_met=(all_wrote and max(times) < TARGET_SECONDS) if kind == PROXY else None,
            ))
    return summaries


def _seconds(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f}"


def _ratio(numerator: float | None, denominator: float | None) -> str:
    if numerator is None or denominator is None or denominator <= 0:
        return "—"
    return f"{numerator / denominator:.2f}x"


def report(rounds: list[Round], summaries: list[Summary], args: argparse.Namespace) -> str:
    lines = [
        f"failover: SIGKILL the primary, promote the standby {args.gap:g} s later; {args.clients} writer clients of "
        f"each kind, one autocommit INSERT every {args.pause * 1000:.0f} ms; proxy monitor_interval "
        f"{MONITOR_INTERVAL:g} s",
        f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} (1 min) at the end",
        "unavailable = seconds from the instant the promoted standby takes writes (watched every 2 ms) to each "
        "client's first successful write",
        "",
        "per round:",
    ]
    for r in rounds:
        cells = []
        for kind in KINDS:
            times = [c.unavailable_s for c in r.clients if c.kind == kind]
            shown = ", ".join(_seconds(t) for t in times)
            cells.append(f"{kind} [{shown}]")
        lines.append(f"  {r.engine:<10} round {r.number}: writable {r.writable_s:.3f} s into the promotion "
                     f"(its command took {r.promote_s:.3f} s); " + "; ".join(cells))
    header = f"{'engine':<10} {'kind':<6} {'wrote/clients':>13} {'median s':>9} {'max s':>8} " \
             f"{'errors med/max':>14} {'connection kept':>15}"
    lines += ["", header, "-" * len(header)]
    for s in summaries:
        lines.append(f"{s.engine:<10} {s.kind:<6} {f'{s.wrote_again}/{s.clients}':>13} {_seconds(s.median_s):>9} "
                     f"{_seconds(s.max_s):>8} {f'{s.errors_median:g}/{s.errors_max}':>14} "
                     f"{f'{s.kept_connection}/{s.clients}':>15}")
    lines.append("")
    for engine in ENGINES:
        by_kind = {s.kind: s for s in summaries if s.engine == engine}
        if PROXY in by_kind and DIRECT in by_kind:
            proxy, direct = by_kind[PROXY], by_kind[DIRECT]
            verdict = "met" if proxy.target_met else "NOT met"
            lines.append(f"{engine}: proxy / direct median {_ratio(proxy.median_s, direct.median_s)}, max "
                         f"{_ratio(proxy.max_s, direct.max_s)}; proxy under {TARGET_SECONDS:g} s after the "
                         f"promotion: {verdict}")
    return "\n".join(lines)


def save(path: Path, rounds: list[Round], summaries: list[Summary], failures: list[str],
         args: argparse.Namespace) -> None:
    meta = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "clients": args.clients,
            "pause_s": args.pause, "gap_s": args.gap, "monitor_interval_s": MONITOR_INTERVAL,
            "target_s": TARGET_SECONDS, "cpus": os.cpu_count(), "load_average": os.getloadavg()}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"meta": meta, "failures": failures, "summary": [asdict(s) for s in summaries],
                                "rounds": [asdict(r) for r in rounds]}, indent=1))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m loadtest.failover_compare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engines", default=",".join(ENGINES), help="postgresql, mysql or both (comma-separated)")
    parser.add_argument("--rounds", type=int, default=3, help="failovers per engine")
    parser.add_argument("--clients", type=int, default=4, help="writer clients of each kind")
    parser.add_argument("--pause", type=float, default=0.01, help="seconds between a client's writes")
    parser.add_argument("--gap", type=float, default=1.0, help="seconds from the kill to the promotion's start")
    parser.add_argument("--warmup", type=float, default=0.5, help="seconds of writing before the kill")
    parser.add_argument("--wait", type=float, default=10.0, help="longest wait for the writes after the promotion")
    parser.add_argument("--time-limit", type=float, default=600.0, help="start no round after this many seconds")
    parser.add_argument("--results", type=Path, default=RESULTS_FILE, help="where to save the JSON")
    parser.add_argument("--no-write", action="store_true", help="print only; save no JSON")
    parser.add_argument("--keep-workdir", action="store_true", help="keep the servers' and the proxy's logs")
    args = parser.parse_args(argv)
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    unknown = [e for e in engines if e not in ENGINES]
    if unknown or not engines:
        parser.error(f"--engines: {unknown or 'none given'}; choose from {', '.join(ENGINES)}")
    args.engines = engines
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    began = time.monotonic()
    rounds: list[Round] = []
    failures: list[str] = []
    workdir = Path(tempfile.mkdtemp(prefix="dbproxy-failover-"))
    try:
        for number in range(1, args.rounds + 1):
            for engine in args.engines:
                if time.monotonic() - began > args.time_limit:
                    print(f"[failover] time limit of {args.time_limit:g} s reached; no more rounds", file=sys.stderr)
                    break
                print(f"[failover] {engine} round {number} ...", file=sys.stderr, flush=True)
                try:
                    rounds.append(run_round(engine, number, workdir / f"{engine}-{number}", args))
                except (RuntimeError, TimeoutError, DevServerError) as exc:  # one round's trouble, reported
                    failures.append(f"{engine} round {number}: {exc}")
                    print(f"[failover] {failures[-1]}", file=sys.stderr, flush=True)
    finally:
        if args.keep_workdir:
            print(f"[failover] kept {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    summaries = summarize(rounds)
    print(report(rounds, summaries, args))
    for failure in failures:
        print(f"FAILED: {failure}")
    if not args.no_write:
        save(args.results, rounds, summaries, failures, args)
        print(f"\nsaved {args.results}")
    return 0 if not failures and all(s.target_met is not False for s in summaries) else 1


if __name__ == "__main__":
    sys.exit(main())
