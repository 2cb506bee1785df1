"""The PostgreSQL reply matcher as tables: the requests the proxy registered and the server's exact bytes, cut at
every offset, in; the client's exact bytes and the matcher's decisions out."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from itertools import pairwise

import pytest

from proxy.errors import ProtocolViolation
from proxy.protocol.pg import extended as ext
from proxy.protocol.pg.extended import (
    BIND,
    CLOSE,
    DESCRIBE_PORTAL,
    DESCRIBE_STATEMENT,
    EXECUTE,
    FORWARD,
    INJECT,
    PARSE,
    QUERY,
    QUIET,
    REPLACE,
    SKIPPED,
    SWALLOW,
    TRACK,
    Expectation,
    Prepared,
)
from proxy.protocol.pg.replies import WHOLE_ERROR_LIMIT, ReplyMatcher


def msg(kind: bytes, body: bytes = b"") -> bytes:
    return kind + (len(body) + 4).to_bytes(4, "big") + body


# --- server messages, exact bytes ---
PARSE_COMPLETE = b"1\x00\x00\x00\x04"
BIND_COMPLETE = b"2\x00\x00\x00\x04"
CLOSE_COMPLETE = b"3\x00\x00\x00\x04"
NO_DATA = b"n\x00\x00\x00\x04"
EMPTY_QUERY = b"I\x00\x00\x00\x04"
PORTAL_SUSPENDED = b"s\x00\x00\x00\x04"
COPY_DONE = b"c\x00\x00\x00\x04"
READY_IDLE = b"Z\x00\x00\x00\x05I"
READY_IN_TX = b"Z\x00\x00\x00\x05T"
READY_FAILED = b"Z\x00\x00\x00\x05E"
# RowDescription: one int4 column "n" (table oid 16384, column 1, type 23, size 4, modifier -1, text format).
ROW_DESCRIPTION = (b"T\x00\x00\x00\x1a\x00\x01n\x00\x00\x00\x40\x00\x00\x01\x00\x00\x00\x17\x00\x04"
                   b"\xff\xff\xff\xff\x00\x00")
PARAMETER_DESCRIPTION = b"t\x00\x00\x00\x0a\x00\x01\x00\x00\x00\x17"  # one int4 parameter
DATA_ROW = b"D\x00\x00\x00\x0c\x00\x01\x00\x00\x00\x02" b"42"  # ('42',)
SELECT_1 = msg(b"C", b"SELECT 1\x00")
ROWS = ROW_DESCRIPTION + DATA_ROW + SELECT_1
COPY_OUT_RESPONSE = b"H\x00\x00\x00\x09\x00\x00\x01\x00\x00"  # text, one column
COPY_IN_RESPONSE = b"G\x00\x00\x00\x09\x00\x00\x01\x00\x00"
COPY_BOTH_RESPONSE = b"W\x00\x00\x00\x07\x00\x00\x00"
COPY_DATA = msg(b"d", b"42\n")
COPY_1 = msg(b"C", b"COPY 1\x00")


def error(sqlstate: bytes, text: bytes, severity: bytes = b"ERROR") -> bytes:
    return msg(b"E", b"S" + severity + b"\x00V" + severity + b"\x00C" + sqlstate + b"\x00M" + text + b"\x00\x00")


SYNTAX_ERROR = error(b"42601", b'syntax error at or near "SELEKT"')
NO_STATEMENT = error(b"26000", b'prepared statement "__proxy_fail" does not exist')
STALE = error(b"0A000", b"cached plan must not change result type")
SHUTDOWN = error(b"57P01", b"terminating connection due to administrator command", b"FATAL")
NOTICE = msg(b"N", b"SNOTICE\x00VNOTICE\x00C00000\x00Mhello\x00\x00")
SERVER_PID = (4242).to_bytes(4, "big")
CLIENT_PID = 77
OTHER_NOTIFY = msg(b"A", (999).to_bytes(4, "big") + b"jobs\x00new\x00")
OWN_NOTIFY = msg(b"A", SERVER_PID + b"jobs\x00mine\x00")
OWN_NOTIFY_AS_CLIENT_SEES_IT = msg(b"A", CLIENT_PID.to_bytes(4, "big") + b"jobs\x00mine\x00")
TIMEZONE_UTC = msg(b"S", b"TimeZone\x00UTC\x00")
APP_NAME = msg(b"S", b"application_name\x00batch\x00")

CLOSE_INJECTED = Expectation(CLOSE, INJECT, CLOSE_COMPLETE)  # a Close of a client's name, answered by the proxy


def check_records() -> list[Expectation]:
    """The proxy's own Close + Parse + Describe of a shared statement before the client's Bind/Execute/Sync."""
    record = Prepared(b"SELECT $1::int\x00\x00\x01\x00\x00\x00\x17")
    return [ext.EXPECT_CLOSE_SWALLOW, Expectation(PARSE, SWALLOW, prepared_name=b"s1", record=record),
            Expectation(DESCRIBE_STATEMENT, SWALLOW, record=record), ext.EXPECT_BIND, ext.EXPECT_EXECUTE,
            ext.EXPECT_SYNC]


@dataclass
class Case:
    expect: Callable[[], list[Expectation]]  # what the proxy registered, in the order the server answers
    server: bytes  # what the server sends
    client: bytes  # what the client gets
    ready: int  # ReadyForQuery messages the client gets
    tx_status: int = ord("I")
    left: int = 0  # requests still waiting for replies afterwards
    failed: list[tuple[int, int, bool]] = field(default_factory=list)  # (kind, action, failing) an error ended
    reported: list[tuple[str, str]] = field(default_factory=list)
    ended_by_server: bool = False


CASES: dict[str, Case] = {
    "simple query": Case(lambda: [ext.EXPECT_QUERY], ROWS + READY_IDLE, ROWS + READY_IDLE, 1),
    "simple query of two statements": Case(
        lambda: [ext.EXPECT_QUERY], ROWS + ROWS + READY_IDLE, ROWS + ROWS + READY_IDLE, 1),
    "empty query": Case(lambda: [ext.EXPECT_QUERY], EMPTY_QUERY + READY_IDLE, EMPTY_QUERY + READY_IDLE, 1),
    "query error": Case(lambda: [ext.EXPECT_QUERY], SYNTAX_ERROR + READY_IDLE, SYNTAX_ERROR + READY_IDLE, 1),
    "query in a transaction": Case(
        lambda: [ext.EXPECT_QUERY, ext.EXPECT_QUERY],
        msg(b"C", b"BEGIN\x00") + READY_IN_TX + SYNTAX_ERROR + READY_FAILED,
        msg(b"C", b"BEGIN\x00") + READY_IN_TX + SYNTAX_ERROR + READY_FAILED, 2, tx_status=ord("E")),
    "function call": Case(lambda: [ext.EXPECT_FUNCTION_CALL], msg(b"V", b"\x00\x00\x00\x01\x07") + READY_IDLE,
                          msg(b"V", b"\x00\x00\x00\x01\x07") + READY_IDLE, 1),
    "pipeline P/B/D/E/S": Case(
        lambda: [ext.EXPECT_PARSE_UNNAMED, ext.EXPECT_BIND, ext.EXPECT_DESCRIBE_PORTAL, ext.EXPECT_EXECUTE,
                 ext.EXPECT_SYNC],
        PARSE_COMPLETE + BIND_COMPLETE + ROWS + READY_IDLE, PARSE_COMPLETE + BIND_COMPLETE + ROWS + READY_IDLE, 1),
    "pipeline of two Syncs": Case(
        lambda: [ext.EXPECT_BIND, ext.EXPECT_EXECUTE, ext.EXPECT_SYNC, ext.EXPECT_BIND, ext.EXPECT_EXECUTE,
                 ext.EXPECT_SYNC],
        BIND_COMPLETE + DATA_ROW + SELECT_1 + READY_IDLE + BIND_COMPLETE + DATA_ROW + SELECT_1 + READY_IDLE,
        BIND_COMPLETE + DATA_ROW + SELECT_1 + READY_IDLE + BIND_COMPLETE + DATA_ROW + SELECT_1 + READY_IDLE, 2),
    "Describe statement, NoData": Case(
        lambda: [ext.EXPECT_DESCRIBE_STATEMENT, ext.EXPECT_SYNC], PARAMETER_DESCRIPTION + NO_DATA + READY_IDLE,
        PARAMETER_DESCRIPTION + NO_DATA + READY_IDLE, 1),
    "portal suspended, then run to the end": Case(
        lambda: [ext.EXPECT_BIND, ext.EXPECT_EXECUTE, ext.EXPECT_SYNC, ext.EXPECT_EXECUTE, ext.EXPECT_SYNC],
        BIND_COMPLETE + DATA_ROW + PORTAL_SUSPENDED + READY_IN_TX + DATA_ROW + SELECT_1 + READY_IN_TX,
        BIND_COMPLETE + DATA_ROW + PORTAL_SUSPENDED + READY_IN_TX + DATA_ROW + SELECT_1 + READY_IN_TX, 2,
        tx_status=ord("T")),
    "Execute of an empty query": Case(
        lambda: [ext.EXPECT_PARSE_UNNAMED, ext.EXPECT_BIND, ext.EXPECT_EXECUTE, ext.EXPECT_SYNC],
        PARSE_COMPLETE + BIND_COMPLETE + EMPTY_QUERY + READY_IDLE,
        PARSE_COMPLETE + BIND_COMPLETE + EMPTY_QUERY + READY_IDLE, 1),
    "error mid-pipeline: the rest up to Sync is skipped": Case(
        lambda: [ext.EXPECT_PARSE, ext.EXPECT_BIND, ext.EXPECT_DESCRIBE_PORTAL, ext.EXPECT_EXECUTE,
                 ext.EXPECT_CLOSE, ext.EXPECT_SYNC],
        PARSE_COMPLETE + BIND_COMPLETE + SYNTAX_ERROR + READY_IDLE,
        PARSE_COMPLETE + BIND_COMPLETE + SYNTAX_ERROR + READY_IDLE, 1,
        failed=[(DESCRIBE_PORTAL, FORWARD, True), (EXECUTE, FORWARD, False), (CLOSE, FORWARD, False)]),
    "error in the first Parse: nothing of it answered": Case(
        lambda: [ext.EXPECT_PARSE_UNNAMED, ext.EXPECT_BIND, ext.EXPECT_EXECUTE, ext.EXPECT_SYNC],
        SYNTAX_ERROR + READY_IDLE, SYNTAX_ERROR + READY_IDLE, 1,
        failed=[(PARSE, FORWARD, True), (BIND, FORWARD, False), (EXECUTE, FORWARD, False)]),
    "error in the first of two Syncs: the second runs": Case(
        lambda: [ext.EXPECT_BIND, ext.EXPECT_EXECUTE, ext.EXPECT_SYNC, ext.EXPECT_BIND, ext.EXPECT_EXECUTE,
                 ext.EXPECT_SYNC],
        BIND_COMPLETE + SYNTAX_ERROR + READY_IDLE + BIND_COMPLETE + DATA_ROW + SELECT_1 + READY_IDLE,
        BIND_COMPLETE + SYNTAX_ERROR + READY_IDLE + BIND_COMPLETE + DATA_ROW + SELECT_1 + READY_IDLE, 2,
        failed=[(EXECUTE, FORWARD, True)]),
    "error mid-pipeline in a transaction": Case(
        lambda: [ext.EXPECT_BIND, ext.EXPECT_EXECUTE, ext.EXPECT_SYNC],
        BIND_COMPLETE + SYNTAX_ERROR + READY_FAILED, BIND_COMPLETE + SYNTAX_ERROR + READY_FAILED, 1,
        tx_status=ord("E"), failed=[(EXECUTE, FORWARD, True)]),
    "the proxy's Close/Parse/Describe before the client's Bind: skipped": Case(
        check_records,
        CLOSE_COMPLETE + PARSE_COMPLETE + PARAMETER_DESCRIPTION + ROW_DESCRIPTION + BIND_COMPLETE + DATA_ROW
        + SELECT_1 + READY_IDLE,
        BIND_COMPLETE + DATA_ROW + SELECT_1 + READY_IDLE, 1),
    "the proxy's Parse fails: the client sees why, its Bind and Execute are skipped": Case(
        check_records, CLOSE_COMPLETE + SYNTAX_ERROR + READY_IDLE, SYNTAX_ERROR + READY_IDLE, 1,
        failed=[(PARSE, SWALLOW, True), (DESCRIBE_STATEMENT, SWALLOW, False), (BIND, FORWARD, False),
                (EXECUTE, FORWARD, False)]),
    "the proxy's quiet Close/Parse/Sync before DEALLOCATE: skipped": Case(
        lambda: [ext.EXPECT_CLOSE_QUIET, ext.EXPECT_PARSE_QUIET, ext.EXPECT_SYNC_QUIET, ext.EXPECT_QUERY],
        CLOSE_COMPLETE + PARSE_COMPLETE + READY_IDLE + msg(b"C", b"DEALLOCATE\x00") + READY_IDLE,
        msg(b"C", b"DEALLOCATE\x00") + READY_IDLE, 1),
    "the proxy's quiet requests fail: nothing of them reaches the client": Case(
        lambda: [ext.EXPECT_CLOSE_QUIET, ext.EXPECT_PARSE_QUIET, ext.EXPECT_SYNC_QUIET, ext.EXPECT_QUERY],
        SYNTAX_ERROR + READY_IDLE + msg(b"C", b"DEALLOCATE\x00") + READY_IDLE,
        msg(b"C", b"DEALLOCATE\x00") + READY_IDLE, 1,
        failed=[(CLOSE, QUIET, True), (PARSE, QUIET, False)]),
    "the proxy's DISCARD SEQUENCES before the client's query: skipped": Case(
        lambda: [Expectation(QUERY, SWALLOW), ext.EXPECT_QUERY],
        msg(b"C", b"DISCARD SEQUENCES\x00") + READY_IDLE + ROWS + READY_IDLE, ROWS + READY_IDLE, 1),
    "the proxy's settings reported while it is skipped: still reported": Case(
        lambda: [Expectation(QUERY, SWALLOW), ext.EXPECT_QUERY],
        TIMEZONE_UTC + msg(b"C", b"SET\x00") + READY_IDLE + ROWS + READY_IDLE,
        TIMEZONE_UTC + ROWS + READY_IDLE, 1, reported=[("TimeZone", "UTC")]),
    "a failure the proxy makes: the server's error replaced": Case(
        lambda: [Expectation(DESCRIBE_STATEMENT, REPLACE, payload=STALE), ext.EXPECT_EXECUTE, ext.EXPECT_SYNC],
        NO_STATEMENT + READY_IDLE, STALE + READY_IDLE, 1,
        failed=[(DESCRIBE_STATEMENT, REPLACE, True), (EXECUTE, FORWARD, False)]),
    "the proxy's CloseComplete for a client's Close, in its place": Case(
        lambda: [ext.EXPECT_BIND, CLOSE_INJECTED, ext.EXPECT_EXECUTE, ext.EXPECT_SYNC],
        BIND_COMPLETE + DATA_ROW + SELECT_1 + READY_IDLE,
        BIND_COMPLETE + CLOSE_COMPLETE + DATA_ROW + SELECT_1 + READY_IDLE, 1),
    "the proxy's CloseComplete first": Case(
        lambda: [CLOSE_INJECTED, ext.EXPECT_SYNC], READY_IDLE, CLOSE_COMPLETE + READY_IDLE, 1),
    "the proxy's CloseComplete skipped after an error, as the server's would be": Case(
        lambda: [ext.EXPECT_BIND, CLOSE_INJECTED, ext.EXPECT_SYNC], SYNTAX_ERROR + READY_IDLE,
        SYNTAX_ERROR + READY_IDLE, 1, failed=[(BIND, FORWARD, True), (CLOSE, INJECT, False)]),
    "COPY OUT": Case(
        lambda: [ext.EXPECT_QUERY], COPY_OUT_RESPONSE + COPY_DATA + COPY_DATA + COPY_DONE + COPY_1 + READY_IDLE,
        COPY_OUT_RESPONSE + COPY_DATA + COPY_DATA + COPY_DONE + COPY_1 + READY_IDLE, 1),
    "COPY IN started: the query still runs": Case(
        lambda: [ext.EXPECT_QUERY], COPY_IN_RESPONSE, COPY_IN_RESPONSE, 0, left=1),
    "COPY IN finished": Case(
        lambda: [ext.EXPECT_QUERY], COPY_IN_RESPONSE + COPY_1 + READY_IDLE, COPY_IN_RESPONSE + COPY_1 + READY_IDLE, 1),
    "COPY IN failed by the client": Case(
        lambda: [ext.EXPECT_QUERY], COPY_IN_RESPONSE + error(b"57014", b"COPY from stdin failed: no") + READY_IDLE,
        COPY_IN_RESPONSE + error(b"57014", b"COPY from stdin failed: no") + READY_IDLE, 1),
    "COPY IN by Execute": Case(
        lambda: [ext.EXPECT_PARSE_UNNAMED, ext.EXPECT_BIND, ext.EXPECT_EXECUTE, ext.EXPECT_SYNC],
        PARSE_COMPLETE + BIND_COMPLETE + COPY_IN_RESPONSE + COPY_1 + READY_IDLE,
        PARSE_COMPLETE + BIND_COMPLETE + COPY_IN_RESPONSE + COPY_1 + READY_IDLE, 1),
    "COPY OUT by Execute": Case(
        lambda: [ext.EXPECT_BIND, ext.EXPECT_EXECUTE, ext.EXPECT_SYNC],
        BIND_COMPLETE + COPY_OUT_RESPONSE + COPY_DATA + COPY_DONE + COPY_1 + READY_IDLE,
        BIND_COMPLETE + COPY_OUT_RESPONSE + COPY_DATA + COPY_DONE + COPY_1 + READY_IDLE, 1),
    "COPY BOTH started": Case(
        lambda: [ext.EXPECT_QUERY], COPY_BOTH_RESPONSE + COPY_DATA, COPY_BOTH_RESPONSE + COPY_DATA, 0, left=1),
    "notice and notification mid-pipeline": Case(
        lambda: [ext.EXPECT_PARSE, ext.EXPECT_BIND, ext.EXPECT_EXECUTE, ext.EXPECT_SYNC],
        PARSE_COMPLETE + NOTICE + BIND_COMPLETE + OTHER_NOTIFY + DATA_ROW + NOTICE + SELECT_1 + READY_IDLE
        + OTHER_NOTIFY,
        PARSE_COMPLETE + NOTICE + BIND_COMPLETE + OTHER_NOTIFY + DATA_ROW + NOTICE + SELECT_1 + READY_IDLE
        + OTHER_NOTIFY, 1),
    "notice amid the proxy's skipped replies: passed": Case(
        check_records,
        CLOSE_COMPLETE + NOTICE + PARSE_COMPLETE + PARAMETER_DESCRIPTION + ROW_DESCRIPTION + BIND_COMPLETE
        + SELECT_1 + READY_IDLE,
        NOTICE + BIND_COMPLETE + SELECT_1 + READY_IDLE, 1),
    "the client's own notification: the pid it knows": Case(
        lambda: [ext.EXPECT_QUERY], msg(b"C", b"NOTIFY\x00") + OWN_NOTIFY + READY_IDLE,
        msg(b"C", b"NOTIFY\x00") + OWN_NOTIFY_AS_CLIENT_SEES_IT + READY_IDLE, 1),
    "notification while nothing runs": Case(lambda: [], OTHER_NOTIFY + OWN_NOTIFY,
                                            OTHER_NOTIFY + OWN_NOTIFY_AS_CLIENT_SEES_IT, 0),
    "ParameterStatus anywhere": Case(
        lambda: [ext.EXPECT_QUERY, ext.EXPECT_BIND, ext.EXPECT_EXECUTE, ext.EXPECT_SYNC],
        APP_NAME + msg(b"C", b"SET\x00") + TIMEZONE_UTC + READY_IDLE + BIND_COMPLETE + APP_NAME + SELECT_1
        + READY_IDLE,
        APP_NAME + msg(b"C", b"SET\x00") + TIMEZONE_UTC + READY_IDLE + BIND_COMPLETE + APP_NAME + SELECT_1
        + READY_IDLE, 2,
        reported=[("application_name", "batch"), ("TimeZone", "UTC"), ("application_name", "batch")]),
    "the server ends the session": Case(lambda: [ext.EXPECT_QUERY], SHUTDOWN, SHUTDOWN, 0, left=1,
                                        ended_by_server=True),
    "a plain error does not end it": Case(lambda: [], SYNTAX_ERROR, SYNTAX_ERROR, 0),
    "a notice that quotes FATAL does not end it": Case(
        lambda: [], msg(b"N", b"SWARNING\x00VWARNING\x00MVFATAL\x00\x00"),
        msg(b"N", b"SWARNING\x00VWARNING\x00MVFATAL\x00\x00"), 0),
}


def cuts(size: int) -> Iterator[list[int]]:
    """Where to cut the server's bytes: not at all, at each offset, and one byte at a time."""
    yield []
    for offset in range(1, size):
        yield [offset]
    yield list(range(1, size))


