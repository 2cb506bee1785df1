"""Test helpers: the proxy in this process (on its own event loop in a thread, so a test can reach its targets),
and a record of client load."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
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


@dataclass
class Load:
    """Clients running transactions until told to stop; what each saw."""

    port: int
    clients: int
    stop: threading.Event = field(default_factory=threading.Event)
    records: dict[str, list[tuple[float, int]]] = field(default_factory=dict)  # client -> (started, server port)
    errors: list[str] = field(default_factory=list)
    threads: list[threading.Thread] = field(default_factory=list)

    def record(self, client: str, started: float, port: int) -> None:
        self.records.setdefault(client, []).append((started, port))

    def count(self) -> int:
        return sum(len(r) for r in self.records.values())

    def wait_all(self, predicate: Any, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert not self.errors, self.errors
            if len(self.records) == self.clients and all(predicate(r) for r in self.records.values()):
                return
            time.sleep(0.05)
        raise AssertionError(f"clients did not get there: { {c: len(r) for c, r in self.records.items()} }")


def wait_until(predicate: Any, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)
