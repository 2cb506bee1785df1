"""The PostgreSQL listener's shared state: target, pools, secrets, TLS contexts and the cancel registry."""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets as random_source
import ssl
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol, cast

from proxy import channel
from proxy.auth.guard import LoginGuard
from proxy.auth.networks import allow_list
from proxy.auth.tokens import TokenVerifier
from proxy.config import ClientAuthMethod, Config, PostgresSettings, ServerSettings
from proxy.console import Console
from proxy.endpoints import Endpoint
from proxy.parameter_groups import group_of, groups_changed, static_of
from proxy.pool.balance import TargetGroup, target_group
from proxy.pool.pg_backend import PostgresBackend, open_backend
from proxy.pool.pg_deadline import send_cancel_request
from proxy.pool.pool import Backend, Pool, Target
from proxy.rundir import run_dir, worker_channel, worker_index
from proxy.secrets import SecretStore
from proxy.session.pg_ids import fleet_proxy_of, next_process_id, worker_of
from proxy.stats import StatsRegistry
from proxy.tls import backend_context

if TYPE_CHECKING:
    from proxy.fleet.node import Fleet
    from proxy.session.causal import CausalReads

log = logging.getLogger(__name__)


class CancelTarget(Protocol):
    """A client session as a CancelRequest finds it: its key, and the backend running its work now."""

    @property
    def secret_key(self) -> int: ...
    @property
    def backend(self) -> PostgresBackend | None: ...
    @property
    def pending(self) -> int: ...
    @property
    def service(self) -> PostgresService: ...
    def parameter_group_changed(self) -> None: ...


def pool_backends(pool: Pool) -> list[PostgresBackend]:
    """The pool's backend connections of its target's current generation (older ones are being replaced)."""
    generation = pool.target.generation
    return [cast(PostgresBackend, backend) for backend in (*pool.idle, *pool.busy) if backend.generation == generation]


