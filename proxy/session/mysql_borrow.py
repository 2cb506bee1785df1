"""A backend for a MySQL client: borrowed, given the client's session, linked, released between transactions."""

from __future__ import annotations

from proxy.errors import SHUTDOWN_TEXT, BackendUnavailable, ProxyError, ShuttingDown
from proxy.netio import ConnectionClosed
from proxy.pool.balance import no_eligible_instance
from proxy.pool.mysql_backend import MySQLBackend, MySQLServerError
from proxy.pool.pool import Pool
from proxy.protocol.mysql import constants as my
from proxy.session.causal_borrow import mariadb_ready
from proxy.session.mysql_inspect import FOUND_ROWS
from proxy.session.mysql_lifecycle import BUSY_FLAGS, log, release_backend
from proxy.session.mysql_settings import MySQLSessionTracking


class MySQLBorrowing(MySQLSessionTracking):
    """Borrows a backend when a command needs one, gives it the client's session, and releases it after."""

    async def _prepare_session(self) -> None:
        """Pick the pool; check the database once per pool; keep a backend from now on in session mode."""
        pool = self._use_pool(self.session.database)
        self.group_defaults = self._group_settings()
        self.session.settings.update(self.group_defaults)
        checked = {(name, body.decode("utf-8", "surrogateescape")) for name, body in self.group_defaults.items()}
        if not pool.session_mode and pool.stats.opened and checked <= pool.validated_settings:
            return
        backend = await self._borrow(pool)
        try:
            self.group_refused = None
            await self._sync(backend)
        except BaseException:
            pool.discard(backend)
            raise
        if self.group_refused is not None:  # the server's own error, to the client logging in
            pool.release(backend)
            raise MySQLServerError(self.group_refused)
        pool.validated_settings.update(checked)
        if pool.session_mode:
            self._link(backend)
        else:
            pool.release(backend)

    async def _borrow(self, pool: Pool) -> MySQLBackend:
        while True:
            self._borrowing = True
            try:
                backend = await pool.borrow()
            finally:
                self._borrowing = False
            assert isinstance(backend, MySQLBackend)
            if backend.buffered or backend.closed:  # the server said something while idle (e.g. a timeout)
                pool.discard(backend)
                continue
            return backend

    def _in_sync(self, backend: MySQLBackend) -> bool:
        return backend.serves(self.session, self.profile.charset, self.multi_statements)

    async def _sync(self, backend: MySQLBackend) -> None:
        """Give the backend this client's session (see MySQLBackend.apply_state). A session variable it refuses is
        dropped from the client's session with a log line; any other refusal raises MySQLServerError (the client's
        command gets it as its answer)."""
        await backend.apply_state(self.session, self.profile.charset, self.multi_statements,
                                  self.service.charset_command,
                                  lambda name, failure: self._state_refused(backend, name, failure))

    def _link(self, backend: MySQLBackend) -> None:
        self.backend = backend
        backend.link(self)

    def _need_backend(self) -> None:
        """The held command needs a backend: link an idle one at once, or borrow one in a task."""
        if self.service.draining:
            self.fail(ShuttingDown(SHUTDOWN_TEXT), logged=True)
            return
        pool = self.pool
        assert pool is not None
        if self.clock is not None:
            self.clock.waiting()
        if not self.service.group.single:  # the endpoint spreads its work: this transaction's instance
            chosen = self._work_pool()
            if chosen is None:  # no instance is eligible now: wait for one (at most the borrow timeout)
                self._busy = self.loop.create_task(self._acquire(None, wait=True))
                return
            pool = chosen
        idle = pool.borrow_idle()
        if idle is not None:
            assert isinstance(idle, MySQLBackend)
            if not idle.buffered and not idle.closed and self._in_sync(idle) and not self.service.endpoint.causal_reads:
                self._link(idle)
                self._resume()
                return
        self._busy = self.loop.create_task(self._acquire(idle if isinstance(idle, MySQLBackend) else None))

    def _work_pool(self) -> Pool | None:
        """The pool of the client's schema, user and profile on the instance the endpoint chooses for its next
        transaction (the client's pool from now on); None when no instance is eligible."""
        pool = self.pool
        assert pool is not None
        target = self.service.group.choose()
        if target is None:
            return None
        if target is not pool.target:
            pool.clients.discard(self)
            pool = self.pool = self.service.pool_for(pool.database, self.user, self.profile, target)
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

    async def _acquire(self, backend: MySQLBackend | None, wait: bool = False) -> None:
        try:
            pool = await self._wait_work_pool() if wait else self.pool
        except ProxyError as exc:
            self._busy = None
            self.fail(exc)
            return
        assert pool is not None
        try:
            if backend is not None and (backend.buffered or backend.closed):
                pool.discard(backend)
                backend = None
            if backend is None:
                backend = await self._borrow(pool)
            try:
                await self._sync(backend)
            except BaseException:
                pool.discard(backend)
                raise
            if self.service.endpoint.causal_reads:  # read-your-writes: the replica catches up, else the writer serves
                backend = await mariadb_ready(self.service, backend, self._sync, self.profile, self.peer)
        except MySQLServerError as exc:  # the server refused the client's session state: its command's answer
            self._busy = None
            self._refuse_held(exc)
            return
        except ProxyError as exc:
            self._busy = None
            self.fail(exc)
            return
        except ConnectionClosed:
            self._busy = None
            self.fail(BackendUnavailable("the database connection was lost while preparing the session"))
            return
        self._busy = None
        if self.closed:
            backend.pool.release(backend)
            return
        self._link(backend)
        self._resume()

    def _refuse_held(self, error: ProxyError) -> None:
        """Answer the held command (it waited for a backend) with `error`, drop it, and go on with the rest."""
        held = self._held
        length = held[0] | (held[1] << 8) | (held[2] << 16) if len(held) >= 4 else 0
        if length >= my.MAX_PACKET or self.closed:
            self.fail(error)
            return
        log.info("client %s: its session could not be prepared for its command: %s [%d]", self.peer, error.message,
                 error.mysql_errno)
        self._send_error(error, 1)
        stop = 4 + length
        if stop <= len(held):
            del held[:stop]
        else:
            self._drop = stop - len(held)
            held.clear()
        self._resume()

    def _resume(self) -> None:
        """Process the client bytes held while a backend was borrowed or a command was handled here."""
        if self.peer_paused_us:
            self.peer_paused_us = False
            self.transport.resume_reading()
        if self._held and not self.closed:
            data = bytes(self._held)
            self._held.clear()
            self._walk(data)

    def backend_progress(self, backend: MySQLBackend) -> None:
        """Responses completed (or the server asks for a LOCAL INFILE upload)."""
        tracker = backend.tracker
        if tracker.expects_local_infile:
            self._infile = True
            self._cont = False
            self._seq = (tracker.last_seq + 1) & 0xFF
            return
        if tracker.seen_status & my.SERVER_STATUS_DB_DROPPED:
            self._schema_changed(backend, "")
        if self._stalled:
            if backend.idle:
                self._stalled = False
                self._resume()
            return
        self._release_if_done(backend)

    def _release_if_done(self, backend: MySQLBackend) -> None:
        """Transaction mode: back to the pool once nothing runs, no transaction is open and nothing pins it."""
        if (not backend.idle or self._skip or self._cont or self._infile or self._partial or self.kills_in_flight
                or self._stalled or self.backend is not backend):
            return
        if self._hold_next:
            if self._hold_next == 1:  # SET TRANSACTION / SQL_CALC_FOUND_ROWS: the next statement runs here too
                return
            self._hold_next = 0  # that statement is done
        if FOUND_ROWS in self.session.pins and backend.tracker.row_sets:  # a later result set replaced FOUND_ROWS()
            self._unpin(FOUND_ROWS, None)
        if backend.tracker.status_flags & BUSY_FLAGS or self.session.pins or self.cursors or self.long_data:
            return
        pool = backend.pool
        if pool.session_mode:
            return
        self.session.autocommit = backend.autocommit
        self.backend = None
        backend.unlink()
        pool.stats.transactions += 1
        if backend.schema != pool.database:  # a USE moved it: put it back first
            self.loop.create_task(self._clean_up(backend))
            return
        release_backend(backend)

    def kill_settled(self) -> None:
        backend = self.backend
        if backend is not None and not self.kills_in_flight:
            self._release_if_done(backend)
