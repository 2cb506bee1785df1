"""A PostgreSQL client session: startup, TLS, authentication, then transaction-level forwarding."""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import re
import shlex
from enum import IntEnum

from proxy.auth.md5 import check_md5_response
from proxy.auth.scram import MECHANISM, ScramKeys, ScramServer
from proxy.config import ClientAuthMethod, ClientTLSMode
from proxy.errors import (
    AuthenticationFailed,
    AuthorizationFailed,
    BackendUnavailable,
    IdleClientTimeout,
    LoginTimeout,
    ProtocolViolation,
    ProxyError,
)
from proxy.netio import Connection, ConnectionClosed
from proxy.pool.pg_backend import PostgresBackend
from proxy.pool.pool import Pool
from proxy.protocol.pg import messages as pg
from proxy.session.pg_service import PostgresService
from proxy.stats import PROXY

log = logging.getLogger(__name__)

# What each client message type means to the forwarder (indexed by the type byte).
INVALID, SYNC_POINT, SYNC, EXTENDED, COPY, TERMINATE = range(6)
ACTION = bytearray(256)
for _kind, _action in (("Q", SYNC_POINT), ("F", SYNC_POINT), ("S", SYNC), ("P", EXTENDED), ("B", EXTENDED),
                       ("D", EXTENDED), ("E", EXTENDED), ("C", EXTENDED), ("H", EXTENDED), ("d", COPY),
                       ("c", COPY), ("f", COPY), ("X", TERMINATE)):
    ACTION[ord(_kind)] = _action

FIXED_PARAMETERS = pg.READ_ONLY_PARAMETERS
STARTUP_ONLY = frozenset({"user", "database", "options", "replication"})
SETTING_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*$")
HELD_LIMIT = 256 * 1024


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


