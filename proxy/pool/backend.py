"""What every backend connection shares, whatever its engine: pool membership, its client, and breaking."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any, Protocol

from proxy.netio import Connection

if TYPE_CHECKING:
    from proxy.pool.pool import Pool

log = logging.getLogger(__name__)


class LinkedClient(Protocol):
    """The side of a client session a backend talks to when it breaks."""

    def backend_lost(self, backend: Any, exc: Exception | None) -> None: ...


class BackendConnection(Connection):
    """A server connection lent out by a pool; while linked, `client` gets its bytes."""

    client: LinkedClient | None

    def __init__(self, pool: Pool) -> None:
        super().__init__()
        self.pool = pool
        self.forgotten = False  # set by the pool once the backend has left it for good
        self.created_at = time.monotonic()
        self.idle_since = self.created_at
        self.client = None
        target = pool.target
        # The server this connection was opened to, and the target's generation then (see Target.repoint):
        # a cancel or KILL for it goes to that server, whatever the target points at now.
        self.host = target.host
        self.port = target.port
        self.generation = target.generation

    @property
    def in_transaction(self) -> bool:
        """A transaction is open on the server session (each engine says how it knows)."""
        raise NotImplementedError

    def opened_to(self, host: str, port: int, generation: int) -> None:
        """Record the address and generation read from the target when the connect began."""
        self.host, self.port, self.generation = host, port, generation

    def linked_peer(self) -> Connection | None:
        client = self.client
        return client if isinstance(client, Connection) else None

    def on_closed(self, exc: Exception | None) -> None:
        client = self.client
        if client is not None:
            client.backend_lost(self, exc)
        else:
            self.pool.discard(self)

    def _broken(self, reason: str) -> None:
        """The server broke the protocol: log why and drop the connection (its client learns in on_closed)."""
        log.error("backend %s: %s; closing it", self, reason)
        self.abort()
