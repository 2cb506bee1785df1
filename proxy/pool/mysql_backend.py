"""A MySQL/MariaDB backend connection: login with the stored secret and the forwarding hot path."""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from proxy.auth.mysql import (
    clear_password_response,
    rsa_encrypt_password,
    scramble_caching_sha2,
    scramble_native_password,
)
from proxy.auth.mysql_passthrough import NativeCredential, backend_answer, backend_credential
from proxy.config import BackendTLSMode, MySQLSettings
from proxy.errors import (
    BackendError,
    BackendUnavailable,
    BackendUnreachable,
    ProtocolViolation,
    ProxyError,
)
from proxy.netio import ConnectionClosed
from proxy.pool.backend import LinkedClient
from proxy.pool.mysql_server_session import ENABLE_TRACKING, MySQLServerError, MySQLServerSession, Profile
from proxy.pool.pool import READ_ONLY_TROUBLE
from proxy.protocol.mysql import constants as my
from proxy.protocol.mysql.effects import INTERNAL, PREPARE
from proxy.protocol.mysql.packets import (
    AuthSwitchRequest,
    ErrPacket,
    HandshakeResponse41,
    HandshakeV10,
    SSLRequest,
    frame,
    strip_session_state,
)
from proxy.query_clock import QueryClock
from proxy.rundir import worker_count
from proxy.secrets import AUTH_FAILED_MYSQL_ERRNOS, Credential, SecretStore, retry_password

if TYPE_CHECKING:
    from proxy.pool.pool import Pool

log = logging.getLogger(__name__)

# What a backend connection always asks for, when the server offers it (the client's wishes come on top).
BACKEND_BASE_CAPABILITIES = (
    my.CLIENT_LONG_PASSWORD
    | my.CLIENT_PROTOCOL_41
    | my.CLIENT_SECURE_CONNECTION
    | my.CLIENT_PLUGIN_AUTH
    | my.CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA
    | my.CLIENT_TRANSACTIONS
    | my.CLIENT_CONNECT_ATTRS
    | my.CLIENT_SESSION_TRACK  # the server reports session state changes; clients without it get them stripped
)
# The client capabilities that change what the server sends or how it behaves: a backend serves only clients
# that negotiated the same ones (they are part of the pool's key), so bytes pass through unchanged.
RELAYED_CAPABILITIES = (
    my.CLIENT_FOUND_ROWS
    | my.CLIENT_LONG_FLAG
    | my.CLIENT_NO_SCHEMA
    | my.CLIENT_ODBC
    | my.CLIENT_LOCAL_FILES
    | my.CLIENT_IGNORE_SPACE
    | my.CLIENT_INTERACTIVE
    | my.CLIENT_IGNORE_SIGPIPE
    | my.CLIENT_MULTI_STATEMENTS
    | my.CLIENT_MULTI_RESULTS
    | my.CLIENT_PS_MULTI_RESULTS
    | my.CLIENT_DEPRECATE_EOF
    | my.MARIADB_CLIENT_PROGRESS
    | my.MARIADB_CLIENT_STMT_BULK_OPERATIONS
    | my.MARIADB_CLIENT_EXTENDED_METADATA
    | my.MARIADB_CLIENT_CACHE_METADATA
)
CONNECT_ATTRS = {"_client_name": "dbproxy", "program_name": "dbproxy"}
# How the response of the command being followed is forwarded (MySQLBackend.special).
PLAIN, RELABEL, SWALLOW = range(3)
# Errors with which the server ends a session by itself (shutdown, KILL, its own timeouts): a client hears them
# once, as the server sent them, and nothing more of the proxy when the connection then closes.
ER_SERVER_SHUTDOWN = 1053
TERMINATION_ERRORS = frozenset({ER_SERVER_SHUTDOWN, 1152, 1927, 4031})
# Errors that suggest the server is no longer the writer or is going away: ER_OPTION_PREVENTS_STATEMENT (1290,
# --read-only), ER_CANT_EXECUTE_IN_READ_ONLY_TRANSACTION (1792), server shutdown (1053), ER_READ_ONLY_MODE (1836).
TROUBLE_ERRNOS = frozenset({1290, 1792, ER_SERVER_SHUTDOWN, 1836})
# The client's commands after which the server's ROW_COUNT() and FOUND_ROWS() are the client's (see mysql_ids).
ROW_COMMANDS = frozenset({my.COM_QUERY, my.COM_STMT_EXECUTE, my.COM_STMT_BULK_EXECUTE})


