"""A PostgreSQL client's settings and pins: what it wants on any backend, noticed as it changes, read back after."""

from __future__ import annotations

import logging
import re

from proxy.errors import BackendUnavailable, ProxyError
from proxy.netio import ConnectionClosed
from proxy.pool.pg_backend import PostgresBackend
from proxy.pool.pool import Pool
from proxy.protocol import sql_words
from proxy.protocol.pg import messages as pg
from proxy.session.pg_databases import close_idle_backends, database_ddl_target
from proxy.session.pg_service import PostgresService
from proxy.session.pg_session import PgSession
from proxy.session.pg_statements import Statements

log = logging.getLogger(__name__)

# Words that may start or end session state a backend cannot carry to another client (checked in C, per query).
_SESSION_ALTERNATIVES = (rb"set|reset|set_config|discard|listen|unlisten|temp|temporary|advisory|hold|load|prepare|"
                         rb"deallocate|close|drop|rename|role|session|pg_advisory_\w*")
SESSION_WORDS = re.compile(rb"(?i)\b(?:" + _SESSION_ALTERNATIVES + rb")\b")
FOLDED_SESSION_WORDS = sql_words.spaced(_SESSION_ALTERNATIVES)  # the same words, in folded text (the hot path)
VARIABLE_WORDS = frozenset({b"set", b"reset", b"set_config", b"role", b"session"})
DISCARD_ALL = re.compile(rb"(?i)\bdiscard\s+all\b")
LOAD = re.compile(rb"(?i)^\s*load\s")


def has_session_words(text: bytes | bytearray) -> bool:
    """Whether `text` holds one of SESSION_WORDS (a fast pass over its folded form)."""
    return FOLDED_SESSION_WORDS.search(sql_words.folded(text)) is not None

# Read back after a transaction that used SESSION_WORDS: settings made in the session, and state that pins.
SESSION_STATE_QUERY = (
    "SELECT name, setting FROM pg_settings WHERE source = 'session'"
    " UNION ALL SELECT '!listen', count(*)::text FROM pg_listening_channels()"
    " UNION ALL SELECT '!temp', count(*)::text FROM pg_class WHERE relnamespace = pg_my_temp_schema()"
    " UNION ALL SELECT '!advisory', count(*)::text FROM pg_locks"
    " WHERE pid = pg_backend_pid() AND locktype = 'advisory'"
    " UNION ALL SELECT '!hold', count(*)::text FROM pg_cursors WHERE is_holdable"
    " UNION ALL SELECT '!prepare', count(*)::text FROM pg_prepared_statements WHERE from_sql"
)
PIN_REASONS = {"!listen": "LISTEN", "!temp": "temporary table", "!advisory": "session advisory lock",
               "!hold": "cursor WITH HOLD", "!prepare": "SQL PREPARE"}
STICKY_PINS = frozenset({"LOAD"})  # no catalog shows it: pinned until the client leaves

FIXED_PARAMETERS = pg.READ_ONLY_PARAMETERS
# Reported parameters an operator sets in a server's configuration to demote it (a reload reports the new value
# to every session): reported while the client changed nothing in its session, they are the server's, not the
# client's, and do not follow the client to another backend (or to the next writer after a failover).
SERVER_CONFIGURED = frozenset({"default_transaction_read_only"})


class PgSettings(PgSession):
    """Keeps `session.settings` and `session.pins` equal to what the client's session has on a direct server."""

    def __init__(self, service: PostgresService) -> None:
        super().__init__(service)
        self.statements = Statements(self, self.session)

    def _init_wanted(self, pool: Pool, requested: dict[str, str]) -> None:
        session = self.session
        session.settings = {k: v for k, v in pool.server_params.items() if k not in FIXED_PARAMETERS}
        session.settings.update(requested)
        session.settings_id = pool.settings_id(session.settings)

    async def _sync_settings(self, backend: PostgresBackend) -> None:
        """Make the backend's session the client's (its settings: the difference only)."""
        await backend.apply_state(self.session)

    def server_reported(self, name: str, value: str) -> None:
        """A ParameterStatus passed through from the backend: the client's session has that setting now."""
        if name not in FIXED_PARAMETERS and (name not in SERVER_CONFIGURED or self._state_dirty):
            self.session.settings[name] = value
            backend = self.backend
            if backend is not None:  # the reporting backend has it already
                backend.state_is(self.session)

    async def _read_session(self, backend: PostgresBackend) -> bool:
        """After a transaction that may have changed session state: read it back into `session` (settings, pins).
        False when the backend failed meanwhile (then it is dropped and the client failed)."""
        pool = backend.pool
        try:
            rows = await backend.simple_query(SESSION_STATE_QUERY)
        except (ProxyError, ConnectionClosed, OSError) as exc:
            self._acquiring = None
            pool.discard(backend)
            self.fail(BackendUnavailable(f"the database connection failed: {exc}"))
            return False
        reported = pool.server_params
        session = self.session
        wanted = session.settings
        settings = {str(name): value or "" for name, value in rows if name and not name.startswith("!")}
        for name in [n for n in wanted if n not in reported]:
            del wanted[name]
        backend.settings_read(settings)
        for name, value in settings.items():
            if name not in reported and name not in FIXED_PARAMETERS:
                wanted[name] = value
        backend.state_is(session)
        pins = {PIN_REASONS[name] for name, count in rows if name in PIN_REASONS and count not in (None, "0")}
        self._pins_are(pins | (set(session.pins) & STICKY_PINS), backend)
        return True

    def _pins_are(self, reasons: set[str], backend: PostgresBackend) -> None:
        """The session's pin reasons as read back from `backend`."""
        pins = self.session.pins
        before = set(pins)
        for reason in reasons - before:
            self.session.pin(reason)
            self.stats.pinned(reason)
            log.info("client %s pinned to backend %s: %s", self.peer, backend, reason)
        for reason in before - reasons:
            self.session.unpin(reason)
        if before and not reasons:
            self.stats.unpinned()
            log.info("client %s unpinned: its session state is gone", self.peer)
        elif reasons and not before:
            self.stats.pinned_now += 1

    def _pin(self, reason: str) -> None:
        session = self.session
        if reason not in session.pins:
            if not session.pins:
                self.stats.pinned_now += 1
            session.pin(reason)
            self.stats.pinned(reason)
            log.info("client %s pinned to its backend: %s", self.peer, reason)

    def note_session_words(self, sql: bytes) -> None:
        """A statement whose text may change session state runs (again): read the state back afterwards."""
        self._note_session_words(sql)

    def _note_session_words(self, sql: bytes) -> None:
        database = database_ddl_target(sql)
        if database is not None:  # the server refuses while the pool keeps idle sessions on that database
            close_idle_backends([pool for target in self.service.group.all() for pool in target.pools.values()],
                                database)
        if self.service.exclude_variable_sets and all(
            word.lower() in VARIABLE_WORDS for word in SESSION_WORDS.findall(sql)
        ):
            return  # the user chose not to track SETs: they stay on whichever backend ran them
        self._state_dirty = True
        if DISCARD_ALL.search(sql):
            self.statements.forget_all(self.backend)
        if LOAD.match(sql):
            self._pin("LOAD")
