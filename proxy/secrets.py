"""Database user secrets from a TOML file and the environment, with SCRAM keys derived once per secret."""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import threading
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from proxy.auth.scram import DEFAULT_ITERATIONS, ScramKeys
from proxy.errors import ConfigError

log = logging.getLogger(__name__)


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

    def __init__(self, secrets: dict[str, str], env_prefix: str = "DBPROXY_PASSWORD_") -> None:
        self._env_prefix = env_prefix
        self._salt_key = _salt_key(secrets, env_prefix)
        self._secrets = {user: Secret(user, pw.encode(), self.scram_salt(user)) for user, pw in secrets.items()}
        self._fake_scram: dict[str, ScramKeys] = {}

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
        secrets: dict[str, str] = {}
        if path is not None:
            try:
                data = tomllib.loads(Path(path).read_bytes().decode())
            except OSError as exc:
                raise ConfigError(f"{path}: cannot read secrets file: {exc.strerror}") from None
            except UnicodeDecodeError:
                raise ConfigError(f"{path}: secrets file is not UTF-8 text") from None
            except tomllib.TOMLDecodeError as exc:
                raise ConfigError(f"{path}: secrets file is not valid TOML: {exc}") from None
            users = data.get("users", data)
            if not isinstance(users, dict):
                raise ConfigError(f"{path}: [users] must be a table of user = \"password\" lines")
            for user, password in users.items():
                if not isinstance(password, str):
                    raise ConfigError(f"{path}: the secret for '{user}' must be a string")
                secrets[user] = password
        store = cls(secrets, env_prefix)
        log.info("secrets loaded for %d user(s) from %s", len(secrets), path or "the environment only")
        return store

    def get(self, user: str) -> Secret | None:
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
