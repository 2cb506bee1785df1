"""The proxy process: one listener per endpoint, the once-a-second janitor, and graceful shutdown."""

from __future__ import annotations

import asyncio
import gc
import logging
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeVar

from proxy.auth.failures import flush_all as flush_failed_logins
from proxy.auth.guard import LoginGuard
from proxy.auth.token_login import make_verifier
from proxy.config import ClientTLSMode, ClusterBase, Config, EndpointRole, engine_active, engine_settings
from proxy.console import Console
from proxy.endpoints import Endpoint, resolve_endpoints
from proxy.errors import SHUTDOWN_TEXT, ShuttingDown
from proxy.fleet.node import Fleet
from proxy.fleet.wire import Message
from proxy.metrics import serve_metrics
from proxy.rundir import worker_count, worker_index
from proxy.secret_sources import fingerprint
from proxy.secret_watch import SecretsWatch
from proxy.secrets import SecretStore
from proxy.session.causal import CausalCluster, CausalReads
from proxy.session.client import State
from proxy.session.mysql_client import MySQLClient
from proxy.session.mysql_service import MySQLService
from proxy.session.pg_client import PostgresClient
from proxy.session.pg_service import PostgresService
from proxy.stats import Series, StatsRegistry
from proxy.tls import server_context
from proxy.topology.follow import NO_WRITER_INTERVAL, AutoPromote, ClusterFollower, Followed
from proxy.topology.model import Probe
from proxy.topology.monitor import TopologyMonitor
from proxy.topology.mysql_probe import mysql_probe
from proxy.topology.pg_probe import postgres_probe
from proxy.topology.promote import promoter
from proxy.topology.writer_position import MariaDBWriter, PostgresWriter, WriterPosition

if TYPE_CHECKING:
    from proxy.cache.cache import QueryCache

log = logging.getLogger(__name__)

JANITOR_INTERVAL = 1.0

Service = PostgresService | MySQLService
Client = PostgresClient | MySQLClient
SHUTDOWN = ShuttingDown(SHUTDOWN_TEXT)
S = TypeVar("S", PostgresService, MySQLService)


@dataclass(eq=False)
class Listener:
    """One endpoint: its service (pools, settings), its listening socket and the clients it accepted."""

    endpoint: Endpoint
    service: Service
    clients: set[Client] = field(default_factory=set)
    server: asyncio.Server | None = None
    port: int = 0
    cached: Callable[[], Client] | None = None  # makes the sessions of an endpoint with a query cache

    @property
    def name(self) -> str:
        return self.endpoint.name

    def make_client(self) -> Client:
        client: Client
        if self.cached is not None:
            client = self.cached()
        elif isinstance(self.service, PostgresService):
            client = PostgresClient(self.service)
        else:
            client = MySQLClient(self.service)
        self.clients.add(client)
        client.registry = self.clients  # left at once when its socket is gone
        return client


def start_query_cache(config: Config) -> QueryCache | None:
    """The process's query cache, when [query_cache] is enabled (its modules load only then)."""
    if not config.query_cache.enabled:
        return None
    from proxy.cache.cache import QueryCache

    return QueryCache(config.query_cache)


def client_tls(config: Config) -> ssl.SSLContext | None:
    return None if config.tls.mode is ClientTLSMode.DISABLE else server_context(config.tls)


