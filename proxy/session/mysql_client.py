"""A MySQL client session: transaction-level forwarding of its commands (login, statements, state: see its bases)."""

from __future__ import annotations

from typing import Any

from proxy.errors import ProxyError, UnknownCommand
from proxy.pool.mysql_backend import ENABLE_TRACKING, MySQLBackend
from proxy.pool.mysql_server_session import INTERNAL_PLAIN
from proxy.protocol.mysql import constants as my
from proxy.protocol.mysql.effects import EXECUTE, FETCH, INTERNAL, PREPARE, QUERY, RESET, SCHEMA, SET_OPTION, STMT_RESET
from proxy.protocol.mysql.packets import frame
from proxy.session import mysql_ids as ids
from proxy.session.mysql_failover import MySQLFailover
from proxy.session.mysql_inspect import (
    ANSWER_ERR,
    ANSWER_OK,
    CHANGE_USER,
    FORWARD,
    FORWARD_PLAIN,
    FOUND_ROWS,
    INSERT_ID_EXPRESSION,
    KILL,
    QUIT,
    Inspection,
    QueryEffect,
    inspect_query,
)
from proxy.session.mysql_lifecycle import State, log, violation

INSPECT_LIMIT = 64 * 1024  # bytes of a command looked at before forwarding (the whole command if shorter)

HELD_LIMIT = 256 * 1024

# After a read this large, the client's next read waits for the event loop's next turn, so that a client
# streaming a huge packet takes one read per turn and every other connection gets its turn in between.
TURN_BYTES = 128 * 1024

FORWARDED_COMMANDS = frozenset({
    my.COM_QUERY, my.COM_INIT_DB, my.COM_FIELD_LIST, my.COM_STATISTICS, my.COM_PROCESS_INFO, my.COM_DEBUG,
    my.COM_REFRESH, my.COM_PING, my.COM_SET_OPTION, my.COM_RESET_CONNECTION,
})

# Binary-protocol statement commands: the statement ids in them are the proxy's (see mysql_statements).
STATEMENT_COMMANDS = frozenset({
    my.COM_STMT_PREPARE, my.COM_STMT_EXECUTE, my.COM_STMT_SEND_LONG_DATA, my.COM_STMT_CLOSE, my.COM_STMT_RESET,
    my.COM_STMT_FETCH, my.COM_STMT_BULK_EXECUTE,
})


