"""A PostgreSQL backend connection: login, internal queries, the forwarding hot path, and the protocol state it owns."""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from proxy.auth.md5 import md5_response
from proxy.auth.pg_passthrough import backend_auth_step
from proxy.auth.scram import MECHANISM, ScramClient
from proxy.config import BackendTLSMode, PostgresSettings
from proxy.errors import BackendError, BackendUnavailable, ProtocolViolation
from proxy.netio import ConnectionClosed
from proxy.parameter_groups import static_of
from proxy.pool.backend import BackendConnection, LinkedClient
from proxy.pool.pg_deadline import internal_deadline
from proxy.pool.pool import READ_ONLY_TROUBLE
from proxy.protocol.pg import messages as pg
from proxy.protocol.pg.extended import (
    CLOSE,
    DESCRIBE_STATEMENT,
    EXPECT_CLOSE_QUIET,
    EXPECT_CLOSE_SWALLOW,
    EXPECT_PARSE_RESENT,
    EXPECT_PARSE_UNNAMED,
    INJECT,
    PARSE,
    QUIET,
    STATEMENT,
    SWALLOW,
    Expectation,
    Prepared,
    build_parse,
    build_target,
)
from proxy.protocol.pg.replies import NOTIFICATION, READ_ONLY_SQLSTATE, ReplyMatcher
from proxy.secrets import AUTH_FAILED_SQLSTATES, Credential, SecretStore, retry_password

if TYPE_CHECKING:
    from proxy.pool.pool import Pool

log = logging.getLogger(__name__)

# The settings sync runs free of the statement_timeout the backend's previous client left (for its implicit
# transaction only): a short timeout someone else set must not cancel the next client's sync. (The session
# read-back in proxy.session.pg_client cannot do the same: pg_settings would then show the local value as the
# session's.)
UNTIMED = "SET LOCAL statement_timeout = 0;"


class StatementBook(Protocol):
    """A client's statement book as its backend tells it about requests that failed."""

    def failed(self, expectation: Expectation, failing: bool) -> None: ...
    def unnamed_failed(self) -> None: ...


class PgLinkedClient(LinkedClient, Protocol):
    """The side of a PostgreSQL client session its linked backend talks to (the session implements it)."""

    @property
    def process_id(self) -> int: ...
    @property
    def transport(self) -> asyncio.Transport: ...
    @property
    def recovers(self) -> bool: ...  # a lost backend is recovered from: the server's shutdown FATAL is not its
    def deliver(self, out: bytes) -> None: ...  # gives the client replies (and notes them for a replay)
    @property
    def statements(self) -> StatementBook: ...
    def backend_ready(self, backend: PostgresBackend, count: int) -> None: ...
    def server_reported(self, name: str, value: str) -> None: ...
    def resume_held(self, backend: PostgresBackend) -> None: ...


class SessionSettings(Protocol):
    """What a backend must be given of a client's session: its settings and the pool's number for them."""

    settings: dict[str, str]
    settings_id: int


