"""Pools of backend connections per (database, user), sharing one connection budget per database target."""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
import weakref
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from proxy.config import PoolMode, PoolSettings, resolve_count
from proxy.errors import BackendError, BackendUnavailable, BorrowTimeout, ProxyError
from proxy.rundir import worker_count
from proxy.stats import PoolStats

log = logging.getLogger(__name__)

# A backend connect that fails because the server is away or (re)starting is retried until the borrow timeout,
# first after RETRY_FIRST seconds, the wait doubling up to RETRY_MAX.
RETRY_FIRST = 0.05
RETRY_MAX = 1.0
# Server refusals that mean "not now" rather than "never": starting up or shutting down, admin shutdown, too many
# connections (PostgreSQL SQLSTATEs; MySQL errnos 1040 too many connections, 1053 server shutdown, 1927 killed).
RETRY_SQLSTATES = frozenset({"57P01", "57P03", "53300"})
RETRY_MYSQL_ERRNOS = frozenset({1040, 1053, 1927})


def connect_retryable(exc: BaseException) -> bool:
    """Whether a failed backend connect may work when tried again shortly (the server is away or restarting)."""
    if isinstance(exc, BackendUnavailable):
        return exc.transient
    if isinstance(exc, BackendError):
        return exc.sqlstate in RETRY_SQLSTATES or exc.mysql_errno in RETRY_MYSQL_ERRNOS
    return False


class Backend(Protocol):
    """What the pool needs of a backend connection, whatever its engine."""

    closed: bool
    forgotten: bool  # set by the pool once the backend has left it for good
    created_at: float
    idle_since: float

    def close(self) -> None: ...


