"""The scenario catalogue (what runs, at which concurrency, against which targets) and running one cell of it."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil

from loadtest import copy_out, pgbench, sysbench
from loadtest.monitor import (
    BackendSampler,
    ConnectionCounter,
    MariaDBConnectionCounter,
    OtherLoad,
    PostgresConnectionCounter,
    ProcessSampler,
    wait_for_sessions_at_most,
)
from loadtest.results import FAILED, NOT_AVAILABLE, OK, Result
from loadtest.runner import Measurement
from loadtest.targets import DIRECT, MYSQL, PGBOUNCER_TARGET, POSTGRESQL, PROXY, TARGET_ORDER, Stack, TargetError

PGBENCH = "pgbench"
SYSBENCH = "sysbench"
COPY = "copy"

PG_TARGETS = TARGET_ORDER
MYSQL_TARGETS = (DIRECT, PROXY)
QUERY_MODES = ("simple", "extended", "prepared")
SYSBENCH_TESTS = ("oltp_point_select", "oltp_read_only", "oltp_read_write")


@dataclass(frozen=True)
class Scenario:
    """One workload, run against each of its targets in turn (so the comparison is side by side)."""

    name: str
    group: str
    kind: str
    engine: str
    concurrency: int
    targets: tuple[str, ...]
    mode: str = "simple"
    connect_each: bool = False
    test: str = ""
    rows: int = 0


@dataclass(frozen=True)
class Sizes:
    """Concurrency levels and data sizes: the full run, or the --quick smoke run."""

    clients: tuple[int, ...]
    connect_clients: int
    threads: tuple[int, ...]
    pgbench_scale: int
    sysbench_table_size: int
    copy_rows: int
    copy_repeats: int
    idle_counts: tuple[int, ...]
    syscall_clients: int = 100  # the strace step: pgbench -c
    syscall_transactions: int = 20_000  # ... and the transactions in total (-t is this / clients)


FULL = Sizes(clients=(10, 100, 1000), connect_clients=10, threads=(10, 100, 1000), pgbench_scale=10,
             sysbench_table_size=10_000, copy_rows=1_000_000, copy_repeats=2, idle_counts=(10_000,))
QUICK = Sizes(clients=(4,), connect_clients=2, threads=(4,), pgbench_scale=1, sysbench_table_size=1_000,
              copy_rows=20_000, copy_repeats=1, idle_counts=(200,), syscall_clients=10, syscall_transactions=1_000)


def pgbench_name(mode: str, clients: int, connect_each: bool = False) -> str:
    return f"pgbench -S{' -C' if connect_each else ''} -M {mode} -c {clients}"


def sysbench_name(test: str, threads: int) -> str:
    return f"sysbench {test} --threads={threads}"


def copy_name(rows: int) -> str:
    size = rows * (copy_out.ROW_WIDTH + 1)
    label = f"{size / 1e9:.0f} GB" if size >= 1e9 else f"{size / 1e6:.0f} MB"
    return f"COPY TO STDOUT {label}"


LATENCY_SCENARIO = pgbench_name("simple", 1)


def catalogue(sizes: Sizes) -> list[Scenario]:
    """Every scenario of a run, in the order they run."""
    scenarios = [Scenario(LATENCY_SCENARIO, "pgbench latency, 1 client", PGBENCH, POSTGRESQL, 1, PG_TARGETS)]
    for mode in QUERY_MODES:
        for clients in sizes.clients:
            scenarios.append(Scenario(pgbench_name(mode, clients), f"pgbench -S -M {mode}", PGBENCH, POSTGRESQL,
                                      clients, PG_TARGETS, mode=mode))
    scenarios.append(Scenario(pgbench_name("simple", sizes.connect_clients, connect_each=True),
                              "pgbench -S -C (connection per transaction)", PGBENCH, POSTGRESQL,
                              sizes.connect_clients, PG_TARGETS, connect_each=True))
    for test in SYSBENCH_TESTS:
        for threads in sizes.threads:
            scenarios.append(Scenario(sysbench_name(test, threads), f"sysbench {test}", SYSBENCH, MYSQL, threads,
                                      MYSQL_TARGETS, test=test))
    scenarios.append(Scenario(copy_name(sizes.copy_rows), "COPY TO STDOUT", COPY, POSTGRESQL, 1, PG_TARGETS,
                              rows=sizes.copy_rows))
    return scenarios


class ScenarioRunner:
    """Runs scenarios against a started :class:`Stack`, sampling the middleman and the backend meanwhile."""

    def __init__(self, stack: Stack, sizes: Sizes, duration: int, workdir: Path) -> None:
        self.stack = stack
        self.sizes = sizes
        self.duration = duration
        self.workdir = workdir
        #: Middlemen beyond PgBouncer and the stack's proxy whose idle pooled connections stay open meanwhile.
        self.extra_pools = 0
        self.counters: dict[str, ConnectionCounter] = {}
        if stack.postgres is not None:
            self.counters[POSTGRESQL] = PostgresConnectionCounter(stack.postgres)
        if stack.mariadb is not None:
            self.counters[MYSQL] = MariaDBConnectionCounter(stack.mariadb)

    def close(self) -> None:
        for counter in self.counters.values():
            counter.close()
        self.counters.clear()

    def prepare(self, scenarios: list[Scenario]) -> None:
        """Create the benchmark data each kind of scenario needs (directly on the databases, once)."""
        kinds = {s.kind for s in scenarios}
        if PGBENCH in kinds and self.stack.postgres is not None:
            _say(f"pgbench -i -s {self.sizes.pgbench_scale}")
            pgbench.initialise(self.stack.postgres, self.sizes.pgbench_scale)
        if SYSBENCH in kinds and self.stack.mariadb is not None:
            _say(f"sysbench prepare: {sysbench.TABLES} tables x {self.sizes.sysbench_table_size} rows")
            sysbench.prepare(self.stack.mariadb, self.sizes.sysbench_table_size)

    def run_all(self, scenarios: list[Scenario]) -> Iterator[Result]:
        for scenario in scenarios:
            for target in scenario.targets:
                result = self.run_one(scenario, target)
                _say(f"{scenario.name:48} {target:10} {_summary(result)}")
                yield result

    def _own_roots(self) -> list[int]:
        """This harness (and so everything it started) and the postmaster, which daemonises away from us."""
        roots = [os.getpid()]
        if self.stack.postgres is not None and self.stack.postgres.pid is not None:
            roots.append(self.stack.postgres.pid)
        return roots

    def _middlemen(self, engine: str) -> list[psutil.Process]:
        found = []
        for target in (PGBOUNCER_TARGET, PROXY):
            process = self.stack.endpoint(engine, target).process
            if process is not None:
                found.append(process)
        return found

    def _measure(self, scenario: Scenario, target: str) -> Measurement:
        endpoint = self.stack.endpoint(scenario.engine, target)
        if scenario.kind == PGBENCH:
            spec = pgbench.PgbenchRun(scenario.mode, scenario.concurrency, self.duration, scenario.connect_each)
            return pgbench.run(endpoint, spec, self.workdir / "pgbench-logs")
        if scenario.kind == SYSBENCH:
            return sysbench.run(endpoint, sysbench.SysbenchRun(scenario.test, scenario.concurrency, self.duration,
                                                               self.sizes.sysbench_table_size))
        if scenario.kind == COPY:
            return copy_out.run(endpoint, copy_out.CopyRun(scenario.rows, self.sizes.copy_repeats))
        raise ValueError(f"unknown scenario kind {scenario.kind}")

    def run_one(self, scenario: Scenario, target: str) -> Result:
        result = Result(scenario.name, scenario.group, scenario.engine, target, concurrency=scenario.concurrency)
        endpoint = self.stack.endpoint(scenario.engine, target)
        if endpoint.unavailable:
            result.status, result.reason = NOT_AVAILABLE, endpoint.unavailable
            return result
        counter = self.counters.get(scenario.engine)
        # The previous run's clients must be gone; the pooled ones (PgBouncer's, the proxy's) may stay.
        wait_for_sessions_at_most(counter, (2 + self.extra_pools) * self.stack.pool_size)
        proxy = self.stack.proxy if target == PROXY else None
        log_start = proxy.log_size() if proxy is not None else 0
        started = time.perf_counter()
        sampler = BackendSampler(counter, endpoint.process, self._middlemen(scenario.engine))
        with OtherLoad(self._own_roots()) as other, ProcessSampler(endpoint.process) as usage, sampler as backends:
            measured = self._measure(scenario, target)
        result.other_cpu_s = round(other.cpu_seconds, 1)
        result.wall_seconds = round(time.perf_counter() - started, 2)
        result.throughput, result.unit, result.extra = measured.throughput, measured.unit, measured.extra
        result.work = measured.work
        if measured.latency is not None:
            result.p50_ms, result.p99_ms = measured.latency.p50_ms, measured.latency.p99_ms
            result.latency_samples = measured.latency.samples
        if usage.usage is not None:
            result.middleman_cpu_s = round(usage.usage.cpu_seconds, 2)
            result.middleman_peak_rss = usage.usage.peak_rss_bytes
            result.middleman_user_s = round(usage.usage.user_seconds, 4)
            result.middleman_sys_s = round(usage.usage.system_seconds, 4)
            steady = usage.steady_cpu_per_tx(measured.completions)
            if steady is not None:
                result.steady_user_us, result.steady_sys_us = round(steady[0], 2), round(steady[1], 2)
                result.extra["steady_transactions"] = steady[2]
        result.backend_connections_max = backends.maximum if counter is not None else None
        if backends.error:
            result.extra["monitor_error"] = backends.error
        if measured.error:
            result.status, result.reason = FAILED, measured.error
        if proxy is not None:
            lines = [line for line in proxy.log_errors(log_start) if line.strip()]
            if lines:
                result.extra["proxy_log"] = lines[:20]
                result.extra["proxy_log_lines"] = len(lines)
            if not proxy.alive():
                code = proxy.proc.returncode if proxy.proc is not None else None
                result.status = FAILED
                result.reason = f"proxy process died (exit code {code}); {result.reason}".rstrip("; ")
                _say("the proxy died; restarting it for the remaining scenarios")
                try:
                    proxy.start()
                except TargetError as exc:
                    _say(f"the proxy did not restart ({exc}); its remaining scenarios will read 'proxy not running'")
        if result.status == OK and result.throughput <= 0:
            result.status, result.reason = FAILED, "no throughput measured"
        return result


def _summary(result: Result) -> str:
    if result.status != OK:
        return result.status_text()
    p50 = f" p50 {result.p50_ms:.3f} ms" if result.p50_ms is not None else ""
    return f"{result.throughput:,.1f} {result.unit}{p50}"


def _say(text: str) -> None:
    print(f"[bench] {text}", file=sys.stderr, flush=True)


__all__ = ["COPY", "FULL", "LATENCY_SCENARIO", "PGBENCH", "PGBOUNCER_TARGET", "QUICK", "SYSBENCH", "Scenario",
           "ScenarioRunner", "Sizes", "catalogue", "copy_name", "pgbench_name", "sysbench_name"]
