"""Prometheus endpoint: renders a stats snapshot (one process's, or the workers' merged) as metric families."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator

from prometheus_client import start_http_server
from prometheus_client.core import REGISTRY, CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from proxy.stats import ENDPOINT_LABELS, POOL_LABELS, Snapshot

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
    ("database_connections_currently_session_pinned", "gauge", "Client sessions pinned to their backend now",
     "pinned_now"),
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
    yield from _table(data.get("pools", []), POOL_LABELS, POOL_METRICS)


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
