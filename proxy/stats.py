"""The process's counters in one registry, labelled by engine, endpoint, cluster, instance, database and user."""

from __future__ import annotations

import bisect
import threading
from collections.abc import Callable, Iterable
from typing import Any

from proxy.insights import Insights
from proxy.sql_digest import Digester

ENDPOINT_LABELS = ("engine", "endpoint", "cluster")
INSTANCE_LABELS = ("engine", "cluster", "instance", "role")
POOL_GAUGES = ("open", "borrowed", "in_transaction", "max_allowed", "waiting")
POOL_LABELS = ("engine", "endpoint", "cluster", "instance", "database", "user")

# A snapshot: {"endpoints": [series], "pools": [series]}, each series a flat dict of its labels and its values
# (endpoint series also carry "pins": {reason: count}). Plain data: it crosses the workers' channel as JSON.
Series = dict[str, Any]
Snapshot = dict[str, list[Series]]

# Upper bounds (seconds) of the latency histograms the metrics show; the last bucket is everything above.
METRIC_BOUNDS: tuple[float, ...] = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                                    0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Histogram:
    """Counts of observed durations per bucket of METRIC_BOUNDS, and their sum (a Prometheus histogram)."""

    __slots__ = ("counts", "total")

    def __init__(self) -> None:
        self.counts = [0] * (len(METRIC_BOUNDS) + 1)
        self.total = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(METRIC_BOUNDS, seconds)] += 1
        self.total += seconds

    def data(self) -> dict[str, Any]:
        return {"counts": list(self.counts), "sum": self.total}

    def add(self, other: Histogram) -> None:
        for index, count in enumerate(other.counts):
            self.counts[index] += count
        self.total += other.total


def add_histograms(total: dict[str, Any], more: dict[str, Any]) -> dict[str, Any]:
    """Two histograms' data summed."""
    return {"counts": [a + b for a, b in zip(total["counts"], more["counts"], strict=True)],
            "sum": total["sum"] + more["sum"]}


class EndpointStats:
    """Counters of the clients of one endpoint; plain attribute increments on the hot path."""

    COUNTERS = ("clients_accepted", "clients_refused", "clients_refused_network", "logins_ok", "logins_failed",
                "logins_throttled", "protocol_errors", "cancel_requests", "idle_client_timeouts", "login_timeouts",
                "logins_tls", "queries", "query_errors", "clients_closed", "fleet_forwards", "fleet_forwards_dropped",
                "cache_hits", "cache_misses", "cache_stores", "cache_invalidations", "cache_evictions", "cache_errors")
    GAUGES = ("clients_current", "pinned_now", "cache_entries", "cache_bytes")
    HISTOGRAMS = ("query_latency", "database_latency")
    __slots__ = ("labels", "pins", "registry", "replays", "sql_log_until", *COUNTERS, *GAUGES, *HISTOGRAMS)

    def __init__(self, registry: StatsRegistry, labels: dict[str, str]) -> None:
        self.registry = registry
        self.labels = labels
        self.pins: dict[str, int] = {}  # times a session was pinned, by reason
        self.replays: dict[str, int] = {}  # transactions carried to another backend, by outcome
        self.sql_log_until = 0.0  # monotonic time enhanced SQL logging ends on this endpoint (0: off)
        self.clients_accepted = 0
        self.clients_refused = 0  # turned away at connect: max_client_connections reached
        self.clients_refused_network = 0  # closed at connect: the address is not in the endpoint's allowed_cidrs
        self.logins_ok = 0
        self.logins_failed = 0
        self.logins_throttled = 0  # refused before any password check: the address had too many failed logins
        self.protocol_errors = 0
        self.cancel_requests = 0
        self.idle_client_timeouts = 0
        self.login_timeouts = 0
        self.logins_tls = 0  # logins over TLS
        self.clients_closed = 0  # client connections that ended (after being accepted)
        self.fleet_forwards = 0  # cancels and KILLs passed to the peer proxy owning the client
        self.fleet_forwards_dropped = 0  # ... for a peer that is unknown or did not take them
        self.queries = 0  # statements answered (a Query, an extended-query batch up to Sync, a MySQL command)
        self.query_errors = 0  # ... that ended in an error
        self.clients_current = 0
        self.pinned_now = 0
        # The query result cache (proxy.cache): lookups answered from it or not, results stored, table
        # generations bumped by writes, entries evicted for room, Redis calls that failed; what it holds now.
        self.cache_hits = 0
        self.cache_misses = 0
        self.cache_stores = 0
        self.cache_invalidations = 0
        self.cache_evictions = 0
        self.cache_errors = 0
        self.cache_entries = 0
        self.cache_bytes = 0  # client sessions pinned to their backend now
        self.query_latency = Histogram()  # from the request's arrival at the proxy to its reply's end
        self.database_latency = Histogram()  # the part of that after a backend was linked

    def replayed(self, outcome: str) -> None:
        self.replays[outcome] = self.replays.get(outcome, 0) + 1

    def pinned(self, reason: str) -> None:
        self.pins[reason] = self.pins.get(reason, 0) + 1

    def unpinned(self) -> None:
        self.pinned_now -= 1

    def series(self) -> Series:
        values = {name: getattr(self, name) for name in (*self.COUNTERS, *self.GAUGES)}
        histograms = {name: getattr(self, name).data() for name in self.HISTOGRAMS}
        return {**self.labels, **values, **histograms, "pins": dict(self.pins), "replays": dict(self.replays)}


