"""Samplers that run beside a scenario: the middleman's CPU time and peak RSS, and the backend connection count."""

from __future__ import annotations

import bisect
import contextlib
import threading
import time
from dataclasses import dataclass
from types import TracebackType
from typing import Protocol, Self

import psutil

from devtools.servers import MariaDBInstance, PostgresInstance
from loadtest.targets import BENCH_USER

SAMPLE_INTERVAL = 0.2
#: Seconds left out after the first completed transaction (clients still logging in) and before the last.
STEADY_SKIP_START = 0.5
STEADY_SKIP_END = 0.3
#: The shortest steady window whose CPU is used; psutil's CPU times tick every 10 ms.
STEADY_MIN_SECONDS = 2.0


def _tree(process: psutil.Process) -> list[psutil.Process]:
    """The process and its children (a future multi-worker proxy forks workers)."""
    try:
        return [process, *process.children(recursive=True)]
    except psutil.Error:
        return [process]


def cpu_split(process: psutil.Process) -> tuple[float, float]:
    """(user, system) CPU time of the process tree so far, including children it has already reaped."""
    user = system = 0.0
    for proc in _tree(process):
        with contextlib.suppress(psutil.Error):
            times = proc.cpu_times()
            user += times.user + times.children_user
            system += times.system + times.children_system
    return user, system


def cpu_seconds(process: psutil.Process) -> float:
    """User + system CPU time of the process tree so far."""
    return sum(cpu_split(process))


def rss_bytes(process: psutil.Process) -> int:
    """Resident set size of the process tree now."""
    total = 0
    for proc in _tree(process):
        with contextlib.suppress(psutil.Error):
            total += proc.memory_info().rss
    return total


@dataclass
class ProcessUsage:
    """What a middleman process used during one scenario."""

    cpu_seconds: float
    peak_rss_bytes: int
    user_seconds: float = 0.0
    system_seconds: float = 0.0


class ProcessSampler:
    """CPU delta over the scenario (psutil cpu_times) and peak RSS (sampled every 0.2 s) of one process tree."""

    def __init__(self, process: psutil.Process | None, interval: float = SAMPLE_INTERVAL) -> None:
        self.process = process
        self.interval = interval
        self._cpu_start = (0.0, 0.0)
        self._peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.usage: ProcessUsage | None = None
        #: (seconds since the epoch, user, system) of the tree, every interval: CPU over any window of the run
        self.samples: list[tuple[float, float, float]] = []

    def _sample_cpu(self) -> None:
        assert self.process is not None
        user, system = cpu_split(self.process)
        self.samples.append((time.time(), user, system))

    def _run(self) -> None:
        assert self.process is not None
        while not self._stop.is_set():
            self._peak = max(self._peak, rss_bytes(self.process))
            self._sample_cpu()
            self._stop.wait(self.interval)

    def __enter__(self) -> Self:
        if self.process is not None:
            self._cpu_start = cpu_split(self.process)
            self._peak = rss_bytes(self.process)
            self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self.process is None or self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._peak = max(self._peak, rss_bytes(self.process))
        user, system = cpu_split(self.process)
        user, system = user - self._cpu_start[0], system - self._cpu_start[1]
        self.usage = ProcessUsage(user + system, self._peak, user, system)

    def steady_cpu_per_tx(self, completions: list[float]) -> tuple[float, float, int] | None:
        """(user, system) CPU µs per transaction over the steady part of the run, and its transactions.

        The window runs from a sample just after the first completions (all clients logged in: their
        authentication is not a transaction's cost) to one before the last, and the transactions counted are
        those completed between the two samples. None when the run is too short for a steady window.
        """
        if not completions or len(self.samples) < 3:
            return None
        start, end = completions[0] + STEADY_SKIP_START, completions[-1] - STEADY_SKIP_END
        inside = [s for s in self.samples if start <= s[0] <= end]
        if len(inside) < 2 or inside[-1][0] - inside[0][0] < STEADY_MIN_SECONDS:
            return None
        first, last = inside[0], inside[-1]
        done = bisect.bisect_right(completions, last[0]) - bisect.bisect_right(completions, first[0])
        if done <= 0:
            return None
        return (last[1] - first[1]) * 1e6 / done, (last[2] - first[2]) * 1e6 / done, done


class ConnectionCounter(Protocol):
    """Lists the client ports of the benchmark user's sessions on a database server."""

    backend_port: int

    def client_ports(self) -> list[int]: ...

    def close(self) -> None: ...


class PostgresConnectionCounter:
    """``pg_stat_activity`` client backends of the benchmark user, over the trusted unix socket as superuser."""

    QUERY = ("SELECT client_port FROM pg_stat_activity WHERE usename = %s AND backend_type = 'client backend' "
             "AND client_port IS NOT NULL")

    def __init__(self, server: PostgresInstance) -> None:
        import psycopg

        self.backend_port = server.port
        self._conn = psycopg.connect(host=str(server.socket_dir), port=server.port, user=server.superuser,
                                     dbname="postgres", autocommit=True, connect_timeout=10)
        self._lock = threading.Lock()

    def client_ports(self) -> list[int]:
        with self._lock:
            rows = self._conn.execute(self.QUERY, (BENCH_USER,)).fetchall()
        return [int(row[0]) for row in rows]

    def close(self) -> None:
        self._conn.close()


