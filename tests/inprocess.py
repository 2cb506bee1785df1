"""Test helper: the proxy in this process, on its own event loop in a thread, so a test can reach its targets."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import uvloop

from proxy.config import load_config
from proxy.server import ProxyServer
from support import write_config

T = TypeVar("T")


class InProcessProxy:
    """A ProxyServer running on a uvloop in a background thread; `call` runs a function on that loop."""

    def __init__(self, config: Path) -> None:
        self.loop = uvloop.new_event_loop()
        self.server = ProxyServer(load_config(config))
        self.thread = threading.Thread(target=self.loop.run_forever, name="proxy", daemon=True)
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.server.start(), self.loop).result(30)
        self.ports = self.server.ports

    def call(self, function: Callable[..., T], *args: Any) -> T:
        """Run `function(*args)` on the proxy's loop and return its result."""
        async def run() -> T:
            return function(*args)

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(30)

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(), self.loop).result(60)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@contextmanager
def proxy_in_process(folder: Path, sections: dict[str, dict[str, Any]]) -> Iterator[InProcessProxy]:
    """Write the config (see support.write_config) and run the proxy in this process until the block ends."""
    folder.mkdir(parents=True, exist_ok=True)
    logging.getLogger("proxy").setLevel(logging.INFO)
    proxy = InProcessProxy(write_config(folder, sections))
    try:
        yield proxy
    finally:
        proxy.stop()
