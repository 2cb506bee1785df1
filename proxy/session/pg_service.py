"""The PostgreSQL listener's shared state: target, pools, secrets, TLS contexts and the cancel registry."""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets as random_source
import ssl
from collections.abc import Callable

from proxy.config import ClientAuthMethod, Config, ServerSettings
from proxy.pool.pg_backend import PostgresBackend, open_backend
from proxy.pool.pg_deadline import send_cancel_request
from proxy.pool.pool import Backend, Pool, Target
from proxy.protocol.pg import messages as pg
from proxy.rundir import run_dir, worker_index, worker_socket
from proxy.secrets import SecretStore
from proxy.tls import backend_context

log = logging.getLogger(__name__)


class PostgresService:
    """Everything PostgreSQL client sessions share inside one process."""

    def __init__(self, config: Config, secrets: SecretStore, server_tls: ssl.SSLContext | None) -> None:
        self.config = config
        self.server: ServerSettings = config.server
        self.settings = config.postgresql
        self.secrets = secrets
        self.server_tls = server_tls
        self.backend_tls = backend_context(self.settings.backend_tls, self.settings.backend_ca_file)
        self.target = Target(
            "postgresql", self.settings.backend_host, self.settings.backend_port, self.settings.pool
        )
        self.exclude_variable_sets = "exclude_variable_sets" in self.settings.session_pinning_filters
        self.clients: dict[int, object] = {}  # process id -> PostgresClient (for CancelRequest)
        self.worker = worker_index()
        # Above 2**22 (Linux's highest pid): never equal to a server's pid in a NotificationResponse.
        self._process_ids = itertools.count((self.worker << 24) + (1 << 22) + 1)
        self.make_client: Callable[[], asyncio.Protocol] | None = None  # set by the listener
        if self.settings.auth_method is ClientAuthMethod.SCRAM_SHA_256:
            secrets.warm_up()  # first logins then cost what later ones do (no PBKDF2 on the event loop)

    def pool_for(self, database: str, user: str) -> Pool:
        key = (database, user)
        pool = self.target.pools.get(key)
        if pool is None:
            pool = self.target.pools[key] = Pool(self.target, database, user, self._connect)
        return pool

    async def _connect(self, pool: Pool) -> Backend:
        return await open_backend(pool, self.settings, self.secrets, self.backend_tls)

    def new_key(self) -> tuple[int, int]:
        """A BackendKeyData pair for a client: unique process id, random secret."""
        return next(self._process_ids) & 0x7FFFFFFF, random_source.randbits(32)

    async def cancel(self, process_id: int, secret_key: int) -> None:
        """Forward a client's CancelRequest to the backend serving that client right now, if any."""
        from proxy.session.pg_client import PostgresClient

        owner = process_id >> 24
        if owner != self.worker and run_dir() is not None:
            await self._forward_cancel(owner, process_id, secret_key)
            return
        client = self.clients.get(process_id)
        if not isinstance(client, PostgresClient) or client.secret_key != secret_key:
            log.warning("cancel request for an unknown client key %d ignored", process_id)
            return
        backend: PostgresBackend | None = client.backend
        if backend is None or client.pending <= 0:
            log.info("cancel request for client %d: nothing is running", process_id)
            return
        await self.cancel_backend(backend)
        log.info("cancel request for client %d sent to backend pid %d", process_id, backend.process_id)

    async def _forward_cancel(self, owner: int, process_id: int, secret_key: int) -> None:
        """The client lives in another worker process: hand the CancelRequest to it."""
        try:
            reader, writer = await asyncio.open_unix_connection(str(worker_socket("cancel", owner)))
            writer.write(pg.cancel_request(process_id, secret_key))
            await asyncio.wait_for(reader.read(), 10)  # like libpq: wait until the owner is done and closes
            writer.close()
        except (OSError, TimeoutError) as exc:
            log.warning("cancel request for client %d: worker %d unreachable: %s", process_id, owner, exc)
            return
        log.info("cancel request for client %d passed to worker %d", process_id, owner)

    async def cancel_backend(self, backend: PostgresBackend) -> None:
        """Ask the server to cancel whatever `backend` is running (connect, send and close within a deadline)."""
        await send_cancel_request(self.settings.backend_host, self.settings.backend_port, backend.process_id,
                                  backend.secret_key, self.settings.backend_connect_timeout)

    def maintain(self, now: float) -> None:
        for pool in list(self.target.pools.values()):
            pool.maintain(now)
        self.target.forget_unused_pools(now)

    def close(self) -> None:
        for pool in self.target.pools.values():
            pool.close_all()
