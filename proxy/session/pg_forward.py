"""The hot path of a PostgreSQL client: its messages to the linked backend, only headers read, a few inspected."""

from __future__ import annotations

import logging
import re

from proxy.errors import ProtocolViolation
from proxy.pool.pg_backend import PostgresBackend
from proxy.protocol.pg import extended as ext
from proxy.protocol.pg import messages as pg
from proxy.protocol.pg.extended import (
    EXPECT_BIND,
    EXPECT_CLOSE,
    EXPECT_DESCRIBE_PORTAL,
    EXPECT_EXECUTE,
    EXPECT_FUNCTION_CALL,
    EXPECT_QUERY,
    EXPECT_SYNC,
)
from proxy.protocol.sql_words import WORD_BYTES
from proxy.query_clock import UNKNOWN
from proxy.session.client import State
from proxy.session.pg_replay import PgReplay
from proxy.session.pg_settings import FOLDED_SESSION_WORDS, has_session_words
from proxy.session.pg_statements import HOLD

log = logging.getLogger(__name__)

# What each client message type means to the forwarder (indexed by the type byte).
INVALID, INSPECTED, SYNC, EXTENDED, COPY, TERMINATE = range(6)
ACTION = bytearray(256)
for _kind, _action in (("Q", INSPECTED), ("F", INSPECTED), ("P", INSPECTED), ("B", INSPECTED), ("D", INSPECTED),
                       ("C", INSPECTED), ("S", SYNC), ("E", EXTENDED), ("H", EXTENDED), ("d", COPY),
                       ("c", COPY), ("f", COPY), ("X", TERMINATE)):
    ACTION[ord(_kind)] = _action
QUERY_BYTE, FUNCTION_CALL_BYTE, PARSE_BYTE, BIND_BYTE, DESCRIBE_BYTE, EXECUTE_BYTE = b"QFPBDE"
STATEMENT = ord("S")
EXECUTE_WORD = re.compile(rb"(?i)\s*execute\s")
HELD_LIMIT = 256 * 1024
LONG_QUERY = "(a query streamed through: too long to normalize)"

# A Query at least this long that arrives in parts streams through (scanned for SESSION_WORDS as it passes)
# instead of being held whole; other inspected messages are gathered in a growing buffer.
STREAM_QUERY_MIN = 256 * 1024
# Session words found in a streamed Query: the same pattern as for any Query, over the folded text of each part.
STREAMED_WORDS = FOLDED_SESSION_WORDS
SCAN_OVERLAP = 32  # bytes of one part kept to find a word cut by the next part
# After a read this large, the client's next read waits for the event loop's next turn, so that a client
# streaming a huge message takes one read per turn and every other connection gets its turn in between.
TURN_BYTES = 128 * 1024


