"""A MySQL client's work kept across the loss of its server: its transaction (or its read) is replayed on the
server it borrows next when the replies match what the client already has, else it gets an error it can act on;
its connection stays either way."""

from __future__ import annotations

import asyncio
from typing import Any

from proxy.config import PoolMode
from proxy.errors import BackendUnavailable, ProxyError
from proxy.netio import ConnectionClosed
from proxy.pool.mysql_backend import TERMINATION_ERRORS, MySQLBackend
from proxy.protocol.mysql import constants as my
from proxy.protocol.mysql.outcome import (
    BEGIN,
    MAY_COMMIT,
    NOT_REPLAYED,
    READ,
    ROLLBACK,
    SESSION,
    SETTING,
    WRITE,
    command_kind,
)
from proxy.protocol.mysql.packets import ErrPacket
from proxy.protocol.mysql.statements import LAST_PREPARED
from proxy.session.client import State
from proxy.session.mysql_lifecycle import log
from proxy.session.mysql_login import MySQLLogin
from proxy.session.replay_log import ReplayCheck, ReplayLog

ER_ERROR_DURING_COMMIT = 1180


class RolledBackByFailover(ProxyError):
    """The transaction is gone with its server and could not be replayed: the client retries it."""

    mysql_errno = my.ER_LOCK_DEADLOCK  # what drivers and ORMs retry a transaction on
    mysql_sqlstate = "40001"
    fatal = False


class OutcomeUnknown(ProxyError):
    """The server was lost while a commit (or a write outside a transaction) ran: it may or may not have happened."""

    mysql_errno = ER_ERROR_DURING_COMMIT
    mysql_sqlstate = "08007"  # transaction resolution unknown
    fatal = False


ROLLED_BACK_TEXT = ("Deadlock found when trying to get lock; try restarting transaction (the transaction was rolled "
                    "back by a failover of the database server and can be retried)")
UNKNOWN_TEXT = ("Got error during COMMIT: the database server was lost by a failover while the statement ran; the "
                "outcome of the transaction is unknown")

# What a replay may contain: inside a transaction (or with autocommit off), anything that cannot commit; outside,
# only what cannot write. BEGIN only as the first command (later it would commit the transaction before it).
REPLAYABLE_IN_TRANSACTION = frozenset({READ, WRITE, SESSION})
REPLAYABLE_OUTSIDE = frozenset({READ, SESSION})
RETRY_PAUSE = 0.05  # seconds between attempts to borrow a backend for a replay
MAX_REPLAYS = 3  # replays of the same work in a row (each server lost in turn) before the client gets the error


class Failover:
    """One replay under way: what it must match, and what the client had in flight."""

    __slots__ = ("check", "commands", "error", "in_flight", "in_transaction", "partial", "started")

    def __init__(self, in_flight: bool, partial: bool, error: ProxyError, commands: int, started: float,
                 in_transaction: bool) -> None:
        self.in_flight = in_flight  # a command was waiting for its reply when the server was lost
        self.partial = partial  # ... and part of that reply had reached the client
        self.error = error  # what the client gets if the replay does not match
        self.commands = commands
        self.started = started
        self.in_transaction = in_transaction
        self.check: ReplayCheck | None = None