class ProxyServer:
    """Owns the listening sockets and the services behind them."""

    def __init__(self, config: Config, secrets: SecretStore | None = None) -> None:
        self.config = config
        seen = fingerprint(config.secrets)  # before reading: a change meanwhile is picked up by the watch
        self.secrets = secrets or SecretStore.from_settings(config.secrets)
        self.tls = client_tls(config)
        self.tokens = make_verifier(config)  # one per process, handed to every service
        self.guard = LoginGuard(config.auth)  # the same: the failed-login throttle and the audit log
        self.stats = StatsRegistry()
        self.stats.keep_insights(config.server.statement_insights)
        # One per process (a reload keeps it: its settings take a restart).
        self.query_cache = start_query_cache(config)
        self.listeners: dict[str, Listener] = {}
        self.retiring: list[Listener] = []  # endpoints removed by a reload whose clients have not all left
        self.fleet = Fleet(config.fleet, config.server.host) if config.fleet.enabled else None
        if self.fleet is not None:
            self.fleet.handlers = {"cancel": self._fleet_cancel, "kill": self._fleet_kill}
        for endpoint in resolve_endpoints(config):
            service = self.make_service(endpoint)
            self.listeners[endpoint.name] = Listener(endpoint, service, cached=self.cached_clients(endpoint, service))
        self.servers: list[asyncio.Server] = []  # other sockets kept open until stop (the workers' unix sockets)
        self._janitor: asyncio.Task[None] | None = None
        self.ports: dict[str, int] = {}
        self.reuse_port = False
        self.causal_clusters: dict[tuple[str, str], CausalCluster] = {}  # (engine, cluster): see make_followers
        self.held: set[str] = set()  # endpoints a switchover holds: no topology follower moves or resumes them
        self.monitored: list[tuple[str, str, ClusterBase, TopologyMonitor]] = []  # (engine, name, cluster, monitor)
        self.followers: list[ClusterFollower] = self.make_followers()
        self.stats.instances = self.instance_series
        self.console: Console | None = None  # the admin console's commands (see proxy.console_local)
        self.secrets_watch = SecretsWatch(lambda: self.config.secrets, self.use_secrets, seen)

    def use_secrets(self, secrets: SecretStore) -> None:
        """New logins (of clients and to the database) use `secrets`; connected ones carry on."""
        self.secrets = secrets
        for service in self.services():
            service.secrets = secrets
        if any(getattr(s.settings, "auth_method", None) == "scram-sha-256" for s in self.services()):
            secrets.warm_up()

    def instance_series(self) -> list[Series]:
        """Each monitored instance's role, availability and lag as the monitors saw them last."""
        rows: list[Series] = []
        for engine, name, cluster, monitor in self.monitored:
            statuses = monitor.snapshot()
            for instance in cluster.instances:
                status = statuses.get((instance.host, instance.port))
                rows.append({"engine": engine, "cluster": name, "instance": instance.label,
                             "role": status.role.value if status is not None else "unknown",
                             "available": int(status is not None and status.healthy),
                             "lag_seconds": (status.lag_seconds or 0.0) if status is not None else 0.0,
                             "writer_changes": monitor.writer_changes})
        return rows

    def make_followers(self) -> list[ClusterFollower]:
        """A topology monitor and follower per cluster with a monitor_interval (in each worker process)."""
        self.monitored = []
        followers = [self._follow_cluster(engine, name, cluster) for engine, name, cluster in _clusters(self.config)]
        return [follower for follower in followers if follower is not None]

    def _follow_cluster(self, engine: str, name: str, cluster: ClusterBase) -> ClusterFollower | None:
        """The monitor and follower of one cluster (None: not monitored); its causal-reads writer position too."""
        if cluster.monitor_interval <= 0:
            return None
        secret = self.secrets.backend_login(cluster.monitor_user)
        if secret is None:
            log.error("cluster %s: no password for monitor_user %s in the secrets; the cluster is not "
                      "monitored and its endpoints stay where the configuration points them", name,
                      cluster.monitor_user)
            return None
        password = secret.password.decode()
        probe: Probe = (postgres_probe(cluster.monitor_user, password, "postgres") if engine == "postgresql"
                        else mysql_probe(cluster.monitor_user, password))
        instances = [(instance.host, instance.port) for instance in cluster.instances]
        timeout = min(5.0, max(1.0, 2 * cluster.monitor_interval))
        monitor = TopologyMonitor(instances, probe, cluster.monitor_interval, timeout)
        self.monitored.append((engine, name, cluster, monitor))
        auto = (AutoPromote(promoter(engine, cluster.monitor_user, password), cluster.promotion_grace)
                if cluster.auto_promote else None)
        # For causal reads: the writer's position over a kept admin connection (opened at first use).
        writer = (PostgresWriter(cluster.monitor_user, password, timeout=timeout) if engine == "postgresql"
                  else MariaDBWriter(cluster.monitor_user, password, timeout=timeout))
        self.causal_clusters[(engine, name)] = CausalCluster(monitor, WriterPosition(monitor, writer))
        return ClusterFollower(name, monitor, self._followed(engine, name), auto,
                               min(NO_WRITER_INTERVAL, cluster.monitor_interval))

    async def refollow(self, old: Config) -> None:
        """After a reload: each cluster that was added, removed or changed (its instances, its monitoring) gets a
        new monitor and follower; the others keep theirs, with what they learned (roles, fenced writers)."""
        before = {(engine, name): cluster for engine, name, cluster in _clusters(old)}
        after = {(engine, name): cluster for engine, name, cluster in _clusters(self.config)}
        changed = {key for key in before.keys() | after.keys() if before.get(key) != after.get(key)}
        if not changed:
            return
        kept: list[tuple[ClusterFollower, tuple[str, str, ClusterBase, TopologyMonitor]]] = []
        for follower, monitored in zip(self.followers, self.monitored, strict=True):
            if (monitored[0], monitored[1]) in changed:
                await follower.stop()
                causal = self.causal_clusters.pop((monitored[0], monitored[1]), None)
                if causal is not None:
                    await causal.position.close()
            else:
                kept.append((follower, monitored))
        self.followers = [follower for follower, _ in kept]
        self.monitored = [monitored for _, monitored in kept]
        for engine, name in sorted(changed & after.keys()):
            added = self._follow_cluster(engine, name, after[(engine, name)])
            if added is not None:
                self.followers.append(added)
                added.start()
                log.info("reload: cluster %s: monitoring %s", name,
                         ", ".join(instance.label for instance in after[(engine, name)].instances))
        for _engine, name in sorted(changed - after.keys()):
            log.info("reload: cluster %s removed: no longer monitored", name)

    def _followed(self, engine: str, cluster: str) -> Callable[[], list[Followed]]:
        def endpoints() -> list[Followed]:
            return [Followed(listener.name, listener.endpoint.role, listener.service.target, listener.service.group,
                             listener.endpoint.max_replica_lag, listener.endpoint.reader_fallback)
                    for listener in self.listeners.values()
                    if listener.endpoint.engine == engine and listener.endpoint.cluster == cluster
                    and listener.name not in self.held]
        return endpoints

    def make_service(self, endpoint: Endpoint) -> Service:
        """The service of an endpoint; client registries are shared by every endpoint of the engine."""
        service: Service
        if endpoint.engine == "postgresql":
            service = PostgresService(self.config, endpoint, self.secrets, self.tls, self.stats,
                                      self.first_service(PostgresService))
        else:
            service = MySQLService(self.config, endpoint, self.secrets, self.tls, self.stats,
                                   self.first_service(MySQLService))
        service.tokens = self.tokens
        service.guard = self.guard
        service.fleet = self.fleet
        service.console = getattr(self, "console", None)  # (None while the server is being made)
        if endpoint.role is EndpointRole.READ_ONLY:  # used while its causal_reads is on (a reload may turn it on)
            service.causal = CausalReads(
                endpoint.name, lambda: self.causal_clusters.get((service.endpoint.engine, service.endpoint.cluster)),
                lambda: self._writer_service(service.endpoint.engine, service.endpoint.cluster))
        return service

    def cached_clients(self, endpoint: Endpoint, service: Service) -> Callable[[], Client] | None:
        """What makes the client sessions of an endpoint with a query cache (the process has one, the endpoint
        rules or hints); None: the plain sessions."""
        if self.query_cache is None:
            return None
        from proxy.cache.clients import cached_clients  # (with sqlglot and redis: only when a cache is on)

        return cached_clients(self.query_cache, endpoint, service, self.stats)

    def _writer_service(self, engine: str, cluster: str) -> Service | None:
        """The service of a read_write endpoint of the cluster (its pools serve causal reads a replica cannot)."""
        for listener in self.listeners.values():
            found = listener.endpoint
            if found.engine == engine and found.cluster == cluster and found.role is EndpointRole.READ_WRITE:
                return listener.service
        return None

    def first_service(self, kind: type[S]) -> S | None:
        for listener in [*self.listeners.values(), *self.retiring]:
            if isinstance(listener.service, kind):
                return listener.service
        return None

    @property
    def postgres(self) -> PostgresService | None:
        """The first PostgreSQL endpoint's service (CancelRequests passed on by other workers enter here)."""
        return self.first_service(PostgresService)

    @property
    def mysql(self) -> MySQLService | None:
        """The first MySQL endpoint's service (KILLs passed on by other workers enter here)."""
        return self.first_service(MySQLService)

    async def _fleet_cancel(self, message: Message) -> Message:
        """A peer proxy's CancelRequest for a client of this proxy (of any worker)."""
        service = self.postgres
        return {} if service is None else await service.serve_cancel(message, forwarded=False)

    async def _fleet_kill(self, message: Message) -> Message:
        """A peer proxy's KILL for a client of this proxy (of any worker)."""
        listener = self.listeners.get(str(message.get("endpoint", "")))
        service = listener.service if listener is not None else self.mysql
        if not isinstance(service, MySQLService):
            return {"error": "unknown", "message": "no MySQL endpoint in this proxy"}
        return await service.serve_kill(message, forwarded=False)

    def services(self) -> list[Service]:
        return [listener.service for listener in [*self.listeners.values(), *self.retiring]]

    async def start(self, reuse_port: bool = False) -> None:
        # Each worker process takes its share of the client limit (as of the backend connection budget).
        self.stats.max_clients = max(1, self.config.server.max_client_connections // worker_count())
        self.reuse_port = reuse_port
        for listener in self.listeners.values():
            await self.listen(listener)
        if self.config.server.metrics_port >= 0:
            self.ports["metrics"] = serve_metrics(self.stats.snapshot, self.config.server.host,
                                                  self.config.server.metrics_port)
        if self.fleet is not None:
            await self.fleet.start(listen=worker_index() == 0)
            self.ports["fleet"] = self.config.fleet.port
        self._janitor = asyncio.get_running_loop().create_task(self._run_janitor())
        self.secrets_watch.start()
        for follower in self.followers:
            follower.start()
        # What the start made (modules, configuration, listeners) lives as long as the process: out of the garbage
        # collector's way, so that its full collections walk only what came since (a walk over the whole start-up
        # heap stalls every client for tens of milliseconds).
        gc.collect()
        gc.freeze()

    async def listen(self, listener: Listener, port: int | None = None) -> None:
        """Open the endpoint's listening socket on its port or `port` (OSError if it is taken)."""
        settings = listener.endpoint.settings
        server = await asyncio.get_running_loop().create_server(
            listener.make_client, self.config.server.host, settings.port if port is None else port,
            reuse_port=self.reuse_port or None,
            backlog=4096,
        )
        for sock in server.sockets:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        listener.server = server
        listener.port = self.ports[listener.name] = server.sockets[0].getsockname()[1]
        service = listener.service
        if isinstance(service, PostgresService):
            service.make_client = listener.make_client
        else:
            service.start()
        log.info("%s listener on %s:%d: %s (%s pooling)", "PostgreSQL" if listener.endpoint.engine == "postgresql"
                 else "MySQL", self.config.server.host, listener.port, listener.endpoint.describe(),
                 settings.pool.mode)

    def unlisten(self, listener: Listener) -> None:
        """Stop accepting clients on the endpoint; those connected stay."""
        if listener.server is not None:
            listener.server.close()
            listener.server = None
        if self.ports.get(listener.name) == listener.port:
            del self.ports[listener.name]

    def retire(self, listener: Listener) -> None:
        """A removed endpoint: no new clients; its pools close once its last client has left."""
        self.unlisten(listener)
        del self.listeners[listener.name]
        self.retiring.append(listener)

    def close_tokens(self) -> None:
        if self.tokens is not None:
            self.tokens.close()
            self.tokens = None

    async def _run_janitor(self) -> None:
        while True:
            await asyncio.sleep(JANITOR_INTERVAL)
            now = time.monotonic()
            timeout = self.config.server.idle_client_timeout
            try:
                for listener in [*self.listeners.values(), *self.retiring]:
                    listener.service.maintain(now)
                    for client in list(listener.clients):
                        if client.closed:
                            listener.clients.discard(client)
                        else:
                            client.check_idle(now, timeout)
                for listener in [listener for listener in self.retiring if not listener.clients]:
                    self.retiring.remove(listener)
                    listener.service.close()
                    log.info("endpoint %s: its last client left; its backend connections are closed",
                             listener.name)
            except Exception:
                log.exception("janitor pass failed")

    def _clients(self) -> list[Client]:
        return [client for listener in [*self.listeners.values(), *self.retiring] for client in listener.clients]

    async def _drain(self) -> None:
        """Let clients go as soon as they are at rest (nothing running, no transaction open), each with the
        protocol's shutdown error (57P01 / 1053); after shutdown_grace, the rest go too, their open transactions
        rolled back by the server as their backends close (nothing of them was acknowledged)."""
        grace = self.config.server.shutdown_grace
        deadline = time.monotonic() + grace
        for service in self.services():
            service.draining = True  # a client asking for a backend from now on gets the shutdown error
        clients = [client for client in self._clients() if not client.closed]
        log.info("shutting down: %d client connections, waiting up to %.1f s for their transactions", len(clients),
                 grace)
        while clients:
            for client in clients:
                if client.state is State.LOGIN or client.at_rest:
                    client.fail(SHUTDOWN, logged=True)
            clients = [client for client in clients if not client.closed]
            if not clients or time.monotonic() >= deadline:
                break
            await asyncio.sleep(0.02)
        for client in clients:
            client.fail(SHUTDOWN, logged=True)
        if clients:
            log.warning("shutdown: %d clients were still in a transaction after %.1f s and were closed", len(clients),
                        grace)
        for client in self._clients():
            client.abort()

    async def stop(self) -> None:
        for follower in self.followers:
            await follower.stop()
        for causal in self.causal_clusters.values():
            await causal.position.close()
        for listener in self.listeners.values():
            if listener.server is not None:
                listener.server.close()
        for server in self.servers:
            server.close()
        if self.fleet is not None:
            await self.fleet.stop()
        if self._janitor is not None:
            self._janitor.cancel()
        self.secrets_watch.stop()
        await self._drain()
        for service in self.services():
            service.close()
        if self.query_cache is not None:
            await self.query_cache.close()
        for listener in self.listeners.values():
            if listener.server is not None:
                await listener.server.wait_closed()
        flush_failed_logins()
        self.close_tokens()
        self.guard.close()
        await self.guard.aclose()
        for server in self.servers:
            await server.wait_closed()


def _clusters(config: Config) -> list[tuple[str, str, ClusterBase]]:
    """(engine, name, cluster) of every cluster of an active engine."""
    return [(engine, name, cluster) for engine, settings in engine_settings(config) if engine_active(settings)
            for name, cluster in settings.clusters.items()]
