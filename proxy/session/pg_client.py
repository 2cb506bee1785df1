"""A PostgreSQL client session: its layers (login, forwarding, borrowing, settings) and the lifecycle it shares."""

from __future__ import annotations

import logging

from proxy.auth.failures import FailedLogins
from proxy.errors import AuthenticationFailed, ProxyError
from proxy.protocol.pg import messages as pg
from proxy.session.pg_login import PgLogin

log = logging.getLogger(__name__)
failed_logins = FailedLogins(log)
FAIL_LINE = "client %s (user %r): %s [%s]"  # the warning line of a client's failed login or refused session


class PostgresClient(PgLogin):
    """One client connection; owns at most one backend at a time (between transactions in transaction mode).

    Its parts, each a layer of its own module: PgSession (fields), PgSettings (settings and pins), PgBorrow
    (backends between transactions), PgForward (the hot path), PgLogin (startup and authentication); the lifecycle
    is ClientConnection's, given PostgreSQL's error form here."""

    def __repr__(self) -> str:
        return f"PostgresClient({self.peer}, user={self.session.user!r}, db={self.session.database!r})"

    # --- the lifecycle's PostgreSQL parts ---

    @property
    def at_rest(self) -> bool:
        backend = self.backend
        return (self.pending == 0 and not self.in_extended and not self._held and not self._partial
                and self._message is None and self._acquiring is None and not self._queued
                and (backend is None or backend.tx_status == pg.IDLE))

    def send_error(self, error: ProxyError) -> None:
        self.write(pg.error_response(error.sqlstate, error.message, "FATAL"))

    def log_failure(self, error: ProxyError) -> None:
        log.warning(FAIL_LINE, self.peer, self.session.user, error.message, error.sqlstate)

    def refuse_login(self, error: AuthenticationFailed) -> None:
        user = self.session.user
        self.log_failed_login(failed_logins, user, FAIL_LINE, self.peer, user, error.message, error.sqlstate)
        self.fail(error, logged=True)

    def known_user(self) -> bool:
        return (self.login_method in ("passthrough", "token")
                or self.service.secrets.get(self.session.user) is not None)

    def _login_may_be_cancelled(self) -> bool:
        return not self._buffer  # (with bytes still buffered, e.g. a CancelRequest and a close, let it finish)

    def _session_closed(self) -> None:
        self.service.clients.pop(self.process_id, None)
        if self._acquiring is not None and self._borrowing:
            # let go of it: cancelled, it keeps its CancelledError, whose traceback holds the task's frame and so
            # this client in a cycle that only a full garbage collection frees
            acquiring, self._acquiring = self._acquiring, None
            acquiring.cancel()
        self.seq_backend = None  # (a dropped backend may still name this client: no cycle)

    def mid_message(self) -> bool:
        if self._mid_message_on_backend() or self._dropping:
            return True
        return self.backend is None and bool(self._held) and self._acquiring is None and not self._queued

    def idle_exempt(self, now: float, timeout: float) -> bool:
        backend = self.backend
        return backend is not None and (self.pending > 0 or backend.tx_status != pg.IDLE)
