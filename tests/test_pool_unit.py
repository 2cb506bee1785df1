"""The engine-agnostic pool with fake backends: the target's connection budget holds across pools."""

from __future__ import annotations

import asyncio
import time

from proxy.config import PoolSettings
from proxy.pool.pool import Backend, Pool, Target


class FakeBackend:
    def __init__(self) -> None:
        self.closed = False
        self.forgotten = False
        self.created_at = self.idle_since = time.monotonic()

    def close(self) -> None:
        self.closed = True  # a real transport reports connection_lost later; the pool must not wait for it


async def test_stealing_idle_backends_never_exceeds_the_budget() -> None:
    target = Target("t", "127.0.0.1", 1, PoolSettings(max_connections=3, connection_borrow_timeout=5))
    target.max_connections = target.max_idle = 3
    live: set[FakeBackend] = set()
    peak = 0

    async def connect(pool: Pool) -> Backend:
        nonlocal peak
        await asyncio.sleep(0.001)
        backend = FakeBackend()
        live.add(backend)
        peak = max(peak, len([b for b in live if not b.closed]))
        return backend

    first = target.pools[("db", "a")] = Pool(target, "db", "a", connect)
    second = target.pools[("db", "b")] = Pool(target, "db", "b", connect)
    held = [await first.borrow() for _ in range(3)]
    for backend in held:
        first.release(backend)
    assert len(first.idle) == 3

    async def use(pool: Pool) -> None:
        backend = await pool.borrow()
        await asyncio.sleep(0.002)
        pool.release(backend)

    await asyncio.gather(*(use(second) for _ in range(20)), *(use(first) for _ in range(20)))
    assert peak <= 3
    assert target.open_connections <= 3
