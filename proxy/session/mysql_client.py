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
    CommandNotAllowed,
    IdleClientTimeout,
    LoginTimeout,
    NotSupported,
    ProtocolViolation,
    ProxyError,
    UnknownCommand,
)
from proxy.netio import WRITE_HIGH_WATER, WRITE_LOW_WATER, Connection, ConnectionClosed
from proxy.pool.mysql_backend import RELAYED_CAPABILITIES, MySQLBackend, Profile
from proxy.pool.pool import Pool
from proxy.protocol.mysql import constants as my
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
)
from proxy.protocol.mysql.packets import ProtocolViolation as MySQLProtocolViolation
from proxy.session.mysql_service import MySQLService
from proxy.stats import PROXY

log = logging.getLogger(__name__)

INSPECT_LIMIT = 64 * 1024  # bytes of a command looked at before forwarding (the whole command if shorter)
LOGIN_PACKET_LIMIT = 64 * 1024
HELD_LIMIT = 256 * 1024
SCRAMBLE_CHARS = bytes(range(0x21, 0x7F)).replace(b"$", b"")
BUSY_FLAGS = my.SERVER_STATUS_IN_TRANS | my.SERVER_STATUS_CURSOR_EXISTS

# What to do with a command (see _inspect).
FORWARD, ANSWER_OK, ANSWER_ERR, SWALLOW, QUIT, KILL, CHANGE_USER = range(7)
# Effects applied when a forwarded command's response completes.
SCHEMA, PREPARE, RESET, SET_OPTION, SETTINGS = range(5)

FORWARDED_COMMANDS = frozenset({
    my.COM_QUERY, my.COM_INIT_DB, my.COM_FIELD_LIST, my.COM_STATISTICS, my.COM_PROCESS_INFO, my.COM_DEBUG,
    my.COM_REFRESH, my.COM_PING, my.COM_STMT_PREPARE, my.COM_STMT_EXECUTE, my.COM_STMT_SEND_LONG_DATA,
    my.COM_STMT_CLOSE, my.COM_STMT_RESET, my.COM_STMT_FETCH, my.COM_SET_OPTION, my.COM_RESET_CONNECTION,
    my.COM_STMT_BULK_EXECUTE,
})

# --- COM_QUERY inspection: the first keyword of each statement, and a few session-binding constructs ---
_SKIP = rb"(?:\s+|\(|/\*(?![!M]).*?\*/|(?:--[ \t]|#)[^\n]*(?:\n|\Z))*"
FIRST_WORD = re.compile(_SKIP + rb"([A-Za-z_]+)", re.S)
NEXT_STATEMENT = re.compile(rb";" + _SKIP + rb"([A-Za-z_]+)", re.S)
ATTENTION = re.compile(rb"[;@]|_lock\s*\(|\btemporary\b", re.I)
USER_VARIABLE = re.compile(rb"(?:^|[^\w@.$`'\"])@(?!@)[\w$.`'\"]")
LOCK_FUNCTION = re.compile(rb"\bget_lock\s*\(", re.I)
TEMPORARY_TABLE = re.compile(rb"\s*CREATE\s+(?:OR\s+REPLACE\s+)?TEMPORARY\b", re.I)
AUTOCOMMIT_ONLY = re.compile(
    rb"\s*SET\s+(?:(?:SESSION|LOCAL)\s+|@@(?:SESSION\.|LOCAL\.)?)?autocommit\s*:?=\s*(?:0|1|ON|OFF|TRUE|FALSE)"
    rb"\s*;?\s*\Z", re.I)
USE_SCHEMA = re.compile(rb"\s*USE\s+(`(?:[^`]|``)+`|[\w$]+)\s*;?\s*\Z", re.I)
KILL_STATEMENT = re.compile(rb"\s*KILL\s+(?:(?:HARD|SOFT)\s+)?(?:(CONNECTION|QUERY)\s+)?(\d+)\s*;?\s*\Z", re.I)
SET_CHARSET = re.compile(rb"\s*SET\s+((?:NAMES|CHARACTER\s+SET|CHARSET)\s+[^,;]+?)\s*;?\s*\Z", re.I | re.S)
SET_SESSION_TRANSACTION = re.compile(rb"\s*SET\s+(SESSION\s+TRANSACTION\s+[^;]+?)\s*;?\s*\Z", re.I | re.S)
SET_WITHOUT_STATE = re.compile(
    rb"\s*SET\s+(?:PASSWORD\b|STATEMENT\s|(?:GLOBAL\s+|@@GLOBAL\.)(?:'[^']*'|[^,'])*\Z)", re.I | re.S)
