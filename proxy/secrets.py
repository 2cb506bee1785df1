"""Database user secrets from a TOML file and the environment, with SCRAM keys derived once per secret."""

from __future__ import annotations

import logging
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from proxy.auth.scram import ScramKeys
from proxy.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class Secret:
    """One user's password; never shown by repr or str."""

    user: str
    password: bytes = field(repr=False)
    _scram: list[ScramKeys] = field(default_factory=list, repr=False)

    def __str__(self) -> str:
        return f"Secret(user={self.user!r})"

    __repr__ = __str__

    @property
    def scram_keys(self) -> ScramKeys:
        """Server-side SCRAM keys with a per-process random salt, derived on first use only."""
        if not self._scram:
            self._scram.append(ScramKeys.derive(self.password))
        return self._scram[0]


class SecretStore:
    """Looks up a user's secret: the environment (prefix + upper-cased user) wins over the file."""

    def __init__(self, secrets: dict[str, str], env_prefix: str = "DBPROXY_PASSWORD_") -> None:
        self._env_prefix = env_prefix
        self._secrets = {user: Secret(user, pw.encode()) for user, pw in secrets.items()}

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
                cached = self._secrets[user] = Secret(user, from_env.encode())
            return cached
        return self._secrets.get(user)

    def __repr__(self) -> str:
        return f"SecretStore(users={len(self._secrets)})"
