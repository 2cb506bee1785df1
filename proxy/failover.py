"""Promoting an instance of a cluster on an operator's word (`dbproxy failover`, POST /v1/failover): the running
proxies follow the promoted writer at their next monitor round (and fence the one it replaces)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

from proxy.config import ClusterBase, Config, Instance, engine_active, engine_settings
from proxy.secrets import SecretStore
from proxy.topology.model import Role
from proxy.topology.mysql_probe import mysql_probe
from proxy.topology.pg_probe import postgres_probe
from proxy.topology.promote import AlreadyWriter, InstanceUnreachable, PromotionError, promoter

PROBE_TIMEOUT = 5.0

__all__ = ["AlreadyWriter", "FailoverRefused", "InstanceUnreachable", "OtherWriter", "Promoted", "PromotionError",
           "find_instance", "promote_instance"]


class FailoverRefused(Exception):
    """No such instance (or more than one), or no monitor_user password to promote it with: nothing was tried."""


class OtherWriter(PromotionError):
    """Another instance of the MariaDB cluster is a healthy writer: promoting would leave two."""


@dataclass(frozen=True)
class Promoted:
    engine: str
    cluster: str
    label: str
    seconds: float

    @property
    def message(self) -> str:
        return (f"promoted {self.label} in {self.engine} cluster {self.cluster} ({self.seconds * 1000:.0f} ms); "
                "running proxies follow it at their next monitor round")


def find_instance(config: Config, wanted: str, cluster_name: str | None) -> tuple[str, str, ClusterBase, Instance]:
    """(engine, cluster name, cluster, instance) of the instance named `wanted` (its name, or host:port) in the
    cluster `cluster_name` (any cluster when None); FailoverRefused when there is none or more than one."""
    found: list[tuple[str, str, ClusterBase, Instance]] = []
    known: list[str] = []
    for engine, settings in engine_settings(config):
        if not engine_active(settings):
            continue
        for name, cluster in settings.clusters.items():
            if cluster_name is not None and name != cluster_name:
                continue
            for instance in cluster.instances:
                known.append(f"{name}/{instance.label}")
                if wanted in (instance.label, f"{instance.host}:{instance.port}"):
                    found.append((engine, name, cluster, instance))
    if not found:
        where = f"cluster '{cluster_name}'" if cluster_name is not None else "any cluster"
        raise FailoverRefused(f"no instance '{wanted}' in {where} (known: {', '.join(known) or 'none'})")
    if len(found) > 1:
        clusters = ", ".join(f"{engine} cluster {name}" for engine, name, _, _ in found)
        raise FailoverRefused(f"instance '{wanted}' is in more than one cluster ({clusters}); name one with --cluster")
    return found[0]


async def promote_instance(config: Config, secrets: SecretStore, wanted: str, cluster_name: str | None,
                           warn: Callable[[str], None]) -> Promoted:
    """Promote the instance with the cluster's monitor_user. Raises FailoverRefused (nothing tried), AlreadyWriter,
    OtherWriter (MariaDB: another instance still writes), InstanceUnreachable or PromotionError; `warn` is told
    when a PostgreSQL writer still runs beside the promoted standby."""
    engine, name, cluster, instance = find_instance(config, wanted, cluster_name)
    secret = secrets.backend_login(cluster.monitor_user) if cluster.monitor_user else None
    if secret is None:
        raise FailoverRefused(f"cluster {name}: no monitor_user, or no password for it in the secrets: the proxy has "
                              "no admin connection to promote with")
    user, password = cluster.monitor_user, secret.password.decode()
    probe = (postgres_probe(user, password, "postgres") if engine == "postgresql" else mysql_probe(user, password))
    label = f"{instance.label} ({instance.host}:{instance.port})" if instance.name else instance.label
    try:
        statuses = await asyncio.gather(*(probe(other.host, other.port, PROBE_TIMEOUT)
                                          for other in cluster.instances))
    finally:
        await probe.close()
    status = next(s for s in statuses if s.address == (instance.host, instance.port))
    if not status.healthy:
        raise InstanceUnreachable(f"{label} is unreachable: {status.error}")
    if status.role is Role.WRITER:
        raise AlreadyWriter(f"{label} is the writer already")
    for other in statuses:
        if other.healthy and other.role is Role.WRITER:
            if engine != "postgresql":  # no timeline tells the promoted writer from the old one
                raise OtherWriter(f"{other.host}:{other.port} still writes: make it read-only (SET GLOBAL "
                                  f"read_only = 1) or stop it first; nothing was promoted")
            warn(f"{other.host}:{other.port} still writes; the proxies follow the promoted standby (its new "
                 "timeline) and fence it, but clients connected to it directly can still write there")
    started = time.monotonic()
    await promoter(engine, user, password)(instance.host, instance.port)
    return Promoted(engine, name, label, time.monotonic() - started)
