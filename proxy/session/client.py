"""What every client session shares, whatever its engine: its peer's name, the counters, the login task, the
client limit and the bounds that hold before a client has authenticated."""

from __future__ import annotations

import asyncio
import logging
import ssl
from typing import Any

from proxy.auth.failures import FailedLogins
from proxy.errors import BackendUnavailable, TooManyClients
from proxy.netio import Connection, ConnectionClosed
from proxy.rundir import worker_count
from proxy.stats import EndpointStats

log = logging.getLogger(__name__)

# Before authentication no message may be larger than this (PostgreSQL allows 10 000 bytes for a startup packet
# and 64 kB for an authentication token; MySQL login packets are capped at 64 kB separately).
LOGIN_MESSAGE_LIMIT = 16 * 1024
# Bytes a client may send ahead of the login exchange before the proxy stops reading from its socket.
LOGIN_BUFFER_LIMIT = 64 * 1024


class TLSHandshakeFailed(ConnectionClosed):
    """The client's TLS handshake failed (already logged as one warning line)."""


class ClientConnection(Connection):
    """A client socket; subclasses run their login in `_login_with_timeout`, then forward."""

    peer = "?"
    _task: asyncio.Task[None] | None = None
    stats: EndpointStats  # the counters of the endpoint this client came in on (set by the subclass)
    over_limit: TooManyClients | None = None  # set when this client came beyond max_clients: it is refused
    # The server's set of its clients, which this one leaves as soon as its socket is gone: a client kept there
    # until the janitor's next pass outlives the young generations of the garbage collector, and the closed clients
    # of a burst of connections (each a reference cycle with its transport) pile up for a full collection.
    registry: set[Any] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        stats = self.stats
        stats.clients_accepted += 1
        stats.clients_current += 1
        self.buffer_limit = LOGIN_BUFFER_LIMIT
        if stats.registry.over_limit():
            stats.clients_refused += 1  # the login says so where the protocol lets the client read it
            self.over_limit = TooManyClients(f"sorry, too many clients already (max_client_connections "
                                             f"{stats.registry.max_clients * worker_count()})")
        self._task = self.loop.create_task(self._login_with_timeout())

    async def _login_with_timeout(self) -> None:
        raise NotImplementedError

    def log_failed_login(self, failed: FailedLogins, user: str, message: str, *args: object) -> None:
        """A password that did not match: its warning line goes through `failed` (one each while they are few, a
        summary per client address when they come in a burst)."""
        if not self.closed:
            failed.record(self.peer.rpartition(":")[0] or self.peer, user, message, *args)

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        if self.registry is not None:
            self.registry.discard(self)

    async def start_tls(
        self, context: ssl.SSLContext, *, server_side: bool, server_hostname: str | None = None
    ) -> None:
        try:
            await super().start_tls(context, server_side=server_side, server_hostname=server_hostname)
        except (ssl.SSLError, OSError, ConnectionClosed, BackendUnavailable) as exc:
            raise self.tls_failed(exc) from None

    def tls_failed(self, exc: BaseException) -> TLSHandshakeFailed:
        """Log a failed TLS handshake as one warning line, drop the connection, and say so to the login task."""
        reason = str(exc) or type(exc).__name__
        log.warning("client %s: TLS handshake failed: %s", self.peer, reason)
        self.abort()
        return TLSHandshakeFailed(reason)
