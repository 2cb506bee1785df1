"""A MySQL backend's server session: what is set on it, the proxy's own commands, and applying a client's session."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from proxy.errors import BackendError, BackendUnavailable, ProtocolViolation
from proxy.pool.backend import BackendConnection
from proxy.pool.mysql_statements import BackendStatement, StatementCache
from proxy.protocol.mysql import constants as my
from proxy.protocol.mysql.effects import INTERNAL
from proxy.protocol.mysql.packets import ErrPacket, ResponseTracker, frame, read_lenenc_str

if TYPE_CHECKING:
    from proxy.pool.pool import Pool

log = logging.getLogger(__name__)

MAX_INTERNAL_PACKET = 64 * 1024 * 1024

# Run on every backend connection the server tracks session state for (again after each reset).
TRACK_SESSION_STATE = (b"SET session_track_system_variables='*', session_track_schema=ON, "
                       b"session_track_state_change=ON")
ENABLE_TRACKING = bytes((my.COM_QUERY,)) + TRACK_SESSION_STATE
# SET NAMES / character_set_* settings of a client's, applied over its login's character set
CHARSET_SETTINGS = ("character set", "character_set_client", "character_set_connection", "character_set_results",
                    "collation_connection")
INTERNAL_PLAIN = (INTERNAL, None)  # a command of the proxy's own whose response is swallowed


@dataclass(frozen=True, slots=True)
class Profile:
    """What a backend connection is opened with on behalf of its clients: relayed capabilities and charset."""

    capabilities: int
    charset: int


class MySQLServerError(BackendError):
    """An ERR packet from the server (login refused, internal command failed), with its own errno."""

    def __init__(self, packet: bytes) -> None:
        err = ErrPacket.parse(packet)
        super().__init__(err.message)
        self.mysql_errno = err.error_code
        self.mysql_sqlstate = err.sql_state or my.sqlstate_for(err.error_code)


class ClientState(Protocol):
    """The part of a client's session (proxy.session.state.SessionState) a server session is given."""

    @property
    def database(self) -> str: ...

    @property
    def autocommit(self) -> bool: ...

    @property
    def settings(self) -> Mapping[str, bytes]: ...

    @property
    def user_variables(self) -> Mapping[bytes, bytes]: ...


# Told of a part of a client's session the server refused: (setting name, or None for the character set; ERR).
Refused = Callable[[str | None, bytes], None]


