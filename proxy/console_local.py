"""One proxy process's part of the admin console: its clients, backends and pools as rows (PAUSE, RESUME, RECONNECT
and KILL are the operator commands' own handlers); `install_console` gives its services the console."""

from __future__ import annotations

import logging
import os
import signal
import time
from typing import Any

from proxy import channel
from proxy.commands import channel_fanout, local_fanout
from proxy.console import Console, Reload
from proxy.pool.pool import Pool
from proxy.rundir import run_dir, worker_channel, worker_count
from proxy.server import Client, Listener, ProxyServer
from proxy.session.client import State
from proxy.session.pg_client import PostgresClient

log = logging.getLogger(__name__)


def timestamp(wall: float) -> str:
    """A time as PgBouncer shows one."""
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(wall)) if wall else ""


def _wall(monotonic_time: float) -> float:
    return time.time() - (time.monotonic() - monotonic_time)


def _address(transport: Any, name: str) -> tuple[str, int]:
    found = transport.get_extra_info(name) if transport is not None else None
    return (str(found[0]), int(found[1])) if isinstance(found, tuple) else ("", 0)


def client_id(client: Client) -> int:
    return client.process_id if isinstance(client, PostgresClient) else client.connection_id


def _client_row(client: Client, listener: Listener) -> dict[str, Any]:
    addr, port = _address(client.transport, "peername")
    local_addr, local_port = _address(client.transport, "sockname")
    clock = client.clock
    waited = time.monotonic() - clock.wait_started if clock is not None and clock.wait_started else 0.0
    if getattr(client, "console", False):
        state = "active"
    elif client.state is State.LOGIN:
        state = "login"
    elif isinstance(client, PostgresClient):
        state = "waiting" if client._acquiring is not None or client._queued else "active"
    else:
        state = "waiting" if client._borrowing else "active"
    backend = client.backend
    session = client.session
    application = session.settings.get("application_name", "") if isinstance(client, PostgresClient) else ""
    return {"type": "C", "user": session.user, "database": session.database, "state": state, "addr": addr,
            "port": port, "local_addr": local_addr, "local_port": local_port,
            "connect_time": timestamp(client.connected_at),
            "request_time": timestamp(_wall(clock.latest)) if clock is not None and clock.latest else "",
            "wait": int(waited),
            "wait_us": int((waited % 1) * 1_000_000), "close_needed": 0, "ptr": "",
            "link": _backend_id(backend) if backend is not None else "", "remote_pid": 0,
            "tls": "TLS" if client.is_tls else "", "application_name": str(application), "prepared_statements": 0,
            "id": client_id(client), "engine": listener.endpoint.engine, "endpoint": listener.name,
            "worker_pid": os.getpid(), "pinned": ",".join(sorted(session.pins)) if session.pins else ""}


def _backend_id(backend: Any) -> int:
    return int(getattr(backend, "process_id", 0) or getattr(backend, "thread_id", 0))


def _server_row(backend: Any, pool: Pool, listener: Listener, state: str) -> dict[str, Any]:
    addr, port = _address(getattr(backend, "transport", None), "peername")
    local_addr, local_port = _address(getattr(backend, "transport", None), "sockname")
    client = backend.client
    return {"type": "S", "user": pool.user, "database": pool.database, "state": state,
            "addr": addr or backend.host, "port": port or backend.port, "local_addr": local_addr,
            "local_port": local_port, "connect_time": timestamp(_wall(backend.created_at)),
            "request_time": timestamp(_wall(backend.idle_since)) if state == "idle" else "", "wait": 0,
            "wait_us": 0, "close_needed": int(backend.generation != pool.target.generation), "ptr": "",
            "link": client_id(client) if isinstance(client, Client) else "", "remote_pid": _backend_id(backend),
            "tls": "TLS" if backend.is_tls else "", "application_name": "", "prepared_statements": 0,
            "id": _backend_id(backend), "engine": listener.endpoint.engine, "endpoint": listener.name,
            "worker_pid": os.getpid()}