class MySQLLinkedClient(LinkedClient, Protocol):
    """What a backend needs of the client session it serves while linked (the session side implements it)."""

    transport: asyncio.Transport
    kills_in_flight: int  # KILL QUERYs on their way to this backend's thread: it stays linked meanwhile
    found_rows: int  # what FOUND_ROWS() says for the client: set when a result set completes
    row_count: int  # what ROW_COUNT() says for the client: set when a statement completes
    clock: QueryClock | None  # times the client's statements (when the statement statistics are on)
    # Where reply bytes go instead of straight to the client's socket (None: straight there), so the client can
    # keep what it needs to replay its transaction on another server (see session/replay_log).
    replies: Callable[[bytes], None] | None

    @property
    def peer(self) -> str: ...

    @property
    def capabilities(self) -> int: ...

    def command_done(self, backend: MySQLBackend, effect: Any) -> None: ...

    def backend_progress(self, backend: MySQLBackend) -> None: ...

    def fail(self, error: ProxyError) -> None: ...

    def kill_settled(self) -> None: ...

    def server_ended(self, backend: MySQLBackend, packet: bytes) -> bool:
        """The server ended the session with the ERR `packet` while no command was outstanding: True when the
        client takes over (a failover keeps its transaction), False to pass the packet on."""
        ...


