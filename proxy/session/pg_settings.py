"""A PostgreSQL client's settings and pins: what it wants on any backend, noticed as it changes, read back after."""

from __future__ import annotations

import logging
import re

from proxy.errors import BackendError, BackendUnavailable, ProxyError
from proxy.netio import ConnectionClosed
from proxy.parameter_groups import dynamic_of, rebased
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


def quote(value: str) -> str:
    """A string literal (standard_conforming_strings, as the proxy's own queries assume)."""
    return "'" + value.replace("'", "''") + "'"


VALUES_LIMIT = 10_000  # learned parameter group values a pool keeps (bounded; cleared when full)


async def server_forms(backend: PostgresBackend, values: dict[str, str]) -> dict[str, str]:
    """Each value as the server keeps it (pg_settings.setting), set for a moment in an implicit transaction that
    ends at once; BackendError (the server's SQLSTATE) when it refuses a name or value."""
    sets = ", ".join(f"set_config({quote(name)}, {quote(value)}, true)" for name, value in values.items())
    names = ", ".join(quote(name.lower()) for name in values)
    rows = await backend.simple_query(
        f"SELECT {sets}; SELECT name, setting FROM pg_settings WHERE lower(name) IN ({names})")
    spelled = {name.lower(): name for name in values}
    return {spelled[str(name).lower()]: value or "" for name, value in rows[1:] if name}


class PgSettings(PgSession):
    """Keeps `session.settings` and `session.pins` equal to what the client's session has on a direct server."""

    def __init__(self, service: PostgresService) -> None:
        super().__init__(service)
        self.statements = Statements(self, self.session)
        self.group_defaults: dict[str, str] = {}  # its parameter group's dynamic values (under its own settings)
        self._group_pending = False  # a reload changed its group: learn and take the new values at the next borrow

    def _init_wanted(self, pool: Pool, requested: dict[str, str]) -> None:
        session = self.session
        session.settings = {k: v for k, v in pool.server_params.items() if k not in FIXED_PARAMETERS}
        self.group_defaults = self._group_values(pool) or {}
        session.settings.update(self.group_defaults)
        session.settings.update(requested)
        session.settings_id = pool.settings_id(session.settings)

    def _group_values(self, pool: Pool) -> dict[str, str] | None:
        """The client's parameter group values in the server's form, None while one is not learned yet."""
        learned = pool.group_values
        wanted = dynamic_of(self.service.settings, self.session.user, pool.server_params)
        if any((name, value) not in learned for name, value in wanted.items()):
            return None
        return {name: learned[name, value] for name, value in wanted.items()}

    def _group_known(self, pool: Pool) -> bool:
        return self._group_values(pool) is not None

    async def _learn_group(self, pool: Pool, backend: PostgresBackend) -> None:
        """Learn the server's form of the client's group values (BackendError with the server's own SQLSTATE and
        message when it refuses one)."""
        wanted = dynamic_of(self.service.settings, self.session.user, pool.server_params)
        missing = {name: value for name, value in wanted.items() if (name, value) not in pool.group_values}
        if not missing:
            return
        try:
            found = await server_forms(backend, missing)
        except BackendError as exc:
            raise BackendError(f"parameter group of user {self.session.user}: {exc.message}", exc.sqlstate) from None
        if len(pool.group_values) >= VALUES_LIMIT:
            pool.group_values.clear()
        pool.group_values.update(((name, value), found.get(name, value)) for name, value in missing.items())

    def parameter_group_changed(self) -> None:
        """A reload changed the client's parameter group: its next borrow takes the new values (see _sync_settings)."""
        self._group_pending = True
        self.session.settings_id = -1  # no backend has it: the next borrow syncs

    def _keep_group_pending(self) -> None:
        """A group change waits for the client's next borrow: no backend is in its state until then."""
        if self._group_pending:
            self.session.settings_id = -1

    async def _rebase_group(self, backend: PostgresBackend) -> None:
        """The settings the client left at its group's default take the group's new values; those it set itself
        stay. Values the server refuses leave the client's settings as they were (logged)."""
        self._group_pending = False
        pool = backend.pool
        try:
            await self._learn_group(pool, backend)
        except BackendError as exc:
            log.error("client %s keeps its previous parameter values: %s", self.peer, exc.message)
        else:
            new = self._group_values(pool) or {}
            rebased(self.session.settings, self.group_defaults, new, pool.server_params)
            self.group_defaults = new
        self.session.settings_id = pool.settings_id(self.session.settings)

    async def _sync_settings(self, backend: PostgresBackend) -> None:
        """Make the backend's session the client's (its settings: the difference only)."""
        if self._group_pending:
            await self._rebase_group(backend)
        await backend.apply_state(self.session)

    def server_reported(self, name: str, value: str) -> None:
        """A ParameterStatus passed through from the backend: the client's session has that setting now."""
        if name not in FIXED_PARAMETERS and (name not in SERVER_CONFIGURED or self._state_dirty):
            self.session.settings[name] = value
            backend = self.backend
            if backend is not None:  # the reporting backend has it already
                backend.state_is(self.session)
                self._keep_group_pending()

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
        self._keep_group_pending()
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
