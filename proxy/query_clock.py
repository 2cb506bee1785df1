"""Times one client's requests, from their arrival to the end of their reply, into the statement statistics."""

from __future__ import annotations

from collections import deque
from time import monotonic

from proxy.insights import Insights
from proxy.sql_digest import Digester

UNKNOWN = "(unknown)"  # a request whose statement the proxy did not see (a function call, a Sync with no Bind)
MAX_PENDING = 1024  # requests awaiting their reply beyond this (a runaway pipeline) are dropped from the timing
MAX_NAMED = 4096  # prepared statement names remembered per client beyond this are forgotten all at once


class QueryClock:
    """A client's requests in flight: (statement, started, waited) in the order their replies come.

    The engine's forwarder calls request() as a request goes to the backend (at a Query, a Sync, a COM_QUERY, a
    COM_STMT_EXECUTE) and done() as replies end (ReadyForQuery, the end of a MySQL response). A request that had to
    wait for a backend starts at `wait_started`: its time includes the wait, which is also counted apart."""

    __slots__ = ("current", "database", "digest", "endpoint", "executing", "insights", "named", "pending", "user",
                 "wait_started")

    def __init__(self, insights: Insights, digester: Digester, user: str, database: str, endpoint: str) -> None:
        self.insights = insights
        self.digest = digester.digest
        self.user = user
        self.database = database
        self.endpoint = endpoint
        self.pending: deque[tuple[str | None, float, float]] = deque()  # None: a request not counted
        self.named: dict[bytes, str] = {}  # prepared statement name (or id) -> its statement's digest
        self.current = UNKNOWN  # the statement the next Sync runs (the last parsed or bound)
        self.wait_started = 0.0  # when the client's next request began waiting for a backend (0: it is not)
        self.executing = False  # an Execute was sent since the last Sync

    def waiting(self) -> None:
        """The client's bytes wait for a backend from now (kept if already waiting)."""
        if not self.wait_started:
            self.wait_started = monotonic()

    def synced(self) -> None:
        """A Sync went out: it times the statement executed before it; one that executed nothing (a prepare, a
        describe) is not counted, as the server's own statistics do not count it."""
        self.request(self.current if self.executing else None)
        self.executing = False

    def request(self, statement: str | None) -> None:
        now = monotonic()
        started = self.wait_started
        if started:
            self.wait_started = 0.0
            waited = now - started
        else:
            started = now
            waited = 0.0
        pending = self.pending
        if len(pending) >= MAX_PENDING:
            pending.clear()
        pending.append((statement, started, waited))

    def query(self, text: bytes) -> None:
        """A request of this SQL text went out."""
        self.request(self.digest(text))

    def prepared(self, name: bytes, text: bytes) -> str:
        """A statement prepared under `name`: what a later execution of it counts as."""
        named = self.named
        if len(named) >= MAX_NAMED:
            named.clear()
        statement = named[name] = self.digest(text)
        return statement

    def done(self, count: int, errors: int, rows: int) -> None:
        """`count` requests got the end of their reply; `errors` and `rows` came with them (counted on the first)."""
        pending = self.pending
        now = monotonic()
        entry = self.insights.entry
        while count and pending:
            count -= 1
            statement, started, waited = pending.popleft()
            if statement is None:
                continue
            entry((statement, self.user, self.database, self.endpoint)).add(now - started, waited, rows, errors > 0)
            errors = rows = 0
