"""Re-pointing, pausing and resizing a target, with fake backends: which connections close, when, and who waits."""

from __future__ import annotations

import asyncio
import time

import pytest

from proxy.config import PoolSettings
from proxy.errors import BorrowTimeout
from proxy.pool.pool import Backend, Pool, Target


class FakeBackend:
    is_tls = False
    in_transaction = False

    def __init__(self, address: tuple[str, int]) -> None:
        self.address = address
        self.closed = False
        self.forgotten = False
        self.created_at = self.idle_since = time.monotonic()
        self.generation = -1  # stamped by the pool

    def close(self) -> None:
        self.closed = True


class Server:
    """Connects like a backend connector: reads the target's address first, then waits for the server."""

    def __init__(self) -> None:
        self.opened: list[FakeBackend] = []
        self.gate: asyncio.Event | None = None

    async def connect(self, pool: Pool) -> Backend:
        address = (pool.target.host, pool.target.port)
        await asyncio.sleep(0)
        if self.gate is not None:
            await self.gate.wait()
        backend = FakeBackend(address)
        self.opened.append(backend)
        return backend


def make(limit: int = 3, borrow_timeout: float = 5.0) -> tuple[Target, Pool, Server]:
    target = Target("t", "old", 1, PoolSettings(max_connections=limit, max_idle_connections=limit,
                                                 connection_borrow_timeout=borrow_timeout))
    target.resolve_limits(limit + 3)  # 3 reserved
    server = Server()
    pool = target.pools[("db", "u")] = Pool(target, "db", "u", server.connect)
    return target, pool, server


async def test_repoint_closes_idle_now_and_lent_out_on_release() -> None:
    target, pool, _ = make()
    first, second = await pool.borrow(), await pool.borrow()
    pool.release(first)
    resets: list[int] = []
    target.on_repoint.append(lambda: resets.append(target.generation))
    pool.validated_settings.add(("DateStyle", "ISO"))

    target.repoint("new", 2)

    assert resets == [1] and target.generation == 1 and not pool.validated_settings
    assert first.closed and first not in pool.idle  # idle of the old server: closed at once
    assert not second.closed  # lent out: its client goes on with it
    assert target.open_connections == 1
    pool.release(second)
    assert second.closed and target.open_connections == 0  # given back: closed, never lent again
    third = await pool.borrow()
    assert isinstance(third, FakeBackend)
    assert third.address == ("new", 2) and third.generation == 1


async def test_a_connect_under_way_during_a_repoint_is_redone_to_the_new_server() -> None:
    target, pool, server = make()
    server.gate = asyncio.Event()
    borrowing = asyncio.ensure_future(pool.borrow())
    await asyncio.sleep(0.01)
    target.repoint("new", 2)
    server.gate.set()
    backend = await borrowing
    assert isinstance(backend, FakeBackend)
    assert backend.address == ("new", 2) and backend.generation == 1
    stale = server.opened[0]
    assert stale.address == ("old", 1) and stale.closed
    assert target.open_connections == 1


async def test_limits_stay_until_the_new_server_reports_its_own() -> None:
    target = make(limit=3)[0]
    target.settings = PoolSettings(max_connections="50%", max_idle_connections="50%")
    target.resolve_limits(203, 0)  # generation 0 was learned already: no change
    assert target.max_connections == 3
    target.repoint("new", 2)
    assert target.needs_limits(1) and not target.needs_limits(0)
    assert target.max_connections == 3  # the old limits hold until a connection to the new server learns them
    target.resolve_limits(500, 0)  # a late connection to the old server teaches nothing
    assert target.max_connections == 3
    target.resolve_limits(203, 1)
    assert target.max_connections == 100 and not target.needs_limits(1)


