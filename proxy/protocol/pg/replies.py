"""Matching a PostgreSQL server's replies to the requests sent to it (sans-IO): what its client gets, what ended."""

from __future__ import annotations

from collections import deque

from proxy.errors import ProtocolViolation
from proxy.protocol.pg import messages as pg
from proxy.protocol.pg.extended import (
    DESCRIBE_STATEMENT,
    ENDS,
    FORWARD,
    INJECT,
    QUIET,
    REPLACE,
    SKIPPED,
    SKIPS_TO_SYNC,
    SWALLOW,
    SYNC,
    Expectation,
    result_shape,
)

READY = 0x5A  # 'Z': ReadyForQuery
PARAMETER_STATUS = 0x53  # 'S'
ERROR = 0x45  # 'E': ErrorResponse
COMMAND_COMPLETE = 0x43  # 'C': its tag ends with the number of rows for most commands
PARAMETER_DESCRIPTION = 0x74  # 't'
NOTIFICATION = 0x41  # 'A': NotificationResponse (process id, channel, payload)
ASYNC_REPLIES = frozenset(b"NA")  # NoticeResponse, NotificationResponse: may come at any time
DROPPED = frozenset({SWALLOW, QUIET})  # actions whose replies the client does not see
# In an ErrorResponse, the non-localized severity field ('V') after the first field: the server ends the session.
SESSION_ENDING = (b"\x00VFATAL\x00", b"\x00VPANIC\x00")
# The SQLSTATE field of a server's shutdown (admin_shutdown, crash_shutdown): the session ends with the server.
SHUTDOWN_CODES = (b"\x00C57P01\x00", b"\x00C57P02\x00")
# SQLSTATEs that suggest the server is no longer the writer or is going away: read_only_sql_transaction,
# admin_shutdown, crash_shutdown, cannot_connect_now. An ErrorResponse carrying one is `trouble` for the topology.
READ_ONLY_SQLSTATE = "25006"
TROUBLE_SQLSTATES = frozenset({READ_ONLY_SQLSTATE.encode(), b"57P01", b"57P02", b"57P03"})
SQLSTATE_FIELD = b"\x00C"  # a field ends, the next is the code ('C'): its value is the SQLSTATE
# An ErrorResponse up to this size is read whole before it passes; a longer one (a client's RAISE of megabytes)
# streams through like any other reply.
WHOLE_ERROR_LIMIT = 64 * 1024


