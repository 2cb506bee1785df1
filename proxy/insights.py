"""Statement statistics per normalized statement, user, database and endpoint (bounded, least recent evicted)."""

from __future__ import annotations

import bisect
from collections import OrderedDict
from collections.abc import Iterable
from typing import Any

# Upper bounds (seconds) of the latency buckets: 50 µs to about 90 s, eight per power of ten.
BOUNDS: tuple[float, ...] = tuple(round(5e-5 * 10 ** (i / 8), 9) for i in range(51))
DEFAULT_MAX_STATEMENTS = 5000
Key = tuple[str, str, str, str]  # (statement, user, database, endpoint)


class StatementStats:
    """Counters and a latency histogram of one statement for one user, database and endpoint."""

    __slots__ = ("buckets", "calls", "errors", "evicted", "rows", "total", "wait")

    def __init__(self) -> None:
        self.evicted = False  # dropped from its Insights: whoever holds it must look the key up again
        self.calls = 0
        self.errors = 0
        self.rows = 0
        self.total = 0.0  # seconds from the request to the reply's end, at the proxy
        self.wait = 0.0  # seconds of that spent waiting for a backend connection
        self.buckets = [0] * (len(BOUNDS) + 1)

    def add(self, seconds: float, wait: float, rows: int, failed: bool) -> None:
        self.calls += 1
        self.errors += failed
        self.rows += rows
        self.total += seconds
        self.wait += wait
        self.buckets[bisect.bisect_left(BOUNDS, seconds)] += 1

    def merge(self, other: dict[str, Any]) -> None:
        self.calls += other["calls"]
        self.errors += other["errors"]
        self.rows += other["rows"]
        self.total += other["total"]
        self.wait += other["wait"]
        for index, count in enumerate(other["buckets"]):
            self.buckets[index] += count

    def quantile(self, q: float) -> float:
        """The latency below which a share `q` of the calls fell (the upper bound of its bucket)."""
        wanted, seen = q * self.calls, 0
        for index, count in enumerate(self.buckets):
            seen += count
            if count and seen >= wanted:
                return BOUNDS[index] if index < len(BOUNDS) else BOUNDS[-1]
        return 0.0

    def snapshot(self) -> dict[str, Any]:
        return {"calls": self.calls, "errors": self.errors, "rows": self.rows, "total": self.total,
                "wait": self.wait, "buckets": list(self.buckets)}


class Insights:
    """One process's statement statistics; at most `max_statements` keys, the least recently used evicted."""

    def __init__(self, max_statements: int = DEFAULT_MAX_STATEMENTS) -> None:
        self.max_statements = max_statements
        self.stats: OrderedDict[Key, StatementStats] = OrderedDict()
        self.evicted = 0

    def entry(self, key: Key) -> StatementStats:
        """The statistics of `key`, made (evicting the least recent when full) or marked recently used."""
        found = self.stats.get(key)
        if found is None:
            found = self.stats[key] = StatementStats()
            if len(self.stats) > self.max_statements:
                self.stats.popitem(last=False)[1].evicted = True
                self.evicted += 1
        else:
            self.stats.move_to_end(key)
        return found

    def snapshot(self) -> list[dict[str, Any]]:
        """Every entry as plain data (for the channel to the supervisor)."""
        return [{"statement": key[0], "user": key[1], "database": key[2], "endpoint": key[3], **stats.snapshot()}
                for key, stats in self.stats.items()]


def merged(snapshots: Iterable[list[dict[str, Any]]]) -> dict[Key, StatementStats]:
    """The snapshots of several processes summed per key."""
    total: dict[Key, StatementStats] = {}
    for snapshot in snapshots:
        for row in snapshot:
            key = (row["statement"], row["user"], row["database"], row["endpoint"])
            total.setdefault(key, StatementStats()).merge(row)
    return total


def top(stats: dict[Key, StatementStats], limit: int = 10, by: str = "load") -> list[dict[str, Any]]:
    """The `limit` statements with the most load (total time), calls, errors, rows or mean latency."""
    order = {"load": lambda s: s.total, "calls": lambda s: s.calls, "errors": lambda s: s.errors,
             "rows": lambda s: s.rows, "mean": lambda s: s.total / s.calls if s.calls else 0.0}
    if by not in order:
        raise ValueError(f"unknown order {by!r}: one of {', '.join(order)}")
    ranked = sorted(stats.items(), key=lambda item: order[by](item[1]), reverse=True)[:limit]
    return [{"statement": key[0], "user": key[1], "database": key[2], "endpoint": key[3], "calls": s.calls,
             "errors": s.errors, "rows": s.rows, "total_ms": round(s.total * 1000, 3),
             "mean_ms": round(s.total / s.calls * 1000, 3) if s.calls else 0.0,
             "p95_ms": round(s.quantile(0.95) * 1000, 3), "p99_ms": round(s.quantile(0.99) * 1000, 3),
             "wait_ms": round(s.wait * 1000, 3), "database_ms": round((s.total - s.wait) * 1000, 3)}
            for key, s in ranked]