def _pool_row(pool: Pool, listener: Listener) -> dict[str, Any]:
    waiting = sum(1 for waiter in pool.waiters if waiter.waiting())
    oldest = min((waiter.waiting_since for waiter in pool.waiters if waiter.waiting()), default=0.0)
    waited = time.monotonic() - oldest if oldest else 0.0
    target = pool.target
    endpoint = listener.endpoint
    return {"database": pool.database, "user": pool.user, "cl_active": max(0, len(pool.clients) - waiting),
            "cl_waiting": waiting, "cl_active_cancel_req": 0, "cl_waiting_cancel_req": 0,
            "sv_active": len(pool.busy), "sv_active_cancel": 0, "sv_being_canceled": 0, "sv_idle": len(pool.idle),
            "sv_used": 0, "sv_tested": 0, "sv_login": 0, "maxwait": int(waited),
            "maxwait_us": int((waited % 1) * 1_000_000), "pool_mode": str(pool.mode), "engine": endpoint.engine,
            "endpoint": listener.name, "cluster": endpoint.cluster,
            "instance": target.stats.labels.get("instance", "") or f"{target.host}:{target.port}",
            "host": target.host, "port": target.port, "max_connections": target.max_connections,
            "server_lifetime": round(pool.settings.max_connection_lifetime), "paused": int(target.paused)}


class ConsoleLocal:
    """The handlers a process answers for the console (a console in any worker asks every worker)."""

    def __init__(self, server: ProxyServer) -> None:
        self.server = server

    def handlers(self) -> dict[str, channel.Handler]:
        return {"console-state": self.state}

    def _listeners(self) -> list[Listener]:
        return [*self.server.listeners.values(), *self.server.retiring]

    async def state(self, message: channel.Message) -> channel.Message:
        """This process's pools, backends and clients as rows, its stats snapshot, and (when asked) its statement
        statistics."""
        pools: list[dict[str, Any]] = []
        servers: list[dict[str, Any]] = []
        clients: list[dict[str, Any]] = []
        for listener in self._listeners():
            for target in listener.service.group.all():
                for pool in list(target.pools.values()):
                    pools.append(_pool_row(pool, listener))
                    servers.extend(_server_row(backend, pool, listener, "active") for backend in list(pool.busy))
                    servers.extend(_server_row(backend, pool, listener, "idle") for backend in list(pool.idle))
            clients.extend(_client_row(client, listener) for client in list(listener.clients) if not client.closed)
        insights = self.server.stats.insights
        return {"pid": os.getpid(), "pools": pools, "servers": servers, "clients": clients,
                "snapshot": self.server.stats.snapshot(),
                "statements": insights.snapshot() if insights is not None and message.get("statements") else [],
                "paused": [listener.name for listener in self.server.listeners.values()
                           if any(target.paused for target in listener.service.group.all())]}


async def _reload_supervisor() -> channel.Message:
    """A reload as SIGHUP asks for one: the supervisor checks the file and tells every worker (its log says how
    it went)."""
    os.kill(os.getppid(), signal.SIGHUP)
    return {"ok": True, "message": "reload asked of the supervisor"}


def install_console(server: ProxyServer, handlers: dict[str, channel.Handler] | None = None,
                    reload: Reload | None = None) -> None:
    """Give the server's services the console: over the workers' channels under a supervisor, else this process's
    own handlers (`handlers`: the operator commands' handlers of the process; `reload`: its reload)."""
    if run_dir() is not None:
        count = worker_count()
        fanout = channel_fanout(lambda: [worker_channel(index) for index in range(count)])
        reload = _reload_supervisor
    else:
        fanout = local_fanout({**(handlers or {}), **ConsoleLocal(server).handlers()})
    server.console = Console(lambda: server.config, fanout, reload or _no_reload)
    for service in server.services():
        service.console = server.console


async def _no_reload() -> channel.Message:
    return {"error": "no_file", "message": "started without a configuration file: nothing to reload"}