SET_BODY = re.compile(rb"\s*SET\s+(.*?)\s*;?\s*\Z", re.I | re.S)
TOP_LEVEL_ITEM = re.compile(rb"""(?:'(?:[^'\\]|\\.|'')*'|"(?:[^"\\]|\\.|"")*"|`[^`]*`|\([^()]*\)|[^,'"`()])+""", re.S)
SESSION_ASSIGNMENT = re.compile(
    rb"\s*(?:(?:SESSION|LOCAL)\s+|@@(?:SESSION\.|LOCAL\.)?)?([A-Za-z_][A-Za-z0-9_]*)\s*:?=\s*(.+?)\s*\Z", re.I | re.S)
LOAD_LOCAL = re.compile(rb"\bLOAD\s+(?:DATA|XML)\s+(?:(?:LOW_PRIORITY|CONCURRENT)\s+)?LOCAL\b", re.I)
PINNING_KEYWORDS = {
    b"PREPARE": "SQL PREPARE", b"EXECUTE": "SQL PREPARE", b"DEALLOCATE": "SQL PREPARE", b"LOCK": "LOCK TABLES",
    b"HANDLER": "HANDLER", b"XA": "XA transaction", b"FLUSH": "FLUSH",
}


def parse_set(text: bytes) -> list[tuple[str, bytes]] | str:
    """The session settings a single SET statement makes, as (name, statement body) to replay; or why it pins.

    `SET NAMES`/`CHARACTER SET`, `SET SESSION TRANSACTION ...` and assignments of session system variables are
    tracked (replayed on whichever backend serves the client); user variables, SET TRANSACTION (for the next
    transaction only), GLOBAL mixed with session assignments and SET ROLE pin the client to its backend.
    """
    charset = SET_CHARSET.match(text)
    if charset is not None:
        return [("character set", charset.group(1))]
    if SET_WITHOUT_STATE.match(text):
        return []
    session_tx = SET_SESSION_TRANSACTION.match(text)
    if session_tx is not None:
        return [("session transaction", session_tx.group(1))]
    body = SET_BODY.match(text)
    if body is None:
        return "SET"
    items = TOP_LEVEL_ITEM.findall(body.group(1))
    settings: list[tuple[str, bytes]] = []
    for item in items:
        assignment = SESSION_ASSIGNMENT.match(item)
        if assignment is None:
            return "SET " + item.strip()[:40].decode("utf-8", "replace")
        name = assignment.group(1).lower().decode()
        if name in ("global", "transaction", "role", "names", "character", "charset", "password", "statement"):
            return "SET " + name.upper()
        if name != "autocommit":  # autocommit is tracked from the server's status flags
            settings.append((name, b"@@SESSION." + assignment.group(1) + b"=" + assignment.group(2)))
    return settings


class State(IntEnum):
    LOGIN = 0
    READY = 1  # logged in; forwarding
    CLOSED = 2


class Inspection:
    """What the proxy does with one client command (a small value object; FORWARD_PLAIN is shared)."""

    __slots__ = ("action", "effect", "error", "pin")

    def __init__(self, action: int, effect: tuple[int, Any] | None = None, pin: str | None = None,
                 error: ProxyError | None = None) -> None:
        self.action = action
        self.effect = effect
        self.pin = pin
        self.error = error


FORWARD_PLAIN = Inspection(FORWARD)


