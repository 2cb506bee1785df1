"""One proxy process's part of the operator commands: re-admit a fenced instance; hold, re-point or release an
endpoint for a switchover; pause, resume or reconnect pools; end a client; tell its stats and what it serves."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Any

from proxy import channel
from proxy.config import Config, engine_settings, uses_clusters
from proxy.endpoints import resolve_endpoints
from proxy.errors import ConnectionKilled
from proxy.params_commands import local_params
from proxy.pool.pool import Target
from proxy.server import Listener, ProxyServer
from proxy.session.pg_client import PostgresClient
from proxy.sql_logging import local_switch
from proxy.top_sql import local_statements
from proxy.topology.model import InstanceStatus

log = logging.getLogger(__name__)

DRAIN_POLL = 0.002  # seconds between two looks at whether a held endpoint's transactions are over


def instance_addresses(config: Config, label: str) -> list[tuple[str, str, tuple[str, int]]]:
    """(engine, cluster, address) of every instance of the configuration called `label`: its label (its name,
    else host:port), or its host:port."""
    return [(engine, name, (instance.host, instance.port))
            for engine, settings in engine_settings(config) if uses_clusters(settings)
            for name, cluster in settings.clusters.items()
            for instance in cluster.instances if label in (instance.label, f"{instance.host}:{instance.port}")]


def switched_config(config: Config, engine: str, endpoints: list[str], cluster: str) -> Config:
    """`config` with the named endpoints of `engine` moved to `cluster`."""
    for name, settings in engine_settings(config):
        if name == engine:
            moved = {endpoint: settings.endpoints[endpoint].model_copy(update={"cluster": cluster})
                     for endpoint in endpoints}
            changed = settings.model_copy(update={"endpoints": {**settings.endpoints, **moved}})
            return config.model_copy(update={engine: changed})
    return config


class SwitchedEndpoints:
    """The endpoints switchovers moved: a reload of a file that still names the cluster an endpoint left keeps it
    where the switchover put it (with a warning to change the file); once the file names another cluster, the file
    rules again."""

    def __init__(self) -> None:
        self.moves: dict[tuple[str, str], tuple[str, str]] = {}  # (engine, endpoint) -> (cluster left, cluster now)

    def record(self, engine: str, endpoints: list[str], left: str, now: str) -> None:
        for endpoint in endpoints:
            self.moves[(engine, endpoint)] = (left, now)

    def keep(self, config: Config) -> Config:
        """`config` (read from the file) with the endpoints moved since kept where they are."""
        for (engine, endpoint), (left, now) in list(self.moves.items()):
            settings = next((s for name, s in engine_settings(config) if name == engine), None)
            found = settings.endpoints.get(endpoint) if settings is not None else None
            if settings is None or found is None or found.cluster != left or now not in settings.clusters:
                del self.moves[(engine, endpoint)]  # the file was changed since: it says where the endpoint is
                continue
            log.warning("reload: the configuration file still puts endpoint %s on cluster %s; it stays on cluster "
                        "%s, where a switchover moved it (change the file to match)", endpoint, left, now)
            config = switched_config(config, engine, [endpoint], now)
        return config


def lent_out(target: Target) -> int:
    """Backend connections of the target not idle in a pool: lent to a client, being connected or cleaned."""
    return target.open_connections - target.idle_count()


def _error(kind: str, message: str) -> channel.Message:
    return {"error": kind, "message": message, "pid": os.getpid()}


class LocalCommands:
    """The handlers a process answers on its internal channel for the operator commands (the supervisor fans a
    command out to each worker; a single process calls them itself)."""

    def __init__(self, server: ProxyServer) -> None:
        self.server = server
        self._watchdogs: dict[str, asyncio.TimerHandle] = {}

    def handlers(self) -> dict[str, channel.Handler]:
        return {"readmit": self.readmit, "switchover-targets": self.targets, "switchover-prepare": self.prepare,
                "switchover-commit": self.commit, "switchover-abort": self.abort, "stats": self.stats,
                "view": self.view, "pause": self.pause, "resume": self.resume, "reconnect": self.reconnect,
                "kill-client": self.kill_client, "statements": local_statements(self.server.stats),
                "sql-logging": local_switch(self.server.stats), **local_params(self._services)}

    def _services(self) -> list[tuple[str, object]]:
        return [(listener.name, listener.service) for listener in self.server.listeners.values()]

    async def stats(self, _message: channel.Message) -> channel.Message:
        return {"pid": os.getpid(), "snapshot": self.server.stats.snapshot()}

    def _chosen(self, message: channel.Message) -> list[Listener]:
        """The endpoint named by {"endpoint": NAME} (none if this process does not serve it), else every one."""
        name = message.get("endpoint")
        if name is None:
            return list(self.server.listeners.values())
        listener = self.server.listeners.get(str(name))
        return [] if listener is None else [listener]

    async def pause(self, message: channel.Message) -> channel.Message:
        """{"endpoint": NAME | None}: lend no backend connection for new transactions until resumed (clients
        wait, each at most its borrow timeout); transactions under way go on."""
        listeners = self._chosen(message)
        for listener in listeners:
            for target in listener.service.group.all():
                target.pause(operator=True)
        return {"pid": os.getpid(), "endpoints": [listener.name for listener in listeners]}

    async def resume(self, message: channel.Message) -> channel.Message:
        listeners = self._chosen(message)
        for listener in listeners:
            for target in listener.service.group.all():
                target.resume(operator=True)
        return {"pid": os.getpid(), "endpoints": [listener.name for listener in listeners]}

    async def reconnect(self, message: channel.Message) -> channel.Message:
        """{"endpoint": NAME | None}: close idle backend connections now, lent-out ones when given back."""
        listeners = self._chosen(message)
        for listener in listeners:
            for target in listener.service.group.all():
                target.reconnect()
        return {"pid": os.getpid(), "endpoints": [listener.name for listener in listeners]}

    async def kill_client(self, message: channel.Message) -> channel.Message:
        """{"id": N}: end the client with that PostgreSQL process id (BackendKeyData) or MySQL connection id, with
        the admin-shutdown error (57P01 / 1927), if it is a client of this process."""
        number = int(message["id"])
        found: Any = None
        for service in (self.server.postgres, self.server.mysql):
            if service is not None and found is None:
                found = service.clients.get(number)
        if found is None or found.closed:
            return {"pid": os.getpid(), "killed": False}
        log.warning("client %s (id %d) ended by the operator", found.peer, number)
        found.fail(ConnectionKilled("terminating connection due to administrator command"
                                    if isinstance(found, PostgresClient) else "Connection was killed"), logged=True)
        return {"pid": os.getpid(), "killed": True, "peer": found.peer}

    async def view(self, _message: channel.Message) -> channel.Message:
        """What this process serves: each endpoint's port, instances, pause and clients; each monitored cluster's
        instance statuses (role, health, lag) as its topology monitor last saw them."""
        endpoints = {listener.name: _listener_view(listener) for listener in self.server.listeners.values()}
        clusters = {f"{engine}/{name}": _monitor_view(causal.monitor.snapshot(), causal.monitor.fenced())
                    for (engine, name), causal in self.server.causal_clusters.items()}
        return {"pid": os.getpid(), "endpoints": endpoints, "clusters": clusters}

    async def readmit(self, message: channel.Message) -> channel.Message:
        """{"instance": label}: re-admit the instance in every cluster monitor that fenced it."""
        found = instance_addresses(self.server.config, str(message.get("instance", "")))
        readmitted = [f"{follower.cluster} {host}:{port}" for _engine, cluster, (host, port) in found
                      for follower in self.server.followers
                      if follower.cluster == cluster and follower.monitor.readmit((host, port))]
        return {"pid": os.getpid(), "readmitted": readmitted}

    def _listeners(self, message: channel.Message) -> list[Listener]:
        names = [str(name) for name in message.get("endpoints", [])]
        missing = [name for name in names if name not in self.server.listeners]
        if missing:
            raise KeyError(", ".join(missing))
        return [self.server.listeners[name] for name in names]

    async def targets(self, message: channel.Message) -> channel.Message:
        """{"endpoints": [...]}: where each endpoint's target points now."""
        try:
            listeners = self._listeners(message)
        except KeyError as exc:
            return _error("unknown", f"no endpoint {exc.args[0]} in process {os.getpid()}")
        return {"pid": os.getpid(), "targets": {
            listener.name: {"host": listener.service.target.host, "port": listener.service.target.port,
                            "cluster": listener.endpoint.cluster} for listener in listeners}}

    async def prepare(self, message: channel.Message) -> channel.Message:
        """{"endpoints", "timeout", "hold"}: hold new transactions on the endpoints and wait (at most `timeout`
        seconds) until every backend lent out is back; released by itself if no decision comes within `hold`."""
        try:
            listeners = self._listeners(message)
        except KeyError as exc:
            return _error("unknown", f"no endpoint {exc.args[0]} in process {os.getpid()}")
        timeout = float(message.get("timeout", 5.0))
        loop = asyncio.get_running_loop()
        for listener in listeners:
            self.server.held.add(listener.name)  # the topology follower leaves it alone while held
            listener.service.target.pause()
            for client in listener.clients:
                if isinstance(client, PostgresClient):
                    client.end_sequence_hold()
            self._cancel_watchdog(listener.name)
            self._watchdogs[listener.name] = loop.call_later(
                float(message.get("hold", timeout + 10.0)), self._release, listener, "no decision came in time")
        started = time.monotonic()
        deadline = started + timeout
        while any(lent_out(listener.service.target) for listener in listeners) and time.monotonic() < deadline:
            await asyncio.sleep(DRAIN_POLL)
        busy = {listener.name: lent_out(listener.service.target) for listener in listeners}
        if any(busy.values()):
            left = ", ".join(f"{name}: {count}" for name, count in busy.items() if count)
            return _error("busy", f"process {os.getpid()}: backend connections still lent out after {timeout:.1f}s "
                                  f"(a long transaction or a pinned session) ({left})")
        return {"pid": os.getpid(), "drained_ms": round((time.monotonic() - started) * 1000, 1)}

    async def commit(self, message: channel.Message) -> channel.Message:
        """{"engine", "endpoints", "cluster"}: the endpoints now belong to `cluster`: re-point each to the
        instance it serves there, count it under the new labels, and let transactions go on."""
        try:
            listeners = self._listeners(message)
        except KeyError as exc:
            return _error("unknown", f"no endpoint {exc.args[0]} in process {os.getpid()}")
        server = self.server
        cluster, engine = str(message["cluster"]), str(message["engine"])
        server.config = switched_config(server.config, engine, [listener.name for listener in listeners], cluster)
        for service in server.services():
            service.config = server.config
        resolved = {endpoint.name: endpoint for endpoint in resolve_endpoints(server.config)}
        for listener in listeners:
            self._cancel_watchdog(listener.name)
            endpoint = resolved[listener.name]
            old, listener.endpoint = listener.endpoint, endpoint
            service, target = listener.service, listener.service.target
            service.reconfigure(endpoint)
            target.relabel(server.stats.target(endpoint.engine, endpoint.name, endpoint.cluster, endpoint.instance))
            target.repoint(*endpoint.address)
            server.held.discard(listener.name)
            target.resume()
            log.warning("switchover: endpoint %s moved from cluster %s to cluster %s instance %s at %s:%d",
                        endpoint.name, old.cluster, endpoint.cluster, endpoint.instance, *endpoint.address)
        return {"pid": os.getpid()}

    async def abort(self, message: channel.Message) -> channel.Message:
        """{"endpoints"}: the switchover is called off: transactions go on where they were."""
        for name in message.get("endpoints", []):
            listener = self.server.listeners.get(str(name))
            if listener is not None:
                self._release(listener, "the switchover was called off")
        return {"pid": os.getpid()}

    def _release(self, listener: Listener, why: str) -> None:
        self._cancel_watchdog(listener.name)
        if listener.name in self.server.held:
            self.server.held.discard(listener.name)
            listener.service.target.resume()
            log.warning("switchover: endpoint %s released on cluster %s: %s", listener.name,
                        listener.endpoint.cluster, why)

    def _cancel_watchdog(self, name: str) -> None:
        handle = self._watchdogs.pop(name, None)
        if handle is not None:
            handle.cancel()



def _listener_view(listener: Listener) -> channel.Message:
    service = listener.service
    group = service.group
    return {"port": listener.port, "listening": listener.server is not None, "clients": len(listener.clients),
            "serving": list(group.serving), "paused": any(target.operator_paused for target in group.all()),
            "held": any(target.held for target in group.all()),
            "instances": {label: {"host": target.host, "port": target.port, "open": target.open_connections,
                                  "last_connect_failure": target.last_connect_failure}
                          for label, target in group.targets.items()}}


def _monitor_view(statuses: dict[tuple[str, int], InstanceStatus], fenced: set[tuple[str, int]]) -> channel.Message:
    now = time.monotonic()
    return {f"{host}:{port}": {"role": status.role.value, "healthy": status.healthy, "lag_seconds": status.lag_seconds,
                               "timeline": status.timeline, "error": status.error, "fenced": (host, port) in fenced,
                               "checked_seconds_ago": round(now - status.checked_at, 3)}
            for (host, port), status in statuses.items()}
