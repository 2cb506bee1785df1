"""Unit tables for session state: SQL classification, statement command rewrites, OK stripping, the LRU cache."""

from __future__ import annotations

import struct

import pytest

from proxy.protocol.mysql import constants as c
from proxy.protocol.mysql.packets import OkPacket, ResponseTracker, frame, strip_session_state
from proxy.protocol.mysql.statements import BULK_TYPES_AT, bound_flag_at, head_with_types, relabelled_head
from proxy.session.mysql_inspect import (
    ANY,
    FORWARD,
    FOUND_ROWS,
    GLOBAL_READ_LOCK,
    HANDLER,
    NAMED_LOCK,
    NO_NAME,
    SET_STATEMENT,
    SQL_PREPARE,
    TABLE_LOCK,
    TEMPORARY_TABLE,
    USER_VARIABLE,
    XA_TRANSACTION,
    QueryEffect,
    inspect_query,
    prepared_effect,
)
from proxy.session.mysql_statements import StatementCache

TRACK = c.CLIENT_PROTOCOL_41 | c.CLIENT_SESSION_TRACK


def effect_of(sql: str, tracking: bool = False) -> QueryEffect | None:
    inspection = inspect_query(sql.encode(), True, tracking)
    assert inspection.action == FORWARD
    return inspection.query_effect


@pytest.mark.parametrize("sql", [
    "SELECT 1", "SELECT @x, @@sql_mode", "INSERT INTO t VALUES ('a@b.c')", "SET autocommit = 0", "SET GLOBAL x = 1",
    "SET PASSWORD = PASSWORD('x')", "EXECUTE s", "DROP DATABASE d", "FLUSH TABLES", "BEGIN", "SET DEFAULT ROLE r",
])
def test_statements_without_session_effect(sql: str) -> None:
    assert effect_of(sql) is None


@pytest.mark.parametrize(("sql", "settings", "user_vars"), [
    ("SET sql_mode = 'ANSI'", [("sql_mode", b"@@SESSION.sql_mode='ANSI'", True)], []),
    ("SET SESSION time_zone='+01:00', @@local.wait_timeout = 10",
     [("time_zone", b"@@SESSION.time_zone='+01:00'", True), ("wait_timeout", b"@@SESSION.wait_timeout=10", True)],
     []),
    ("SET NAMES utf8mb4 COLLATE utf8mb4_bin", [("character set", b"NAMES utf8mb4 COLLATE utf8mb4_bin", True)], []),
    ("set character set latin1", [("character set", b"character set latin1", True)], []),
    ("SET sql_mode = CONCAT(@@sql_mode, ',A')", [("sql_mode", b"@@SESSION.sql_mode=CONCAT(@@sql_mode, ',A')", False)],
     []),
    ("SET @x = 1, @`Y` := 'it''s', @z = NULL", [], [(b"x", b"1"), (b"`y`", b"'it''s'"), (b"z", b"NULL")]),
    ("SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED",
     [("session transaction", b"SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED", True)], []),
    ("SET ROLE admin", [("role", b"ROLE admin", True)], []),
    ("SET GLOBAL a = 1, time_zone = SYSTEM", [("time_zone", b"@@SESSION.time_zone=SYSTEM", True)], []),
])
def test_tracked_sets(sql: str, settings: list[tuple[str, bytes, bool]], user_vars: list[tuple[bytes, bytes]]) -> None:
    effect = effect_of(sql)
    assert effect is not None and effect.pin is None
    assert effect.settings == settings and effect.user_vars == user_vars