def run(case: Case, offsets: list[int]) -> tuple[ReplyMatcher, bytes, int, list[tuple[int, int, bool]],
                                                  list[tuple[str, str]]]:
    matcher = ReplyMatcher()
    matcher.reset(CLIENT_PID)
    matcher.server_pid = SERVER_PID
    matcher.expect.extend(case.expect())
    out = b""
    ready = 0
    failed: list[tuple[int, int, bool]] = []
    reported: list[tuple[str, str]] = []
    bounds = [0, *offsets, len(case.server)]
    for start, stop in pairwise(bounds):
        out += matcher.feed(case.server[start:stop])
        assert matcher.eventful == bool(matcher.failed or matcher.reported or matcher.resume or matcher.trouble)
        matcher.trouble = ""
        ready += matcher.ready
        failed += [(e.kind, e.action, failing) for e, failing in matcher.failed]
        reported += matcher.reported
        matcher.failed.clear()
        matcher.reported.clear()
    return matcher, out, ready, failed, reported


@pytest.mark.parametrize("name", list(CASES))
def test_reply_table(name: str) -> None:
    case = CASES[name]
    for offsets in cuts(len(case.server)):
        matcher, out, ready, failed, reported = run(case, offsets)
        where = f"cut at {offsets}"
        assert out == case.client, where
        assert ready == case.ready, where
        assert matcher.tx_status == case.tx_status, where
        assert len(matcher.expect) == case.left, where
        assert failed == case.failed, where
        assert reported == case.reported, where
        assert matcher.ended_by_server == case.ended_by_server, where
        assert matcher.at_boundary, where


