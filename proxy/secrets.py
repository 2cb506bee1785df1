"""Database user secrets from the configured sources and the environment, with SCRAM keys derived once per secret.

Entry names: `USER` is the password clients log in to the proxy with, and the proxy's password on the database for
USER unless `USER.backend` gives another one; `USER.pending` is a database password being set by a rotation (tried
when the current one is refused); `USER.active` names which of USER and its clone ([secrets.alternating]) the
backend logins of USER's clients use."""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

from proxy.auth.scram import DEFAULT_ITERATIONS, ScramKeys
from proxy.config import SecretsSettings
from proxy.errors import ConfigError
from proxy.secret_sources import describe, read_all

log = logging.getLogger(__name__)

BACKEND_SUFFIX = ".backend"
PENDING_SUFFIX = ".pending"
ACTIVE_SUFFIX = ".active"
RESERVED_SUFFIXES = (BACKEND_SUFFIX, PENDING_SUFFIX, ACTIVE_SUFFIX)


@dataclass(frozen=True)
class Credential:
    """How the proxy logs in to the database for a pool's user: the database user, its password, and the password a
    rotation is setting (tried once when the current one is refused); never shown by repr or str."""

    user: str
    password: bytes = field(repr=False)
    pending: bytes | None = field(default=None, repr=False)


@dataclass(frozen=True, eq=False)
class Secret:
    """One user's password; never shown by repr or str."""

    user: str
    password: bytes = field(repr=False)
    salt: bytes = field(default=b"", repr=False)  # the SCRAM salt shown for this user (random when empty)
    _scram: list[ScramKeys] = field(default_factory=list, repr=False)

    def __str__(self) -> str:
        return f"Secret(user={self.user!r})"

    __repr__ = __str__

    @property
    def scram_keys(self) -> ScramKeys:
        """Server-side SCRAM keys, derived (PBKDF2) on first use only."""
        if not self._scram:
            self._scram.append(ScramKeys.derive(self.password, self.salt or None))
        return self._scram[0]

    @property
    def scram_ready(self) -> bool:
        """Whether `scram_keys` is at hand without deriving."""
        return bool(self._scram)


