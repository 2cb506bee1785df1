"""A PostgreSQL client session: startup, TLS, authentication, then transaction-level forwarding."""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import re
import shlex
import time
from enum import IntEnum

from proxy.auth.md5 import check_md5_response
from proxy.auth.scram import MECHANISM, ScramKeys, ScramServer
from proxy.config import ClientAuthMethod, ClientTLSMode
from proxy.errors import (
    AuthenticationFailed,
    AuthorizationFailed,
    BackendError,
    BackendUnavailable,
    ClientMessageTimeout,
    IdleClientTimeout,
    LoginTimeout,
    ProtocolViolation,
    ProxyError,
)
from proxy.netio import Connection, ConnectionClosed
from proxy.pool.pg_backend import PostgresBackend
from proxy.pool.pg_deadline import cancel_in_background, expire
from proxy.pool.pool import Backend, Pool
from proxy.protocol.pg import extended as ext
from proxy.protocol.pg import messages as pg
from proxy.protocol.pg.extended import (
    EXPECT_BIND,
    EXPECT_CLOSE,
    EXPECT_DESCRIBE_PORTAL,
    EXPECT_EXECUTE,
    EXPECT_FUNCTION_CALL,
    EXPECT_QUERY,
    EXPECT_SYNC,
)
from proxy.secrets import Secret
from proxy.session import pg_sequences as seq
from proxy.session.client import LOGIN_MESSAGE_LIMIT, ClientConnection, TLSHandshakeFailed
from proxy.session.pg_databases import close_idle_backends, database_ddl_target
from proxy.session.pg_service import PostgresService
from proxy.session.pg_statements import HOLD, Statements
from proxy.stats import PINS, PROXY

log = logging.getLogger(__name__)

# What each client message type means to the forwarder (indexed by the type byte).
INVALID, INSPECTED, SYNC, EXTENDED, COPY, TERMINATE = range(6)
ACTION = bytearray(256)
for _kind, _action in (("Q", INSPECTED), ("F", INSPECTED), ("P", INSPECTED), ("B", INSPECTED), ("D", INSPECTED),
                       ("C", INSPECTED), ("S", SYNC), ("E", EXTENDED), ("H", EXTENDED), ("d", COPY),
                       ("c", COPY), ("f", COPY), ("X", TERMINATE)):
    ACTION[ord(_kind)] = _action
QUERY_BYTE, FUNCTION_CALL_BYTE, PARSE_BYTE, BIND_BYTE, DESCRIBE_BYTE, EXECUTE_BYTE = b"QFPBDE"
STATEMENT = ord("S")

# Words that may start or end session state a backend cannot carry to another client (checked in C, per query).
SESSION_WORDS = re.compile(
    rb"(?i)\b(?:set|reset|set_config|discard|listen|unlisten|temp|temporary|advisory|hold|load|prepare|"
    rb"deallocate|close|drop|rename|role|session|pg_advisory_\w*)\b"
)
VARIABLE_WORDS = frozenset({b"set", b"reset", b"set_config", b"role", b"session"})
EXECUTE_WORD = re.compile(rb"(?i)\s*execute\s")
DISCARD_ALL = re.compile(rb"(?i)\bdiscard\s+all\b")
LOAD = re.compile(rb"(?i)^\s*load\s")

# The settings sync runs free of the statement_timeout the backend's previous client left (for its implicit
# transaction only): a short timeout someone else set must not cancel the next client's sync. (The read-back
# below cannot do the same: pg_settings would then show the local value as the session's.)
UNTIMED = "SET LOCAL statement_timeout = 0;"
# Failures of the settings sync that are the backend's, not the client's (a timeout another client left on it, a
# backend that died while idle): the client is given another backend, up to SYNC_ATTEMPTS times in all.
NOT_THE_CLIENTS = frozenset({"57014", "57P01", "57P02", "57P03"})
SYNC_ATTEMPTS = 3
# Startup settings a pool remembers as accepted by the server (checked once each); values are the clients' own
# (application_name), so the set is emptied when it reaches this size.
VALIDATED_SETTINGS_LIMIT = 10_000
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
STARTUP_ONLY = frozenset({"user", "database", "options", "replication"})
SETTING_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*$")
HELD_LIMIT = 256 * 1024

# A Query at least this long that arrives in parts streams through (scanned for SESSION_WORDS as it passes)
# instead of being held whole; other inspected messages are gathered in a growing buffer.
STREAM_QUERY_MIN = 256 * 1024
# Session words found in a streamed Query: the text lowercased, non-word bytes made spaces, then this pattern
# (a leading literal lets the regex engine skip fast). Derived from SESSION_WORDS so the two cannot drift.
WORD_BYTES = bytes(
    c + 32 if 65 <= c <= 90 else c if (48 <= c <= 57 or 97 <= c <= 122 or c == 95) else 32 for c in range(256)
)
_WORDS_BODY = SESSION_WORDS.pattern.removeprefix(rb"(?i)\b")
STREAMED_WORDS = re.compile(rb" " + _WORDS_BODY) if SESSION_WORDS.pattern != _WORDS_BODY else SESSION_WORDS
SCAN_OVERLAP = 32  # bytes of one part kept to find a word cut by the next part
# After a read this large, the client's next read waits for the event loop's next turn, so that a client
# streaming a huge message takes one read per turn and every other connection gets its turn in between.
TURN_BYTES = 128 * 1024


