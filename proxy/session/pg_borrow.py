"""A PostgreSQL client between transactions: borrowing a backend, giving it the session, releasing or holding it."""

from __future__ import annotations

import asyncio
import logging
import time

from proxy.errors import SHUTDOWN_TEXT, BackendError, BackendUnavailable, ProxyError, ShuttingDown
from proxy.netio import ConnectionClosed
from proxy.pool.balance import no_eligible_instance
from proxy.pool.pg_backend import PostgresBackend
from proxy.pool.pg_deadline import cancel_in_background, expire
from proxy.pool.pool import Backend, Pool
from proxy.protocol.pg import messages as pg
from proxy.session import pg_sequences as seq
from proxy.session.causal_borrow import postgres_ready
from proxy.session.pg_settings import PgSettings

log = logging.getLogger(__name__)

# Failures of the settings sync that are the backend's, not the client's (a timeout another client left on it, a
# backend that died while idle): the client is given another backend, up to SYNC_ATTEMPTS times in all.
NOT_THE_CLIENTS = frozenset({"57014", "57P01", "57P02", "57P03"})
SYNC_ATTEMPTS = 3


class PgBorrow(PgSettings):
    """Gets the client a backend in its session's state when it starts work, and gives it back when it is done."""

    def _forward(self, data: bytes, backend: PostgresBackend) -> None:
        raise NotImplementedError  # (PgForward)

    def _dispatch_unlinked(self) -> None:
        raise NotImplementedError  # (PgForward)

    def resume_held(self, backend: PostgresBackend) -> None:
        raise NotImplementedError  # (PgForward)

    def _take_held(self) -> bytes:
        """What the client sent while it had no backend, taken to be sent to the one it gets (PgReplay records it)."""
        data = bytes(self._held)
        self._held.clear()
        return data

    def _transaction_done(self) -> None:
        """Nothing runs or is open on the backend any more (PgReplay starts its record afresh)."""

    # --- getting a backend ---

    def _start_work(self) -> None:
        """Get a backend for the held messages: at once when one is idle, else wait in line (no task)."""
        if self.service.draining:
            self.fail(ShuttingDown(SHUTDOWN_TEXT), logged=True)
            return
        pool = self.pool
        assert pool is not None
        backend = None
        if not pool.session_mode:
            self._seq_words = seq.words_in(self._held, self.statements.named)
        reserved, self._reserved = self._reserved, None
        if reserved is not None and not reserved.closed:
            backend = reserved  # kept for this client's sequence values
        elif self.seq_backend is not None and seq.reads_values(self._seq_words):  # lastval()/currval(): go back
            backend = seq.take_if_unused(pool, self.seq_backend, self.seq_use)
            if backend is None:
                log.info("client %s: the backend of its previous transaction has served another client since; "
                         "lastval()/currval() will report no value", self.peer)
        if backend is None:
            if not self.service.group.single:  # the endpoint spreads its work: this transaction's instance
                chosen = self._work_pool()
                if chosen is None:  # no instance is eligible now: wait for one (at most the borrow timeout)
                    self._acquiring = self.loop.create_task(self._acquire(None, None))
                    return
                pool = chosen
            backend = pool.borrow_idle()  # type: ignore[assignment]
        if backend is not None:
            self._got(backend)
        elif pool.can_open():
            self._acquiring = self.loop.create_task(self._acquire(pool, None))
        else:
            self._queued = True
            self.waiting_since = time.monotonic()
            pool.queue(self)

    def _got(self, backend: PostgresBackend) -> None:
        if backend.in_state_of(self.session) and not backend.buffered and not self.service.endpoint.causal_reads:
            self._attach(backend)
        else:  # settings to apply first, or a causal read to wait for
            assert self.pool is not None
            self._acquiring = self.loop.create_task(self._acquire(self.pool, backend))

    def hand(self, backend: Backend | None) -> bool:
        """The pool's call while this client waits in line: a backend, or a free slot (None)."""
        if not self._queued or self.closed:
            return False
        self._queued = False
        if backend is None:
            assert self.pool is not None
            self._acquiring = self.loop.create_task(self._acquire(self.pool, None))
        else:
            self._got(backend)  # type: ignore[arg-type]
        return True

    def waiting(self) -> bool:
        return self._queued and not self.closed

    def expire(self) -> None:
        self._queued = False
        assert self.pool is not None
        self.fail(self.pool.timed_out())

    def _work_pool(self) -> Pool | None:
        """The pool of the client's database and user on the instance the endpoint chooses for its next
        transaction (the client's pool from now on); None when no instance is eligible."""
        pool = self.pool
        assert pool is not None
        target = self.service.group.choose()
        if target is None:
            return None
        if target is not pool.target:
            pool.clients.discard(self)
            pool = self.pool = self.service.pool_for(pool.database, pool.user, target)
            pool.clients.add(self)
        return pool

    async def _wait_work_pool(self) -> Pool:
        """Wait (at most the borrow timeout) until an instance is eligible; its pool, else the borrow timeout."""
        assert self.pool is not None
        timeout = self.pool.settings.connection_borrow_timeout
        self._borrowing = True
        try:
            await self.service.group.wait(timeout)
        finally:
            self._borrowing = False
        pool = self._work_pool()
        if pool is None:
            raise no_eligible_instance(self.service.group, self.pool, timeout)
        return pool

    async def _acquire(self, pool: Pool | None, backend: PostgresBackend | None) -> None:
        try:
            if pool is None:
                pool = await self._wait_work_pool()
            attempts = SYNC_ATTEMPTS
            while True:
                if backend is None or backend.buffered:
                    if backend is not None:  # the server said something while idle (e.g. it is shutting down)
                        pool.discard(backend)
                    backend = await self._borrow(pool)
                try:
                    await self._sync_settings(backend)
                    break
                except (BackendError, BackendUnavailable, ConnectionClosed) as exc:
                    pool.discard(backend)
                    attempts -= 1
                    if attempts == 0 or (isinstance(exc, BackendError) and exc.sqlstate not in NOT_THE_CLIENTS):
                        raise
                    log.info("client %s: backend %s failed while taking the client's settings (%s); trying another",
                             self.peer, backend, exc)
                    backend = None
                except BaseException:
                    pool.discard(backend)
                    raise
            if self.service.endpoint.causal_reads:  # read-your-writes: the replica catches up, else the writer serves
                backend = await postgres_ready(self.service, backend, self._sync_settings, self.peer)
        except ProxyError as exc:  # includes a setting the server refuses now
            self._acquiring = None
            self.fail(exc)
            return
        except ConnectionClosed:
            self._acquiring = None
            self.fail(ProxyError("the database connection was lost while preparing the session"))
            return
        self._acquiring = None
        if self.closed:
            backend.pool.release(backend)
            return
        self._attach(backend)

    async def _borrow(self, pool: Pool) -> PostgresBackend:
        self._borrowing = True
        try:
            backend = await pool.borrow()
        finally:
            self._borrowing = False
        assert isinstance(backend, PostgresBackend)
        if backend.buffered:  # the server said something while idle (e.g. it is shutting down)
            pool.discard(backend)
            return await self._borrow(pool)
        return backend

    def _attach(self, backend: PostgresBackend) -> None:
        """Link a ready backend and send it what the client sent meanwhile."""
        self.backend = backend
        backend.link(self)
        data = self._take_held()
        if not backend.pool.session_mode:  # sequence values: only this client's on this session from now on
            discard, hold = seq.attach(backend, self.process_id, self._seq_words)
            self._seq_words = set()
            if discard:
                backend.send(discard)
            self._seq_hold = hold and self.service.settings.sequence_hold > 0
            self.seq_backend, self.seq_use = backend, backend.uses
        if self.peer_paused_us:
            self.peer_paused_us = False
            self.transport.resume_reading()
        self._forward(data, backend)

    # --- giving it back ---

    def backend_ready(self, backend: PostgresBackend, count: int) -> None:
        """ReadyForQuery passed through: give the backend back when the client's work on it is done."""
        self.pending -= count
        if self.pending <= 0:
            self._release_if_done(backend)

    def _release_if_done(self, backend: PostgresBackend) -> None:
        """Transaction mode: back to the pool once nothing is running, pending or half-sent."""
        if (self.in_extended or backend.tx_status != pg.IDLE or self._skip or self._partial or backend.awaiting_replies
                or self._message is not None or not backend.at_boundary or self._checking):
            return
        self.pending = 0
        self._transaction_done()
        pool = backend.pool
        if self._state_dirty and not pool.session_mode:
            self._state_dirty = False
            self._hold_for_sequences(backend, allowed=False)
            self.backend = None
            backend.unlink()
            self._acquiring = self.loop.create_task(self._inspect_session(backend))
            return
        if pool.session_mode or self.session.pins:
            return
        if self._hold_for_sequences(backend, allowed=True):
            return
        self.backend = None
        backend.unlink()
        pool.stats.transactions += 1
        pool.release(backend)

    async def _inspect_session(self, backend: PostgresBackend) -> None:
        """After a transaction that may have changed session state: read it back, then release or pin."""
        if not await self._read_session(backend):
            return
        self._acquiring = None
        if backend.notifications and not self.closed:  # they came while the proxy read the session back
            self.write(backend.take_notifications(self.process_id))
        if self.closed:
            self._return_after_client(backend)
        elif self.session.pins:
            self._attach(backend)
        else:
            pool = backend.pool
            pool.stats.transactions += 1
            pool.release(backend)
            if self._held:
                self._dispatch_unlinked()

    def _return_after_client(self, backend: PostgresBackend) -> None:
        """Give a backend back after its client left: clean at once, cleaned up first, or dropped.

        A backend is reused only when the server is known to be at a message boundary both ways and idle:
        a client that left in the middle of a message costs its backend (the server still waits for the rest,
        which must never come from another client)."""
        pool = backend.pool
        if self._checking and not backend.closed:  # replies to a statement check are on their way: not reusable
            log.info("client %s left during a statement check; dropping %s", self.peer, backend)
            pool.discard(backend)
            return
        running = self.pending > 0 or backend.awaiting_replies
        mid_message = self._mid_message_on_backend()
        if running or backend.closed or mid_message or not backend.at_boundary:
            if not backend.closed:
                if mid_message:
                    log.warning("client %s left in the middle of a message; closing %s (never reused)",
                                self.peer, backend)
                else:
                    log.warning("client %s left while a query was running; cancelling it and dropping %s",
                                self.peer, backend)
                if running:
                    cancel_in_background(backend)
            pool.discard(backend)
            return
        pins = self.session.pins
        if pins and not pool.session_mode:  # LISTEN, temporary tables, locks...: no other client may inherit
            log.info("client %s left with its session pinned (%s); closing %s", self.peer,
                     ", ".join(sorted(pins)), backend)
            self.stats.unpinned()
            pool.discard(backend)
            return
        if not self.in_extended and backend.tx_status == pg.IDLE and not pool.session_mode and not self._state_dirty:
            pool.stats.transactions += 1
            pool.release(backend)
            return
        log.info("client %s left inside a transaction or session; cleaning %s before reuse", self.peer, backend)
        self.loop.create_task(self._clean_up(backend))

    async def _clean_up(self, backend: PostgresBackend) -> None:
        pool = backend.pool
        timeout = pool.settings.internal_query_timeout
        try:
            async with asyncio.timeout(timeout):  # each query has this deadline too; this bounds the whole
                if self.in_extended:
                    backend.write(pg.message(b"S"))
                    while (await backend.read_typed())[0] != ord("Z"):
                        pass
                if backend.tx_status != pg.IDLE or self.in_extended:
                    await backend.simple_query("ROLLBACK")
                if pool.session_mode and pool.settings.reset_query:
                    await backend.simple_query(pool.settings.reset_query)
                    backend.session_reset()
                elif self._state_dirty:  # its SETs, temporary tables or locks must reach no other client
                    await backend.simple_query("DISCARD ALL")
                    backend.session_reset()
        except TimeoutError:
            expire(backend, timeout)
            pool.discard(backend)
            return
        except (ProxyError, ConnectionClosed, OSError) as exc:
            log.info("backend %s could not be cleaned after its client left (%s); dropping it", backend, exc)
            pool.discard(backend)
            return
        pool.release(backend)

    # --- holding it for sequence values (see pg_sequences) ---

    def _hold_for_sequences(self, backend: PostgresBackend, allowed: bool) -> bool:
        """At a transaction's end: whether the client keeps its backend (reserved, unlinked) because its next
        transaction may read a sequence value (lastval()/currval() live in the server session)."""
        if not self._seq_hold and self._seq_holding is None and not self._seq_hold_over:
            return False  # (the common case, at once)
        writer = self._seq_hold and backend.seq_owner == self.process_id
        self._seq_hold = False
        active = self._seq_holding is not None or self._seq_hold_over
        now = self.loop.time()
        if writer and active and backend.pool.waiters and now - self._seq_hold_since > seq.HOLD_LIMIT_SECONDS:
            writer = False  # others wait: the hold is not renewed any more
        if allowed and not backend.pool.target.paused and (writer or self._seq_holding is not None):
            if not active:
                self.stats.pinned_now += 1
                self.stats.pinned(seq.HOLD_REASON)
                self._seq_hold_since = now
            if writer:
                if self._seq_holding is not None:
                    self._seq_holding.cancel()
                self._seq_hold_over = False
                self._seq_holding = self.loop.call_later(self.service.settings.sequence_hold, self._sequence_hold_over,
                                                           backend)
            self.backend = None
            backend.unlink()
            self._reserved = backend
            return True
        if active:
            if self._seq_holding is not None:
                self._seq_holding.cancel()
                self._seq_holding = None
            self._seq_hold_over = False
            self.stats.unpinned()
        return False

    def end_sequence_hold(self) -> None:
        """Give back at once a backend kept idle for sequence values (its target is held for a switchover)."""
        if self._reserved is not None and self._seq_holding is not None:
            self._seq_holding.cancel()
            self._sequence_hold_over(self._reserved)

    def _sequence_hold_over(self, backend: PostgresBackend) -> None:
        """The hold's time is up: a reserved backend goes back to the pool, a busy one at its transaction's end."""
        self._seq_holding = None
        if self._reserved is backend:
            self._reserved = None
            self.stats.unpinned()
            backend.pool.stats.transactions += 1
            backend.pool.release(backend)
        elif self.backend is backend and not self.closed:
            self._seq_hold_over = True
        else:
            self.stats.unpinned()
