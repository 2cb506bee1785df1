"""Live reload: re-read the configuration and secrets, refuse what does not validate, apply the difference."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from proxy import channel
from proxy.auth.token_login import make_verifier
from proxy.config import RESTART_KEYS, Config, load_config
from proxy.endpoint_edits import EndpointEdits
from proxy.endpoints import Endpoint, resolve_endpoints, with_ports
from proxy.errors import ConfigError
from proxy.local_commands import SwitchedEndpoints
from proxy.pool.balance import member_targets
from proxy.rundir import worker_count
from proxy.secret_sources import fingerprint
from proxy.secrets import SecretStore
from proxy.server import Listener, ProxyServer, client_tls
from proxy.session.mysql_service import MySQLService
from proxy.session.pg_service import PostgresService
from proxy.startup import check_startup
from proxy.stats import StatsRegistry

log = logging.getLogger(__name__)



def prepare(path: Path | None, running: Config, ports: dict[str, int],
            edit: Callable[[dict[str, Any]], None] | None = None) -> Config:
    """The configuration at `path` (changed by `edit`: the control API's endpoint edits), validated as a start
    validates it (secrets, certificates, keys, and ports free for the endpoints that would newly listen), with the
    [server] keys that need a restart and the [api] and [query_cache] sections kept at their running values and
    endpoints given port 0 keeping the `ports` they listen on; ConfigError if it does not validate."""
    config = load_config(path, edit)
    check_startup(config)
    kept = {key: getattr(running.server, key) for key in RESTART_KEYS
            if getattr(config.server, key) != getattr(running.server, key)}
    for key in kept:
        log.warning("reload: [server] %s changes only with a restart; keeping %r", key, kept[key])
    if kept:
        config = config.model_copy(update={"server": config.server.model_copy(update=kept)})
    if config.api != running.api:
        log.warning("reload: [api] changes only with a restart; keeping the running one")
        config = config.model_copy(update={"api": running.api})
    if config.fleet != running.fleet:
        log.warning("reload: [fleet] changes only with a restart; keeping the running one")
        config = config.model_copy(update={"fleet": running.fleet})
    if config.query_cache != running.query_cache:
        log.warning("reload: [query_cache] changes only with a restart; keeping the running one")
        config = config.model_copy(update={"query_cache": running.query_cache})
    config = keep_ports(config, ports)
    for endpoint in resolve_endpoints(config):
        port = endpoint.settings.port
        if port and port not in ports.values():
            check_port_free(config.server.host, port, f"{path}: endpoint {endpoint.name}")
    return config


def check_port_free(host: str, port: int, what: str) -> None:
    """ConfigError if the proxy could not listen on `port` (another program has it)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise ConfigError(f"{what}: cannot listen on port {port}: {exc.strerror or exc}") from None


def keep_ports(config: Config, running: dict[str, int]) -> Config:
    """Endpoints given port 0 that are already listening keep the port they have."""
    ports = {endpoint.name: running[endpoint.name] for endpoint in resolve_endpoints(config)
             if endpoint.settings.port == 0 and endpoint.name in running}
    return with_ports(config, ports) if ports else config


class Reloads:
    """SIGHUPs run one reload at a time; those that come during a reload make one more after it."""

    def __init__(self, run: Callable[[], Coroutine[Any, Any, None]]) -> None:
        self.run = run
        self.task: asyncio.Task[None] | None = None
        self.again = False

    def request(self) -> None:
        if self.task is not None and not self.task.done():
            self.again = True
            return
        self.task = asyncio.get_running_loop().create_task(self._loop())

    async def _loop(self) -> None:
        while True:
            self.again = False
            try:
                await self.run()
            except Exception:
                log.exception("reload failed")
            if not self.again:
                return


# --- applying a validated configuration to a running process ---


async def apply(server: ProxyServer, config: Config) -> None:
    """Make the running process serve `config` (validated, its restart-only keys as running): secrets re-read,
    endpoints added, removed, re-pointed, resized. A removed endpoint stops listening at once; its clients stay
    until they leave. Raises ConfigError (the secrets file, the TLS certificate) before anything changes."""
    seen = fingerprint(config.secrets)
    secrets = SecretStore.from_settings(config.secrets)
    config = keep_ports(config, {name: listener.port for name, listener in server.listeners.items()})
    old = server.config
    # certificate files are read again
    tls = client_tls(config) if config.tls != old.tls or config.tls.cert_file is not None else server.tls
    tokens = make_verifier(config)  # keys and JWKS read again (a rotation adds or removes keys)
    try:
        server.guard.configure(config.auth)  # the audit file reopened (after logrotate), the throttle's new limits
    except ConfigError:
        if tokens is not None:
            tokens.close()
        raise
    server.tls = tls
    server.config = config
    server.use_secrets(secrets)
    server.secrets_watch.loaded(seen)
    log.info("secrets reloaded (%d users)", len(secrets.users))
    server.stats.max_clients = max(1, config.server.max_client_connections // worker_count())
    server.stats.keep_insights(config.server.statement_insights)
    if config.server.log_level != old.server.log_level:
        logging.getLogger().setLevel(config.server.log_level.upper())
    server.close_tokens()
    server.tokens = tokens
    for service in server.services():
        service.config, service.server, service.server_tls, service.tokens = (
            config, config.server, server.tls, tokens)
    wanted = {endpoint.name: endpoint for endpoint in resolve_endpoints(config)}
    moving: list[Listener] = []
    for name, listener in list(server.listeners.items()):
        endpoint = wanted.get(name)
        if endpoint is None or endpoint.engine != listener.endpoint.engine:
            server.retire(listener)
            log.info("reload: endpoint %s removed: no new clients; its %d connected clients stay until they leave",
                     name, len(listener.clients))
            continue
        if endpoint.settings.port != listener.port:
            server.unlisten(listener)  # all listeners that move close first, so two may swap ports
            moving.append(listener)
    for listener in moving:
        await _listen(server, listener, wanted[listener.name])
    for name, endpoint in wanted.items():
        found = server.listeners.get(name)
        if found is None:
            await _add(server, endpoint)
        elif endpoint != found.endpoint:
            _update(found, endpoint, server.stats)
    await server.refollow(old)
    if any(getattr(s.settings, "auth_method", None) == "scram-sha-256" for s in server.services()):
        secrets.warm_up()  # for endpoints this reload added
    log.info("reload: serving %s", ", ".join(f"{name} port {port}" for name, port in server.ports.items())
             or "no endpoint")


async def _listen(server: ProxyServer, listener: Listener, endpoint: Endpoint) -> None:
    """Listen on the endpoint's new port; if it cannot, on the old one again."""
    old_port = listener.port
    try:
        await server.listen(listener, endpoint.settings.port)
    except OSError as exc:
        log.error("reload: endpoint %s cannot listen on port %d (%s); it stays on port %d", endpoint.name,
                  endpoint.settings.port, exc.strerror or exc, old_port)
        await server.listen(listener, old_port)


async def _add(server: ProxyServer, endpoint: Endpoint) -> None:
    service = server.make_service(endpoint)
    listener = Listener(endpoint, service, cached=server.cached_clients(endpoint, service))
    server.listeners[endpoint.name] = listener
    try:
        await server.listen(listener)
    except OSError as exc:
        del server.listeners[endpoint.name]
        listener.service.close()
        log.error("reload: endpoint %s not added: cannot listen on port %d (%s)", endpoint.name,
                  endpoint.settings.port, exc.strerror or exc)
        return
    log.info("reload: endpoint %s added", endpoint.name)


def _update(listener: Listener, endpoint: Endpoint, registry: StatsRegistry) -> None:
    """Settings of an endpoint that stays: knobs for new logins and connects, pool sizes, its instance."""
    old = listener.endpoint
    listener.endpoint = endpoint
    service = listener.service
    service.reconfigure(endpoint)
    group = service.group
    if not group.single or len(endpoint.members) > 1:  # an endpoint that spreads its work over instances
        _update_group(service, endpoint, old, registry)
        return
    if endpoint.settings.pool != old.settings.pool:
        service.target.apply_settings(endpoint.settings.pool)
        log.info("reload: endpoint %s: pool settings changed", endpoint.name)
    if endpoint.instance != old.instance or endpoint.cluster != old.cluster:
        service.target.relabel(registry.target(endpoint.engine, endpoint.name, endpoint.cluster, endpoint.instance))
    if endpoint.address != old.address:
        service.target.repoint(*endpoint.address)
        log.info("reload: endpoint %s now serves instance %s at %s:%d (was %s at %s:%d)", endpoint.name,
                 endpoint.instance, *endpoint.address, old.instance, *old.address)


def _update_group(service: PostgresService | MySQLService, endpoint: Endpoint, old: Endpoint,
                  registry: StatsRegistry) -> None:
    """An endpoint with a target per instance: instances that stay keep their pools, new ones join, those gone
    leave; pool settings apply to every one; each counts under its instance's labels."""
    group = service.group
    if endpoint.members != old.members or endpoint.serving != old.serving or endpoint.cluster != old.cluster:
        targets, home = member_targets(endpoint.engine, endpoint, registry)
        paused = any(target.operator_paused for target in group.all())
        left = group.reshape(targets, endpoint.serving or (home,), home)
        service.target = group.home
        if paused:  # an instance that joins an endpoint the operator paused is paused too
            for target in group.all():
                target.pause(operator=True)
        log.info("reload: endpoint %s now uses %s (serving %s)%s", endpoint.name,
                 ", ".join(f"{m.label} at {m.host}:{m.port}" for m in endpoint.members), ", ".join(group.serving),
                 f"; no longer {', '.join(t.name for t in left)}" if left else "")
    for label, target in group.targets.items():
        if target.settings != endpoint.settings.pool:
            target.apply_settings(endpoint.settings.pool)
        target.relabel(registry.target(endpoint.engine, endpoint.name, endpoint.cluster, label))


class ProcessReload:
    """Reloads of a single process (SIGHUP, `dbproxy reload`, the control API), one at a time: the file, with the
    endpoints switchovers moved and the API's endpoint edits kept over it. Answers in the commands' form."""

    def __init__(self, server: ProxyServer, config_path: Path | None, switched: SwitchedEndpoints) -> None:
        self.server = server
        self.config_path = config_path
        self.switched = switched
        self.edits = EndpointEdits()
        self._lock = asyncio.Lock()

    async def from_signal(self) -> None:
        await self(None)

    async def __call__(self, edits: EndpointEdits | None = None) -> channel.Message:
        """Reload with `edits` over the file (None: the edits kept so far); kept once they reloaded."""
        if self.config_path is None:
            log.warning("reload: started without a configuration file; nothing to reload")
            return {"error": "no_file", "message": "started without a configuration file: nothing to reload"}
        async with self._lock:
            server, candidate = self.server, self.edits if edits is None else edits
            log.info("reload: reading %s%s", self.config_path, " with the API's endpoint edits" if candidate else "")
            try:
                ports = {name: listener.port for name, listener in server.listeners.items()}
                config = prepare(self.config_path, server.config, ports, candidate.apply if candidate else None)
                await apply(server, self.switched.keep(config))
            except ConfigError as exc:
                log.error("reload refused, the running configuration stays: %s", exc)
                return {"error": "reload_refused", "message": f"reload refused: {exc}"}
            self.edits = candidate
            return {"ok": True, "message": "reloaded", "ports": dict(server.ports)}