async def test_pause_holds_borrows_and_resume_serves_them_in_order() -> None:
    target, pool, _ = make(limit=2)
    held = await pool.borrow()
    idle = await pool.borrow()
    pool.release(idle)
    target.pause()
    served: list[int] = []

    async def borrower(n: int) -> None:
        backend = await pool.borrow()
        served.append(n)
        await asyncio.sleep(0)
        pool.release(backend)

    tasks = []
    for n in range(4):
        tasks.append(asyncio.ensure_future(borrower(n)))
        await asyncio.sleep(0.001)
    assert served == [] and len(pool.waiters) == 4
    pool.release(held)  # given back while paused: kept idle, nobody is served
    assert served == [] and len(pool.idle) == 2
    target.resume()
    await asyncio.gather(*tasks)
    assert served == [0, 1, 2, 3]
    assert target.open_connections == 2


async def test_lent_out_backends_go_on_while_paused() -> None:
    target, pool, _ = make()
    backend = await pool.borrow()
    target.pause()
    assert not backend.closed
    pool.release(backend)
    assert backend in pool.idle and not backend.closed
    assert pool.borrow_idle() is None  # paused: the idle one waits for the resume
    target.resume()
    assert pool.borrow_idle() is backend


async def test_a_paused_borrow_times_out_with_the_borrow_timeout_error() -> None:
    target, pool, _ = make(borrow_timeout=0.2)
    target.pause()
    with pytest.raises(BorrowTimeout, match="timed out after 0.2 s waiting for a backend.*paused"):
        await pool.borrow()
    assert target.open_connections == 0


async def test_resize_down_closes_idle_now_and_lent_out_on_release() -> None:
    target, pool, _ = make(limit=4)
    backends = [await pool.borrow() for _ in range(4)]
    pool.release(backends[0])
    pool.release(backends[1])
    target.apply_settings(PoolSettings(max_connections=1, max_idle_connections=1))
    assert target.max_connections == 1
    assert backends[0].closed and backends[1].closed  # idle beyond the new limit: closed at once
    assert target.open_connections == 2
    pool.release(backends[2])
    assert backends[2].closed  # over the limit when given back
    pool.release(backends[3])
    assert not backends[3].closed and pool.idle == [backends[3]]
    assert target.open_connections == 1


async def test_resize_up_lets_waiters_open_connections() -> None:
    target, pool, _ = make(limit=1)
    held = await pool.borrow()
    waiting = [asyncio.ensure_future(pool.borrow()) for _ in range(2)]
    await asyncio.sleep(0.01)
    assert not any(task.done() for task in waiting)
    target.apply_settings(PoolSettings(max_connections=3, max_idle_connections=3))
    extra = await asyncio.gather(*waiting)
    assert target.open_connections == 3 and held not in extra


async def test_the_pooling_mode_does_not_change_while_running() -> None:
    target, pool, _ = make()
    target.apply_settings(PoolSettings(mode="session", max_connections=5))
    assert target.settings.mode is pool.mode and pool.settings.max_connections == 5


async def test_operator_pause_and_the_proxys_hold_are_released_independently() -> None:
    target, pool, _ = make()
    target.pause(operator=True)
    target.pause()  # e.g. no writer for a moment
    waiting = asyncio.ensure_future(pool.borrow())
    await asyncio.sleep(0.01)
    target.resume()  # the writer is back: the operator's pause still holds
    await asyncio.sleep(0.01)
    assert target.paused and not waiting.done()
    target.resume(operator=True)
    backend = await asyncio.wait_for(waiting, 1)
    assert not target.paused
    pool.release(backend)


async def test_reconnect_closes_idle_now_and_lent_out_on_release() -> None:
    target, pool, server = make()
    lent, idle = await pool.borrow(), await pool.borrow()
    pool.release(idle)
    target.reconnect()
    assert idle.closed and not lent.closed
    pool.release(lent)
    assert lent.closed and target.open_connections == 0
    fresh = await pool.borrow()
    assert fresh not in (lent, idle) and fresh.generation == target.generation and len(server.opened) == 3