class MySQLClient(MySQLFailover):
    """One client connection: walks the client's bytes, forwards whole commands, answers some itself."""

    def data_received(self, data: bytes) -> None:
        if self.state is not State.READY:
            if self.state is State.LOGIN:
                super().data_received(data)
            return
        self.active = True
        if self._detour is not None:  # its transaction is being recovered after the loss of its server
            self._detour += data
            return
        if self._lost is not None:  # its transaction was lost: the next command gets the error
            data = self._answer_lost(data)
            if not data:
                return
        if self._busy is not None or self._stalled:
            self._held += data
            if len(self._held) > HELD_LIMIT and not self.peer_paused_us:
                self.peer_paused_us = True
                self.transport.pause_reading()
            return
        partial = self._partial
        if partial:  # grows in place, never re-copied; walked once whole
            partial += data
            if len(partial) < self._partial_need:
                return
            data = bytes(partial)
            self._partial = bytearray()
        self._walk(data)
        if len(data) >= TURN_BYTES and not self._yielding and not self.peer_paused_us and not self.closed:
            self._yielding = True
            self.transport.pause_reading()
            self.loop.call_soon(self._next_turn)

    def _next_turn(self) -> None:
        self._yielding = False
        if not self.peer_paused_us and not self.closed:
            self.transport.resume_reading()

    def _too_large(self, scan: bytes, start: int, pos: int, size: int) -> None:
        """The packet at scan[pos] makes a logical packet over max_message_size: refused at its header."""
        self._protocol_error(scan, start, pos, f"Got a packet bigger than the proxy's max_message_size "
                             f"({self.max_message} bytes): at least {size} bytes", my.ER_NET_PACKET_TOO_LARGE)

    def _walk(self, scan: bytes) -> None:
        """Forward whole commands to the linked backend; answer what needs none; borrow a backend when needed."""
        backend = self.backend
        replay = self.replay_log  # the commands of the transaction in progress are recorded (see mysql_failover)
        end = len(scan)
        pos = start = 0
        if self._drop or self._skip:
            dropping = self._drop
            pos = self._carry_on(scan, end)
            if pos < 0:
                return
            start = pos if dropping else 0  # (dropped bytes are not forwarded; skipped ones go with the rest)
        need = 4  # bytes from pos the walk needs before it can go on
        while pos < end:
            if end - pos < 4:
                need = 4
                break
            length = scan[pos] | (scan[pos + 1] << 8) | (scan[pos + 2] << 16)
            if self._cont or self._infile:  # the rest of a long packet, or LOCAL INFILE content
                pos = self._continuation(scan, start, pos, length, end)
                if pos < 0:
                    return
                continue
            if scan[pos + 3] or not length or length > self.max_message:  # a new command, or not one
                self._bad_command_header(scan, start, pos, length)
                return
            self._size = length
            head = length if length < INSPECT_LIMIT else INSPECT_LIMIT
            if end - pos - 4 < head:
                need = 4 + head
                break
            command = scan[pos + 4]
            if command in STATEMENT_COMMANDS:
                if command == my.COM_STMT_PREPARE and end - pos - 4 < length:  # the whole text is kept
                    if length >= my.MAX_PACKET:
                        self._protocol_error(scan, start, pos, "COM_STMT_PREPARE of 16 MB or more is not supported "
                                             "through the proxy", my.ER_NET_PACKET_TOO_LARGE)
                        return
                    need = 4 + length
                    break
                step = self._statement_command(command, scan, pos, length, head, start)
                if step is None:
                    return
                if replay is not None and self.backend is not None:
                    replay.record(scan[pos : step[0]])
                    if self._skip or self._drop:
                        replay.spoil()
                pos, start = step
                backend = self.backend
                continue
            inspection = self._inspect(command, scan, pos, head)
            if inspection.action == FORWARD:
                if backend is None:
                    self._held += scan[pos:] if pos else scan
                    self._need_backend()
                    return
                effect = inspection.effect
                if replay is not None:
                    replay.record(scan[pos : pos + 4 + length])
                    if length > end - pos - 4 or length == my.MAX_PACKET:
                        replay.spoil()
                if effect is not None:
                    start, done = self._forward_with_effect(backend, command, effect, scan, pos, length, start)
                    if done:
                        pos = start
                        continue
                if self._hold_next == 1:
                    self._hold_next = 2
                backend.expect(command, effect)
                self._seq = 1
                self._cont = length == my.MAX_PACKET
                available = end - pos - 4
                if command == my.COM_QUERY and self.clock is not None:
                    self.clock.query(scan[pos + 5 : pos + 4 + min(length, available)])
                if length > available:
                    self._skip = length - available
                    pos = end
                    break
                pos += 4 + length
                continue
            # answered here: the whole command must be in
            if end - pos - 4 < length:
                if length > INSPECT_LIMIT:
                    self._protocol_error(scan, start, pos, f"Got a packet bigger than allowed: {length} bytes "
                                         f"for command 0x{command:02x}", my.ER_NET_PACKET_TOO_LARGE)
                    return
                need = 4 + length
                break
            answered_at = pos
            pos = start = self._answer_command(inspection, command, scan, pos, length, start)
            if replay is not None and self.backend is not None:
                if pos < 0:
                    replay.spoil()
                else:
                    replay.record(scan[answered_at:pos])
            if pos < 0:
                return
        self._walked(backend, scan, start, pos, need)

    def _walked(self, backend: MySQLBackend | None, scan: bytes, start: int, pos: int, need: int) -> None:
        """The walk stopped at scan[pos] (the end, or a command not whole yet): forward what is left to forward."""
        end = len(scan)
        if backend is not None:
            if start < pos:
                backend.transport.write(scan[start:pos] if start or pos < end else scan)
            if pos < end:
                self._keep_partial(scan, pos, need)
            elif backend.idle and self.backend is backend:
                self._release_if_done(backend)  # a command without a response (STMT_CLOSE, SEND_LONG_DATA)
        elif pos < end:
            self._keep_partial(scan, pos, need)

    def _carry_on(self, scan: bytes, end: int) -> int:
        """The walk starts inside a command: where its next frame starts (-1: scan is all of that command). The
        rest of a command answered here is dropped; the rest of a forwarded one is passed on with what follows."""
        if self._drop:
            if self._drop >= end:
                self._drop -= end
                return -1
            pos, self._drop = self._drop, 0
            return pos
        backend = self.backend
        assert backend is not None
        if self._skip >= end:
            self._skip -= end
            backend.transport.write(scan)
            return -1
        pos, self._skip = self._skip, 0
        return pos

    def _continuation(self, scan: bytes, start: int, pos: int, length: int, end: int) -> int:
        """The frame at scan[pos] continues a long packet or is LOCAL INFILE content: where the walk goes on
        (-1: the client failed)."""
        backend = self.backend
        assert backend is not None
        seq = scan[pos + 3]
        if seq != self._seq:
            self._protocol_error(scan, start, pos, f"Got packets out of order: sequence id {seq}, "
                                 f"expected {self._seq}", my.ER_NET_PACKETS_OUT_OF_ORDER)
            return -1
        size = self._size + length if self._cont else length
        if size > self.max_message:
            self._too_large(scan, start, pos, size)
            return -1
        self._size = size
        self._seq = (seq + 1) & 0xFF
        if self.replay_log is not None:
            self.replay_log.spoil()  # (the rest of a long packet, or a file: not kept)
        if self._infile and not self._cont and length == 0:
            self._infile = False
            backend.infile_sent()
        self._cont = length == my.MAX_PACKET
        available = end - pos - 4
        if length > available:
            self._skip = length - available
            return end
        return pos + 4 + length

    def _bad_command_header(self, scan: bytes, start: int, pos: int, length: int) -> None:
        """The frame header at scan[pos] does not start a command the proxy takes: the client fails."""
        seq = scan[pos + 3]
        if seq != 0:
            self._protocol_error(scan, start, pos, f"Got packets out of order: a command with sequence id {seq}",
                                 my.ER_NET_PACKETS_OUT_OF_ORDER)
        elif length == 0:
            self._protocol_error(scan, start, pos, "Malformed packet: an empty command", my.ER_MALFORMED_PACKET)
        else:
            self._too_large(scan, start, pos, length)

    def _forward_with_effect(self, backend: MySQLBackend, command: int, effect: tuple[int, Any], scan: bytes,
                             pos: int, length: int, start: int) -> tuple[int, bool]:
        """A forwarded command with a session effect: what goes to the backend with it. Returns where the bytes
        still to forward start, and whether the command has been sent whole (the walk goes on after it)."""
        end = len(scan)
        if effect[0] == QUERY:
            query = effect[1]
            if query.insert_id and self.last_insert_id != backend.last_insert_id:
                backend.transport.write(scan[start:pos] + self._insert_id_for(backend))
                start = pos
            if query.functions and length < INSPECT_LIMIT:
                start = self._with_session_values(backend, query, scan, pos, length, start)
            if (query.retrack and backend.tracks_session_state and length < my.MAX_PACKET
                    and pos + 4 + length <= end):
                stop = pos + 4 + length  # the client changed session_track_*: the proxy needs it all
                backend.transport.write(scan[start:stop] + frame(ENABLE_TRACKING))
                backend.expect(command, effect)
                backend.expect(my.COM_QUERY, INTERNAL_PLAIN)
                if self._hold_next == 1:
                    self._hold_next = 2
                return stop, True
        elif command == my.COM_RESET_CONNECTION and backend.tracks_session_state:
            stop = pos + 4 + length
            after = frame(ENABLE_TRACKING)
            restore = not backend.reset_keeps(self.profile.charset)
            if restore:  # the reset goes back to the backend's login character set, not the client's
                after += frame(self.service.charset_command(self.profile.charset))
            backend.transport.write(scan[start:stop] + after)
            backend.expect(command, effect)
            backend.expect(my.COM_QUERY, INTERNAL_PLAIN)
            if restore:
                backend.expect(my.COM_QUERY, INTERNAL_PLAIN)
            return stop, True
        return start, False

    def _answer_command(self, inspection: Inspection, command: int, scan: bytes, pos: int, length: int,
                        start: int) -> int:
        """The whole command at scan[pos] is answered by the proxy: where the walk goes on (-1: it stops; the rest
        is held for a task of the proxy's, or the client is gone)."""
        backend = self.backend
        if backend is not None and start < pos:
            backend.transport.write(scan[start:pos])
        pos += 4 + length
        action = inspection.action
        if action == ANSWER_ERR:
            assert inspection.error is not None
            log.info("client %s: %s", self.peer, inspection.error.message)
            self._send_error(inspection.error, 1)
        elif action == ANSWER_OK:
            self._answer_locally(command)
        elif action == QUIT:
            self.state = State.CLOSED
            self.close()
            return -1
        elif action in (KILL, CHANGE_USER):
            self._held += scan[pos:]
            payload = scan[pos - length : pos]
            if action == KILL:
                query_only, target = inspection.effect or (0, 0)
                self._busy = self.loop.create_task(self._kill(target, bool(query_only)))
            else:
                self._busy = self.loop.create_task(self._change_user(payload))
            return -1
        return pos

    @property
    def at_rest(self) -> bool:
        backend = self.backend
        return (not self._held and not self._partial and self._busy is None and not self._cont and not self._skip
                and (backend is None or (backend.idle and not backend.in_transaction)))

    def _keep_partial(self, scan: bytes, pos: int, need: int) -> None:
        """scan[pos:] is the start of what the walk needs `need` bytes of: kept, to grow until it is whole."""
        self._partial = bytearray(memoryview(scan)[pos:])
        self._partial_need = need

    def _inspect(self, command: int, scan: bytes, pos: int, head: int) -> Inspection:
        if command == my.COM_QUERY:
            return inspect_query(scan[pos + 5 : pos + 4 + head], self.service.settings.local_infile,
                                 self.service.session_tracking)
        linked = self.backend is not None
        if command in FORWARDED_COMMANDS:
            if command == my.COM_INIT_DB:
                return Inspection(FORWARD, (SCHEMA, scan[pos + 5 : pos + 4 + head].decode("utf-8", "surrogateescape")))
            if command == my.COM_SET_OPTION:
                on = head >= 3 and scan[pos + 5] == my.MYSQL_OPTION_MULTI_STATEMENTS_ON
                return Inspection(FORWARD, (SET_OPTION, on))
            if command in (my.COM_PING, my.COM_RESET_CONNECTION):
                if not linked:
                    return Inspection(ANSWER_OK)
                return Inspection(FORWARD, (RESET, None)) if command == my.COM_RESET_CONNECTION else FORWARD_PLAIN
            return FORWARD_PLAIN
        if command == my.COM_QUIT:
            return Inspection(QUIT)
        if command == my.COM_PROCESS_KILL:
            if head < 5:
                return Inspection(ANSWER_ERR, error=violation("Malformed packet: COM_PROCESS_KILL without an id",
                                                               my.ER_MALFORMED_PACKET))
            return Inspection(KILL, (0, int.from_bytes(scan[pos + 5 : pos + 9], "little")))
        if command == my.COM_CHANGE_USER:
            return Inspection(CHANGE_USER)
        return Inspection(ANSWER_ERR, error=UnknownCommand(f"Unknown command 0x{command:02x}"))

    def _answer_locally(self, command: int) -> None:
        if command == my.COM_RESET_CONNECTION:
            self._forget_session_state()
        self._send_ok(1)

    async def _kill(self, target: int, query_only: bool) -> None:
        try:
            await self.service.kill(self, target, query_only)
        except ProxyError as exc:
            log.info("client %s: %s", self.peer, exc.message)
            self._send_error(exc, 1)
        else:
            if not self.closed:
                self._send_ok(1)
        self._busy = None
        self._resume()

    def command_done(self, backend: MySQLBackend, effect: tuple[int, Any] | None) -> None:
        """A forwarded command with an effect on the session (or whose response reports one) is complete."""
        tracker = backend.tracker
        insert_id = tracker.last_insert_id
        if insert_id:
            backend.insert_id_seen(insert_id)
        query: QueryEffect | None = None
        if effect is not None:
            kind, value = effect
            if kind == INTERNAL:
                if value is not None:
                    self._prepared_here(backend, value)
                return  # the proxy's own command: what it reports is not the client's
            if kind == QUERY:
                query = value
                self._query_done(backend, value)
            elif kind == EXECUTE:
                stmt, flags = value
                query = stmt.effect
                self._executed(backend, stmt, flags)
            elif kind == PREPARE:
                self._prepared(backend, value)
            elif kind == FETCH:
                if tracker.error is not None or tracker.status_flags & my.SERVER_STATUS_LAST_ROW_SENT:
                    self._statement_state_ends(value, backend.statement_entry(value.key))
            elif kind == STMT_RESET:
                self._statement_state_ends(value, backend.statement_entry(value.key))
            elif tracker.error is None:
                if kind == SCHEMA:
                    self._schema_changed(backend, str(value))
                elif kind == RESET:
                    self._forget_session_state()
                    self.session.autocommit = backend.autocommit
                    # (tracking on: the client's character set was put back after the reset, see _forward_with_effect)
                    backend.session_reset(self.profile.charset if backend.tracks_session_state else None)
                elif kind == SET_OPTION:
                    self.multi_statements = bool(value)
                    backend.multi_statements_set(self.multi_statements)
        if insert_id:
            self.last_insert_id = insert_id
            if INSERT_ID_EXPRESSION in self.session.pins:  # the value is known again
                self._unpin(INSERT_ID_EXPRESSION, None)
        elif INSERT_ID_EXPRESSION in self.session.pins:  # the value lives on this backend only: never set it again
            self.last_insert_id = -1
            backend.insert_id_seen(-1)
        if tracker.session_state is not None:
            self._state_reported(backend, tracker.session_state, query)

    def _with_session_values(self, backend: MySQLBackend, query: QueryEffect, scan: bytes, pos: int, length: int,
                             start: int) -> int:
        """Send the statement at scan[pos] (all there) with its CONNECTION_ID(), ROW_COUNT() and FOUND_ROWS() calls
        replaced by this client's values; returns where the bytes still to forward start."""
        functions = query.functions
        values: dict[int, int] = {}
        if functions & ids.CONNECTION_ID:
            values[ids.CONNECTION_ID] = self.connection_id
        if functions & ids.ROW_COUNT:
            values[ids.ROW_COUNT] = self.row_count
        if functions & ids.FOUND_ROWS and FOUND_ROWS not in self.session.pins:  # (pinned: the backend knows)
            values[ids.FOUND_ROWS] = self.found_rows
        stop = pos + 4 + length
        text = scan[pos + 5 : stop]
        rewritten = ids.substitute(text, values, query.single) if values else text
        if rewritten is text or len(rewritten) >= my.MAX_PACKET:
            return start
        backend.transport.write(scan[start:pos] + frame(bytes((my.COM_QUERY,)) + rewritten))
        return stop
