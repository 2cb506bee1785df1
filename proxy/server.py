"""The proxy process: listeners, the once-a-second janitor, and graceful shutdown."""

from __future__ import annotations

import asyncio
import gc
import logging
import socket
import time

from proxy.auth.failures import flush_all as flush_failed_logins
from proxy.config import ClientTLSMode, Config
from proxy.rundir import worker_count
from proxy.secrets import SecretStore
from proxy.session.client import ClientConnection
from proxy.session.mysql_client import MySQLClient
from proxy.session.mysql_service import MySQLService
from proxy.session.pg_client import PostgresClient
from proxy.session.pg_service import PostgresService
from proxy.tls import server_context

log = logging.getLogger(__name__)

JANITOR_INTERVAL = 1.0


class ProxyServer:
    """Owns the listening sockets and the services behind them."""

    def __init__(self, config: Config, secrets: SecretStore | None = None) -> None:
        self.config = config
        self.secrets = secrets or SecretStore.from_file(config.secrets.file, config.secrets.env_prefix)
        tls = None if config.tls.mode is ClientTLSMode.DISABLE else server_context(config.tls)
        self.postgres = PostgresService(config, self.secrets, tls)
        self.mysql = MySQLService(config, self.secrets, tls)
        self.servers: list[asyncio.Server] = []
        self.pg_clients: set[PostgresClient] = set()
        self.mysql_clients: set[MySQLClient] = set()
        self._janitor: asyncio.Task[None] | None = None
        self.ports: dict[str, int] = {}

    async def start(self, reuse_port: bool = False) -> None:
        loop = asyncio.get_running_loop()
        # Each worker process takes its share of the client limit (as of the backend connection budget).
        ClientConnection.max_clients = max(1, self.config.server.max_client_connections // worker_count())
        settings = self.config.postgresql
        if settings.enabled:
            clients = self.pg_clients

            def make_client() -> PostgresClient:
                client = PostgresClient(self.postgres)
                clients.add(client)
                client.registry = clients
                return client

            self.postgres.make_client = make_client

            server = await loop.create_server(
                make_client, self.config.server.host, settings.port, reuse_port=reuse_port or None,
                backlog=4096,
            )
            for sock in server.sockets:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.servers.append(server)
            self.ports["postgresql"] = server.sockets[0].getsockname()[1]
            log.info("PostgreSQL listener on %s:%d -> %s:%d (%s pooling)", self.config.server.host,
                     self.ports["postgresql"], settings.backend_host, settings.backend_port, settings.pool.mode)
        my_settings = self.config.mysql
        if my_settings.enabled:
            my_clients = self.mysql_clients

            def make_mysql_client() -> MySQLClient:
                client = MySQLClient(self.mysql)
                my_clients.add(client)
                client.registry = my_clients
                return client

            server = await loop.create_server(
                make_mysql_client, self.config.server.host, my_settings.port, reuse_port=reuse_port or None,
                backlog=4096,
            )
            for sock in server.sockets:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.servers.append(server)
            self.ports["mysql"] = server.sockets[0].getsockname()[1]
            self.mysql.start()
            log.info("MySQL listener on %s:%d -> %s:%d (%s pooling)", self.config.server.host, self.ports["mysql"],
                     my_settings.backend_host, my_settings.backend_port, my_settings.pool.mode)
        if self.config.server.metrics_port >= 0:
            from proxy.metrics import serve_metrics, snapshot

            self.ports["metrics"] = serve_metrics(lambda: snapshot(self), self.config.server.host,
                                                  self.config.server.metrics_port)
        self._janitor = loop.create_task(self._run_janitor())
        # What the start made (modules, configuration, listeners) lives as long as the process: out of the garbage
        # collector's way, so that its full collections walk only what came since (a walk over the whole start-up
        # heap stalls every client for tens of milliseconds).
        gc.collect()
        gc.freeze()

    async def _run_janitor(self) -> None:
        timeout = self.config.server.idle_client_timeout
        while True:
            await asyncio.sleep(JANITOR_INTERVAL)
            now = time.monotonic()
            try:
                self.postgres.maintain(now)
                for client in list(self.pg_clients):
                    if client.closed:
                        self.pg_clients.discard(client)
                    else:
                        client.check_idle(now, timeout)
                self.mysql.maintain(now)
                for my_client in list(self.mysql_clients):
                    if my_client.closed:
                        self.mysql_clients.discard(my_client)
                    else:
                        my_client.check_idle(now, timeout)
            except Exception:
                log.exception("janitor pass failed")

    async def stop(self) -> None:
        for server in self.servers:
            server.close()
        if self._janitor is not None:
            self._janitor.cancel()
        deadline = time.monotonic() + self.config.server.shutdown_grace
        while time.monotonic() < deadline and (
            any(c.backend is not None for c in self.pg_clients if not c.closed)
            or any(c.backend is not None and not c.backend.idle for c in self.mysql_clients if not c.closed)
        ):
            await asyncio.sleep(0.05)
        for client in list(self.pg_clients):
            client.abort()
        for my_client in list(self.mysql_clients):
            my_client.abort()
        self.postgres.close()
        self.mysql.close()
        flush_failed_logins()
        for server in self.servers:
            await server.wait_closed()