def test_unsplit_replies_are_passed_as_they_came() -> None:
    """The hot path: when every reply passes, the client gets the very bytes object read (no copy)."""
    matcher = ReplyMatcher()
    matcher.expect.append(ext.EXPECT_QUERY)
    data = ROWS + READY_IDLE
    assert matcher.feed(data) is data


def test_half_a_message_is_passed_at_once_and_the_boundary_waits() -> None:
    matcher = ReplyMatcher()
    matcher.expect.extend([ext.EXPECT_QUERY])
    cut = len(ROW_DESCRIPTION) + 7  # the DataRow's header and two bytes of its body
    assert matcher.feed(ROWS[:cut]) == ROWS[:cut]
    assert not matcher.at_boundary
    assert matcher.feed(ROWS[cut:]) == ROWS[cut:]
    assert matcher.at_boundary
    assert matcher.feed(READY_IDLE[:3]) == b""  # a header is read whole before anything of it passes
    assert not matcher.at_boundary and matcher.ready == 0
    assert matcher.feed(READY_IDLE[3:]) == READY_IDLE
    assert matcher.ready == 1 and not matcher.expect


def test_copy_in_waits_for_the_client() -> None:
    """CopyInResponse passes and the query stays expected until the server ends it after the client's data."""
    matcher = ReplyMatcher()
    matcher.expect.append(ext.EXPECT_QUERY)
    assert matcher.feed(COPY_IN_RESPONSE) == COPY_IN_RESPONSE
    assert list(matcher.expect) == [ext.EXPECT_QUERY] and matcher.ready == 0 and matcher.at_boundary
    assert matcher.feed(COPY_1 + READY_IDLE) == COPY_1 + READY_IDLE
    assert not matcher.expect and matcher.ready == 1


