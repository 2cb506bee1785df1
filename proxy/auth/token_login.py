"""Token logins: which logins take a signed token (per endpoint and user), and the process's one verifier."""

from __future__ import annotations

import hmac

from proxy.auth.tokens import TokenIdentity, TokenRejected, TokenVerifier, looks_like_token, settings_problem
from proxy.config import Config, MySQLSettings, PostgresSettings, TokenAuthMode
from proxy.endpoints import resolve_endpoints
from proxy.errors import ConfigError
from proxy.secrets import Secret


def token_mode(settings: PostgresSettings | MySQLSettings, user: str) -> TokenAuthMode:
    """The token_auth mode of `user`'s logins to an endpoint with these (resolved) settings."""
    return settings.token_auth_users.get(user, settings.token_auth)


def uses_tokens(settings: PostgresSettings | MySQLSettings) -> bool:
    """Whether any login to an endpoint with these settings may be a token login."""
    return settings.token_auth is not TokenAuthMode.DISABLED or any(
        mode is not TokenAuthMode.DISABLED for mode in settings.token_auth_users.values())


def make_verifier(config: Config) -> TokenVerifier | None:
    """The process's token verifier (None without a key source); ConfigError if a key source cannot work, or if
    an endpoint takes tokens and [tokens] gives nothing to verify them with."""
    problem = settings_problem(config.tokens)
    if problem:
        raise ConfigError(problem)
    verifier = TokenVerifier.from_settings(config.tokens)
    if verifier is None:
        for endpoint in resolve_endpoints(config):
            if uses_tokens(endpoint.settings):
                raise ConfigError(f"endpoint {endpoint.name}: token_auth is on but [tokens] gives no key source "
                                  "(keys_dir, jwks_file or jwks_url)")
    return verifier


async def verify_token(verifier: TokenVerifier | None, answer: bytes, user: str, endpoint: str) -> TokenIdentity:
    """The identity of the token a client sent as its password; TokenRejected (28P01 / 1045) if it is none."""
    if verifier is None:  # not reached with a validated configuration
        raise TokenRejected("token authentication is not configured", user)
    if not looks_like_token(answer):
        raise TokenRejected("the password is not a token", user)
    return await verifier.verify(answer, user=user, endpoint=endpoint)


def password_matches(secret: Secret | None, answer: bytes) -> bool:
    """Whether a cleartext answer is the user's stored password (False for a user without one)."""
    if secret is None:
        return False
    return hmac.compare_digest(answer, secret.password)
