"""The replay recorder (bytes in, digest out), the read classifier and the judgment of a lost transaction."""

from __future__ import annotations

import hashlib

import pytest

from proxy.protocol.pg import extended as ext
from proxy.protocol.pg import messages as pg
from proxy.protocol.pg.replies import ReplyMatcher
from proxy.session.pg_replay_rules import (
    NOTHING,
    REPLAY,
    ROLLED_BACK,
    UNKNOWN,
    is_read,
    judge,
    split_messages,
)
from proxy.session.replay_log import ReplayCheck, ReplayLog


def test_the_log_keeps_messages_and_a_digest_of_replies_until_reset() -> None:
    log = ReplayLog(100)
    log.record(b"abc")
    log.record(b"def")
    log.sent(b"reply one")
    log.sent(b" and two")
    assert log.messages == b"abcdef" and log.replayable and log.size == 6
    assert log.sent_bytes == 17 and log.sent_digest() == hashlib.sha256(b"reply one and two").digest()
    log.reset()
    assert log.messages == b"" and log.sent_bytes == 0 and log.sent_digest() == hashlib.sha256().digest()


def test_over_the_limit_the_transaction_is_not_replayable_until_reset() -> None:
    log = ReplayLog(10)
    log.record(b"12345")
    log.record(b"678901")
    assert not log.replayable and log.messages == b""
    log.record(b"1")
    assert not log.replayable and log.messages == b""
    log.reset()
    log.record(b"1234567890")
    assert log.replayable and log.messages == b"1234567890"
    log.spoil()
    assert not log.replayable


def test_a_check_hashes_the_prefix_and_passes_the_rest() -> None:
    log = ReplayLog(100)
    log.sent(b"hello ")
    log.sent(b"world")
    check = log.replay_check()
    assert log.sent_bytes == 0  # the replay's replies are counted anew
    assert check.feed(b"hel") == b"" and not check.done
    assert check.feed(b"lo wor") == b"" and not check.done
    assert check.feed(b"ld, and more") == b", and more" and check.done and check.matches
    assert check.feed(b"!") == b"!"
    other = ReplayCheck(hashlib.sha256(b"hello world").digest(), 11)
    assert other.feed(b"hello_world...") == b"..." and other.done and not other.matches
    empty = ReplayCheck(hashlib.sha256().digest(), 0)
    assert empty.done and empty.matches and empty.feed(b"x") == b"x"


@pytest.mark.parametrize("text", [
    b"SELECT 1", b"  select * from t where a = 'insert into'", b"SHOW search_path", b"VALUES (1), (2)",
    b"TABLE t", b"WITH a AS (SELECT 1) SELECT * FROM a", b"select $$delete$$, 'update' -- into\n",
    b"SELECT now(); SELECT 2",
])
def test_reads(text: bytes) -> None:
    assert is_read(text)


@pytest.mark.parametrize("text", [
    b"INSERT INTO t VALUES (1)", b"UPDATE t SET a = 1", b"DELETE FROM t", b"SELECT nextval('s')",
    b"SELECT setval('s', 1)", b"SELECT pg_advisory_lock(1)", b"SELECT txid_current()", b"SELECT 1 INTO x",
    b"WITH d AS (DELETE FROM t RETURNING *) SELECT * FROM d", b"WITH m AS (SELECT 1) MERGE INTO t USING m ON true "
    b"WHEN MATCHED THEN DELETE", b"SELECT 1; INSERT INTO t VALUES (1)", b"COPY t FROM STDIN", b"CALL p()",
    b"SELECT * FROM t FOR UPDATE", b"", b"BEGIN", b"COMMIT",
])
def test_not_reads(text: bytes) -> None:
    assert not is_read(text)


def query(sql: bytes) -> bytes:
    return pg.message(b"Q", sql + b"\x00")


def extended(sql: bytes, name: bytes = b"") -> bytes:
    return (ext.build_parse(name, sql + b"\x00\x00\x00") + ext.build_bind(b"", name, b"\x00\x00\x00\x00\x00\x00")
            + pg.message(b"E", b"\x00\x00\x00\x00\x00") + ext.SYNC_MESSAGE)


