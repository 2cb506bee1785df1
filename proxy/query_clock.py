"""Times one client's requests, from their arrival to the end of their reply: the endpoint's latency histograms
and, when they are on, the statement statistics."""

from __future__ import annotations

from bisect import bisect_left
from collections import deque
from time import monotonic

from proxy.insights import Insights, StatementStats
from proxy.sql_digest import Digester
from proxy.sql_logging import log_statement
from proxy.stats import METRIC_BOUNDS, EndpointStats

UNKNOWN = "(unknown)"  # a request whose statement the proxy did not see or does not name (statistics off)
NOT_A_STATEMENT = ""  # a request that runs nothing (a Sync after a Parse only): not counted
MAX_PENDING = 1024  # requests awaiting their reply beyond this (a runaway pipeline) are dropped from the timing
MAX_NAMED = 4096  # prepared statement names remembered per client beyond this are forgotten all at once


class QueryClock:
    """A client's requests in flight: (statement, started, waited) in the order their replies come.

    The engine's forwarder calls request() as a request goes to the backend (a Query, a Sync, a COM_QUERY, a
    COM_STMT_EXECUTE) and done() as replies end (ReadyForQuery, the end of a MySQL response). A request that had to
    wait for a backend starts at `wait_started`: its time includes the wait, which is also counted apart."""

    __slots__ = ("_last", "_last_stats", "current", "database", "digest", "endpoint", "executing", "insights",
                 "latest", "named", "peer", "pending", "stats", "user", "wait_started")

    def __init__(self, stats: EndpointStats, insights: Insights | None, digester: Digester, user: str,
                 database: str, peer: str = "") -> None:
        self.stats = stats
        self.peer = peer
        self.insights = insights
        self.digest = digester.digest if insights is not None else None  # (None: statistics off, no digests)
        self.user = user
        self.database = database
        self.endpoint = str(stats.labels.get("endpoint", ""))
        # (statement, started, waited, its text when the client sent one: a Query, a COM_QUERY)
        self.pending: deque[tuple[str, float, float, bytes | None]] = deque()
        self.named: dict[bytes, str] = {}  # prepared statement name (or id) -> its statement's digest
        self.current = UNKNOWN  # the statement the next Sync runs (the last parsed or bound)
        self.wait_started = 0.0  # when the client's next request began waiting for a backend (0: it is not)
        self.executing = False  # an Execute was sent since the last Sync
        self.latest = 0.0  # when the latest request went out (monotonic; 0: none yet)
        self._last = NOT_A_STATEMENT  # the statement counted last, and its statistics (most clients repeat one)
        self._last_stats: StatementStats | None = None

    def waiting(self) -> None:
        """The client's bytes wait for a backend from now (kept if already waiting)."""
        if not self.wait_started:
            self.wait_started = monotonic()

    def synced(self) -> None:
        """A Sync went out: it times the statement executed before it; one that executed nothing (a prepare, a
        describe) is not counted, as the server's own statistics do not count it."""
        self.request(self.current if self.executing else NOT_A_STATEMENT)
        self.executing = False

    def request(self, statement: str, text: bytes | None = None) -> None:
        now = self.latest = monotonic()
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
        pending.append((statement, started, waited, text))

    def query(self, text: bytes) -> None:
        """A request of this SQL text went out."""
        digest = self.digest
        self.request(UNKNOWN if digest is None else digest(text), text)

    def parsed(self, name: bytes, text: bytes) -> None:
        """A Parse (statistics on): the statement the next Sync runs, and for a named one what it executes."""
        self.current = self.prepared(name, text) if name else self.digest(text)  # type: ignore[misc]

    def prepared(self, name: bytes, text: bytes) -> str:
        """A statement prepared under `name`: what a later execution of it counts as."""
        named = self.named
        if len(named) >= MAX_NAMED:
            named.clear()
        digest = self.digest
        statement = named[name] = UNKNOWN if digest is None else digest(text)
        return statement

    def done(self, count: int, errors: int, rows: int, backend: object = None) -> None:
        """`count` requests got the end of their reply; `errors` and `rows` came with them (counted on the first)."""
        if self.stats.sql_log_until:
            self._log_sql(count, errors, rows, backend)
        pending = self.pending
        now = monotonic()
        stats = self.stats
        total, database = stats.query_latency, stats.database_latency
        while count and pending:
            count -= 1
            statement, started, waited, _ = pending.popleft()
            if not statement:
                continue
            seconds = now - started
            stats.queries += 1
            total.counts[bisect_left(METRIC_BOUNDS, seconds)] += 1  # (Histogram.observe, inline: once per query)
            total.total += seconds
            database.counts[bisect_left(METRIC_BOUNDS, seconds - waited)] += 1
            database.total += seconds - waited
            if errors:
                stats.query_errors += 1
            if self.insights is not None:
                entry = self._last_stats
                if statement is not self._last or entry is None or entry.evicted:
                    entry = self._last_stats = self.insights.entry((statement, self.user, self.database,
                                                                    self.endpoint))
                    self._last = statement
                entry.add(seconds, waited, rows, errors > 0)
            errors = rows = 0


    def _log_sql(self, count: int, errors: int, rows: int, backend: object) -> None:
        """Enhanced SQL logging: the texts of the requests answered now, with their timing (until it expires)."""
        stats = self.stats
        now = monotonic()
        if now >= stats.sql_log_until:
            stats.sql_log_until = 0.0
            return
        pending = self.pending
        for index in range(min(count, len(pending))):
            statement, started, _, text = pending[index]
            if statement:
                log_statement(self.peer, self.user, self.database, self.endpoint, backend,
                              text if text is not None else statement.encode(), now - started,
                              rows if index == 0 else 0, errors > 0 and index == 0)