class PostgresBackend(BackendConnection):
    """One server connection. While linked to a client, bytes stream through; only headers are read.

    It owns the state of its server session: the replies it awaits (read by its ReplyMatcher), the shared statements
    prepared there (an LRU), its unnamed statement's owner, and its settings. A client session asks it to change
    them (expect_reply, inject, send, ensure_prepared, parse_unnamed, apply_state) and never writes them itself."""

    def __init__(self, pool: Pool) -> None:
        super().__init__(pool)
        self.process_id = 0
        self.secret_key = 0
        self.params: dict[str, str] = {}  # current values of settings on this server session
        self.login_params: dict[str, str] = {}  # what this server reported at login (a session reset returns to it)
        self.client: PgLinkedClient | None = None
        self.static_params: dict[str, str] = {}  # its parameter group's static parameters, given at its login
        self.settings_id = 0  # the pool's number for this session's settings (see Pool.settings_id)
        self.replies = ReplyMatcher()  # what the server's replies are for, and what the linked client gets of them
        self.expect: deque[Expectation] = self.replies.expect  # requests sent, in the order their replies will come
        # Note one more request sent: its replies come after those of every request sent before (deque.append).
        self.expect_reply: Callable[[Expectation], None] = self.expect.append
        self._prepared: OrderedDict[bytes, Prepared] = OrderedDict()  # shared statements prepared here, LRU order
        self._unnamed_owner: object | None = None  # whose unnamed Parse this session's unnamed statement is
        self._unnamed_serial = 0  # and which of that client's unnamed Parses
        self.notifications: list[bytes] = []  # NotificationResponse bodies read during the proxy's own queries
        self.uses = 0  # transactions started here by clients (see proxy.session.pg_sequences)
        self.seq_owner = 0  # the client whose sequence values this session holds (0: none yet, -1: several)

    def __repr__(self) -> str:
        return f"PostgresBackend(pid={self.process_id}, pool={self.pool.name})"

    # --- linking to a client ---

    def link(self, client: PgLinkedClient) -> None:
        self.client = client
        self.replies.reset(client.process_id)
        self.replies.withhold_shutdown = client.recovers
        self.notifications.clear()  # (not delivered to the session they belonged to: not for this client)
        if self._buffer:  # unsolicited output while idle (a notice): pass it on
            data = self.take_buffered()
            self.data_received(data)

    def unlink(self) -> None:
        self.client = None
        if self.peer_paused_us:
            self.peer_paused_us = False
            self.transport.resume_reading()

    @property
    def at_boundary(self) -> bool:
        """What the server sent so far ends at a message boundary (nothing half-passed to a client)."""
        return self.replies.at_boundary

    @property
    def tx_status(self) -> int:
        """The transaction status of the server's last ReadyForQuery."""
        return self.replies.tx_status

    @property
    def in_transaction(self) -> bool:
        return self.replies.tx_status != pg.IDLE

    @property
    def client_at_boundary(self) -> bool:
        """What the client was given of the server's replies ends at a message boundary."""
        return self.replies.client_at_boundary

    @property
    def ended_by_server(self) -> bool:
        """A FATAL ErrorResponse of the server's was passed to the client."""
        return self.replies.ended_by_server

    # --- protocol state: what the server is asked, what it holds ---

    @property
    def awaiting_replies(self) -> bool:
        """Requests sent that the server has not finished answering."""
        return bool(self.expect)

    def inject(self, reply: bytes) -> bool:
        """Give the client `reply` in its place among the server's replies; False when nothing is awaited (the
        caller gives it at once)."""
        if not self.expect:
            return False
        self.expect.append(Expectation(CLOSE, INJECT, reply))
        return True

    def holds_unnamed(self, owner: object, serial: int) -> bool:
        """This session's unnamed statement is `owner`'s unnamed Parse number `serial`."""
        return self._unnamed_owner is owner and self._unnamed_serial == serial

    def parse_unnamed(self, owner: object, serial: int, expectation: Expectation) -> None:
        """`owner`'s unnamed Parse number `serial` is sent; its reply is `expectation`'s."""
        self._unnamed_owner = owner
        self._unnamed_serial = serial
        self.expect.append(expectation)

    def forget_unnamed(self) -> None:
        """The session's unnamed statement is gone or unknown (a simple Query ends it; a failed Parse leaves it)."""
        self._unnamed_owner = None

    def prepared_copy(self, name: bytes) -> Prepared | None:
        """The record of the shared statement `name` prepared here (marked recently used), or None."""
        record = self._prepared.get(name)
        if record is not None:
            self._prepared.move_to_end(name)
        return record

    def ensure_prepared(self, name: bytes, record: Prepared, parse_action: int, resume: bool = False) -> bytes:
        """Close + Parse + Describe of the shared statement `name` (the least recently used one closed first when
        the cache is full); the Describe's reply is kept on `record`. Returns the bytes to send."""
        prepared = self._prepared
        expect = self.expect
        prefix = b""
        if name not in prepared and len(prepared) >= self.pool.settings.max_prepared_statements:
            oldest, _ = prepared.popitem(last=False)
            expect.append(EXPECT_CLOSE_SWALLOW)
            prefix = build_target(b"C", STATEMENT, oldest)
        prepared[name] = record
        prepared.move_to_end(name)
        quiet = parse_action == QUIET
        expect.append(EXPECT_CLOSE_QUIET if quiet else EXPECT_CLOSE_SWALLOW)
        expect.append(Expectation(PARSE, parse_action, prepared_name=name, record=record))
        expect.append(Expectation(DESCRIBE_STATEMENT, QUIET if quiet else SWALLOW, record=record, resume=resume))
        return (prefix + build_target(b"C", STATEMENT, name) + build_parse(name, record.rest)
                + build_target(b"D", STATEMENT, name))

    def forget_prepared(self, name: bytes) -> bool:
        """The shared statement `name` is deallocated here; whether it was prepared."""
        return self._prepared.pop(name, None) is not None

    def forget_all_prepared(self) -> None:
        self._prepared.clear()

    # --- settings of the server session ---

    async def apply_settings(self, wanted: dict[str, str], settings_id: int) -> int:
        """Make this session's settings `wanted` (numbered `settings_id` by the pool), changing only the difference,
        in one round trip; `wanted` takes the server's spelling of what it reports (utf8 -> UTF8). Returns the
        number of the settings the session has now."""
        if self.settings_id == settings_id:
            return settings_id
        current = self.params
        changes = [f"set_config({_quote(name)}, {_quote(value)}, false)" for name, value in wanted.items()
                   if current.get(name) != value]
        resets = [f"RESET {name}" for name in current if name not in wanted and name not in pg.READ_ONLY_PARAMETERS]
        statements = resets + (["SELECT " + ", ".join(changes)] if changes else [])  # a new timeout comes last
        if statements:
            for name, value in wanted.items():  # only the server's own reports (its spelling) may refill these
                if current.get(name) != value:
                    current.pop(name, None)
            await self.simple_query(UNTIMED + ";".join(statements))
            self._settings_applied(wanted)
            settings_id = self.pool.settings_id(wanted)
        self.settings_id = settings_id
        return settings_id

    def _settings_applied(self, wanted: dict[str, str]) -> None:
        params = self.params
        for name, value in wanted.items():
            reported = params.get(name)
            if reported is not None and reported != value:
                wanted[name] = reported  # the server's spelling (utf8 -> UTF8)
            params[name] = wanted[name]
        server_params = self.pool.server_params
        for name in [n for n in params if n not in wanted and n not in pg.READ_ONLY_PARAMETERS]:
            if name not in server_params:
                del params[name]
            else:
                params[name] = server_params[name]

    async def apply_state(self, session: SessionSettings) -> None:
        """Re-establish a client's session here, in one round trip at most: its settings (the difference only).
        Its named statements need no step: they are prepared here on first use (ensure_prepared)."""
        session.settings_id = await self.apply_settings(session.settings, session.settings_id)

    def state_is(self, session: SessionSettings) -> None:
        """The session's settings here are the client's now (its client changed them on this backend)."""
        self.settings_id = session.settings_id = self.pool.settings_id(session.settings)

    def in_state_of(self, session: SessionSettings) -> bool:
        """This session's settings are the client's already (nothing to apply)."""
        return self.settings_id == session.settings_id

    def settings_read(self, settings: dict[str, str]) -> None:
        """The session's settings as read back from the server: besides those the server reports, only these."""
        reported = self.pool.server_params
        params = self.params
        for name in [n for n in params if n not in reported]:
            del params[name]
        for name, value in settings.items():
            if name not in reported and name not in pg.READ_ONLY_PARAMETERS:
                params[name] = value

    # --- client -> server ---

    def send(self, data: bytes) -> None:
        """Pass a client's bytes (and what the proxy adds to them) to the server."""
        self.transport.write(data)

    def log_off(self) -> None:
        """Say Terminate to the server (the connection is closed next)."""
        if not self.closed:
            self.transport.write(pg.message(b"X"))

    # --- sequence values of the server session (see proxy.session.pg_sequences) ---

    def count_use(self) -> int:
        """A client starts a transaction here; returns the number of such uses so far."""
        self.uses += 1
        return self.uses

    def sequences_belong_to(self, owner: int) -> None:
        """The sequence values of this session are now `owner`'s (a client id, or NOBODY / SHARED)."""
        self.seq_owner = owner

    # --- the hot path: server -> client ---

    def data_received(self, data: bytes) -> None:
        client = self.client
        if client is None:
            self._buffer += data
            self._wake()
            return
        replies = self.replies
        try:
            out = replies.feed(data)
        except ProtocolViolation as exc:
            self._broken(exc.message)
            return
        if replies.eventful:
            self._replies_read(client, out)
        elif out:
            client.deliver(out)
        ready = replies.ready
        if ready and self.client is client:
            client.backend_ready(self, ready)

    def _replies_read(self, client: PgLinkedClient, out: bytes) -> None:
        """Replies that change state on this side came with `out`: apply them around passing it on."""
        replies = self.replies
        if replies.reported:
            self._reported(client)
        if replies.failed:
            self._failed(client.statements)
        if replies.trouble:
            _report_trouble(self)
        if out:
            client.deliver(out)
        if replies.resume and self.client is client:
            client.resume_held(self)


    def _reported(self, client: PgLinkedClient) -> None:
        """ParameterStatus passed to the client: the server session and the client's session have that setting."""
        params = self.params
        for name, value in self.replies.reported:
            params[name] = value
            client.server_reported(name, value)
        self.replies.reported.clear()

    def _failed(self, statements: StatementBook) -> None:
        """An extended-query request failed and the server skipped the rest up to Sync: what they made is undone."""
        for failed, failing in self.replies.failed:
            record = failed.record
            if record is not None:
                if failed.kind == PARSE:
                    if not failed.prepared_name:
                        self._unnamed_owner = None  # whatever the server holds now, the proxy re-sends before use
                    elif self._prepared.get(failed.prepared_name) is record:
                        del self._prepared[failed.prepared_name]
                statements.failed(failed, failing)
            elif failed is EXPECT_PARSE_UNNAMED or failed is EXPECT_PARSE_RESENT:
                self._unnamed_owner = None
                if failed is EXPECT_PARSE_UNNAMED:
                    statements.unnamed_failed()
        self.replies.failed.clear()

    # --- login ---

    async def login(self, settings: PostgresSettings, credential: Credential | None, tls: ssl.SSLContext | None,
                    password: bytes | None = None) -> None:
        """Log in with `credential` (its `password`, else the current one); None: auth passthrough."""
        pool = self.pool
        if settings.backend_tls is not BackendTLSMode.DISABLE:
            self.write(pg.ssl_request())
            answer = await self.read_exact(1)
            if answer == b"S" and tls is not None:
                hostname = self.host if settings.backend_tls is BackendTLSMode.VERIFY_FULL else None
                await self.start_tls(tls, server_side=False, server_hostname=hostname)
            elif answer == b"N":
                if settings.backend_tls is not BackendTLSMode.PREFER:
                    raise BackendUnavailable("the backend does not accept TLS connections", transient=False)
            else:
                raise ProtocolViolation("unexpected answer to SSLRequest from the backend")
        if credential is not None and password is None:
            password = credential.password
        user = credential.user if credential is not None else pool.user
        self.static_params = static_of(settings, pool.user)
        self.write(pg.startup_message({**self.static_params, "user": user, "database": pool.database}))
        scram: ScramClient | None = None
        while True:
            kind, body = await self.read_typed()
            if kind == ord("E"):
                fields = pg.parse_error_fields(body)
                raise BackendError(f"backend refused the login: {fields.get('M', '')}", fields.get("C"))
            if kind != ord("R"):
                raise ProtocolViolation(f"unexpected message {chr(kind)!r} during backend login")
            code = int.from_bytes(body[:4], "big")
            if code == pg.AUTH_OK:
                break
            if password is None:  # auth passthrough: what the user's client login proved, else refused
                scram = backend_auth_step(self, pool.user, code, body, scram)
                continue
            if code == pg.AUTH_CLEARTEXT:
                self.write(pg.password_message(password + b"\x00"))
            elif code == pg.AUTH_MD5:
                self.write(pg.password_message(md5_response(user.encode(), password, body[4:8]) + b"\x00"))
            elif code == pg.AUTH_SASL:
                if MECHANISM.encode() not in body[4:].split(b"\x00"):
                    raise BackendError("the backend offers no SASL mechanism the proxy supports")
                scram = ScramClient(password)
                self.write(pg.sasl_initial_response(MECHANISM, scram.client_first()))
            elif code == pg.AUTH_SASL_CONTINUE and scram is not None:
                self.write(pg.password_message(scram.client_final(body[4:])))
            elif code == pg.AUTH_SASL_FINAL and scram is not None:
                scram.verify_server_final(body[4:])
            else:
                raise BackendError(f"the backend asks for an unsupported authentication method ({code})")
        while True:
            kind, body = await self.read_typed()
            if kind == ord("S"):
                name, value = pg.parse_parameter_status(body)
                self.params[name] = value
            elif kind == ord("K"):
                self.process_id, self.secret_key = pg.INT32_PAIR.unpack_from(body)
                self.replies.server_pid = pg.INT32.pack(self.process_id)
            elif kind == ord("Z"):
                break
            elif kind == ord("E"):
                fields = pg.parse_error_fields(body)
                raise BackendError(f"backend refused the login: {fields.get('M', '')}", fields.get("C"))
        self.login_params = dict(self.params)
        if pool.server_generation < self.generation or not pool.server_params:
            pool.server_params = dict(self.params)
            pool.server_generation = self.generation
        self.params_changed()
        if pool.target.needs_limits(self.generation):
            rows = await self.simple_query("SHOW max_connections")
            pool.target.resolve_limits(int(rows[0][0] or 100), self.generation)
        if pool.settings.init_query:
            await self.simple_query(pool.settings.init_query)

    def take_notifications(self, client_process_id: int) -> bytes:
        """The notifications read during the proxy's own queries, as messages for the session's client."""
        out = []
        for body in self.notifications:
            if body[:4] == self.replies.server_pid:
                body = pg.INT32.pack(client_process_id) + body[4:]
            out.append(pg.message(b"A", body))
        self.notifications.clear()
        return b"".join(out)

    def session_reset(self) -> None:
        """The server session was reset (DISCARD ALL or the pool's reset query): back to the login's settings,
        with no statements of the proxy's and no sequence values."""
        self.params = dict(self.login_params)
        self.params_changed()
        self._prepared.clear()  # (a statement the server still has is closed before it is parsed again)
        self._unnamed_owner = None
        self.seq_owner = 0
        self.notifications.clear()

    def params_changed(self) -> None:
        """Recompute the number of this session's settings after they changed outside a client's view."""
        self.settings_id = self.pool.settings_id(
            {k: v for k, v in self.params.items() if k not in pg.READ_ONLY_PARAMETERS}
        )

    # --- internal queries (never while linked) ---

    @internal_deadline
    async def simple_query(self, sql: str) -> list[list[str | None]]:
        """Run SQL the proxy itself needs; returns text rows, raises BackendError on an ErrorResponse.

        A notification that arrives meanwhile belongs to the session's client: it is kept in `notifications`.
        """
        assert self.client is None
        self._unnamed_owner = None  # a simple Query ends the unnamed statement
        self.write(pg.query(sql))
        rows: list[list[str | None]] = []
        error: dict[str, str] | None = None
        while True:
            kind, body = await self.read_typed()
            if kind == ord("D"):
                rows.append(_data_row(body))
            elif kind == ord("E"):
                error = pg.parse_error_fields(body)
            elif kind == ord("S"):
                name, value = pg.parse_parameter_status(body)
                self.params[name] = value
            elif kind == NOTIFICATION:
                self.notifications.append(body)
            elif kind == ord("Z"):
                self.replies.tx_status = body[0]
                break
        self.params_changed()
        if error is not None:
            raise BackendError(error.get("M", "error"), error.get("C"))
        return rows


