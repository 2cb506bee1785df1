"""A PostgreSQL client's login: startup packet, TLS, CancelRequest, SCRAM/MD5/password authentication, session."""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import re
import shlex

from proxy.auth import pg_passthrough
from proxy.auth.md5 import check_md5_response
from proxy.auth.scram import MECHANISM, ScramKeys, ScramServer
from proxy.auth.token_login import password_matches, token_mode, verify_token
from proxy.auth.tokens import looks_like_token
from proxy.config import ClientAuthMethod, ClientTLSMode, TokenAuthMode
from proxy.console import CONSOLE_DATABASES, is_admin
from proxy.errors import AuthenticationFailed, AuthorizationFailed, BackendError, ConsoleDenied, ProtocolViolation
from proxy.pool.pool import Pool
from proxy.protocol.pg import messages as pg
from proxy.secrets import Secret
from proxy.session.client import LOGIN_MESSAGE_LIMIT, State
from proxy.session.pg_console import PARAMETERS, serve_console
from proxy.session.pg_forward import PgForward
from proxy.session.pg_service import PostgresService

log = logging.getLogger(__name__)

# Startup settings a pool remembers as accepted by the server (checked once each); values are the clients' own
# (application_name), so the set is emptied when it reaches this size.
VALIDATED_SETTINGS_LIMIT = 10_000
STARTUP_ONLY = frozenset({"user", "database", "options", "replication"})
SETTING_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*$")


def _options_settings(options: str) -> dict[str, str]:
    """`-c name=value` and `--name=value` pairs from the startup `options` parameter."""
    result: dict[str, str] = {}
    if not options or options.isspace():  # most clients send none: no shlex lexer per login
        return result
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


def _password_failed(user: str) -> AuthenticationFailed:
    # made where it is raised: an exception kept in a local of a frame in its own traceback is a reference cycle
    return AuthenticationFailed(f'password authentication failed for user "{user}"')


