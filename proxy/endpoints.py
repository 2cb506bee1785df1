"""Endpoints resolved from the configuration: each listener with the complete settings of the instance it serves."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from proxy.config import (
    ClusterBase,
    Config,
    EndpointBase,
    EndpointRole,
    EngineSettings,
    Instance,
    InstanceRole,
    MySQLSettings,
    PostgresSettings,
    engine_active,
    engine_settings,
    uses_clusters,
)

# Keys a cluster or an endpoint may give for its endpoints, over the engine section's (pool merges key by key).
OVERRIDABLE = ("auth_method", "caching_sha2_full_auth", "backend_tls", "backend_ca_file", "backend_connect_timeout",
               "auth_passthrough", "auth_user", "auth_query", "auth_cache_ttl",
               "token_auth", "token_auth_users", "require_tls", "allowed_cidrs", "parameter_group")


@dataclass(frozen=True)
class Member:
    """An instance an endpoint may send work to: its label (as member lists name it) and its address."""

    label: str
    host: str
    port: int

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.port


@dataclass(frozen=True)
class Endpoint:
    """One client-facing listener: its engine, names, and the engine settings (port, auth, pool, backend address)
    it runs with, as if it were the engine section of a single-backend configuration."""

    engine: str  # "postgresql" or "mysql"
    name: str
    cluster: str
    instance: str
    role: EndpointRole
    settings: PostgresSettings | MySQLSettings
    # The instances it may send work to (read_only: every instance of the cluster, the writer for the fallback;
    # custom: its members; read_write: the configured writer), and those it serves until the topology is known.
    members: tuple[Member, ...] = ()
    serving: tuple[str, ...] = ()
    max_replica_lag: float = 0.0  # read_only: a reader further behind (seconds) is left out; 0: no limit
    reader_fallback: bool = True  # read_only: the writer serves while no reader is eligible
    causal_reads: bool = False  # read_only: each transaction sees the writes committed before it (proxy.session.causal)
    causal_read_timeout: float = 1.0

    @property
    def address(self) -> tuple[str, int]:
        return self.settings.backend_host, self.settings.backend_port

    def describe(self) -> str:
        host, port = self.address
        address = f"{host}:{port}"
        return (f"endpoint {self.name} ({self.engine}, {self.role}) -> cluster {self.cluster} instance "
                f"{self.instance}" + (f" at {address}" if self.instance != address else ""))


def writer_of(instances: list[Instance]) -> Instance:
    """The writer: the instance with role "writer", else the first."""
    return next((i for i in instances if i.role is InstanceRole.WRITER), instances[0])


def reader_of(instances: list[Instance]) -> Instance:
    """A reader: the first with role "reader", else the first that is not the writer, else the writer."""
    found = next((i for i in instances if i.role is InstanceRole.READER), None)
    if found is not None:
        return found
    writer = writer_of(instances)
    return next((i for i in instances if i is not writer), writer)


def candidates(endpoint: EndpointBase, cluster: ClusterBase) -> tuple[list[Instance], list[Instance]]:
    """The instances an endpoint may send work to, and those it serves until the proxy discovers roles: read_write
    the writer; read_only any instance, serving the readers the configuration names (else every instance but
    the writer, else the writer); custom its members (or the cluster's instances not excluded), serving them all."""
    instances = cluster.instances
    if endpoint.role is EndpointRole.READ_WRITE:
        writer = writer_of(instances)
        return [writer], [writer]
    if endpoint.role is EndpointRole.READ_ONLY:
        readers = [i for i in instances if i.role is InstanceRole.READER]
        if not readers:
            writer = writer_of(instances)
            readers = [i for i in instances if i is not writer] or [writer]
        return list(instances), readers
    if endpoint.members is not None:
        by_label = {i.label: i for i in instances}
        members = [by_label[label] for label in dict.fromkeys(endpoint.members)]
    else:
        excluded = set(endpoint.exclude or ())
        members = [i for i in instances if i.label not in excluded]
    return members, members


def chosen_instance(endpoint: EndpointBase, cluster: ClusterBase) -> Instance:
    """Which instance an endpoint serves, until the proxy discovers roles: see the configuration reference."""
    instances = cluster.instances
    if endpoint.role is EndpointRole.READ_WRITE:
        return writer_of(instances)
    if endpoint.role is EndpointRole.READ_ONLY:
        return reader_of(instances)
    if endpoint.members is not None:
        return next(i for i in instances if i.label == endpoint.members[0])
    excluded = set(endpoint.exclude or ())
    return next(i for i in instances if i.label not in excluded)


def _overrides(part: EndpointBase | ClusterBase, settings: EngineSettings) -> dict[str, Any]:
    """The keys `part` gives explicitly that the engine section has too, and its pool merged over `settings`'."""
    update = {key: getattr(part, key) for key in OVERRIDABLE
              if key in part.model_fields_set and key in type(settings).model_fields}
    pool = part.pool
    given = {key: getattr(pool, key) for key in pool.model_fields_set}
    if given:
        update["pool"] = settings.pool.model_copy(update=given)
    return update


def _cluster_endpoint(engine: str, name: str, settings: EngineSettings) -> Endpoint:
    endpoint = settings.endpoints[name]
    cluster = settings.clusters[endpoint.cluster]
    instance = chosen_instance(endpoint, cluster)
    resolved = settings.model_copy(update={"clusters": {}, "endpoints": {}, **_overrides(cluster, settings)})
    resolved = resolved.model_copy(update={
        **_overrides(endpoint, resolved), "enabled": True, "port": endpoint.port,
        "backend_host": instance.host, "backend_port": instance.port})
    members, serving = candidates(endpoint, cluster)
    lag = cluster.max_replica_lag if endpoint.max_replica_lag is None else endpoint.max_replica_lag
    fallback = cluster.reader_fallback if endpoint.reader_fallback is None else endpoint.reader_fallback
    return Endpoint(engine, name, endpoint.cluster, instance.label, endpoint.role, resolved,
                    tuple(Member(i.label, i.host, i.port) for i in members), tuple(i.label for i in serving),
                    lag, fallback, endpoint.causal_reads, endpoint.causal_read_timeout)


def resolve_endpoints(config: Config) -> list[Endpoint]:
    """Every endpoint that listens, in file order (the single-backend form gives one named after its engine)."""
    found: list[Endpoint] = []
    for engine, settings in engine_settings(config):
        if not engine_active(settings):
            continue
        if not uses_clusters(settings):
            instance = f"{settings.backend_host}:{settings.backend_port}"
            member = Member(instance, settings.backend_host, settings.backend_port)
            found.append(Endpoint(engine, engine, engine, instance, EndpointRole.READ_WRITE, settings, (member,),
                                  (instance,)))
            continue
        found.extend(_cluster_endpoint(engine, name, settings) for name in settings.endpoints)
    return found


def with_ports(config: Config, ports: dict[str, int]) -> Config:
    """`config` with the listening ports of the endpoints named in `ports` replaced."""
    update: dict[str, Any] = {}
    for engine, settings in engine_settings(config):
        if not uses_clusters(settings):
            if engine in ports:
                update[engine] = settings.model_copy(update={"port": ports[engine]})
            continue
        changed = {name: endpoint.model_copy(update={"port": ports[name]})
                   for name, endpoint in settings.endpoints.items() if name in ports}
        if changed:
            update[engine] = settings.model_copy(update={"endpoints": {**settings.endpoints, **changed}})
    return config.model_copy(update=update) if update else config
