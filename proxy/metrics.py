"""Prometheus endpoint: snapshots of the counters in proxy.stats and the pools, merged across worker processes."""

from __future__ import annotations

import json
import logging
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prometheus_client import start_http_server
from prometheus_client.core import REGISTRY, CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from proxy.stats import PINS, PROXY

if TYPE_CHECKING:
    from proxy.server import ProxyServer

log = logging.getLogger(__name__)

Snapshot = dict[str, Any]

PROXY_METRICS = (  # (metric, kind, help, field of ProxyStats)
    ("client_connections", "gauge", "Client connections open now", "clients_current"),
    ("client_connections_received", "counter", "Client connections accepted", "clients_accepted"),
    ("client_connections_refused", "counter", "Client connections refused: max_client_connections reached",
     "clients_refused"),
    ("client_connections_setup_succeeded", "counter", "Client logins that succeeded", "logins_ok"),
    ("client_connections_setup_failed_auth", "counter", "Client logins refused", "logins_failed"),
    ("protocol_errors", "counter", "Clients closed for protocol violations", "protocol_errors"),
    ("idle_client_timeouts", "counter", "Clients closed by the idle client timeout", "idle_client_timeouts"),
    ("login_timeouts", "counter", "Clients closed by the login timeout", "login_timeouts"),
)
POOL_METRICS = (  # (metric, help, field of PoolStats)
    ("database_connection_borrows", "Backend connections lent to clients", "borrows"),
    ("database_connection_borrow_waits", "Borrows that had to wait", "waits"),
    ("database_connection_borrow_timeouts", "Borrows that timed out", "borrow_timeouts"),
    ("database_connections_opened", "Backend connections opened", "opened"),
    ("database_connections_closed", "Backend connections closed", "closed"),
    ("database_connection_failures", "Backend connections that failed to open", "connect_failures"),
    ("transactions", "Transactions (or statements) served", "transactions"),
)


def snapshot(server: ProxyServer) -> Snapshot:
    """This process's counters as plain data."""
    pools = []
    targets = [(service.endpoint.engine, service.target) for service in server.services()]
    for engine, target in targets:
        for pool in list(target.pools.values()):
            pools.append({"engine": engine, "database": pool.database, "user": pool.user,
                          "open": len(pool.idle) + len(pool.busy), "borrowed": len(pool.busy),
                          **pool.stats.as_dict()})
    return {"proxy": PROXY.as_dict(), "pinned": PINS.current, "pins": dict(PINS.by_reason), "pools": pools}


def merge(parts: list[Snapshot]) -> Snapshot:
    """Add up the snapshots of several workers."""
    total: Snapshot = {"proxy": {}, "pinned": 0, "pins": {}, "pools": []}
    pools: dict[tuple[str, str, str], dict[str, Any]] = {}
    for part in parts:
        for name, value in part["proxy"].items():
            total["proxy"][name] = total["proxy"].get(name, 0) + value
        total["pinned"] += part["pinned"]
        for reason, count in part["pins"].items():
            total["pins"][reason] = total["pins"].get(reason, 0) + count
        for pool in part["pools"]:
            key = (pool["engine"], pool["database"], pool["user"])
            merged = pools.setdefault(key, {"engine": key[0], "database": key[1], "user": key[2]})
            for name, value in pool.items():
                if isinstance(value, int | float):
                    merged[name] = merged.get(name, 0) + value
    total["pools"] = list(pools.values())
    return total


def families(data: Snapshot) -> Iterator[Metric]:
    """Metric families named after RDS Proxy's metrics."""
    for name, kind, help_text, field in PROXY_METRICS:
        make = GaugeMetricFamily if kind == "gauge" else CounterMetricFamily
        yield make(f"dbproxy_{name}", help_text, value=data["proxy"].get(field, 0))
    yield GaugeMetricFamily("dbproxy_database_connections_currently_session_pinned",
                            "Client sessions pinned to their backend now", value=data["pinned"])
    pins = CounterMetricFamily("dbproxy_session_pins", "Times a session was pinned, by reason", labels=["reason"])
    for reason, count in sorted(data["pins"].items()):
        pins.add_metric([reason], count)
    yield pins
    labels = ["engine", "database", "user"]
    gauges = [GaugeMetricFamily("dbproxy_database_connections", "Backend connections open", labels=labels),
              GaugeMetricFamily("dbproxy_database_connections_currently_borrowed",
                                "Backend connections lent to a client now", labels=labels)]
    counters = [CounterMetricFamily(f"dbproxy_{name}", help_text, labels=labels) for name, help_text, _ in POOL_METRICS]
    for pool in data["pools"]:
        key = [pool["engine"], pool["database"], pool["user"]]
        gauges[0].add_metric(key, pool["open"])
        gauges[1].add_metric(key, pool["borrowed"])
        for family, (_, _, field) in zip(counters, POOL_METRICS, strict=True):
            family.add_metric(key, pool[field])
    yield from gauges
    yield from counters


class SnapshotCollector(Collector):
    """Collects whatever `source` returns at scrape time."""

    def __init__(self, source: Callable[[], Snapshot]) -> None:
        self.source = source

    def collect(self) -> Iterator[Metric]:
        return families(self.source())


def read_worker_snapshot(path: Path) -> Snapshot | None:
    """Ask one worker for its snapshot over its unix socket (None if it does not answer)."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(2)
            sock.connect(str(path))
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        return dict(json.loads(b"".join(chunks)))
    except (OSError, ValueError) as exc:
        log.warning("metrics: worker at %s did not answer: %s", path, exc)
        return None


def serve_metrics(source: Callable[[], Snapshot], host: str, port: int) -> int:
    """Start the HTTP endpoint in a thread; returns the port it listens on."""
    REGISTRY.register(SnapshotCollector(source))
    http_server, _ = start_http_server(port, addr=host)
    bound = int(http_server.server_address[1])
    log.info("metrics on http://%s:%d/metrics", host, bound)
    return bound
