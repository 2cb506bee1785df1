"""A PostgreSQL client of an endpoint with a query cache: cached reads answered without a backend, the replies
of cacheable reads kept, and writes (simple or extended) invalidating what read their tables.

Only endpoints with cache rules or hints make their clients of this class (decided once per connection); the
others run PostgresClient unchanged."""

from __future__ import annotations

from typing import Any

from proxy.cache.cache import EndpointCache, Plan
from proxy.cache.gate import ReplyGate
from proxy.cache.pg_batch import Batch as Request
from proxy.cache.pg_batch import unnamed_batch
from proxy.cache.pg_replies import PgReplyCapture
from proxy.pool.pg_backend import PostgresBackend
from proxy.protocol.pg import extended as ext
from proxy.protocol.pg import messages as pg
from proxy.session.pg_client import PostgresClient
from proxy.session.pg_forward import BIND_BYTE, FUNCTION_CALL_BYTE, PARSE_BYTE, QUERY_BYTE, PgForward
from proxy.session.pg_service import PostgresService

READY_IDLE = pg.READY_FOR_QUERY_IDLE


class CachedPostgresClient(PostgresClient):
    """PostgresClient with the query cache of its endpoint (see the module's docstring)."""

    def __init__(self, service: PostgresService, cache: EndpointCache) -> None:
        super().__init__(service)
        self.cache = cache
        self._looked_up: tuple[Request, Plan] | None = None  # a request and its plan, looked up and missed
        self._declined = b""  # the last Query text no rule or hint names
        self._capture: tuple[Plan, PgReplyCapture] | None = None  # the replies being kept
        self._written: set[str] = set()  # tables written in the transaction in progress
        self._statement_writes: dict[bytes, frozenset[str]] = {}  # statement name -> tables it writes
        self._gate = ReplyGate()  # replies wait while Redis takes a transaction's invalidations
        self._gate.closed = lambda: self.closed

    # --- reads: answered from the cache while no backend is linked ---

    def _dispatch_unlinked(self) -> None:
        if not self._answer_cached():
            super()._dispatch_unlinked()

    def _answer_cached(self) -> bool:
        """Answer the held Queries (and unnamed extended-query batches) the cache has, in order; True when the
        rest waits for a lookup or nothing is left (no backend needed for now)."""
        held = self._held
        cache = self.cache
        while len(held) >= 5 and not (self._aborted or self._to_sync or self._dropping):
            request = self._request(held)
            if request is None:
                return False
            plan = self._plan(request.text, request.extra)
            if plan is None:
                return False
            if not cache.synchronous:
                self._acquiring = self.loop.create_task(self._look_up(request, plan))
                return True
            value = cache.lookup_now(plan)
            if value is None:
                self._looked_up = (request, plan)
                return False
            self._answer(value, request)
        return not held

    def _request(self, held: bytearray) -> Request | None:
        """The Query or unnamed batch at the start of `held`, whole, if a rule or hint may cache it; else None."""
        kind = held[0]
        if kind != QUERY_BYTE and kind != PARSE_BYTE:
            return None
        length = int.from_bytes(held[1:5], "big")
        if length < 5 or len(held) < 1 + length or length > self.max_message:
            return None
        if kind == QUERY_BYTE:
            text = bytes(held[5:length])
            if self.cache.may_cache(text):
                return Request(1 + length, b"", text, b"")
            self._declined = text  # (not planned again when it is sent)
            return None
        if held[5] != 0 or not self.cache.may_cache(bytes(held[6 : held.find(b"\x00", 6, 1 + length)])):
            return None  # (a named statement, or a text no rule names)
        return unnamed_batch(held)

    async def _look_up(self, request: Request, plan: Plan) -> None:
        try:
            value = await self.cache.lookup(plan)
        finally:
            self._acquiring = None
        if self.closed:
            return
        if value is None:
            self._looked_up = (request, plan)
            PgForward._dispatch_unlinked(self)
            return
        self._answer(value, request)
        if self._held:
            self._dispatch_unlinked()

    def _answer(self, value: bytes, request: Request) -> None:
        self.stats.queries += 1
        if not (self._gate.shut and self._gate.held(value + READY_IDLE, self.write)):
            self.write(value + READY_IDLE)
        del self._held[: request.size]
        if request.parse_rest:
            self.statements.parse_answered(request.parse_rest)
        if self.peer_paused_us and not self._held:
            self.peer_paused_us = False
            self.transport.resume_reading()

    def _plan(self, text: bytes, extra: bytes = b"") -> Plan | None:
        """The plan of a cacheable request of this session; None while its settings may not be those the proxy
        knows (pinned, session pooling, a statement's changes not read back yet)."""
        session = self.session
        pool = self.pool
        if session.pins or self._state_dirty or pool is None or pool.session_mode:
            return None
        return self.cache.plan(text, session.user, session.database, session.settings, extra)

    # --- what passes to the backend: reads to keep, writes to note ---

    def _inspect(self, kind: int, body: bytes, backend: PostgresBackend) -> bytes | None:
        if kind == QUERY_BYTE:
            self._query_sent(body[:-1], backend)
        elif kind == PARSE_BYTE:
            self._parse_sent(body, backend)
        elif kind == BIND_BYTE:
            bound = self._statement_writes.get(ext.split_bind(body)[1])
            if bound:
                self._wrote(bound)
        elif kind == FUNCTION_CALL_BYTE:
            self._wrote(self.cache.everything(self.session.database))
        return super()._inspect(kind, body, backend)

    def _parse_sent(self, body: bytes, backend: PostgresBackend) -> None:
        looked_up, self._looked_up = self._looked_up, None
        name, rest = ext.split_parse(body)
        writes = self.cache.writes(ext.parse_query_text(rest), self.session.database)
        if writes:
            self._statement_writes[name] = writes
            return
        self._statement_writes.pop(name, None)
        if looked_up is not None and looked_up[0].parse_rest == rest and not name and self._may_keep(backend):
            self._capture = (looked_up[1], PgReplyCapture(self.cache.max_result, b"12", looked_up[0].described))

    def _may_keep(self, backend: PostgresBackend) -> bool:
        """The replies of the request sent now are its own and outside any transaction."""
        return not (self._capture is not None or self.pending or self.in_extended or backend.awaiting_replies
                    or backend.tx_status != pg.IDLE)

    def _query_sent(self, text: bytes, backend: PostgresBackend) -> None:
        looked_up, self._looked_up = self._looked_up, None
        writes = self.cache.writes(text, self.session.database)
        if writes:
            self._wrote(writes)
            return
        if not self._may_keep(backend):
            return  # (inside a transaction, or behind other requests: never kept)
        plan = looked_up[1] if looked_up is not None and looked_up[0].text == text and not looked_up[0].extra else None
        if plan is None:
            if text == self._declined:
                return
            plan = self._plan(text)
            if plan is None or not self.cache.synchronous:
                return
            self.cache.generations_now(plan)  # (the generations it is kept under; a backend was linked already)
        self._capture = (plan, PgReplyCapture(self.cache.max_result))

    def _wrote(self, names: frozenset[str]) -> None:
        """A write goes to the database: what read its tables goes now, and again when its transaction ends."""
        self.cache.bump(names)
        self._written |= names

    def deliver(self, out: bytes) -> None:
        capture = self._capture
        if capture is not None and capture[1].feed(out):
            self._capture = None
            result = capture[1].result
            if result is not None:
                self.cache.keep(capture[0], result)
        if self._written and out.endswith(READY_IDLE):  # before the client hears of the end of its writes
            self._transaction_wrote(forget=self.pending <= 1)  # (more requests out: again at the last one's end)
        if not (self._gate.shut and self._gate.held(out, self._pass_on)):
            super().deliver(out)

    def _pass_on(self, out: bytes) -> None:
        PgForward.deliver(self, out)

    def backend_ready(self, backend: PostgresBackend, count: int) -> None:
        super().backend_ready(backend, count)
        if self._written and self.pending <= 0 and backend.tx_status == pg.IDLE:
            self._transaction_wrote()

    def _transaction_wrote(self, forget: bool = True) -> None:
        """The writes noted are committed (or rolled back): what read their tables goes again (`forget`: they
        are all done; else some may still run and this is repeated at the end of the last)."""
        written = self._written
        if forget:
            self._written = set()
        self._gate.wait_for(self.cache.bump(written))

    def backend_lost(self, lost: Any, exc: Exception | None) -> None:
        self._capture = None
        if self._written:
            self._transaction_wrote()
        super().backend_lost(lost, exc)