class MySQLFailover(MySQLLogin):
    """Keeps the client's transaction in a ReplayLog and, when its backend is lost, replays it or ends it with
    an error (ER_LOCK_DEADLOCK: rolled back, retry; ER_ERROR_DURING_COMMIT / 08007: outcome unknown)."""

    def __init__(self, service: Any) -> None:
        super().__init__(service)
        pool = service.settings.pool
        # (a session-mode client keeps its server session, which no replay could bring back)
        limit = pool.replay_max_size if pool.mode is PoolMode.TRANSACTION else 0
        self.replay_log: ReplayLog | None = ReplayLog(limit) if limit else None
        self.replies = self._reply if limit else None
        self._failover: Failover | None = None
        self._detour: bytearray | None = None  # client bytes held while the proxy recovers its transaction
        self._lost: ProxyError | None = None  # the answer to the client's next command (its transaction is gone)
        self._lost_head = b""  # the start of that command, until it is whole
        self._answered = 0  # reply bytes the client had when its backend last had nothing outstanding
        self._took_over_end = False  # the server's ERR ending the session was kept from the client
        self._ended_in_flight = False  # ... and it was the answer to the client's command
        self._ended_packet = b""  # that ERR frame: what the client gets if its command cannot be recovered
        self._replays = 0  # replays of the same work in a row
        self._replayed_bytes = 0  # the reply bytes the last replay had to match (work past them is new)

    # --- recording (the walk records the commands; the backend hands the replies to _reply) ---

    def _link(self, backend: MySQLBackend) -> None:
        replay = self.replay_log
        if replay is not None and self._failover is None:
            replay.reset()
            self._answered = 0
        super()._link(backend)

    def _reply(self, data: bytes) -> None:
        """Reply bytes for the client: counted and hashed; during a replay, checked before the client sees any."""
        replay = self.replay_log
        assert replay is not None
        backend = self.backend
        if backend is not None and backend.tracker.error is not None:
            data = self._without_termination(backend, data)
            if not data:
                return
        replay.sent(data)
        failover = self._failover
        check = failover.check if failover is not None else None
        if check is None:
            self.transport.write(data)
            return
        fresh = check.feed(data)
        if not check.done:
            return
        if not check.matches:
            self._replay_failed("its replies differ from those the client already has")
            return
        if fresh:
            self.transport.write(fresh)
        self._replayed()

    def _without_termination(self, backend: MySQLBackend, data: bytes) -> bytes:
        """A reply ending in the server's ERR that ends the session (shutdown, KILL): the ERR is kept from the
        client, whose command is then recovered as one lost in flight (see backend_lost)."""
        tracker = backend.tracker
        packet = tracker.error_packet
        if (not tracker.done or tracker.error not in TERMINATION_ERRORS or packet is None or self._took_over_end
                or not data.endswith(packet)):
            return data
        self._took_over_end = self._ended_in_flight = True
        self._ended_packet = data[len(data) - len(packet) - 4 :]
        log.info("client %s: the server ended backend %s while a command ran: %s", self.peer, backend,
                 ErrPacket.parse(packet).message)
        return data[: len(data) - len(packet) - 4]

    def write(self, data: bytes) -> None:
        """The proxy's own answers while a backend is linked are replies of the transaction too."""
        if self.backend is not None and self.replies is not None and self.state is State.READY:
            if not self.closed:
                self._reply(data)
            return
        super().write(data)

    def backend_progress(self, backend: MySQLBackend) -> None:
        if self._ended_in_flight:  # the server closes this connection now: its command is recovered then
            return
        failover = self._failover
        if (failover is not None and failover.check is not None and backend is self.backend and backend.idle
                and not self._stalled):
            self._replay_failed("it answered with fewer bytes than the client already has")
            return
        super().backend_progress(backend)
        replay = self.replay_log
        if replay is not None and backend.idle and self._failover is None:
            if replay.sent_bytes > self._replayed_bytes:  # the client's work went on past the last replay
                self._replays = 0
            if backend.tracker.status_flags & my.SERVER_STATUS_IN_TRANS or self._hold_next == 1:
                self._answered = replay.sent_bytes
            else:  # the transaction ended: nothing of it needs replaying
                replay.reset()
                self._answered = 0
                self._replays = self._replayed_bytes = 0

    def server_ended(self, backend: MySQLBackend, packet: bytes) -> bool:
        """The server ends the session (shutdown, KILL) while the client waits for nothing: kept from the client
        when its transaction can be recovered on the next server."""
        if self.replay_log is None or self.backend is not backend or self.state is not State.READY:
            return False
        self._took_over_end = True
        return True

    # --- the loss ---

    def backend_lost(self, lost: Any, exc: Exception | None) -> None:
        backend: MySQLBackend = lost
        replay = self.replay_log
        if (replay is None or self.backend is not backend or self.state is not State.READY or self.closed
                or (backend.ended_by_server and not self._took_over_end)):
            super().backend_lost(backend, exc)
            return
        took_over, self._took_over_end = self._took_over_end, False
        ended_in_flight, self._ended_in_flight = self._ended_in_flight, False
        ended_packet, self._ended_packet = self._ended_packet, b""
        reason = str(exc) if exc else ("the server ended the session" if took_over else "closed")
        backend.pool.target.report_trouble(f"backend {backend} was lost: {reason}")
        if self._failover is not None:  # lost again, in the middle of the replay
            self._replay_failed(f"the server of the replay was lost too: {reason}")
            return
        if self._recover(backend, replay, reason, ended_in_flight, ended_packet):
            return
        if took_over:  # the client never heard the server's ERR: it gets the proxy's
            self.backend = None
            backend.pool.discard(backend)
            log.warning("client %s: backend %s was lost: %s", self.peer, backend, reason)
            self.fail(BackendUnavailable(self.BACKEND_LOST_TEXT))
            return
        super().backend_lost(backend, exc)

    def _recover(self, backend: MySQLBackend, replay: ReplayLog, reason: str, ended_in_flight: bool,
                 ended_packet: bytes) -> bool:
        """Decide what becomes of the client's work on the lost `backend` and start it; False when nothing can be
        kept (the client is then failed as before: a pinned session, a cursor, a command half sent)."""
        if (backend.pool.session_mode or self.session.pins or self.cursors or self.long_data or self._skip
                or self._cont or self._infile or self._drop or self._busy is not None or self.kills_in_flight
                or backend.queue):
            return False
        tracker = backend.tracker
        in_flight = not backend.idle or ended_in_flight
        in_transaction = bool(tracker.status_flags & my.SERVER_STATUS_IN_TRANS) or not backend.autocommit
        partial = in_flight and replay.sent_bytes != self._answered
        kinds = self._kinds(replay)
        last = (self._kind(replay.last, not tracker.status_flags & my.SERVER_STATUS_IN_TRANS) if in_flight
                else READ)
        allowed = REPLAYABLE_IN_TRANSACTION if in_transaction else REPLAYABLE_OUTSIDE
        replayable = kinds is not None and all(kind in allowed for kind in kinds)
        answer_rollback = in_flight and last == ROLLBACK and not partial
        if partial and not replayable:
            return False  # part of the reply is out: no ERR can follow it
        self.backend = None
        backend.unlink()
        backend.pool.discard(backend)
        self.session.autocommit = backend.autocommit
        self._stalled = False
        if not in_flight and not in_transaction:
            log.info("client %s: backend %s was lost (%s) with nothing of the client's outstanding", self.peer,
                     backend, reason)
            replay.reset()
            self._resume()
            return True
        if answer_rollback:
            log.info("client %s: backend %s was lost (%s) during a ROLLBACK: answered", self.peer, backend, reason)
            replay.reset()
            self._send_ok(1)
            self._resume()
            return True
        if replayable and self._replays < MAX_REPLAYS:
            self._start_replay(backend, replay, in_flight, partial, in_transaction, reason)
            return True
        if replayable and ended_packet and in_flight:  # the server refuses it each time: its own words
            log.warning("client %s: backend %s ended its session %d times in a row; the client gets the "
                        "server's error", self.peer, backend, self._replays + 1)
            replay.reset()
            self._answered = self._replays = self._replayed_bytes = 0
            super().write(ended_packet)
            self._resume()
            return True
        may_have_committed = in_flight and (last == MAY_COMMIT or (last == WRITE and not in_transaction))
        error: ProxyError = (OutcomeUnknown(UNKNOWN_TEXT) if may_have_committed
                             else RolledBackByFailover(ROLLED_BACK_TEXT))
        self._give_up(error, in_flight, f"backend {backend} was lost ({reason}) and the "
                      f"{'statement' if may_have_committed else 'transaction'} cannot be replayed")
        self._resume()
        return True

    def _kinds(self, replay: ReplayLog) -> list[int] | None:
        """The kind of each recorded command (see protocol.mysql.outcome), None when they cannot be replayed."""
        if not replay.replayable:
            return None
        return [self._kind(message, index == 0) for index, message in enumerate(replay.chunks)]

    def _kind(self, message: bytes, first: bool) -> int:
        payload = message[4:]
        sql = None
        if payload[:1] in (bytes((my.COM_STMT_EXECUTE,)), bytes((my.COM_STMT_BULK_EXECUTE,))) and len(payload) >= 5:
            number = int.from_bytes(payload[1:5], "little")
            if number == LAST_PREPARED:
                number = self._last_prepared
            stmt = self.session.statements.get(number)
            sql = stmt.sql if stmt is not None else None
        kind = command_kind(payload, sql)
        if kind == BEGIN:
            return SESSION if first else MAY_COMMIT  # (a BEGIN inside a transaction commits it first)
        if kind == SETTING:  # the replay starts from the session as it is now, after the change
            return SESSION if first else NOT_REPLAYED
        return kind

    def _give_up(self, error: ProxyError, in_flight: bool, why: str) -> None:
        """The client's work is gone: its command in flight gets `error` now, else its next command does."""
        replay = self.replay_log
        assert replay is not None
        replay.reset()
        self._answered = 0
        log.warning("client %s: %s; %s [%d %s]", self.peer, why,
                    "its command gets the error" if in_flight else "its next command gets the error",
                    error.mysql_errno, error.mysql_sqlstate)
        self.stats.replayed(f"aborted_{error.mysql_errno}")
        if in_flight:
            self._send_error(error, 1)
        else:
            self._lost = error
            self._lost_head = bytes(self._partial)  # the start of the command that gets it
            self._partial = bytearray()

    # --- the replay ---

    def _start_replay(self, backend: MySQLBackend, replay: ReplayLog, in_flight: bool, partial: bool,
                      in_transaction: bool, reason: str) -> None:
        failover = Failover(in_flight, partial, RolledBackByFailover(ROLLED_BACK_TEXT), len(replay.chunks),
                            self.loop.time(), in_transaction)
        self._replays += 1
        self._replayed_bytes = replay.sent_bytes
        self._failover = failover
        detour = bytearray(self._held)  # the client's bytes after its transaction's: walked after the replay
        detour += self._partial
        self._held.clear()
        self._partial = bytearray()
        self._detour = detour
        log.info("client %s: backend %s was lost (%s); replaying its %s (%d command(s))", self.peer, backend, reason,
                 "transaction" if failover.commands > 1 or not in_flight else "command", failover.commands)
        self._busy = self.loop.create_task(self._replay(failover, list(replay.chunks), replay.sent_bytes,
                                                        replay.sent_digest()))

    async def _replay(self, failover: Failover, messages: list[bytes], sent_bytes: int, digest: bytes) -> None:
        pool = self.pool
        assert pool is not None
        deadline = self.loop.time() + pool.settings.connection_borrow_timeout
        backend: MySQLBackend | None = None
        while backend is None:
            try:
                backend = await self._borrow(pool)
                await self._sync(backend)
            except (ProxyError, ConnectionClosed, OSError) as exc:
                if backend is not None:
                    pool.discard(backend)
                    backend = None
                if self.loop.time() + RETRY_PAUSE >= deadline or self._failover is not failover:
                    self._busy = None
                    if self._failover is failover:
                        if not failover.in_transaction and isinstance(exc, ProxyError):
                            failover.error = exc  # a read with no server to run on: the borrow's error
                        self._replay_failed(f"no backend to replay it on: {getattr(exc, 'message', exc)}")
                    return
                await asyncio.sleep(RETRY_PAUSE)
        self._busy = None
        if self.closed or self._failover is not failover:
            pool.release(backend)
            return
        replay = self.replay_log
        assert replay is not None
        replay.reset()  # the replay records the transaction again
        self._link(backend)
        check = ReplayCheck(digest, sent_bytes)
        if not check.done:
            failover.check = check
        self._held[:0] = b"".join(messages)
        self._resume()
        if self._failover is failover and failover.check is None:
            self._replayed()

    def _replayed(self) -> None:
        """The replay's replies so far are those the client has: it goes on from here."""
        failover = self._failover
        assert failover is not None
        self._failover = None
        log.info("client %s: replayed %d command(s) on %s in %.0f ms; the client goes on", self.peer,
                 failover.commands, self.backend, (self.loop.time() - failover.started) * 1000)
        self.stats.replayed("succeeded")
        self.loop.call_soon(self._end_detour)

    def _replay_failed(self, why: str) -> None:
        """The replay cannot stand for the first run: drop its backend (its transaction rolls back) and give the
        client the error."""
        failover = self._failover
        assert failover is not None
        self._failover = None
        backend = self.backend
        if backend is not None:
            self.backend = None
            backend.unlink()
            backend.pool.discard(backend)
            backend.abort()
        self._held.clear()
        self._stalled = False
        if failover.in_flight and failover.partial:  # part of the reply is out: no ERR can follow it
            replay = self.replay_log
            assert replay is not None
            replay.reset()
            self.fail(failover.error)
            return
        self._give_up(failover.error, failover.in_flight, f"the replay of its transaction failed: {why}")
        self.loop.call_soon(self._end_detour)

    def _end_detour(self) -> None:
        """Walk what the client sent while its transaction was recovered."""
        detour, self._detour = self._detour, None
        if detour and not self.closed:
            self.data_received(bytes(detour))

    # --- the command after a transaction that is gone ---

    def _answer_lost(self, data: bytes) -> bytes:
        """The client's next command after its transaction was lost gets the error (a ROLLBACK gets OK: the
        transaction is rolled back); returns the bytes after it, to walk as usual."""
        buf = self._lost_head + data if self._lost_head else data
        while True:
            if len(buf) < 5:
                self._lost_head = buf
                return b""
            length = buf[0] | (buf[1] << 8) | (buf[2] << 16)
            command = buf[4]
            if command in (my.COM_STMT_CLOSE, my.COM_STMT_SEND_LONG_DATA, my.COM_QUIT) or buf[3]:
                self._lost_head = b""
                if command == my.COM_QUIT or buf[3] or len(buf) < 4 + length:
                    self._lost = None
                    return buf  # (the walk deals with it)
                self._walk(buf[: 4 + length])  # no reply: the error waits for the next command
                buf = buf[4 + length :]
                if not buf or self._lost is None:
                    return buf
                continue
            error = self._lost
            assert error is not None
            stop = 4 + length
            if len(buf) < stop and length < 4096:
                self._lost_head = buf
                return b""
            self._lost = None
            self._lost_head = b""
            if command_kind(buf[4:stop]) == ROLLBACK:
                self._send_ok(1)
            else:
                log.info("client %s: its command after the lost transaction gets the error [%d]", self.peer,
                         error.mysql_errno)
                self._send_error(error, 1)
            if len(buf) < stop:
                self._drop = stop - len(buf)
                return b""
            return buf[stop:]