class MySQLServerSession(BackendConnection):
    """The server session of one backend connection, as far as the proxy has set it or the server reported it."""

    def __init__(self, pool: Pool, profile: Profile) -> None:
        super().__init__(pool)
        self.profile = profile
        self.capabilities = 0  # negotiated with the server
        self.deprecate_eof = False
        self.tracker = ResponseTracker()
        self.schema = pool.database  # the server session's default database
        self.multi_statements = False
        self.charset = profile.charset  # the collation id the session's character_set_* follow (0: unknown)
        self.settings: dict[str, bytes] = {}  # session variables set on it (name -> SET body, in the order set)
        self.user_vars: dict[bytes, bytes] = {}  # user variables set on it to literals (lowercased name -> literal)
        self.last_insert_id = 0  # what LAST_INSERT_ID() returns on it, as far as OK packets told
        self.statements = StatementCache(pool.settings.max_prepared_statements)
        self.tracking_all = False  # session_track_system_variables='*' etc. are on (see TRACK_SESSION_STATE)

    @property
    def autocommit(self) -> bool:
        return bool(self.tracker.status_flags & my.SERVER_STATUS_AUTOCOMMIT)

    @property
    def tracks_session_state(self) -> bool:
        """The server reports every session variable, schema and state change (the proxy turned it on)."""
        return self.tracking_all

    def expect(self, command: int, effect: Any) -> None:
        """A command was sent: follow its response (after those still outstanding)."""
        raise NotImplementedError

    # --- awaited packets (login, internal commands; never while linked) ---

    async def read_packet(self, limit: int = MAX_INTERNAL_PACKET) -> tuple[int, bytes]:
        """One logical packet: (sequence id of its last frame, payload)."""
        parts: list[bytes] = []
        total = 0
        while True:
            header = await self.read_exact(4)
            length = header[0] | (header[1] << 8) | (header[2] << 16)
            total += length
            if total > limit:
                raise ProtocolViolation(f"server packet of {total} bytes exceeds {limit}")
            parts.append(await self.read_exact(length))
            if length < my.MAX_PACKET:
                return header[3], parts[0] if len(parts) == 1 else b"".join(parts)

    @contextlib.asynccontextmanager
    async def _internal_deadline(self) -> AsyncIterator[None]:
        """Bound a wait the proxy starts itself by the pool's internal_query_timeout: past it the backend is
        closed (its slot comes free) and BackendUnavailable is raised."""
        timeout = self.pool.settings.internal_query_timeout
        try:
            async with asyncio.timeout(timeout):
                yield
        except TimeoutError:
            log.warning("backend %s did not answer within %g s; closing it", self, timeout)
            self.abort()
            raise BackendUnavailable(f"the database did not answer within {timeout:g} s") from None

    async def command(self, payload: bytes) -> list[list[bytes | None]]:
        """Send a command the proxy itself needs and read its whole response; text rows of a result set.

        Raises MySQLServerError when the server answers with ERR.
        """
        assert self.client is None
        tracker = self.tracker
        self.write(frame(payload, 0))
        if tracker.start(payload[0], self.deprecate_eof):
            return []
        rows: list[list[bytes | None]] = []
        seen = 0
        async with self._internal_deadline():
            while True:
                _, packet = await self.read_packet()
                done = tracker.feed(packet)
                if tracker.rows != seen:
                    seen = tracker.rows
                    rows.append(_text_row(packet))
                if done:
                    break
        if tracker.error is not None and tracker.error_packet is not None:
            raise MySQLServerError(tracker.error_packet)
        return rows

    async def query(self, sql: str) -> list[list[bytes | None]]:
        return await self.command(bytes((my.COM_QUERY,)) + sql.encode())

    async def pipeline(self, payloads: list[bytes], failures: list[bytes | None] | None = None) -> None:
        """Send commands the proxy needs in one write and read all their responses (no rows kept).

        Raises MySQLServerError for the first that failed, after reading them all; with `failures`, fills it with
        each command's ERR packet (None: it succeeded) instead.
        """
        assert self.client is None
        tracker = self.tracker
        self.write(b"".join(frame(payload, 0) for payload in payloads))
        failure: bytes | None = None
        async with self._internal_deadline():
            for payload in payloads:
                if tracker.start(payload[0], self.deprecate_eof):
                    if failures is not None:
                        failures.append(None)
                    continue
                while True:
                    _, packet = await self.read_packet()
                    if tracker.feed(packet):
                        break
                if failures is not None:
                    failures.append(tracker.error_packet if tracker.error is not None else None)
                elif failure is None and tracker.error is not None:
                    failure = tracker.error_packet
        if failure is not None:
            raise MySQLServerError(failure)

    def forget_session(self) -> None:
        """The server session was reset: no settings, user variables or prepared statements any more."""
        self.settings = {}
        self.user_vars = {}
        self.last_insert_id = 0
        self.statements.clear()
        # MariaDB's reset goes back to the character set of the login; whether MySQL's does is not relied on
        self.charset = self.profile.charset if self.reset_keeps(self.profile.charset) else 0

    def reset_keeps(self, charset: int) -> bool:
        """Whether a COM_RESET_CONNECTION leaves the session in character set `charset` (MariaDB's goes back to
        the login's)."""
        return charset == self.profile.charset and not self.capabilities & my.CLIENT_MYSQL

    def reset_commands(self) -> list[bytes]:
        """COM_RESET_CONNECTION and what puts the proxy's own session settings back afterwards."""
        if self.tracking_all:
            return [bytes((my.COM_RESET_CONNECTION,)), ENABLE_TRACKING]
        return [bytes((my.COM_RESET_CONNECTION,))]

    async def reset(self) -> None:
        """COM_RESET_CONNECTION (rolls back, drops session state), then the pool's reset query and schema."""
        try:
            await self.pipeline(self.reset_commands())
        finally:
            self.forget_session()
        pool = self.pool
        if pool.settings.reset_query:
            await self.query(pool.settings.reset_query)
        if self.schema != pool.database and pool.database:
            await self.command(bytes((my.COM_INIT_DB,)) + pool.database.encode())
            self.schema = pool.database

    # --- a client's session, given to this server session ---

    def serves(self, state: ClientState, charset: int, multi_statements: bool) -> bool:
        """This server session is the client's already: nothing to give it."""
        return (self.charset == charset and self.schema == state.database and self.autocommit == state.autocommit
                and self.multi_statements == multi_statements and self.settings == state.settings
                and self.user_vars == state.user_variables)

    async def apply_state(self, state: ClientState, charset: int, multi_statements: bool,
                          charset_command: Callable[[int], bytes], refused: Refused) -> None:
        """Give this server session a client's character set, session variables, user variables, default database,
        autocommit and multi-statements, in one round trip (two when it must be reset first).

        A session variable (or the character set) the server refuses goes to `refused`, and the session keeps what
        it had; any other refusal raises MySQLServerError."""
        wanted = state.settings
        if any(name not in wanted for name in self.settings):
            try:  # back to the defaults, then the client's
                await self.pipeline(self.reset_commands())
            finally:
                self.forget_session()
        names: list[str | None] = []  # the setting each command gives (None: the character set)
        commands = self._charset_and_settings(wanted, charset, charset_command, names)
        commands += self._state_commands(state, multi_statements)
        if not commands:
            return
        failures: list[bytes | None] = []
        await self.pipeline(commands, failures)
        failure: bytes | None = None
        applied = dict(wanted)
        for number, error in enumerate(failures):
            if error is None:
                continue
            if number >= len(names):
                failure = failure or error
                continue
            setting = names[number]
            if setting is None:  # the character set: this session's is not known any more
                charset = 0
            else:
                applied.pop(setting, None)
                before = self.settings.get(setting)
                if before is not None:  # what the session still has (the next client resets it)
                    applied[setting] = before
            refused(setting, error)
        self.charset = charset
        self.settings = applied
        if failure is not None:
            raise MySQLServerError(failure)
        self.user_vars = dict(state.user_variables)
        if state.database:
            self.schema = state.database
        self.multi_statements = multi_statements

    def _charset_and_settings(self, wanted: Mapping[str, bytes], charset: int,
                              charset_command: Callable[[int], bytes], names: list[str | None]) -> list[bytes]:
        commands: list[bytes] = []
        if self.charset != charset:  # the login's character set moves with the client, like any setting
            commands.append(charset_command(charset))
            names.append(None)
            for name in CHARSET_SETTINGS:  # what the client set over it goes on top again
                self.settings.pop(name, None)
        if self.settings != wanted:
            for name, body in wanted.items():
                if self.settings.get(name) != body:
                    commands.append(bytes((my.COM_QUERY,)) + b"SET " + body)
                    names.append(name)
        return commands

    def _state_commands(self, state: ClientState, multi_statements: bool) -> list[bytes]:
        commands: list[bytes] = []
        user_vars, wanted = self.user_vars, state.user_variables
        if user_vars != wanted:
            assignments = [b"@" + name + b"=NULL" for name in user_vars if name not in wanted]
            assignments += [b"@" + name + b"=" + value for name, value in wanted.items()
                            if user_vars.get(name) != value]
            commands.append(bytes((my.COM_QUERY,)) + b"SET " + b", ".join(assignments))
        if self.schema != state.database and state.database:
            commands.append(bytes((my.COM_INIT_DB,)) + state.database.encode("utf-8", "surrogateescape"))
        if self.autocommit != state.autocommit:
            commands.append(bytes((my.COM_QUERY,)) + b"SET autocommit=%d" % state.autocommit)
        if self.multi_statements != multi_statements:
            option = my.MYSQL_OPTION_MULTI_STATEMENTS_OFF if not multi_statements else 0
            commands.append(bytes((my.COM_SET_OPTION, option, 0)))
        return commands

    # --- what the linked client's commands changed ---

    def setting_applied(self, name: str, body: bytes) -> None:
        """A session variable was set (by the client's command): last in the order set."""
        settings = self.settings
        settings.pop(name, None)
        settings[name] = body

    def setting_dropped(self, name: str) -> None:
        self.settings.pop(name, None)

    def user_variable_set(self, name: bytes, value: bytes | None) -> None:
        """A user variable was set to a literal (None: to NULL)."""
        if value is None:
            self.user_vars.pop(name, None)
        else:
            self.user_vars[name] = value

    def schema_changed(self, schema: str) -> None:
        self.schema = schema

    def multi_statements_set(self, on: bool) -> None:
        self.multi_statements = on

    def insert_id_seen(self, value: int) -> None:
        """LAST_INSERT_ID() says `value` here now (-1: a value the proxy does not know)."""
        self.last_insert_id = value

    def insert_id_command(self, value: int) -> bytes:
        """The frame that gives this session LAST_INSERT_ID() `value` (b"": it has it); its response is swallowed."""
        if value == self.last_insert_id:
            return b""
        self.expect(my.COM_QUERY, INTERNAL_PLAIN)
        self.last_insert_id = value
        return frame(b"\x03DO LAST_INSERT_ID(%d)" % value)

    def session_reset(self, charset: int | None) -> None:
        """The client's COM_RESET_CONNECTION ran here; `charset`: the character set the proxy put back after it."""
        self.forget_session()
        if charset is not None:
            self.charset = charset

    # --- prepared statements (see proxy.pool.mysql_statements) ---

    def statement(self, key: bytes) -> BackendStatement | None:
        """The statement of that key prepared here (now the most recently used), or None."""
        return self.statements.get(key)

    def statement_entry(self, key: bytes) -> BackendStatement | None:
        """The statement of that key prepared here, without touching its place in the LRU."""
        return self.statements.entries.get(key)

    def prepare_started(self) -> bytes:
        """A prepare is about to be sent: the COM_STMT_CLOSE frames that make room for it (to send first)."""
        statements = self.statements
        closes = statements.make_room()
        statements.preparing += 1
        return closes

    def prepare_answered(self, key: bytes, statement_id: int | None) -> None:
        """A prepare's response came: the server's statement id (None: it failed)."""
        statements = self.statements
        statements.preparing -= 1
        if statement_id is not None:
            statements.add(key, statement_id)

    def ensure_prepared(self, sql: bytes, schema: str, before: bytes, effect: Any) -> None:
        """Prepare a client's statement here (the proxy's own command, `effect` told when answered), in the
        default database it was prepared in; `before`: bytes to send first."""
        out = before + self.prepare_started()
        switch = schema != self.schema and schema and self.schema
        if switch:  # tables without a database name resolve where the client prepared it
            out += frame(bytes((my.COM_INIT_DB,)) + schema.encode("utf-8", "surrogateescape"))
            self.expect(my.COM_INIT_DB, INTERNAL_PLAIN)
        out += frame(bytes((my.COM_STMT_PREPARE,)) + sql)
        self.expect(my.COM_STMT_PREPARE, effect)
        if switch:
            out += frame(bytes((my.COM_INIT_DB,)) + self.schema.encode("utf-8", "surrogateescape"))
            self.expect(my.COM_INIT_DB, INTERNAL_PLAIN)
        self.transport.write(out)

    def statement_closes(self) -> bytes:
        """The COM_STMT_CLOSE frames pending, to send at a command boundary (b"": none)."""
        return self.statements.take_closes()

    def reset_statement(self, key: bytes) -> None:
        """COM_STMT_RESET of the statement of that key, if prepared here (the proxy's own command)."""
        entry = self.statements.entries.get(key)
        if entry is not None:
            self.transport.write(frame(bytes((my.COM_STMT_RESET,)) + entry.statement_id.to_bytes(4, "little")))
            self.expect(my.COM_STMT_RESET, INTERNAL_PLAIN)


def _text_row(packet: bytes) -> list[bytes | None]:
    values: list[bytes | None] = []
    pos = 0
    end = len(packet)
    while pos < end:
        if packet[pos] == 0xFB:
            values.append(None)
            pos += 1
        else:
            value, pos = read_lenenc_str(packet, pos)
            values.append(value)
    return values