@dataclass
class Target:
    """A database server and the connection budget every pool on it shares."""

    name: str
    host: str
    port: int
    settings: PoolSettings
    max_connections: int = 0  # resolved when the backend's own limit is known
    max_idle: int = 0
    pools: dict[tuple[str, str], Pool] = field(default_factory=dict)
    # Every backend connection of this target the pools own (idle, lent out, being cleaned), and a placeholder
    # per connect in progress: the one place the open-connection count comes from. Adding and discarding are
    # idempotent, so a backend that leaves by two paths at once is still counted out once.
    owned: set[object] = field(default_factory=set, repr=False)
    last_connect_failure: str = ""  # why the latest backend connect failed; empty once one succeeds

    @property
    def open_connections(self) -> int:
        return len(self.owned)

    def resolve_limits(self, backend_max_connections: int) -> None:
        """Turn percent settings into counts from the backend's max_connections (once)."""
        if self.max_connections:
            return
        usable = max(1, backend_max_connections - self.settings.reserved_connections)
        total = resolve_count(self.settings.max_connections, usable)
        share = worker_count()  # each worker process gets its part of the budget
        self.max_connections = max(1, total // share)
        self.max_idle = min(self.max_connections, max(1, resolve_count(self.settings.max_idle_connections, usable)
                                                      // share))
        log.info("target %s: max %d backend connections, %d idle%s", self.name, self.max_connections, self.max_idle,
                 f" (this worker's share of {total})" if share > 1 else "")

    @property
    def limit(self) -> int:
        # Before the backend's limit is known, allow one connection to learn it.
        return self.max_connections or 1

    def forget_unused_pools(self, now: float) -> None:
        """Drop the pools that have had no backend, no waiter and no client session for unused_pool_timeout
        seconds (the janitor calls this once a second): pools are made per database, user (and, for MySQL,
        client capabilities) as clients ask, so without this every name ever asked for would stay."""
        timeout = self.settings.unused_pool_timeout
        for key, pool in list(self.pools.items()):
            if not pool.unused():
                pool.unused_since = None
            elif pool.unused_since is None:
                pool.unused_since = now
            elif now - pool.unused_since >= timeout:
                del self.pools[key]

    def idle_count(self) -> int:
        return sum(len(p.idle) for p in self.pools.values())

    def capacity_freed(self) -> None:
        """A slot came free: wake the pool that has waited longest."""
        oldest: Pool | None = None
        for pool in self.pools.values():
            if pool.waiters and (oldest is None or pool.waiting_since() < oldest.waiting_since()):
                oldest = pool
        if oldest is not None:
            oldest.wake_one(None)

    def steal_idle(self, exclude: Pool) -> bool:
        """Close the longest-idle connection of another pool so `exclude` may open one."""
        victim: Backend | None = None
        owner: Pool | None = None
        for pool in self.pools.values():
            if pool is not exclude and pool.idle and (victim is None or pool.idle[0].idle_since < victim.idle_since):
                victim, owner = pool.idle[0], pool
        if victim is None or owner is None:
            return False
        owner.discard(victim)  # at once: no second borrower may pick the same victim, and its slot is free now
        return True


Connector = Callable[["Pool"], Awaitable[Backend]]


class Waiter(Protocol):
    """Something waiting for a backend: a client session (called back at once) or an awaiting coroutine."""

    waiting_since: float  # time.monotonic() when it started waiting

    def hand(self, backend: Backend | None) -> bool:
        """Take `backend` (None: a slot came free, open a connection); False when the waiter is gone."""
        ...

    def expire(self) -> None:
        """The borrow timeout passed while waiting."""
        ...

    def waiting(self) -> bool:
        """Still in line (not gone, not served, not timed out)."""
        ...


class _FutureWaiter:
    """The waiter of `Pool.borrow`: a future the coroutine awaits (it handles its own timeout)."""

    __slots__ = ("future", "waiting_since")

    def __init__(self, future: asyncio.Future[Backend | None]) -> None:
        self.future = future
        self.waiting_since = time.monotonic()

    def hand(self, backend: Backend | None) -> bool:
        if self.future.done():
            return False
        self.future.set_result(backend)
        return True

    def expire(self) -> None:
        """The awaiting coroutine times out by itself."""

    def waiting(self) -> bool:
        return not self.future.done()



class _Connecting:
    """A place in a target's budget held by a backend connect in progress."""

    __slots__ = ()


class Pool:
    """Idle backends in a LIFO stack; waiters in FIFO order; a backend is handed straight to a waiter."""

    def __init__(self, target: Target, database: str, user: str, connector: Connector) -> None:
        self.target = target
        self.database = database
        self.user = user
        self.settings = target.settings
        self.mode = target.settings.mode
        self.connector = connector
        self.idle: list[Backend] = []
        self.busy: set[Backend] = set()
        self.waiters: deque[Waiter] = deque()
        self.stats = PoolStats()
        self.server_params: dict[str, str] = {}  # what the backend reported at login
        self.validated_settings: set[tuple[str, str]] = set()
        self._settings_ids: dict[tuple[tuple[str, str], ...], int] = {}
        self._next_settings_id = itertools.count(1)
        self._statement_names: dict[tuple[bytes, int], bytes] = {}
        self._next_statement = itertools.count(1)
        # the client sessions using this pool: while there is one, the pool is kept (see Target.forget_unused_pools)
        self.clients: weakref.WeakSet[object] = weakref.WeakSet()
        self.unused_since: float | None = None

    def __repr__(self) -> str:
        return f"Pool({self.database}/{self.user}@{self.target.name})"

    @property
    def name(self) -> str:
        return f"{self.database}/{self.user}"

    @property
    def session_mode(self) -> bool:
        return self.mode is PoolMode.SESSION

    def settings_id(self, settings: Mapping[str, str]) -> int:
        """A number per distinct set of session settings, so a client and a backend compare in one step."""
        key = tuple(sorted(settings.items()))
        found = self._settings_ids.get(key)
        if found is None:
            if len(self._settings_ids) >= 10_000:  # bounded; numbers are never reused
                self._settings_ids.clear()
            found = self._settings_ids[key] = next(self._next_settings_id)
        return found

    def statement_name(self, parse_rest: bytes, context: int = 0) -> bytes:
        """The backend name for a statement: shared by every client that prepares the same text and parameter
        types under the same name-resolution settings (`context`, a settings_id of those settings)."""
        key = (parse_rest, context)
        name = self._statement_names.get(key)
        if name is None:
            if len(self._statement_names) >= 100_000:  # bounded; names are never reused
                self._statement_names.clear()
            name = self._statement_names[key] = b"dbproxy_%d" % next(self._next_statement)
        return name

    def unused(self) -> bool:
        """No backend (idle or lent out), no live waiter and no client session (a connect in progress is always
        for a waiter or a client)."""
        return not (self.idle or self.busy or self.clients or any(w.waiting() for w in self.waiters))

    def waiting_since(self) -> float:
        return self.waiters[0].waiting_since if self.waiters else float("inf")

    def wake_one(self, backend: Backend | None) -> bool:
        waiters = self.waiters
        while waiters:
            if waiters.popleft().hand(backend):
                return True
        return False

    def queue(self, waiter: Waiter) -> None:
        """Wait in line for the next backend given back (or slot freed)."""
        self.waiters.append(waiter)
        self.stats.waits += 1

    def can_open(self) -> bool:
        """Whether a new backend connection may be opened now (perhaps by closing another pool's idle one)."""
        target = self.target
        return target.open_connections < target.limit or bool(target.max_connections and target.steal_idle(self))

    def timed_out(self) -> BorrowTimeout:
        self.stats.borrow_timeouts += 1
        failure = self.target.last_connect_failure
        return BorrowTimeout(
            f"timed out after {self.settings.connection_borrow_timeout:g} s waiting for a backend "
            f"connection (pool {self.name}: {len(self.busy)} in use, target limit {self.target.limit})"
            + (f"; the last connect attempt failed: {failure}" if failure else "")
        )

    # --- borrowing ---

    async def borrow(self) -> Backend:
        """A backend for one transaction (or a session); waits at most the borrow timeout."""
        backend = self.borrow_idle()
        if backend is not None:
            return backend
        stats = self.stats
        loop = asyncio.get_running_loop()
        started = loop.time()
        deadline = started + self.settings.connection_borrow_timeout
        while True:
            backend = self.borrow_idle()
            if backend is not None:
                break
            if self.can_open():
                backend = await self._open(deadline)
                stats.borrows += 1
                break
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise self.timed_out()
            waiter: asyncio.Future[Backend | None] = loop.create_future()
            self.queue(_FutureWaiter(waiter))
            try:
                handed = await asyncio.wait_for(waiter, remaining)
            except TimeoutError:
                continue
            except asyncio.CancelledError:
                # A backend handed over just as the borrower gave up must not be lost.
                if waiter.done() and not waiter.cancelled() and (handed := waiter.result()) is not None:
                    self.release(handed)
                raise
            if handed is not None:
                if handed.closed:
                    self.discard(handed)
                    continue
                backend = handed
                break
        stats.wait_time += loop.time() - started
        return backend

    def borrow_idle(self) -> Backend | None:
        """An idle backend at once, without waiting or connecting; None when there is none (then `borrow`)."""
        idle = self.idle
        while idle:
            backend = idle.pop()
            if backend.closed:
                self._forget(backend)
                continue
            self.busy.add(backend)
            self.stats.borrows += 1
            return backend
        return None

    async def _open(self, deadline: float) -> Backend:
        """Connect a new backend in a slot of the target's budget; while the server is away or restarting, try
        again with backoff until `deadline` (loop time), then raise the borrow timeout naming the last failure."""
        target = self.target
        loop = asyncio.get_running_loop()
        slot = _Connecting()
        target.owned.add(slot)
        delay = RETRY_FIRST
        try:
            while True:
                try:
                    backend = await self.connector(self)
                    if backend.closed or backend.forgotten:
                        backend.close()
                        raise BackendUnavailable("the database closed the connection right after login")
                    break
                except ProxyError as exc:
                    self.stats.connect_failures += 1
                    target.last_connect_failure = exc.message
                    if not connect_retryable(exc):
                        raise
                    if loop.time() + delay >= deadline:
                        raise self.timed_out() from None
                    if delay == RETRY_FIRST:
                        log.warning("pool %s: cannot open a backend connection (%s); retrying until the borrow "
                                    "timeout", self.name, exc.message)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, RETRY_MAX)
        except BaseException:
            target.owned.discard(slot)
            target.capacity_freed()
            raise
        target.owned.discard(slot)
        target.owned.add(backend)
        target.last_connect_failure = ""
        self.stats.opened += 1
        self.busy.add(backend)
        return backend

    # --- giving back ---

    def release(self, backend: Backend) -> None:
        """Take back a clean, idle backend (ReadyForQuery idle / no transaction open)."""
        self.busy.discard(backend)
        if backend.closed:
            self._forget(backend)
            return
        now = time.monotonic()
        if now - backend.created_at > self.settings.max_connection_lifetime:
            backend.close()
            self._forget(backend)
            return
        backend.idle_since = now
        if self.waiters and not self._yields_to_another_pool():
            self.busy.add(backend)  # lent on at once, in line order
            if self.wake_one(backend):
                self.stats.borrows += 1
                return
            self.busy.discard(backend)
        target = self.target
        if target.open_connections >= target.max_connections and self._others_waiting():
            backend.close()  # give the slot to a pool that waits
            self._forget(backend)
            return
        self.idle.append(backend)

    def _yields_to_another_pool(self) -> bool:
        """With every slot taken, whether another pool of the target has a live waiter who came before this
        pool's first one (then the backend is closed below, and the slot goes to the pool that waited longest)."""
        target = self.target
        if target.open_connections < target.max_connections:
            return False
        mine = self.waiting_since()
        for pool in self.target.pools.values():
            if pool is not self and pool.waiters:
                waiters = pool.waiters
                while waiters and not waiters[0].waiting():
                    waiters.popleft()
                if waiters and waiters[0].waiting_since < mine:
                    return True
        return False

    def _others_waiting(self) -> bool:
        """Whether a live waiter stands in another pool's line (gone ones are dropped from the front)."""
        for pool in self.target.pools.values():
            if pool is not self:
                waiters = pool.waiters
                while waiters and not waiters[0].waiting():
                    waiters.popleft()
                if waiters:
                    return True
        return False

    def discard(self, backend: Backend) -> None:
        """Drop a broken or unwanted backend."""
        backend.close()
        self.busy.discard(backend)
        self._forget(backend)

    def _forget(self, backend: Backend) -> None:
        """Called once per backend when it leaves the pool for good."""
        if backend.forgotten:
            return
        backend.forgotten = True
        if backend in self.idle:
            self.idle.remove(backend)
        self.busy.discard(backend)
        target = self.target
        if backend in target.owned:
            target.owned.discard(backend)
            self.stats.closed += 1
            target.capacity_freed()

    # --- maintenance ---

    def maintain(self, now: float) -> None:
        """Close idle backends past their lifetime or beyond the idle limit (oldest idle first)."""
        lifetime = self.settings.max_connection_lifetime
        for backend in list(self.idle):
            if backend.closed or now - backend.created_at > lifetime:
                self.discard(backend)
        target = self.target
        excess = target.idle_count() - target.max_idle
        while excess > 0 and self.idle and now - self.idle[0].idle_since > 1.0:
            self.discard(self.idle[0])
            excess -= 1
        if self.waiters:
            self.expire_waiters(now)

    def expire_waiters(self, now: float) -> None:
        """Tell waiters whose borrow timeout has passed (the janitor calls this once a second)."""
        limit = now - self.settings.connection_borrow_timeout
        expired = [w for w in self.waiters if w.waiting_since <= limit]
        if expired:
            for waiter in expired:
                self.waiters.remove(waiter)
            for waiter in expired:
                waiter.expire()

    def close_all(self) -> None:
        for backend in list(self.idle) + list(self.busy):
            self.discard(backend)
        while self.waiters:
            waiter = self.waiters.popleft()
            if isinstance(waiter, _FutureWaiter) and not waiter.future.done():
                waiter.future.set_exception(ProxyError("pool closed"))