@pytest.mark.parametrize("offsets", list(cuts(len(CLOSE_COMPLETE + PARSE_COMPLETE + PARAMETER_DESCRIPTION
                                                      + ROW_DESCRIPTION))))
def test_check_records_the_description_and_resumes(offsets: list[int]) -> None:
    """The proxy's own Parse + Describe of a statement: the description is kept, the held client resumes."""
    record = Prepared(b"SELECT $1::int\x00\x00\x01\x00\x00\x00\x17")
    case = Case(lambda: [ext.EXPECT_CLOSE_SWALLOW, Expectation(PARSE, SWALLOW, record=record),
                         Expectation(DESCRIBE_STATEMENT, SWALLOW, record=record, resume=True)],
                CLOSE_COMPLETE + PARSE_COMPLETE + PARAMETER_DESCRIPTION + ROW_DESCRIPTION, b"", 0)
    matcher = ReplyMatcher()
    matcher.expect.extend(case.expect())
    bounds = [0, *offsets, len(case.server)]
    out = b""
    resumed = 0
    for start, stop in pairwise(bounds):
        out += matcher.feed(case.server[start:stop])
        resumed += matcher.resume
    assert out == b"" and resumed == 1 and not matcher.expect
    assert record.parameters == PARAMETER_DESCRIPTION
    # the RowDescription without the table and column its value came from
    shape = b"\x00\x01" b"n\x00" b"\x00\x00\x00\x17" b"\x00\x04" b"\xff\xff\xff\xff" b"\x00\x00"
    assert record.description == PARAMETER_DESCRIPTION + shape
    assert record.error is None


