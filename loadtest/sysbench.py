"""sysbench OLTP on MySQL/MariaDB: preparing its tables once, running a test, reading throughput and latency."""

from __future__ import annotations

import re
from dataclasses import dataclass

from devtools.servers import MariaDBInstance
from loadtest.latency import histogram_percentiles
from loadtest.machine import SYSBENCH
from loadtest.runner import Measurement, client_env, first_error, run_bounded
from loadtest.targets import BENCH_PASSWORD, BENCH_USER, Endpoint

TRANSACTIONS = re.compile(r"transactions:\s+(\d+)\s+\(([\d.]+) per sec\.\)")
QUERIES = re.compile(r"queries:\s+(\d+)\s+\(([\d.]+) per sec\.\)")
IGNORED = re.compile(r"ignored errors:\s+(\d+)")
OWN_P99 = re.compile(r"99th percentile:\s+([\d.]+)")
SLACK_SECONDS = 120.0
TABLES = 4


@dataclass(frozen=True)
class SysbenchRun:
    """One sysbench invocation of a bundled OLTP test."""

    test: str  # oltp_point_select, oltp_read_only, oltp_read_write
    threads: int
    duration: int
    table_size: int


def _connection_options(host: str, port: int, user: str, password: str, database: str) -> list[str]:
    return [
        "--db-driver=mysql", f"--mysql-host={host}", f"--mysql-port={port}", f"--mysql-user={user}",
        f"--mysql-password={password}", f"--mysql-db={database}",
    ]


def prepare(server: MariaDBInstance, table_size: int) -> None:
    """Create and fill the sbtest tables once, directly on MariaDB."""
    cmd = [SYSBENCH, "oltp_common", *_connection_options(server.host, server.port, BENCH_USER, BENCH_PASSWORD,
                                                          BENCH_USER),
           f"--tables={TABLES}", f"--table-size={table_size}", "prepare"]
    done = run_bounded(cmd, timeout=600, env=client_env())
    if done.returncode != 0:
        raise RuntimeError(f"sysbench prepare failed: {first_error(done.stderr + done.stdout)}")


def command(endpoint: Endpoint, spec: SysbenchRun) -> list[str]:
    return [
        SYSBENCH, spec.test,
        *_connection_options(endpoint.host, endpoint.port, endpoint.user, endpoint.password, endpoint.database),
        f"--tables={TABLES}", f"--table-size={spec.table_size}", f"--threads={spec.threads}",
        f"--time={spec.duration}", "--events=0", "--report-interval=0", "--rand-type=uniform",
        # Text protocol for every target: the proxy has no prepared-statement support yet, so direct runs the same.
        "--db-ps-mode=disable",
        "--histogram=on", "--percentile=99",
        "run",
    ]


def run(endpoint: Endpoint, spec: SysbenchRun) -> Measurement:
    """Run sysbench; tps and qps from its summary, p50/p99 from its latency histogram (per transaction)."""
    done = run_bounded(command(endpoint, spec), timeout=spec.duration + SLACK_SECONDS, env=client_env())
    result = Measurement(unit="tps")
    transactions = TRANSACTIONS.search(done.stdout)
    queries = QUERIES.search(done.stdout)
    if done.timed_out:
        result.error = f"timed out after {spec.duration + SLACK_SECONDS:.0f}s"
    elif done.returncode != 0 or not transactions:
        result.error = first_error(done.stdout + "\n" + done.stderr) or f"sysbench exit code {done.returncode}"
    if result.error:
        return result
    assert transactions is not None
    result.throughput = float(transactions.group(2))
    result.work = float(transactions.group(1))
    if queries:
        result.extra["qps"] = float(queries.group(2))
    ignored = IGNORED.search(done.stdout)
    if ignored:
        result.extra["ignored_errors"] = int(ignored.group(1))
    own = OWN_P99.search(done.stdout)
    if own:
        result.extra["sysbench_p99_ms"] = float(own.group(1))
    result.latency = histogram_percentiles(done.stdout)
    result.extra["latency_method"] = "sysbench histogram"
    return result