class PostgresClient(Connection):
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
        self.active = True  # data seen since the janitor last looked
        self.settings_id = 0  # the pool's number for this client's settings, to compare with a backend's
        self.idle_since = 0.0
        self._held = bytearray()  # client bytes waiting for a backend
        self._acquiring: asyncio.Task[None] | None = None
        self._borrowing = False
        self._skip = 0
        self._partial = b""
        self._task: asyncio.Task[None] | None = None
        self.peer = "?"

    def __repr__(self) -> str:
        return f"PostgresClient({self.peer}, user={self.user!r}, db={self.database!r})"

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
            self.fail(LoginTimeout("the client did not complete its login in time"))
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
        if self._task is not None and not self._task.done():
            self._task.cancel()
        if self._acquiring is not None and self._borrowing:
            self._acquiring.cancel()
        backend = self.backend
        if backend is not None:
            self.backend = None
            backend.unlink()
            self._return_after_client(backend)

    def _return_after_client(self, backend: PostgresBackend) -> None:
        """Give a backend back after its client left: clean at once, cleaned up first, or dropped."""
        pool = backend.pool
        if self.pending > 0 or backend.closed:
            if not backend.closed:  # a query is still running: stop it, and do not trust the connection
                log.warning("client %s left while a query was running; cancelling it and dropping %s",
                            self.peer, backend)
                self.loop.create_task(self.service.cancel_backend(backend))
            pool.discard(backend)
            return
        if not self.in_extended and backend.tx_status == pg.IDLE and not pool.session_mode:
            pool.stats.transactions += 1
            pool.release(backend)
            return
        log.info("client %s left inside a transaction or session; cleaning %s before reuse", self.peer, backend)
        self.loop.create_task(self._clean_up(backend))

    async def _clean_up(self, backend: PostgresBackend) -> None:
        pool = backend.pool
        try:
            if self.in_extended:
                backend.write(pg.message(b"S"))
                while (await backend.read_typed())[0] != ord("Z"):
                    pass
            if backend.tx_status != pg.IDLE or self.in_extended:
                await backend.simple_query("ROLLBACK")
            if pool.session_mode and pool.settings.reset_query:
                await backend.simple_query(pool.settings.reset_query)
                backend.params = dict(pool.server_params)
                backend.params_changed()
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
        failure = AuthenticationFailed(f'password authentication failed for user "{self.user}"')
        if method is ClientAuthMethod.SCRAM_SHA_256:
            keys = secret.scram_keys if secret is not None else ScramKeys.derive(os.urandom(16))
            self.write(pg.authentication_sasl([MECHANISM]))
            kind, body = await self.read_typed()
            if kind != ord("p"):
                raise ProtocolViolation(f"expected SASLInitialResponse, got message type {chr(kind)!r}")
            mechanism, client_first = pg.parse_sasl_initial_response(body)
            if mechanism != MECHANISM:
                raise ProtocolViolation(f"unsupported SASL mechanism {mechanism!r}")
            exchange = ScramServer(keys)
            self.write(pg.authentication(pg.AUTH_SASL_CONTINUE, exchange.server_first(client_first)))
            kind, body = await self.read_typed()
            if kind != ord("p"):
                raise ProtocolViolation(f"expected SASLResponse, got message type {chr(kind)!r}")
            try:
                final = exchange.server_final(body)
            except AuthenticationFailed:
                raise failure from None
            if secret is None:
                raise failure
            self.write(pg.authentication(pg.AUTH_SASL_FINAL, final))
            return
        if method is ClientAuthMethod.PASSWORD and not self.is_tls:
            raise AuthorizationFailed("cleartext password authentication is allowed only over TLS")
        salt = os.urandom(4)
        if method is ClientAuthMethod.MD5:
            self.write(pg.authentication(pg.AUTH_MD5, salt))
        else:
            self.write(pg.authentication(pg.AUTH_CLEARTEXT))
        kind, body = await self.read_typed()
        if kind != ord("p"):
            raise ProtocolViolation(f"expected PasswordMessage, got message type {chr(kind)!r}")
        answer = pg.parse_password(body)
        if secret is None:
            raise failure
        if method is ClientAuthMethod.MD5:
            ok = check_md5_response(self.user.encode(), secret.password, salt, answer)
        else:
            ok = hmac.compare_digest(answer, secret.password)
        if not ok:
            raise failure

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
        statements = [f"SET {name} TO {_quote(value)}" for name, value in wanted.items()
                      if current.get(name) != value]
        statements += [f"RESET {name}" for name in current
                       if name not in wanted and name not in FIXED_PARAMETERS]
        if statements:
            await backend.simple_query(";".join(statements))
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
        if backend is None or self._acquiring is not None:
            self._held += data
            if self._acquiring is None:
                self._dispatch_unlinked()
            elif len(self._held) > HELD_LIMIT and not self.peer_paused_us:
                self.peer_paused_us = True
                self.transport.pause_reading()
            return
        self._forward(data, backend)

    def _forward(self, data: bytes, backend: PostgresBackend) -> None:
        scan = self._partial + data if self._partial else data
        self._partial = b""
        end = len(scan)
        pos = self._skip
        limit = self.max_message
        action_of = ACTION
        while pos < end:
            if end - pos < 5:
                self._partial = scan[pos:]
                backend.transport.write(scan[:pos])
                self._skip = 0
                return
            kind = scan[pos]
            action = action_of[kind]
            length = int.from_bytes(scan[pos + 1 : pos + 5], "big")
            if action == SYNC_POINT:
                self.pending += 1
            elif action == SYNC:
                self.pending += 1
                self.in_extended = False
            elif action == EXTENDED:
                self.in_extended = True
            elif action == TERMINATE:
                backend.transport.write(scan[:pos])
                self._terminate()
                return
            elif action == INVALID:
                backend.transport.write(scan[:pos])
                self.fail(ProtocolViolation(f"invalid frontend message type {kind}"))
                return
            if length < 4 or length > limit:
                backend.transport.write(scan[:pos])
                self.fail(ProtocolViolation(f"invalid message length {length} for message type {chr(kind)!r}"))
                return
            pos += 1 + length
        self._skip = pos - end
        backend.transport.write(scan)
        if self.pending == 0:
            self._release_if_done(backend)

    def _dispatch_unlinked(self) -> None:
        """With no backend: answer what needs none (Sync, Flush, Terminate, stray COPY data), else borrow one."""
        held = self._held
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
                    return
                del held[: length + 1]
                if action == SYNC:
                    self.write(pg.READY_FOR_QUERY_IDLE)
                continue
            self._start_work()
            return

    def _start_work(self) -> None:
        """Get a backend for the held messages: at once when an idle one already has our settings."""
        pool = self.pool
        assert pool is not None
        backend = pool.borrow_idle()
        if backend is not None:
            assert isinstance(backend, PostgresBackend)
            if backend.settings_id == self.settings_id and not backend.buffered:
                self._attach(backend)
                return
        self._acquiring = self.loop.create_task(self._acquire(pool, backend))

    async def _acquire(self, pool: Pool, backend: PostgresBackend | None) -> None:
        try:
            if backend is None or backend.buffered:
                if backend is not None:  # the server said something while idle (e.g. it is shutting down)
                    pool.discard(backend)
                backend = await self._borrow(pool)
            try:
                await self._sync_settings(backend)
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
        if self.in_extended or backend.tx_status != pg.IDLE or self._skip or self._partial:
            return
        self.pending = 0
        pool = backend.pool
        if pool.session_mode:
            return
        self.backend = None
        backend.unlink()
        pool.stats.transactions += 1
        pool.release(backend)

    def backend_lost(self, backend: PostgresBackend, exc: Exception | None) -> None:
        backend.pool.discard(backend)
        if self.backend is backend:
            self.backend = None
            log.warning("client %s: backend %s was lost: %s", self.peer, backend, exc or "closed")
            self.fail(BackendUnavailable("the database connection was lost"))

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
        if self.backend is not None and (self.pending or self.backend.tx_status != pg.IDLE):
            return  # inside a transaction or a query: not idle in RDS Proxy's sense
        if now - self.idle_since > timeout:
            PROXY.idle_client_timeouts += 1
            self.fail(IdleClientTimeout(f"closing the connection after {timeout:g} s of inactivity"))

