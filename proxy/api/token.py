"""The API's bearer token: from [api] token or token_file, compared in constant time; never logged or shown."""

from __future__ import annotations

import hmac

from proxy.config import ApiSettings
from proxy.errors import ConfigError


def read_token(settings: ApiSettings) -> bytes:
    """The token the API asks for (the file's first line, without its newline); ConfigError if there is none."""
    if settings.token is not None:
        return settings.token.get_secret_value().encode()
    if settings.token_file is None:
        raise ConfigError("[api] port is set: give token or token_file")
    try:
        text = settings.token_file.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
        raise ConfigError(f"[api] token_file {settings.token_file}: cannot read: {reason}") from None
    token = text.strip()
    if not token:
        raise ConfigError(f"[api] token_file {settings.token_file}: the file is empty")
    return token.encode()


def bearer_matches(header: str | None, token: bytes) -> bool:
    """Whether an Authorization header carries `token` as its bearer token (the comparison takes the same time
    whatever the header holds)."""
    scheme, _, given = (header or "").partition(" ")
    return hmac.compare_digest(given.strip().encode(errors="replace"), token) and scheme.lower() == "bearer"
