"""The process's login guard: the failed-login throttle and the audit log, configured by [auth], and why a login
failed in the audit's words."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from proxy.auth.audit import AuditLog
from proxy.auth.throttle import Failure, LoginThrottle
from proxy.auth.tokens import TokenRejected
from proxy.config import AuthSettings
from proxy.errors import AuthorizationFailed, ConsoleDenied, ProxyError

if TYPE_CHECKING:
    from proxy.auth.shared_throttle import SharedThrottle

log = logging.getLogger(__name__)


class LoginGuard:
    """One per process, handed to every service (as the token verifier is); a reload configures it again.

    `throttle` is the process's own count (and what the shared one learns); `shared`, with throttle_store =
    "redis", counts in Redis for every worker and proxy."""

    def __init__(self, settings: AuthSettings) -> None:
        self.throttle = LoginThrottle(settings.failed_login_limit, settings.failed_login_window,
                                      settings.failed_login_lockout)
        self.audit = AuditLog(settings.audit_file)
        self.per_user = settings.failed_login_scope == "user"  # counted per user and address (else per address)
        self.store = _store_settings(settings)
        self.shared: SharedThrottle | None = None
        if settings.throttle_store == "redis":
            from proxy.auth.shared_throttle import SharedThrottle  # (redis loads only then)
            self.shared = SharedThrottle(settings, self.throttle)

    def configure(self, settings: AuthSettings) -> None:
        """New [auth] settings (a reload): the throttle's limits, and the audit file reopened (after logrotate).
        Its store (and Redis) change only with a restart."""
        self.audit.reopen(settings.audit_file)
        self.throttle.configure(settings.failed_login_limit, settings.failed_login_window,
                                settings.failed_login_lockout)
        self.per_user = settings.failed_login_scope == "user"
        if _store_settings(settings) != self.store:
            log.warning("reload: [auth] throttle_store and redis_* change only with a restart; keeping the running "
                        "ones")

    def probe(self, key: str) -> asyncio.Task[None] | None:
        """Start the shared lockout check of a login (None: there is none to wait for)."""
        return self.shared.probe(key) if self.shared is not None else None

    async def failed(self, key: str) -> Failure:
        """A failed login (`key`: see `throttle_key`): counted (in Redis with the shared store)."""
        if self.shared is not None:
            return await self.shared.failed(key)
        return Failure.LOCKED_NOW if self.throttle.failed(key) else Failure.COUNTED

    def close(self) -> None:
        self.audit.close()

    async def aclose(self) -> None:
        """The Redis connections closed (the shared store)."""
        if self.shared is not None:
            await self.shared.close()


def _store_settings(settings: AuthSettings) -> tuple[object, ...]:
    return (settings.throttle_store, settings.redis_url, settings.redis_username, settings.redis_password,
            settings.redis_ca_file, settings.redis_key_prefix, settings.redis_timeout)


def failure_reason(error: ProxyError, known_user: bool) -> str:
    """The audit's reason for a refused login: token_<what> or policy_denied for tokens, the authorization's own
    reason, else unknown_user or wrong_password."""
    if isinstance(error, TokenRejected):
        if error.reason.startswith("policy refuses"):
            return "policy_denied"
        words = "".join(c if c.isalnum() else " " for c in error.reason.lower()).split()
        return "token_" + "_".join(words)
    if isinstance(error, AuthorizationFailed):
        return error.reason
    if isinstance(error, ConsoleDenied):
        return "console_denied"
    return "wrong_password" if known_user else "unknown_user"
