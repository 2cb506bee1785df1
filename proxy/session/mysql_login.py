"""A MySQL client's login: handshake, TLS, authentication plugins and COM_CHANGE_USER."""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import ssl
from typing import Any, cast

from proxy.auth import mysql_passthrough
from proxy.auth.mysql import (
    check_caching_sha2,
    check_clear_password,
    check_native_password,
    parse_clear_password,
    rsa_decrypt_password,
)
from proxy.auth.token_login import password_matches, token_mode, verify_token
from proxy.auth.tokens import looks_like_token
from proxy.config import ClientTLSMode, MySQLAuthMethod, TokenAuthMode
from proxy.console import CONSOLE_DATABASES, is_admin
from proxy.errors import (
    AuthenticationFailed,
    AuthorizationFailed,
    BackendUnavailable,
    ConsoleDenied,
    ProtocolViolation,
    ProxyError,
)
from proxy.netio import WRITE_HIGH_WATER, WRITE_LOW_WATER, ConnectionClosed
from proxy.pool.mysql_backend import RELAYED_CAPABILITIES, Profile
from proxy.protocol.mysql import constants as my
from proxy.protocol.mysql.packets import (
    AuthSwitchRequest,
    ChangeUser,
    HandshakeResponse41,
    HandshakeV10,
    build_auth_more_data,
    frame,
    is_ssl_request,
)
from proxy.session.client import TLSHandshakeFailed
from proxy.session.mysql_console import serve_console
from proxy.session.mysql_lifecycle import C_LIBRARIES, State, violation
from proxy.session.mysql_statement_commands import MySQLStatementCommands

log = logging.getLogger(__name__)

LOGIN_PACKET_LIMIT = 64 * 1024

SCRAMBLE_CHARS = bytes(range(0x21, 0x7F)).replace(b"$", b"")

# What an unknown user's answer is checked against: the same work as for a known user's.
_NOBODYS_PASSWORD = os.urandom(16).hex().encode()

_SCRAMBLE_TABLE = bytes(SCRAMBLE_CHARS[b % len(SCRAMBLE_CHARS)] for b in range(256))  # random byte -> scramble char

def _make_scramble() -> bytes:
    return os.urandom(my.SCRAMBLE_LENGTH).translate(_SCRAMBLE_TABLE)