class ReplyMatcher:
    """Follows one server connection's replies against `expect`, the requests sent in the order they are answered.

    feed() takes the bytes as they arrive (any split) and returns the bytes the client gets: the same object when
    every reply passes, else the kept slices joined with the replies the proxy gives in place of its own requests'.
    It reads message headers only, except ReadyForQuery's status byte, a NotificationResponse's process id,
    ParameterStatus, ErrorResponse (up to WHOLE_ERROR_LIMIT), and the replies a statement record keeps (those
    are read whole).

    What each request's replies become is its expectation's action (see proxy.protocol.pg.extended): FORWARD
    passes them, SWALLOW drops them but passes the ErrorResponse of an extended-query request, QUIET drops
    everything, REPLACE turns an ErrorResponse into its payload, INJECT is a reply of the proxy's own given when its
    turn comes. A reply ends
    the request at the head of `expect` when its type is one of ENDS[kind]; an ErrorResponse to an extended-query
    request ends every request up to the next Sync, as the server skips them. Messages no request waits for
    (COPY data, rows, notices, notifications, parameter changes) pass through.

    After each feed(): `ready` is the number of ReadyForQuery messages the client got, `tx_status` the last status
    the server reported, `resume` whether a request marked `resume` ended; `reported` holds the ParameterStatus
    (name, value) pairs read and `failed` the (expectation, failing) pairs an ErrorResponse ended (failing: the
    request the error answers; the others were skipped). `trouble` is the SQLSTATE of an ErrorResponse that says
    the server is read-only or shutting down (TROUBLE_SQLSTATES; read from error replies only). The reader clears
    those after each feed(); `eventful` says whether there is anything in them or in `resume` (one test on the hot
    path).
    """

    __slots__ = ("_dropping", "_partial", "_skip", "client_pid", "ended_by_server", "errors", "eventful", "expect",
                 "failed", "ready", "reported", "resume", "rows", "server_pid", "shut_down", "trouble", "tx_status",
                 "withhold_shutdown")

    def __init__(self) -> None:
        self.expect: deque[Expectation] = deque()
        self.tx_status = pg.IDLE
        self.server_pid = b""  # the server session's process id as sent in a NotificationResponse
        self.client_pid = 0  # the process id the client knows: its own notifications carry this one instead
        self.ended_by_server = False  # a FATAL or PANIC ErrorResponse was passed to the client
        self.withhold_shutdown = False  # a FATAL of the server's shutdown is not passed: the client is recovered
        self.shut_down = False  # such a FATAL was read (and withheld)
        self.ready = 0
        self.errors = 0  # ErrorResponses read, and rows the CommandCompletes read gave: the reader resets them
        self.rows = 0
        self.resume = False
        self.eventful = False  # any of `resume`, `reported`, `failed` after the last feed()
        self.reported: list[tuple[str, str]] = []
        self.failed: list[tuple[Expectation, bool]] = []
        self.trouble = ""  # the SQLSTATE of an error reply that says the server is read-only or going away
        self._skip = 0  # bytes of the current message still to pass before the next header
        self._dropping = False  # the rest of the current message is dropped, not passed on
        self._partial = b""  # the start of a message whose header (or whole body) is needed, carried to next feed

    def reset(self, client_pid: int = 0) -> None:
        """A new client: nothing is expected, nothing half-read (`reported` and `failed` are drained already)."""
        self.client_pid = client_pid
        self._skip = 0
        self._dropping = False
        self._partial = b""
        self.expect.clear()

    @property
    def at_boundary(self) -> bool:
        """What the server sent so far ends at a message boundary (nothing half-passed to a client)."""
        return not self._skip and not self._partial

    @property
    def client_at_boundary(self) -> bool:
        """What the client was given ends at a message boundary (a message held back or dropped is not given)."""
        return not self._skip or self._dropping

    def feed(self, data: bytes) -> bytes:
        """Read `data` from the server; return the bytes for the client. Raises ProtocolViolation on a bad length."""
        scan = self._partial + data if self._partial else data
        self._partial = b""
        end = len(scan)
        pos = self._skip
        pieces: list[bytes] | None = None  # set once a reply is dropped or one is added
        run_start = 0  # start of the bytes not yet handed to `pieces`
        if pos and self._dropping:
            pieces = []
            run_start = pos  # (beyond `end` when the dropped message goes on in the next read too)
        expect = self.expect
        ready = 0
        resume = False  # a request the client waits for (statement check) has ended
        eventful = False  # something was added to `reported` or `failed`
        hold = end  # bytes from here on wait for the rest of their message
        while pos < end:
            if end - pos < 5:
                hold = pos
                break
            kind = scan[pos]
            length = int.from_bytes(scan[pos + 1 : pos + 5], "big")
            if length < 4:
                raise ProtocolViolation(f"backend sent a message with length {length}")
            if kind == READY:
                if end - pos < 6:
                    hold = pos
                    break
                ready += 1
                self.tx_status = scan[pos + 5]
            elif kind == PARAMETER_STATUS:
                if end - pos < length + 1:
                    hold = pos
                    break
                self.reported.append(pg.parse_parameter_status(scan[pos + 5 : pos + 1 + length]))
                eventful = True
                pos += 1 + length
                continue
            elif kind in ASYNC_REPLIES:
                if kind == NOTIFICATION:
                    if end - pos < 9:
                        hold = pos
                        break
                    if length >= 8 and scan[pos + 5 : pos + 9] == self.server_pid:  # the client's own NOTIFY
                        if pieces is None:
                            pieces = []
                        pieces.append(scan[run_start : pos + 5])
                        pieces.append(pg.INT32.pack(self.client_pid))
                        run_start = pos + 9
                pos += 1 + length
                continue
            elif kind == ERROR:
                if end - pos < length + 1 and length <= WHOLE_ERROR_LIMIT:
                    hold = pos  # read whole: its severity says whether the session ends, its bytes may be kept
                    break
                if self._error_seen(scan, pos, min(pos + 1 + length, end), length):
                    if pieces is None:  # a shutdown kept from the client
                        pieces = []
                    pieces.append(scan[run_start:pos])
                    pos += 1 + length
                    run_start = pos
                    continue
                if self.trouble:
                    eventful = True
            elif kind == COMMAND_COMPLETE and end - pos > length:
                self.rows += _tag_rows(scan, pos + 5, pos + length)
            action = FORWARD
            if expect:
                head: Expectation | None = expect[0]
                if head is not None and head.action == INJECT:
                    if pieces is None:
                        pieces = []
                    pieces.append(scan[run_start:pos])
                    run_start = pos
                    self._pop_injections(pieces)
                    head = expect[0] if expect else None
                if head is not None:
                    action = head.action
                    if action != FORWARD and head.record is not None and end - pos < length + 1:
                        hold = pos  # a reply the statement record keeps: wait for all of it
                        break
                    if kind == ERROR and head.kind in SKIPS_TO_SYNC:
                        if action != QUIET and action != REPLACE:
                            action = FORWARD  # the client must see why its request failed
                        resume = self._skip_to_sync(scan[pos : pos + 1 + length]) or resume
                        eventful = True
                    elif kind in ENDS[head.kind]:
                        expect.popleft()
                        if action != FORWARD:
                            if kind == READY and action in DROPPED:
                                ready -= 1  # the end of a query or Sync of the proxy's own
                            record = head.record
                            if record is not None and head.kind == DESCRIBE_STATEMENT:
                                record.description = record.parameters + result_shape(scan[pos : pos + 1 + length])
                            resume = head.resume or resume
                    elif action != FORWARD and head.record is not None and kind == PARAMETER_DESCRIPTION:
                        head.record.parameters = scan[pos : pos + 1 + length]
            if action != FORWARD and (action in DROPPED or (action == REPLACE and kind == ERROR)):
                if pieces is None:
                    pieces = []
                pieces.append(scan[run_start:pos])
                if action == REPLACE:
                    pieces.append(head.payload)  # type: ignore[union-attr]
                run_start = pos + 1 + length
            pos += 1 + length
            if expect and expect[0].action == INJECT:
                if pieces is None:
                    pieces = []
                stop = min(pos, end)
                if run_start < stop:
                    pieces.append(scan[run_start:stop])
                    run_start = stop
                self._pop_injections(pieces)
        if pos > end:
            self._skip = pos - end
            self._dropping = run_start > end
        else:
            self._skip = 0
            self._dropping = False
        if hold < end:
            self._partial = scan[hold:]
        self.ready = ready
        self.resume = resume
        self.eventful = eventful or resume
        if pieces is None:
            return scan if hold == end else scan[:hold]
        if run_start < hold:
            pieces.append(scan[run_start:hold])
        return b"".join(pieces)

    def _error_seen(self, scan: bytes, pos: int, body_end: int, length: int) -> bool:
        """An ErrorResponse at `pos` (whole, or the start of a long one): note whether it ends the session and
        whether it is `trouble` for the topology; True for a shutdown the client is not to see (it is recovered)."""
        if any(scan.find(mark, pos + 5, body_end) >= 0 for mark in SESSION_ENDING):
            if self.withhold_shutdown and body_end == pos + 1 + length and any(
                    scan.find(code, pos + 4, body_end) >= 0 for code in SHUTDOWN_CODES):
                self.shut_down = True  # the server goes away; its client is recovered, not told
                return True
            self.ended_by_server = True  # the server's own FATAL reaches the client; it closes next
        self.errors += 1
        code = scan.find(SQLSTATE_FIELD, pos + 5, body_end)
        if code >= 0 and scan[code + 2 : code + 7] in TROUBLE_SQLSTATES:
            self.trouble = scan[code + 2 : code + 7].decode()
        return False

    def _pop_injections(self, pieces: list[bytes]) -> None:
        expect = self.expect
        while expect and expect[0].action == INJECT:
            pieces.append(expect.popleft().payload)

    def _skip_to_sync(self, error: bytes) -> bool:
        """An extended-query request failed: the server skips everything up to the next Sync, so do we.

        Returns whether one of the requests ended this way was marked `resume`."""
        expect = self.expect
        failing = True
        resume = False
        while expect and expect[0].kind != SYNC:
            failed = expect.popleft()
            record = failed.record
            if record is not None and record.description is None and record.error is None:
                record.error = error if failing else SKIPPED
            self.failed.append((failed, failing))
            resume = resume or failed.resume
            failing = False
        return resume


def _tag_rows(scan: bytes, start: int, stop: int) -> int:
    """The row count at the end of a CommandComplete tag (scan[start:stop], its NUL excluded), or 0."""
    space = scan.rfind(b" ", start, stop)
    count = scan[space + 1 : stop]
    return int(count) if space >= 0 and count.isdigit() else 0
