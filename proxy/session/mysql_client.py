"""A MySQL client session: handshake, TLS, authentication, then transaction-level forwarding of commands."""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import re
import ssl
from enum import IntEnum
from typing import Any, cast

from proxy.auth.failures import FailedLogins
from proxy.auth.mysql import (
    check_caching_sha2,
    check_clear_password,
    check_native_password,
    parse_clear_password,
    rsa_decrypt_password,
)
from proxy.config import ClientTLSMode, MySQLAuthMethod
from proxy.errors import (
    AuthenticationFailed,
    AuthorizationFailed,
    BackendUnavailable,
    ClientMessageTimeout,
    IdleClientTimeout,
    LoginTimeout,
    NotSupported,
    ProtocolViolation,
    ProxyError,
    UnknownCommand,
)
from proxy.netio import WRITE_HIGH_WATER, WRITE_LOW_WATER, Connection, ConnectionClosed
from proxy.pool.mysql_backend import (
    ENABLE_TRACKING,
    RELAYED_CAPABILITIES,
    STATEMENT_LIMIT,
    MySQLBackend,
    MySQLServerError,
    Profile,
)
from proxy.pool.pool import Pool
from proxy.protocol.mysql import constants as my
from proxy.protocol.mysql.effects import EXECUTE, FETCH, INTERNAL, PREPARE, QUERY, RESET, SCHEMA, SET_OPTION, STMT_RESET
from proxy.protocol.mysql.packets import (
    AuthSwitchRequest,
    ChangeUser,
    ErrPacket,
    HandshakeResponse41,
    HandshakeV10,
    OkPacket,
    build_auth_more_data,
    frame,
    is_ssl_request,
    parse_session_state,
    read_lenenc_str,
)
from proxy.protocol.mysql.packets import ProtocolViolation as MySQLProtocolViolation
from proxy.protocol.mysql.statements import (
    BULK_FLAGS_AT,
    BULK_SEND_TYPES,
    BULK_TYPES_AT,
    EXECUTE_CURSOR_FLAGS,
    EXECUTE_FLAGS_AT,
    LAST_PREPARED,
    bound_flag_at,
    head_with_types,
    relabelled_head,
    statement_id,
    unknown_statement,
)
from proxy.session import mysql_ids as ids
from proxy.session.client import ClientConnection, TLSHandshakeFailed
from proxy.session.mysql_inspect import (
    ANSWER_ERR,
    ANSWER_OK,
    ANY,
    CHANGE_USER,
    FORWARD,
    FORWARD_PLAIN,
    FOUND_ROWS,
    INSERT_ID_EXPRESSION,
    KILL,
    NO_NAME,
    PREPARED_ROW_COUNT,
    QUIT,
    STATE_CHANGE,
    TEMPORARY_TABLE,
    Inspection,
    QueryEffect,
    inspect_query,
    prepared_effect,
)
from proxy.session.mysql_service import MySQLService
from proxy.session.mysql_statements import ClientStatement
from proxy.session.state import SessionState

log = logging.getLogger(__name__)
failed_logins = FailedLogins(log)
FAIL_LINE = "client %s (user %r): %s [%d %s]"  # the warning line of a client's failed login or refused session

INSPECT_LIMIT = 64 * 1024  # bytes of a command looked at before forwarding (the whole command if shorter)
LOGIN_PACKET_LIMIT = 64 * 1024
HELD_LIMIT = 256 * 1024
# After a read this large, the client's next read waits for the event loop's next turn, so that a client
# streaming a huge packet takes one read per turn and every other connection gets its turn in between.
TURN_BYTES = 128 * 1024
SCRAMBLE_CHARS = bytes(range(0x21, 0x7F)).replace(b"$", b"")
# What an unknown user's answer is checked against: the same work as for a known user's.
_NOBODYS_PASSWORD = os.urandom(16).hex().encode()
_SCRAMBLE_TABLE = bytes(SCRAMBLE_CHARS[b % len(SCRAMBLE_CHARS)] for b in range(256))  # random byte -> scramble char
BUSY_FLAGS = my.SERVER_STATUS_IN_TRANS  # (open cursors are followed per statement)

FORWARDED_COMMANDS = frozenset({
    my.COM_QUERY, my.COM_INIT_DB, my.COM_FIELD_LIST, my.COM_STATISTICS, my.COM_PROCESS_INFO, my.COM_DEBUG,
    my.COM_REFRESH, my.COM_PING, my.COM_SET_OPTION, my.COM_RESET_CONNECTION,
})
# Binary-protocol statement commands: the statement ids in them are the proxy's (see mysql_statements).
STATEMENT_COMMANDS = frozenset({
    my.COM_STMT_PREPARE, my.COM_STMT_EXECUTE, my.COM_STMT_SEND_LONG_DATA, my.COM_STMT_CLOSE, my.COM_STMT_RESET,
    my.COM_STMT_FETCH, my.COM_STMT_BULK_EXECUTE,
})
STATEMENT_COMMAND_NAMES = {
    my.COM_STMT_EXECUTE: "mysqld_stmt_execute", my.COM_STMT_FETCH: "mysqld_stmt_fetch",
    my.COM_STMT_RESET: "mysqld_stmt_reset", my.COM_STMT_BULK_EXECUTE: "mysqld_stmt_bulk_execute",
    my.COM_STMT_SEND_LONG_DATA: "mysqld_stmt_send_long_data",
}
INTERNAL_PLAIN = (INTERNAL, None)  # a command of the proxy's own whose response is swallowed
ER_STMT_HAS_NO_OPEN_CURSOR = 1421
# Session variables the server reports that are not replayed: followed otherwise, one-shot, or the proxy's own.
UNTRACKED_VARIABLES = frozenset({
    b"autocommit", b"insert_id", b"last_insert_id", b"identity", b"rand_seed1", b"rand_seed2", b"timestamp",
    b"session_track_system_variables", b"session_track_schema", b"session_track_state_change",
    b"session_track_transaction_info", b"session_track_gtids", b"character_set_database", b"collation_database",
})
CHARSET_VARIABLES = frozenset({b"character_set_client", b"character_set_connection", b"character_set_results",
                               b"collation_connection"})
# SET NAMES / character_set_* settings of the client's, applied over its login's character set
CHARSET_SETTINGS = ("character set", *(name.decode() for name in CHARSET_VARIABLES))
ER_INCORRECT_GLOBAL_LOCAL_VAR = 1238  # "Variable '%s' is a read only variable"
# The C client libraries take an ERR from the server with an errno of their own range (CR_*, 2000-2999, e.g. 2003
# can't connect, 2013 lost connection) for a malformed packet ("ERROR 2027"): they get the nearest server errno.
C_LIBRARIES = frozenset({"libmariadb", "libmysql"})
CLIENT_ERRNO_FIRST, CLIENT_ERRNO_LAST = 2000, 2999
ER_NET_READ_ERROR = 1158  # "Got an error reading communication packets"
ER_CONNECT_TO_FOREIGN_DATA_SOURCE = 1429  # "Unable to connect to foreign data source"
C_LIBRARY_ERRNOS = {2002: (ER_CONNECT_TO_FOREIGN_DATA_SOURCE, "08S01"),
                    2003: (ER_CONNECT_TO_FOREIGN_DATA_SOURCE, "08S01")}
NUMBER = re.compile(rb"-?\d+(?:\.\d+)?\Z")


def sql_literal(name: bytes, value: bytes) -> bytes:
    """A session variable's reported value as SQL to assign it again."""
    if NUMBER.match(value):
        return value
    if not value and name in CHARSET_VARIABLES:
        return b"NULL"
    if b"\\" in value:
        return b"0x" + value.hex().encode()
    return b"'" + value.replace(b"'", b"''") + b"'"


class State(IntEnum):
    LOGIN = 0
    READY = 1  # logged in; forwarding
    CLOSED = 2


def _make_scramble() -> bytes:
    return os.urandom(my.SCRAMBLE_LENGTH).translate(_SCRAMBLE_TABLE)


