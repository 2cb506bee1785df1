"""What every client session shares, whatever its engine: its peer's name, the counters, the client limit, the
bounds before authentication, and the lifecycle (login timeout, idle check, backend lost, failure, close)."""

from __future__ import annotations

import asyncio
import logging
import math
import ssl
import time
from enum import IntEnum
from typing import Any

from proxy.auth import audit
from proxy.auth.failures import FailedLogins
from proxy.auth.guard import LoginGuard, failure_reason
from proxy.auth.networks import AllowList
from proxy.auth.throttle import Failure, throttle_key
from proxy.config import ServerSettings
from proxy.errors import (
    AuthenticationFailed,
    AuthorizationFailed,
    BackendUnavailable,
    ClientMessageTimeout,
    IdleClientTimeout,
    LoginsThrottled,
    LoginTimeout,
    ProtocolViolation,
    ProxyError,
    TooManyClients,
)
from proxy.netio import Connection, ConnectionClosed
from proxy.query_clock import QueryClock
from proxy.rundir import worker_count
from proxy.stats import EndpointStats

log = logging.getLogger(__name__)
# Connections from addresses outside an endpoint's allowed_cidrs: the first per address in each interval in full,
# the rest as one summary line per address.
refused_connections = FailedLogins(
    log, full_lines=1, summary="client %s: %d more connection(s) refused within %g s (address not in "
    "allowed_cidrs), not logged one by one: %s")
REFUSED_LINE = "client %s: connection to endpoint %s refused: the address is not in its allowed_cidrs (%s)"
# Logins refused while their address is locked out: the first per address in each interval, then a summary.
throttled_logins = FailedLogins(
    log, full_lines=1, summary="client %s: %d more login(s) refused within %g s (too many failed logins from the "
    "address), not logged one by one: %s")
THROTTLED_LINE = "client %s (user %r): login refused: too many failed logins from this address (%.0f s left)"
LOCKOUT_LINE = "client address %s: %d failed logins within %g s: its logins are refused for the next %g s"
USER_LOCKOUT_LINE = ("client address %s, user %r: %d failed logins within %g s: that user's logins from the "
                     "address are refused for the next %g s")

# Before authentication no message may be larger than this (PostgreSQL allows 10 000 bytes for a startup packet
# and 64 kB for an authentication token; MySQL login packets are capped at 64 kB separately).
LOGIN_MESSAGE_LIMIT = 16 * 1024
# Bytes a client may send ahead of the login exchange before the proxy stops reading from its socket.
LOGIN_BUFFER_LIMIT = 64 * 1024


class TLSHandshakeFailed(ConnectionClosed):
    """The client's TLS handshake failed (already logged as one warning line)."""


class State(IntEnum):
    """Where a client session is in its life (both engines)."""

    LOGIN = 0
    READY = 1  # logged in; forwarding
    CLOSED = 2