def test_failed_check_records_the_error_and_the_skipped() -> None:
    parse = Prepared(b"SELECT nope\x00\x00\x00")
    described = Prepared(b"SELECT nope\x00\x00\x00")
    second = Prepared(b"SELECT 2\x00\x00\x00")
    matcher = ReplyMatcher()
    matcher.expect.extend([Expectation(PARSE, SWALLOW, record=parse),
                           Expectation(DESCRIBE_STATEMENT, SWALLOW, record=described, resume=True),
                           Expectation(DESCRIBE_STATEMENT, TRACK, record=second), ext.EXPECT_SYNC])
    assert matcher.feed(SYNTAX_ERROR + READY_IDLE) == SYNTAX_ERROR + READY_IDLE
    assert parse.error == SYNTAX_ERROR and described.error is SKIPPED and second.error is SKIPPED
    assert matcher.resume and matcher.ready == 1
    assert [failing for _, failing in matcher.failed] == [True, False, False]


def test_describe_tracked_for_the_client_is_passed_and_kept() -> None:
    shown = Prepared(b"")
    matcher = ReplyMatcher()
    matcher.expect.extend([Expectation(DESCRIBE_STATEMENT, TRACK, record=shown), ext.EXPECT_SYNC])
    data = PARAMETER_DESCRIPTION + NO_DATA + READY_IDLE
    out = b"".join(matcher.feed(data[i : i + 1]) for i in range(len(data)))
    assert out == data and shown.description == PARAMETER_DESCRIPTION + NO_DATA and matcher.at_boundary


