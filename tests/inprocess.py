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

    def start(self) -> Load:
        for thread in self.threads:
            thread.start()
        return self

    def finish(self) -> None:
        """Stop the clients, wait for them, and fail on any error one of them saw."""
        self.stop.set()
        for thread in self.threads:
            thread.join(30)
        assert not self.errors, self.errors

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


def check_pause_and_resize(proxy: InProcessProxy, target: Any, load: Load, connections: Callable[[], int]) -> None:
    """Under `load`: a paused target lends nothing until resumed; resized to 1 and then 6 backends, the server's
    count of connections (`connections`) follows."""
    load.wait_all(lambda r: len(r) >= 3)
    proxy.call(target.pause)
    wait_until(lambda: proxy.call(lambda: sum(len(p.busy) for p in target.pools.values())) == 0)
    time.sleep(0.2)  # transactions under way when paused have finished; their clients record them
    held = load.count()
    time.sleep(1.0)
    assert load.count() == held, (held, load.count())  # no new transaction got a backend while paused
    proxy.call(target.resume)
    load.wait_all(lambda r: len(r) >= 10)

    def resize(limit: int) -> None:
        settings = proxy.call(lambda: target.settings.model_copy(update={"max_connections": limit}))
        proxy.call(target.apply_settings, settings)

    resize(1)
    wait_until(lambda: connections() <= 1)
    before = load.count()
    samples = []
    while load.count() < before + 40:
        samples.append(connections())
    assert max(samples) <= 1, samples
    resize(6)
    samples = []
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and max(samples, default=0) < 4:
        samples.append(connections())
    assert 4 <= max(samples) <= 6, samples
