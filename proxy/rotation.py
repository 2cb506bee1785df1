"""Password rotation: a new strong password set on the database with the rotation user's admin connection and
stored in the secrets, so that the running proxies' new backend logins use it; only the database credential of the
user rotates (clients keep logging in to the proxy with the user's stored password).

single: the user's own database password changes; while it propagates, a backend login refused with the stored
password is tried once more with the pending one. alternating: the user's clone ([secrets.alternating]) and the
user take turns; the one not in use gets the new password, then backend logins switch to it; the other keeps its
password until the next rotation."""

from __future__ import annotations

import asyncio
import base64
import logging
import secrets as random_source
from dataclasses import dataclass

import aiomysql
import asyncpg

from proxy.auth.scram import ScramKeys
from proxy.config import Config, EndpointRole
from proxy.endpoints import resolve_endpoints
from proxy.errors import ConfigError
from proxy.secret_sources import locked, update
from proxy.secrets import ACTIVE_SUFFIX, BACKEND_SUFFIX, PENDING_SUFFIX, SecretStore

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 10.0
PASSWORD_BYTES = 32  # 256 bits, URL-safe base64: no character needs quoting in SQL


class RotationError(Exception):
    """The rotation could not be done; the message says how far it got (no password in it)."""


@dataclass(frozen=True)
class Rotated:
    user: str  # the proxy user whose backend credential rotated
    database_user: str  # the database user that got the new password (the clone or the user)
    where: str  # the secrets source written
    servers: tuple[str, ...]  # "engine host:port" of each server changed


def new_password() -> str:
    return random_source.token_urlsafe(PASSWORD_BYTES)


def writers(config: Config) -> list[tuple[str, str, int]]:
    """(engine, host, port) of each server the read_write endpoints write to, once each."""
    found: list[tuple[str, str, int]] = []
    for endpoint in resolve_endpoints(config):
        if endpoint.role is EndpointRole.READ_WRITE:
            item = (endpoint.engine, *endpoint.address)
            if item not in found:
                found.append(item)
    return found


def rotation_target(store: SecretStore, config: Config, user: str, strategy: str) -> str:
    """The database user that gets the new password."""
    clone = config.secrets.alternating.get(user)
    if strategy == "single":
        if clone is not None:
            raise RotationError(f"{user} alternates with {clone} ([secrets.alternating]): rotate it with "
                                "--strategy alternating")
        return user
    if clone is None:
        raise RotationError(f"--strategy alternating: no clone for {user} in [secrets.alternating]")
    active = store.backend_login(user)
    return user if active is not None and active.user == clone else clone


async def set_password(engine: str, host: str, port: int, admin: tuple[str, str], user: str, password: str) -> None:
    """ALTER the database user's password with the admin connection (PostgreSQL: a SCRAM verifier, so the password
    itself never reaches the server's logs)."""
    admin_user, admin_password = admin
    try:
        if engine == "postgresql":
            conn = await asyncpg.connect(host=host, port=port, user=admin_user, password=admin_password,
                                         database="postgres", timeout=CONNECT_TIMEOUT, statement_cache_size=0)
            try:
                await conn.execute(f"ALTER ROLE {_pg_ident(user)} PASSWORD '{scram_verifier(password)}'")
            finally:
                await conn.close()
            return
        my = await aiomysql.connect(host=host, port=port, user=admin_user, password=admin_password,
                                    connect_timeout=CONNECT_TIMEOUT, autocommit=True)
        try:
            async with my.cursor() as cursor:
                await cursor.execute("SELECT Host FROM mysql.user WHERE User = %s", (user,))
                hosts = [row[0] for row in await cursor.fetchall()] or ["%"]
                for account_host in hosts:
                    await cursor.execute(f"ALTER USER %s@%s IDENTIFIED BY '{password}'", (user, account_host))
        finally:
            my.close()
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError, aiomysql.Error) as exc:
        text = str(exc).splitlines()[0] if str(exc) else ""
        reason = f"{type(exc).__name__}: {text}"[:200].replace(password, "***").replace(admin_password, "***")
        raise RotationError(f"{engine} {host}:{port}: cannot set the password of {user}: {reason}") from None


def scram_verifier(password: str) -> str:
    keys = ScramKeys.derive(password.encode())
    b64 = base64.b64encode
    return (f"SCRAM-SHA-256${keys.iterations}:{b64(keys.salt).decode()}$"
            f"{b64(keys.stored_key).decode()}:{b64(keys.server_key).decode()}")


def _pg_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def rotate(config: Config, user: str, strategy: str) -> Rotated:
    """Rotate `user`'s database credential: pending stored, set on every writer, then stored as current (and, when
    alternating, made the active one); one rotation at a time per secrets source."""
    with locked(config.secrets):
        return _rotate(config, user, strategy)


def _rotate(config: Config, user: str, strategy: str) -> Rotated:
    settings = config.secrets
    if not settings.rotation_user:
        raise RotationError("[secrets] rotation_user is not set: no admin connection to change passwords with")
    store = SecretStore.from_settings(settings, quiet=True)
    admin = store.backend_login(settings.rotation_user)
    if admin is None:
        raise RotationError(f"no password for rotation_user {settings.rotation_user} in the secrets")
    if store.get(user) is None and store.backend_login(user) is None:
        raise RotationError(f"no stored secret for {user}: clients could not log in as it through the proxy")
    servers = writers(config)
    if not servers:
        raise RotationError("no read_write endpoint: no database to set the password on")
    target = rotation_target(store, config, user, strategy)
    password = new_password()
    where = update(settings, {target + PENDING_SUFFIX: password})
    for number, (engine, host, port) in enumerate(servers):
        try:
            asyncio.run(set_password(engine, host, port, (admin.user, admin.password.decode()), target, password))
        except RotationError:
            if number == 0:  # nothing changed: no pending password left behind
                update(settings, {target + PENDING_SUFFIX: None})
            raise
    changes: dict[str, str | None] = {target + BACKEND_SUFFIX: password, target + PENDING_SUFFIX: None}
    if strategy == "alternating":
        changes[user + ACTIVE_SUFFIX] = target
    update(settings, changes)
    log.info("rotated the database password of %s (for %s)", target, user)
    return Rotated(user, target, where, tuple(f"{engine} {host}:{port}" for engine, host, port in servers))


def check_strategy(strategy: str) -> None:
    if strategy not in ("single", "alternating"):
        raise ConfigError(f"--strategy {strategy}: single or alternating")
