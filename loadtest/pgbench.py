"""pgbench: initialising its tables, running select-only scenarios with per-transaction logs, reading the results."""

from __future__ import annotations

import dataclasses
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from devtools.servers import PostgresInstance
from loadtest.latency import cycle_times_us, percentiles_ms, read_pgbench_logs
from loadtest.machine import PGBENCH
from loadtest.runner import Measurement, client_env, first_error, run_bounded
from loadtest.targets import BENCH_PASSWORD, BENCH_USER, Endpoint

TPS = re.compile(r"^tps = ([\d.]+)", re.MULTILINE)
FAILED_TX = re.compile(r"number of failed transactions: (\d+)")
PROCESSED = re.compile(r"number of transactions actually processed: (\d+)")
INITIAL_CONNECT = re.compile(r"initial connection time = ([\d.]+) ms")
CONNECT_TIME = re.compile(r"average connection time = ([\d.]+) ms")
#: Seconds allowed beyond ``-T`` for connecting 1,000 clients and winding down.
SLACK_SECONDS = 120.0


@dataclass(frozen=True)
class PgbenchRun:
    """One pgbench invocation: built-in select-only script (``-S``)."""

    mode: str  # simple, extended or prepared (-M)
    clients: int  # -c
    duration: int  # -T, seconds
    connect_each: bool = False  # -C: a new connection per transaction
    connect_allowance: int = -1  # extra seconds of -T for connecting the clients; -1: one per 100 clients

    @property
    def threads(self) -> int:
        return min(2, self.clients)  # -j 2 (the machine has 2 cores); never more threads than clients

    @property
    def time_limit(self) -> int:
        """``-T``: pgbench's clock includes connecting its clients first (about 10 s for 1,000 SCRAM logins
        here), and its tps excludes that time; a second per 100 clients keeps the measured part near ``duration``."""
        if self.connect_each:
            return self.duration
        return self.duration + (self.connect_allowance if self.connect_allowance >= 0 else self.clients // 100)


def initialise(server: PostgresInstance, scale: int) -> None:
    """``pgbench -i`` the benchmark database directly (tables, data, vacuum, primary keys)."""
    cmd = [PGBENCH, "-i", "-q", "-s", str(scale), "-h", server.host, "-p", str(server.port), "-U", BENCH_USER,
           BENCH_USER]
    done = run_bounded(cmd, timeout=600, env=client_env(BENCH_PASSWORD))
    if done.returncode != 0:
        raise RuntimeError(f"pgbench -i failed: {first_error(done.stderr + done.stdout)}")


def command(endpoint: Endpoint, run: PgbenchRun, log_prefix: Path) -> list[str]:
    cmd = [PGBENCH, "-n", "-S", "-M", run.mode, "-c", str(run.clients), "-j", str(run.threads),
           "-T", str(run.time_limit), "--log", f"--log-prefix={log_prefix}"]
    if run.connect_each:
        cmd.append("-C")
    return [*cmd, "-h", endpoint.host, "-p", str(endpoint.port), "-U", endpoint.user, endpoint.database]


def run(endpoint: Endpoint, spec: PgbenchRun, logdir: Path) -> Measurement:
    """Run pgbench (once more with a longer ``-T`` if connecting the clients took all of it)."""
    result = run_once(endpoint, spec, logdir)
    if result.error.startswith(NOTHING_COMPLETED):
        longer = dataclasses.replace(spec, connect_allowance=spec.time_limit - spec.duration + 30)
        result = run_once(endpoint, longer, logdir)
        result.extra["retried_with_T"] = longer.time_limit
    return result


NOTHING_COMPLETED = "no transaction completed"


def run_once(endpoint: Endpoint, spec: PgbenchRun, logdir: Path) -> Measurement:
    """Run pgbench; tps from its summary, p50/p99 from every logged transaction.

    Latency is pgbench's per-transaction ``time`` column (send of the query to the end of its result). With
    ``-C`` it is the time between a client's consecutive completions instead, which includes connecting,
    authenticating and disconnecting (see :func:`loadtest.latency.cycle_times_us`).
    """
    shutil.rmtree(logdir, ignore_errors=True)
    logdir.mkdir(parents=True)
    prefix = logdir / "pgbench"
    done = run_bounded(command(endpoint, spec, prefix), timeout=spec.time_limit + SLACK_SECONDS,
                       env=client_env(endpoint.password))
    result = Measurement(unit="tps")
    tps = TPS.search(done.stdout)
    failed = FAILED_TX.search(done.stdout)
    connect = CONNECT_TIME.search(done.stdout)
    if connect:
        result.extra["avg_connection_ms"] = float(connect.group(1))
    if failed:
        result.extra["failed_transactions"] = int(failed.group(1))
    if done.timed_out:
        result.error = f"timed out after {spec.time_limit + SLACK_SECONDS:.0f}s"
    elif done.returncode != 0:
        result.error = first_error(done.stderr) or f"pgbench exit code {done.returncode}"
        if tps:
            result.extra["partial_tps"] = float(tps.group(1))
    elif not tps:
        processed = PROCESSED.search(done.stdout)
        if processed and processed.group(1) == "0":
            result.error = f"{NOTHING_COMPLETED} within -T {spec.time_limit}s (connecting the clients took it all)"
        else:
            result.error = f"no tps in pgbench output: {first_error(done.stderr + done.stdout)}"
    elif failed and int(failed.group(1)) > 0:
        result.error = f"{failed.group(1)} failed transactions: {first_error(done.stderr)}"
    if result.error:
        shutil.rmtree(logdir, ignore_errors=True)
        return result
    assert tps is not None
    result.throughput = float(tps.group(1))
    initial = INITIAL_CONNECT.search(done.stdout)
    if initial:
        result.extra["initial_connection_ms"] = float(initial.group(1))
    processed = PROCESSED.search(done.stdout)
    result.work = float(processed.group(1)) if processed else 0.0
    log = read_pgbench_logs(sorted(logdir.glob("pgbench.*")))
    samples = cycle_times_us(log.completions) if spec.connect_each else log.latencies_us
    result.latency = percentiles_ms(samples)
    if not spec.connect_each:
        result.completions = sorted(t / 1e6 for times in log.completions.values() for t in times)
    result.extra["latency_method"] = "connect+query cycle per client" if spec.connect_each else "per-transaction log"
    shutil.rmtree(logdir, ignore_errors=True)
    return result
