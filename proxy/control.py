"""The control socket: a unix socket next to the pid file, for its owner only, where `dbproxy` commands reach the
running proxy in the internal channel's message format (the transport; proxy/commands.py says what is done)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path

from proxy import channel
from proxy.loop_thread import LoopThread

log = logging.getLogger(__name__)


def control_socket_path(pid_file: Path) -> Path:
    """The control socket of the proxy whose pid file is `pid_file` (dbproxy.pid -> dbproxy.control.sock)."""
    return pid_file.with_name(pid_file.name.removesuffix(".pid") + ".control.sock")


class ControlSocket:
    """Serves `handlers` at `path`; the socket is made mode 0600 before it appears there."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.server: asyncio.Server | None = None
        self._inode: int | None = None

    async def start(self, handlers: Mapping[str, channel.Handler]) -> None:
        # Bound in a private folder beside it, restricted, then moved into place: nobody else can connect between
        # the bind and the chmod, and a stale socket of a dead proxy is replaced at once.
        private = Path(tempfile.mkdtemp(prefix=".dbproxy-control-", dir=self.path.parent))
        bound = private / "s"
        try:
            self.server = await channel.serve(bound, handlers)
            os.chmod(bound, 0o600)
            self._inode = bound.stat().st_ino
            os.replace(bound, self.path)
        finally:
            with contextlib.suppress(OSError):
                bound.unlink()
            private.rmdir()
        log.info("control socket at %s", self.path)

    def close(self) -> None:
        """Stop serving and remove the socket if it is still this process's."""
        if self.server is not None:
            self.server.close()
            self.server = None
        with contextlib.suppress(OSError):
            if self.path.stat().st_ino == self._inode:
                self.path.unlink()


class ControlThread(LoopThread):
    """The control socket of the supervisor, whose main thread only waits for its workers: an event loop of its own
    in a thread. `make_handlers` is called in that loop (what the handlers create belongs to it)."""

    def __init__(self, path: Path, make_handlers: Callable[[], Mapping[str, channel.Handler]]) -> None:
        super().__init__("dbproxy-control")
        self.socket = ControlSocket(path)
        self._make_handlers = make_handlers

    def start(self) -> None:
        """Serve in the thread; raises what stopped the socket from being served (OSError)."""
        self.start_thread()

    async def _begin(self) -> None:
        await self.socket.start(self._make_handlers())

    async def _end(self) -> None:
        self.socket.close()


def ask_control(path: Path, message: channel.Message, timeout: float) -> channel.Message:
    """Send a command to the proxy listening at `path` and wait for its answer (ChannelError if none)."""
    return channel.ask_blocking(path, message, timeout)