class MySQLBackend(MySQLServerSession):
    """One server connection. While linked to a client, response bytes stream through; only headers are read."""

    def __init__(self, pool: Pool, profile: Profile) -> None:
        super().__init__(pool, profile)
        self.thread_id = 0
        self.cache_metadata = False
        self.client: MySQLLinkedClient | None = None
        self.effect: Any = None  # what the client wants done when the tracked response completes
        self.queue: deque[tuple[int, Any]] = deque()  # pipelined commands whose responses come later
        self.terminated = False  # the server sent an error that ends the session (TERMINATION_ERRORS)
        self.special = PLAIN  # the response followed now: forwarded, relabelled (a client's prepare) or swallowed
        self.relabel_id = 0  # the client's statement id for the COM_STMT_PREPARE_OK being relabelled
        self._partial = b""  # an incomplete frame carried to the next read

    def __repr__(self) -> str:
        return f"MySQLBackend(thread={self.thread_id}, pool={self.pool.name})"

    @property
    def idle(self) -> bool:
        """No response outstanding and nothing half-read."""
        return self.tracker.done and not self.queue and not self._partial and not self.tracker.skip

    # --- linking to a client ---

    @property
    def in_transaction(self) -> bool:
        return self.tracker.in_transaction

    def link(self, client: MySQLLinkedClient) -> None:
        self.client = client
        self._partial = b""
        tracker = self.tracker
        tracker.strip_session_state = tracker.session_track and not client.capabilities & my.CLIENT_SESSION_TRACK

    def unlink(self) -> None:
        self.client = None
        self.tracker.strip_session_state = False
        if self.peer_paused_us:
            self.peer_paused_us = False
            self.transport.resume_reading()

    def expect(self, command: int, effect: Any) -> None:
        """The client sent `command`: follow its response (after those still outstanding)."""
        tracker = self.tracker
        if not tracker.done or self.queue:
            self.queue.append((command, effect))
            return
        self._start(command, effect)

    def infile_sent(self) -> None:
        """The client's LOCAL INFILE upload ended (its empty packet went to the server): the server answers now."""
        self.tracker.feed_infile(b"")

    def _start(self, command: int, effect: Any) -> bool:
        """Start tracking `command`; True if it has no response (done at once)."""
        self.effect = effect
        if effect is None:
            self.special = PLAIN
        else:
            kind = effect[0]
            if kind == INTERNAL:
                self.special = SWALLOW
            elif kind == PREPARE:
                self.special = RELABEL
                self.relabel_id = effect[1].statement_id
            else:
                self.special = PLAIN
        tracker = self.tracker
        if tracker.start(command, self.deprecate_eof,
                         cache_metadata=self.cache_metadata and command == my.COM_STMT_EXECUTE):
            self.effect = None
            if effect is not None and self.client is not None:
                self.client.command_done(self, effect)
            return True
        return False

    # --- the hot path: server -> client ---

    def data_received(self, data: bytes) -> None:
        client = self.client
        if client is None:
            self._buffer += data
            self._wake()
            return
        if self._partial:
            data = self._partial + data
            self._partial = b""
        tracker = self.tracker
        end = len(data)
        pos = 0
        finished = 0
        out: list[bytes] | None = None  # what goes to the client when some bytes must not pass as they are
        sent = 0  # data[:sent] is accounted for in `out`
        try:
            while True:
                begin = pos
                pos = tracker.scan(data, pos, end, stream=True)
                if self.special or tracker.edits:
                    if out is None:
                        out = []
                    sent = self._edit(data, begin, pos, sent, out)
                if not tracker.done:
                    break
                finished += 1
                if tracker.error is not None and tracker.error in TROUBLE_ERRNOS:
                    self._trouble(tracker.error)
                if tracker.command in ROW_COMMANDS and self.special != SWALLOW:  # what ROW_COUNT() etc. now say
                    if tracker.row_sets:
                        client.found_rows = tracker.rows
                        client.row_count = -1
                    else:
                        client.row_count = -1 if tracker.error is not None else tracker.affected_rows
                    clock = client.clock
                    if clock is not None:
                        clock.done(1, tracker.error is not None,
                                   tracker.rows if tracker.row_sets else tracker.affected_rows, self)
                effect = self.effect
                if effect is not None or tracker.session_state is not None or tracker.last_insert_id:
                    self.effect = None
                    client.command_done(self, effect)
                while self.queue:  # the next pipelined command's response follows
                    command, effect = self.queue.popleft()
                    if not self._start(command, effect):
                        break
                if tracker.done:
                    break
        except ProtocolViolation as exc:
            self._broken(f"malformed response: {exc}")
            return
        ending = b""
        if pos < end:
            if tracker.done:
                ending = self._termination(data, pos, end)
                if not ending:
                    self._broken(f"{end - pos} bytes from the server with no command outstanding")
                    return
            else:
                self._partial = data[pos:]
        if out is not None:
            out.append(data[sent:pos])
            forward = b"".join(out)
        else:
            forward = data[:pos] if pos < end else data
        if forward:
            replies = client.replies
            if replies is None:
                client.transport.write(forward)
            else:
                replies(forward)
        if ending and not client.server_ended(self, ending):
            client.transport.write(ending)
        if finished or tracker.expects_local_infile:
            client.backend_progress(self)

    def _termination(self, data: bytes, pos: int, end: int) -> bytes:
        """Unsolicited bytes that are the server's ERR ending the session (shutdown, kill): that packet, to pass
        on as sent (b"" when they are something else)."""
        if end - pos < 7 or data[pos + 4] != 0xFF:
            return b""
        stop = pos + 4 + int.from_bytes(data[pos : pos + 3], "little")
        if stop != end or int.from_bytes(data[pos + 5 : pos + 7], "little") not in TERMINATION_ERRORS:
            return b""
        self.terminated = True
        errno = int.from_bytes(data[pos + 5 : pos + 7], "little")
        if errno in TROUBLE_ERRNOS:
            self._trouble(errno)
        log.info("backend %s: the server ended the session: %s", self, ErrPacket.parse(data[pos + 4 : stop]).message)
        return data[pos:stop]

    def _trouble(self, errno: int) -> None:
        """The server answered that it is read-only or shutting down: the topology should look at it now."""
        target = self.pool.target
        if target.on_trouble:
            kind = "shutdown error" if errno == ER_SERVER_SHUTDOWN else READ_ONLY_TROUBLE
            target.report_trouble(f"{kind} (errno {errno}) from {self.host}:{self.port}")

    @property
    def ended_by_server(self) -> bool:
        """The last thing the server said was an error ending the session (its client has heard it)."""
        return self.terminated or (self.tracker.done and self.tracker.error in TERMINATION_ERRORS)

    def _edit(self, data: bytes, begin: int, pos: int, sent: int, out: list[bytes]) -> int:
        """Response bytes data[begin:pos] that do not pass unchanged; returns how far `out` now covers data."""
        tracker = self.tracker
        edits = tracker.edits
        if self.special == SWALLOW:  # the proxy's own command: nothing of it reaches the client
            edits.clear()
            out.append(data[sent:begin])
            return pos
        if self.special == RELABEL and tracker.prepare_ok is not None:
            at = tracker.prepare_ok_at  # the client sees its own statement id, not this connection's
            out.append(data[sent : at + 1])
            out.append(self.relabel_id.to_bytes(4, "little"))
            sent = at + 5
            self.special = PLAIN
        for off, length in edits:  # OK packets with session state, for a client that did not ask for it
            out.append(data[sent : off - 4])
            payload = strip_session_state(data[off : off + length])
            out.append(frame(payload, data[off - 1]))
            sent = off + length
        edits.clear()
        return sent

    # --- login ---

    async def login(self, settings: MySQLSettings, credential: Credential | None, tls: ssl.SSLContext | None,
                    database: str | None = None, password: bytes | None = None) -> HandshakeV10:
        """Log in with `credential` (its `password`, else the current one; None: auth passthrough for the pool's
        user); returns the server's greeting."""
        pool = self.pool
        keyed = backend_credential(pool.user) if credential is None else None  # auth passthrough, else refused
        if password is None:
            password = credential.password if credential is not None else b""
        user = credential.user if credential is not None else pool.user
        database = pool.database if database is None else database
        seq, payload = await self.read_packet(1 << 16)
        if payload[:1] == b"\xff":
            raise MySQLServerError(payload)
        greeting = HandshakeV10.parse(payload)
        self.thread_id = greeting.connection_id
        server_caps = greeting.capabilities
        caps = (BACKEND_BASE_CAPABILITIES | self.profile.capabilities) & server_caps
        if database:
            caps |= my.CLIENT_CONNECT_WITH_DB
        if server_caps & my.CLIENT_MYSQL:
            caps |= my.CLIENT_MYSQL  # a MySQL server: no MariaDB extended capabilities
        else:
            caps &= ~my.CLIENT_MYSQL
        seq += 1
        if settings.backend_tls is not BackendTLSMode.DISABLE and tls is not None:
            if server_caps & my.CLIENT_SSL:
                self.write(frame(SSLRequest(caps | my.CLIENT_SSL, my.MAX_PACKET, self.profile.charset).build(), seq))
                seq += 1
                hostname = self.host if settings.backend_tls is BackendTLSMode.VERIFY_FULL else None
                await self.start_tls(tls, server_side=False, server_hostname=hostname)
                caps |= my.CLIENT_SSL
            elif settings.backend_tls is not BackendTLSMode.PREFER:
                raise BackendUnavailable("the backend does not accept TLS connections", transient=False)
        self.capabilities = caps
        # OK packets carry session state info (stripped for clients without the capability)
        self.tracker.session_track = bool(caps & my.CLIENT_SESSION_TRACK)
        self.deprecate_eof = bool(caps & my.CLIENT_DEPRECATE_EOF)
        self.cache_metadata = bool(caps & my.MARIADB_CLIENT_CACHE_METADATA)
        self.multi_statements = bool(caps & my.CLIENT_MULTI_STATEMENTS)
        plugin = greeting.auth_plugin_name or my.MYSQL_NATIVE_PASSWORD
        nonce = greeting.auth_plugin_data
        if plugin not in (my.MYSQL_NATIVE_PASSWORD, my.CACHING_SHA2_PASSWORD) or keyed is not None:
            plugin = my.MYSQL_NATIVE_PASSWORD  # the server switches us if it wants another one
        answer = _scramble(plugin, password, nonce) if keyed is None else keyed.answer(nonce)
        response = HandshakeResponse41(
            caps, user, answer, database or None, plugin,
            CONNECT_ATTRS if caps & my.CLIENT_CONNECT_ATTRS else None, my.MAX_PACKET, self.profile.charset,
        )
        self.write(frame(response.build(), seq))
        await self._authenticate(plugin, nonce, password, keyed)
        return greeting

    async def _authenticate(self, plugin: str, nonce: bytes, password: bytes,
                            keyed: NativeCredential | None = None) -> None:
        """The server's answers to the login, up to its OK: auth switches, caching_sha2 full authentication."""
        public_key_requested = False
        while True:
            seq, payload = await self.read_packet(1 << 16)
            seq += 1
            head = payload[:1]
            if head == b"\x00":
                self._login_ok(payload)
                break
            if head == b"\xff":
                raise MySQLServerError(payload)
            if head == b"\xfe":
                switch = AuthSwitchRequest.parse(payload)
                plugin, nonce = switch.plugin_name, switch.scramble
                if keyed is not None:
                    answer = backend_answer(keyed, plugin, nonce)
                elif plugin == my.MYSQL_CLEAR_PASSWORD:
                    if not self.is_tls:
                        raise BackendError("the backend asks for a clear-text password on a connection without TLS")
                    answer = clear_password_response(password)
                elif plugin in (my.MYSQL_NATIVE_PASSWORD, my.CACHING_SHA2_PASSWORD):
                    answer = _scramble(plugin, password, nonce)
                else:
                    raise BackendError(f"the backend asks for an unsupported authentication plugin {plugin!r}")
                self.write(frame(answer, seq))
                continue
            if head == b"\x01" and plugin in (my.CACHING_SHA2_PASSWORD, my.SHA256_PASSWORD):
                data = payload[1:]
                if data == bytes((my.CACHING_SHA2_FAST_AUTH_SUCCESS,)):
                    continue  # OK follows
                if data == bytes((my.CACHING_SHA2_PERFORM_FULL_AUTH,)):
                    if self.is_tls:
                        self.write(frame(clear_password_response(password), seq))
                    else:
                        public_key_requested = True
                        self.write(frame(bytes((my.CACHING_SHA2_REQUEST_PUBLIC_KEY,)), seq))
                    continue
                if public_key_requested and data.startswith(b"-----BEGIN"):
                    self.write(frame(rsa_encrypt_password(password, nonce, data), seq))
                    continue
            raise ProtocolViolation(f"unexpected packet 0x{payload[0]:02x} during backend login")

    def _login_ok(self, payload: bytes) -> None:
        tracker = self.tracker
        tracker.start(my.COM_PING, False)
        tracker.feed(payload)


