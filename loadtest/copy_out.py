"""Bulk COPY TO STDOUT through psql, timed end to end, as a throughput test of the forwarding hot path."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

from loadtest.machine import PSQL
from loadtest.runner import Measurement, client_env, first_error, run_bounded
from loadtest.targets import Endpoint

ROW_WIDTH = 1000  # characters of payload per row; each row is that plus a newline on the wire


@dataclass(frozen=True)
class CopyRun:
    rows: int  # 1,000,000 rows of 1,000 characters: 1 GB
    repeats: int

    @property
    def payload_bytes(self) -> int:
        return self.rows * (ROW_WIDTH + 1)

    @property
    def sql(self) -> str:
        return f"COPY (SELECT repeat('x', {ROW_WIDTH}) FROM generate_series(1, {self.rows})) TO STDOUT"


def run(endpoint: Endpoint, spec: CopyRun) -> Measurement:
    """``psql -c COPY ... TO STDOUT > /dev/null``, ``repeats`` times; throughput is the median, in MB/s (10^6 B)."""
    cmd = [PSQL, "-X", "-q", "-w", "-v", "ON_ERROR_STOP=1", "-h", endpoint.host, "-p", str(endpoint.port),
           "-U", endpoint.user, "-d", endpoint.database, "-c", spec.sql]
    seconds: list[float] = []
    result = Measurement(unit="MB/s")
    for _ in range(spec.repeats):
        started = time.perf_counter()
        done = run_bounded(cmd, timeout=600, env=client_env(endpoint.password), discard_stdout=True)
        elapsed = time.perf_counter() - started
        if done.timed_out:
            result.error = "timed out after 600s"
            return result
        if done.returncode != 0:
            result.error = first_error(done.stderr) or f"psql exit code {done.returncode}"
            return result
        seconds.append(elapsed)
    median = statistics.median(seconds)
    result.throughput = spec.payload_bytes / median / 1e6
    result.work = spec.payload_bytes * len(seconds) / 1e6
    result.extra["seconds"] = [round(s, 3) for s in seconds]
    result.extra["bytes"] = spec.payload_bytes
    return result