class PgLogin(PgForward):
    """Runs the client's login (within the login timeout of ClientConnection), then hands it to forwarding."""

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
                self.stats.cancel_requests += 1
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
        requested = self._startup_session(params)
        if self._console_asked():
            await self._console_login()
            return
        self.check_throttle()
        await self._authenticate()
        await self.authenticated()
        session = self.session
        pool = self.pool = service.pool_for(session.database, session.user)
        pool.clients.add(self)  # kept while it serves a client
        await self._prepare_session(pool, requested)
        self.process_id, self.secret_key = service.new_key()
        service.clients[self.process_id] = self
        out = [pg.AUTHENTICATION_OK]
        reported = dict(pool.server_params)
        reported.update((k, v) for k, v in session.settings.items() if k in reported)
        if service.settings.server_version:
            reported["server_version"] = service.settings.server_version
        out.extend(pg.parameter_status(k, v) for k, v in reported.items())
        out.append(pg.backend_key_data(self.process_id, self.secret_key))
        out.append(pg.READY_FOR_QUERY_IDLE)
        self.write(b"".join(out))
        self.logged_in("postgresql", session.user, session.database)
        self._init_replay(pool)
        self.state = State.READY
        leftover = self.take_buffered()
        if leftover:
            self.data_received(leftover)

    def _console_asked(self) -> bool:
        """Whether the login names the admin console's database (and the proxy has admin users)."""
        service = self.service
        return (self.session.database in CONSOLE_DATABASES and service.console is not None
                and bool(service.config.admin.users))

    async def _console_login(self) -> None:
        """An admin user's login to the console: authenticated as any login, answered by the proxy (no backend).
        Anyone else is refused as a failed login."""
        service = self.service
        user = self.session.user
        self.check_throttle()
        if not is_admin(service.config, user) or (service.secrets.get(user) is None
                                                  and service.settings.auth_passthrough):
            self.login_method = service.settings.auth_method.value
            raise ConsoleDenied(f'access to the admin console denied for user "{user}"')
        await self._authenticate()
        await self.authenticated()
        self.console = True
        self.process_id, self.secret_key = service.new_key()
        out = [pg.AUTHENTICATION_OK]
        out.extend(pg.parameter_status(k, v) for k, v in PARAMETERS.items())
        out.append(pg.backend_key_data(self.process_id, self.secret_key))
        out.append(pg.READY_FOR_QUERY_IDLE)
        self.write(b"".join(out))
        self.logged_in("postgresql", user, self.session.database)
        log.info("client %s (user %r): admin console session %d", self.peer, user, self.process_id)

    async def _after_login(self) -> None:
        if self.console:
            console = self.service.console
            assert console is not None
            await serve_console(self, console, f"{self.session.user}@{self.peer}")

    def _startup_session(self, params: dict[str, str]) -> dict[str, str]:
        """The user and database of the startup packet into `session`; returns the settings it requests."""
        if self.service.config.tls.mode is ClientTLSMode.REQUIRE and not self.is_tls:
            raise AuthorizationFailed("the proxy requires TLS (sslmode=require)", "tls_required")
        session = self.session
        session.user = params.get("user", "")
        if not session.user:
            raise AuthorizationFailed("no PostgreSQL user name specified in startup packet", "no_user")
        if self.service.settings.require_tls and not self.is_tls:
            raise AuthorizationFailed(f"endpoint {self.service.endpoint.name} requires TLS (sslmode=require)",
                                      "tls_required")
        session.database = params.get("database") or session.user
        if "replication" in params and params["replication"].lower() not in ("false", "off", "0", "no"):
            raise AuthorizationFailed("replication connections are not supported through the proxy",
                                      "replication_refused")
        requested = {k: v for k, v in params.items() if k not in STARTUP_ONLY}
        requested.update(_options_settings(params.get("options", "")))
        for name in requested:
            if not SETTING_NAME.match(name):
                raise ProtocolViolation(f"invalid configuration parameter name {name!r}")
        return requested

    async def _authenticate(self) -> None:
        service = self.service
        method = service.settings.auth_method
        user = self.session.user
        secret = service.secrets.get(user)
        mode = token_mode(service.settings, user)
        if mode is TokenAuthMode.REQUIRED or (mode is TokenAuthMode.OPTIONAL and self.is_tls):
            await self._authenticate_token(user, secret, required=mode is TokenAuthMode.REQUIRED)
            return
        if secret is None and service.settings.auth_passthrough and method is not ClientAuthMethod.PASSWORD:
            self.login_method = "passthrough"
            await pg_passthrough.authenticate(self, service, user)
            return
        self.login_method = method.value
        if method is ClientAuthMethod.SCRAM_SHA_256:
            await self._authenticate_scram(user, secret)
            return
        if method is ClientAuthMethod.PASSWORD and not self.is_tls:
            raise AuthorizationFailed("cleartext password authentication is allowed only over TLS",
                                      "cleartext_without_tls")
        salt = os.urandom(4)
        if method is ClientAuthMethod.MD5:
            self.write(pg.authentication(pg.AUTH_MD5, salt))
        else:
            self.write(pg.authentication(pg.AUTH_CLEARTEXT))
        answer = await self._read_password()
        if secret is None:
            raise _password_failed(user)
        if method is ClientAuthMethod.MD5:
            ok = check_md5_response(user.encode(), secret.password, salt, answer)
        else:
            ok = hmac.compare_digest(answer, secret.password)
        if not ok:
            raise _password_failed(user)

    async def _read_password(self) -> bytes:
        kind, body = await self.read_typed(LOGIN_MESSAGE_LIMIT)
        if kind != ord("p"):
            raise ProtocolViolation(f"expected PasswordMessage, got message type {chr(kind)!r}")
        return pg.parse_password(body)

    async def _authenticate_token(self, user: str, secret: Secret | None, required: bool) -> None:
        """A cleartext password over TLS: a token (the only answer `required` takes), else the stored password."""
        self.login_method = "token" if required else ClientAuthMethod.PASSWORD.value
        if not self.is_tls:
            raise AuthorizationFailed("token authentication requires TLS (sslmode=require)", "token_without_tls")
        self.write(pg.authentication(pg.AUTH_CLEARTEXT))
        answer = await self._read_password()
        if required or looks_like_token(answer):
            self.login_method = "token"
            await verify_token(self.service.tokens, answer, user, self.service.endpoint.name)
        elif not password_matches(secret, answer):
            raise _password_failed(user)

    async def _authenticate_scram(self, user: str, secret: Secret | None) -> None:
        keys = await _scram_keys(self.service, user, secret)
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
            raise _password_failed(user) from None
        if secret is None:
            raise _password_failed(user)
        self.write(pg.authentication(pg.AUTH_SASL_FINAL, final))

    async def _prepare_session(self, pool: Pool, requested: dict[str, str]) -> None:
        """Learn the server's settings, check the client's requested ones once, and keep a backend in session mode."""
        need_backend = pool.session_mode or pool.server_generation != pool.target.generation or any(
            item not in pool.validated_settings for item in requested.items()
        )
        if not need_backend and self._group_known(pool):
            self._init_wanted(pool, requested)
            return
        backend = await self._borrow(pool)
        try:
            await self._learn_group(pool, backend)
        except BackendError:  # the server refused a group value: the login fails, the backend is fine
            pool.release(backend)
            raise
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
