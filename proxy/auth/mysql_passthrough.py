"""MySQL/MariaDB auth passthrough: a user without a stored secret is checked against the mysql_native_password hash
the database holds, and backend logins for that user answer with SHA1(password) recovered from the client's answer."""

from __future__ import annotations

import logging
import ssl
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import aiomysql

from proxy.auth.mysql import recover_native_stage1, scramble_native_password_from_stage1
from proxy.auth.passthrough import AdminLookup, BackendCredentials, LookupSettings, lookup_for
from proxy.config import MySQLSettings
from proxy.endpoints import Endpoint
from proxy.errors import AuthenticationFailed, BackendError
from proxy.protocol.mysql import constants as my
from proxy.protocol.mysql.packets import AuthSwitchRequest

if TYPE_CHECKING:
    from proxy.pool.pool import Target
    from proxy.secrets import SecretStore

log = logging.getLogger(__name__)

Account = tuple[str, str]  # (plugin, authentication_string) as mysql.user holds them


@dataclass(frozen=True, eq=False)
class NativeCredential:
    """SHA1(password) of a user, recovered from a client's answer: what a backend login answers a nonce with."""

    stage1: bytes

    def __repr__(self) -> str:
        return "NativeCredential()"

    __str__ = __repr__

    def answer(self, nonce: bytes) -> bytes:
        return scramble_native_password_from_stage1(self.stage1, nonce) if self.stage1 else b""


# Per user, by stored hash: what the latest client logins of this process gave.
CREDENTIALS: BackendCredentials[NativeCredential] = BackendCredentials()


def stored_hash(account: Account) -> bytes | None:
    """SHA1(SHA1(password)) of a mysql_native_password account (b'' for an empty password); None for any other."""
    plugin, text = account
    if plugin not in (my.MYSQL_NATIVE_PASSWORD, ""):
        return None
    if not text:
        return b""
    if len(text) != 41 or not text.startswith("*"):
        return None
    try:
        return bytes.fromhex(text[1:])
    except ValueError:
        return None


class MySQLLookup(AdminLookup[Account]):
    """The kept aiomysql connection that runs auth_query for one endpoint of this process."""

    def __init__(self) -> None:
        super().__init__("mysql")
        self._conn: aiomysql.Connection | None = None
        self.tls: ssl.SSLContext | None = None

    async def _connect(self, settings: LookupSettings, password: str) -> None:
        host, port = settings.address
        self._conn = await aiomysql.connect(host=host, port=port, user=settings.auth_user, password=password,
                                            connect_timeout=settings.timeout, autocommit=True, ssl=self.tls)

    async def _query(self, user: str, settings: LookupSettings) -> Account | None:
        if self._conn is None or self._conn.closed:
            raise ConnectionError("the lookup connection was lost")
        async with self._conn.cursor() as cursor:
            await cursor.execute(settings.auth_query, (user,))
            row = await cursor.fetchone()
        if not row:
            return None
        plugin, text = (value.decode() if isinstance(value, bytes) else str(value or "") for value in row[:2])
        return plugin, text

    async def _close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()


class PassthroughService(Protocol):
    """What the login needs of the MySQL service: the endpoint, its target, secrets and backend TLS."""

    @property
    def endpoint(self) -> Endpoint: ...
    @property
    def settings(self) -> MySQLSettings: ...
    @property
    def backend_tls(self) -> ssl.SSLContext | None: ...
    @property
    def target(self) -> Target: ...
    @property
    def secrets(self) -> SecretStore: ...


class LoginPeer(Protocol):
    """The client's side of the login exchange."""

    @property
    def user(self) -> str: ...
    @property
    def peer(self) -> str: ...
    @property
    def scramble(self) -> bytes: ...
    def _write_login(self, payload: bytes) -> None: ...
    async def _read_login_packet(self) -> bytes: ...


async def authenticate(client: LoginPeer, service: PassthroughService, plugin: str | None, response: bytes,
                       plugin_auth: bool) -> None:
    """mysql_native_password with the client (switching it there if it answered another plugin) against the hash
    the database holds for it (cached for auth_cache_ttl once an answer matched); SHA1(password) recovered from
    the answer is kept for that user's backend logins."""
    user, settings = client.user, service.settings
    account = await _account(service, user)
    if (plugin or my.MYSQL_NATIVE_PASSWORD) != my.MYSQL_NATIVE_PASSWORD:
        if not plugin_auth:
            raise AuthenticationFailed(f"Access denied for user '{user}': the client cannot switch to "
                                       f"{my.MYSQL_NATIVE_PASSWORD}")
        client._write_login(AuthSwitchRequest.for_scramble(my.MYSQL_NATIVE_PASSWORD, client.scramble).build())
        response = await client._read_login_packet()
    expected = stored_hash(account) if account is not None else None
    if account is not None and expected is None:
        log.warning("auth passthrough: user %r uses the %r plugin on the database (only %s is supported)", user,
                    account[0], my.MYSQL_NATIVE_PASSWORD)
        raise AuthenticationFailed(f"Access denied for user '{user}': auth passthrough supports "
                                   f"{my.MYSQL_NATIVE_PASSWORD} accounts only")
    stage1 = _check(expected, client.scramble, response)
    lookup = lookup_for("mysql", service.endpoint.name, MySQLLookup)
    if account is None or expected is None or stage1 is None:
        lookup.cache.forget(user)
        raise AuthenticationFailed(f"Access denied for user '{user}'@'{client.peer.rpartition(':')[0]}' "
                                   f"(using password: {'YES' if response else 'NO'})")
    lookup.cache.put(user, account, settings.auth_cache_ttl)
    CREDENTIALS.put(user, expected, NativeCredential(stage1))


def _check(expected: bytes | None, nonce: bytes, response: bytes) -> bytes | None:
    """SHA1(password) when `response` answers `nonce` for the stored hash (b'' for an empty password), else None."""
    if expected is None:
        return None
    if not expected:
        return b"" if not response else None
    return recover_native_stage1(expected, nonce, response)


async def _account(service: PassthroughService, user: str) -> Account | None:
    settings = service.settings
    lookup = lookup_for("mysql", service.endpoint.name, MySQLLookup)
    assert isinstance(lookup, MySQLLookup)
    lookup.tls = service.backend_tls
    target = service.target
    where = LookupSettings(settings.auth_user, settings.auth_query, settings.auth_cache_ttl,
                           settings.backend_connect_timeout, (target.host, target.port))
    secret = service.secrets.backend_login(settings.auth_user) if settings.auth_user else None  # rotated too
    return await lookup.verifier(user, where, secret.password.decode() if secret is not None else None)


def backend_credential(user: str) -> NativeCredential:
    """What a backend login of a user with no stored secret answers with: the latest its client logins left."""
    credential = CREDENTIALS.newest(user)
    if credential is None:
        raise AuthenticationFailed(f"no secret is stored for user {user!r}")
    return credential


def backend_answer(credential: NativeCredential, plugin: str, nonce: bytes) -> bytes:
    """The answer to a backend's (switched) plugin for a passthrough user: mysql_native_password only."""
    if plugin != my.MYSQL_NATIVE_PASSWORD:
        raise BackendError(f"the backend asks for {plugin!r}: auth passthrough answers {my.MYSQL_NATIVE_PASSWORD} "
                           "only")
    return credential.answer(nonce)
