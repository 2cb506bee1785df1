"""A PostgreSQL client whose server is lost mid-transaction keeps its connection: the transaction is replayed on the
server the endpoint follows next, or ended with an error in the protocol's own form.

While a transaction is open or a request is in flight, the client's messages are recorded and the replies it is
given are hashed (`ReplayLog`, up to the pool's `replay_max_size`); both start afresh at the transaction's end. When
the backend is lost (the connection closed or reset, or the server's FATAL 57P01/57P02, which the client does not
see), the target is told (`report_trouble`, for the topology monitor) and `judge` (pg_replay_rules) decides:
  - nothing was open: nothing to do, the next request borrows another backend;
  - replay: the recorded messages go to a newly borrowed backend (given the client's session as for any borrow);
    the replies are hashed up to the number of bytes the client already has, and while that runs the client's
    further messages wait. Same digest: the rest of the replies pass and the client never knows. Another digest,
    or fewer replies: that backend is closed (the server rolls its transaction back) and the client gets 40001;
  - 40001 (serialization_failure, "rolled back by a failover, retry it") when the transaction cannot be replayed;
  - 08007 (transaction_resolution_unknown) when the server may have committed: a COMMIT or an autocommit statement
    that may write was in flight.
A pinned session (temporary tables, LISTEN, session locks: state no other server has) and a session-mode pool
keep the former behaviour: the client gets an error and its connection closes. An error takes the place of the
reply the client waits for, followed by ReadyForQuery, as the server would answer;
an extended-query batch without its Sync yet is skipped up to its Sync. Inside a transaction block the status is
then 'E' (failed transaction) and the proxy answers the client itself, without a backend, until the block ends:
ROLLBACK (or COMMIT, as the server does in a failed transaction) gets "ROLLBACK" and status 'I', any other
request 25P02. A client idle inside a transaction whose replay differs is told at its next request (40001 in
place of its answer; a COMMIT then gets 40001 and status 'I', never a silent rollback).
"""

from __future__ import annotations

import logging
from typing import Any

from proxy.errors import BackendUnavailable, ProtocolViolation
from proxy.pool.pg_backend import PostgresBackend
from proxy.pool.pool import Pool
from proxy.protocol.pg import extended as ext
from proxy.protocol.pg import messages as pg
from proxy.session.client import State
from proxy.session.pg_borrow import PgBorrow
from proxy.session.pg_replay_rules import (
    COMMIT,
    NOTHING,
    REPLAY,
    ROLLBACK,
    ROLLED_BACK,
    UNKNOWN,
    Loss,
    judge,
    split_messages,
    statement_kinds,
)
from proxy.session.replay_log import ReplayLog

log = logging.getLogger(__name__)

ROLLED_BACK_TEXT = "the transaction was rolled back by a failover of the database; it can be retried"
UNKNOWN_TEXT = ("transaction resolution unknown: the connection to the writer was lost during COMMIT or an "
                "autocommit statement; check whether it committed")
IN_FAILED_TRANSACTION = pg.error_response(
    "25P02", "current transaction is aborted, commands ignored until end of transaction block")
ROLLBACK_COMPLETE = pg.message(b"C", b"ROLLBACK\x00")
READY_FAILED = pg.ready_for_query(pg.FAILED_TRANSACTION)
REPLAY_ATTEMPTS = 3  # backends lost one after the other during the replays of one transaction before it is given up
BIND_COMPLETE = pg.message(b"2")
NO_DATA = pg.message(b"n")
NO_PARAMETERS = pg.message(b"t", b"\x00\x00")  # ParameterDescription of a statement without parameters


