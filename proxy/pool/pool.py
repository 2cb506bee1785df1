"""Pools of backend connections per (database, user), sharing one connection budget per database target that can
be re-pointed, resized and paused at runtime."""

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
from proxy.stats import TargetStats

log = logging.getLogger(__name__)

# A backend connect that fails because the server is away or (re)starting is retried until the borrow timeout,
# first after RETRY_FIRST seconds, the wait doubling up to RETRY_MAX.
RETRY_FIRST = 0.05
RETRY_MAX = 1.0
# Server refusals that mean "not now" rather than "never": starting up or shutting down, admin shutdown, too many
# connections (PostgreSQL SQLSTATEs; MySQL errnos 1040 too many connections, 1053 server shutdown, 1927 killed).
RETRY_SQLSTATES = frozenset({"57P01", "57P03", "53300"})
RETRY_MYSQL_ERRNOS = frozenset({1040, 1053, 1927})
# Connect failures that suggest the server itself is gone or going (not merely busy): the target reports trouble.
TROUBLE_SQLSTATES = frozenset({"57P01", "57P02", "57P03"})
TROUBLE_MYSQL_ERRNOS = frozenset({1053})
# How a trouble reason starts when the server refused a write as read-only: a sign of a demoted writer where writes
# belong (a read_write endpoint), the normal answer of a reader elsewhere. Other reasons: "shutdown error ...",
# "connect to ... failed", "a backend connection ... was lost".
READ_ONLY_TROUBLE = "read-only error"


def connect_retryable(exc: BaseException) -> bool:
    """Whether a failed backend connect may work when tried again shortly (the server is away or restarting)."""
    if isinstance(exc, BackendUnavailable):
        return exc.transient
    if isinstance(exc, BackendError):
        return exc.sqlstate in RETRY_SQLSTATES or exc.mysql_errno in RETRY_MYSQL_ERRNOS
    return False


def connect_trouble(exc: BaseException) -> bool:
    """Whether a failed backend connect suggests the server is down or shutting down (refused, reset, timed out,
    admin shutdown, starting up), as opposed to busy (too many connections) or misconfigured (auth, TLS)."""
    if isinstance(exc, BackendUnavailable):
        return exc.transient
    if isinstance(exc, BackendError):
        return exc.sqlstate in TROUBLE_SQLSTATES or exc.mysql_errno in TROUBLE_MYSQL_ERRNOS
    return False


class Backend(Protocol):
    """What the pool needs of a backend connection, whatever its engine."""

    closed: bool
    forgotten: bool  # set by the pool once the backend has left it for good
    created_at: float
    idle_since: float
    generation: int  # the target's generation when its address was read for this connection (set by the pool)

    @property
    def in_transaction(self) -> bool: ...

    @property
    def is_tls(self) -> bool: ...

    def close(self) -> None: ...