class PoolStats:
    """Counters of one pool of backend connections (one database and user); plain attribute increments."""

    COUNTERS = ("borrows", "waits", "wait_time", "borrow_timeouts", "opened", "closed", "connect_failures",
                "transactions", "opened_tls")
    __slots__ = ("borrow_wait", "gauges", "labels", *COUNTERS)

    def __init__(self, labels: dict[str, str] | None = None) -> None:
        self.labels = labels or {}
        self.gauges: Callable[[], dict[str, int]] | None = None  # set by the pool: its open and borrowed counts
        self.borrows = 0
        self.waits = 0
        self.wait_time = 0.0
        self.borrow_timeouts = 0
        self.opened = 0
        self.closed = 0
        self.connect_failures = 0
        self.transactions = 0
        self.opened_tls = 0  # backend connections opened with TLS
        self.borrow_wait = Histogram()  # borrows that waited: how long (the others took no time)

    def as_dict(self) -> dict[str, float]:
        return {name: getattr(self, name) for name in self.COUNTERS}

    def add(self, other: PoolStats) -> None:
        for name in self.COUNTERS:
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.borrow_wait.add(other.borrow_wait)

    def series(self) -> Series:
        gauges = self.gauges() if self.gauges is not None else dict.fromkeys(POOL_GAUGES, 0)
        return {**self.labels, **self.as_dict(), **gauges, "borrow_wait": self.borrow_wait.data()}


class TargetStats:
    """The pools' counters of one backend instance as one endpoint of a cluster uses it. A pool that is removed
    folds its counters into `retired` (labelled with an empty database and user), so no total ever goes down."""

    __slots__ = ("labels", "pools", "retired")

    def __init__(self, labels: dict[str, str] | None = None) -> None:
        self.labels = labels or {}
        self.pools: dict[tuple[str, str], PoolStats] = {}
        self.retired = PoolStats({**self.labels, "database": "", "user": ""})

    def pool(self, database: str, user: str) -> PoolStats:
        """The counters of the pool for (database, user): the same object for as long as that pool lives."""
        stats = self.pools.get((database, user))
        if stats is None:
            stats = self.pools[(database, user)] = PoolStats({**self.labels, "database": database, "user": user})
        return stats

    def retire(self, stats: PoolStats) -> None:
        """A pool is removed: its counters move to the retired total and its series goes away."""
        key = (stats.labels.get("database", ""), stats.labels.get("user", ""))
        if self.pools.get(key) is stats:
            del self.pools[key]
            self.retired.add(stats)

    def series(self) -> list[Series]:
        found = [stats.series() for stats in list(self.pools.values())]
        if any(self.retired.as_dict().values()):
            found.append(self.retired.series())
        return found


