"""What every client session shares, whatever its engine: its peer's name, the counters, the login task."""

from __future__ import annotations

import asyncio

from proxy.netio import Connection
from proxy.stats import PROXY


class ClientConnection(Connection):
    """A client socket; subclasses run their login in `_login_with_timeout`, then forward."""

    peer = "?"
    _task: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        PROXY.clients_accepted += 1
        PROXY.clients_current += 1
        self._task = self.loop.create_task(self._login_with_timeout())

    async def _login_with_timeout(self) -> None:
        raise NotImplementedError