class MariaDBConnectionCounter:
    """``information_schema.processlist`` sessions of the benchmark user, over the unix socket as root."""

    QUERY = "SELECT HOST FROM information_schema.PROCESSLIST WHERE USER = %s"

    def __init__(self, server: MariaDBInstance) -> None:
        import pymysql

        self.backend_port = server.port
        self._conn = pymysql.connect(unix_socket=str(server.socket_path), user="root", password=server.root_password,
                                     autocommit=True, connect_timeout=10)
        self._lock = threading.Lock()

    def client_ports(self) -> list[int]:
        with self._lock, self._conn.cursor() as cursor:
            cursor.execute(self.QUERY, (BENCH_USER,))
            rows = cursor.fetchall()
        ports = []
        for (host,) in rows:
            _, _, port = str(host).rpartition(":")
            if port.isdigit():
                ports.append(int(port))
        return ports

    def close(self) -> None:
        self._conn.close()


def ports_towards(process: psutil.Process, backend_port: int) -> set[int]:
    """Local ports of the process tree's TCP connections to ``backend_port``: its backend connections."""
    ports: set[int] = set()
    for proc in _tree(process):
        with contextlib.suppress(psutil.Error):
            for conn in proc.net_connections(kind="tcp"):
                if conn.raddr and conn.raddr.port == backend_port and conn.laddr:
                    ports.add(conn.laddr.port)
    return ports


class BackendSampler:
    """Maximum number of database sessions of the benchmark user that belong to one target during a scenario.

    Sessions are matched to their owner by client port: a middleman's (PgBouncer's, the proxy's) are those
    whose port is the local end of one of its TCP connections to the database; a direct run's are the
    benchmark user's sessions that belong to no middleman (the other middlemen keep idle pooled ones).
    """

    def __init__(self, counter: ConnectionCounter | None, owner: psutil.Process | None,
                 middlemen: list[psutil.Process], interval: float = SAMPLE_INTERVAL) -> None:
        self.counter = counter
        self.owner = owner
        self.middlemen = middlemen
        self.interval = interval
        self.maximum = 0
        self.error = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def count(self) -> int:
        assert self.counter is not None
        sessions = set(self.counter.client_ports())
        if self.owner is not None:
            return len(sessions & ports_towards(self.owner, self.counter.backend_port))
        for middleman in self.middlemen:
            sessions -= ports_towards(middleman, self.counter.backend_port)
        return len(sessions)

    def _sample(self) -> None:
        try:
            self.maximum = max(self.maximum, self.count())
        except Exception as exc:  # the monitor must never end a run; say what went wrong instead
            self.error = f"{type(exc).__name__}: {exc}"

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval)

    def __enter__(self) -> Self:
        if self.counter is not None:
            self._thread = threading.Thread(target=self._run, name="backend-sampler", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()


def wait_for_sessions_at_most(counter: ConnectionCounter | None, limit: int, timeout: float = 20.0) -> int:
    """Wait until the benchmark user's sessions drop to ``limit`` (the previous run's clients have gone)."""
    if counter is None:
        return 0
    deadline = time.monotonic() + timeout
    current = len(counter.client_ports())
    while current > limit and time.monotonic() < deadline:
        time.sleep(0.1)
        current = len(counter.client_ports())
    return current


def _tree_cpu(root: psutil.Process) -> float:
    """CPU time of a process tree, including the descendants it has already reaped."""
    total = 0.0
    for proc in _tree(root):
        with contextlib.suppress(psutil.Error):
            times = proc.cpu_times()
            total += times.user + times.system + times.children_user + times.children_system
    return total


def _system_busy() -> float:
    times = psutil.cpu_times()
    return float(times.user + times.nice + times.system)


class OtherLoad:
    """CPU time the machine spent during a scenario outside the benchmark's processes (other people's work).

    It is the machine's busy time (user + nice + system, all cores) minus the CPU time of the benchmark's own
    process trees (this harness and everything it started, and the PostgreSQL postmaster's tree). Kernel work
    done for our loopback traffic outside our processes counts as "other", so it is an upper bound.
    """

    def __init__(self, roots: list[int]) -> None:
        self.roots: list[psutil.Process] = []
        for pid in roots:
            with contextlib.suppress(psutil.Error):
                self.roots.append(psutil.Process(pid))
        self._start_system = 0.0
        self._start_ours = 0.0
        self.cpu_seconds = 0.0

    def _ours(self) -> float:
        return sum(_tree_cpu(root) for root in self.roots)

    def __enter__(self) -> Self:
        self._start_ours = self._ours()
        self._start_system = _system_busy()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        system = _system_busy() - self._start_system
        ours = self._ours() - self._start_ours
        self.cpu_seconds = max(0.0, system - ours)