class PostgresService:
    """Everything PostgreSQL client sessions share inside one process."""

    draining = False  # the process is shutting down: no new transaction starts

    def __init__(self, config: Config, endpoint: Endpoint, secrets: SecretStore, server_tls: ssl.SSLContext | None,
                 stats: StatsRegistry, peer: PostgresService | None = None) -> None:
        self.config = config
        self.server: ServerSettings = config.server
        self.endpoint = endpoint
        self.settings = cast(PostgresSettings, endpoint.settings)
        self.secrets = secrets
        self.server_tls = server_tls
        self.backend_tls = backend_context(self.settings.backend_tls, self.settings.backend_ca_file)
        # A target per instance the endpoint may use; `target` is the configured instance's (the only one of a
        # read_write endpoint).
        self.group: TargetGroup = target_group("postgresql", endpoint, stats)
        self.target: Target = self.group.home
        self.stats = stats.endpoint("postgresql", endpoint.name, endpoint.cluster)
        self.exclude_variable_sets = "exclude_variable_sets" in self.settings.session_pinning_filters
        self.allowed = allow_list(self.settings.allowed_cidrs)  # who may connect (None: anyone)
        # process id -> PostgresClient (for CancelRequest), one registry for every endpoint of the process
        self.clients: dict[int, CancelTarget] = peer.clients if peer is not None else {}
        self.worker = worker_index()
        self._process_ids: itertools.count[int] = peer._process_ids if peer is not None else itertools.count(1)
        # In a fleet the process ids name this proxy (see pg_ids); a cancel for another one is passed to it.
        self.fleet_proxy = config.fleet.proxy_id if config.fleet.enabled else None
        self.fleet: Fleet | None = None  # set by the server
        self.make_client: Callable[[], asyncio.Protocol] | None = None  # set by the listener
        self.causal: CausalReads | None = None  # a read_only endpoint's causal-read step (set by the server)
        self.tokens: TokenVerifier | None = None  # the process's token verifier (set by the server)
        self.guard: LoginGuard | None = None  # the process's failed-login throttle and audit log (set by the server)
        self.console: Console | None = None  # the admin console, when the process has one (set by the server)
        if self.settings.auth_method is ClientAuthMethod.SCRAM_SHA_256:
            secrets.warm_up()  # first logins then cost what later ones do (no PBKDF2 on the event loop)

    def pool_for(self, database: str, user: str, target: Target | None = None) -> Pool:
        """The pool for (database, user) on `target`, else on the instance the endpoint would choose now."""
        if target is None:
            target = self.target if self.group.single else self.group.choose() or self.target
        key = (database, user)
        pool = target.pools.get(key)
        if pool is None:
            naming = None if self.group.single else self.group.naming(key)
            pool = target.pools[key] = Pool(target, database, user, self._connect, naming)
        return pool

    async def _connect(self, pool: Pool) -> Backend:
        return await open_backend(pool, self.settings, self.secrets, self.backend_tls)

    def new_key(self) -> tuple[int, int]:
        """A BackendKeyData pair for a client: unique process id, random secret."""
        process_id = next_process_id(self.worker, self._process_ids, self.clients, self.fleet_proxy)
        return process_id, random_source.randbits(32)

    async def cancel(self, process_id: int, secret_key: int, forwarded: bool = False) -> None:
        """Forward a client's CancelRequest to the backend serving that client right now, if any (the client may
        be another worker's, or another proxy's of the fleet)."""
        owner_proxy = fleet_proxy_of(process_id)
        if self.fleet is not None and owner_proxy is not None and owner_proxy != self.fleet.proxy_id:
            body = {"kind": "cancel", "process_id": process_id, "secret_key": secret_key}
            answer = await self.fleet.forward(owner_proxy, body, f"cancel request for client {process_id}")
            if answer is None:
                self.stats.fleet_forwards_dropped += 1
            else:
                self.stats.fleet_forwards += 1
            return
        owner = worker_of(process_id)
        if owner != self.worker and run_dir() is not None and not forwarded:
            await self._forward_cancel(owner, process_id, secret_key)
            return
        client = self.clients.get(process_id)
        if client is None or client.secret_key != secret_key:
            log.warning("cancel request for an unknown client key %d ignored", process_id)
            return
        backend: PostgresBackend | None = client.backend
        if backend is None or client.pending <= 0:
            log.info("cancel request for client %d: nothing is running", process_id)
            return
        await client.service.cancel_backend(backend)  # the client's endpoint may be another one
        log.info("cancel request for client %d sent to backend pid %d", process_id, backend.process_id)

    async def _forward_cancel(self, owner: int, process_id: int, secret_key: int) -> None:
        """The client lives in another worker process: pass the cancel on over the internal channel."""
        message = {"kind": "cancel", "process_id": process_id, "secret_key": secret_key}
        try:  # like libpq, wait until the owner has sent it on (or given up)
            await channel.ask(worker_channel(owner), message, 10)
        except channel.ChannelError as exc:
            log.warning("cancel request for client %d: worker %d unreachable: %s", process_id, owner, exc)
            return
        log.info("cancel request for client %d passed to worker %d", process_id, owner)

    async def serve_cancel(self, message: channel.Message, forwarded: bool = True) -> channel.Message:
        """The other side of `_forward_cancel`: a cancel for a client of this worker (forwarded: False, a peer
        proxy's forward for a client of any worker here)."""
        process_id = int(message["process_id"])
        if not forwarded and fleet_proxy_of(process_id) != self.fleet_proxy:  # (never passed on again)
            log.warning("fleet: a cancel request for client %d is not for this proxy; dropped", process_id)
            return {}
        await self.cancel(process_id, int(message["secret_key"]), forwarded=forwarded)
        return {}

    async def cancel_backend(self, backend: PostgresBackend) -> None:
        """Ask the server to cancel whatever `backend` is running (connect, send and close within a deadline).
        The request goes to the server that backend was opened to, even if the target was re-pointed since."""
        await send_cancel_request(backend.host, backend.port, backend.process_id, backend.secret_key,
                                  self.settings.backend_connect_timeout)

    def maintain(self, now: float) -> None:
        for target in self.group.all():
            for pool in list(target.pools.values()):
                pool.maintain(now)
            target.forget_unused_pools(now)

    def close(self) -> None:
        for target in self.group.all():
            for pool in target.pools.values():
                pool.close_all()

    def reconfigure(self, endpoint: Endpoint) -> None:
        """New settings for the endpoint (a reload): new logins and backend connects use them."""
        old = self.settings
        self.endpoint = endpoint
        self.settings = cast(PostgresSettings, endpoint.settings)
        if (old.backend_tls, old.backend_ca_file) != (self.settings.backend_tls, self.settings.backend_ca_file):
            self.backend_tls = backend_context(self.settings.backend_tls, self.settings.backend_ca_file)
        self.exclude_variable_sets = "exclude_variable_sets" in self.settings.session_pinning_filters
        self.allowed = allow_list(self.settings.allowed_cidrs)
        if groups_changed(old, self.settings):
            self._parameter_groups_changed(old)

    def _parameter_groups_changed(self, old: PostgresSettings) -> None:
        """A reload changed parameter groups: clients take the new dynamic defaults at their next borrow; backends
        opened with other static parameters are replaced (idle ones now, lent-out ones when given back) when their
        group says so, else at `dbproxy control params apply`."""
        for client in list(self.clients.values()):
            if client.service is self:
                client.parameter_group_changed()
        if self.static_pending(old, "reload"):
            log.info("reload: endpoint %s: static parameters changed, replacing its backend connections",
                     self.endpoint.name)
            for target in self.group.all():
                target.reconnect()
        log.info("reload: endpoint %s: parameter groups changed", self.endpoint.name)

    def static_pending(self, old: PostgresSettings | None = None, apply: str | None = None) -> bool:
        """Whether a pool's users now get other static parameters than `old` gave (None: than its backends were
        opened with), for groups applied at `apply` ("reload" or "command"; None: any)."""
        for target in self.group.all():
            for pool in target.pools.values():
                found = group_of(self.settings, pool.user)
                if apply is not None and (found[1].static_apply if found else "reload") != apply:
                    continue
                now = static_of(self.settings, pool.user)
                if old is not None and static_of(old, pool.user) != now:
                    return True
                if old is None and any(backend.static_params != now for backend in pool_backends(pool)):
                    return True
        return False