class StatsRegistry:
    """Every counter of this process; services and pools take their part once and increment it directly."""

    def __init__(self) -> None:
        self.endpoints: dict[tuple[str, ...], EndpointStats] = {}
        self.targets: dict[tuple[str, ...], TargetStats] = {}
        self.max_clients = 0  # this process's share of max_client_connections (0: no limit)
        # The monitored instances as this process sees them: labels, "available" (0/1), "lag_seconds" and the
        # cluster's "writer_changes" (set by the server: it owns the topology monitors).
        self.instances: Callable[[], list[Series]] = list
        self.insights: Insights | None = None  # statement statistics, when switched on
        self._digesters: dict[str, Digester] = {}

    def keep_insights(self, max_statements: int) -> None:
        """Switch the statement statistics on (kept across reloads) or off (max_statements 0)."""
        if max_statements <= 0:
            self.insights = None
        elif self.insights is None:
            self.insights = Insights(max_statements)
        else:
            self.insights.max_statements = max_statements

    def digester(self, engine: str) -> Digester:
        """The statement normalizer of `engine` (one per process: its cache is shared by every client)."""
        digester = self._digesters.get(engine)
        if digester is None:
            digester = self._digesters[engine] = Digester(engine)
        return digester

    def endpoint(self, engine: str, endpoint: str, cluster: str) -> EndpointStats:
        key = (engine, endpoint, cluster)
        stats = self.endpoints.get(key)
        if stats is None:
            stats = self.endpoints[key] = EndpointStats(self, dict(zip(ENDPOINT_LABELS, key, strict=True)))
        return stats

    def target(self, engine: str, endpoint: str, cluster: str, instance: str) -> TargetStats:
        key = (engine, endpoint, cluster, instance)
        stats = self.targets.get(key)
        if stats is None:
            stats = self.targets[key] = TargetStats(dict(zip(POOL_LABELS, key, strict=False)))
        return stats

    def clients_current(self) -> int:
        return sum(stats.clients_current for stats in self.endpoints.values())

    def over_limit(self) -> bool:
        """Whether this process serves more clients than its share of max_client_connections."""
        return bool(self.max_clients) and self.clients_current() > self.max_clients

    def snapshot(self) -> Snapshot:
        """Every series of this process as plain data (no secrets: labels are names, values are numbers)."""
        pools: list[Series] = []
        for target in list(self.targets.values()):
            pools.extend(target.series())
        return {"endpoints": [stats.series() for stats in list(self.endpoints.values())], "pools": pools,
                "instances": self.instances()}


def merge(parts: Iterable[Snapshot]) -> Snapshot:
    """Add up the snapshots of several workers, series by series (same labels: same series)."""
    parts = list(parts)
    merged: Snapshot = {"endpoints": [], "pools": [], "instances": []}
    seen: set[tuple[str, ...]] = set()
    for part in parts:  # every worker monitors the same instances: the first answer for each is shown
        for series in part.get("instances", []):
            key = tuple(str(series.get(label, "")) for label in INSTANCE_LABELS[:3])
            if key not in seen:
                seen.add(key)
                merged["instances"].append(series)
    for kind, labels in (("endpoints", ENDPOINT_LABELS), ("pools", POOL_LABELS)):
        found: dict[tuple[str, ...], Series] = {}
        for part in parts:
            for series in part.get(kind, []):
                key = tuple(str(series.get(label, "")) for label in labels)
                total = found.get(key)
                if total is None:
                    found[key] = {name: dict(value) if name in ("pins", "replays") else value
                                  for name, value in series.items()}
                    continue
                for name, value in series.items():
                    if name in ("pins", "replays"):
                        kept = total.setdefault(name, {})
                        for reason, count in value.items():
                            kept[reason] = kept.get(reason, 0) + count
                    elif isinstance(value, dict) and "counts" in value:
                        total[name] = add_histograms(total[name], value) if name in total else value
                    elif name not in labels and isinstance(value, int | float):
                        total[name] = total.get(name, 0) + value
        merged[kind] = list(found.values())
    return merged


def _counters_only(snapshot: Snapshot) -> Snapshot:
    """The snapshot with its gauges at zero: what a worker that is gone still adds to the totals."""
    gauges = {*EndpointStats.GAUGES, *POOL_GAUGES}
    return {kind: [{name: 0 if name in gauges else value for name, value in series.items()} for series in rows]
            for kind, rows in snapshot.items() if kind != "instances"}


class WorkerSum:
    """The supervisor's sum of its workers' snapshots, kept monotone across worker restarts: the counters a worker
    had when it went away stay in the totals, and a worker that does not answer counts with its last snapshot."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last: dict[int, tuple[int, Snapshot]] = {}  # worker index -> (its pid, its latest snapshot)
        self._gone: Snapshot = {"endpoints": [], "pools": []}  # counters of workers that were replaced

    def add(self, answers: dict[int, tuple[int, Snapshot] | None]) -> Snapshot:
        """Sum this round's answers (worker index -> (pid, snapshot), or None when it did not answer)."""
        with self._lock:
            parts = []
            for index, answer in answers.items():
                previous = self._last.get(index)
                if answer is None:
                    if previous is not None:
                        parts.append(_counters_only(previous[1]))
                    continue
                if previous is not None and previous[0] != answer[0]:
                    self._gone = merge([self._gone, _counters_only(previous[1])])
                self._last[index] = answer
                parts.append(answer[1])
            return merge([self._gone, *parts])
