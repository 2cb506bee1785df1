"""A MySQL client of an endpoint with a query cache: cached COM_QUERY results answered without a backend, the
responses of cacheable reads kept, and writes (text or binary protocol) invalidating what read their tables.

Only endpoints with cache rules or hints make their clients of this class (decided once per connection); the
others run MySQLClient unchanged."""

from __future__ import annotations

from typing import Any

from proxy.cache.cache import EndpointCache, Plan
from proxy.cache.gate import ReplyGate
from proxy.pool.mysql_backend import MySQLBackend
from proxy.protocol.mysql import constants as my
from proxy.protocol.mysql.packets import ResponseTracker
from proxy.protocol.mysql.statements import LAST_PREPARED, statement_id
from proxy.session.mysql_client import MySQLClient
from proxy.session.mysql_inspect import FORWARD, Inspection
from proxy.session.mysql_lifecycle import State
from proxy.session.mysql_service import MySQLService

NOT_KEPT = my.SERVER_STATUS_IN_TRANS | my.SERVER_MORE_RESULTS_EXISTS | my.SERVER_SESSION_STATE_CHANGED
ROWS_SIZE = 8  # a stored value starts with the result's row count (FOUND_ROWS() after a hit)
EXECUTES = (my.COM_STMT_EXECUTE, my.COM_STMT_BULK_EXECUTE)