def test_an_error_is_read_whole_unless_it_is_huge() -> None:
    """A FATAL split anywhere is still seen as the end of the session; a client's RAISE of megabytes streams."""
    matcher = ReplyMatcher()
    assert matcher.feed(SHUTDOWN[:12]) == b""
    assert matcher.feed(SHUTDOWN[12:]) == SHUTDOWN and matcher.ended_by_server
    huge = error(b"P0001", b"x" * (WHOLE_ERROR_LIMIT + 1))
    matcher = ReplyMatcher()
    matcher.expect.append(ext.EXPECT_QUERY)
    assert matcher.feed(huge[:1000]) == huge[:1000]
    assert matcher.feed(huge[1000:] + READY_IDLE) == huge[1000:] + READY_IDLE
    assert matcher.ready == 1 and not matcher.ended_by_server and matcher.at_boundary


def test_a_length_below_four_is_refused() -> None:
    matcher = ReplyMatcher()
    with pytest.raises(ProtocolViolation, match="length 3"):
        matcher.feed(b"C\x00\x00\x00\x03")


def test_reset_forgets_the_previous_client() -> None:
    matcher = ReplyMatcher()
    matcher.expect.append(ext.EXPECT_QUERY)
    matcher.feed(ROWS[:10])
    matcher.reset(CLIENT_PID)
    assert matcher.at_boundary and not matcher.expect


def test_a_notification_too_short_for_a_process_id_passes_as_sent() -> None:
    matcher = ReplyMatcher()
    matcher.reset(CLIENT_PID)
    matcher.server_pid = SERVER_PID
    short = b"A\x00\x00\x00\x04"  # malformed: no process id, channel or payload
    ready = b"Z\x00\x00\x00\x05I"
    assert matcher.feed(short + ready) == short + ready
