"""A MySQL client session's fields and lifecycle: login timeout, errors, idle check, backend lost, close."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from proxy.auth.failures import FailedLogins
from proxy.errors import (
    AuthenticationFailed,
    ProtocolViolation,
    ProxyError,
)
from proxy.netio import ConnectionClosed
from proxy.pool.mysql_backend import MySQLBackend, Profile
from proxy.pool.pool import Pool
from proxy.protocol.mysql import constants as my
from proxy.protocol.mysql.packets import ErrPacket, OkPacket, frame
from proxy.protocol.mysql.packets import ProtocolViolation as MySQLProtocolViolation
from proxy.session import mysql_ids as ids
from proxy.session.client import ClientConnection, State
from proxy.session.mysql_service import MySQLService
from proxy.session.mysql_statements import ClientStatement
from proxy.session.state import SessionState

# Every part of a MySQL client session logs under one name (the module of MySQLClient, which puts them together).
log = logging.getLogger("proxy.session.mysql_client")

failed_logins = FailedLogins(log)

FAIL_LINE = "client %s (user %r): %s [%d %s]"  # the warning line of a client's failed login or refused session

BUSY_FLAGS = my.SERVER_STATUS_IN_TRANS  # (open cursors are followed per statement)


# The C client libraries take an ERR from the server with an errno of their own range (CR_*, 2000-2999, e.g. 2003
# can't connect, 2013 lost connection) for a malformed packet ("ERROR 2027"): they get the nearest server errno.
C_LIBRARIES = frozenset({"libmariadb", "libmysql"})

CLIENT_ERRNO_FIRST, CLIENT_ERRNO_LAST = 2000, 2999

ER_NET_READ_ERROR = 1158  # "Got an error reading communication packets"

ER_CONNECT_TO_FOREIGN_DATA_SOURCE = 1429  # "Unable to connect to foreign data source"

C_LIBRARY_ERRNOS = {2002: (ER_CONNECT_TO_FOREIGN_DATA_SOURCE, "08S01"),
                    2003: (ER_CONNECT_TO_FOREIGN_DATA_SOURCE, "08S01")}

def refuse_login(client: MySQLClientBase, error: AuthenticationFailed) -> None:
    """A failed login: its log line (through the burst-aware failed-login log) and the client's ERR."""
    client.log_failed_login(failed_logins, client.user, FAIL_LINE, client.peer, client.user, error.message,
                            error.mysql_errno, error.mysql_sqlstate)
    client.fail(error, logged=True)

def release_backend(backend: MySQLBackend) -> None:
    """Back to its pool, after closing the statements it should close (no response: safe while idle)."""
    if backend.ended_by_server:  # it is closing
        backend.pool.discard(backend)
        return
    closes = backend.statement_closes()
    if closes:
        backend.write(closes)
    backend.pool.release(backend)

def violation(message: str, errno: int) -> ProtocolViolation:
    """A client's protocol violation, with the MySQL errno it gets."""
    return MySQLProtocolViolation(message, errno)