def no_statements(name: bytes) -> bytes | None:
    return None


def test_judging_a_loss() -> None:
    transaction = query(b"BEGIN") + query(b"INSERT INTO t VALUES (1)")
    # idle, nothing in flight
    assert judge(b"", 0, True, no_statements).plan == NOTHING
    # inside a transaction, a write in flight: replay; nothing answered yet of the write
    loss = judge(transaction, 1, False, no_statements)
    assert (loss.plan, loss.owed, loss.in_transaction) == (REPLAY, 1, True)
    # idle inside a transaction: replay, nothing owed
    loss = judge(transaction, 2, False, no_statements)
    assert (loss.plan, loss.owed) == (REPLAY, 0)
    # COMMIT in flight: unknown
    assert judge(transaction + query(b"COMMIT"), 2, False, no_statements).plan == UNKNOWN
    assert judge(transaction + extended(b"end"), 2, False, no_statements).plan == UNKNOWN
    # a whole transaction in one Query, in autocommit: unknown
    assert judge(query(b"BEGIN; INSERT INTO t VALUES (1); COMMIT"), 0, True, no_statements).plan == UNKNOWN
    # autocommit: a read is replayed, a write is not
    assert judge(extended(b"SELECT 1"), 0, True, no_statements).plan == REPLAY
    assert judge(extended(b"INSERT INTO t VALUES (1)"), 0, True, no_statements).plan == UNKNOWN
    # BEGIN then a write in flight together: nothing can have committed
    assert judge(query(b"BEGIN") + extended(b"INSERT INTO t VALUES (1)"), 0, True, no_statements).plan == REPLAY
    # a Bind of a statement prepared earlier: its text decides; unknown text: unknown
    bind = ext.build_bind(b"", b"s1", b"\x00\x00\x00\x00\x00\x00") + pg.message(b"E", b"\x00" * 5) + ext.SYNC_MESSAGE
    assert judge(bind, 0, True, lambda name: b"SELECT 1" if name == b"s1" else None).plan == REPLAY
    assert judge(bind, 0, True, no_statements).plan == UNKNOWN
    # an extended batch without its Sync yet; a message not complete yet
    loss = judge(transaction + ext.build_parse(b"", b"SELECT 1\x00\x00\x00"), 2, False, no_statements)
    assert loss.plan == REPLAY and loss.open_batch and loss.owed == 0
    loss = judge(transaction + query(b"SELECT 1")[:7], 2, False, no_statements)
    assert loss.plan == REPLAY and loss.tail == query(b"SELECT 1")[:7]
    loss = judge(transaction + extended(b"SELECT 1", name=b"s2"), 2, False, no_statements)
    assert loss.plan == REPLAY and loss.parsed == [b"s2"] and loss.owed == 1
    assert ROLLED_BACK != REPLAY


def test_split_messages() -> None:
    data = query(b"SELECT 1") + ext.SYNC_MESSAGE + b"Q\x00\x00"
    messages, tail = split_messages(data)
    assert [kind for kind, _ in messages] == [ord("Q"), ord("S")] and tail == b"Q\x00\x00"


def test_a_shutdown_fatal_is_withheld_from_a_recovered_client() -> None:
    fatal = pg.error_response("57P01", "terminating connection due to administrator command", "FATAL")
    other = pg.error_response("XX000", "something else", "FATAL")
    matcher = ReplyMatcher()
    matcher.expect.append(ext.EXPECT_QUERY)
    matcher.withhold_shutdown = True
    row = pg.message(b"D", b"\x00\x01\x00\x00\x00\x011")
    assert matcher.feed(row + fatal[:9]) == row
    assert matcher.feed(fatal[9:]) == b"" and matcher.shut_down and not matcher.ended_by_server
    matcher = ReplyMatcher()
    matcher.withhold_shutdown = True
    assert matcher.feed(other) == other and matcher.ended_by_server and not matcher.shut_down
    matcher = ReplyMatcher()
    assert matcher.feed(fatal) == fatal and matcher.ended_by_server
