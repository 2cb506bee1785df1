"""Signed login tokens (JWT, ES256/RS256): verification against local public keys or a JWKS document, and policy."""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import jwt
from jwt.exceptions import InvalidAlgorithmError, InvalidSignatureError, InvalidTokenError

from proxy.auth.jwks import JwksFile, JwksUrl, KeyRing, KeysFolder, KeySource, KeySourceError, VerificationKey
from proxy.auth.policy import Policy
from proxy.config import TokenSettings
from proxy.errors import AuthenticationFailed

TOKEN_PREFIX = b"eyJ"  # every JWT starts with the base64url of '{"'
SHOWN_LENGTH = 128  # characters of a subject, user or endpoint name a refusal reason shows at most
# pyjwt checks only the signature: the claims are checked here, so that each refusal has its own reason
SIGNATURE_ONLY = {"verify_signature": True, "verify_exp": False, "verify_nbf": False, "verify_iat": False,
                  "verify_aud": False, "verify_iss": False, "verify_sub": False, "verify_jti": False}


class TokenRejected(AuthenticationFailed):
    """A token that does not authenticate: `reason` says why (for the audit log), the message is what clients see."""

    def __init__(self, reason: str, user: str = "") -> None:
        super().__init__(f'token authentication failed for user "{shown(user)}"')
        self.reason = reason
        self.user = user

    def __repr__(self) -> str:
        return f"TokenRejected({self.reason!r}, user={self.user!r})"


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

    def __init__(self, keys: KeyRing, settings: TokenSettings, clock: Callable[[], float] = time.time) -> None:
        self.keys = keys
        self.settings = settings
        self.algorithms = frozenset(settings.algorithms)
        self.issuers = frozenset(settings.issuers)
        self.audiences = frozenset(settings.audiences)
        self.policy = Policy.from_settings(settings.policy)
        self.clock = clock

    @classmethod
    def from_settings(cls, settings: TokenSettings) -> TokenVerifier | None:
        """A verifier for the [tokens] section; None when it names no key source (tokens are not accepted)."""
        sources: list[KeySource] = []
        if settings.keys_dir is not None:
            sources.append(KeysFolder(settings.keys_dir))
        if settings.jwks_file is not None:
            sources.append(JwksFile(settings.jwks_file))
        if settings.jwks_url:
            sources.append(JwksUrl(settings.jwks_url, settings.jwks_ca_file))
        if not sources:
            return None
        return cls(KeyRing(sources, cache_ttl=settings.jwks_cache_ttl,
                           refresh_interval=settings.jwks_refresh_interval), settings)

    async def verify(self, token: bytes, *, user: str, endpoint: str) -> TokenIdentity:
        """The identity of a valid token that the policy lets log in as `user` on `endpoint`; TokenRejected if not."""
        if len(token) > self.settings.max_token_size:
            raise TokenRejected("too large", user)
        token = token.strip()  # a token read from a file may end with a newline
        key, alg = await self._key_for(token, user)
        try:
            claims = jwt.decode(token, key.key, algorithms=[alg], options=SIGNATURE_ONLY)  # type: ignore[arg-type]
        except InvalidSignatureError:
            raise TokenRejected("bad signature", user) from None
        except InvalidAlgorithmError:
            raise TokenRejected("algorithm not allowed", user) from None
        except (InvalidTokenError, ValueError, TypeError):
            raise TokenRejected("malformed", user) from None
        subject, expires = self._check_claims(claims, user, endpoint)
        if not self.policy.allows(subject, claims, user, endpoint):
            raise TokenRejected(f"policy refuses subject '{shown(subject)}' as user '{shown(user)}' on endpoint "
                                f"'{shown(endpoint)}'", user)
        return TokenIdentity(subject, key.kid, expires, claims)

    async def _key_for(self, token: bytes, user: str) -> tuple[VerificationKey, str]:
        """The key named by the token's header and the algorithm to verify with (never one outside the configured
        set, never one the key's type does not have: no HMAC with a public key, no `none`)."""
        try:
            header = jwt.get_unverified_header(token)
        except (InvalidTokenError, ValueError, TypeError):  # not base64url JSON, an unsupported critical extension
            raise TokenRejected("malformed", user) from None
        alg, kid = header.get("alg"), header.get("kid")
        if not isinstance(alg, str) or alg not in self.algorithms:
            raise TokenRejected("algorithm not allowed", user)
        if "crit" in header:
            raise TokenRejected("malformed", user)  # no critical extension is understood here
        if not isinstance(kid, str) or not kid:
            raise TokenRejected("unknown key", user)
        key = await self.keys.get(kid)
        if key is None:
            raise TokenRejected("unknown key", user)
        if alg not in key.algorithms:
            raise TokenRejected("algorithm not allowed", user)
        return key, alg

    def _check_claims(self, claims: dict[str, Any], user: str, endpoint: str) -> tuple[str, float]:
        """(subject, expiry) of claims that hold for this endpoint now; TokenRejected says which does not."""
        now, leeway = self.clock(), self.settings.leeway
        expires, issued, not_before = (_time_claim(claims, name, user) for name in ("exp", "iat", "nbf"))
        if expires is None or issued is None:
            raise TokenRejected(f"missing claim '{'exp' if expires is None else 'iat'}'", user)
        if now > expires + leeway:
            raise TokenRejected("expired", user)
        if not_before is not None and now + leeway < not_before:
            raise TokenRejected("not yet valid", user)
        if issued > now + leeway:
            raise TokenRejected("issued in the future", user)
        if expires - issued > self.settings.max_lifetime:
            raise TokenRejected("lifetime too long", user)
        issuer = claims.get("iss")
        if not isinstance(issuer, str) or issuer not in self.issuers:
            raise TokenRejected("wrong issuer", user)
        if not _names_audience(claims.get("aud"), self.audiences | {endpoint}):
            raise TokenRejected("wrong audience", user)
        subject = claims.get("sub")
        if not isinstance(subject, str) or not subject:
            raise TokenRejected("missing claim 'sub'", user)
        return subject, expires

    def close(self) -> None:
        """Stop a background refresh, if any (each fetch has its own HTTP session, closed when it ends)."""
        self.keys.close()