class ClientConnection(Connection):
    """A client socket: its login runs in `_login_with_timeout` (bounded by the login timeout), then it forwards.

    The lifecycle is here; an engine gives its parts: `_login` (and `_after_login`), `send_error` and `log_failure`
    (its error form and log line), `refuse_login` (a wrong password), `mid_message` and `idle_exempt` (for the idle
    check), `_session_closed` and `_return_after_client` (what a closed session lets go of)."""

    peer = "?"
    connected_at = 0.0  # loop time the connection was accepted (0: refused at connect)
    _task: asyncio.Task[None] | None = None
    state: IntEnum = State.LOGIN
    server: ServerSettings  # the process's server settings (set by the subclass)
    pool: Any = None  # the pool this client's backends come from, once logged in
    login_method = ""  # how the client authenticates ("scram-sha-256", "token", ...): set before it does
    backend: Any = None  # the backend linked to this client now, if any
    active = True  # data seen since the janitor last looked
    idle_since = 0.0
    # Texts of the errors the lifecycle sends, in each engine's wording (overridden where it differs).
    LOGIN_TIMEOUT_TEXT = "the client did not complete its login in time"
    THROTTLED_TEXT = "too many failed logins from this address; try again in {} s"  # .format(seconds, host)
    MESSAGE_TIMEOUT_TEXT = "closing the connection: the client stopped in the middle of a message for more than {:g} s"
    BACKEND_LOST_TEXT = "the database connection was lost"
    clock: QueryClock | None = None  # times its statements for the statement statistics (when they are on)
    stats: EndpointStats  # the counters of the endpoint this client came in on (set by the subclass)
    over_limit: TooManyClients | None = None  # set when this client came beyond max_clients: it is refused
    # The server's set of its clients, which this one leaves as soon as its socket is gone: a client kept there
    # until the janitor's next pass outlives the young generations of the garbage collector, and the closed clients
    # of a burst of connections (each a reference cycle with its transport) pile up for a full collection.
    registry: set[Any] | None = None
    allowed: AllowList | None = None  # the endpoint's allowed_cidrs (None: every address; set by the subclass)
    guard: LoginGuard | None = None  # the process's failed-login throttle and audit log (set by the subclass)
    _lockout_probe: asyncio.Task[None] | None = None  # the login's lockout look-up in Redis (shared throttle)
    refused = False  # closed at connect: its address is not allowed (never counted as a current client)
    host = "?"  # the peer's address without its port
    session: Any  # the engine's session state: its `user` and `database` are the login's
    connected_at = 0.0  # wall-clock time of the connect
    console = False  # an admin console session (it never reaches a backend)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        self.host = peer[0] if isinstance(peer, tuple) else self.peer
        self.connected_at = time.time()
        stats = self.stats
        allowed = self.allowed
        if allowed is not None and isinstance(peer, tuple) and not allowed.admits(peer[0]):
            self._refuse_network(peer[0], allowed)
            return
        stats.clients_accepted += 1
        stats.clients_current += 1
        self.connected_at = self.loop.time()
        if log.isEnabledFor(logging.DEBUG):
            log.debug("client %s connected to endpoint %s", self.peer, stats.labels.get("endpoint", ""))
        self.buffer_limit = LOGIN_BUFFER_LIMIT
        if stats.registry.over_limit():
            stats.clients_refused += 1  # the login says so where the protocol lets the client read it
            self.over_limit = TooManyClients(f"sorry, too many clients already (max_client_connections "
                                             f"{stats.registry.max_clients * worker_count()})")
        guard = self.guard
        if guard is not None and guard.shared is not None and not guard.per_user:  # (answered during the login)
            self._lockout_probe = guard.probe(self.host)
        self._task = self.loop.create_task(self._login_with_timeout())

    def _refuse_network(self, host: str, allowed: AllowList) -> None:
        """A peer outside the allow-list: closed before a byte is read or written, counted, logged (summarised)."""
        self.refused = True
        self.state = State.CLOSED
        self.stats.clients_refused_network += 1
        endpoint = self.stats.labels.get("endpoint", "")
        refused_connections.record(host, endpoint, REFUSED_LINE, self.peer, endpoint, allowed.text)
        self.audit_event(audit.CONNECTION_REFUSED_NETWORK)
        self.transport.abort()

    # --- login ---

    async def _login_with_timeout(self) -> None:
        """Run the login within the login timeout; any failure becomes this client's error and closes it only."""
        try:
            # (not wait_for: its inner task would keep a failed login's exception, whose traceback holds wait_for's
            # frame, which holds that task: a cycle keeping this client until a full garbage collection)
            async with asyncio.timeout(self.server.client_login_timeout):
                await self._login()
            if self.state is State.LOGIN and not self.closed:
                await self._after_login()  # may wait for a backend: the borrow timeout applies, not this one
        except TimeoutError:
            self.stats.login_timeouts += 1
            self.fail(LoginTimeout(self.LOGIN_TIMEOUT_TEXT))
        except TLSHandshakeFailed:
            pass  # logged and closed where it failed
        except ConnectionClosed:
            log.info("client %s closed the connection during login", self.peer)
            self.close()
        except (AuthenticationFailed, AuthorizationFailed, LoginsThrottled) as exc:
            await self.login_refused(exc)
        except ProxyError as exc:
            self.fail(exc)
        except Exception as exc:  # the edge: anything unexpected becomes an error for this client only
            log.exception("client %s: login failed unexpectedly", self.peer)
            self.fail(ProxyError(f"internal error: {type(exc).__name__}"))

    async def _login(self) -> None:
        raise NotImplementedError

    def logged_in(self, engine: str, user: str, database: str) -> None:
        """The login succeeded: counted, and the client's requests timed from now on."""
        stats = self.stats
        stats.logins_ok += 1
        if self.is_tls:
            stats.logins_tls += 1
        if log.isEnabledFor(logging.DEBUG):
            log.debug("client %s logged in as %r to database %r (%s, tls %s)", self.peer, user, database,
                      self.login_method or "password", self.is_tls)
        registry = stats.registry
        self.clock = QueryClock(stats, registry.insights, registry.digester(engine), user, database, self.peer)

    async def _after_login(self) -> None:
        """What the login does after its timeout no longer applies (nothing unless the engine says)."""

    def refuse_login(self, error: AuthenticationFailed) -> None:
        """A failed authentication: log it (see `log_failed_login`) and fail the client."""
        self.fail(error)

    # --- the login guard: throttle and audit (one hook for both engines, at connect and at a change of user) ---

    def check_throttle(self) -> None:
        """Before any password check: LoginsThrottled if the client's address is locked out as far as this process
        knows (a dict look-up); with the shared throttle, the look-up in Redis started at connect (or here, at a
        change of user) is read in `authenticated`."""
        error = self._throttled()
        if error is not None:
            raise error
        guard = self.guard
        if guard is not None and guard.shared is not None and self._lockout_probe is None:
            self._lockout_probe = guard.probe(self._throttle_key(guard))

    def _throttle_key(self, guard: LoginGuard) -> str:
        return throttle_key(self.host, self.session.user, True) if guard.per_user else self.host

    def _throttled(self) -> LoginsThrottled | None:
        guard = self.guard
        if guard is None:
            return None
        left = guard.throttle.locked_for(self._throttle_key(guard))
        return LoginsThrottled(self.THROTTLED_TEXT.format(math.ceil(left), self.host)) if left else None

    async def authenticated(self) -> None:
        """The client proved who it is (its session may still fail to start: a backend, a setting). A login that
        was already past `check_throttle` when its address got locked out (here, or in Redis: the look-up started
        there ran during the password exchange) is refused all the same, whatever its answer: a burst of logins
        opened at once gets no more answers than the limit."""
        probe = self._lockout_probe
        if probe is not None:
            self._lockout_probe = None
            await probe
        error = self._throttled()
        if error is not None:
            raise error
        self.audit_event(audit.AUTH_SUCCESS)

    async def login_refused(self, error: ProxyError) -> None:
        """A login that did not pass: a failed authentication counts toward the throttle (one from an address
        locked out meanwhile is refused as throttled: its answer is not told); each is audited and sent to the
        client; the throttle's refusals are logged in summary."""
        self._lockout_probe = None
        if isinstance(error, AuthenticationFailed):
            throttled = self._throttled()
            if throttled is None:
                throttled = await self._authentication_failed(error)
                if throttled is None:
                    return
            error = throttled
        if isinstance(error, LoginsThrottled):
            self.stats.logins_throttled += 1
            self.audit_event(audit.AUTH_THROTTLED)
            user = self.session.user
            guard = self.guard
            left = guard.throttle.locked_for(self._throttle_key(guard)) if guard is not None else 0.0
            throttled_logins.record(self.host, user, THROTTLED_LINE, self.peer, user, left)
            self.fail(error, logged=True)
            return
        if isinstance(error, AuthorizationFailed):
            self.audit_event(audit.AUTH_FAILURE, error.reason)
        self.fail(error)

    async def _authentication_failed(self, error: AuthenticationFailed) -> LoginsThrottled | None:
        """Counted; refused and audited (None), or, if its address was locked out elsewhere meanwhile, the
        throttle's refusal to send instead."""
        guard = self.guard
        if guard is not None:
            failure = await guard.failed(self._throttle_key(guard))
            throttled = self._throttled() if failure is Failure.LOCKED_BEFORE else None
            if throttled is not None:  # (None: the lockout has just ended)
                return throttled
            if failure is Failure.LOCKED_NOW:
                self._log_lockout(guard)
        self.stats.logins_failed += 1
        self.audit_event(audit.AUTH_FAILURE, failure_reason(error, self.known_user()))
        self.refuse_login(error)
        return None

    def _log_lockout(self, guard: LoginGuard) -> None:
        throttle = guard.throttle
        limits = (throttle.limit, throttle.window, throttle.lockout)
        if guard.per_user:
            log.warning(USER_LOCKOUT_LINE, self.host, self.session.user, *limits)
        else:
            log.warning(LOCKOUT_LINE, self.host, *limits)

    def known_user(self) -> bool:
        """Whether the login's user has a stored secret (or is checked elsewhere): wrong_password, not
        unknown_user, in the audit."""
        return True

    def audit_event(self, event: str, reason: str = "") -> None:
        """One line in the audit file (if there is one): never a password or a token."""
        guard = self.guard
        if guard is None or not guard.audit.enabled:
            return
        session = getattr(self, "session", None)
        labels = self.stats.labels
        guard.audit.write(event, engine=labels.get("engine", ""), endpoint=labels.get("endpoint", ""),
                          user=session.user if session is not None else "",
                          database=session.database if session is not None else "", source=self.peer,
                          method=self.login_method, tls=self.is_tls, reason=reason)

    def log_failed_login(self, failed: FailedLogins, user: str, message: str, *args: object) -> None:
        """A password that did not match: its warning line goes through `failed` (one each while they are few, a
        summary per client address when they come in a burst)."""
        if not self.closed:
            failed.record(self.peer.rpartition(":")[0] or self.peer, user, message, *args)

    # --- failure and close ---

    def fail(self, error: ProxyError, logged: bool = False) -> None:
        """Send the client `error` in its protocol's form, log the reason (unless `logged`) and close."""
        if self.closed or self.state is State.CLOSED:
            return
        if not logged:
            self.log_failure(error)
        if isinstance(error, ProtocolViolation):
            self.stats.protocol_errors += 1
        self.send_error(error)
        self.state = State.CLOSED
        self.close()

    @property
    def at_rest(self) -> bool:
        """Nothing of the client's runs, waits, is half-sent or is in an open transaction: it may be let go."""
        raise NotImplementedError

    def send_error(self, error: ProxyError) -> None:
        raise NotImplementedError

    def log_failure(self, error: ProxyError) -> None:
        log.warning("client %s: %s", self.peer, error.message)

    def on_closed(self, exc: Exception | None) -> None:
        self.state = State.CLOSED
        if log.isEnabledFor(logging.DEBUG) and self.connected_at:
            log.debug("client %s closed after %.1f s", self.peer, self.loop.time() - self.connected_at)
        if self.refused:
            return
        self.stats.clients_current -= 1
        self.stats.clients_closed += 1
        if self.pool is not None:
            self.pool.clients.discard(self)
        if self._task is not None and not self._task.done() and self._login_may_be_cancelled():
            # Let go of a cancelled login: it keeps its CancelledError, whose traceback holds its frame and so this
            # client in a cycle that only a full garbage collection frees.
            task, self._task = self._task, None
            task.cancel()
        self._session_closed()
        backend = self.backend
        if backend is not None:
            self.backend = None
            backend.unlink()
            self._return_after_client(backend)

    def _login_may_be_cancelled(self) -> bool:
        """Whether a login still running when the socket closes is cancelled (else it ends by itself)."""
        return True

    def _session_closed(self) -> None:
        """The engine's part of closing: its registries, a borrow in flight."""

    def _return_after_client(self, backend: Any) -> None:
        """Give the backend back after its client left: reused when clean, cleaned first, or dropped."""
        backend.pool.discard(backend)

    def backend_lost(self, backend: Any, exc: Exception | None) -> None:
        """The backend's connection closed: it leaves its pool; if it served this client now, the client goes too."""
        backend.pool.discard(backend)
        if self.backend is backend:
            self.backend = None
            target = backend.pool.target
            if target.on_trouble and self.state is not State.CLOSED:  # the server may be gone: have it looked at
                target.report_trouble(f"a backend connection to {backend.host}:{backend.port} was lost")
            if backend.ended_by_server:  # the client has the server's own error: a second one would confuse it
                log.warning("client %s: the database ended backend %s with an error passed to the client",
                            self.peer, backend)
                self.state = State.CLOSED
                self.close()
                return
            log.warning("client %s: backend %s was lost: %s", self.peer, backend, exc or "closed")
            self.fail(BackendUnavailable(self.BACKEND_LOST_TEXT))

    def linked_peer(self) -> Connection | None:
        backend = self.backend
        return backend if isinstance(backend, Connection) else None

    # --- the janitor's look ---

    def check_idle(self, now: float, timeout: float) -> None:
        """Close a client stopped mid-message past client_message_timeout, or idle past `timeout` (outside a
        transaction: see `idle_exempt`)."""
        if self.active or self.state is not State.READY:
            self.active = False
            self.idle_since = now
            return
        message_timeout = self.server.client_message_timeout
        if now - self.idle_since > message_timeout and self.mid_message():
            self.fail(ClientMessageTimeout(self.MESSAGE_TIMEOUT_TEXT.format(message_timeout)))
            return
        if self.idle_exempt(now, timeout):
            return
        if now - self.idle_since > timeout:
            self.stats.idle_client_timeouts += 1
            self.fail(IdleClientTimeout(f"closing the connection after {timeout:g} s of inactivity"))

    def mid_message(self) -> bool:
        """The client has sent part of a message and not the rest."""
        return False

    def idle_exempt(self, now: float, timeout: float) -> bool:
        """Whether the idle timeout does not apply now (inside a transaction or a query)."""
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        if self.registry is not None:
            self.registry.discard(self)

    async def start_tls(
        self, context: ssl.SSLContext, *, server_side: bool, server_hostname: str | None = None
    ) -> None:
        try:
            await super().start_tls(context, server_side=server_side, server_hostname=server_hostname)
        except (ssl.SSLError, OSError, ConnectionClosed, BackendUnavailable) as exc:
            raise self.tls_failed(exc) from None

    def tls_failed(self, exc: BaseException) -> TLSHandshakeFailed:
        """Log a failed TLS handshake as one warning line, drop the connection, and say so to the login task."""
        reason = str(exc) or type(exc).__name__
        log.warning("client %s: TLS handshake failed: %s", self.peer, reason)
        self.abort()
        return TLSHandshakeFailed(reason)