def inspect_query(text: bytes, local_infile: bool) -> Inspection:
    """Classify a COM_QUERY statement text (or its first INSPECT_LIMIT bytes)."""
    match = FIRST_WORD.match(text)
    if match is None:
        return Inspection(FORWARD, pin="statement starts with an executable comment")
    keyword = match.group(1).upper()
    attention = ATTENTION.search(text, match.end())
    if attention is None and keyword not in PINNING_KEYWORDS and keyword not in (b"USE", b"KILL", b"LOAD", b"SET"):
        return FORWARD_PLAIN
    keywords = [keyword]
    single = True
    if b";" in text:
        for follow in NEXT_STATEMENT.finditer(text, match.end()):
            keywords.append(follow.group(1).upper())
            single = False
    if b"KILL" in keywords:
        kill = KILL_STATEMENT.match(text) if single else None
        if kill is None:
            return Inspection(ANSWER_ERR, error=NotSupported(
                "through the proxy, KILL takes a connection id (KILL [CONNECTION | QUERY] id) and must be sent alone"))
        return Inspection(KILL, (int(kill.group(1) is not None and kill.group(1).upper() == b"QUERY"),
                                 int(kill.group(2))))
    if b"LOAD" in keywords and not local_infile and LOAD_LOCAL.search(text):
        return Inspection(ANSWER_ERR, error=CommandNotAllowed(
            "LOAD DATA LOCAL INFILE is disabled on this proxy (mysql.local_infile = false)"))
    pin = None
    effect: tuple[int, Any] | None = None
    for word in keywords:
        reason = PINNING_KEYWORDS.get(word)
        if word == b"SET":
            if not single:
                reason = "SET inside a multi-statement query"
            elif not AUTOCOMMIT_ONLY.match(text):  # autocommit alone: tracked from the server's status flags
                settings = parse_set(text)
                if isinstance(settings, str):
                    reason = settings
                elif settings:
                    effect = (SETTINGS, settings)
        elif word == b"USE":
            use = USE_SCHEMA.match(text) if single else None
            if use is None:
                reason = "USE inside a multi-statement query"
            else:
                name = use.group(1)
                if name.startswith(b"`"):
                    name = name[1:-1].replace(b"``", b"`")
                effect = (SCHEMA, name.decode("utf-8", "surrogateescape"))
        elif word == b"CREATE" and TEMPORARY_TABLE.match(text):
            reason = "temporary table"
        if reason is not None:
            pin = reason
            break
    if pin is None and attention is not None:
        if b"@" in text and USER_VARIABLE.search(text):
            pin = "user variable"
        elif LOCK_FUNCTION.search(text):
            pin = "GET_LOCK"
        elif not single and TEMPORARY_TABLE.search(text.replace(b";", b" ")):
            pin = "temporary table"
    if pin is None and effect is None:
        return FORWARD_PLAIN
    return Inspection(FORWARD, effect, pin)


def _make_scramble() -> bytes:
    return bytes(SCRAMBLE_CHARS[b % len(SCRAMBLE_CHARS)] for b in os.urandom(my.SCRAMBLE_LENGTH))