def _time_claim(claims: dict[str, Any], name: str, user: str) -> float | None:
    """A NumericDate claim (seconds since the epoch), None when absent; another type is malformed."""
    value = claims.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise TokenRejected("malformed", user)
    return float(value)


def _names_audience(aud: object, accepted: Iterable[str]) -> bool:
    """Whether the `aud` claim (a string or a list of strings) names one of the accepted audiences."""
    names = [aud] if isinstance(aud, str) else aud if isinstance(aud, list) else []
    return any(isinstance(name, str) and name in accepted for name in names)


def shown(name: str) -> str:
    """A name from a client or a token as a refusal reason shows it: printable, at most SHOWN_LENGTH characters."""
    clean = "".join(c if c.isprintable() and c != "'" else "?" for c in name[:SHOWN_LENGTH])
    return clean + ("..." if len(name) > SHOWN_LENGTH else "")


def settings_problem(settings: TokenSettings) -> str | None:
    """The first reason the local key sources of [tokens] cannot work, as "'key': reason" (for a start or a
    reload to refuse); a JWKS URL is fetched at the first login, not here."""
    local: list[tuple[str, KeysFolder | JwksFile]] = []
    if settings.keys_dir is not None:
        local.append(("keys_dir", KeysFolder(settings.keys_dir)))
    if settings.jwks_file is not None:
        local.append(("jwks_file", JwksFile(settings.jwks_file)))
    for key, source in local:
        try:
            if not source.read():
                return f"'tokens.{key}': {source.name} holds no usable public key (`dbproxy keys init` makes one)"
        except KeySourceError as exc:
            return f"'tokens.{key}': {exc}"
    ca_file = settings.jwks_ca_file
    if ca_file is not None and not settings.jwks_url.startswith("https://"):
        return "'tokens.jwks_ca_file': given, but jwks_url is not an https:// URL"
    if ca_file is not None and not os.access(ca_file, os.R_OK):
        return f"'tokens.jwks_ca_file': cannot read {ca_file}"
    return None