@pytest.mark.parametrize(("sql", "reason", "names"), [
    ("CREATE TEMPORARY TABLE t1 (a int)", TEMPORARY_TABLE, {b"t1"}),
    ("create or replace temporary table if not exists `d`.`t 2` (a int)", TEMPORARY_TABLE, {b"d.t 2"}),
    ("LOCK TABLES t READ", TABLE_LOCK, {NO_NAME}),
    ("FLUSH TABLES WITH READ LOCK", GLOBAL_READ_LOCK, {NO_NAME}),
    ("FLUSH TABLES t FOR EXPORT", GLOBAL_READ_LOCK, {NO_NAME}),
    ("SELECT GET_LOCK('a', 1), GET_LOCK(\"b\", 2)", NAMED_LOCK, {b"a", b"b"}),
    ("DO GET_LOCK(CONCAT('a', 1), 0)", NAMED_LOCK, {ANY}),
    ("PREPARE s1 FROM 'SELECT 1'", SQL_PREPARE, {b"s1"}),
    ("HANDLER t OPEN AS h", HANDLER, {b"h"}),
    ("XA START 'x'", XA_TRANSACTION, {NO_NAME}),
    ("SELECT SQL_CALC_FOUND_ROWS * FROM t LIMIT 1", FOUND_ROWS, {NO_NAME}),
    ("SELECT 1 INTO @y", USER_VARIABLE, {ANY}),
    ("SELECT @n := @n + 1 FROM t", USER_VARIABLE, {ANY}),
    ("SET @x = @y + 1", USER_VARIABLE, {NO_NAME}),
    ("CALL p(@out)", USER_VARIABLE, {ANY}),
    ("SET ROLE NONE, @@x = 1", SET_STATEMENT, {NO_NAME}),
    ("SELECT 1; SET @x = 2", USER_VARIABLE, {ANY}),
])
def test_pinning_statements(sql: str, reason: str, names: set[bytes]) -> None:
    effect = effect_of(sql)
    assert effect is not None and effect.pin == reason and effect.pin_names == names


@pytest.mark.parametrize(("sql", "unpins"), [
    ("DROP TEMPORARY TABLE IF EXISTS t1, d.t2", [(TEMPORARY_TABLE, {b"t1", b"d.t2"})]),
    ("DROP TABLE `t1`", [(TEMPORARY_TABLE, {b"t1"})]),
    ("UNLOCK TABLES", [(TABLE_LOCK, None), (GLOBAL_READ_LOCK, None)]),
    ("SELECT RELEASE_LOCK('a')", [(NAMED_LOCK, {b"a"})]),
    ("DO RELEASE_ALL_LOCKS()", [(NAMED_LOCK, None)]),
    ("DEALLOCATE PREPARE s1", [(SQL_PREPARE, {b"s1"})]),
    ("DROP PREPARE s1", [(SQL_PREPARE, {b"s1"})]),
    ("HANDLER h CLOSE", [(HANDLER, {b"h"})]),
    ("XA COMMIT 'x'", [(XA_TRANSACTION, None)]),
])
def test_statements_ending_pins(sql: str, unpins: list[tuple[str, set[bytes] | None]]) -> None:
    effect = effect_of(sql)
    assert effect is not None and effect.pin is None
    assert effect.unpins == unpins


def test_other_session_effects() -> None:
    effect = effect_of("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE")
    assert effect is not None and effect.hold_next and effect.pin is None
    effect = effect_of("SET STATEMENT max_statement_time = 1 FOR SELECT 1")
    assert effect is not None and effect.transient and not effect.settings
    effect = effect_of("USE `my db`")
    assert effect is not None and effect.schema == "my db"
    effect = effect_of("SELECT LAST_INSERT_ID()")
    assert effect is not None and effect.insert_id and not effect.tracked
    effect = effect_of("SET @a = 1; SELECT 2")
    assert effect is not None and effect.pin == USER_VARIABLE
    without, tracked = effect_of("SET sql_mode = ''; SELECT 1"), effect_of("SET sql_mode = ''; SELECT 1", True)
    assert without is not None and without.pin == SET_STATEMENT
    assert tracked is None  # the server's session state reports say what it set


def test_drivers_turning_on_session_tracking() -> None:
    effect = effect_of("set autocommit=1,session_track_schema=1,sql_mode = concat(@@sql_mode,',STRICT_TRANS_TABLES')")
    assert effect is not None and effect.pin is None and effect.retrack
    assert effect.settings == [("sql_mode", b"@@SESSION.sql_mode=concat(@@sql_mode,',STRICT_TRANS_TABLES')", False)]


def test_prepared_set_with_parameters() -> None:
    assert prepared_effect(effect_of("SET time_zone = ?"), True).settings == []  # type: ignore[union-attr]
    effect = prepared_effect(effect_of("SET time_zone = ?"), False)
    assert effect is not None and effect.pin == SET_STATEMENT and effect.settings == []
    effect = prepared_effect(effect_of("SET @v = ?"), True)
    assert effect is not None and effect.pin == USER_VARIABLE


# --- statement commands ---


