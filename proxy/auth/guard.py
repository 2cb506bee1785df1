"""The process's login guard: the failed-login throttle and the audit log, configured by [auth], and why a login
failed in the audit's words."""

from __future__ import annotations

from proxy.auth.audit import AuditLog
from proxy.auth.throttle import LoginThrottle
from proxy.auth.tokens import TokenRejected
from proxy.config import AuthSettings
from proxy.errors import AuthorizationFailed, ConsoleDenied, ProxyError


class LoginGuard:
    """One per process, handed to every service (as the token verifier is); a reload configures it again."""

    def __init__(self, settings: AuthSettings) -> None:
        self.throttle = LoginThrottle(settings.failed_login_limit, settings.failed_login_window,
                                      settings.failed_login_lockout)
        self.audit = AuditLog(settings.audit_file)

    def configure(self, settings: AuthSettings) -> None:
        """New [auth] settings (a reload): the throttle's limits, and the audit file reopened (after logrotate)."""
        self.audit.reopen(settings.audit_file)
        self.throttle.configure(settings.failed_login_limit, settings.failed_login_window,
                                settings.failed_login_lockout)

    def close(self) -> None:
        self.audit.close()


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
