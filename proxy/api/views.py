"""The API's read views: clusters, instances and endpoints from the configuration and what the workers see (their
listeners, pools and topology monitors), and readiness."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from proxy import channel
from proxy.config import Config, EndpointRole, engine_active, engine_settings, uses_clusters
from proxy.endpoints import Endpoint, resolve_endpoints

VIEW_TIMEOUT = 5.0  # seconds every worker has to say what it serves
REACH_TIMEOUT = 1.0  # seconds to connect to an unmonitored instance (readiness)

Row = dict[str, Any]


async def worker_views(fanout: Any) -> list[channel.Message]:
    answers: list[channel.Message] = await fanout({"kind": "view"}, VIEW_TIMEOUT)
    return answers


def _first(views: list[channel.Message]) -> channel.Message:
    return next((view for view in views if "error" not in view), {"endpoints": {}, "clusters": {}})


InstanceRow = tuple[str, str, bool, str, str, int, str | None]


def _instances(config: Config) -> list[InstanceRow]:
    """(engine, cluster, monitored, label, host, port, configured role) of every instance served."""
    rows: list[InstanceRow] = []
    for engine, settings in engine_settings(config):
        if not engine_active(settings):
            continue
        if not uses_clusters(settings):
            label = f"{settings.backend_host}:{settings.backend_port}"
            rows.append((engine, engine, False, label, settings.backend_host, settings.backend_port, "writer"))
            continue
        for name, cluster in settings.clusters.items():
            for instance in cluster.instances:
                rows.append((engine, name, cluster.monitor_interval > 0, instance.label, instance.host, instance.port,
                             instance.role.value if instance.role is not None else None))
    return rows


def instances(config: Config, views: list[channel.Message]) -> list[Row]:
    """Every instance: its role, health and lag as the topology monitor last saw them (unmonitored: the role the
    configuration gives, health unknown)."""
    clusters = _first(views).get("clusters", {})
    rows = []
    for engine, cluster, monitored, label, host, port, configured in _instances(config):
        seen = clusters.get(f"{engine}/{cluster}", {}).get(f"{host}:{port}")
        rows.append({
            "engine": engine, "cluster": cluster, "name": label, "host": host, "port": port,
            "configured_role": configured, "monitored": monitored,
            "role": seen["role"] if seen else "unknown", "healthy": seen["healthy"] if seen else None,
            "lag_seconds": seen["lag_seconds"] if seen else None, "fenced": bool(seen and seen["fenced"]),
            "error": seen["error"] if seen else "",
            "checked_seconds_ago": seen["checked_seconds_ago"] if seen else None})
    return rows


def clusters(config: Config, views: list[channel.Message]) -> list[Row]:
    """Every cluster with its instances and the endpoints on it."""
    endpoints = resolve_endpoints(config)
    found: dict[tuple[str, str], Row] = {}
    for row in instances(config, views):
        key = (row["engine"], row["cluster"])
        cluster = found.setdefault(key, {"engine": row["engine"], "name": row["cluster"],
                                         "monitored": row["monitored"], "instances": [],
                                         "endpoints": [e.name for e in endpoints
                                                       if (e.engine, e.cluster) == key]})
        cluster["instances"].append({k: v for k, v in row.items() if k not in ("engine", "cluster", "monitored")})
    for cluster in found.values():
        writers = [i["name"] for i in cluster["instances"] if i["role"] == "writer" and i["healthy"]]
        cluster["writer"] = writers[0] if writers else None
    return list(found.values())


def _labels(config: Config) -> dict[tuple[str, str, str, int], str]:
    """(engine, cluster, host, port) -> the instance's label."""
    return {(engine, cluster, host, port): label for engine, cluster, _, label, host, port, _ in _instances(config)}


def _by_address(first: Row, endpoint: Endpoint, labels: dict[tuple[str, str, str, int], str]) -> tuple[list[str], Row]:
    """The instances a worker's endpoint serves and has, named by where its targets point now (a failover or a
    switchover re-points a target that keeps its first name)."""
    def label(target: Row) -> str:
        return labels.get((endpoint.engine, endpoint.cluster, target["host"], target["port"]),
                          f"{target['host']}:{target['port']}")

    instances = {label(target): target for target in first.get("instances", {}).values()}
    serving = [label(first["instances"][name]) for name in first.get("serving", []) if name in first["instances"]]
    return serving, instances


def endpoints(config: Config, views: list[channel.Message]) -> list[Row]:
    """Every endpoint: where it listens, the instances it serves now, whether it is paused, its clients."""
    rows = []
    labels = _labels(config)
    for endpoint in resolve_endpoints(config):
        seen = [view["endpoints"][endpoint.name] for view in views
                if "error" not in view and endpoint.name in view.get("endpoints", {})]
        first = seen[0] if seen else {}
        serving, instances = _by_address(first, endpoint, labels) if first else (list(endpoint.serving), {})
        rows.append({
            "name": endpoint.name, "engine": endpoint.engine, "cluster": endpoint.cluster,
            "role": endpoint.role.value, "port": first.get("port", endpoint.settings.port),
            "pool_mode": endpoint.settings.pool.mode.value,
            "listening": bool(seen) and len(seen) == len(views) and all(part["listening"] for part in seen),
            "serving": serving, "paused": any(part["paused"] for part in seen),
            "held": any(part["held"] for part in seen), "clients": sum(part["clients"] for part in seen),
            "instances": instances})
    return rows


async def _reachable(host: str, port: int) -> bool:
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), REACH_TIMEOUT)
    except (OSError, TimeoutError):
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


async def _endpoint_problem(endpoint: Endpoint, row: Row, statuses: dict[str, Any] | None) -> str | None:
    """Why the endpoint cannot serve now (None: it can): no listener, or no healthy instance for its role."""
    if not row["listening"]:
        return f"endpoint {endpoint.name}: not listening in every worker"
    serving = [row["instances"].get(label) for label in row["serving"]]
    addresses = [(part["host"], part["port"]) for part in serving if part]
    if not addresses:
        return f"endpoint {endpoint.name}: no instance is eligible"
    if statuses is None:  # not monitored: can the instance be reached at all?
        reached = await asyncio.gather(*(_reachable(host, port) for host, port in addresses))
        return None if any(reached) else (f"endpoint {endpoint.name}: "
                                          f"{', '.join(f'{h}:{p}' for h, p in addresses)} cannot be reached")
    wanted = "writer" if endpoint.role is EndpointRole.READ_WRITE else None
    for host, port in addresses:
        status = statuses.get(f"{host}:{port}")
        if status and status["healthy"] and not status["fenced"] and wanted in (None, status["role"]):
            return None
    return (f"endpoint {endpoint.name}: no healthy {wanted or 'instance'} among "
            f"{', '.join(f'{h}:{p}' for h, p in addresses)}")


async def readiness(config: Config, views: list[channel.Message]) -> list[str]:
    """Why the proxy is not ready (empty: ready): a worker that does not answer, an endpoint not listening, or
    without a healthy instance for its role."""
    problems = [str(view.get("message", view["error"])) for view in views if "error" in view]
    monitored = _first(views).get("clusters", {})
    rows = {row["name"]: row for row in endpoints(config, views)}
    checks = [_endpoint_problem(endpoint, rows[endpoint.name], monitored.get(f"{endpoint.engine}/{endpoint.cluster}"))
              for endpoint in resolve_endpoints(config)]
    problems.extend(problem for problem in await asyncio.gather(*checks) if problem)
    return problems
