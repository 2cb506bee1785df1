"""The engine-agnostic pool with fake backends: the target's connection budget holds across pools."""

from __future__ import annotations

import asyncio
import time

from proxy.config import PoolSettings
from proxy.pool.pool import Backend, Pool, Target
from proxy.stats import StatsRegistry


class FakeBackend:
    is_tls = False
    in_transaction = False

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


async def test_a_removed_pool_folds_its_counters_into_the_targets_total() -> None:
    registry = StatsRegistry()
    target = Target("t", "127.0.0.1", 1, PoolSettings(max_connections=2, connection_borrow_timeout=5),
                    stats=registry.target("postgresql", "postgresql", "default", "127.0.0.1:1"))
    target.max_connections = target.max_idle = 2

    async def connect(pool: Pool) -> Backend:
        return FakeBackend()

    def totals() -> dict[str, float]:
        pools = registry.snapshot()["pools"]
        return {name: sum(p[name] for p in pools) for name in ("borrows", "opened", "closed")}

    for round_ in range(2):  # the same pool again after its removal: a new series, the totals go on
        pool = target.pools[("db", "a")] = Pool(target, "db", "a", connect)
        pool.release(await pool.borrow())
        assert totals() == {"borrows": round_ + 1, "opened": round_ + 1, "closed": round_}
        pool.close_all()
        target.remove(pool)
        assert target.pools == {}
        assert totals() == {"borrows": round_ + 1, "opened": round_ + 1, "closed": round_ + 1}
    (retired,) = registry.snapshot()["pools"]
    assert (retired["engine"], retired["instance"], retired["database"], retired["user"]) == (
        "postgresql", "127.0.0.1:1", "", "")


async def test_a_relabelled_target_counts_its_pools_under_the_new_instance() -> None:
    """A reload that moves an endpoint to another instance: what its pools counted stays with the old instance
    (folded, never going down), and they count on under the new one."""
    registry = StatsRegistry()
    target = Target("t", "127.0.0.1", 1, PoolSettings(max_connections=2, connection_borrow_timeout=5),
                    stats=registry.target("postgresql", "rw", "main", "a"))
    target.max_connections = target.max_idle = 2

    async def connect(pool: Pool) -> Backend:
        return FakeBackend()

    pool = target.pools[("db", "u")] = Pool(target, "db", "u", connect)
    pool.release(await pool.borrow())
    target.relabel(registry.target("postgresql", "rw", "main", "b"))
    pool.release(await pool.borrow())
    rows = {(p["instance"], p["database"], p["user"]): p for p in registry.snapshot()["pools"]}
    assert set(rows) == {("a", "", ""), ("b", "db", "u")}
    assert (rows[("a", "", "")]["borrows"], rows[("b", "db", "u")]["borrows"]) == (1, 1)
    assert rows[("b", "db", "u")]["open"] == 1  # the pool's gauges follow it
