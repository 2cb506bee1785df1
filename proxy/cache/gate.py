"""Replies a client waits for while Redis takes the invalidations of its writes: the end of a write is told only
once every proxy's next lookup misses."""

from __future__ import annotations

import asyncio
from collections.abc import Callable


class ReplyGate:
    """Holds a client's outgoing bytes, in order, while invalidations are on their way; then lets them go."""

    __slots__ = ("_held", "_waiting", "closed", "shut")

    def __init__(self) -> None:
        self._held: list[tuple[bytes, Callable[[bytes], None]]] | None = None
        self._waiting = 0
        self.shut = False  # bytes are being held (read before calling held(): the common case costs no call)
        self.closed: Callable[[], bool] = lambda: False

    def wait_for(self, invalidated: asyncio.Future[None] | None) -> None:
        """Hold what follows until `invalidated` is done (None or done already: nothing to wait for)."""
        if invalidated is None or invalidated.done():
            return
        if self._held is None:
            self._held = []
            self.shut = True
        self._waiting += 1
        invalidated.add_done_callback(self._done)

    def held(self, data: bytes, send: Callable[[bytes], None]) -> bool:
        """Keep `data` (to go through `send` later) if the gate is shut; False: send it now."""
        if self._held is None:
            return False
        self._held.append((data, send))
        return True

    def _done(self, _: object) -> None:
        self._waiting -= 1
        if self._waiting or self._held is None:
            return
        held, self._held = self._held, None
        self.shut = False
        if not self.closed():
            for data, send in held:
                send(data)