class MySQLLogin(MySQLStatementCommands):
    """The handshake and authentication, at connection and at COM_CHANGE_USER."""

    async def _read_login_packet(self) -> bytes:
        header = await self.read_exact(4)
        length = header[0] | (header[1] << 8) | (header[2] << 16)
        seq = header[3]
        if length > LOGIN_PACKET_LIMIT:
            raise violation(f"Bad handshake: a login packet of {length} bytes", my.ER_HANDSHAKE_ERROR)
        if seq != self._seq:
            raise violation(f"Got packets out of order: sequence id {seq}, expected {self._seq}",
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
                raise violation("Bad handshake: TLS was requested but is not offered", my.ER_HANDSHAKE_ERROR)
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
            raise AuthorizationFailed("Connections using insecure transport are prohibited: the proxy requires TLS",
                                      "tls_required")
        if service.settings.require_tls and not self.is_tls:
            raise AuthorizationFailed("Connections using insecure transport are prohibited: endpoint "
                                      f"{service.endpoint.name} requires TLS", "tls_required")
        self.session.database = (response.database or "") if response.capabilities & my.CLIENT_CONNECT_WITH_DB else ""
        if self._console_asked():
            await self._console_login(response)
            return
        self.check_throttle()
        await self._authenticate(response.auth_plugin_name, response.auth_response,
                                 bool(response.capabilities & my.CLIENT_PLUGIN_AUTH))
        await self.authenticated()
        self.profile = Profile(self.capabilities & RELAYED_CAPABILITIES, response.charset)
        self.multi_statements = bool(self.capabilities & my.CLIENT_MULTI_STATEMENTS)
        self.session.autocommit = self._default_autocommit
        if unreachable is not None:
            raise service.unreachable_error(unreachable)

    def _console_asked(self) -> bool:
        """Whether the handshake names the admin console's schema (and the proxy has admin users)."""
        service = self.service
        return (self.session.database in CONSOLE_DATABASES and service.console is not None
                and bool(service.config.admin.users))

    async def _console_login(self, response: HandshakeResponse41) -> None:
        """An admin user's login to the console: authenticated as any login, answered by the proxy (no backend).
        Anyone else is refused as a failed login."""
        service = self.service
        user = self.user
        self.check_throttle()
        if not is_admin(service.config, user) or (service.secrets.get(user) is None
                                                  and service.settings.auth_passthrough):
            self.login_method = service.settings.auth_method.value
            raise ConsoleDenied(f"Access denied for user '{user}'@'{self.peer.rpartition(':')[0]}' to database "
                                f"'{self.session.database}'")
        await self._authenticate(response.auth_plugin_name, response.auth_response,
                                 bool(response.capabilities & my.CLIENT_PLUGIN_AUTH))
        await self.authenticated()
        self.console = True

    async def _console_ready(self) -> None:
        """The console's login ends with an OK; then its commands are answered here."""
        self._send_ok(self._seq)
        self.logged_in("mysql", self.user, self.session.database)
        log.info("client %s (user %r): admin console session %d", self.peer, self.user, self.connection_id)
        console = self.service.console
        assert console is not None
        await serve_console(self, console, f"{self.user}@{self.peer}")

    async def _login_ready(self) -> None:
        """Authenticated: a pool (and in session mode a backend), then the OK that ends the login."""
        service = self.service
        await self._prepare_session()
        service.clients[self.connection_id] = self
        self._send_ok(self._seq)
        self.logged_in("mysql", self.session.user, self.session.database)
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
        mode = token_mode(service.settings, self.user)
        if mode is TokenAuthMode.REQUIRED or (mode is TokenAuthMode.OPTIONAL and self.is_tls):
            await self._authenticate_token(plugin, response, plugin_auth, mode is TokenAuthMode.REQUIRED)
            return
        method = service.settings.auth_method
        self.login_method = method.value
        secret = service.secrets.get(self.user)
        if secret is None and service.settings.auth_passthrough and method is not MySQLAuthMethod.CLEAR:
            self.login_method = "passthrough"
            await mysql_passthrough.authenticate(self, service, plugin, response, plugin_auth)
            return
        known, password = (True, secret.password) if secret is not None else (False, _NOBODYS_PASSWORD)
        if method is MySQLAuthMethod.CLEAR and not self.is_tls:
            raise AuthorizationFailed(f"Access denied for user '{self.user}': mysql_clear_password is allowed only "
                                      "over TLS", "cleartext_without_tls")
        nonce = self.scramble
        if (plugin or my.MYSQL_NATIVE_PASSWORD) != method.value:
            if not plugin_auth and method is not MySQLAuthMethod.NATIVE:
                raise AuthorizationFailed(f"Access denied for user '{self.user}': the client cannot switch to "
                                          f"{method.value}", "method_not_supported")
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
            raise self._access_denied(response)

    def _access_denied(self, response: bytes) -> AuthenticationFailed:
        return AuthenticationFailed(f"Access denied for user '{self.user}'@'{self.peer.rpartition(':')[0]}' "
                                    f"(using password: {'YES' if response else 'NO'})")

    async def _authenticate_token(self, plugin: str | None, response: bytes, plugin_auth: bool,
                                  required: bool) -> None:
        """mysql_clear_password over TLS: a token (the only answer `required` takes), else the stored password."""
        user = self.user
        clear = MySQLAuthMethod.CLEAR.value
        self.login_method = "token" if required else clear
        if not self.is_tls:
            raise AuthorizationFailed(f"Access denied for user '{user}': token authentication requires TLS",
                                      "token_without_tls")
        if plugin != clear:
            if not plugin_auth:
                raise AuthorizationFailed(f"Access denied for user '{user}': the client cannot switch to {clear}",
                                          "method_not_supported")
            self._write_login(AuthSwitchRequest(clear, b"").build())
            response = await self._read_login_packet()
        answer = parse_clear_password(response)
        if required or looks_like_token(answer):
            self.login_method = "token"
            await verify_token(self.service.tokens, answer, user, self.service.endpoint.name)
        elif not password_matches(self.service.secrets.get(user), answer):
            raise self._access_denied(response)

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
            self.session.database = request.database
            self.check_throttle()
            await self._authenticate(request.auth_plugin_name, request.auth_response,
                                     bool(self.capabilities & my.CLIENT_PLUGIN_AUTH))
            await self.authenticated()
            if request.charset is not None:
                self.profile = Profile(self.profile.capabilities, request.charset & 0xFF)
            await self._prepare_session()
        except ConnectionClosed:
            self._busy = None
            self.close()
            return
        except ProxyError as exc:
            self._busy = None
            await self.login_refused(exc)
            return
        self.service.clients[self.connection_id] = self
        self._send_ok(self._seq)
        self.logged_in("mysql", self.session.user, self.session.database)  # (COM_CHANGE_USER: a login too)
        self.state = State.READY
        self._seq = 0
        self._busy = None
        self._held += self.take_buffered()
        self._resume()