class SecretStore:
    """Looks up a user's secret: the environment (prefix + upper-cased user) wins over the file."""

    def __init__(self, secrets: dict[str, str], env_prefix: str = "DBPROXY_PASSWORD_",
                 settings: SecretsSettings | None = None) -> None:
        self._env_prefix = env_prefix
        self.settings = settings
        self._alternating = dict(settings.alternating) if settings is not None else {}
        self._entries = {name: value for name, value in secrets.items() if name.endswith(RESERVED_SUFFIXES)}
        users = {user: pw for user, pw in secrets.items() if user not in self._entries}
        self._salt_key = _salt_key(users, env_prefix)
        self._secrets = {user: Secret(user, pw.encode(), self.scram_salt(user)) for user, pw in users.items()}
        self._fake_scram: dict[str, ScramKeys] = {}

    @property
    def users(self) -> list[str]:
        """The users with a password (client-facing), without the environment's."""
        return sorted(self._secrets)

    def backend_login(self, user: str) -> Credential | None:
        """The database credential for `user`'s pools (None: no stored secret, auth passthrough decides)."""
        db_user = user
        clone = self._alternating.get(user)
        if clone is not None and self._entries.get(user + ACTIVE_SUFFIX) == clone:
            db_user = clone
        password = self._entries.get(db_user + BACKEND_SUFFIX)
        if password is None:
            secret = self.get(db_user)
            if secret is None:
                return None
            encoded = secret.password
        else:
            encoded = password.encode()
        pending = self._entries.get(db_user + PENDING_SUFFIX)
        return Credential(db_user, encoded, pending.encode() if pending is not None else None)

    def reread(self) -> SecretStore:
        """A store freshly read from the same sources (itself when it has none)."""
        if self.settings is None:
            return self
        return SecretStore.from_settings(self.settings, quiet=True)

    @classmethod
    def from_settings(cls, settings: SecretsSettings, quiet: bool = False) -> SecretStore:
        """The secrets of every configured source (ConfigError when one cannot be read or opened)."""
        store = cls(read_all(settings), settings.env_prefix, settings)
        if not quiet:
            log.info("secrets loaded for %d user(s) from %s", len(store.users), describe(settings))
        return store

    def scram_salt(self, user: str) -> bytes:
        """The salt shown for `user`, known or not: the same in every process loading the same secrets."""
        return hmac.digest(self._salt_key, b"salt\x00" + user.encode(), "sha256")[:16]

    def scram_keys(self, user: str) -> ScramKeys:
        """SCRAM keys for `user`; an unknown user gets stable fake ones (no PBKDF2) that no proof matches."""
        secret = self.get(user)
        if secret is not None:
            return secret.scram_keys
        return self.fake_scram_keys(user)

    def fake_scram_keys(self, user: str) -> ScramKeys:
        """Keys that look like a real user's (same salt size, same iteration count), at the cost of two HMACs."""
        keys = self._fake_scram.get(user)
        if keys is None:
            if len(self._fake_scram) >= 10_000:
                self._fake_scram.clear()
            name = user.encode()
            key = self._salt_key
            keys = self._fake_scram[user] = ScramKeys(
                self.scram_salt(user), DEFAULT_ITERATIONS,
                hmac.digest(key, b"stored\x00" + name, "sha256"), hmac.digest(key, b"server\x00" + name, "sha256"),
            )
        return keys

    def warm_up(self) -> threading.Thread:
        """Derive every known user's SCRAM keys in a background thread (PBKDF2 releases the GIL)."""
        users = list(self._secrets)
        users += [name[len(self._env_prefix):].lower() for name in os.environ if name.startswith(self._env_prefix)]

        def derive() -> None:
            for user in users:
                secret = self.get(user)
                if secret is not None:
                    _ = secret.scram_keys

        thread = threading.Thread(target=derive, name="scram-keys", daemon=True)
        thread.start()
        return thread

    @classmethod
    def from_file(cls, path: Path | None, env_prefix: str = "DBPROXY_PASSWORD_") -> SecretStore:
        """The secrets of a TOML file (None: the environment only)."""
        return cls.from_settings(SecretsSettings(file=path, env_prefix=env_prefix))

    def get(self, user: str) -> Secret | None:
        """The password clients log in as `user` with (the environment over the sources)."""
        if user.endswith(RESERVED_SUFFIXES):
            return None
        from_env = os.environ.get(self._env_prefix + user.upper())
        if from_env is not None:
            cached = self._secrets.get(user)
            if cached is None or cached.password != from_env.encode():
                cached = self._secrets[user] = Secret(user, from_env.encode(), self.scram_salt(user))
            return cached
        return self._secrets.get(user)

    def __repr__(self) -> str:
        return f"SecretStore(users={len(self._secrets)})"


def _salt_key(secrets: dict[str, str], env_prefix: str) -> bytes:
    """A key known only to processes that hold these secrets (the supervisor's workers load the same ones)."""
    material = hashlib.sha256(b"dbproxy scram salt v1")
    entries = sorted(secrets.items()) + sorted((k, v) for k, v in os.environ.items() if k.startswith(env_prefix))
    for name, value in entries:
        material.update(b"%d:%s%d:%s" % (len(name), name.encode(), len(value), value.encode()))
    return material.digest()


AUTH_FAILED_SQLSTATES = frozenset({"28P01", "28000"})  # PostgreSQL: invalid password, invalid authorization
AUTH_FAILED_MYSQL_ERRNOS = frozenset({1045})  # ER_ACCESS_DENIED_ERROR


def retry_password(store: SecretStore, user: str, tried: Credential) -> tuple[Credential, bytes] | None:
    """What to try once after the database refused `tried`: the pending password of the secrets read again (a
    rotation under way), else their current one, else the pending one known before; None when nothing differs."""
    try:
        fresh = store.reread().backend_login(user)
    except ConfigError as exc:
        log.warning("secrets could not be read again: %s", exc)
        fresh = None
    for credential in (fresh, tried):
        if credential is None:
            continue
        for password in (credential.pending, credential.password):
            if password is not None and (credential.user, password) != (tried.user, tried.password):
                return credential, password
    return None