def _report_trouble(backend: PostgresBackend) -> None:
    """The server answered that it is read-only or shutting down: the topology should look at it now."""
    sqlstate, backend.replies.trouble = backend.replies.trouble, ""
    target = backend.pool.target
    if target.on_trouble:
        kind = READ_ONLY_TROUBLE if sqlstate == READ_ONLY_SQLSTATE else "shutdown error"
        target.report_trouble(f"{kind} (SQLSTATE {sqlstate}) from {backend.host}:{backend.port}")


def _quote(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _data_row(body: bytes) -> list[str | None]:
    count = int.from_bytes(body[:2], "big")
    pos = 2
    values: list[str | None] = []
    for _ in range(count):
        length = int.from_bytes(body[pos : pos + 4], "big", signed=True)
        pos += 4
        if length < 0:
            values.append(None)
        else:
            values.append(body[pos : pos + length].decode())
            pos += length
    return values


async def open_backend(
    pool: Pool, settings: PostgresSettings, secrets: SecretStore, tls: ssl.SSLContext | None
) -> PostgresBackend:
    """Connect and log in a new backend connection for `pool`. A password the database refuses is tried once more
    with the secrets read again (a rotation's pending password, or its new one not yet picked up)."""
    credential = secrets.backend_login(pool.user)
    try:
        return await _open_backend(pool, settings, credential, tls)
    except BackendError as exc:
        if credential is None or exc.sqlstate not in AUTH_FAILED_SQLSTATES:
            raise
        retry = retry_password(secrets, pool.user, credential)
        if retry is None:
            raise
        log.info("pool %s: the database refused the stored password; trying the secrets read again", pool.name)
        return await _open_backend(pool, settings, retry[0], tls, retry[1])


async def _open_backend(pool: Pool, settings: PostgresSettings, credential: Credential | None,
                        tls: ssl.SSLContext | None, password: bytes | None = None) -> PostgresBackend:
    loop = asyncio.get_running_loop()
    timeout = settings.backend_connect_timeout
    target = pool.target
    host, port, generation = target.host, target.port, target.generation
    try:
        _, backend = await asyncio.wait_for(
            loop.create_connection(lambda: PostgresBackend(pool), host, port), timeout
        )
    except (OSError, TimeoutError) as exc:
        raise BackendUnavailable(f"cannot connect to the database at {host}:{port}: {exc}") from None
    backend.opened_to(host, port, generation)
    try:
        await asyncio.wait_for(backend.login(settings, credential, tls, password), timeout)
    except BaseException as exc:
        backend.forgotten = True  # never counted by the pool as open
        backend.abort()
        if isinstance(exc, TimeoutError):
            raise BackendUnavailable("timed out logging in to the database") from None
        if isinstance(exc, ConnectionClosed | OSError | ssl.SSLError):
            raise BackendUnavailable(f"the database closed the connection during login: {exc}",
                                     transient=not isinstance(exc, ssl.SSLCertVerificationError)) from None
        raise
    return backend
