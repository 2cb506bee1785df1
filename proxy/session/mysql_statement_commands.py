"""A MySQL client's binary-protocol statement commands, on the proxy's statement ids (see mysql_statements)."""

from __future__ import annotations

from typing import Any

from proxy.errors import NotSupported
from proxy.pool.mysql_backend import ROW_COMMANDS, STATEMENT_LIMIT, MySQLBackend
from proxy.protocol.mysql import constants as my
from proxy.protocol.mysql.effects import EXECUTE, FETCH, INTERNAL, PREPARE, STMT_RESET
from proxy.protocol.mysql.packets import ErrPacket, OkPacket, frame
from proxy.protocol.mysql.statements import (
    BULK_FLAGS_AT,
    BULK_SEND_TYPES,
    BULK_TYPES_AT,
    EXECUTE_CURSOR_FLAGS,
    EXECUTE_FLAGS_AT,
    LAST_PREPARED,
    bound_flag_at,
    head_with_types,
    relabelled_head,
    statement_id,
    unknown_statement,
)
from proxy.session import mysql_ids as ids
from proxy.session.mysql_borrow import MySQLBorrowing
from proxy.session.mysql_inspect import FORWARD, PREPARED_ROW_COUNT, inspect_query, prepared_effect
from proxy.session.mysql_lifecycle import log, violation
from proxy.session.mysql_statements import BackendStatement, ClientStatement

STATEMENT_COMMAND_NAMES = {
    my.COM_STMT_EXECUTE: "mysqld_stmt_execute", my.COM_STMT_FETCH: "mysqld_stmt_fetch",
    my.COM_STMT_RESET: "mysqld_stmt_reset", my.COM_STMT_BULK_EXECUTE: "mysqld_stmt_bulk_execute",
    my.COM_STMT_SEND_LONG_DATA: "mysqld_stmt_send_long_data",
}

ER_STMT_HAS_NO_OPEN_CURSOR = 1421

def _no_cursor(statement: int, capabilities: int) -> bytes:
    return ErrPacket(ER_STMT_HAS_NO_OPEN_CURSOR, f"The statement ({statement}) has no open cursor",
                     "HY000").build(capabilities)