class CachedMySQLClient(MySQLClient):
    """MySQLClient with the query cache of its endpoint (see the module's docstring)."""

    def __init__(self, service: MySQLService, cache: EndpointCache) -> None:
        super().__init__(service)
        self.cache = cache
        self._pass: Any = self.replies  # where replies went before (the replay recorder, or None: the socket)
        self.replies = self._replies_seen
        self._looked_up: tuple[bytes, Plan] | None = None
        self._capture: tuple[Plan, bytearray] | None = None
        self._written: set[str] = set()
        self._gate = ReplyGate()
        self._gate.closed = lambda: self.closed

    # --- reads: answered from the cache while no backend is linked ---

    def _need_backend(self) -> None:
        if not self._answer_cached():
            super()._need_backend()

    def _answer_cached(self) -> bool:
        """Answer the first held command if it is a COM_QUERY the cache has; True when it was (or a lookup runs)."""
        held = self._held
        if len(held) < 5 or held[3] != 0 or held[4] != my.COM_QUERY:
            return False
        length = held[0] | (held[1] << 8) | (held[2] << 16)
        if length >= my.MAX_PACKET or len(held) < 4 + length:
            return False
        text = bytes(held[5 : 4 + length])
        plan = self._plan(text)
        if plan is None:
            return False
        if not self.cache.synchronous:
            self._busy = self.loop.create_task(self._look_up(text, plan, length))
            return True
        value = self.cache.lookup_now(plan)
        if value is None:
            self._looked_up = (text, plan)
            return False
        self._answer(value, length)
        return True

    async def _look_up(self, text: bytes, plan: Plan, length: int) -> None:
        try:
            value = await self.cache.lookup(plan)
        finally:
            self._busy = None
        if self.closed:
            return
        if value is None:
            self._looked_up = (text, plan)
            MySQLClient._need_backend(self)
            return
        self._answer(value, length)

    def _answer(self, value: bytes, length: int) -> None:
        self.stats.queries += 1
        self.found_rows = int.from_bytes(value[:ROWS_SIZE], "little")
        self.row_count = -1
        if not (self._gate.shut and self._gate.held(value[ROWS_SIZE:], self.write)):
            self.write(value[ROWS_SIZE:])
        del self._held[: 4 + length]
        self._resume()

    def _plan(self, text: bytes) -> Plan | None:
        session = self.session
        pool = self.pool
        if session.pins or not session.autocommit or self._hold_next or pool is None or pool.session_mode:
            return None
        state: dict[str, object] = {**session.settings, "\x00capabilities": self.capabilities,
                                    "\x00profile": repr(self.profile), "\x00multi": self.multi_statements}
        return self.cache.plan(text, session.user, session.database, state)

    # --- what passes to the backend: reads to keep, writes to note ---

    def data_received(self, data: bytes) -> None:
        if self._capture is not None and self.state is State.READY:
            self._capture = None  # another command while one is kept: its replies would mix in
        super().data_received(data)

    def _inspect(self, command: int, scan: bytes, pos: int, head: int) -> Inspection:
        inspection = super()._inspect(command, scan, pos, head)
        backend = self.backend
        if command == my.COM_QUERY and inspection.action == FORWARD and backend is not None:
            length = scan[pos] | (scan[pos + 1] << 8) | (scan[pos + 2] << 16)
            self._query_sent(scan[pos + 5 : pos + 4 + head], length == head, backend)
        elif self._capture is not None:
            self._capture = None
        return inspection

    def _statement_command(self, command: int, scan: bytes, pos: int, length: int, head: int,
                           start: int) -> tuple[int, int] | None:
        self._capture = None
        if command in EXECUTES and length >= 5:
            number = statement_id(scan, pos + 4)
            if number == LAST_PREPARED:
                number = self._last_prepared
            statement = self.session.statements.get(number)
            writes = (self.cache.writes(statement.sql, self.session.database) if statement is not None
                      else self.cache.everything(""))
            if writes:
                self._wrote(writes)
        return super()._statement_command(command, scan, pos, length, head, start)

    def _query_sent(self, text: bytes, whole: bool, backend: MySQLBackend) -> None:
        looked_up, self._looked_up = self._looked_up, None
        self._capture = None
        database = self.session.database
        writes = self.cache.writes(text, database) if whole else self.cache.everything(database)
        if writes:
            self._wrote(writes)
            return
        if (not whole or not backend.idle or backend.tracker.status_flags & my.SERVER_STATUS_IN_TRANS
                or not backend.autocommit):
            return
        plan = looked_up[1] if looked_up is not None and looked_up[0] == text else None
        if plan is None:
            plan = self._plan(text)
            if plan is None or not self.cache.synchronous:
                return
            self.cache.generations_now(plan)
        self._capture = (plan, bytearray())

    def _wrote(self, names: frozenset[str]) -> None:
        self.cache.bump(names)
        self._written |= names

    # --- replies ---

    def _replies_seen(self, data: bytes) -> None:
        capture = self._capture
        if capture is not None:
            capture[1].extend(data)
            if len(capture[1]) > self.cache.max_result:
                self._capture = None
        backend = self.backend
        if (self._written and backend is not None and backend.tracker.done and not backend.queue
                and not backend.tracker.status_flags & my.SERVER_STATUS_IN_TRANS):
            written, self._written = self._written, set()
            self._gate.wait_for(self.cache.bump(written))  # before the client hears of the end of its writes
        if not (self._gate.shut and self._gate.held(data, self._pass_on)):
            self._pass_on(data)

    def _pass_on(self, data: bytes) -> None:
        if self._pass is not None:
            self._pass(data)
        else:
            self.transport.write(data)

    def backend_progress(self, backend: MySQLBackend) -> None:
        capture = self._capture
        tracker = backend.tracker
        if capture is not None and tracker.done and not tracker.expects_local_infile:
            self._capture = None
            if _complete_result(tracker):
                self.cache.keep(capture[0], tracker.rows.to_bytes(ROWS_SIZE, "little") + bytes(capture[1]))
        super().backend_progress(backend)

    def backend_lost(self, lost: Any, exc: Exception | None) -> None:
        self._capture = None
        if self._written:
            written, self._written = self._written, set()
            self.cache.bump(written)
        super().backend_lost(lost, exc)


def _complete_result(tracker: ResponseTracker) -> bool:
    """One result set with rows, no error, warning or session change, outside a transaction."""
    return (tracker.error is None and tracker.result_sets == 1 and tracker.row_sets == 1 and not tracker.warnings
            and tracker.session_state is None and not tracker.status_flags & NOT_KEPT
            and tracker.command == my.COM_QUERY)