def execute(statement: int, types: bytes | None, values: bytes, params: int, flags: int = 0) -> bytes:
    body = struct.pack("<BIBI", c.COM_STMT_EXECUTE, statement, flags, 1)
    if params:
        body += b"\x00" * ((params + 7) // 8) + (b"\x01" + types if types is not None else b"\x00")
    return frame(body + values)


def test_relabel_and_insert_types() -> None:
    sent = execute(7, None, struct.pack("<qq", 1, 2), 2)
    assert relabelled_head(sent, 0, 0x01020304) == sent[:5] + b"\x04\x03\x02\x01"
    types = b"\x08\x00\x08\x00"
    flag_at = bound_flag_at(2)
    head = head_with_types(sent, 0, len(sent) - 4, 99, flag_at, types)
    assert head + sent[4 + flag_at + 1 :] == execute(99, types, struct.pack("<qq", 1, 2), 2)


def test_bulk_execute_types() -> None:
    values = b"\x00" + struct.pack("<q", 5)  # indicator + value
    sent = frame(struct.pack("<BIH", c.COM_STMT_BULK_EXECUTE, 3, 64) + values)
    head = head_with_types(sent, 0, len(sent) - 4, 8, BULK_TYPES_AT, b"\x08\x00")
    assert head + sent[4 + BULK_TYPES_AT :] == frame(struct.pack("<BIH", c.COM_STMT_BULK_EXECUTE, 8, 64 | 128)
                                                     + b"\x08\x00" + values)


# --- session state on the wire ---

STATE = b"\x00\x0c\x09time_zone\x01+"  # SYSTEM_VARIABLES entry: time_zone = '+'


@pytest.mark.parametrize(("ok", "stripped"), [
    (OkPacket(0, 0, 0x4002, 0, "", STATE), OkPacket(0, 0, 0x0002, 0, "")),
    (OkPacket(3, 9, 0x4003, 1, "Rows matched: 3", STATE), OkPacket(3, 9, 0x0003, 1, "Rows matched: 3")),
    (OkPacket(0, 0, 0x4002, 0, "", STATE, 0xFE), OkPacket(0, 0, 0x0002, 0, "", None, 0xFE)),
])
def test_strip_session_state(ok: OkPacket, stripped: OkPacket) -> None:
    # the server writes the info length-encoded with or without tracking; only the state info goes
    assert strip_session_state(ok.build(TRACK)) == stripped.build(TRACK)


def test_tracker_collects_state_and_notes_packets_to_strip() -> None:
    tracker = ResponseTracker()
    tracker.session_track = True
    tracker.strip_session_state = True
    ok = OkPacket(0, 0, 0x4002, 0, "", STATE).build(TRACK)
    data = frame(ok, 1)
    tracker.start(c.COM_QUERY, True)
    assert tracker.scan(data, 0, len(data), stream=True) == len(data) and tracker.done
    assert tracker.session_state == [STATE]
    assert tracker.edits == [(4, len(ok))]
    tracker.start(c.COM_STMT_PREPARE, True)
    prepare_ok = frame(b"\x00" + struct.pack("<IHHBH", 77, 0, 0, 0, 0), 1)
    tracker.scan(prepare_ok, 0, len(prepare_ok), stream=True)
    assert tracker.done and tracker.prepare_ok is not None and tracker.prepare_ok.statement_id == 77
    assert tracker.prepare_ok_at == 4 and tracker.session_state is None


# --- a backend's statements ---


def test_statement_cache_is_an_lru_with_a_cap() -> None:
    cache = StatementCache(3)
    for key in (1, 2, 3):
        assert cache.make_room() == b""
        cache.add(bytes((key,)), key * 10)
    assert cache.get(b"\x01") is not None  # 1 is now the most recently used
    cache.entries[b"\x02"].held = 1  # a cursor of it is open: not closed
    assert cache.make_room() == frame(struct.pack("<BI", c.COM_STMT_CLOSE, 30))
    assert list(cache.entries) == [b"\x02", b"\x01"]
    cache.add(b"\x04", 40)
    assert cache.add(b"\x04", 41).statement_id == 40  # a second prepare of the same key is closed later
    assert cache.take_closes() == frame(struct.pack("<BI", c.COM_STMT_CLOSE, 41))
    cache.preparing = 1
    assert cache.make_room() == frame(struct.pack("<BI", c.COM_STMT_CLOSE, 10)) + frame(
        struct.pack("<BI", c.COM_STMT_CLOSE, 40))
    assert list(cache.entries) == [b"\x02"]


def test_statement_keys() -> None:
    from proxy.session.mysql_service import MySQLService

    key = MySQLService.statement_key("app", b"", b"SELECT ?")
    assert len(key) == 16 and key == MySQLService.statement_key("app", b"", b"SELECT ?")
    assert key != MySQLService.statement_key("app2", b"", b"SELECT ?")
    assert key != MySQLService.statement_key("app", b"sql_mode\x01'ANSI'", b"SELECT ?")