class MySQLClient(Connection):
    """One client connection; owns at most one backend at a time (between transactions in transaction mode)."""

    def __init__(self, service: MySQLService) -> None:
        super().__init__(service.server.max_message_size)
        self.service = service
        self.state = State.LOGIN
        self.peer = "?"
        self.connection_id = 0
        self.user = ""
        self.schema = ""  # the default database this client's session has
        self.autocommit = True
        self.multi_statements = False
        self.capabilities = 0  # negotiated with this client
        self.profile = Profile(0, my.UTF8MB4_GENERAL_CI)
        self.pool: Pool | None = None
        self.backend: MySQLBackend | None = None
        self.statements: set[int] = set()  # prepared statement ids open on the backend (pins it)
        self.pin_reason: str | None = None  # other session state that binds the client to its backend
        self.settings: dict[str, bytes] = {}  # session variables set by the client: name -> SET body to replay
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
        self._partial = b""  # an incomplete frame head carried to the next read
        self._held = bytearray()  # client bytes arriving while a backend is borrowed or a command handled here
        self._busy: asyncio.Task[None] | None = None
        self._borrowing = False
        self._task: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        return f"MySQLClient({self.peer}, id={self.connection_id}, user={self.user!r})"

    # --- lifecycle ---

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        PROXY.clients_accepted += 1
        PROXY.clients_current += 1
        self._task = self.loop.create_task(self._login_with_timeout())

    async def _login_with_timeout(self) -> None:
        try:
            await asyncio.wait_for(self._login(), self.service.server.client_login_timeout)
        except TimeoutError:
            PROXY.login_timeouts += 1
            self.fail(LoginTimeout("Got timeout reading communication packets: the client did not complete its "
                                   "login in time"))
        except ConnectionClosed:
            log.info("client %s closed the connection during login", self.peer)
            self.close()
        except AuthenticationFailed as exc:
            PROXY.logins_failed += 1
            self.fail(exc)
        except ProxyError as exc:
            self.fail(exc)
        except Exception as exc:  # the edge: anything unexpected becomes an ERR for this client only
            log.exception("client %s: login failed unexpectedly", self.peer)
            self.fail(ProxyError(f"internal error: {type(exc).__name__}"))

    def fail(self, error: ProxyError) -> None:
        """Send the client an ERR packet for `error`, log the reason and close."""
        if self.closed or self.state is State.CLOSED:
            return
        log.warning("client %s (user %r): %s [%d %s]", self.peer, self.user, error.message, error.mysql_errno,
                    error.mysql_sqlstate)
        if isinstance(error, ProtocolViolation):
            PROXY.protocol_errors += 1
        self._send_error(error, self._reply_seq if self.state is State.LOGIN else 1)
        self.state = State.CLOSED
        self.close()

    def _send_error(self, error: ProxyError, seq: int) -> None:
        packet = ErrPacket(error.mysql_errno, error.message, error.mysql_sqlstate)
        self.write(frame(packet.build(self.capabilities or my.CLIENT_PROTOCOL_41), seq))

    def _send_ok(self, seq: int = 1) -> None:
        status = my.SERVER_STATUS_AUTOCOMMIT if self.autocommit else 0
        self.write(frame(OkPacket(status_flags=status).build(self.capabilities), seq))

    def on_closed(self, exc: Exception | None) -> None:
        self.state = State.CLOSED
        PROXY.clients_current -= 1
        if self.service.clients.get(self.connection_id) is self:
            del self.service.clients[self.connection_id]
        if self._task is not None and not self._task.done():
            self._task.cancel()
        if self._busy is not None and self._borrowing:
            self._busy.cancel()
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
        if (backend.tracker.status_flags & BUSY_FLAGS or self.statements or self.pin_reason
                or pool.session_mode or backend.schema != pool.database):
            log.info("client %s left inside a transaction or session; cleaning %s before reuse", self.peer, backend)
            self.loop.create_task(self._clean_up(backend))
            return
        pool.stats.transactions += 1
        pool.release(backend)

    async def _clean_up(self, backend: MySQLBackend) -> None:
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
        try:
            greeting = await service.backend_greeting()
        except ProxyError as exc:
            self.fail(BackendUnavailable(f"the database is not reachable: {exc.message}"))
            return
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
            await self._start_tls(service.server_tls)
            payload = await self._read_login_packet()
        response = HandshakeResponse41.parse(payload)
        self.capabilities = response.capabilities & announced
        self.user = response.username
        if service.config.tls.mode is ClientTLSMode.REQUIRE and not self.is_tls:
            raise AuthorizationFailed("Connections using insecure transport are prohibited: the proxy requires TLS")
        await self._authenticate(response.auth_plugin_name, response.auth_response,
                                 bool(response.capabilities & my.CLIENT_PLUGIN_AUTH))
        self.schema = (response.database or "") if response.capabilities & my.CLIENT_CONNECT_WITH_DB else ""
        self.profile = Profile(self.capabilities & RELAYED_CAPABILITIES, response.charset)
        self.multi_statements = bool(self.capabilities & my.CLIENT_MULTI_STATEMENTS)
        self.autocommit = self._default_autocommit
        await self._prepare_session()
        service.clients[self.connection_id] = self
        self._send_ok(self._seq)
        PROXY.logins_ok += 1
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
        handshake = self.loop.create_task(self.loop.start_tls(self.transport, self, context, server_side=True))
        for _ in range(100):  # let start_tls put its TLS protocol in place (and run its connection_made)
            await asyncio.sleep(0)
            if self.transport.get_protocol() is not self:
                await asyncio.sleep(0)
                break
        tls_protocol: Any = self.transport.get_protocol()  # uvloop's is buffered without subclassing asyncio's
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
        transport = await handshake
        if transport is None:
            raise BackendUnavailable("TLS handshake did not complete")
        self.transport = cast(asyncio.Transport, transport)
        self.transport.set_write_buffer_limits(WRITE_HIGH_WATER, WRITE_LOW_WATER)

    async def _authenticate(self, plugin: str | None, response: bytes, plugin_auth: bool) -> None:
        """Check the client's password with the configured method; an auth switch if it used another one."""
        service = self.service
        method = service.settings.auth_method
        secret = service.secrets.get(self.user)
        password = secret.password if secret is not None else None
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
            ok = password is not None and check_native_password(password, nonce, response)
        elif method is MySQLAuthMethod.CLEAR:
            ok = password is not None and check_clear_password(password, response)
        elif not service.settings.caching_sha2_full_auth:
            ok = password is not None and check_caching_sha2(password, nonce, response)
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
            ok = password is not None and given is not None and hmac.compare_digest(given, password)
        if not ok:
            raise AuthenticationFailed(f"Access denied for user '{self.user}'@'{self.peer.rpartition(':')[0]}' "
                                       f"(using password: {'YES' if response else 'NO'})")

    async def _prepare_session(self) -> None:
        """Pick the pool; check the database once per pool; keep a backend from now on in session mode."""
        pool = self.pool = self._pool_for(self.schema)
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

    def _pool_for(self, schema: str) -> Pool:
        return self.service.pool_for(schema, self.user, self.profile)

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
        return (backend.schema == self.schema and backend.autocommit == self.autocommit
                and backend.multi_statements == self.multi_statements and backend.settings == self.settings)

    async def _sync(self, backend: MySQLBackend) -> None:
        """Give the backend this client's session variables, default database, autocommit and multi-statements."""
        wanted = self.settings
        if backend.settings != wanted:
            if any(name not in wanted for name in backend.settings):
                await backend.command(bytes((my.COM_RESET_CONNECTION,)))  # back to the defaults, then ours
                backend.settings = {}
            for name, body in wanted.items():
                if backend.settings.get(name) != body:
                    await backend.command(bytes((my.COM_QUERY,)) + b"SET " + body)
            backend.settings = dict(wanted)
        if backend.schema != self.schema and self.schema:
            await backend.command(bytes((my.COM_INIT_DB,)) + self.schema.encode("utf-8", "surrogateescape"))
            backend.schema = self.schema
        if backend.autocommit != self.autocommit:
            await backend.query(f"SET autocommit={int(self.autocommit)}")
        if backend.multi_statements != self.multi_statements:
            option = my.MYSQL_OPTION_MULTI_STATEMENTS_OFF if not self.multi_statements else 0
            await backend.command(bytes((my.COM_SET_OPTION, option, 0)))
            backend.multi_statements = self.multi_statements

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
        if self._busy is not None:
            self._held += data
            if len(self._held) > HELD_LIMIT and not self.peer_paused_us:
                self.peer_paused_us = True
                self.transport.pause_reading()
            return
        if self._partial:
            data = self._partial + data
            self._partial = b""
        self._walk(data)

    def _walk(self, scan: bytes) -> None:
        """Forward whole commands to the linked backend; answer what needs none; borrow a backend when needed."""
        backend = self.backend
        end = len(scan)
        pos = start = 0
        if self._skip:
            assert backend is not None
            if self._skip >= end:
                self._skip -= end
                backend.transport.write(scan)
                return
            pos = self._skip
            self._skip = 0
        while pos < end:
            if end - pos < 4:
                break
            length = scan[pos] | (scan[pos + 1] << 8) | (scan[pos + 2] << 16)
            seq = scan[pos + 3]
            if self._cont or self._infile:  # the rest of a long packet, or LOCAL INFILE content
                assert backend is not None
                if seq != self._seq:
                    self._protocol_error(scan, start, pos, f"Got packets out of order: sequence id {seq}, "
                                         f"expected {self._seq}", my.ER_NET_PACKETS_OUT_OF_ORDER)
                    return
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
            head = length if length < INSPECT_LIMIT else INSPECT_LIMIT
            if end - pos - 4 < head:
                break
            command = scan[pos + 4]
            inspection = self._inspect(command, scan, pos, head)
            if inspection.action == FORWARD:
                if backend is None:
                    self._held += scan[pos:] if pos else scan
                    self._need_backend()
                    return
                if inspection.pin is not None and self.pin_reason is None:
                    self.pin_reason = inspection.pin
                    log.debug("client %s pinned to %s: %s", self.peer, backend, inspection.pin)
                backend.expect(command, inspection.effect)
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
                self._partial = scan[pos:]
            elif backend.idle and self.backend is backend:
                self._release_if_done(backend)  # a command without a response (STMT_CLOSE, SEND_LONG_DATA)
        elif pos < end:
            self._partial = scan[pos:]

    def _inspect(self, command: int, scan: bytes, pos: int, head: int) -> Inspection:
        if command == my.COM_QUERY:
            return inspect_query(scan[pos + 5 : pos + 4 + head], self.service.settings.local_infile)
        linked = self.backend is not None
        if command in FORWARDED_COMMANDS:
            if command == my.COM_STMT_PREPARE:
                return Inspection(FORWARD, (PREPARE, None))
            if command == my.COM_STMT_CLOSE:
                if not linked:
                    return Inspection(SWALLOW)  # no statement is open: nothing to close, no response
                if head >= 5:
                    self.statements.discard(int.from_bytes(scan[pos + 5 : pos + 9], "little"))
                return FORWARD_PLAIN
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
        self.statements.clear()
        self.pin_reason = None
        self.settings = {}
        self.autocommit = self._default_autocommit

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
            self.user = request.username
            await self._authenticate(request.auth_plugin_name, request.auth_response,
                                     bool(self.capabilities & my.CLIENT_PLUGIN_AUTH))
            if request.charset is not None:
                self.profile = Profile(self.profile.capabilities, request.charset & 0xFF)
            self.schema = request.database
            await self._prepare_session()
        except ConnectionClosed:
            self._busy = None
            self.close()
            return
        except ProxyError as exc:
            self._busy = None
            if isinstance(exc, AuthenticationFailed):
                PROXY.logins_failed += 1
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

    def command_done(self, backend: MySQLBackend, effect: tuple[int, Any]) -> None:
        """A forwarded command with an effect on the session has its response."""
        kind, value = effect
        tracker = backend.tracker
        if tracker.error is not None:
            return
        if kind == SCHEMA:
            self.schema = backend.schema = str(value)
            self.pool = self._pool_for(self.schema)
        elif kind == PREPARE:
            if tracker.prepare_ok is not None:
                self.statements.add(tracker.prepare_ok.statement_id)
        elif kind == RESET:
            self.statements.clear()
            self.pin_reason = None
            self.settings = {}
            backend.settings = {}
        elif kind == SETTINGS:
            for name, body in value:
                self.settings[name] = body
                backend.settings[name] = body
        elif kind == SET_OPTION:
            self.multi_statements = backend.multi_statements = bool(value)

    def backend_progress(self, backend: MySQLBackend) -> None:
        """Responses completed (or the server asks for a LOCAL INFILE upload)."""
        tracker = backend.tracker
        if tracker.expects_local_infile:
            self._infile = True
            self._cont = False
            self._seq = (tracker.last_seq + 1) & 0xFF
            return
        if tracker.seen_status & my.SERVER_STATUS_DB_DROPPED:
            self.schema = backend.schema = ""
            self.pool = self._pool_for("")
        self._release_if_done(backend)

    def _release_if_done(self, backend: MySQLBackend) -> None:
        """Transaction mode: back to the pool once nothing runs, no transaction is open and nothing pins it."""
        if (not backend.idle or self._skip or self._cont or self._infile or self._partial or self.kills_in_flight
                or backend.tracker.status_flags & BUSY_FLAGS or self.statements or self.pin_reason
                or self.backend is not backend):
            return
        pool = backend.pool
        if pool.session_mode:
            return
        self.autocommit = backend.autocommit
        self.backend = None
        backend.unlink()
        pool.stats.transactions += 1
        if backend.schema != pool.database:  # a USE moved it: put it back first
            self.loop.create_task(self._clean_up(backend))
            return
        pool.release(backend)

    def kill_settled(self) -> None:
        backend = self.backend
        if backend is not None and not self.kills_in_flight:
            self._release_if_done(backend)

    def backend_lost(self, backend: MySQLBackend, exc: Exception | None) -> None:
        backend.pool.discard(backend)
        if self.backend is backend:
            self.backend = None
            log.warning("client %s: backend %s was lost: %s", self.peer, backend, exc or "closed")
            self.fail(BackendUnavailable("Lost connection to the database server"))

    def pause_writing(self) -> None:
        backend = self.backend
        if backend is not None and not backend.closed:
            backend.peer_paused_us = True
            backend.transport.pause_reading()

    def resume_writing(self) -> None:
        backend = self.backend
        if backend is not None and backend.peer_paused_us:
            backend.peer_paused_us = False
            backend.transport.resume_reading()

    # --- janitor ---

    def check_idle(self, now: float, timeout: float) -> None:
        if self.active or self.state is not State.READY:
            self.active = False
            self.idle_since = now
            return
        backend = self.backend
        if backend is not None and (not backend.idle or backend.tracker.status_flags & my.SERVER_STATUS_IN_TRANS):
            return  # inside a transaction or a query: not idle in RDS Proxy's sense
        if now - self.idle_since > timeout:
            PROXY.idle_client_timeouts += 1
            self.fail(IdleClientTimeout(f"closing the connection after {timeout:g} s of inactivity"))


def _violation(message: str, errno: int) -> ProtocolViolation:
    return MySQLProtocolViolation(message, errno)
