"""PostgreSQL auth passthrough: a user without a stored secret is checked against the SCRAM verifier the database
holds, and backend logins for that user answer SCRAM with the ClientKey recovered from the client's proof."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
import os
import re
import ssl
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import asyncpg

from proxy.auth.passthrough import AdminLookup, BackendCredentials, LookupSettings, lookup_for
from proxy.auth.scram import MECHANISM, ScramClient, ScramKeys, ScramServer
from proxy.config import ClientAuthMethod, PostgresSettings
from proxy.endpoints import Endpoint
from proxy.errors import AuthenticationFailed, BackendError, ProtocolViolation
from proxy.protocol.pg import messages as pg

if TYPE_CHECKING:
    from proxy.pool.pool import Target
    from proxy.secrets import SecretStore

log = logging.getLogger(__name__)

LOOKUP_DATABASE = "postgres"  # pg_shadow is a shared catalog: any database sees it
LOGIN_MESSAGE_LIMIT = 8192  # a SASL message of a client's


@dataclass(frozen=True, eq=False)
class ScramCredential:
    """What a backend login needs to answer SCRAM as a user without knowing its password: the verifier's salt and
    iteration count, the ClientKey recovered from a client's proof, and the ServerKey (to check the server)."""

    salt: bytes
    iterations: int
    client_key: bytes
    server_key: bytes

    def __repr__(self) -> str:
        return f"ScramCredential(iterations={self.iterations})"

    __str__ = __repr__


@dataclass(frozen=True, eq=False)
class Md5Credential:
    """An md5 verifier (`md5` + md5(password + user) in hex) a client proved it knows the password of."""

    stored: bytes

    def __repr__(self) -> str:
        return "Md5Credential()"

    __str__ = __repr__


# Per user, by salt and iteration count (md5: by verifier): what the latest client logins of this process gave.
CREDENTIALS: BackendCredentials[ScramCredential] = BackendCredentials()
MD5_CREDENTIALS: BackendCredentials[Md5Credential] = BackendCredentials()
MD5_VERIFIER = re.compile(r"^md5[0-9a-f]{32}$")


def _verifier_key(salt: bytes, iterations: int) -> bytes:
    return iterations.to_bytes(4, "big") + salt


def parse_verifier(verifier: str) -> ScramKeys | None:
    """The keys of `SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>`; None for anything else (md5)."""
    method, _, rest = verifier.partition("$")
    if method != MECHANISM:
        return None
    try:
        params, keys = rest.split("$")
        iterations, salt = params.split(":")
        stored_key, server_key = keys.split(":")
        return ScramKeys(base64.b64decode(salt, validate=True), int(iterations),
                         base64.b64decode(stored_key, validate=True), base64.b64decode(server_key, validate=True))
    except (ValueError, binascii.Error):
        return None


class PgLookup(AdminLookup[str]):
    """The kept asyncpg connection that runs auth_query for one endpoint of this process."""

    def __init__(self) -> None:
        super().__init__("postgresql")
        self._conn: asyncpg.Connection | None = None
        self.tls: ssl.SSLContext | None = None

    async def _connect(self, settings: LookupSettings, password: str) -> None:
        host, port = settings.address
        self._conn = await asyncpg.connect(host=host, port=port, user=settings.auth_user, password=password,
                                           database=LOOKUP_DATABASE, timeout=settings.timeout,
                                           ssl=self.tls if self.tls is not None else False,
                                           statement_cache_size=0)

    async def _query(self, user: str, settings: LookupSettings) -> str | None:
        if self._conn is None or self._conn.is_closed():
            raise ConnectionError("the lookup connection was lost")
        row = await self._conn.fetchrow(settings.auth_query, user, timeout=settings.timeout)
        if row is None:
            return None
        value = row.get("passwd", row[len(row) - 1])  # PgBouncer's (usename, passwd) too
        return value if isinstance(value, str) and value else None

    async def _close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.terminate()


class PassthroughService(Protocol):
    """What the login needs of the PostgreSQL service: the endpoint, its target, secrets and backend TLS."""

    @property
    def endpoint(self) -> Endpoint: ...
    @property
    def settings(self) -> PostgresSettings: ...
    @property
    def backend_tls(self) -> ssl.SSLContext | None: ...
    @property
    def target(self) -> Target: ...
    @property
    def secrets(self) -> SecretStore: ...


class SaslPeer(Protocol):
    """The client's side of the login exchange."""

    def write(self, data: bytes) -> None: ...
    async def read_typed(self, limit: int = ...) -> tuple[int, bytes]: ...


def _password_failed(user: str) -> AuthenticationFailed:
    return AuthenticationFailed(f'password authentication failed for user "{user}"')


