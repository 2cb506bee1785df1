"""The pool's open-connection count from the set it owns, and connect retries with backoff (fake backends)."""

from __future__ import annotations

import asyncio
import itertools
import time

import pytest

from proxy.config import PoolSettings
from proxy.errors import AuthenticationFailed, BackendError, BackendUnavailable, BorrowTimeout
from proxy.pool.pool import Backend, Pool, Target


class FakeBackend:
    is_tls = False
    in_transaction = False

    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self.closed = False
        self.forgotten = False
        self.created_at = self.idle_since = time.monotonic()

    def close(self) -> None:
        self.closed = True

    def lost(self) -> None:
        """What a real backend does when its socket closes while no client is linked."""
        self.closed = True
        self.pool.discard(self)


def make_target(limit: int, borrow_timeout: float = 5.0) -> Target:
    target = Target("t", "127.0.0.1", 1, PoolSettings(max_connections=limit, connection_borrow_timeout=borrow_timeout))
    target.max_connections = target.max_idle = limit
    return target


async def test_a_backend_lost_during_login_is_counted_out_once() -> None:
    target = make_target(3)

    async def refused_login(pool: Pool) -> Backend:
        backend = FakeBackend(pool)
        await asyncio.sleep(0)
        backend.lost()  # the server closed the socket after refusing the login ...
        backend.forgotten = True  # ... and open_backend gives up on it
        raise AuthenticationFailed("password authentication failed")

    pool = target.pools[("db", "u")] = Pool(target, "db", "u", refused_login)
    for _ in range(10):
        with pytest.raises(AuthenticationFailed):
            await pool.borrow()
    assert target.open_connections == 0

    async def good_login(pool: Pool) -> Backend:
        await asyncio.sleep(0.001)
        return FakeBackend(pool)

    pool.connector = good_login
    held = await asyncio.gather(*(pool.borrow() for _ in range(3)))
    assert target.open_connections == 3
    assert not pool.can_open()  # the refused logins left no phantom slots behind
    for backend in held:
        pool.release(backend)
    assert target.open_connections == 3 and len(pool.idle) == 3


async def test_connects_in_progress_hold_their_slots() -> None:
    target = make_target(2)
    gate = asyncio.Event()

    async def slow(pool: Pool) -> Backend:
        await gate.wait()
        return FakeBackend(pool)

    pool = target.pools[("db", "u")] = Pool(target, "db", "u", slow)
    tasks = [asyncio.ensure_future(pool.borrow()) for _ in range(4)]
    await asyncio.sleep(0.01)
    assert target.open_connections == 2 and len(pool.waiters) == 2
    gate.set()
    first = await asyncio.gather(*tasks[:2])
    for backend in first:
        pool.release(backend)  # handed straight to the two waiters
    await asyncio.gather(*tasks[2:])
    assert target.open_connections == 2


async def test_connect_is_retried_with_backoff_while_the_server_is_away() -> None:
    target = make_target(1)
    attempts: list[float] = []

    async def restarting(pool: Pool) -> Backend:
        attempts.append(time.monotonic())
        if len(attempts) == 1:
            raise BackendUnavailable("cannot connect to the database: Connection refused")
        if len(attempts) < 5:
            raise BackendError("the database system is starting up", "57P03")
        return FakeBackend(pool)

    pool = target.pools[("db", "u")] = Pool(target, "db", "u", restarting)
    backend = await pool.borrow()
    assert isinstance(backend, FakeBackend) and len(attempts) == 5
    gaps = [later - earlier for earlier, later in itertools.pairwise(attempts)]
    assert all(gap >= 0.9 * 0.05 * 2**index for index, gap in enumerate(gaps)), gaps  # 50 ms, doubling
    assert pool.stats.connect_failures == 4 and target.last_connect_failure == ""


async def test_connect_retries_end_at_the_borrow_timeout_naming_the_last_failure() -> None:
    target = make_target(1, borrow_timeout=0.5)

    async def down(pool: Pool) -> Backend:
        raise BackendUnavailable("cannot connect to the database at 127.0.0.1:1: Connection refused")

    pool = target.pools[("db", "u")] = Pool(target, "db", "u", down)
    started = time.monotonic()
    with pytest.raises(BorrowTimeout, match="last connect attempt failed: cannot connect.*Connection refused"):
        await pool.borrow()
    assert 0.2 < time.monotonic() - started < 2.0
    assert target.open_connections == 0


async def test_lasting_refusals_are_not_retried() -> None:
    target = make_target(1)
    attempts = 0

    async def wrong_secret(pool: Pool) -> Backend:
        nonlocal attempts
        attempts += 1
        raise BackendError('password authentication failed for user "u"', "28P01")

    pool = target.pools[("db", "u")] = Pool(target, "db", "u", wrong_secret)
    with pytest.raises(BackendError):
        await pool.borrow()
    assert attempts == 1 and target.open_connections == 0


async def test_a_repoint_wakes_a_connect_backing_off_from_the_old_server() -> None:
    target = make_target(1, borrow_timeout=10.0)

    async def connect(pool: Pool) -> Backend:
        await asyncio.sleep(0)
        if pool.target.port == 1:
            raise BackendUnavailable("cannot connect to the database at 127.0.0.1:1: Connection refused")
        return FakeBackend(pool)

    pool = target.pools[("db", "u")] = Pool(target, "db", "u", connect)
    borrowing = asyncio.ensure_future(pool.borrow())
    await asyncio.sleep(0.8)  # by now the backoff waits 0.8 s between attempts
    assert not borrowing.done() and target.backing_off
    repointed_at = time.monotonic()
    target.repoint("127.0.0.1", 2)
    backend = await asyncio.wait_for(borrowing, 5.0)
    assert time.monotonic() - repointed_at < 0.1
    assert backend.generation == target.generation and not target.backing_off