class MySQLStatementCommands(MySQLBorrowing):
    """COM_STMT_*: forwarded with the backend's statement id, prepared there first, or answered here."""

    def _statement_command(self, command: int, scan: bytes, pos: int, length: int, head: int,
                           start: int) -> tuple[int, int] | None:
        """A statement command at scan[pos]: forward it with the backend's statement id, prepare the statement
        on the backend first, or answer it here. Returns where the walk goes on (pos, start), or None when it
        stops (the rest is held, or the client failed)."""
        backend = self.backend
        if command == my.COM_STMT_PREPARE:
            return self._prepare(scan, pos, length, start)
        if length < 5:
            self._protocol_error(scan, start, pos, f"Malformed packet: command 0x{command:02x} without a statement id",
                                 my.ER_MALFORMED_PACKET)
            return None
        number = statement_id(scan, pos + 4)
        if number == LAST_PREPARED and self._last_prepared:
            number = self._last_prepared
            if number not in self.session.statements and backend is not None and not backend.idle:
                self._stall(scan, pos, start)  # its prepare is still running
                return None
        stmt = self.session.statements.get(number)
        if command == my.COM_STMT_CLOSE:  # the client's handle goes; the backend keeps the statement (LRU)
            if backend is not None and start < pos:
                backend.transport.write(scan[start:pos])
            stop = pos + 4 + length
            if stmt is not None:
                del self.session.statements[number]
                if PREPARED_ROW_COUNT in self.session.pins:
                    self._unpin(PREPARED_ROW_COUNT, frozenset((b"%d" % number,)))
                if backend is not None and (stmt.cursor or stmt.long_data):
                    self._reset_on_backend(backend, stmt)
            return stop, stop
        if stmt is None:
            if command == my.COM_STMT_SEND_LONG_DATA:
                return self._answer_here(scan, pos, length, start, None)
            return self._answer_here(scan, pos, length, start, unknown_statement(
                number, STATEMENT_COMMAND_NAMES.get(command, "mysqld_stmt"), self.capabilities))
        if backend is None:
            if command == my.COM_STMT_RESET:  # nothing of it lives on a backend now
                status = my.SERVER_STATUS_AUTOCOMMIT if self.session.autocommit else 0
                ok = OkPacket(status_flags=status).build(self.capabilities)
                return self._answer_here(scan, pos, length, start, ok)
            if command == my.COM_STMT_FETCH:
                return self._answer_here(scan, pos, length, start, _no_cursor(number, self.capabilities))
            self._held += scan[pos:] if pos else scan
            self._need_backend()
            return None
        entry = backend.statement(stmt.key)
        if entry is None:
            return self._not_prepared_here(backend, stmt, command, scan, pos, length, start)
        return self._forward_statement(backend, stmt, entry, command, scan, pos, length, head, start)

    def _not_prepared_here(self, backend: MySQLBackend, stmt: ClientStatement, command: int, scan: bytes, pos: int,
                           length: int, start: int) -> tuple[int, int] | None:
        """A statement command for a statement the linked backend does not have: answered here, or the statement
        is prepared there first (the command waits for that)."""
        if stmt.failure is not None:  # preparing it here failed: that is the answer
            failure = stmt.failure
            if command != my.COM_STMT_SEND_LONG_DATA:
                stmt.failure = None
            return self._answer_here(scan, pos, length, start, None if command == my.COM_STMT_SEND_LONG_DATA
                                     else failure)
        if command == my.COM_STMT_FETCH:
            return self._answer_here(scan, pos, length, start, _no_cursor(stmt.statement_id, self.capabilities))
        if command == my.COM_STMT_RESET:  # nothing to reset on this backend: a PING answers the same OK
            stop = pos + 4 + length
            backend.transport.write(scan[start:pos] + frame(bytes((my.COM_PING,))))
            backend.expect(my.COM_PING, None)
            return stop, stop
        self._prepare_here(backend, stmt, scan[start:pos])
        self._stall(scan, pos, pos)
        return None

    def _forward_statement(self, backend: MySQLBackend, stmt: ClientStatement, entry: BackendStatement, command: int,
                           scan: bytes, pos: int, length: int, head: int, start: int) -> tuple[int, int] | None:
        """Forward a statement command for a statement the backend has, with the backend's statement id (and the
        parameter types the client sent with an earlier execution, if the backend has not seen them)."""
        new_id = entry.statement_id
        types, types_at, effect = self._statement_effect(stmt, entry, command, scan, pos, length, head)
        stop = pos + 4 + length
        if types is None:
            rewritten = relabelled_head(scan, pos, new_id)
            rest = pos + 9
        else:
            if length + len(types) >= my.MAX_PACKET:
                entry.types = None
                return self._answer_here(scan, pos, length, start, ErrPacket(
                    my.ER_NET_PACKET_TOO_LARGE, "through the proxy, a statement execution of 16 MB or more must send "
                    "its parameter types").build(self.capabilities))
            rewritten = head_with_types(scan, pos, length, new_id, types_at, types)
            rest = pos + 4 + types_at + (1 if command == my.COM_STMT_EXECUTE else 0)
        if effect is not None and stmt.effect is not None and stmt.effect.insert_id:
            rewritten = self._insert_id_for(backend) + rewritten
        end = len(scan)
        if stop <= end:
            backend.transport.write(scan[start:pos] + rewritten + scan[rest:stop])
            next_pos = stop
        else:
            backend.transport.write(scan[start:pos] + rewritten + scan[rest:end])
            self._skip = stop - end
            next_pos = end
        if self._hold_next == 1:
            self._hold_next = 2
        if self.clock is not None and command in ROW_COMMANDS:
            self.clock.query(stmt.sql)
        backend.expect(command, effect)
        self._seq = 1
        self._cont = length == my.MAX_PACKET
        return next_pos, next_pos

    def _statement_effect(self, stmt: ClientStatement, entry: BackendStatement, command: int, scan: bytes, pos: int,
                          length: int, head: int) -> tuple[bytes | None, int, tuple[int, Any] | None]:
        """What a statement command needs besides the statement id: the parameter types to send with it (None:
        as the client sent it) and where they go, and the effect to follow when its response completes."""
        types: bytes | None = None
        types_at = 0
        effect: tuple[int, Any] | None = None
        params = stmt.params
        if command == my.COM_STMT_EXECUTE:
            flags = scan[pos + 4 + EXECUTE_FLAGS_AT] if length > EXECUTE_FLAGS_AT else 0
            if params:
                types_at = bound_flag_at(params)
                if types_at < head:
                    if scan[pos + 4 + types_at]:
                        stop = pos + 5 + types_at + 2 * params
                        entry.types = stmt.types = scan[pos + 5 + types_at : stop] if stop <= pos + 4 + head else None
                    elif stmt.types is not None and entry.types != stmt.types:
                        types = entry.types = stmt.types  # sent with an earlier execute, on another backend
            if flags & EXECUTE_CURSOR_FLAGS or stmt.cursor or stmt.long_data or stmt.effect is not None:
                effect = (EXECUTE, (stmt, flags))
        elif command == my.COM_STMT_BULK_EXECUTE:
            if params and head >= BULK_TYPES_AT:
                bulk_flags = scan[pos + 4 + BULK_FLAGS_AT] | (scan[pos + 5 + BULK_FLAGS_AT] << 8)
                if bulk_flags & BULK_SEND_TYPES:
                    stop = pos + 4 + BULK_TYPES_AT + 2 * params
                    entry.types = stmt.types = scan[pos + 4 + BULK_TYPES_AT : stop] if stop <= pos + 4 + head else None
                elif stmt.types is not None and entry.types != stmt.types:
                    types = entry.types = stmt.types
                    types_at = BULK_TYPES_AT
            if stmt.long_data or stmt.effect is not None:
                effect = (EXECUTE, (stmt, 0))
        elif command == my.COM_STMT_SEND_LONG_DATA:
            if not stmt.long_data:
                stmt.long_data = True
                self.long_data += 1
                entry.held += 1
        elif command == my.COM_STMT_FETCH:
            effect = (FETCH, stmt)
        else:  # COM_STMT_RESET
            effect = (STMT_RESET, stmt)
        return types, types_at, effect


    def _prepare(self, scan: bytes, pos: int, length: int, start: int) -> tuple[int, int] | None:
        """The client's COM_STMT_PREPARE: runs on the linked backend; the client sees an id of the proxy's."""
        backend = self.backend
        if backend is None:
            self._held += scan[pos:] if pos else scan
            self._need_backend()
            return None
        sql = scan[pos + 5 : pos + 4 + length]
        inspection = inspect_query(sql, self.service.settings.local_infile, backend.tracks_session_state)
        if inspection.action != FORWARD:
            error = inspection.error or NotSupported("through the proxy, this statement cannot be prepared")
            return self._answer_here(scan, pos, length, start, ErrPacket(
                error.mysql_errno, error.message, error.mysql_sqlstate).build(self.capabilities))
        limit = int(backend.pool.server_params.get(STATEMENT_LIMIT, "16382"))
        if len(self.session.statements) >= limit:  # as the server would say; the client's handles cost memory
            return self._answer_here(scan, pos, length, start, ErrPacket(
                my.ER_MAX_PREPARED_STMT_COUNT_REACHED, "Can't create more than max_prepared_stmt_count statements "
                f"(current value: {limit})").build(self.capabilities))
        number = self._next_statement_id
        self._next_statement_id = number + 1 if number < 0xFFFFFFF0 else 1
        query = inspection.query_effect
        sent = sql
        if query is not None and query.functions & ids.CONNECTION_ID:  # the statement, wherever it runs, says ours
            rewritten = ids.substitute(sql, {ids.CONNECTION_ID: self.connection_id}, True)
            if len(rewritten) < my.MAX_PACKET - 1:
                sql = rewritten
        key = self.service.statement_key(self.session.database, self._settings_fingerprint(), sql)
        stmt = ClientStatement(number, key, sql, self.session.database,
                               prepared_effect(inspection.query_effect, backend.tracks_session_state))
        closes = backend.prepare_started()
        if closes:
            backend.transport.write(scan[start:pos] + closes)
            start = pos
        if sql is not sent:
            backend.transport.write(scan[start:pos] + frame(bytes((my.COM_STMT_PREPARE,)) + sql))
            start = pos + 4 + length
        self._last_prepared = number
        if self._hold_next == 1:
            self._hold_next = 2
        backend.expect(my.COM_STMT_PREPARE, (PREPARE, stmt))
        self._seq = 1
        self._cont = False
        return pos + 4 + length, start

    def _insert_id_for(self, backend: MySQLBackend) -> bytes:
        """LAST_INSERT_ID() reads the session's value: the command giving the backend the client's (or nothing)."""
        return backend.insert_id_command(self.last_insert_id)

    def _prepare_here(self, backend: MySQLBackend, stmt: ClientStatement, before: bytes) -> None:
        """Prepare a client's statement on the linked backend (the proxy's own command; its answer is swallowed)."""
        backend.ensure_prepared(stmt.sql, stmt.schema, before, (INTERNAL, stmt))

    def _reset_on_backend(self, backend: MySQLBackend, stmt: ClientStatement) -> None:
        """The client closed a statement with a cursor open or long data sent: reset it on the backend."""
        self._statement_state_ends(stmt, backend.statement_entry(stmt.key))
        backend.reset_statement(stmt.key)

    def _statement_state_ends(self, stmt: ClientStatement, entry: Any) -> None:
        """A statement's cursor or long data is gone (executed, fetched to the end, reset or closed)."""
        if stmt.cursor:
            stmt.cursor = False
            self.cursors -= 1
            if entry is not None:
                entry.held -= 1
        if stmt.long_data:
            stmt.long_data = False
            self.long_data -= 1
            if entry is not None:
                entry.held -= 1

    def _stall(self, scan: bytes, pos: int, start: int) -> None:
        """Hold scan[pos:] until the backend has answered everything it was sent (then walk it again)."""
        backend = self.backend
        if backend is not None and start < pos:
            backend.transport.write(scan[start:pos])
        self._held += scan[pos:] if pos else scan
        self._stalled = True

    def _answer_here(self, scan: bytes, pos: int, length: int, start: int,
                     answer: bytes | None) -> tuple[int, int] | None:
        """Answer the command at scan[pos] with `answer` (None: it has no response) and drop its bytes."""
        backend = self.backend
        if answer is not None and backend is not None and not backend.idle:
            self._stall(scan, pos, start)  # after the responses still to come, not before them
            return None
        if backend is not None and start < pos:
            backend.transport.write(scan[start:pos])
        if answer is not None:
            self.write(frame(answer, 1))
        end = len(scan)
        stop = pos + 4 + length
        if stop <= end:
            return stop, stop
        if length >= my.MAX_PACKET:
            self.fail(violation("a statement command of 16 MB or more for an unknown statement",
                                 my.ER_NET_PACKET_TOO_LARGE))
            return None
        self._drop = stop - end
        return end, end

    def _prepared(self, backend: MySQLBackend, stmt: ClientStatement) -> None:
        """The client's COM_STMT_PREPARE is answered (its response went to the client, relabelled)."""
        ok = backend.tracker.prepare_ok
        backend.prepare_answered(stmt.key, None if ok is None else ok.statement_id)
        if ok is None:
            return
        stmt.params = ok.num_params
        stmt.columns = ok.num_columns
        self.session.statements[stmt.statement_id] = stmt
        if stmt.effect is not None and stmt.effect.functions & (ids.ROW_COUNT | ids.FOUND_ROWS):
            self._pin(backend, PREPARED_ROW_COUNT, frozenset((b"%d" % stmt.statement_id,)),
                      "a prepared statement reads ROW_COUNT() or FOUND_ROWS()")

    def _prepared_here(self, backend: MySQLBackend, stmt: ClientStatement) -> None:
        """The proxy's prepare of a client's statement on this backend is answered; the client may go on."""
        tracker = backend.tracker
        ok = tracker.prepare_ok
        backend.prepare_answered(stmt.key, None if ok is None else ok.statement_id)
        if ok is None:
            stmt.failure = tracker.error_packet or ErrPacket(my.ER_UNKNOWN_ERROR, "prepare failed").build()
            log.info("client %s: preparing its statement again on %s failed: %s", self.peer, backend,
                     ErrPacket.parse(stmt.failure).message)
            return
        stmt.failure = None

    def _executed(self, backend: MySQLBackend, stmt: ClientStatement, flags: int) -> None:
        tracker = backend.tracker
        entry = backend.statement_entry(stmt.key)
        self._statement_state_ends(stmt, entry)  # long data was used; an older cursor of it is closed
        if (flags & EXECUTE_CURSOR_FLAGS and tracker.error is None
                and tracker.status_flags & my.SERVER_STATUS_CURSOR_EXISTS):
            stmt.cursor = True
            self.cursors += 1
            if entry is not None:
                entry.held += 1
        if stmt.effect is not None:
            self._query_done(backend, stmt.effect)