async def authenticate(client: SaslPeer, service: PassthroughService, user: str) -> None:
    """The client against the verifier the database holds for `user` (cached for auth_cache_ttl once the client
    proved its password): SCRAM-SHA-256 for a SCRAM verifier, md5 for an md5 one when the endpoint's method is
    md5. What the proof gives (the ClientKey, or the md5 hash) is kept for that user's backend logins."""
    settings = service.settings
    lookup = lookup_for("postgresql", service.endpoint.name, PgLookup)
    assert isinstance(lookup, PgLookup)
    lookup.tls = service.backend_tls
    target = service.target
    where = LookupSettings(settings.auth_user, settings.auth_query, settings.auth_cache_ttl,
                           settings.backend_connect_timeout, (target.host, target.port))
    secret = service.secrets.backend_login(settings.auth_user) if settings.auth_user else None  # rotated too
    verifier = await lookup.verifier(user, where, secret.password.decode() if secret is not None else None)
    keys = parse_verifier(verifier) if verifier is not None else None
    if keys is None and settings.auth_method is ClientAuthMethod.MD5:
        await _authenticate_md5(client, lookup, user, verifier, settings.auth_cache_ttl)
        return
    if verifier is not None and keys is None:
        log.warning("auth passthrough: user %r has no SCRAM-SHA-256 verifier on the database (an md5 one needs "
                    "auth_method md5)", user)
    exchange = ScramServer(keys or service.secrets.fake_scram_keys(user))
    final = await _exchange(client, exchange, user)
    if keys is None or verifier is None:
        raise _password_failed(user)
    lookup.cache.put(user, verifier, settings.auth_cache_ttl)
    CREDENTIALS.put(user, _verifier_key(keys.salt, keys.iterations),
                    ScramCredential(keys.salt, keys.iterations, exchange.client_key, keys.server_key))
    client.write(pg.authentication(pg.AUTH_SASL_FINAL, final))


async def _authenticate_md5(client: SaslPeer, lookup: PgLookup, user: str, verifier: str | None,
                            ttl: float) -> None:
    """md5 with the client against an `md5<hex>` verifier: it answers md5(hex + salt) for a fresh salt."""
    stored = verifier.encode() if verifier is not None and MD5_VERIFIER.match(verifier) else None
    salt = os.urandom(4)
    client.write(pg.authentication(pg.AUTH_MD5, salt))
    kind, body = await client.read_typed(LOGIN_MESSAGE_LIMIT)
    if kind != ord("p"):
        raise ProtocolViolation(f"expected PasswordMessage, got message type {chr(kind)!r}")
    answer = pg.parse_password(body)
    if stored is None or verifier is None or not hmac.compare_digest(answer, _md5_answer(stored, salt)):
        lookup.cache.forget(user)
        raise _password_failed(user)
    lookup.cache.put(user, verifier, ttl)
    MD5_CREDENTIALS.put(user, stored, Md5Credential(stored))


def _md5_answer(stored: bytes, salt: bytes) -> bytes:
    """What md5 authentication answers a salt with, from the stored `md5<hex>` (md5(password + user) in hex)."""
    return b"md5" + hashlib.md5(stored[3:] + salt).hexdigest().encode()


async def _exchange(client: SaslPeer, exchange: ScramServer, user: str) -> bytes:
    """The SASL messages up to the client's proof; returns the server-final-message once the proof verifies."""
    client.write(pg.authentication_sasl([MECHANISM]))
    kind, body = await client.read_typed(LOGIN_MESSAGE_LIMIT)
    if kind != ord("p"):
        raise ProtocolViolation(f"expected SASLInitialResponse, got message type {chr(kind)!r}")
    mechanism, client_first = pg.parse_sasl_initial_response(body)
    if mechanism != MECHANISM:
        raise ProtocolViolation(f"unsupported SASL mechanism {mechanism!r}")
    client.write(pg.authentication(pg.AUTH_SASL_CONTINUE, exchange.server_first(client_first)))
    kind, body = await client.read_typed(LOGIN_MESSAGE_LIMIT)
    if kind != ord("p"):
        raise ProtocolViolation(f"expected SASLResponse, got message type {chr(kind)!r}")
    try:
        return exchange.server_final(body)
    except AuthenticationFailed:
        raise _password_failed(user) from None


class KeyedScramClient(ScramClient):
    """The client side of SCRAM with a ClientKey in place of the password (the keys a client login left)."""

    def __init__(self, user: str) -> None:
        super().__init__(b"")
        self._user = user

    def _keys(self, salt: bytes, iterations: int) -> tuple[bytes, bytes]:
        credential = CREDENTIALS.get(self._user, _verifier_key(salt, iterations))
        if credential is None:
            raise AuthenticationFailed(f"the database's password of user {self._user!r} changed since its client "
                                       "logged in (auth passthrough holds no keys for it)")
        return credential.client_key, credential.server_key


class BackendWriter(Protocol):
    def write(self, data: bytes) -> None: ...


def backend_auth_step(backend: BackendWriter, user: str, code: int, body: bytes,
                      scram: ScramClient | None) -> ScramClient | None:
    """One step of a backend login for a user with no stored secret: SCRAM with the keys its client's login left,
    or md5 with the verifier it proved. Anything else (nothing left, another method) is refused as a user
    without a secret is."""
    md5 = MD5_CREDENTIALS.newest(user) if code == pg.AUTH_MD5 else None
    if code == pg.AUTH_SASL and CREDENTIALS.newest(user) is not None:
        if MECHANISM.encode() not in body[4:].split(b"\x00"):
            raise BackendError("the backend offers no SASL mechanism the proxy supports")
        scram = KeyedScramClient(user)
        backend.write(pg.sasl_initial_response(MECHANISM, scram.client_first()))
    elif code == pg.AUTH_SASL_CONTINUE and isinstance(scram, KeyedScramClient):
        backend.write(pg.password_message(scram.client_final(body[4:])))
    elif code == pg.AUTH_SASL_FINAL and isinstance(scram, KeyedScramClient):
        scram.verify_server_final(body[4:])
    elif md5 is not None:
        backend.write(pg.password_message(_md5_answer(md5.stored, body[4:8]) + b"\x00"))
    else:
        raise AuthenticationFailed(f"no secret is stored for user {user!r}")
    return scram
