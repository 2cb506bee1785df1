"""Signed login tokens (JWT, ES256/RS256): verification against local public keys or a JWKS document, and policy."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from proxy.errors import AuthenticationFailed

TOKEN_PREFIX = b"eyJ"  # every JWT starts with the base64url of '{"'


class TokenRejected(AuthenticationFailed):
    """A token that does not authenticate: `reason` says why (for the audit log), the message is what clients see."""

    def __init__(self, reason: str, user: str = "") -> None:
        super().__init__(f'token authentication failed for user "{user}"')
        self.reason = reason


@dataclass(frozen=True)
class TokenIdentity:
    """Who a verified token names: its subject, its claims (no signature), the key that signed it, its expiry."""

    subject: str
    key_id: str
    expires_at: float
    claims: dict[str, Any] = field(default_factory=dict, repr=False)


def looks_like_token(password: bytes) -> bool:
    """Whether a password sent by a client is a JWT rather than a password (three base64url parts)."""
    return password.startswith(TOKEN_PREFIX) and password.count(b".") == 2


class TokenVerifier:
    """Verifies tokens for one proxy process (keys cached; a JWKS document refreshed on an unknown key id)."""

    async def verify(self, token: bytes, *, user: str, endpoint: str) -> TokenIdentity:
        """The identity of a valid token that the policy lets log in as `user` on `endpoint`; TokenRejected if not."""
        raise NotImplementedError

    def close(self) -> None:
        """Stop background refreshes and close the HTTP session, if any."""