class PgForward(PgReplay):
    """Passes the client's bytes to its backend as they come, noting what each request expects in reply."""

    def data_received(self, data: bytes) -> None:
        if self.state is not State.READY:
            if self.state is State.LOGIN:
                super().data_received(data)
            return
        self.active = True
        replay_log = self.replay_log
        if replay_log is not None and (self.backend is not None or self._replaying):
            replay_log.record(data)  # (with no backend, what is held is recorded when it is sent)
        if self._replaying:  # replies of a replay are compared: the client's next messages wait for the result
            self._replay_extra += data
            return
        self._received(data)

    def _received(self, data: bytes) -> None:
        backend = self.backend
        if backend is None or self._acquiring is not None or self._queued or self._checking:
            self._held += data
            if self._checking:
                if self.statements.discarding and backend is not None:
                    self.resume_held(backend)
                    return
            elif self._acquiring is None and not self._queued:
                self._dispatch_unlinked()
                return
            if len(self._held) > HELD_LIMIT and not self.peer_paused_us:
                self.peer_paused_us = True
                self.transport.pause_reading()
            return
        self._forward(data, backend)
        if len(data) >= TURN_BYTES and not self._yielding and not self.peer_paused_us and not self.closed:
            self._yielding = True
            self.transport.pause_reading()
            self.loop.call_soon(self._next_turn)

    def _next_turn(self) -> None:
        self._yielding = False
        if not self.peer_paused_us and not self.closed:
            self.transport.resume_reading()

    def _dispatch_unlinked(self) -> None:
        """With no backend: answer what needs none (Sync, Flush, Terminate, stray COPY data), else borrow one."""
        if (self._aborted or self._to_sync) and not self._answer_locally():
            return  # (a transaction block that failed with its lost backend: see pg_replay)
        held = self._held
        if self._dropping:
            dropped = min(self._dropping, len(held))
            del held[:dropped]
            self._dropping -= dropped
        while len(held) >= 5:
            kind = held[0]
            action = ACTION[kind]
            length = int.from_bytes(held[1:5], "big")
            if action == INVALID:
                self.fail(ProtocolViolation(f"invalid frontend message type {kind}"))
                return
            if length < 4 or length > self.max_message:
                self.fail(ProtocolViolation(f"invalid message length {length} for message type {chr(kind)!r}"))
                return
            if action == TERMINATE:
                self._terminate()
                return
            if action == COPY or kind == ord("H") or (action == SYNC and not self.in_extended):
                if len(held) < length + 1:
                    if action == COPY:  # dropped as it arrives, never gathered
                        self._dropping = length + 1 - len(held)
                        held.clear()
                    return
                del held[: length + 1]
                if action == SYNC:
                    self.write(pg.READY_FOR_QUERY_IDLE)
                continue
            if self.clock is not None:
                self.clock.waiting()
            self._start_work()
            return

    def _forward(self, data: bytes, backend: PostgresBackend) -> None:
        if self._message is not None:  # an inspected message arriving in parts: it grows in place, never re-copied
            self._gather(data, backend)
            return
        scan = self._partial + data if self._partial else data
        self._partial = b""
        end = len(scan)
        pos = self._skip
        self._skip = 0
        if pos and self._scanning:
            self._scan_streamed_query(scan if pos >= end else scan[:pos], first=False)
            self._scanning = pos > end
        limit = self.max_message
        action_of = ACTION
        expect_reply = backend.expect_reply
        clock = self.clock
        pieces: list[bytes] | None = None  # set once a message is rewritten or dropped
        run_start = 0
        hold = end
        gather = 0  # size of an inspected message that starts at `hold` and is not complete yet
        while pos < end:
            if end - pos < 5:
                hold = pos
                break
            kind = scan[pos]
            action = action_of[kind]
            length = int.from_bytes(scan[pos + 1 : pos + 5], "big")
            if length < 4 or length > limit:
                self._write_pieces(backend, pieces, scan, run_start, pos)
                self.fail(ProtocolViolation(f"invalid message length {length} for message type {chr(kind)!r}"))
                return
            if action == INSPECTED:
                if end - pos >= 1 + length:
                    try:
                        replacement = self._inspect(kind, scan[pos + 5 : pos + 1 + length], backend)
                    except ProtocolViolation as exc:  # as PostgreSQL does: ERROR 08P01, skip to Sync, carry on
                        replacement = self._rejected(exc, backend)
                    if replacement is HOLD:
                        self._write_pieces(backend, pieces, scan, run_start, pos)
                        self._start_check(scan, pos, backend)
                        return
                    if replacement is not None:
                        if pieces is None:
                            pieces = []
                        pieces.append(scan[run_start:pos])
                        pieces.append(replacement)
                        run_start = pos + 1 + length
                elif kind == QUERY_BYTE and length >= STREAM_QUERY_MIN:
                    self._stream_query(scan[pos + 5 : end], backend)  # passes through like COPY data
                else:
                    hold = pos  # whole message needed: names may be rewritten
                    gather = 1 + length
                    break
            elif action == SYNC:
                self.pending += 1
                self.in_extended = False
                expect_reply(EXPECT_SYNC)
                if clock is not None:
                    clock.synced()
            elif action == EXTENDED:
                self.in_extended = True
                if kind == EXECUTE_BYTE:
                    expect_reply(EXPECT_EXECUTE)
                    if clock is not None:
                        clock.executing = True
            elif action != COPY:
                self._write_pieces(backend, pieces, scan, run_start, pos)
                if action == TERMINATE:
                    self._terminate()
                else:
                    self.fail(ProtocolViolation(f"invalid frontend message type {kind}"))
                return
            pos += 1 + length
        if pos > end:
            self._skip = pos - end
        if hold < end:
            self._keep_rest(scan, hold, gather)
        if pieces is None:
            backend.send(scan if hold == end else scan[:hold])
        else:
            self._write_pieces(backend, pieces, scan, run_start, hold)
        if self.pending == 0:
            self._release_if_done(backend)

    def _gather(self, data: bytes, backend: PostgresBackend) -> None:
        """More of an inspected message arriving in parts; forwarded once whole."""
        message = self._message
        assert message is not None
        missing = self._message_size - len(message)
        if len(data) < missing:
            message += data
            return
        message += memoryview(data)[:missing]
        self._message = None
        self._forward(bytes(message), backend)
        if len(data) > missing and not self.closed:
            self._received(data[missing:])  # the backend may have gone back to the pool meanwhile

    def _keep_rest(self, scan: bytes, hold: int, gather: int) -> None:
        """The end of `scan` from `hold` waits for more: a message to gather whole, or an incomplete header."""
        if gather:
            self._message = bytearray(memoryview(scan)[hold:])
            self._message_size = gather
        else:
            self._partial = scan[hold:]

    def _start_check(self, scan: bytes, pos: int, backend: PostgresBackend) -> None:
        """A statement check goes out; the client's bytes from `pos` on wait for its reply."""
        backend.send(self.statements.take_check())
        self._checking = True
        self._held += scan[pos:]

    def _rejected(self, exc: ProtocolViolation, backend: PostgresBackend) -> bytes:
        """A malformed extended-query message: logged, and answered where the server would have failed."""
        log.warning("client %s (user %r): %s [%s]", self.peer, self.session.user, exc.message, exc.sqlstate)
        self.stats.protocol_errors += 1
        return self.statements.reject(backend, exc)

    def _stream_query(self, head: bytes, backend: PostgresBackend) -> None:
        """A large Query passes through as it arrives; only its text is scanned for session words on the way."""
        self.pending += 1
        self.in_extended = False  # (as for any Query: see _inspect)
        backend.expect_reply(EXPECT_QUERY)
        if self.clock is not None:
            self.clock.request(LONG_QUERY)
        self._scanning = True
        self._scan_streamed_query(head, first=True)

    def _scan_streamed_query(self, part: bytes, first: bool) -> None:
        """Note session words in one part of a streamed Query's text (with the end of the previous part)."""
        window = b";" + part if first else self._scan_tail + part
        self._scan_tail = window[-SCAN_OVERLAP:]
        if STREAMED_WORDS.search(window.translate(WORD_BYTES)) is None:
            return
        # The first part starts the text (LOAD is only recognised there); later ones are joined after a `;`.
        self._note_session_words(window[1:] if first else b";" + window)

    def resume_held(self, backend: PostgresBackend) -> None:
        """A statement check ended (the backend's call): forward what the client sent meanwhile."""
        data = bytes(self._held)
        self._held.clear()
        statements = self.statements
        if statements.discarding:
            data, reached = statements.discard_until_sync(data, self.max_message)
            if not reached:
                self._held += data
                return
        self._checking = False
        if self.peer_paused_us:
            self.peer_paused_us = False
            self.transport.resume_reading()
        if data:
            self._forward(data, backend)
        if not self._checking:
            statements.check = None  # consumed by the held message; never applies to another
            if not data and self.pending == 0:
                self._release_if_done(backend)

    @staticmethod
    def _write_pieces(backend: PostgresBackend, pieces: list[bytes] | None, scan: bytes, start: int,
                      stop: int) -> None:
        if pieces is None:
            backend.send(scan[:stop])
            return
        if start < stop:
            pieces.append(scan[start:stop])
        backend.send(b"".join(pieces))

    # --- messages that are read whole: queries and named statements ---

    def _inspect(self, kind: int, body: bytes, backend: PostgresBackend) -> bytes | None:
        """Note what a Query/Parse/Bind/Describe/Close asks; return its replacement bytes, or None to pass it.

        HOLD means a statement check went out first: the client's bytes from this message on wait for its reply."""
        expect_reply = backend.expect_reply
        statements = self.statements
        clock = self.clock
        if kind == QUERY_BYTE:
            if statements.named and EXECUTE_WORD.match(body):
                replacement = statements.execute_sql(body[:-1], backend)
                if replacement is not None:
                    if replacement is not HOLD:
                        self.pending += 1
                        self.in_extended = False
                        statements.forget_unnamed(backend)
                        if clock is not None:
                            clock.query(body[:-1])
                    return replacement
            if clock is not None:
                clock.query(body[:-1])
            self.pending += 1
            statements.forget_unnamed(backend)
            replacement = None
            if has_session_words(body):  # DEALLOCATE is mapped; the rest noted for the read-back
                sql = body[:-1]
                self._note_session_words(sql)
                replacement = statements.deallocate_sql(sql, backend)
            expect_reply(EXPECT_QUERY)
            # A Query ends an extended-query batch the client left without Sync (the server commits its implicit
            # transaction and answers ReadyForQuery): the backend is free again at that ReadyForQuery.
            self.in_extended = False
            return replacement
        if kind == FUNCTION_CALL_BYTE:
            if clock is not None:
                clock.request(UNKNOWN)
            self.pending += 1
            expect_reply(EXPECT_FUNCTION_CALL)
            return None
        self.in_extended = True
        if kind == PARSE_BYTE:
            name, rest = ext.split_parse(body)
            session_words = has_session_words(rest)
            if session_words:
                self._note_session_words(ext.parse_query_text(rest))
            if clock is not None and clock.digest is not None:  # (statistics off: no statement to name)
                clock.parsed(name, ext.parse_query_text(rest))
            if not name:
                statements.parse_unnamed(rest, backend, session_words)
                return None
            return statements.parse_named(name, rest, backend, session_words)
        if kind == BIND_BYTE:
            portal, name, rest = ext.split_bind(body)
            if clock is not None and name:
                clock.current = clock.named.get(name, UNKNOWN)
            if (not name and backend.holds_unnamed(statements, statements.unnamed_serial)
                    and statements.check is None and not statements.unnamed_words):
                expect_reply(EXPECT_BIND)  # the client's own unnamed statement, parsed on this backend
                return None
            return statements.bind(portal, name, rest, backend)
        target, name = ext.split_target(body, "Describe" if kind == DESCRIBE_BYTE else "Close")
        if kind == DESCRIBE_BYTE:
            if target == STATEMENT:
                return statements.describe(name, backend)
            expect_reply(EXPECT_DESCRIBE_PORTAL)
            return None
        if target == STATEMENT:
            if name:  # Close of a named statement: the client's name goes, the backend's stays
                statements.close_named(name)
                self._inject(backend, ext.CLOSE_COMPLETE)
                return b""
            statements.forget_unnamed(backend)
        expect_reply(EXPECT_CLOSE)
        return None

    def _inject(self, backend: PostgresBackend, reply: bytes) -> None:
        """A reply the proxy gives itself, in its place among the backend's replies."""
        if not backend.inject(reply):
            self.deliver(reply)
