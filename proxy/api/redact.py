"""The effective configuration as the API shows it: every secret (token, password, private key) replaced."""

from __future__ import annotations

import re
from typing import Any

from proxy.config import Config

REDACTED = "<redacted>"
SECRET_KEYS = frozenset({"token", "password", "secret"})
SECRET_SUFFIXES = ("_token", "_password", "_secret")
URL_CREDENTIALS = re.compile(r"(?<=://)[^/@\s]+@")  # user:password@ in a URL (a jwks_url may carry them)


def _secret(key: str) -> bool:
    return key in SECRET_KEYS or key.endswith(SECRET_SUFFIXES)


def _redact(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: (REDACTED if _secret(str(key)) and item is not None else _redact(item))
                for key, item in value.items()}
    if isinstance(value, list):
        return [_redact(item) for item in value]
    if isinstance(value, str) and "@" in value:
        return URL_CREDENTIALS.sub(REDACTED + "@", value)
    return value


def redacted_config(config: Config) -> dict[str, Any]:
    """The configuration as JSON data, secrets replaced (the passwords themselves live in the secrets file and the
    environment, which are never read here)."""
    data: dict[str, Any] = _redact(config.model_dump(mode="json"))
    return data