class PgReplay(PgBorrow):
    """Records the current transaction and, when its backend is lost, replays it or ends it with an error."""

    def _init_replay(self, pool: Pool) -> None:
        """At login: record only when the pool allows it (replay_max_size > 0) and pools transactions (a session-mode
        client may hold server state the proxy does not follow)."""
        limit = pool.settings.replay_max_size
        if limit > 0 and not pool.session_mode:
            self.replay_log = ReplayLog(limit)

    # --- the hot path's part: replies given to the client ---

    def deliver(self, out: bytes) -> None:
        """Replies of the linked backend for the client (hashed for a replay; compared while one runs)."""
        if self._replaying:
            self._deliver_replayed(out)
            return
        self.transport.write(out)
        replay_log = self.replay_log
        if replay_log is not None:
            replay_log.sent(out)

    def _deliver_replayed(self, out: bytes) -> None:
        """Replies to a replay: compared with what the client has; what comes after passes once they match."""
        replay_log = self.replay_log
        check = self._replay_check
        assert replay_log is not None and check is not None
        replay_log.sent(out)
        rest = check.feed(out)
        if not check.done:
            return
        if not check.matches:
            self._replay_differs("its replies differ")
            return
        self._replay_check = None
        self._replaying = False
        backend = self.backend
        log.info("client %s: transaction replayed on %s after its backend was lost; the replies matched",
                 self.peer, backend)
        self.stats.replayed("succeeded")
        if rest:
            self.transport.write(rest)
        extra = self._replay_extra
        if extra and backend is not None:
            data = bytes(extra)
            extra.clear()
            if self._checking:
                self._held += data
            else:
                self._forward(data, backend)

    def backend_ready(self, backend: PostgresBackend, count: int) -> None:
        clock = self.clock
        if clock is not None:
            replies = backend.replies
            clock.done(count, replies.errors, replies.rows, backend)
            replies.errors = replies.rows = 0
        replay_log = self.replay_log
        if replay_log is None:
            super().backend_ready(backend, count)
            return
        self._answered += count
        if self._replaying and self.pending - count <= 0 and not self._checking and not self.in_extended:
            self._replay_differs("it gave fewer replies")  # (the check ends within the replies otherwise)
            return
        idle = backend.tx_status == pg.IDLE
        super().backend_ready(backend, count)
        if idle and self._answered:  # a transaction ended but more work was sent: that one is not replayable
            replay_log.spoil()

    def _transaction_done(self) -> None:
        """Nothing runs or is open on the backend: the next transaction is recorded from its start."""
        replay_log = self.replay_log
        if replay_log is not None:
            replay_log.reset()
            self._answered = 0
            self._replays = 0

    # --- the backend is lost ---

    def backend_lost(self, lost: Any, exc: Exception | None) -> None:
        replay_log = self.replay_log
        backend = self.backend
        if (replay_log is None or backend is not lost or backend is None or self.state is not State.READY
                or self.closed or backend.ended_by_server):
            super().backend_lost(lost, exc)
            return
        backend.pool.discard(backend)
        self.backend = None
        backend.unlink()
        why = "the server shut it down" if backend.replies.shut_down else str(exc or "closed")
        backend.pool.target.report_trouble(f"backend {backend} lost: {why}")
        pins = self.session.pins
        if pins:  # what pinned it (temporary tables, LISTEN, locks, ...) is gone with the server
            log.warning("client %s: backend %s of its pinned session (%s) was lost: %s", self.peer, backend,
                        ", ".join(sorted(pins)), why)
            self.fail(self._lost_error())
            return
        loss = self._replay_loss if self._replaying else None
        if loss is None:
            if replay_log.replayable:
                loss = judge(replay_log.messages, self._answered, backend.tx_status == pg.IDLE,
                             self._statement_text)
                loss.cut_reply = not backend.client_at_boundary
            else:
                loss = self._judge_unrecorded(backend)
                if loss is None:
                    log.warning("client %s: backend %s was lost (%s) in the middle of a message that was not "
                                "recorded", self.peer, backend, why)
                    self.fail(self._lost_error())
                    return
        if loss.plan == NOTHING:
            log.info("client %s: its idle backend %s was lost (%s); the next request borrows another",
                     self.peer, backend, why)
            self._reset_forwarding()
            self._transaction_done()
            return
        if loss.plan == REPLAY and self._replays >= REPLAY_ATTEMPTS:
            log.warning("client %s: backend %s was lost (%s) during replay %d of its transaction; giving up (40001)",
                        self.peer, backend, why, self._replays)
            self.stats.replayed("aborted_lost_again")
            self._end_locally(loss, "40001", ROLLED_BACK_TEXT)
        elif loss.plan == REPLAY:
            self._replays += 1
            log.info("client %s: backend %s was lost (%s); replaying the transaction", self.peer, backend, why)
            self._replay(loss)
        elif loss.plan == ROLLED_BACK:
            log.warning("client %s: backend %s was lost (%s); the transaction cannot be replayed (40001)",
                        self.peer, backend, why)
            self.stats.replayed("aborted_not_replayable")
            self._end_locally(loss, "40001", ROLLED_BACK_TEXT)
        else:
            log.warning("client %s: backend %s was lost (%s) during a COMMIT or an autocommit write; its outcome "
                        "is unknown (08007)", self.peer, backend, why)
            self.stats.replayed("aborted_commit_in_flight")
            self._end_locally(loss, "08007", UNKNOWN_TEXT)

    def _lost_error(self) -> BackendUnavailable:
        return BackendUnavailable(self.BACKEND_LOST_TEXT)

    def _statement_text(self, name: bytes) -> bytes | None:
        statements = self.statements
        if name:
            statement = statements.named.get(name)
            return ext.parse_query_text(statement.rest) if statement is not None else None
        rest = statements.unnamed_rest
        return ext.parse_query_text(rest) if rest is not None else None

    def _judge_unrecorded(self, backend: PostgresBackend) -> Loss | None:
        """A transaction too large to record: only what is in flight is known (None: the client is mid-message)."""
        if self._checking or self._mid_message_on_backend():
            return None
        busy = self.pending > 0 or self.in_extended
        idle = backend.tx_status == pg.IDLE
        if not busy:
            return Loss(NOTHING if idle else ROLLED_BACK, in_transaction=not idle)
        loss = Loss(UNKNOWN, owed=self.pending, open_batch=self.in_extended)  # it may hold a COMMIT
        loss.cut_reply = not backend.client_at_boundary
        return loss

    def _reset_forwarding(self) -> None:
        """No backend, nothing half-sent: what the forwarder knew of the lost backend's stream is forgotten."""
        self.pending = 0
        self.in_extended = False
        self._skip = 0
        self._partial = b""
        self._message = None
        self._scanning = False
        self._checking = False
        statements = self.statements
        statements.check = None
        statements.discarding = False
        self._held.clear()

    # --- replaying ---

    def _replay(self, loss: Loss) -> None:
        replay_log = self.replay_log
        assert replay_log is not None
        data = replay_log.messages
        messages, _ = split_messages(data)
        named = self.statements.named
        for kind, body in messages:  # the transaction's own named statements: parsed again as the first time
            if kind == ord("P"):
                name = body[: body.find(b"\x00")]
                if name:
                    named.pop(name, None)
        self._reset_forwarding()
        check = self._replay_check
        if check is None:
            check = replay_log.replay_check()
            self._replay_loss = loss
        else:  # lost again during the replay: the client still has what it had; the next replay is counted anew
            replay_log.restart_sent()
        extra = bytes(self._replay_extra)  # what the client sent during a replay that was lost too: recorded
        self._replay_extra.clear()
        self._answered = 0
        if check.done:  # the client was given nothing yet: this is just a borrow for the same messages
            log.info("client %s: nothing of the transaction was answered yet; it is sent again as it is",
                     self.peer)
            replay_log.reset()
            self._replay_check = None
            self._replaying = False
            self._replay_loss = None
            self._held += data
            self._held += extra
        else:
            self._replay_check = check
            self._replaying = True
            self._replay_size = len(data) - len(extra)  # (extra is recorded already, after the replayed bytes)
            self._held += data
        self._start_work()

    def _take_held(self) -> bytes:
        """What a newly attached backend gets: while replaying, the replayed messages only (the client's next
        ones wait until the replies match)."""
        held = self._held
        if self._replaying:
            size = self._replay_size
            data = bytes(held[:size])
            self._replay_extra += held[size:]
            held.clear()
            return data
        data = bytes(held)
        held.clear()
        replay_log = self.replay_log
        if replay_log is not None:
            replay_log.record(data)
        return data

    def _replay_differs(self, why: str) -> None:
        backend = self.backend
        loss = self._replay_loss
        assert loss is not None
        log.warning("client %s: the replayed transaction was rolled back: %s (40001)", self.peer, why)
        self.stats.replayed("aborted_replies_differ")
        if backend is not None:
            self.backend = None
            backend.unlink()
            backend.pool.discard(backend)  # its server rolls the replayed transaction back
        self._reset_forwarding()
        self._end_locally(loss, "40001", ROLLED_BACK_TEXT)

    # --- ending the transaction without a backend ---

    def _end_locally(self, loss: Loss, sqlstate: str, text: str) -> None:
        """The client's transaction is over: tell it where it waits for an answer, as the server would."""
        if loss.cut_reply:  # part of a reply reached the client: nothing can follow it in the protocol
            log.warning("client %s: the backend was lost in the middle of a reply; closing", self.peer)
            self.fail(self._lost_error())
            return
        extra = bytes(self._replay_extra)
        self._replay_extra.clear()
        self._replay_check = None
        self._replaying = False
        self._replay_loss = None
        self._reset_forwarding()
        self._transaction_done()
        named = self.statements.named
        for name in loss.parsed:  # the client never heard of them: a Parse of the same name must not fail
            named.pop(name, None)
        failed = sqlstate == "40001" and loss.in_transaction
        status = pg.FAILED_TRANSACTION if failed else pg.IDLE
        error = pg.error_response(sqlstate, text)
        out: list[bytes] = []
        if loss.owed:
            out += [error, pg.ready_for_query(status)]
            later = IN_FAILED_TRANSACTION if failed else error
            out += [later, pg.ready_for_query(status)] * (loss.owed - 1)
            if loss.open_batch:
                out.append(later)
                self._to_sync = status
        elif loss.open_batch:
            out.append(error)
            self._to_sync = status
        else:  # the client waits for nothing: it learns at its next request
            self._owed_error = error
            failed = True
        self._aborted = failed
        if out:
            self.write(b"".join(out))
        self._held += loss.tail + extra
        if self._held:
            self._dispatch_unlinked()

    def _answer_locally(self) -> bool:
        """Answer the client's requests while its transaction is failed (or up to the Sync of a failed batch);
        True once that is over (what is held then goes on as usual)."""
        held = self._held
        out: list[bytes] = []
        while self._aborted or self._to_sync:
            if len(held) < 5:
                break
            kind = held[0]
            length = int.from_bytes(held[1:5], "big")
            if length < 4 or length > self.max_message:
                self.fail(ProtocolViolation(f"invalid message length {length} for message type {chr(kind)!r}"))
                return False
            if len(held) < 1 + length:
                break
            body = bytes(held[5 : 1 + length])
            del held[: 1 + length]
            if kind == ord("X"):
                if out:
                    self.write(b"".join(out))
                self._terminate()
                return False
            if self._to_sync:
                if kind == ord("S"):
                    out.append(pg.ready_for_query(self._to_sync))
                    self._to_sync = 0
                continue
            out += self._answer_aborted(kind, body)
        if out:
            self.write(b"".join(out))
        return not (self._aborted or self._to_sync)

    def _answer_aborted(self, kind: int, body: bytes) -> list[bytes]:
        """One message of a client inside a failed transaction block."""
        owed, self._owed_error = self._owed_error, b""
        if kind == ord("Q"):
            kinds = statement_kinds(body[:-1])
            first = kinds[0] if kinds else None
            if first == COMMIT and owed:
                self._aborted = False
                return [owed, pg.READY_FOR_QUERY_IDLE]
            if first in (COMMIT, ROLLBACK):
                self._aborted = False
                return [ROLLBACK_COMPLETE, pg.READY_FOR_QUERY_IDLE]
            return [owed or IN_FAILED_TRANSACTION, READY_FAILED]
        if kind == ord("P"):
            try:
                _, rest = ext.split_parse(body)
            except ProtocolViolation:
                rest = b""
            kinds = statement_kinds(ext.parse_query_text(rest))
            first = kinds[0] if kinds else None
            if first in (COMMIT, ROLLBACK) and not (first == COMMIT and owed):
                self._ending = True
                return [ext.PARSE_COMPLETE]
            if first == COMMIT:
                self._aborted = False
                self._to_sync = pg.IDLE
                return [owed]
        elif self._ending and kind != ord("F"):
            if kind == ord("B"):
                return [BIND_COMPLETE]
            if kind == ord("D"):
                return [NO_PARAMETERS + NO_DATA] if body[:1] == b"S" else [NO_DATA]
            if kind == ord("E"):
                return [ROLLBACK_COMPLETE]
            if kind == ord("C"):
                return [ext.CLOSE_COMPLETE]
            if kind == ord("S"):
                self._ending = False
                self._aborted = False
                return [pg.READY_FOR_QUERY_IDLE]
            return []
        if kind == ord("S"):
            self._owed_error = owed  # (a Sync alone asks for nothing: the error waits for a request)
            return [READY_FAILED]
        if kind == ord("H") or kind in b"dcf":
            if owed:
                self._owed_error = owed
            return []
        if kind == ord("C"):  # closing works in a failed transaction too
            if body[:1] == b"S" and len(body) > 2:
                self.statements.close_named(body[1:-1])
            if owed:
                self._owed_error = owed
            return [ext.CLOSE_COMPLETE]
        if kind == ord("F"):
            return [owed or IN_FAILED_TRANSACTION, READY_FAILED]
        self._to_sync = pg.FAILED_TRANSACTION
        return [owed or IN_FAILED_TRANSACTION]
