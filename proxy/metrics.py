"""Prometheus endpoint: one collector that reads the counters in proxy.stats and the pools at scrape time."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import start_http_server
from prometheus_client.core import REGISTRY, CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from proxy.stats import PINS, PROXY

if TYPE_CHECKING:
    from proxy.pool.pool import Target
    from proxy.server import ProxyServer

log = logging.getLogger(__name__)


class StatsCollector(Collector):
    """Turns the proxy's counters into metrics named after RDS Proxy's (nothing is counted twice)."""

    def __init__(self, server: ProxyServer) -> None:
        self.server = server

    def targets(self) -> list[tuple[str, Target]]:
        found = [("postgresql", self.server.postgres.target)]
        mysql = getattr(self.server, "mysql", None)
        if mysql is not None:
            found.append(("mysql", mysql.target))
        return found

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily("dbproxy_client_connections", "Client connections open now",
                                value=PROXY.clients_current)
        yield CounterMetricFamily("dbproxy_client_connections_received", "Client connections accepted",
                                  value=PROXY.clients_accepted)
        yield CounterMetricFamily("dbproxy_client_connections_setup_succeeded", "Client logins that succeeded",
                                  value=PROXY.logins_ok)
        yield CounterMetricFamily("dbproxy_client_connections_setup_failed_auth", "Client logins refused",
                                  value=PROXY.logins_failed)
        yield CounterMetricFamily("dbproxy_protocol_errors", "Clients closed for protocol violations",
                                  value=PROXY.protocol_errors)
        yield CounterMetricFamily("dbproxy_idle_client_timeouts", "Clients closed by the idle client timeout",
                                  value=PROXY.idle_client_timeouts)
        yield GaugeMetricFamily("dbproxy_database_connections_currently_session_pinned",
                                "Client sessions pinned to their backend now", value=PINS.current)
        pins = CounterMetricFamily("dbproxy_session_pins", "Times a session was pinned, by reason", labels=["reason"])
        for reason, count in sorted(PINS.by_reason.items()):
            pins.add_metric([reason], count)
        yield pins
        labels = ["engine", "database", "user"]
        open_now = GaugeMetricFamily("dbproxy_database_connections", "Backend connections open", labels=labels)
        borrowed = GaugeMetricFamily("dbproxy_database_connections_currently_borrowed",
                                     "Backend connections lent to a client now", labels=labels)
        counters = {
            name: CounterMetricFamily(f"dbproxy_{name}", help_text, labels=labels)
            for name, help_text in (
                ("database_connection_borrows", "Backend connections lent to clients"),
                ("database_connection_borrow_waits", "Borrows that had to wait"),
                ("database_connection_borrow_timeouts", "Borrows that timed out"),
                ("database_connections_opened", "Backend connections opened"),
                ("database_connections_closed", "Backend connections closed"),
                ("database_connection_failures", "Backend connections that failed to open"),
                ("transactions", "Transactions (or statements) served"),
            )
        }
        fields = {"database_connection_borrows": "borrows", "database_connection_borrow_waits": "waits",
                  "database_connection_borrow_timeouts": "borrow_timeouts", "database_connections_opened": "opened",
                  "database_connections_closed": "closed", "database_connection_failures": "connect_failures",
                  "transactions": "transactions"}
        for engine, target in self.targets():
            for pool in list(target.pools.values()):
                key = [engine, pool.database, pool.user]
                open_now.add_metric(key, len(pool.idle) + len(pool.busy))
                borrowed.add_metric(key, len(pool.busy))
                for name, family in counters.items():
                    family.add_metric(key, getattr(pool.stats, fields[name]))
        yield open_now
        yield borrowed
        yield from counters.values()


def serve_metrics(server: ProxyServer, host: str, port: int) -> int:
    """Start the HTTP endpoint in a thread; returns the port it listens on."""
    REGISTRY.register(StatsCollector(server))
    http_server, _ = start_http_server(port, addr=host)
    bound = int(http_server.server_address[1])
    log.info("metrics on http://%s:%d/metrics", host, bound)
    return bound