class State(IntEnum):
    LOGIN = 0
    READY = 1  # logged in; forwarding
    CLOSED = 2


def _quote(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _options_settings(options: str) -> dict[str, str]:
    """`-c name=value` and `--name=value` pairs from the startup `options` parameter."""
    result: dict[str, str] = {}
    try:
        words = shlex.split(options.replace("\\ ", "\x00"))
    except ValueError:
        raise ProtocolViolation("malformed options startup parameter") from None
    words = [w.replace("\x00", " ") for w in words]
    index = 0
    while index < len(words):
        word = words[index]
        if word == "-c" and index + 1 < len(words):
            pair = words[index + 1]
            index += 2
        elif word.startswith("-c") or word.startswith("--"):
            pair, index = word[2:], index + 1
        else:
            raise ProtocolViolation(f"unsupported startup option {word!r}")
        name, sep, value = pair.partition("=")
        if not sep:
            raise ProtocolViolation(f"startup option {pair!r} has no value")
        result[name.replace("-", "_")] = value
    return result


async def _scram_keys(service: PostgresService, user: str, secret: Secret | None) -> ScramKeys:
    """The keys to check a SCRAM login against: cached, derived off the event loop once, or stable fakes."""
    if secret is None:
        return service.secrets.fake_scram_keys(user)  # same salt size and iterations, no PBKDF2
    if secret.scram_ready:
        return secret.scram_keys
    return await asyncio.to_thread(lambda: secret.scram_keys)


class PostgresClient(ClientConnection):
    """One client connection; owns at most one backend at a time (between transactions in transaction mode)."""

    def __init__(self, service: PostgresService) -> None:
        super().__init__(service.server.max_message_size)
        self.service = service
        self.state = State.LOGIN
        self.user = ""
        self.database = ""
        self.pool: Pool | None = None
        self.process_id = 0
        self.secret_key = 0
        self.backend: PostgresBackend | None = None
        self.wanted: dict[str, str] = {}  # the settings this client's session should have on any backend
        self.pending = 0  # Query/Sync/FunctionCall messages sent whose ReadyForQuery has not come back
        self.in_extended = False  # extended-query messages sent since the last Sync
        self.statements = Statements(self)  # named and unnamed prepared statements (pg_statements)
        self._checking = False  # a statement check is out: the client's bytes wait in _held for its reply
        self.pins: set[str] = set()  # reasons this client keeps its backend between transactions
        self._state_dirty = False  # a statement may have changed settings or pinned state
        self._seq_hold = False  # this transaction may have set a sequence value it did not return
        self._seq_holding: asyncio.TimerHandle | None = None  # keeping the backend for lastval()/currval()
        self._seq_hold_over = False  # the hold's time is up: the backend goes back at the transaction's end
        self._seq_hold_since = 0.0
        self._reserved: PostgresBackend | None = None  # held for this client between its transactions
        self.seq_backend: PostgresBackend | None = None  # the backend of this client's latest transaction
        self.seq_use = 0  # its use count then (see pg_sequences)
        self._seq_words: set[bytes] = set()  # sequence-related words of the transaction being started
        self.active = True  # data seen since the janitor last looked
        self.settings_id = 0  # the pool's number for this client's settings, to compare with a backend's
        self.idle_since = 0.0
        self._held = bytearray()  # client bytes waiting for a backend
        self._acquiring: asyncio.Task[None] | None = None
        self._queued = False  # waiting in the pool's line for a backend
        self.waiting_since = 0.0
        self._borrowing = False
        self._skip = 0  # bytes of the current message still to pass before the next header
        self._partial = b""  # an incomplete header (under 5 bytes) carried to the next read
        self._message: bytearray | None = None  # an inspected message arriving in parts, gathered
        self._message_size = 0  # its full size
        self._scanning = False  # the bytes being skipped are a streamed Query's text, scanned for session words
        self._scan_tail = b""  # the end of the previous part of that text
        self._yielding = False  # reading paused until the event loop's next turn
        self._dropping = 0  # bytes still to come of a stray COPY message dropped without a backend
        self._task: asyncio.Task[None] | None = None
        self.peer = "?"

    def __repr__(self) -> str:
        return f"PostgresClient({self.peer}, user={self.user!r}, db={self.database!r})"

    # --- lifecycle ---

    async def _login_with_timeout(self) -> None:
        try:
            # (not wait_for: its inner task would keep a failed login's exception, whose traceback holds wait_for's
            # frame, which holds that task: a cycle keeping this client until a full garbage collection)
            async with asyncio.timeout(self.service.server.client_login_timeout):
                await self._login()
        except TimeoutError:
            PROXY.login_timeouts += 1
            self.fail(LoginTimeout("the client did not complete its login in time"))
        except TLSHandshakeFailed:
            pass  # logged and closed where it failed
        except ConnectionClosed:
            log.info("client %s closed the connection during login", self.peer)
            self.close()
        except AuthenticationFailed as exc:
            PROXY.logins_failed += 1
            self.fail(exc)
        except ProxyError as exc:
            self.fail(exc)
        except Exception as exc:  # the edge: anything unexpected becomes a FATAL for this client only
            log.exception("client %s: login failed unexpectedly", self.peer)
            self.fail(ProxyError(f"internal error: {type(exc).__name__}"))

    def fail(self, error: ProxyError) -> None:
        """Send the client a FATAL ErrorResponse for `error`, log the reason and close."""
        if self.closed:
            return
        log.warning("client %s (user %r): %s [%s]", self.peer, self.user, error.message, error.sqlstate)
        if isinstance(error, ProtocolViolation):
            PROXY.protocol_errors += 1
        self.write(pg.error_response(error.sqlstate, error.message, "FATAL"))
        self.state = State.CLOSED
        self.close()

    def on_closed(self, exc: Exception | None) -> None:
        self.state = State.CLOSED
        PROXY.clients_current -= 1
        self.service.clients.pop(self.process_id, None)
        if self.pool is not None:
            self.pool.clients.discard(self)
        if self._task is not None and not self._task.done() and not self._buffer:
            # (with bytes still buffered, e.g. a CancelRequest and a close, let it finish.) Let go of a cancelled
            # login: it keeps its CancelledError, whose traceback holds its frame and so this client in a cycle.
            task, self._task = self._task, None
            task.cancel()
        if self._acquiring is not None and self._borrowing:
            # let go of it: cancelled, it keeps its CancelledError, whose traceback holds the task's frame and so
            # this client in a cycle that only a full garbage collection frees
            acquiring, self._acquiring = self._acquiring, None
            acquiring.cancel()
        self.seq_backend = None  # (a dropped backend may still name this client: no cycle)
        backend = self.backend
        if backend is not None:
            self.backend = None
            backend.unlink()
            self._return_after_client(backend)

    def _mid_message_on_backend(self) -> bool:
        """Part of a message has reached the linked backend (or is held for it) and the rest has not come."""
        return bool(self._skip or self._partial or self._message is not None)

    def mid_message(self) -> bool:
        """The client has sent part of a message and not the rest."""
        if self._mid_message_on_backend() or self._dropping:
            return True
        return self.backend is None and bool(self._held) and self._acquiring is None and not self._queued

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
        running = self.pending > 0 or bool(backend.expect)
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
        if self.pins and not pool.session_mode:  # LISTEN, temporary tables, locks...: no other client may inherit
            log.info("client %s left with its session pinned (%s); closing %s", self.peer,
                     ", ".join(sorted(self.pins)), backend)
            PINS.unpinned()
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

    # --- login ---

    async def _login(self) -> None:
        service = self.service
        while True:
            body = await self.read_untyped()
            code, params = pg.parse_startup(body)
            if code == pg.SSL_REQUEST_CODE:
                if service.server_tls is None or self.is_tls:
                    self.write(b"N")
                    continue
                self.write(b"S")
                await self.start_tls(service.server_tls, server_side=True)
                continue
            if code == pg.GSSENC_REQUEST_CODE:
                self.write(b"N")
                continue
            if code == pg.CANCEL_REQUEST_CODE:
                if len(body) != 12:
                    raise ProtocolViolation("malformed CancelRequest")
                PROXY.cancel_requests += 1
                process_id, secret_key = pg.INT32_PAIR.unpack_from(body, 4)
                await service.cancel(process_id, secret_key)
                self.close()
                return
            if code >> 16 != 3:
                raise ProtocolViolation(
                    f"unsupported frontend protocol {code >> 16}.{code & 0xFFFF}: server supports 3.0"
                )
            if code != pg.PROTOCOL_V3:  # a newer 3.x: say what we speak
                _, params = pg.parse_startup(pg.INT32.pack(pg.PROTOCOL_V3) + body[4:])
            break
        if self.over_limit is not None:
            raise self.over_limit
        unknown = [k for k in params if k.startswith("_pq_.")]
        if code != pg.PROTOCOL_V3 or unknown:
            self.write(pg.message(b"v", pg.INT32.pack(pg.PROTOCOL_V3) + pg.INT32.pack(len(unknown))
                                  + b"".join(pg.cstring(k) for k in unknown)))
            params = {k: v for k, v in params.items() if not k.startswith("_pq_.")}
        if service.config.tls.mode is ClientTLSMode.REQUIRE and not self.is_tls:
            raise AuthorizationFailed("the proxy requires TLS (sslmode=require)")
        self.user = params.get("user", "")
        if not self.user:
            raise AuthorizationFailed("no PostgreSQL user name specified in startup packet")
        self.database = params.get("database") or self.user
        if "replication" in params and params["replication"].lower() not in ("false", "off", "0", "no"):
            raise AuthorizationFailed("replication connections are not supported through the proxy")
        requested = {k: v for k, v in params.items() if k not in STARTUP_ONLY}
        requested.update(_options_settings(params.get("options", "")))
        for name in requested:
            if not SETTING_NAME.match(name):
                raise ProtocolViolation(f"invalid configuration parameter name {name!r}")
        await self._authenticate()
        pool = self.pool = service.pool_for(self.database, self.user)
        pool.clients.add(self)  # kept while it serves a client
        await self._prepare_session(pool, requested)
        self.process_id, self.secret_key = service.new_key()
        service.clients[self.process_id] = self
        out = [pg.AUTHENTICATION_OK]
        reported = dict(pool.server_params)
        reported.update((k, v) for k, v in self.wanted.items() if k in reported)
        if service.settings.server_version:
            reported["server_version"] = service.settings.server_version
        out.extend(pg.parameter_status(k, v) for k, v in reported.items())
        out.append(pg.backend_key_data(self.process_id, self.secret_key))
        out.append(pg.READY_FOR_QUERY_IDLE)
        self.write(b"".join(out))
        PROXY.logins_ok += 1
        self.state = State.READY
        leftover = self.take_buffered()
        if leftover:
            self.data_received(leftover)

    async def _authenticate(self) -> None:
        service = self.service
        method = service.settings.auth_method
        secret = service.secrets.get(self.user)
        # a message, not the exception: kept in this frame, a raised exception would hold the frame (and this
        # client) through its own traceback, a cycle
        failure = f'password authentication failed for user "{self.user}"'
        if method is ClientAuthMethod.SCRAM_SHA_256:
            keys = await _scram_keys(service, self.user, secret)
            self.write(pg.authentication_sasl([MECHANISM]))
            kind, body = await self.read_typed(LOGIN_MESSAGE_LIMIT)
            if kind != ord("p"):
                raise ProtocolViolation(f"expected SASLInitialResponse, got message type {chr(kind)!r}")
            mechanism, client_first = pg.parse_sasl_initial_response(body)
            if mechanism != MECHANISM:
                raise ProtocolViolation(f"unsupported SASL mechanism {mechanism!r}")
            exchange = ScramServer(keys)
            self.write(pg.authentication(pg.AUTH_SASL_CONTINUE, exchange.server_first(client_first)))
            kind, body = await self.read_typed(LOGIN_MESSAGE_LIMIT)
            if kind != ord("p"):
                raise ProtocolViolation(f"expected SASLResponse, got message type {chr(kind)!r}")
            try:
                final = exchange.server_final(body)
            except AuthenticationFailed:
                raise AuthenticationFailed(failure) from None
            if secret is None:
                raise AuthenticationFailed(failure)
            self.write(pg.authentication(pg.AUTH_SASL_FINAL, final))
            return
        if method is ClientAuthMethod.PASSWORD and not self.is_tls:
            raise AuthorizationFailed("cleartext password authentication is allowed only over TLS")
        salt = os.urandom(4)
        if method is ClientAuthMethod.MD5:
            self.write(pg.authentication(pg.AUTH_MD5, salt))
        else:
            self.write(pg.authentication(pg.AUTH_CLEARTEXT))
        kind, body = await self.read_typed(LOGIN_MESSAGE_LIMIT)
        if kind != ord("p"):
            raise ProtocolViolation(f"expected PasswordMessage, got message type {chr(kind)!r}")
        answer = pg.parse_password(body)
        if secret is None:
            raise AuthenticationFailed(failure)
        if method is ClientAuthMethod.MD5:
            ok = check_md5_response(self.user.encode(), secret.password, salt, answer)
        else:
            ok = hmac.compare_digest(answer, secret.password)
        if not ok:
            raise AuthenticationFailed(failure)

    async def _prepare_session(self, pool: Pool, requested: dict[str, str]) -> None:
        """Learn the server's settings, check the client's requested ones once, and keep a backend in session mode."""
        need_backend = pool.session_mode or not pool.server_params or any(
            item not in pool.validated_settings for item in requested.items()
        )
        if not need_backend:
            self._init_wanted(pool, requested)
            return
        backend = await self._borrow(pool)
        try:
            self._init_wanted(pool, requested)
            await self._sync_settings(backend)
        except BaseException:
            pool.discard(backend)
            raise
        if len(pool.validated_settings) >= VALIDATED_SETTINGS_LIMIT:  # values are the clients' (application_name)
            pool.validated_settings.clear()
        pool.validated_settings.update(requested.items())
        if pool.session_mode:
            self.backend = backend
            backend.link(self)
        else:
            pool.release(backend)

    def _init_wanted(self, pool: Pool, requested: dict[str, str]) -> None:
        self.wanted = {k: v for k, v in pool.server_params.items() if k not in FIXED_PARAMETERS}
        self.wanted.update(requested)
        self.settings_id = pool.settings_id(self.wanted)

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

    async def _sync_settings(self, backend: PostgresBackend) -> None:
        """Make the backend's session settings equal to this client's (the difference only)."""
        if backend.settings_id == self.settings_id:
            return
        current = backend.params
        wanted = self.wanted
        changes = [f"set_config({_quote(name)}, {_quote(value)}, false)" for name, value in wanted.items()
                   if current.get(name) != value]
        resets = [f"RESET {name}" for name in current if name not in wanted and name not in FIXED_PARAMETERS]
        statements = resets + (["SELECT " + ", ".join(changes)] if changes else [])  # a new timeout comes last
        if statements:
            for name, value in wanted.items():  # only the server's own reports (its spelling) may refill these
                if current.get(name) != value:
                    current.pop(name, None)
            await backend.simple_query(UNTIMED + ";".join(statements))
            self._after_sync(backend)
        backend.settings_id = self.settings_id

    def _after_sync(self, backend: PostgresBackend) -> None:
        wanted = self.wanted
        for name, value in wanted.items():
            reported = backend.params.get(name)
            if reported is not None and reported != value:
                wanted[name] = reported  # the server's spelling (utf8 -> UTF8)
            backend.params[name] = wanted[name]
        for name in [n for n in backend.params if n not in wanted and n not in FIXED_PARAMETERS]:
            if name not in backend.pool.server_params:
                del backend.params[name]
            else:
                backend.params[name] = backend.pool.server_params[name]
        self.settings_id = backend.pool.settings_id(wanted)

    def server_reported(self, name: str, value: str) -> None:
        """A ParameterStatus passed through from the backend: the client's session has that setting now."""
        if name not in FIXED_PARAMETERS:
            self.wanted[name] = value
            backend = self.backend
            if backend is not None:  # the reporting backend has it already
                self.settings_id = backend.settings_id = backend.pool.settings_id(self.wanted)

    # --- the hot path: client -> server ---

    def data_received(self, data: bytes) -> None:
        if self.state is not State.READY:
            if self.state is State.LOGIN:
                super().data_received(data)
            return
        self.active = True
        backend = self.backend
        if backend is None or self._acquiring is not None or self._queued or self._checking:
            self._held += data
            if self._checking:
                if self.statements.discarding and backend is not None:
                    self.resume_held(backend)
                    return
            elif self._acquiring is None and not self._queued:
                self._dispatch_unlinked()
                return
            if len(self._held) > HELD_LIMIT and not self.peer_paused_us:
                self.peer_paused_us = True
                self.transport.pause_reading()
            return
        self._forward(data, backend)
        if len(data) >= TURN_BYTES and not self._yielding and not self.peer_paused_us and not self.closed:
            self._yielding = True
            self.transport.pause_reading()
            self.loop.call_soon(self._next_turn)

    def _next_turn(self) -> None:
        self._yielding = False
        if not self.peer_paused_us and not self.closed:
            self.transport.resume_reading()

    def _forward(self, data: bytes, backend: PostgresBackend) -> None:
        message = self._message
        if message is not None:  # an inspected message arriving in parts: it grows in place, never re-copied
            missing = self._message_size - len(message)
            if len(data) < missing:
                message += data
                return
            message += memoryview(data)[:missing]
            self._message = None
            self._forward(bytes(message), backend)
            if len(data) > missing and not self.closed:
                self.data_received(data[missing:])  # the backend may have gone back to the pool meanwhile
            return
        scan = self._partial + data if self._partial else data
        self._partial = b""
        end = len(scan)
        pos = self._skip
        self._skip = 0
        if pos and self._scanning:
            self._scan_streamed_query(scan if pos >= end else scan[:pos], first=False)
            self._scanning = pos > end
        limit = self.max_message
        action_of = ACTION
        expect = backend.expect
        pieces: list[bytes] | None = None  # set once a message is rewritten or dropped
        run_start = 0
        hold = end
        gather = 0  # size of an inspected message that starts at `hold` and is not complete yet
        while pos < end:
            if end - pos < 5:
                hold = pos
                break
            kind = scan[pos]
            action = action_of[kind]
            length = int.from_bytes(scan[pos + 1 : pos + 5], "big")
            if length < 4 or length > limit:
                hold = pos
                self._write_pieces(backend, pieces, scan, run_start, hold)
                self.fail(ProtocolViolation(f"invalid message length {length} for message type {chr(kind)!r}"))
                return
            if action == INSPECTED:
                if end - pos >= 1 + length:
                    try:
                        replacement = self._inspect(kind, scan[pos + 5 : pos + 1 + length], backend)
                    except ProtocolViolation as exc:  # as PostgreSQL does: ERROR 08P01, skip to Sync, carry on
                        log.warning("client %s (user %r): %s [%s]", self.peer, self.user, exc.message, exc.sqlstate)
                        PROXY.protocol_errors += 1
                        replacement = self.statements.reject(backend, exc)
                    if replacement is HOLD:
                        self._write_pieces(backend, pieces, scan, run_start, pos)
                        backend.transport.write(self.statements.take_check())
                        self._checking = True
                        self._held += scan[pos:]
                        return
                    if replacement is not None:
                        if pieces is None:
                            pieces = []
                        pieces.append(scan[run_start:pos])
                        pieces.append(replacement)
                        run_start = pos + 1 + length
                elif kind == QUERY_BYTE and length >= STREAM_QUERY_MIN:
                    self._stream_query(scan[pos + 5 : end], backend)  # passes through like COPY data
                else:
                    hold = pos  # whole message needed: names may be rewritten
                    gather = 1 + length
                    break
            elif action == SYNC:
                self.pending += 1
                self.in_extended = False
                expect.append(EXPECT_SYNC)
            elif action == EXTENDED:
                self.in_extended = True
                if kind == EXECUTE_BYTE:
                    expect.append(EXPECT_EXECUTE)
            elif action == TERMINATE:
                self._write_pieces(backend, pieces, scan, run_start, pos)
                self._terminate()
                return
            elif action == INVALID:
                self._write_pieces(backend, pieces, scan, run_start, pos)
                self.fail(ProtocolViolation(f"invalid frontend message type {kind}"))
                return
            pos += 1 + length
        if pos > end:
            self._skip = pos - end
        if hold < end:
            if gather:
                self._message = bytearray(memoryview(scan)[hold:])
                self._message_size = gather
            else:
                self._partial = scan[hold:]
        if pieces is None:
            backend.transport.write(scan if hold == end else scan[:hold])
        else:
            self._write_pieces(backend, pieces, scan, run_start, hold)
        if self.pending == 0:
            self._release_if_done(backend)

    def _stream_query(self, head: bytes, backend: PostgresBackend) -> None:
        """A large Query passes through as it arrives; only its text is scanned for session words on the way."""
        self.pending += 1
        backend.expect.append(EXPECT_QUERY)
        self._scanning = True
        self._scan_streamed_query(head, first=True)

    def _scan_streamed_query(self, part: bytes, first: bool) -> None:
        """Note session words in one part of a streamed Query's text (with the end of the previous part)."""
        window = b";" + part if first else self._scan_tail + part
        self._scan_tail = window[-SCAN_OVERLAP:]
        if STREAMED_WORDS.search(window.translate(WORD_BYTES)) is None:
            return
        # The first part starts the text (LOAD is only recognised there); later ones are joined after a `;`.
        self._note_session_words(window[1:] if first else b";" + window)

    def resume_held(self, backend: PostgresBackend) -> None:
        """A statement check ended (the backend's call): forward what the client sent meanwhile."""
        data = bytes(self._held)
        self._held.clear()
        statements = self.statements
        if statements.discarding:
            data, reached = statements.discard_until_sync(data, self.max_message)
            if not reached:
                self._held += data
                return
        self._checking = False
        if self.peer_paused_us:
            self.peer_paused_us = False
            self.transport.resume_reading()
        if data:
            self._forward(data, backend)
        if not self._checking:
            statements.check = None  # consumed by the held message; never applies to another
            if not data and self.pending == 0:
                self._release_if_done(backend)

    @staticmethod
    def _write_pieces(backend: PostgresBackend, pieces: list[bytes] | None, scan: bytes, start: int,
                      stop: int) -> None:
        if pieces is None:
            backend.transport.write(scan[:stop])
            return
        if start < stop:
            pieces.append(scan[start:stop])
        backend.transport.write(b"".join(pieces))

    # --- messages that are read whole: queries and named statements ---

    def _inspect(self, kind: int, body: bytes, backend: PostgresBackend) -> bytes | None:
        """Note what a Query/Parse/Bind/Describe/Close asks; return its replacement bytes, or None to pass it.

        HOLD means a statement check went out first: the client's bytes from this message on wait for its reply."""
        expect = backend.expect
        statements = self.statements
        if kind == QUERY_BYTE:
            if statements.named and EXECUTE_WORD.match(body):
                replacement = statements.execute_sql(body[:-1], backend)
                if replacement is not None:
                    if replacement is not HOLD:
                        self.pending += 1
                        statements.forget_unnamed(backend)
                    return replacement
            self.pending += 1
            statements.forget_unnamed(backend)
            replacement = self._session_statement(body[:-1], backend) if SESSION_WORDS.search(body) else None
            expect.append(EXPECT_QUERY)
            return replacement
        if kind == FUNCTION_CALL_BYTE:
            self.pending += 1
            expect.append(EXPECT_FUNCTION_CALL)
            return None
        self.in_extended = True
        if kind == PARSE_BYTE:
            name, rest = ext.split_parse(body)
            session_words = SESSION_WORDS.search(rest) is not None
            if session_words:
                self._note_session_words(ext.parse_query_text(rest))
            if not name:
                statements.parse_unnamed(rest, backend, session_words)
                return None
            return statements.parse_named(name, rest, backend, session_words)
        if kind == BIND_BYTE:
            portal, name, rest = ext.split_bind(body)
            if (not name and backend.unnamed_owner is statements and backend.unnamed_serial == statements.unnamed_serial
                    and statements.check is None and not statements.unnamed_words):
                expect.append(EXPECT_BIND)  # the client's own unnamed statement, parsed on this backend
                return None
            return statements.bind(portal, name, rest, backend)
        target, name = ext.split_target(body, "Describe" if kind == DESCRIBE_BYTE else "Close")
        if kind == DESCRIBE_BYTE:
            if target == STATEMENT:
                return statements.describe(name, backend)
            expect.append(EXPECT_DESCRIBE_PORTAL)
            return None
        if target == STATEMENT:
            if name:  # Close of a named statement: the client's name goes, the backend's stays
                statements.close_named(name)
                self._inject(backend, ext.CLOSE_COMPLETE)
                return b""
            statements.forget_unnamed(backend)
        expect.append(EXPECT_CLOSE)
        return None

    def _inject(self, backend: PostgresBackend, reply: bytes) -> None:
        """A reply the proxy gives itself, in its place among the backend's replies."""
        if backend.expect:
            backend.expect.append(ext.Expectation(ext.CLOSE, ext.INJECT, reply))
        else:
            self.write(reply)

    def _session_statement(self, sql: bytes, backend: PostgresBackend) -> bytes | None:
        """A Query that may change session state: DEALLOCATE is mapped, the rest noted for inspection."""
        self._note_session_words(sql)
        return self.statements.deallocate_sql(sql, backend)

    def note_session_words(self, sql: bytes) -> None:
        """A statement whose text may change session state runs (again): read the state back afterwards."""
        self._note_session_words(sql)

    def _note_session_words(self, sql: bytes) -> None:
        database = database_ddl_target(sql)
        if database is not None:  # the server refuses while the pool keeps idle sessions on that database
            close_idle_backends(self.service.target.pools.values(), database)
        if self.service.exclude_variable_sets and all(
            word.lower() in VARIABLE_WORDS for word in SESSION_WORDS.findall(sql)
        ):
            return  # the user chose not to track SETs: they stay on whichever backend ran them
        self._state_dirty = True
        if DISCARD_ALL.search(sql):
            self.statements.forget_all(self.backend)
        if LOAD.match(sql):
            self._pin("LOAD")

    def _dispatch_unlinked(self) -> None:
        """With no backend: answer what needs none (Sync, Flush, Terminate, stray COPY data), else borrow one."""
        held = self._held
        if self._dropping:
            dropped = min(self._dropping, len(held))
            del held[:dropped]
            self._dropping -= dropped
        while len(held) >= 5:
            kind = held[0]
            action = ACTION[kind]
            length = int.from_bytes(held[1:5], "big")
            if action == INVALID:
                self.fail(ProtocolViolation(f"invalid frontend message type {kind}"))
                return
            if length < 4 or length > self.max_message:
                self.fail(ProtocolViolation(f"invalid message length {length} for message type {chr(kind)!r}"))
                return
            if action == TERMINATE:
                self._terminate()
                return
            if action == COPY or kind == ord("H") or (action == SYNC and not self.in_extended):
                if len(held) < length + 1:
                    if action == COPY:  # dropped as it arrives, never gathered
                        self._dropping = length + 1 - len(held)
                        held.clear()
                    return
                del held[: length + 1]
                if action == SYNC:
                    self.write(pg.READY_FOR_QUERY_IDLE)
                continue
            self._start_work()
            return

    def _start_work(self) -> None:
        """Get a backend for the held messages: at once when one is idle, else wait in line (no task)."""
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
        if backend.settings_id == self.settings_id and not backend.buffered:
            self._attach(backend)
        else:  # settings to apply first
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

    async def _acquire(self, pool: Pool, backend: PostgresBackend | None) -> None:
        try:
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
            pool.release(backend)
            return
        self._attach(backend)

    def _attach(self, backend: PostgresBackend) -> None:
        """Link a ready backend and send it what the client sent meanwhile."""
        self.backend = backend
        backend.link(self)
        data = bytes(self._held)
        self._held.clear()
        if not backend.pool.session_mode:  # sequence values: only this client's on this session from now on
            discard, hold = seq.attach(backend, self.process_id, self._seq_words)
            self._seq_words = set()
            if discard:
                backend.transport.write(discard)
            self._seq_hold = hold and self.service.settings.sequence_hold > 0
            self.seq_backend, self.seq_use = backend, backend.uses
        if self.peer_paused_us:
            self.peer_paused_us = False
            self.transport.resume_reading()
        self._forward(data, backend)

    def _terminate(self) -> None:
        self.state = State.CLOSED
        self.close()

    # --- events from the linked backend ---

    def backend_ready(self, backend: PostgresBackend, count: int) -> None:
        """ReadyForQuery passed through: give the backend back when the client's work on it is done."""
        self.pending -= count
        if self.pending <= 0:
            self._release_if_done(backend)

    def _release_if_done(self, backend: PostgresBackend) -> None:
        """Transaction mode: back to the pool once nothing is running, pending or half-sent."""
        if (self.in_extended or backend.tx_status != pg.IDLE or self._skip or self._partial or backend.expect
                or self._message is not None or not backend.at_boundary or self._checking):
            return
        self.pending = 0
        pool = backend.pool
        if self._state_dirty and not pool.session_mode:
            self._state_dirty = False
            self._hold_for_sequences(backend, allowed=False)
            self.backend = None
            backend.unlink()
            self._acquiring = self.loop.create_task(self._inspect_session(backend))
            return
        if pool.session_mode or self.pins:
            return
        if self._hold_for_sequences(backend, allowed=True):
            return
        self.backend = None
        backend.unlink()
        pool.stats.transactions += 1
        pool.release(backend)

    async def _inspect_session(self, backend: PostgresBackend) -> None:
        """After a transaction that may have changed session state: read it back, then release or pin."""
        pool = backend.pool
        try:
            rows = await backend.simple_query(SESSION_STATE_QUERY)
        except (ProxyError, ConnectionClosed, OSError) as exc:
            self._acquiring = None
            pool.discard(backend)
            self.fail(BackendUnavailable(f"the database connection failed: {exc}"))
            return
        reported = pool.server_params
        settings = {str(name): value or "" for name, value in rows if name and not name.startswith("!")}
        for name in [n for n in self.wanted if n not in reported]:
            del self.wanted[name]
        for name in [n for n in backend.params if n not in reported]:
            del backend.params[name]
        for name, value in settings.items():
            if name not in reported and name not in FIXED_PARAMETERS:
                self.wanted[name] = value
                backend.params[name] = value
        self.settings_id = backend.settings_id = pool.settings_id(self.wanted)
        pins = {PIN_REASONS[name] for name, count in rows if name in PIN_REASONS and count not in (None, "0")}
        pins |= self.pins & STICKY_PINS
        for reason in pins - self.pins:
            PINS.pinned(reason)
            log.info("client %s pinned to backend %s: %s", self.peer, backend, reason)
        if self.pins and not pins:
            PINS.unpinned()
            log.info("client %s unpinned: its session state is gone", self.peer)
        elif pins and not self.pins:
            PINS.current += 1
        self.pins = pins
        self._acquiring = None
        if backend.notifications and not self.closed:  # they came while the proxy read the session back
            self.write(backend.take_notifications(self.process_id))
        if self.closed:
            self._return_after_client(backend)
        elif pins:
            self._attach(backend)
        else:
            pool.stats.transactions += 1
            pool.release(backend)
            if self._held:
                self._dispatch_unlinked()

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
        if allowed and (writer or self._seq_holding is not None):
            if not active:
                PINS.current += 1
                PINS.pinned(seq.HOLD_REASON)
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
            PINS.unpinned()
        return False

    def _sequence_hold_over(self, backend: PostgresBackend) -> None:
        """The hold's time is up: a reserved backend goes back to the pool, a busy one at its transaction's end."""
        self._seq_holding = None
        if self._reserved is backend:
            self._reserved = None
            PINS.unpinned()
            backend.pool.stats.transactions += 1
            backend.pool.release(backend)
        elif self.backend is backend and not self.closed:
            self._seq_hold_over = True
        else:
            PINS.unpinned()

    def _pin(self, reason: str) -> None:
        if reason not in self.pins:
            if not self.pins:
                PINS.current += 1
            self.pins.add(reason)
            PINS.pinned(reason)
            log.info("client %s pinned to its backend: %s", self.peer, reason)

    def backend_lost(self, backend: PostgresBackend, exc: Exception | None) -> None:
        backend.pool.discard(backend)
        if self.backend is backend:
            self.backend = None
            if backend.ended_by_server:  # the client has the server's own FATAL: a second one would confuse it
                log.warning("client %s: the database ended backend %s with an error passed to the client",
                            self.peer, backend)
                self.state = State.CLOSED
                self.close()
                return
            log.warning("client %s: backend %s was lost: %s", self.peer, backend, exc or "closed")
            self.fail(BackendUnavailable("the database connection was lost"))

    def linked_peer(self) -> Connection | None:
        return self.backend

    # --- janitor ---

    def check_idle(self, now: float, timeout: float) -> None:
        if self.active or self.state is not State.READY:
            self.active = False
            self.idle_since = now
            return
        message_timeout = self.service.server.client_message_timeout
        if now - self.idle_since > message_timeout and self.mid_message():
            self.fail(ClientMessageTimeout(f"closing the connection: the client stopped in the middle of a message "
                                           f"for more than {message_timeout:g} s"))
            return
        if self.backend is not None and (self.pending or self.backend.tx_status != pg.IDLE):
            return  # inside a transaction or a query: not idle in RDS Proxy's sense
        if now - self.idle_since > timeout:
            PROXY.idle_client_timeouts += 1
            self.fail(IdleClientTimeout(f"closing the connection after {timeout:g} s of inactivity"))