STATEMENT_LIMIT = "max_prepared_stmt_count"


def statement_cap(pool: Pool) -> int:
    """Prepared statements one backend connection may keep: the configured number, and never so many that the
    target's connections (of all worker processes) together could reach the server's max_prepared_stmt_count (a
    tenth of it is left to prepares in flight and to everyone else)."""
    server_limit = int(pool.server_params.get(STATEMENT_LIMIT, "16382"))
    connections = max(1, pool.target.max_connections) * worker_count()  # every worker process has its share
    share = (server_limit - server_limit // 10) // connections
    return max(1, min(pool.settings.max_prepared_statements, share))


def _scramble(plugin: str, password: bytes, nonce: bytes) -> bytes:
    if plugin == my.CACHING_SHA2_PASSWORD:
        return scramble_caching_sha2(password, nonce)
    return scramble_native_password(password, nonce)


async def open_backend(
    pool: Pool, profile: Profile, settings: MySQLSettings, secrets: SecretStore, tls: ssl.SSLContext | None,
    *, database: str | None = None, pooled: bool = True, address: tuple[str, int] | None = None,
) -> tuple[MySQLBackend, HandshakeV10]:
    """Connect and log in a new backend connection for `pool` (pooled=False: one the pool never counts) to the
    target's server, or to `address` (the server of an existing connection, for a KILL QUERY). A password the
    database refuses is tried once more with the secrets read again (a rotation's pending or new password)."""
    credential = secrets.backend_login(pool.user)
    try:
        return await _open_backend(pool, profile, settings, credential, tls, None, database, pooled, address)
    except MySQLServerError as exc:
        if credential is None or exc.mysql_errno not in AUTH_FAILED_MYSQL_ERRNOS:
            raise
        retry = retry_password(secrets, pool.user, credential)
        if retry is None:
            raise
        log.info("pool %s: the database refused the stored password; trying the secrets read again", pool.name)
        return await _open_backend(pool, profile, settings, retry[0], tls, retry[1], database, pooled, address)


async def _open_backend(
    pool: Pool, profile: Profile, settings: MySQLSettings, credential: Credential | None, tls: ssl.SSLContext | None,
    password: bytes | None, database: str | None, pooled: bool, address: tuple[str, int] | None,
) -> tuple[MySQLBackend, HandshakeV10]:
    loop = asyncio.get_running_loop()
    timeout = settings.backend_connect_timeout
    target = pool.target
    host, port = address or (target.host, target.port)
    generation = target.generation
    try:
        _, backend = await asyncio.wait_for(
            loop.create_connection(lambda: MySQLBackend(pool, profile), host, port), timeout
        )
    except (OSError, TimeoutError) as exc:
        raise BackendUnreachable(f"Can't connect to the database at {host}:{port} ({exc or 'timeout'})") from None
    backend.opened_to(host, port, generation)
    if not pooled:
        backend.forgotten = True
    try:
        greeting = await asyncio.wait_for(backend.login(settings, credential, tls, database, password), timeout)
        if pooled:
            if backend.capabilities & my.CLIENT_SESSION_TRACK:
                try:
                    await asyncio.wait_for(backend.command(ENABLE_TRACKING), timeout)
                except MySQLServerError as exc:
                    log.warning("backend %s does not track session state (%s)", backend, exc.message)
                else:
                    backend.tracking_all = True
            if target.needs_limits(generation) or pool.server_generation < generation:
                rows = await asyncio.wait_for(
                    backend.query("SELECT @@max_connections, @@max_prepared_stmt_count"), timeout)
                target.resolve_limits(int(rows[0][0] or 151), generation)
                if pool.server_generation < generation:
                    pool.server_params[STATEMENT_LIMIT] = (rows[0][1] or b"16382").decode()
                    pool.server_generation = generation
            backend.statements.cap = statement_cap(pool)
            if pool.settings.init_query:
                await asyncio.wait_for(backend.query(pool.settings.init_query), timeout)
    except BaseException as exc:
        backend.forgotten = True  # never counted by the pool as open
        backend.abort()
        if isinstance(exc, TimeoutError):
            raise BackendUnavailable("timed out logging in to the database") from None
        if isinstance(exc, ConnectionClosed | OSError | ssl.SSLError):
            raise BackendUnavailable(f"the database closed the connection during login: {exc}",
                                     transient=not isinstance(exc, ssl.SSLCertVerificationError)) from None
        raise
    return backend, greeting


async def probe_server(host: str, port: int, timeout: float) -> HandshakeV10:
    """Read the server's greeting (version, capabilities, charset) and hang up."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    except (OSError, TimeoutError) as exc:
        raise BackendUnreachable(f"Can't connect to the database at {host}:{port} ({exc or 'timeout'})") from None
    try:
        header = await asyncio.wait_for(reader.readexactly(4), timeout)
        length = int.from_bytes(header[:3], "little")
        if length > 1 << 16:
            raise ProtocolViolation(f"server greeting of {length} bytes")
        payload = await asyncio.wait_for(reader.readexactly(length), timeout)
    except (OSError, TimeoutError, asyncio.IncompleteReadError) as exc:
        raise BackendUnavailable(f"no greeting from the database: {exc}") from None
    finally:
        writer.close()
    if payload[:1] == b"\xff":
        raise MySQLServerError(payload)
    return HandshakeV10.parse(payload)
