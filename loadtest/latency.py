"""Latency percentiles: from pgbench per-transaction logs and from sysbench latency histograms."""

from __future__ import annotations

import itertools
import math
import re
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

HISTOGRAM_ROW = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*\|[*\s]*?(\d+)\s*$")


@dataclass(frozen=True)
class Percentiles:
    """p50 and p99 in milliseconds, and how many samples they come from."""

    p50_ms: float
    p99_ms: float
    samples: int


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (the smallest value with at least q% of the samples at or below it)."""
    if not sorted_values:
        raise ValueError("no samples")
    rank = max(1, math.ceil(q / 100.0 * len(sorted_values)))
    return sorted_values[rank - 1]


def percentiles_ms(values_us: Iterable[float]) -> Percentiles | None:
    values = sorted(values_us)
    if not values:
        return None
    return Percentiles(percentile(values, 50) / 1000.0, percentile(values, 99) / 1000.0, len(values))


@dataclass
class PgbenchLog:
    """The per-transaction log lines of one pgbench run (all threads' files)."""

    latencies_us: list[int]
    #: client id -> completion times (µs since the epoch) of its transactions, in log order
    completions: dict[int, list[int]]
    failed: int = 0


def read_pgbench_logs(files: Iterable[Path]) -> PgbenchLog:
    """Parse ``--log`` files: ``client_id transaction_no time script_no time_epoch time_us [...]``.

    ``time`` is the transaction's elapsed time in microseconds, or ``failed`` / ``skipped``.
    """
    latencies: list[int] = []
    completions: dict[int, list[int]] = defaultdict(list)
    failed = 0
    for path in files:
        with path.open() as fh:
            for line in fh:
                parts = line.split()
                if len(parts) < 6:
                    continue
                elapsed = parts[2]
                if not elapsed.isdigit():
                    failed += 1
                    continue
                latencies.append(int(elapsed))
                completions[int(parts[0])].append(int(parts[4]) * 1_000_000 + int(parts[5]))
    return PgbenchLog(latencies, dict(completions), failed)


def cycle_times_us(completions: dict[int, list[int]]) -> list[int]:
    """Per client, the time between one transaction's completion and the next one's.

    With ``pgbench -C`` this is what a client waits per transaction *including* connecting, logging in and
    disconnecting (the logged ``time`` column starts after the connection is made). Each client's first
    transaction has no predecessor and is left out.
    """
    cycles: list[int] = []
    for times in completions.values():
        ordered = sorted(times)
        cycles.extend(later - earlier for earlier, later in itertools.pairwise(ordered))
    return cycles


def histogram_percentiles(output: str) -> Percentiles | None:
    """p50/p99 from sysbench's ``--histogram`` table (values in ms; buckets about 2% wide)."""
    rows: list[tuple[float, int]] = []
    in_histogram = False
    for line in output.splitlines():
        if line.startswith("Latency histogram"):
            in_histogram = True
            continue
        if not in_histogram:
            continue
        match = HISTOGRAM_ROW.match(line)
        if match:
            rows.append((float(match.group(1)), int(match.group(2))))
        elif rows and line.strip() == "":
            break
    total = sum(count for _, count in rows)
    if total == 0:
        return None

    def at(q: float) -> float:
        wanted = max(1, math.ceil(q / 100.0 * total))
        running = 0
        for value, count in rows:
            running += count
            if running >= wanted:
                return value
        return rows[-1][0]

    return Percentiles(at(50), at(99), total)