class MySQLClientBase(ClientConnection):
    """One client connection; owns at most one backend at a time (between transactions in transaction mode)."""

    def __init__(self, service: MySQLService) -> None:
        super().__init__(service.server.max_message_size)
        self.service = service
        self.server = service.server
        self.stats = service.stats
        self.allowed = service.allowed
        self.guard = service.guard
        self.state = State.LOGIN
        self._handshaking = False  # in the TLS handshake after an SSLRequest
        self.connection_id = 0
        # user, default database (schema), autocommit, settings, user variables, statements, pin reasons
        self.session: SessionState[bytes, ClientStatement] = SessionState()
        self.multi_statements = False
        self.capabilities = 0  # negotiated with this client
        self.c_library = False  # libmariadb / libmysqlclient: no client-range errno in an ERR (see _send_error)
        self.profile = Profile(0, my.UTF8MB4_GENERAL_CI)
        self.pool: Pool | None = None
        self.backend: MySQLBackend | None = None
        self._next_statement_id = 1
        self._last_prepared = 0  # the id of the client's last COM_STMT_PREPARE (MariaDB's statement id -1)
        self._pins_logged: set[str] = set()
        self._settings_key: bytes | None = b""  # the settings as bytes (part of prepared statement keys)
        self.last_insert_id = 0  # what LAST_INSERT_ID() says in this session, as far as OK packets told
        self.row_count = 0  # what ROW_COUNT() says after the client's last statement (set by the backend)
        self.found_rows = 0  # what FOUND_ROWS() says: rows of the client's last result set (set by the backend)
        self._wait_timeout: tuple[bytes | None, float | None] = (None, None)  # (setting body, its seconds)
        self.cursors = 0  # statements with a cursor open on the backend (it stays until they are closed)
        self.long_data = 0  # statements with parameter data sent ahead to the backend (it stays until executed)
        self._hold_next = 0  # 1: the backend stays for the next statement; 2: that statement was sent
        self._stalled = False  # client bytes wait in _held until the backend has answered what it was sent
        self._drop = 0  # bytes of the current client frame to drop (a command answered here)
        self.kills_in_flight = 0
        self.active = True
        self.idle_since = 0.0
        self.scramble = b""
        self._default_autocommit = True
        self._seq = 0  # the sequence id the client's next frame must carry
        self._reply_seq = 0
        self._skip = 0  # bytes of the current client frame still to pass through
        self._cont = False  # the next frame continues the current packet (or the LOCAL INFILE upload)
        self._infile = False  # the client is uploading a LOCAL INFILE file
        self._partial = bytearray()  # an incomplete frame head (or inspected command) growing until it is whole
        self._partial_need = 0  # the length _partial must reach before it is walked
        self._size = 0  # bytes of the current logical packet so far (its frames of 16 MB - 1 add up)
        self._yielding = False  # reading waits for the event loop's next turn (see mysql_client.TURN_BYTES)
        self._held = bytearray()  # client bytes arriving while a backend is borrowed or a command handled here
        self._busy: asyncio.Task[None] | None = None
        self._borrowing = False

    @property
    def user(self) -> str:
        return self.session.user

    def __repr__(self) -> str:
        return f"MySQLClient({self.peer}, id={self.connection_id}, user={self.user!r})"

    LOGIN_TIMEOUT_TEXT = "Got timeout reading communication packets: the client did not complete its login in time"
    MESSAGE_TIMEOUT_TEXT = ("Got timeout reading communication packets: the client stopped in the middle of a "
                            "packet for more than {:g} s")
    BACKEND_LOST_TEXT = "Lost connection to the database server"
    THROTTLED_TEXT = "Host '{1}' is blocked because of too many failed logins; try again in {0} s"

    async def _after_login(self) -> None:
        if self.console:
            await self._console_ready()
            return
        await self._login_ready()  # may wait for a backend: the borrow timeout applies, not the login timeout

    def refuse_login(self, error: AuthenticationFailed) -> None:
        refuse_login(self, error)

    def known_user(self) -> bool:
        return self.login_method in ("passthrough", "token") or self.service.secrets.get(self.user) is not None

    def log_failure(self, error: ProxyError) -> None:
        log.warning(FAIL_LINE, self.peer, self.user, error.message, error.mysql_errno, error.mysql_sqlstate)

    def send_error(self, error: ProxyError) -> None:
        self._send_error(error, self._reply_seq if self.state is State.LOGIN else 1)

    def _send_error(self, error: ProxyError, seq: int) -> None:
        errno, sqlstate = error.mysql_errno, error.mysql_sqlstate
        if self.c_library and CLIENT_ERRNO_FIRST <= errno <= CLIENT_ERRNO_LAST:
            errno, sqlstate = C_LIBRARY_ERRNOS.get(errno, (ER_NET_READ_ERROR, "08S01"))
        packet = ErrPacket(errno, error.message, sqlstate)
        self.write(frame(packet.build(self.capabilities or my.CLIENT_PROTOCOL_41), seq))

    def _send_ok(self, seq: int = 1) -> None:
        status = my.SERVER_STATUS_AUTOCOMMIT if self.session.autocommit else 0
        self.write(frame(OkPacket(status_flags=status).build(self.capabilities), seq))

    def _login_may_be_cancelled(self) -> bool:
        # A login waiting for the client's bytes was just woken and ends with ConnectionClosed (logged) instead,
        # and one in the TLS handshake ends with the handshake's failure (one warning line).
        return self._waiter is None and not self._handshaking

    # Where a linked backend hands its reply bytes (None: straight to the socket; see mysql_failover).
    replies: Callable[[bytes], None] | None = None

    def server_ended(self, backend: MySQLBackend, packet: bytes) -> bool:
        """The server ended its session while nothing was outstanding: the client hears its ERR (see
        mysql_failover for when it does not)."""
        return False

    def _session_closed(self) -> None:
        if self.session.pins:
            self.stats.unpinned()
        if self.service.clients.get(self.connection_id) is self:
            del self.service.clients[self.connection_id]
        busy = self._busy
        if busy is not None and self._borrowing:
            self._busy = None  # (as the login task: a cancelled task would hold this client in a cycle)
            busy.cancel()

    def _return_after_client(self, backend: MySQLBackend) -> None:
        """Give a backend back after its client left (or changed user): at once, cleaned first, or dropped."""
        pool = backend.pool
        if backend.closed:
            pool.discard(backend)
            return
        if not backend.idle or self._skip or self._cont or self._infile or self._partial:
            log.warning("client %s left while a query was running; cancelling it and dropping %s", self.peer,
                        backend)
            if not backend.tracker.done:
                self.loop.create_task(self.service.kill_query(backend))
            pool.discard(backend)
            return
        if (backend.tracker.status_flags & BUSY_FLAGS or self.session.pins or self.cursors or self.long_data
                or self._hold_next or pool.session_mode or backend.schema != pool.database):
            log.info("client %s left inside a transaction or session; cleaning %s before reuse", self.peer, backend)
            self.loop.create_task(self._clean_up(backend))
            return
        pool.stats.transactions += 1
        release_backend(backend)

    @staticmethod
    async def _clean_up(backend: MySQLBackend) -> None:
        try:
            await backend.reset()
        except (ProxyError, ConnectionClosed, OSError) as exc:
            log.info("backend %s could not be reset (%s); dropping it", backend, exc)
            backend.pool.discard(backend)
            return
        backend.pool.release(backend)

    # --- the janitor's look (see ClientConnection.check_idle) ---

    def mid_message(self) -> bool:
        return bool(self._skip or self._cont or self._partial or self._drop)

    def idle_exempt(self, now: float, timeout: float) -> bool:
        """A command that waits or runs, or an open transaction, is not idleness; the wait_timeout the client set
        in its session closes it as the server would: silently, in a transaction too."""
        backend = self.backend
        if (self._busy is not None or self._stalled or self._held
                or (backend is not None and (not backend.idle or self._skip or self._cont or self._infile
                                            or self._partial))):
            self.idle_since = now  # a command waits or runs: the proxy or the server works, not the client
            return True
        wait_timeout = self._session_wait_timeout()
        if wait_timeout is not None and now - self.idle_since > wait_timeout and wait_timeout < timeout:
            self.stats.idle_client_timeouts += 1
            log.info("client %s (user %r): closed after %g s of inactivity (its wait_timeout)", self.peer, self.user,
                     wait_timeout)
            self.state = State.CLOSED
            self.close()
            return True
        return backend is not None and bool(backend.tracker.status_flags & my.SERVER_STATUS_IN_TRANS)

    def _session_wait_timeout(self) -> float | None:
        """The wait_timeout the client set in its session, in seconds (None: not set, or not a number)."""
        body = self.session.settings.get("wait_timeout")
        known, seconds = self._wait_timeout
        if body is not known:
            seconds = ids.session_timeout(body)
            self._wait_timeout = (body, seconds)
        return seconds

    def _use_pool(self, schema: str) -> Pool:
        """The pool for `schema` (and the user and profile) from now on; the pool knows who uses it."""
        if self.pool is not None:
            self.pool.clients.discard(self)
        linked = self.backend
        pool = self.pool = self.service.pool_for(schema, self.user, self.profile,
                                                 linked.pool.target if linked is not None else None)
        pool.clients.add(self)
        return pool

    def _protocol_error(self, scan: bytes, start: int, pos: int, message: str, errno: int) -> None:
        backend = self.backend
        if backend is not None and start < pos:
            backend.transport.write(scan[start:pos])
        self.fail(violation(message, errno))

    # --- what the later parts of the session define ---

    async def _login(self) -> None:
        raise NotImplementedError

    async def _console_ready(self) -> None:
        raise NotImplementedError

    async def _login_ready(self) -> None:
        raise NotImplementedError

    def _walk(self, scan: bytes) -> None:
        raise NotImplementedError

    def command_done(self, backend: MySQLBackend, effect: tuple[int, Any] | None) -> None:
        raise NotImplementedError