@dataclass
class Target:
    """A database server and the connection budget every pool on it shares.

    Every connect reads `host` and `port` here. `repoint` moves the target to another server: the generation goes
    up, whatever was learned from the old server is forgotten (the `on_repoint` hooks of the services, the pools'
    server parameters and validated settings, the limits once a new connection learns the new server's), idle
    connections of an older generation close at once and lent-out ones when they are given back. `pause` holds new
    borrows (each waits at most the borrow timeout) until `resume`; connections already lent out go on. Two holders
    pause independently: the proxy itself (a cluster without a writer, a switchover) and the operator (PgBouncer's
    PAUSE); the target lends again once neither holds it. `reconnect` replaces every connection (idle ones now,
    lent-out ones when they are given back).
    """

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
    stats: TargetStats = field(default_factory=TargetStats, repr=False)  # the registry's part for its pools
    generation: int = 0  # goes up with every repoint (and every reconnect)
    held: bool = False  # paused by the proxy: no writer in the cluster, a switchover
    operator_paused: bool = False  # paused by the operator (`dbproxy pause`, the control API)
    # Called (no arguments) on every repoint: services drop what they learned from the old server.
    on_repoint: list[Callable[[], None]] = field(default_factory=list, repr=False)
    # Called with a reason when traffic shows the server may be gone or no longer the writer (a refused
    # connect, a lost backend, a read-only or shutdown error): the topology monitor probes at once.
    on_trouble: list[Callable[[str], None]] = field(default_factory=list, repr=False)
    limits_generation: int = -1  # the generation whose server max_connections the limits come from
    shrinking: bool = False  # the limit was lowered below the open connections: close the excess when released
    server_max_connections: int = 0  # that server's max_connections (0: not learned yet)
    # Connects backing off after a failure: a repoint wakes them to try the new server at once.
    backing_off: set[asyncio.Future[None]] = field(default_factory=set, repr=False)

    @property
    def open_connections(self) -> int:
        return len(self.owned)

    def needs_limits(self, generation: int) -> bool:
        """Whether a connection of `generation` should learn the server's max_connections (the first one of the
        current generation does)."""
        return generation == self.generation and self.limits_generation < generation

    def resolve_limits(self, backend_max_connections: int, generation: int | None = None) -> None:
        """Turn percent settings into counts from the backend's max_connections (once per generation; until the
        first connection to a new server has learned its limit, the old limits stay)."""
        generation = self.generation if generation is None else generation
        if generation != self.generation or generation <= self.limits_generation:
            return
        self.limits_generation = generation
        self.server_max_connections = backend_max_connections
        self._resolve()

    def _resolve(self) -> None:
        usable = max(1, self.server_max_connections - self.settings.reserved_connections)
        total = resolve_count(self.settings.max_connections, usable)
        share = worker_count()  # each worker process gets its part of the budget
        self.max_connections = max(1, total // share)
        self.max_idle = min(self.max_connections, max(1, resolve_count(self.settings.max_idle_connections, usable)
                                                      // share))
        log.info("target %s: max %d backend connections, %d idle%s", self.name, self.max_connections, self.max_idle,
                 f" (this worker's share of {total})" if share > 1 else "")

    def repoint(self, host: str, port: int) -> None:
        """Point the target at another server (no client connection is closed)."""
        self.host, self.port = host, port
        self.generation += 1
        self.last_connect_failure = ""
        log.info("target %s: re-pointed to %s:%d (generation %d)", self.name, host, port, self.generation)
        for waiting in self.backing_off:
            if not waiting.done():
                waiting.set_result(None)
        for hook in list(self.on_repoint):
            hook()
        for pool in list(self.pools.values()):
            pool.validated_settings.clear()
            pool.group_values.clear()
            for backend in list(pool.idle):
                pool.discard(backend)  # frees its slot: a waiter connects to the new server

    def report_trouble(self, reason: str) -> None:
        """Traffic suggests this server failed or was demoted: tell whoever watches the topology."""
        for hook in list(self.on_trouble):
            try:
                hook(reason)
            except Exception:  # one watcher's bug must not break the client path that reported
                log.exception("target %s: trouble hook failed", self.name)

    def apply_settings(self, settings: PoolSettings) -> None:
        """New pool knobs: sizes follow at once (excess idle connections close now, excess lent-out ones when
        given back); timeouts and queries apply to what comes next. The pooling mode stays as it is."""
        if settings.mode is not self.settings.mode:
            log.warning("target %s: the pooling mode cannot change while running; it stays %s", self.name,
                        self.settings.mode)
            settings = settings.model_copy(update={"mode": self.settings.mode})
        self.settings = settings
        for pool in self.pools.values():
            pool.settings = settings
        if self.server_max_connections:
            self._resolve()
        self.shrinking = self.over_limit()
        excess_open = self.open_connections - self.max_connections if self.max_connections else 0
        excess_idle = self.idle_count() - self.max_idle if self.max_connections else 0
        while max(excess_open, excess_idle) > 0 and self._close_oldest_idle():
            excess_open -= 1
            excess_idle -= 1
        self._wake_waiters()

    def over_limit(self) -> bool:
        """Whether more connections are open than the limit allows (after it was lowered); stops `shrinking` once
        they are not."""
        if self.max_connections and self.open_connections > self.max_connections:
            return True
        self.shrinking = False
        return False

    def _close_oldest_idle(self) -> bool:
        owner: Pool | None = None
        for pool in self.pools.values():
            if pool.idle and (owner is None or pool.idle[0].idle_since < owner.idle[0].idle_since):
                owner = pool
        if owner is None:
            return False
        owner.discard(owner.idle[0])
        return True

    @property
    def paused(self) -> bool:
        return self.held or self.operator_paused

    def pause(self, operator: bool = False) -> None:
        """Hold new borrows until `resume` by the same holder (each still waits at most the borrow timeout)."""
        if operator:
            if not self.operator_paused:
                self.operator_paused = True
                log.info("target %s: paused by the operator", self.name)
        elif not self.held:
            self.held = True
            log.info("target %s: paused", self.name)

    def resume(self, operator: bool = False) -> None:
        """Let borrows go on (once no other holder pauses the target): waiters are served in the order they came,
        as backends and slots allow."""
        if operator:
            if not self.operator_paused:
                return
            self.operator_paused = False
            log.info("target %s: resumed by the operator", self.name)
        elif self.held:
            self.held = False
            log.info("target %s: resumed", self.name)
        else:
            return
        self._wake_waiters()

    def reconnect(self) -> None:
        """Replace every backend connection: idle ones close now, lent-out ones when they are given back (the
        generation goes up, as for a repoint to the same server); waiters open new ones."""
        self.generation += 1
        log.info("target %s: reconnecting every backend connection (generation %d)", self.name, self.generation)
        for pool in list(self.pools.values()):
            for backend in list(pool.idle):
                pool.discard(backend)

    def _wake_waiters(self) -> None:
        """Serve waiters oldest first: an idle backend of their pool, else a free slot to open one in."""
        if self.paused:
            return
        slots = max(0, self.limit - self.open_connections) + (self.idle_count() if self.max_connections else 0)
        while True:
            oldest: Pool | None = None
            for pool in self.pools.values():
                waiters = pool.waiters
                while waiters and not waiters[0].waiting():
                    waiters.popleft()
                if waiters and (oldest is None or waiters[0].waiting_since < oldest.waiting_since()):
                    oldest = pool
            if oldest is None:
                return
            backend = oldest.borrow_idle()
            if backend is not None:
                if not oldest.wake_one(backend):
                    oldest.release(backend)
                continue
            if slots <= 0:
                return
            slots -= 1
            oldest.wake_one(None)

    @property
    def limit(self) -> int:
        # Before the backend's limit is known, allow one connection to learn it.
        return self.max_connections or 1

    def remove(self, pool: Pool) -> None:
        """Drop an unused pool; its counters fold into the target's retired total (a total never goes down)."""
        if self.pools.get((pool.database, pool.user)) is pool:
            del self.pools[(pool.database, pool.user)]
        self.stats.retire(pool.stats)

    def relabel(self, stats: TargetStats) -> None:
        """Count under `stats` from now on (the target serves another instance): each pool's counters so far fold
        into the old instance's retired total, and it counts afresh under the new labels."""
        old, self.stats = self.stats, stats
        if stats is old:
            return
        for pool in self.pools.values():
            old.retire(pool.stats)
            pool.stats = stats.pool(pool.database, pool.user)
            pool.stats.gauges = pool._gauges

    def forget_unused_pools(self, now: float) -> None:
        """Drop the pools that have had no backend, no waiter and no client session for unused_pool_timeout
        seconds (the janitor calls this once a second): pools are made per database, user (and, for MySQL,
        client capabilities) as clients ask, so without this every name ever asked for would stay."""
        timeout = self.settings.unused_pool_timeout
        for pool in list(self.pools.values()):
            if not pool.unused():
                pool.unused_since = None
            elif pool.unused_since is None:
                pool.unused_since = now
            elif now - pool.unused_since >= timeout:
                self.remove(pool)

    def idle_count(self) -> int:
        return sum(len(p.idle) for p in self.pools.values())

    def capacity_freed(self) -> None:
        """A slot came free: wake the pool that has waited longest."""
        if self.paused:
            return
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


class PoolNaming:
    """The numbers of session-settings sets and the backend names of shared statements for one (database, user):
    shared by that key's pools on every instance of an endpoint, so a client's numbers and names mean the same
    on whichever instance its next transaction runs."""

    __slots__ = ("next_settings_id", "next_statement", "settings_ids", "statement_names")

    def __init__(self) -> None:
        self.settings_ids: dict[tuple[tuple[str, str], ...], int] = {}
        self.next_settings_id = itertools.count(1)
        self.statement_names: dict[tuple[bytes, int], bytes] = {}
        self.next_statement = itertools.count(1)


class Pool:
    """Idle backends in a LIFO stack; waiters in FIFO order; a backend is handed straight to a waiter."""

    def __init__(self, target: Target, database: str, user: str, connector: Connector,
                 naming: PoolNaming | None = None) -> None:
        self.target = target
        self.database = database
        self.user = user
        self.settings = target.settings
        self.mode = target.settings.mode
        self.connector = connector
        self.idle: list[Backend] = []
        self.busy: set[Backend] = set()
        self.waiters: deque[Waiter] = deque()
        self.stats = target.stats.pool(database, user)
        self.stats.gauges = self._gauges
        self.server_params: dict[str, str] = {}  # what the backend reported at login
        self.server_generation = -1  # the target generation whose server `server_params` come from
        self.validated_settings: set[tuple[str, str]] = set()
        # parameter group values as the server has them (pg_settings.setting: '3MB' -> '3072'), learned once each
        self.group_values: dict[tuple[str, str], str] = {}
        self.naming = naming if naming is not None else PoolNaming()
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
        naming = self.naming
        found = naming.settings_ids.get(key)
        if found is None:
            if len(naming.settings_ids) >= 10_000:  # bounded; numbers are never reused
                naming.settings_ids.clear()
            found = naming.settings_ids[key] = next(naming.next_settings_id)
        return found

    def statement_name(self, parse_rest: bytes, context: int = 0) -> bytes:
        """The backend name for a statement: shared by every client that prepares the same text and parameter
        types under the same name-resolution settings (`context`, a settings_id of those settings)."""
        key = (parse_rest, context)
        naming = self.naming
        name = naming.statement_names.get(key)
        if name is None:
            if len(naming.statement_names) >= 100_000:  # bounded; names are never reused
                naming.statement_names.clear()
            name = naming.statement_names[key] = b"dbproxy_%d" % next(naming.next_statement)
        return name

    def _gauges(self) -> dict[str, int]:
        busy = self.busy
        return {"open": len(self.idle) + len(busy), "borrowed": len(busy),
                "in_transaction": sum(1 for backend in busy if backend.in_transaction),
                "max_allowed": self.target.limit, "waiting": sum(1 for waiter in self.waiters if waiter.waiting())}

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
        if target.paused:
            return False
        return target.open_connections < target.limit or bool(target.max_connections and target.steal_idle(self))

    def timed_out(self) -> BorrowTimeout:
        self.stats.borrow_timeouts += 1
        failure = self.target.last_connect_failure
        return BorrowTimeout(
            f"timed out after {self.settings.connection_borrow_timeout:g} s waiting for a backend "
            f"connection (pool {self.name}: {len(self.busy)} in use, target limit {self.target.limit})"
            + ("; the target is paused" if self.target.paused else "")
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
        waited = loop.time() - started
        stats.wait_time += waited
        stats.borrow_wait.observe(waited)
        return backend

    def borrow_idle(self) -> Backend | None:
        """An idle backend at once, without waiting or connecting; None when there is none or the target is
        paused (then `borrow`)."""
        target = self.target
        if target.paused:
            return None
        idle = self.idle
        while idle:
            backend = idle.pop()
            if backend.closed or backend.generation != target.generation:
                self.discard(backend)
                continue
            self.busy.add(backend)
            self.stats.borrows += 1
            return backend
        return None

    def borrow_this(self, backend: Backend) -> bool:
        """Borrow `backend` itself when it is idle here and may be lent (not closed, of the target's generation,
        the target not paused); False otherwise."""
        if (self.target.paused or backend.closed or backend.generation != self.target.generation
                or backend not in self.idle):
            return False
        self.idle.remove(backend)
        self.busy.add(backend)
        self.stats.borrows += 1
        return True

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
                generation = target.generation  # the connector reads the address before its first await
                try:
                    backend = await self.connector(self)
                    if backend.closed or backend.forgotten:
                        backend.close()
                        raise BackendUnavailable("the database closed the connection right after login")
                    backend.generation = generation
                    if generation != target.generation:  # re-pointed meanwhile: connect to the new server
                        backend.forgotten = True
                        backend.close()
                        continue
                    break
                except ProxyError as exc:
                    self.stats.connect_failures += 1
                    target.last_connect_failure = exc.message
                    if delay == RETRY_FIRST and target.on_trouble and connect_trouble(exc):
                        target.report_trouble(f"connect to {target.host}:{target.port} failed: {exc.message}")
                    if not connect_retryable(exc):
                        raise
                    if loop.time() + delay >= deadline:
                        raise self.timed_out() from None
                    if delay == RETRY_FIRST:
                        log.warning("pool %s: cannot open a backend connection (%s); retrying until the borrow "
                                    "timeout", self.name, exc.message)
                    repointed = await self._back_off(delay)
                    delay = RETRY_FIRST if repointed else min(delay * 2, RETRY_MAX)  # a new server: a fresh backoff
        except BaseException:
            target.owned.discard(slot)
            target.capacity_freed()
            raise
        target.owned.discard(slot)
        target.owned.add(backend)
        target.last_connect_failure = ""
        self.stats.opened += 1
        if backend.is_tls:
            self.stats.opened_tls += 1
        self.busy.add(backend)
        return backend

    async def _back_off(self, delay: float) -> bool:
        """Wait `delay` seconds before the next connect attempt, or less when the target is re-pointed meanwhile
        (then True)."""
        target = self.target
        woken: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        target.backing_off.add(woken)
        try:
            done, _ = await asyncio.wait({woken}, timeout=delay)
            return bool(done)
        finally:
            target.backing_off.discard(woken)
            if not woken.done():
                woken.cancel()

    # --- giving back ---

    def release(self, backend: Backend) -> None:
        """Take back a clean, idle backend (ReadyForQuery idle / no transaction open)."""
        self.busy.discard(backend)
        if backend.closed:
            self._forget(backend)
            return
        target = self.target
        now = time.monotonic()
        if (backend.generation != target.generation or now - backend.created_at > self.settings.max_connection_lifetime
                or (target.shrinking and target.over_limit())):  # old server, too old, or over a lowered limit
            backend.close()
            self._forget(backend)
            return
        backend.idle_since = now
        if target.paused:
            self.idle.append(backend)
            return
        if self.waiters and not self._yields_to_another_pool():
            self.busy.add(backend)  # lent on at once, in line order
            if self.wake_one(backend):
                self.stats.borrows += 1
                return
            self.busy.discard(backend)
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
