"""Prometheus endpoint: renders a stats snapshot (one process's, or the workers' merged) as metric families."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator

from prometheus_client import start_http_server
from prometheus_client.core import REGISTRY, CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from proxy.stats import ENDPOINT_LABELS, INSTANCE_LABELS, METRIC_BOUNDS, POOL_LABELS, Snapshot

log = logging.getLogger(__name__)

ENDPOINT_METRICS = (  # (metric, kind, help, field of EndpointStats)
    ("client_connections", "gauge", "Client connections open now", "clients_current"),
    ("client_connections_received", "counter", "Client connections accepted", "clients_accepted"),
    ("client_connections_refused", "counter", "Client connections refused: max_client_connections reached",
     "clients_refused"),
    ("client_connections_refused_network", "counter",
     "Client connections closed at connect: the address is not in the endpoint's allowed_cidrs",
     "clients_refused_network"),
    ("client_connections_setup_succeeded", "counter", "Client logins that succeeded", "logins_ok"),
    ("client_connections_setup_failed_auth", "counter", "Client logins refused", "logins_failed"),
    ("client_connections_throttled", "counter",
     "Client logins refused before any password check: too many failed logins from the address", "logins_throttled"),
    ("protocol_errors", "counter", "Clients closed for protocol violations", "protocol_errors"),
    ("idle_client_timeouts", "counter", "Clients closed by the idle client timeout", "idle_client_timeouts"),
    ("login_timeouts", "counter", "Clients closed by the login timeout", "login_timeouts"),
    ("cancel_requests", "counter", "PostgreSQL CancelRequests received", "cancel_requests"),
    ("fleet_forwards", "counter", "CancelRequests and KILLs passed to the peer proxy that owns the client",
     "fleet_forwards"),
    ("fleet_forwards_dropped", "counter", "CancelRequests and KILLs for a peer proxy that is unknown or did not "
     "take them", "fleet_forwards_dropped"),
    ("client_connections_tls", "counter", "Client logins that succeeded over TLS", "logins_tls"),
    ("client_connections_closed", "counter", "Client connections that ended", "clients_closed"),
    ("query_requests", "counter", "Statements answered (a Query, an extended-query batch, a MySQL command)",
     "queries"),
    ("query_errors", "counter", "Statements answered with an error", "query_errors"),
    ("database_connections_currently_session_pinned", "gauge", "Client sessions pinned to their backend now",
     "pinned_now"),
    ("query_cache_hits", "counter", "Query cache lookups answered from the cache", "cache_hits"),
    ("query_cache_misses", "counter", "Query cache lookups that went to the database", "cache_misses"),
    ("query_cache_stores", "counter", "Results stored in the query cache", "cache_stores"),
    ("query_cache_invalidations", "counter", "Table generations moved on by writes (their entries invalidated)",
     "cache_invalidations"),
    ("query_cache_evictions", "counter", "Query cache entries evicted for room (local store)", "cache_evictions"),
    ("query_cache_errors", "counter", "Query cache calls to Redis that failed (served from the database)",
     "cache_errors"),
    ("query_cache_entries", "gauge", "Entries in the local query cache", "cache_entries"),
    ("query_cache_bytes", "gauge", "Bytes held by the local query cache", "cache_bytes"),
)
POOL_METRICS = (  # (metric, kind, help, field of PoolStats or gauge of the pool)
    ("database_connections", "gauge", "Backend connections open", "open"),
    ("database_connections_currently_borrowed", "gauge", "Backend connections lent to a client now", "borrowed"),
    ("database_connection_borrows", "counter", "Backend connections lent to clients", "borrows"),
    ("database_connection_borrow_waits", "counter", "Borrows that had to wait", "waits"),
    ("database_connection_borrow_wait_seconds", "counter", "Time borrows spent waiting", "wait_time"),
    ("database_connection_borrow_timeouts", "counter", "Borrows that timed out", "borrow_timeouts"),
    ("database_connections_opened", "counter", "Backend connections opened", "opened"),
    ("database_connections_closed", "counter", "Backend connections closed", "closed"),
    ("database_connection_failures", "counter", "Backend connections that failed to open", "connect_failures"),
    ("transactions", "counter", "Transactions (or statements) served", "transactions"),
    ("database_connections_setup_succeeded_tls", "counter", "Backend connections opened with TLS", "opened_tls"),
    ("database_connections_currently_in_transaction", "gauge", "Backend connections lent out with a transaction "
     "open", "in_transaction"),
    ("max_database_connections_allowed", "gauge", "Backend connections the pool's target may open",
     "max_allowed"),
    ("database_connection_requests_waiting", "gauge", "Clients waiting for a backend connection now", "waiting"),
)
INSTANCE_METRICS = (
    ("instance_available", "gauge", "1 when the instance answered its last probe (by the role it reported)",
     "available"),
    ("instance_replica_lag_seconds", "gauge", "How far the instance's replay is behind its writer", "lag_seconds"),
)
CLUSTER_METRICS = (
    ("cluster_writer_changes", "counter", "Failovers seen: times the cluster's writer moved to another instance",
     "writer_changes"),
)
HISTOGRAMS = (  # (metric, help, field, rows: "endpoints" or "pools")
    ("query_response_latency_seconds", "Time from a statement's arrival at the proxy to the end of its reply",
     "query_latency", "endpoints"),
    ("database_response_latency_seconds", "Time from a statement's start on a backend connection to the end of "
     "its reply", "database_latency", "endpoints"),
    ("database_connection_borrow_latency_seconds", "Time a client waited for a backend connection",
     "borrow_wait", "pools"),
)


def _table(rows: list[dict[str, object]], labels: tuple[str, ...],
           metrics: tuple[tuple[str, str, str, str], ...]) -> Iterator[Metric]:
    """One family per metric, one sample per row (rows of a merged snapshot have distinct labels)."""
    for name, kind, help_text, field in metrics:
        make = GaugeMetricFamily if kind == "gauge" else CounterMetricFamily
        family = make(f"dbproxy_{name}", help_text, labels=list(labels))
        for row in rows:
            family.add_metric([str(row.get(label, "")) for label in labels], float(row.get(field, 0)))  # type: ignore[arg-type]
        yield family


def families(data: Snapshot) -> Iterator[Metric]:
    """Metric families named after RDS Proxy's metrics, labelled by engine, endpoint, cluster (and for pools by
    instance, database and user)."""
    endpoints = data.get("endpoints", [])
    yield from _table(endpoints, ENDPOINT_LABELS, ENDPOINT_METRICS)
    pins = CounterMetricFamily("dbproxy_session_pins", "Times a session was pinned, by reason",
                               labels=[*ENDPOINT_LABELS, "reason"])
    for row in endpoints:
        for reason, count in sorted(row.get("pins", {}).items()):
            pins.add_metric([*(str(row.get(label, "")) for label in ENDPOINT_LABELS), reason], count)
    yield pins
    replays = CounterMetricFamily("dbproxy_transaction_replays", "Transactions whose backend was lost, by what "
                                  "became of them (succeeded on another backend, or aborted and why)",
                                  labels=[*ENDPOINT_LABELS, "outcome"])
    for row in endpoints:
        for outcome, count in sorted(row.get("replays", {}).items()):
            replays.add_metric([*(str(row.get(label, "")) for label in ENDPOINT_LABELS), outcome], count)
    yield replays
    yield from _table(data.get("pools", []), POOL_LABELS, POOL_METRICS)
    instances = data.get("instances", [])
    yield from _table(instances, INSTANCE_LABELS, INSTANCE_METRICS)
    clusters = {(row["engine"], row["cluster"]): row for row in instances}
    yield from _table(list(clusters.values()), ("engine", "cluster"), CLUSTER_METRICS)
    for name, help_text, field, rows in HISTOGRAMS:
        labels = ENDPOINT_LABELS if rows == "endpoints" else POOL_LABELS
        family = HistogramMetricFamily(f"dbproxy_{name}", help_text, labels=list(labels))
        for row in data.get(rows, []):
            found = row.get(field)
            if found:
                family.add_metric([str(row.get(label, "")) for label in labels], *_buckets(row, field, found))
        yield family


def _buckets(row: dict[str, object], field: str, data: dict[str, object]) -> tuple[list[tuple[str, float]], float]:
    """Cumulative buckets and the sum of a histogram's data. A borrow that did not wait is not observed (the hot
    path stays lean): those borrows count in the first bucket."""
    counts = list(data["counts"])  # type: ignore[call-overload]
    if field == "borrow_wait":
        counts[0] += max(0, int(row.get("borrows", 0)) - sum(counts))  # type: ignore[call-overload]
    buckets, seen = [], 0
    for bound, count in zip([*METRIC_BOUNDS, float("inf")], counts, strict=True):
        seen += count
        buckets.append(("+Inf" if bound == float("inf") else repr(bound), float(seen)))
    return buckets, float(data["sum"])  # type: ignore[arg-type]


class SnapshotCollector(Collector):
    """Collects whatever `source` returns at scrape time."""

    def __init__(self, source: Callable[[], Snapshot]) -> None:
        self.source = source

    def collect(self) -> Iterator[Metric]:
        return families(self.source())


def serve_metrics(source: Callable[[], Snapshot], host: str, port: int) -> int:
    """Start the HTTP endpoint in a thread; returns the port it listens on."""
    REGISTRY.register(SnapshotCollector(source))
    http_server, _ = start_http_server(port, addr=host)
    bound = int(http_server.server_address[1])
    log.info("metrics on http://%s:%d/metrics", host, bound)
    return bound