def _refuse_login(client: MySQLClient, error: AuthenticationFailed) -> None:
    client.log_failed_login(failed_logins, client.user, FAIL_LINE, client.peer, client.user, error.message,
                            error.mysql_errno, error.mysql_sqlstate)
    client.fail(error, logged=True)


class MySQLClient(ClientConnection):
    """One client connection; owns at most one backend at a time (between transactions in transaction mode)."""

    def __init__(self, service: MySQLService) -> None:
        super().__init__(service.server.max_message_size)
        self.service = service
        self.stats = service.stats
        self.state = State.LOGIN
        self._handshaking = False  # in the TLS handshake after an SSLRequest
        self.connection_id = 0
        # user, default database (schema), autocommit, settings, user variables, statements, pin reasons
        self.session: SessionState[bytes, ClientStatement] = SessionState()
        self.multi_statements = False
        self.capabilities = 0  # negotiated with this client
        self.c_library = False  # libmariadb / libmysqlclient: no client-range errno in an ERR (see _send_error)
        self.profile = Profile(0, my.UTF8MB4_GENERAL_CI)
        self.pool: Pool | None = None
        self.backend: MySQLBackend | None = None
        self._next_statement_id = 1
        self._last_prepared = 0  # the id of the client's last COM_STMT_PREPARE (MariaDB's statement id -1)
        self._pins_logged: set[str] = set()
        self._settings_key: bytes | None = b""  # the settings as bytes (part of prepared statement keys)
        self.last_insert_id = 0  # what LAST_INSERT_ID() says in this session, as far as OK packets told
        self.row_count = 0  # what ROW_COUNT() says after the client's last statement (set by the backend)
        self.found_rows = 0  # what FOUND_ROWS() says: rows of the client's last result set (set by the backend)
        self._wait_timeout: tuple[bytes | None, float | None] = (None, None)  # (setting body, its seconds)
        self.cursors = 0  # statements with a cursor open on the backend (it stays until they are closed)
        self.long_data = 0  # statements with parameter data sent ahead to the backend (it stays until executed)
        self._hold_next = 0  # 1: the backend stays for the next statement; 2: that statement was sent
        self._stalled = False  # client bytes wait in _held until the backend has answered what it was sent
        self._drop = 0  # bytes of the current client frame to drop (a command answered here)
        self.kills_in_flight = 0
        self.active = True
        self.idle_since = 0.0
        self.scramble = b""
        self._default_autocommit = True
        self._seq = 0  # the sequence id the client's next frame must carry
        self._reply_seq = 0
        self._skip = 0  # bytes of the current client frame still to pass through
        self._cont = False  # the next frame continues the current packet (or the LOCAL INFILE upload)
        self._infile = False  # the client is uploading a LOCAL INFILE file
        self._partial = bytearray()  # an incomplete frame head (or inspected command) growing until it is whole
        self._partial_need = 0  # the length _partial must reach before it is walked
        self._size = 0  # bytes of the current logical packet so far (its frames of 16 MB - 1 add up)
        self._yielding = False  # reading waits for the event loop's next turn (see TURN_BYTES)
        self._held = bytearray()  # client bytes arriving while a backend is borrowed or a command handled here
        self._busy: asyncio.Task[None] | None = None
        self._borrowing = False

    @property
    def user(self) -> str:
        return self.user

    def __repr__(self) -> str:
        return f"MySQLClient({self.peer}, id={self.connection_id}, user={self.user!r})"

    # --- lifecycle ---

    async def _login_with_timeout(self) -> None:
        try:
            # In this task, not a wait_for task: a failed login's exception would hold that task in a reference
            # cycle (its traceback's wait_for frame -> the task -> the exception), keeping this client and its
            # transport's TLS state alive until a full garbage collection.
            async with asyncio.timeout(self.service.server.client_login_timeout):
                await self._login()
            if self.state is State.LOGIN and not self.closed:
                await self._login_ready()  # may wait for a backend: the borrow timeout applies, not this one
        except TimeoutError:
            self.stats.login_timeouts += 1
            self.fail(LoginTimeout("Got timeout reading communication packets: the client did not complete its "
                                   "login in time"))
        except TLSHandshakeFailed:
            pass  # logged and closed where it failed
        except ConnectionClosed:
            log.info("client %s closed the connection during login", self.peer)
            self.close()
        except AuthenticationFailed as exc:
            self.stats.logins_failed += 1
            _refuse_login(self, exc)
        except ProxyError as exc:
            self.fail(exc)
        except Exception as exc:  # the edge: anything unexpected becomes an ERR for this client only
            log.exception("client %s: login failed unexpectedly", self.peer)
            self.fail(ProxyError(f"internal error: {type(exc).__name__}"))

    def fail(self, error: ProxyError, logged: bool = False) -> None:
        """Send the client an ERR packet for `error`, log the reason (unless `logged`) and close."""
        if self.closed or self.state is State.CLOSED:
            return
        if not logged:
            log.warning(FAIL_LINE, self.peer, self.user, error.message, error.mysql_errno, error.mysql_sqlstate)
        if isinstance(error, ProtocolViolation):
            self.stats.protocol_errors += 1
        self._send_error(error, self._reply_seq if self.state is State.LOGIN else 1)
        self.state = State.CLOSED
        self.close()

    def _send_error(self, error: ProxyError, seq: int) -> None:
        errno, sqlstate = error.mysql_errno, error.mysql_sqlstate
        if self.c_library and CLIENT_ERRNO_FIRST <= errno <= CLIENT_ERRNO_LAST:
            errno, sqlstate = C_LIBRARY_ERRNOS.get(errno, (ER_NET_READ_ERROR, "08S01"))
        packet = ErrPacket(errno, error.message, sqlstate)
        self.write(frame(packet.build(self.capabilities or my.CLIENT_PROTOCOL_41), seq))

    def _send_ok(self, seq: int = 1) -> None:
        status = my.SERVER_STATUS_AUTOCOMMIT if self.session.autocommit else 0
        self.write(frame(OkPacket(status_flags=status).build(self.capabilities), seq))

    def on_closed(self, exc: Exception | None) -> None:
        self.state = State.CLOSED
        self.stats.clients_current -= 1
        if self.session.pins:
            self.stats.unpinned()
        if self.service.clients.get(self.connection_id) is self:
            del self.service.clients[self.connection_id]
        if self.pool is not None:
            self.pool.clients.discard(self)
        # Let go of the login task: cancelled, it keeps its CancelledError, whose traceback holds the task's frame
        # and so this client (with its transport and any failed TLS state) in a cycle only a full collection frees.
        # A login waiting for the client's bytes was just woken and ends with ConnectionClosed (logged) instead,
        # and one in the TLS handshake ends with the handshake's failure (one warning line).
        task, self._task = self._task, None
        if task is not None and not task.done() and self._waiter is None and not self._handshaking:
            task.cancel()
        busy = self._busy
        if busy is not None and self._borrowing:
            self._busy = None  # (as the login task above: a cancelled task would hold this client in a cycle)
            busy.cancel()
        backend = self.backend
        if backend is not None:
            self.backend = None
            backend.unlink()
            self._return_after_client(backend)

    def _return_after_client(self, backend: MySQLBackend) -> None:
        """Give a backend back after its client left (or changed user): at once, cleaned first, or dropped."""
        pool = backend.pool
        if backend.closed:
            pool.discard(backend)
            return
        if not backend.idle or self._skip or self._cont or self._infile or self._partial:
            log.warning("client %s left while a query was running; cancelling it and dropping %s", self.peer,
                        backend)
            if not backend.tracker.done:
                self.loop.create_task(self.service.kill_query(backend))
            pool.discard(backend)
            return
        if (backend.tracker.status_flags & BUSY_FLAGS or self.session.pins or self.cursors or self.long_data
                or self._hold_next or pool.session_mode or backend.schema != pool.database):
            log.info("client %s left inside a transaction or session; cleaning %s before reuse", self.peer, backend)
            self.loop.create_task(self._clean_up(backend))
            return
        pool.stats.transactions += 1
        _release(backend)

    @staticmethod
    async def _clean_up(backend: MySQLBackend) -> None:
        try:
            await backend.reset()
        except (ProxyError, ConnectionClosed, OSError) as exc:
            log.info("backend %s could not be reset (%s); dropping it", backend, exc)
            backend.pool.discard(backend)
            return
        backend.pool.release(backend)

    # --- login ---

    async def _read_login_packet(self) -> bytes:
        header = await self.read_exact(4)
        length = header[0] | (header[1] << 8) | (header[2] << 16)
        seq = header[3]
        if length > LOGIN_PACKET_LIMIT:
            raise _violation(f"Bad handshake: a login packet of {length} bytes", my.ER_HANDSHAKE_ERROR)
        if seq != self._seq:
            raise _violation(f"Got packets out of order: sequence id {seq}, expected {self._seq}",
                             my.ER_NET_PACKETS_OUT_OF_ORDER)
        payload = await self.read_exact(length)
        self._seq = self._reply_seq = (seq + 1) & 0xFF
        return payload

    def _write_login(self, payload: bytes) -> None:
        self.write(frame(payload, self._seq))
        self._seq = (self._seq + 1) & 0xFF
        self._reply_seq = self._seq

    async def _login(self) -> None:
        service = self.service
        if self.over_limit is not None:  # an ERR in place of the greeting, as the server does
            raise self.over_limit
        unreachable: ProxyError | None = None
        try:
            greeting = await service.backend_greeting()
        except ProxyError as exc:  # the client still gets a greeting, then the reason as an ERR it can show
            greeting = service.stand_in_greeting()
            unreachable = exc
        self.connection_id = service.new_connection_id()
        self.scramble = _make_scramble()
        announced = service.announced_capabilities(greeting)
        method = service.settings.auth_method
        status = greeting.status_flags
        self._default_autocommit = bool(status & my.SERVER_STATUS_AUTOCOMMIT) or not status
        hello = HandshakeV10(service.settings.server_version or greeting.server_version, self.connection_id,
                             self.scramble, announced, greeting.charset or my.UTF8MB4_GENERAL_CI,
                             my.SERVER_STATUS_AUTOCOMMIT, method.value)
        self._write_login(hello.build())
        payload = await self._read_login_packet()
        if is_ssl_request(payload):
            if service.server_tls is None:
                raise _violation("Bad handshake: TLS was requested but is not offered", my.ER_HANDSHAKE_ERROR)
            self._handshaking = True
            try:
                await self._start_tls(service.server_tls)
            except TLSHandshakeFailed:
                raise
            except (ssl.SSLError, OSError, ConnectionClosed, BackendUnavailable) as exc:
                raise self.tls_failed(exc) from None
            finally:
                self._handshaking = False
            payload = await self._read_login_packet()
        response = HandshakeResponse41.parse(payload)
        self.capabilities = response.capabilities & announced
        self.c_library = (response.connect_attrs or {}).get("_client_name") in C_LIBRARIES
        self.session.user = response.username
        if service.config.tls.mode is ClientTLSMode.REQUIRE and not self.is_tls:
            raise AuthorizationFailed("Connections using insecure transport are prohibited: the proxy requires TLS")
        await self._authenticate(response.auth_plugin_name, response.auth_response,
                                 bool(response.capabilities & my.CLIENT_PLUGIN_AUTH))
        self.session.database = (response.database or "") if response.capabilities & my.CLIENT_CONNECT_WITH_DB else ""
        self.profile = Profile(self.capabilities & RELAYED_CAPABILITIES, response.charset)
        self.multi_statements = bool(self.capabilities & my.CLIENT_MULTI_STATEMENTS)
        self.session.autocommit = self._default_autocommit
        if unreachable is not None:
            raise service.unreachable_error(unreachable)

    async def _login_ready(self) -> None:
        """Authenticated: a pool (and in session mode a backend), then the OK that ends the login."""
        service = self.service
        await self._prepare_session()
        service.clients[self.connection_id] = self
        self._send_ok(self._seq)
        self.stats.logins_ok += 1
        self.state = State.READY
        self._seq = 0
        leftover = self.take_buffered()
        if leftover:
            self.data_received(leftover)

    async def _start_tls(self, context: ssl.SSLContext) -> None:
        """TLS after an SSLRequest. The client does not wait for an answer: its ClientHello may be here already."""
        early = self.take_buffered()
        if not early:
            await self.start_tls(context, server_side=True)
            return
        handshake = self.loop.create_task(self.upgrade(context, server_side=True))  # checks for a closing socket
        for _ in range(100):  # let start_tls put its TLS protocol in place (and run its connection_made)
            await asyncio.sleep(0)
            if handshake.done():
                break
            if self.transport.get_protocol() is not self:
                await asyncio.sleep(0)
                break
        tls_protocol: Any = self.transport.get_protocol()  # uvloop's is buffered without subclassing asyncio's
        if handshake.done():  # the client left before TLS could start (ConnectionClosed)
            try:
                await handshake
            finally:
                del handshake
            raise BackendUnavailable("TLS could not be started")
        if tls_protocol is self or not hasattr(tls_protocol, "buffer_updated"):
            handshake.cancel()
            raise BackendUnavailable("TLS could not be started")
        view = memoryview(early)
        while view:
            buffer = tls_protocol.get_buffer(len(view))
            size = min(len(buffer), len(view))
            buffer[:size] = view[:size]
            tls_protocol.buffer_updated(size)
            view = view[size:]
        try:
            transport = await handshake
        finally:
            del handshake  # a failed task keeps its exception, whose traceback holds this frame: no cycle
        if transport is None:
            raise BackendUnavailable("TLS handshake did not complete")
        self.transport = cast(asyncio.Transport, transport)
        self.transport.set_write_buffer_limits(WRITE_HIGH_WATER, WRITE_LOW_WATER)

    async def _authenticate(self, plugin: str | None, response: bytes, plugin_auth: bool) -> None:
        """Check the client's password with the configured method; an auth switch if it used another one."""
        service = self.service
        method = service.settings.auth_method
        secret = service.secrets.get(self.user)
        known, password = (True, secret.password) if secret is not None else (False, _NOBODYS_PASSWORD)
        if method is MySQLAuthMethod.CLEAR and not self.is_tls:
            raise AuthorizationFailed(f"Access denied for user '{self.user}': mysql_clear_password is allowed only "
                                      "over TLS")
        nonce = self.scramble
        if (plugin or my.MYSQL_NATIVE_PASSWORD) != method.value:
            if not plugin_auth and method is not MySQLAuthMethod.NATIVE:
                raise AuthorizationFailed(f"Access denied for user '{self.user}': the client cannot switch to "
                                          f"{method.value}")
            if method is MySQLAuthMethod.CLEAR:
                self._write_login(AuthSwitchRequest(method.value, b"").build())
            else:
                self._write_login(AuthSwitchRequest.for_scramble(method.value, nonce).build())
            response = await self._read_login_packet()
        ok = False
        if method is MySQLAuthMethod.NATIVE:
            ok = check_native_password(password, nonce, response) and known
        elif method is MySQLAuthMethod.CLEAR:
            ok = check_clear_password(password, response) and known
        elif not service.settings.caching_sha2_full_auth:
            ok = check_caching_sha2(password, nonce, response) and known
            if ok:
                self._write_login(build_auth_more_data(bytes((my.CACHING_SHA2_FAST_AUTH_SUCCESS,))))
        else:
            self._write_login(build_auth_more_data(bytes((my.CACHING_SHA2_PERFORM_FULL_AUTH,))))
            answer = await self._read_login_packet()
            if self.is_tls:
                given: bytes | None = parse_clear_password(answer)
            else:
                if answer == bytes((my.CACHING_SHA2_REQUEST_PUBLIC_KEY,)):
                    self._write_login(build_auth_more_data(service.rsa_public_pem))
                    answer = await self._read_login_packet()
                try:
                    assert service.rsa_key is not None
                    given = rsa_decrypt_password(service.rsa_key, answer, nonce)
                except ValueError:
                    given = None
            ok = hmac.compare_digest(given or b"", password) and given is not None and known
        if not ok:
            raise AuthenticationFailed(f"Access denied for user '{self.user}'@'{self.peer.rpartition(':')[0]}' "
                                       f"(using password: {'YES' if response else 'NO'})")

    async def _prepare_session(self) -> None:
        """Pick the pool; check the database once per pool; keep a backend from now on in session mode."""
        pool = self._use_pool(self.session.database)
        if not pool.session_mode and pool.stats.opened:
            return
        backend = await self._borrow(pool)
        try:
            await self._sync(backend)
        except BaseException:
            pool.discard(backend)
            raise
        if pool.session_mode:
            self._link(backend)
        else:
            pool.release(backend)

    def _use_pool(self, schema: str) -> Pool:
        """The pool for `schema` (and the user and profile) from now on; the pool knows who uses it."""
        if self.pool is not None:
            self.pool.clients.discard(self)
        pool = self.pool = self.service.pool_for(schema, self.user, self.profile)
        pool.clients.add(self)
        return pool

    # --- borrowing and linking ---

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

    def _state_refused(self, backend: MySQLBackend, name: str | None, failure: bytes) -> None:
        """The backend refused a session variable of the client's (or its character set, name None): a session
        variable leaves the client's session (logged)."""
        error = ErrPacket.parse(failure)
        if name is None:
            log.warning("client %s: its character set %d could not be given to %s: %s", self.peer,
                        self.profile.charset, backend, error.message)
            return
        log.warning("client %s: session variable %s could not be set again on %s (%d %s); it is dropped from "
                    "the client's session", self.peer, name, backend, error.error_code, error.message)
        if error.error_code == ER_INCORRECT_GLOBAL_LOCAL_VAR:  # read only: never followed again on this target
            self.service.read_only_variables.add(name.encode("ascii", "replace"))
        self.session.settings.pop(name, None)
        self._settings_key = None

    def _link(self, backend: MySQLBackend) -> None:
        self.backend = backend
        backend.link(self)

    def _need_backend(self) -> None:
        """The held command needs a backend: link an idle one at once, or borrow one in a task."""
        pool = self.pool
        assert pool is not None
        idle = pool.borrow_idle()
        if idle is not None:
            assert isinstance(idle, MySQLBackend)
            if not idle.buffered and not idle.closed and self._in_sync(idle):
                self._link(idle)
                self._resume()
                return
        self._busy = self.loop.create_task(self._acquire(idle if isinstance(idle, MySQLBackend) else None))

    async def _acquire(self, backend: MySQLBackend | None) -> None:
        pool = self.pool
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
            pool.release(backend)
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

    # --- the hot path: client -> server ---

    def data_received(self, data: bytes) -> None:
        if self.state is not State.READY:
            if self.state is State.LOGIN:
                super().data_received(data)
            return
        self.active = True
        if self._busy is not None or self._stalled:
            self._held += data
            if len(self._held) > HELD_LIMIT and not self.peer_paused_us:
                self.peer_paused_us = True
                self.transport.pause_reading()
            return
        partial = self._partial
        if partial:  # grows in place, never re-copied; walked once whole
            partial += data
            if len(partial) < self._partial_need:
                return
            data = bytes(partial)
            self._partial = bytearray()
        self._walk(data)
        if len(data) >= TURN_BYTES and not self._yielding and not self.peer_paused_us and not self.closed:
            self._yielding = True
            self.transport.pause_reading()
            self.loop.call_soon(self._next_turn)

    def _next_turn(self) -> None:
        self._yielding = False
        if not self.peer_paused_us and not self.closed:
            self.transport.resume_reading()

    def _too_large(self, scan: bytes, start: int, pos: int, size: int) -> None:
        """The packet at scan[pos] makes a logical packet over max_message_size: refused at its header."""
        self._protocol_error(scan, start, pos, f"Got a packet bigger than the proxy's max_message_size "
                             f"({self.max_message} bytes): at least {size} bytes", my.ER_NET_PACKET_TOO_LARGE)

    def _walk(self, scan: bytes) -> None:
        """Forward whole commands to the linked backend; answer what needs none; borrow a backend when needed."""
        backend = self.backend
        end = len(scan)
        pos = start = 0
        if self._drop:  # the rest of a command answered here
            if self._drop >= end:
                self._drop -= end
                return
            pos = start = self._drop
            self._drop = 0
        elif self._skip:
            assert backend is not None
            if self._skip >= end:
                self._skip -= end
                backend.transport.write(scan)
                return
            pos = self._skip
            self._skip = 0
        need = 4  # bytes from pos the walk needs before it can go on
        while pos < end:
            if end - pos < 4:
                need = 4
                break
            length = scan[pos] | (scan[pos + 1] << 8) | (scan[pos + 2] << 16)
            seq = scan[pos + 3]
            if self._cont or self._infile:  # the rest of a long packet, or LOCAL INFILE content
                assert backend is not None
                if seq != self._seq:
                    self._protocol_error(scan, start, pos, f"Got packets out of order: sequence id {seq}, "
                                         f"expected {self._seq}", my.ER_NET_PACKETS_OUT_OF_ORDER)
                    return
                size = self._size + length if self._cont else length
                if size > self.max_message:
                    self._too_large(scan, start, pos, size)
                    return
                self._size = size
                self._seq = (seq + 1) & 0xFF
                if self._infile and not self._cont and length == 0:
                    self._infile = False
                    backend.tracker.feed_infile(b"")
                self._cont = length == my.MAX_PACKET
                available = end - pos - 4
                if length > available:
                    self._skip = length - available
                    pos = end
                    break
                pos += 4 + length
                continue
            # a new command
            if seq != 0:
                self._protocol_error(scan, start, pos, f"Got packets out of order: a command with sequence id {seq}",
                                     my.ER_NET_PACKETS_OUT_OF_ORDER)
                return
            if length == 0:
                self._protocol_error(scan, start, pos, "Malformed packet: an empty command", my.ER_MALFORMED_PACKET)
                return
            if length > self.max_message:
                self._too_large(scan, start, pos, length)
                return
            self._size = length
            head = length if length < INSPECT_LIMIT else INSPECT_LIMIT
            if end - pos - 4 < head:
                need = 4 + head
                break
            command = scan[pos + 4]
            if command in STATEMENT_COMMANDS:
                if command == my.COM_STMT_PREPARE and end - pos - 4 < length:  # the whole text is kept
                    if length >= my.MAX_PACKET:
                        self._protocol_error(scan, start, pos, "COM_STMT_PREPARE of 16 MB or more is not supported "
                                             "through the proxy", my.ER_NET_PACKET_TOO_LARGE)
                        return
                    need = 4 + length
                    break
                step = self._statement_command(command, scan, pos, length, head, start)
                if step is None:
                    return
                pos, start = step
                backend = self.backend
                continue
            inspection = self._inspect(command, scan, pos, head)
            if inspection.action == FORWARD:
                if backend is None:
                    self._held += scan[pos:] if pos else scan
                    self._need_backend()
                    return
                effect = inspection.effect
                if effect is not None and effect[0] == QUERY:
                    query = effect[1]
                    if query.insert_id and self.last_insert_id != backend.last_insert_id:
                        backend.transport.write(scan[start:pos] + self._insert_id_for(backend))
                        start = pos
                    if query.functions and length < INSPECT_LIMIT:
                        start = self._with_session_values(backend, query, scan, pos, length, start)
                    if (query.retrack and backend.tracks_session_state and length < my.MAX_PACKET
                            and pos + 4 + length <= end):
                        stop = pos + 4 + length  # the client changed session_track_*: the proxy needs it all
                        backend.transport.write(scan[start:stop] + frame(ENABLE_TRACKING))
                        backend.expect(command, effect)
                        backend.expect(my.COM_QUERY, INTERNAL_PLAIN)
                        if self._hold_next == 1:
                            self._hold_next = 2
                        pos = start = stop
                        continue
                elif command == my.COM_RESET_CONNECTION and backend.tracks_session_state:
                    stop = pos + 4 + length
                    after = frame(ENABLE_TRACKING)
                    restore = not backend.reset_keeps(self.profile.charset)
                    if restore:  # the reset goes back to the backend's login character set, not the client's
                        after += frame(self.service.charset_command(self.profile.charset))
                    backend.transport.write(scan[start:stop] + after)
                    backend.expect(command, effect)
                    backend.expect(my.COM_QUERY, INTERNAL_PLAIN)
                    if restore:
                        backend.expect(my.COM_QUERY, INTERNAL_PLAIN)
                    pos = start = stop
                    continue
                if self._hold_next == 1:
                    self._hold_next = 2
                backend.expect(command, effect)
                self._seq = 1
                self._cont = length == my.MAX_PACKET
                available = end - pos - 4
                if length > available:
                    self._skip = length - available
                    pos = end
                    break
                pos += 4 + length
                continue
            # answered here: the whole command must be in
            if end - pos - 4 < length:
                if length > INSPECT_LIMIT:
                    self._protocol_error(scan, start, pos, f"Got a packet bigger than allowed: {length} bytes "
                                         f"for command 0x{command:02x}", my.ER_NET_PACKET_TOO_LARGE)
                    return
                need = 4 + length
                break
            if backend is not None and start < pos:
                backend.transport.write(scan[start:pos])
            pos += 4 + length
            start = pos
            action = inspection.action
            if action == ANSWER_ERR:
                assert inspection.error is not None
                log.info("client %s: %s", self.peer, inspection.error.message)
                self._send_error(inspection.error, 1)
            elif action == ANSWER_OK:
                self._answer_locally(command)
            elif action == QUIT:
                self.state = State.CLOSED
                self.close()
                return
            elif action in (KILL, CHANGE_USER):
                self._held += scan[pos:]
                payload = scan[pos - length : pos]
                if action == KILL:
                    query_only, target = inspection.effect or (0, 0)
                    self._busy = self.loop.create_task(self._kill(target, bool(query_only)))
                else:
                    self._busy = self.loop.create_task(self._change_user(payload))
                return
        if backend is not None:
            if start < pos:
                backend.transport.write(scan[start:pos] if start or pos < end else scan)
            if pos < end:
                self._keep_partial(scan, pos, need)
            elif backend.idle and self.backend is backend:
                self._release_if_done(backend)  # a command without a response (STMT_CLOSE, SEND_LONG_DATA)
        elif pos < end:
            self._keep_partial(scan, pos, need)

    def _keep_partial(self, scan: bytes, pos: int, need: int) -> None:
        """scan[pos:] is the start of what the walk needs `need` bytes of: kept, to grow until it is whole."""
        self._partial = bytearray(memoryview(scan)[pos:])
        self._partial_need = need

    # --- binary-protocol statements (virtual: see mysql_statements) ---

    def _statement_command(self, command: int, scan: bytes, pos: int, length: int, head: int,
                           start: int) -> tuple[int, int] | None:
        """A statement command at scan[pos]: forward it with the backend's statement id, prepare the statement
        on the backend first, or answer it here. Returns where the walk goes on (pos, start), or None when it
        stops (the rest is held, or the client failed)."""
        backend = self.backend
        if command == my.COM_STMT_PREPARE:
            return self._prepare(scan, pos, length, start)
        if length < 5:
            self._protocol_error(scan, start, pos, f"Malformed packet: command 0x{command:02x} without a statement id",
                                 my.ER_MALFORMED_PACKET)
            return None
        number = statement_id(scan, pos + 4)
        if number == LAST_PREPARED and self._last_prepared:
            number = self._last_prepared
            if number not in self.session.statements and backend is not None and not backend.idle:
                self._stall(scan, pos, start)  # its prepare is still running
                return None
        stmt = self.session.statements.get(number)
        if command == my.COM_STMT_CLOSE:  # the client's handle goes; the backend keeps the statement (LRU)
            if backend is not None and start < pos:
                backend.transport.write(scan[start:pos])
            stop = pos + 4 + length
            if stmt is not None:
                del self.session.statements[number]
                if PREPARED_ROW_COUNT in self.session.pins:
                    self._unpin(PREPARED_ROW_COUNT, frozenset((b"%d" % number,)))
                if backend is not None and (stmt.cursor or stmt.long_data):
                    self._reset_on_backend(backend, stmt)
            return stop, stop
        if stmt is None:
            if command == my.COM_STMT_SEND_LONG_DATA:
                return self._answer_here(scan, pos, length, start, None)
            return self._answer_here(scan, pos, length, start, unknown_statement(
                number, STATEMENT_COMMAND_NAMES.get(command, "mysqld_stmt"), self.capabilities))
        if backend is None:
            if command == my.COM_STMT_RESET:  # nothing of it lives on a backend now
                status = my.SERVER_STATUS_AUTOCOMMIT if self.session.autocommit else 0
                ok = OkPacket(status_flags=status).build(self.capabilities)
                return self._answer_here(scan, pos, length, start, ok)
            if command == my.COM_STMT_FETCH:
                return self._answer_here(scan, pos, length, start, _no_cursor(number, self.capabilities))
            self._held += scan[pos:] if pos else scan
            self._need_backend()
            return None
        entry = backend.statement(stmt.key)
        if entry is None:
            if stmt.failure is not None:  # preparing it here failed: that is the answer
                failure = stmt.failure
                if command != my.COM_STMT_SEND_LONG_DATA:
                    stmt.failure = None
                return self._answer_here(scan, pos, length, start, None if command == my.COM_STMT_SEND_LONG_DATA
                                         else failure)
            if command == my.COM_STMT_FETCH:
                return self._answer_here(scan, pos, length, start, _no_cursor(number, self.capabilities))
            if command == my.COM_STMT_RESET:  # nothing to reset on this backend: a PING answers the same OK
                stop = pos + 4 + length
                backend.transport.write(scan[start:pos] + frame(bytes((my.COM_PING,))))
                backend.expect(my.COM_PING, None)
                return stop, stop
            self._prepare_here(backend, stmt, scan[start:pos])
            self._stall(scan, pos, pos)
            return None
        new_id = entry.statement_id
        types: bytes | None = None
        types_at = 0
        effect: tuple[int, Any] | None = None
        params = stmt.params
        if command == my.COM_STMT_EXECUTE:
            flags = scan[pos + 4 + EXECUTE_FLAGS_AT] if length > EXECUTE_FLAGS_AT else 0
            if params:
                types_at = bound_flag_at(params)
                if types_at < head:
                    if scan[pos + 4 + types_at]:
                        stop = pos + 5 + types_at + 2 * params
                        entry.types = stmt.types = scan[pos + 5 + types_at : stop] if stop <= pos + 4 + head else None
                    elif stmt.types is not None and entry.types != stmt.types:
                        types = entry.types = stmt.types  # sent with an earlier execute, on another backend
            if flags & EXECUTE_CURSOR_FLAGS or stmt.cursor or stmt.long_data or stmt.effect is not None:
                effect = (EXECUTE, (stmt, flags))
        elif command == my.COM_STMT_BULK_EXECUTE:
            if params and head >= BULK_TYPES_AT:
                bulk_flags = scan[pos + 4 + BULK_FLAGS_AT] | (scan[pos + 5 + BULK_FLAGS_AT] << 8)
                if bulk_flags & BULK_SEND_TYPES:
                    stop = pos + 4 + BULK_TYPES_AT + 2 * params
                    entry.types = stmt.types = scan[pos + 4 + BULK_TYPES_AT : stop] if stop <= pos + 4 + head else None
                elif stmt.types is not None and entry.types != stmt.types:
                    types = entry.types = stmt.types
                    types_at = BULK_TYPES_AT
            if stmt.long_data or stmt.effect is not None:
                effect = (EXECUTE, (stmt, 0))
        elif command == my.COM_STMT_SEND_LONG_DATA:
            if not stmt.long_data:
                stmt.long_data = True
                self.long_data += 1
                entry.held += 1
        elif command == my.COM_STMT_FETCH:
            effect = (FETCH, stmt)
        else:  # COM_STMT_RESET
            effect = (STMT_RESET, stmt)
        stop = pos + 4 + length
        if types is None:
            rewritten = relabelled_head(scan, pos, new_id)
            rest = pos + 9
        else:
            if length + len(types) >= my.MAX_PACKET:
                entry.types = None
                return self._answer_here(scan, pos, length, start, ErrPacket(
                    my.ER_NET_PACKET_TOO_LARGE, "through the proxy, a statement execution of 16 MB or more must send "
                    "its parameter types").build(self.capabilities))
            rewritten = head_with_types(scan, pos, length, new_id, types_at, types)
            rest = pos + 4 + types_at + (1 if command == my.COM_STMT_EXECUTE else 0)
        if effect is not None and stmt.effect is not None and stmt.effect.insert_id:
            rewritten = self._insert_id_for(backend) + rewritten
        end = len(scan)
        if stop <= end:
            backend.transport.write(scan[start:pos] + rewritten + scan[rest:stop])
            next_pos = stop
        else:
            backend.transport.write(scan[start:pos] + rewritten + scan[rest:end])
            self._skip = stop - end
            next_pos = end
        if self._hold_next == 1:
            self._hold_next = 2
        backend.expect(command, effect)
        self._seq = 1
        self._cont = length == my.MAX_PACKET
        return next_pos, next_pos

    def _prepare(self, scan: bytes, pos: int, length: int, start: int) -> tuple[int, int] | None:
        """The client's COM_STMT_PREPARE: runs on the linked backend; the client sees an id of the proxy's."""
        backend = self.backend
        if backend is None:
            self._held += scan[pos:] if pos else scan
            self._need_backend()
            return None
        sql = scan[pos + 5 : pos + 4 + length]
        inspection = inspect_query(sql, self.service.settings.local_infile, backend.tracks_session_state)
        if inspection.action != FORWARD:
            error = inspection.error or NotSupported("through the proxy, this statement cannot be prepared")
            return self._answer_here(scan, pos, length, start, ErrPacket(
                error.mysql_errno, error.message, error.mysql_sqlstate).build(self.capabilities))
        limit = int(backend.pool.server_params.get(STATEMENT_LIMIT, "16382"))
        if len(self.session.statements) >= limit:  # as the server would say; the client's handles cost memory
            return self._answer_here(scan, pos, length, start, ErrPacket(
                my.ER_MAX_PREPARED_STMT_COUNT_REACHED, "Can't create more than max_prepared_stmt_count statements "
                f"(current value: {limit})").build(self.capabilities))
        number = self._next_statement_id
        self._next_statement_id = number + 1 if number < 0xFFFFFFF0 else 1
        query = inspection.query_effect
        sent = sql
        if query is not None and query.functions & ids.CONNECTION_ID:  # the statement, wherever it runs, says ours
            rewritten = ids.substitute(sql, {ids.CONNECTION_ID: self.connection_id}, True)
            if len(rewritten) < my.MAX_PACKET - 1:
                sql = rewritten
        key = self.service.statement_key(self.session.database, self._settings_fingerprint(), sql)
        stmt = ClientStatement(number, key, sql, self.session.database,
                               prepared_effect(inspection.query_effect, backend.tracks_session_state))
        closes = backend.prepare_started()
        if closes:
            backend.transport.write(scan[start:pos] + closes)
            start = pos
        if sql is not sent:
            backend.transport.write(scan[start:pos] + frame(bytes((my.COM_STMT_PREPARE,)) + sql))
            start = pos + 4 + length
        self._last_prepared = number
        if self._hold_next == 1:
            self._hold_next = 2
        backend.expect(my.COM_STMT_PREPARE, (PREPARE, stmt))
        self._seq = 1
        self._cont = False
        return pos + 4 + length, start

    def _with_session_values(self, backend: MySQLBackend, query: QueryEffect, scan: bytes, pos: int, length: int,
                             start: int) -> int:
        """Send the statement at scan[pos] (all there) with its CONNECTION_ID(), ROW_COUNT() and FOUND_ROWS() calls
        replaced by this client's values; returns where the bytes still to forward start."""
        functions = query.functions
        values: dict[int, int] = {}
        if functions & ids.CONNECTION_ID:
            values[ids.CONNECTION_ID] = self.connection_id
        if functions & ids.ROW_COUNT:
            values[ids.ROW_COUNT] = self.row_count
        if functions & ids.FOUND_ROWS and FOUND_ROWS not in self.session.pins:  # (pinned: the backend knows)
            values[ids.FOUND_ROWS] = self.found_rows
        stop = pos + 4 + length
        text = scan[pos + 5 : stop]
        rewritten = ids.substitute(text, values, query.single) if values else text
        if rewritten is text or len(rewritten) >= my.MAX_PACKET:
            return start
        backend.transport.write(scan[start:pos] + frame(bytes((my.COM_QUERY,)) + rewritten))
        return stop

    def _insert_id_for(self, backend: MySQLBackend) -> bytes:
        """LAST_INSERT_ID() reads the session's value: the command giving the backend the client's (or nothing)."""
        return backend.insert_id_command(self.last_insert_id)

    def _prepare_here(self, backend: MySQLBackend, stmt: ClientStatement, before: bytes) -> None:
        """Prepare a client's statement on the linked backend (the proxy's own command; its answer is swallowed)."""
        backend.ensure_prepared(stmt.sql, stmt.schema, before, (INTERNAL, stmt))

    def _reset_on_backend(self, backend: MySQLBackend, stmt: ClientStatement) -> None:
        """The client closed a statement with a cursor open or long data sent: reset it on the backend."""
        self._statement_state_ends(stmt, backend.statement_entry(stmt.key))
        backend.reset_statement(stmt.key)

    def _statement_state_ends(self, stmt: ClientStatement, entry: Any) -> None:
        """A statement's cursor or long data is gone (executed, fetched to the end, reset or closed)."""
        if stmt.cursor:
            stmt.cursor = False
            self.cursors -= 1
            if entry is not None:
                entry.held -= 1
        if stmt.long_data:
            stmt.long_data = False
            self.long_data -= 1
            if entry is not None:
                entry.held -= 1

    def _stall(self, scan: bytes, pos: int, start: int) -> None:
        """Hold scan[pos:] until the backend has answered everything it was sent (then walk it again)."""
        backend = self.backend
        if backend is not None and start < pos:
            backend.transport.write(scan[start:pos])
        self._held += scan[pos:] if pos else scan
        self._stalled = True

    def _answer_here(self, scan: bytes, pos: int, length: int, start: int,
                     answer: bytes | None) -> tuple[int, int] | None:
        """Answer the command at scan[pos] with `answer` (None: it has no response) and drop its bytes."""
        backend = self.backend
        if answer is not None and backend is not None and not backend.idle:
            self._stall(scan, pos, start)  # after the responses still to come, not before them
            return None
        if backend is not None and start < pos:
            backend.transport.write(scan[start:pos])
        if answer is not None:
            self.write(frame(answer, 1))
        end = len(scan)
        stop = pos + 4 + length
        if stop <= end:
            return stop, stop
        if length >= my.MAX_PACKET:
            self.fail(_violation("a statement command of 16 MB or more for an unknown statement",
                                 my.ER_NET_PACKET_TOO_LARGE))
            return None
        self._drop = stop - end
        return end, end

    def _settings_fingerprint(self) -> bytes:
        key = self._settings_key
        if key is None:
            key = self._settings_key = b"%d\x02" % self.profile.charset + b"\x00".join(
                name.encode() + b"\x01" + body for name, body in self.session.settings.items())
        return key

    def _inspect(self, command: int, scan: bytes, pos: int, head: int) -> Inspection:
        if command == my.COM_QUERY:
            return inspect_query(scan[pos + 5 : pos + 4 + head], self.service.settings.local_infile,
                                 self.service.session_tracking)
        linked = self.backend is not None
        if command in FORWARDED_COMMANDS:
            if command == my.COM_INIT_DB:
                return Inspection(FORWARD, (SCHEMA, scan[pos + 5 : pos + 4 + head].decode("utf-8", "surrogateescape")))
            if command == my.COM_SET_OPTION:
                on = head >= 3 and scan[pos + 5] == my.MYSQL_OPTION_MULTI_STATEMENTS_ON
                return Inspection(FORWARD, (SET_OPTION, on))
            if command in (my.COM_PING, my.COM_RESET_CONNECTION):
                if not linked:
                    return Inspection(ANSWER_OK)
                return Inspection(FORWARD, (RESET, None)) if command == my.COM_RESET_CONNECTION else FORWARD_PLAIN
            return FORWARD_PLAIN
        if command == my.COM_QUIT:
            return Inspection(QUIT)
        if command == my.COM_PROCESS_KILL:
            if head < 5:
                return Inspection(ANSWER_ERR, error=_violation("Malformed packet: COM_PROCESS_KILL without an id",
                                                               my.ER_MALFORMED_PACKET))
            return Inspection(KILL, (0, int.from_bytes(scan[pos + 5 : pos + 9], "little")))
        if command == my.COM_CHANGE_USER:
            return Inspection(CHANGE_USER)
        return Inspection(ANSWER_ERR, error=UnknownCommand(f"Unknown command 0x{command:02x}"))

    def _answer_locally(self, command: int) -> None:
        if command == my.COM_RESET_CONNECTION:
            self._forget_session_state()
        self._send_ok(1)

    def _forget_session_state(self) -> None:
        self.session.statements.clear()
        self._last_prepared = 0
        if self.session.pins:
            self.session.pins.clear()
            self.stats.unpinned()
        self._pins_logged.clear()
        self.session.settings = {}
        self._settings_key = None
        self.session.user_variables = {}
        self.last_insert_id = self.row_count = 0  # (FOUND_ROWS() survives a reset on the server too)
        self.cursors = self.long_data = self._hold_next = 0
        self.session.autocommit = self._default_autocommit

    def _protocol_error(self, scan: bytes, start: int, pos: int, message: str, errno: int) -> None:
        backend = self.backend
        if backend is not None and start < pos:
            backend.transport.write(scan[start:pos])
        self.fail(_violation(message, errno))

    # --- commands handled by the proxy itself ---

    async def _kill(self, target: int, query_only: bool) -> None:
        try:
            await self.service.kill(self, target, query_only)
        except ProxyError as exc:
            log.info("client %s: %s", self.peer, exc.message)
            self._send_error(exc, 1)
        else:
            if not self.closed:
                self._send_ok(1)
        self._busy = None
        self._resume()

    async def _change_user(self, payload: bytes) -> None:
        """COM_CHANGE_USER: the session starts over as another user (authenticated by the proxy)."""
        try:
            request = ChangeUser.parse(payload, self.capabilities)
        except ProtocolViolation as exc:
            self._busy = None
            self.fail(exc)
            return
        backend = self.backend
        if backend is not None:
            self.backend = None
            backend.unlink()
            self._return_after_client(backend)
        self._forget_session_state()
        self._buffer += self._held  # the login exchange reads through the awaited-message buffer
        self._held.clear()
        self.state = State.LOGIN
        self._seq = self._reply_seq = 1
        self.service.clients.pop(self.connection_id, None)
        try:
            self.session.user = request.username
            await self._authenticate(request.auth_plugin_name, request.auth_response,
                                     bool(self.capabilities & my.CLIENT_PLUGIN_AUTH))
            if request.charset is not None:
                self.profile = Profile(self.profile.capabilities, request.charset & 0xFF)
            self.session.database = request.database
            await self._prepare_session()
        except ConnectionClosed:
            self._busy = None
            self.close()
            return
        except ProxyError as exc:
            self._busy = None
            if isinstance(exc, AuthenticationFailed):
                self.stats.logins_failed += 1
                _refuse_login(self, exc)
            else:
                self.fail(exc)
            return
        self.service.clients[self.connection_id] = self
        self._send_ok(self._seq)
        self.state = State.READY
        self._seq = 0
        self._busy = None
        self._held += self.take_buffered()
        self._resume()

    # --- events from the linked backend ---

    def command_done(self, backend: MySQLBackend, effect: tuple[int, Any] | None) -> None:
        """A forwarded command with an effect on the session (or whose response reports one) is complete."""
        tracker = backend.tracker
        insert_id = tracker.last_insert_id
        if insert_id:
            backend.insert_id_seen(insert_id)
        query: QueryEffect | None = None
        if effect is not None:
            kind, value = effect
            if kind == INTERNAL:
                if value is not None:
                    self._prepared_here(backend, value)
                return  # the proxy's own command: what it reports is not the client's
            if kind == QUERY:
                query = value
                self._query_done(backend, value)
            elif kind == EXECUTE:
                stmt, flags = value
                query = stmt.effect
                self._executed(backend, stmt, flags)
            elif kind == PREPARE:
                self._prepared(backend, value)
            elif kind == FETCH:
                if tracker.error is not None or tracker.status_flags & my.SERVER_STATUS_LAST_ROW_SENT:
                    self._statement_state_ends(value, backend.statement_entry(value.key))
            elif kind == STMT_RESET:
                self._statement_state_ends(value, backend.statement_entry(value.key))
            elif tracker.error is None:
                if kind == SCHEMA:
                    self._schema_changed(backend, str(value))
                elif kind == RESET:
                    self._forget_session_state()
                    self.session.autocommit = backend.autocommit
                    # (tracking on: the client's character set was put back after the reset, see _walk)
                    backend.session_reset(self.profile.charset if backend.tracks_session_state else None)
                elif kind == SET_OPTION:
                    self.multi_statements = bool(value)
                    backend.multi_statements_set(self.multi_statements)
        if insert_id:
            self.last_insert_id = insert_id
            if INSERT_ID_EXPRESSION in self.session.pins:  # the value is known again
                self._unpin(INSERT_ID_EXPRESSION, None)
        elif INSERT_ID_EXPRESSION in self.session.pins:  # the value lives on this backend only: never set it again
            self.last_insert_id = -1
            backend.insert_id_seen(-1)
        if tracker.session_state is not None:
            self._state_reported(backend, tracker.session_state, query)

    def _prepared(self, backend: MySQLBackend, stmt: ClientStatement) -> None:
        """The client's COM_STMT_PREPARE is answered (its response went to the client, relabelled)."""
        ok = backend.tracker.prepare_ok
        backend.prepare_answered(stmt.key, None if ok is None else ok.statement_id)
        if ok is None:
            return
        stmt.params = ok.num_params
        stmt.columns = ok.num_columns
        self.session.statements[stmt.statement_id] = stmt
        if stmt.effect is not None and stmt.effect.functions & (ids.ROW_COUNT | ids.FOUND_ROWS):
            self._pin(backend, PREPARED_ROW_COUNT, frozenset((b"%d" % stmt.statement_id,)),
                      "a prepared statement reads ROW_COUNT() or FOUND_ROWS()")

    def _prepared_here(self, backend: MySQLBackend, stmt: ClientStatement) -> None:
        """The proxy's prepare of a client's statement on this backend is answered; the client may go on."""
        tracker = backend.tracker
        ok = tracker.prepare_ok
        backend.prepare_answered(stmt.key, None if ok is None else ok.statement_id)
        if ok is None:
            stmt.failure = tracker.error_packet or ErrPacket(my.ER_UNKNOWN_ERROR, "prepare failed").build()
            log.info("client %s: preparing its statement again on %s failed: %s", self.peer, backend,
                     ErrPacket.parse(stmt.failure).message)
            return
        stmt.failure = None

    def _executed(self, backend: MySQLBackend, stmt: ClientStatement, flags: int) -> None:
        tracker = backend.tracker
        entry = backend.statement_entry(stmt.key)
        self._statement_state_ends(stmt, entry)  # long data was used; an older cursor of it is closed
        if (flags & EXECUTE_CURSOR_FLAGS and tracker.error is None
                and tracker.status_flags & my.SERVER_STATUS_CURSOR_EXISTS):
            stmt.cursor = True
            self.cursors += 1
            if entry is not None:
                entry.held += 1
        if stmt.effect is not None:
            self._query_done(backend, stmt.effect)

    def _query_done(self, backend: MySQLBackend, effect: QueryEffect) -> None:
        """A statement with a session effect has its response: track what it set, pin or unpin."""
        if backend.tracker.error is not None and effect.single:
            return
        if effect.schema is not None:
            self._schema_changed(backend, effect.schema)
        if effect.charset:  # SET NAMES / CHARACTER SET override earlier character_set_* settings
            for name in ("character_set_client", "character_set_connection", "character_set_results",
                         "collation_connection"):
                if self.session.settings.pop(name, None) is not None:
                    backend.setting_dropped(name)
                    self._settings_key = None
        for name, body, _ in effect.settings:
            self._setting(backend, name, body)
        for user_name, value in effect.user_vars:
            if value.upper() == b"NULL":
                self.session.user_variables.pop(user_name, None)
                backend.user_variable_set(user_name, None)
            else:
                self.session.user_variables[user_name] = value
                backend.user_variable_set(user_name, value)
        if effect.hold_next:
            self._hold_next = 1
        for reason, names in effect.unpins:
            self._unpin(reason, None if names is None else self._qualified(reason, names))
        if effect.pin is not None and not (effect.pin == INSERT_ID_EXPRESSION and backend.tracker.last_insert_id):
            if effect.variable_set and self.service.exclude_variable_sets:
                log.debug("client %s: not pinned for %s (pinning filter exclude_variable_sets)", self.peer,
                          effect.detail or effect.pin)
            else:
                self._pin(backend, effect.pin, self._qualified(effect.pin, effect.pin_names), effect.detail)
                if effect.pin == FOUND_ROWS:
                    self._hold_next = 1

    def _qualified(self, reason: str, names: frozenset[bytes]) -> frozenset[bytes]:
        """Temporary table names with the default database they belong to."""
        if reason != TEMPORARY_TABLE:
            return names
        prefix = self.session.database.encode("utf-8", "surrogateescape") + b"."
        return frozenset(name if name in (ANY, NO_NAME) or b"." in name else prefix + name for name in names)

    def _setting(self, backend: MySQLBackend, name: str, body: bytes) -> None:
        """A session variable the client set: replayed (in the order last set) wherever the client goes."""
        settings = self.session.settings
        settings.pop(name, None)
        settings[name] = body
        backend.setting_applied(name, body)
        self._settings_key = None

    def _schema_changed(self, backend: MySQLBackend, schema: str) -> None:
        self.session.database = schema
        backend.schema_changed(schema)
        self._use_pool(schema)

    def _state_reported(self, backend: MySQLBackend, reports: list[bytes], query: QueryEffect | None) -> None:
        """Session state changes the server reported (CLIENT_SESSION_TRACK) for the client's command."""
        explained = False
        changed = False
        exact = {name for name, _, literal in query.settings if literal} if query is not None else set()
        for report in reports:
            for kind, payload in parse_session_state(report):
                if kind == my.SESSION_TRACK_SYSTEM_VARIABLES:
                    explained = True
                    name, p = read_lenenc_str(payload, 0)
                    value, _ = read_lenenc_str(payload, p)
                    name = name.lower()
                    if name in UNTRACKED_VARIABLES or name in self.service.read_only_variables or (
                            query is not None and (query.transient or (query.charset and name in CHARSET_VARIABLES))):
                        continue
                    text = name.decode("ascii", "replace")
                    if text in exact:  # the client's own literal says it best (e.g. timestamp = DEFAULT)
                        continue
                    self._setting(backend, text, b"@@SESSION." + name + b"=" + sql_literal(name, value))
                elif kind == my.SESSION_TRACK_SCHEMA:
                    explained = True
                    schema, _ = read_lenenc_str(payload, 0)
                    text = schema.decode("utf-8", "surrogateescape")
                    if text != self.session.database:
                        self._schema_changed(backend, text)
                elif kind == my.SESSION_TRACK_STATE_CHANGE:
                    changed = True
        if changed and not explained and not (query is not None and query.tracked) and not self.session.pins:
            self._pin(backend, STATE_CHANGE, frozenset((ANY,)),
                      "the server reported a session state change the proxy does not follow")

    # --- pinning ---

    def _pin(self, backend: MySQLBackend, reason: str, names: frozenset[bytes], detail: str) -> None:
        pins = self.session.pins
        held = pins.get(reason)
        if held is not None:
            held |= names
            return
        if not pins:
            self.stats.pinned_now += 1
        pins[reason] = set(names)
        self.stats.pinned(reason)
        if reason not in self._pins_logged:
            self._pins_logged.add(reason)
            log.info("client %s pinned to %s: %s%s", self.peer, backend, reason, f" ({detail})" if detail else "")

    def _unpin(self, reason: str, names: frozenset[bytes] | None) -> None:
        pins = self.session.pins
        held = pins.get(reason)
        if held is None:
            return
        if names is None:
            held.clear()
        else:
            held -= names
        if held:
            return
        del pins[reason]
        if not pins:
            self.stats.unpinned()
            log.info("client %s unpinned: %s ended", self.peer, reason)

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
        _release(backend)

    def kill_settled(self) -> None:
        backend = self.backend
        if backend is not None and not self.kills_in_flight:
            self._release_if_done(backend)

    def backend_lost(self, backend: MySQLBackend, exc: Exception | None) -> None:
        backend.pool.discard(backend)
        if self.backend is backend:
            self.backend = None
            if backend.ended_by_server:  # the client has the server's own error (e.g. 1053): nothing more
                log.info("client %s: the server ended the session on %s; closing", self.peer, backend)
                self.state = State.CLOSED
                self.close()
                return
            log.warning("client %s: backend %s was lost: %s", self.peer, backend, exc or "closed")
            self.fail(BackendUnavailable("Lost connection to the database server"))

    def linked_peer(self) -> Connection | None:
        return self.backend

    # --- janitor ---

    def check_idle(self, now: float, timeout: float) -> None:
        """The janitor's look: close the client after the proxy's idle_client_timeout (outside transactions) or
        after the wait_timeout the client set in its session (as the server would: silently, in a transaction
        too)."""
        if self.active or self.state is not State.READY:
            self.active = False
            self.idle_since = now
            return
        message_timeout = self.service.server.client_message_timeout
        if now - self.idle_since > message_timeout and (self._skip or self._cont or self._partial or self._drop):
            self.fail(ClientMessageTimeout(f"Got timeout reading communication packets: the client stopped in the "
                                           f"middle of a packet for more than {message_timeout:g} s"))
            return
        backend = self.backend
        if (self._busy is not None or self._stalled or self._held
                or (backend is not None and (not backend.idle or self._skip or self._cont or self._infile
                                            or self._partial))):
            self.idle_since = now  # a command waits or runs: the proxy or the server works, not the client
            return
        idle = now - self.idle_since
        wait_timeout = self._session_wait_timeout()
        if wait_timeout is not None and idle > wait_timeout and wait_timeout < timeout:
            self.stats.idle_client_timeouts += 1
            log.info("client %s (user %r): closed after %g s of inactivity (its wait_timeout)", self.peer, self.user,
                     wait_timeout)
            self.state = State.CLOSED
            self.close()
            return
        if backend is not None and backend.tracker.status_flags & my.SERVER_STATUS_IN_TRANS:
            return  # inside a transaction: not idle in RDS Proxy's sense
        if idle > timeout:
            self.stats.idle_client_timeouts += 1
            self.fail(IdleClientTimeout(f"closing the connection after {timeout:g} s of inactivity"))

    def _session_wait_timeout(self) -> float | None:
        """The wait_timeout the client set in its session, in seconds (None: not set, or not a number)."""
        body = self.session.settings.get("wait_timeout")
        known, seconds = self._wait_timeout
        if body is not known:
            seconds = ids.session_timeout(body)
            self._wait_timeout = (body, seconds)
        return seconds


def _no_cursor(statement: int, capabilities: int) -> bytes:
    return ErrPacket(ER_STMT_HAS_NO_OPEN_CURSOR, f"The statement ({statement}) has no open cursor",
                     "HY000").build(capabilities)


def _release(backend: MySQLBackend) -> None:
    """Back to its pool, after closing the statements it should close (no response: safe while idle)."""
    if backend.ended_by_server:  # it is closing
        backend.pool.discard(backend)
        return
    closes = backend.statement_closes()
    if closes:
        backend.write(closes)
    backend.pool.release(backend)


def _violation(message: str, errno: int) -> ProtocolViolation:
    return MySQLProtocolViolation(message, errno)
