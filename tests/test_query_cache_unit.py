"""The query cache's pure parts: statement analysis, rules and hints, the PostgreSQL reply capture, the LRU."""

from __future__ import annotations

import pytest

from proxy.cache.analysis import EVERYTHING, Analyzer, plain_select
from proxy.cache.keys import base_key
from proxy.cache.pg_batch import unnamed_batch
from proxy.cache.pg_replies import PgReplyCapture
from proxy.cache.rules import CachePolicy
from proxy.cache.store_local import LocalStore
from proxy.config import CacheRule
from proxy.protocol.pg import extended as ext
from proxy.protocol.pg import messages as pg
from proxy.sql_digest import Digester
from proxy.stats import StatsRegistry

CACHEABLE = [
    ("postgresql", "SELECT count(*) FROM t JOIN s.u ON true", {"t", "u"}),
    ("postgresql", "SELECT abalance FROM pgbench_accounts WHERE aid = 5", {"pgbench_accounts"}),
    ("postgresql", "SELECT lower(name), coalesce(a, 1) FROM t /* dbproxy:cache ttl=30 */", {"t"}),
    ("mysql", "SELECT * FROM d.t WHERE a = 1", {"t"}),
]
NEVER_CACHED = [  # (engine, statement, tables it writes)
    ("postgresql", "SELECT now(), count(*) FROM t", set()),
    ("postgresql", "SELECT random() FROM t", set()),
    ("postgresql", "SELECT current_user, a FROM t", set()),
    ("postgresql", "SELECT gen_random_uuid()", set()),
    ("postgresql", "SELECT * FROM t FOR UPDATE", set()),
    ("postgresql", "SELECT * FROM pg_class", set()),
    ("postgresql", "SELECT 1; SELECT 2", set()),
    ("postgresql", "SELECT nextval('s')", {EVERYTHING}),
    ("postgresql", "SELECT my_function(a) FROM t", {EVERYTHING}),
    ("postgresql", "INSERT INTO t VALUES (1)", {"t"}),
    ("postgresql", "UPDATE t SET a = 1 FROM u", {"t", "u"}),
    ("postgresql", "DELETE FROM s.t WHERE a = 1", {"t"}),
    ("postgresql", "TRUNCATE t, u", {"t", "u"}),
    ("postgresql", "CREATE TABLE z (a int)", {"z"}),
    ("postgresql", "ALTER TABLE z ADD b int", {"z"}),
    ("postgresql", "DROP TABLE z", {"z"}),
    ("postgresql", "COPY t FROM STDIN", {"t"}),
    ("postgresql", "WITH x AS (DELETE FROM t RETURNING *) SELECT * FROM x", {"t", "x", EVERYTHING}),
    ("postgresql", "EXPLAIN ANALYZE DELETE FROM t", {EVERYTHING}),
    ("postgresql", "DO $$ BEGIN DELETE FROM t; END $$", {EVERYTHING}),
    ("postgresql", "BEGIN", set()),
    ("postgresql", "SET search_path = x", set()),
    ("postgresql", "this is not sql", {EVERYTHING}),
    ("mysql", "SELECT NOW(), UUID(), RAND()", set()),
    ("mysql", "SELECT @x FROM t", set()),
    ("mysql", "REPLACE INTO t VALUES (1)", {EVERYTHING}),
    ("mysql", "INSERT INTO t SELECT * FROM u", {"t", "u"}),
    ("mysql", "LOAD DATA LOCAL INFILE 'f' INTO TABLE t", {EVERYTHING}),
    ("mysql", "SHOW TABLES", set()),
]


@pytest.mark.parametrize(("engine", "sql", "tables"), CACHEABLE)
def test_cacheable_reads(engine: str, sql: str, tables: set[str]) -> None:
    found = Analyzer(engine).analyse(sql.encode())
    assert found.cacheable and found.tables == tables and not found.writes


@pytest.mark.parametrize(("engine", "sql", "writes"), NEVER_CACHED)
def test_statements_never_cached(engine: str, sql: str, writes: set[str]) -> None:
    found = Analyzer(engine).analyse(sql.encode())
    assert not found.cacheable
    assert found.writes == writes


def test_statements_differing_in_literals_share_an_analysis() -> None:
    analyzer = Analyzer("postgresql", Digester("postgresql").digest)
    assert analyzer.analyse(b"UPDATE t SET a = 1 WHERE id = 2").writes == {"t"}
    assert analyzer.analyse(b"UPDATE t SET a = 5 WHERE id = 9").writes == {"t"}
    assert len(analyzer._memo) == 1


def test_rules_and_hints() -> None:
    digest = Digester("postgresql").digest
    policy = CachePolicy([CacheRule(regex="FROM items", ttl=5.0),
                          CacheRule(digest="SELECT a FROM b WHERE c = ?", ttl=7.0)], hints=True, max_hint_ttl=100.0)
    assert policy.ttl(b"SELECT * FROM items", digest) == 5.0
    assert policy.ttl(b"SELECT a FROM b WHERE c = 42", digest) == 7.0
    assert policy.ttl(b"SELECT 1 /* dbproxy:cache ttl=30 */", digest) == 30.0
    assert policy.ttl(b"SELECT 1 /* dbproxy:cache ttl=9999 */", digest) == 100.0
    assert policy.ttl(b"SELECT 1", digest) is None
    assert CachePolicy([], hints=False, max_hint_ttl=1.0).ttl(b"SELECT 1 /* dbproxy:cache ttl=3 */", digest) is None


def test_the_key_holds_user_database_and_every_setting() -> None:
    key = base_key("postgresql", "app", "db", {"search_path": "a", "TimeZone": "UTC"}, b"SELECT 1")
    assert key == base_key("postgresql", "app", "db", {"TimeZone": "UTC", "search_path": "a"}, b"SELECT 1")
    assert key == base_key("postgresql", "app", "db", {"TimeZone": "UTC", "search_path": "a",
                                                       "application_name": "x"}, b"SELECT 1")
    for other in (base_key("postgresql", "bob", "db", {"search_path": "a", "TimeZone": "UTC"}, b"SELECT 1"),
                  base_key("postgresql", "app", "db2", {"search_path": "a", "TimeZone": "UTC"}, b"SELECT 1"),
                  base_key("postgresql", "app", "db", {"search_path": "b", "TimeZone": "UTC"}, b"SELECT 1"),
                  base_key("postgresql", "app", "db", {"search_path": "a"}, b"SELECT 1"),
                  base_key("postgresql", "app", "db", {"search_path": "a", "role": "r", "TimeZone": "UTC"},
                           b"SELECT 1")):
        assert other != key


ROW_DESCRIPTION = pg.message(b"T", b"\x00\x01a\x00" + bytes(18))
ROW = pg.message(b"D", b"\x00\x01\x00\x00\x00\x011")
COMPLETE = pg.message(b"C", b"SELECT 1\x00")


@pytest.mark.parametrize(("replies", "kept"), [
    (ROW_DESCRIPTION + ROW + COMPLETE + pg.READY_FOR_QUERY_IDLE, True),
    (ROW_DESCRIPTION + COMPLETE + pg.READY_FOR_QUERY_IDLE, True),
    (ROW_DESCRIPTION + ROW + COMPLETE + pg.ready_for_query(ord("T")), False),  # a transaction left open
    (pg.error_response("42P01", "no table", "ERROR") + pg.READY_FOR_QUERY_IDLE, False),
    (ROW_DESCRIPTION + ROW + COMPLETE + ROW_DESCRIPTION + COMPLETE + pg.READY_FOR_QUERY_IDLE, False),
    (ROW_DESCRIPTION + pg.message(b"N", b"\x00") + ROW + COMPLETE + pg.READY_FOR_QUERY_IDLE, False),
    (pg.message(b"C", b"INSERT 0 1\x00") + pg.READY_FOR_QUERY_IDLE, False),
])
def test_reply_capture_in_any_split(replies: bytes, kept: bool) -> None:
    for cut in range(1, len(replies)):
        capture = PgReplyCapture(1 << 20)
        over = capture.feed(replies[:cut]) or capture.feed(replies[cut:])
        assert over
        assert (capture.result == replies[:-6]) if kept else capture.result is None


def test_reply_capture_gives_up_over_its_limit() -> None:
    capture = PgReplyCapture(40)
    assert capture.feed(ROW_DESCRIPTION + ROW * 10) and capture.result is None


def test_local_store_lru_bytes_and_invalidation() -> None:
    stats = StatsRegistry().endpoint("postgresql", "e", "c")
    store = LocalStore(max_bytes=1000)
    names = ("c/db/t", "c/db/*")
    generations = store.snapshot(names)
    assert store.put("k1", names, generations, b"x" * 250, 60, stats)
    assert store.put("k2", ("c/db/u", "c/db/*"), store.snapshot(("c/db/u", "c/db/*")), b"y" * 250, 60, stats)
    assert store.get("k1", names)[0] == b"x" * 250
    assert store.put("k3", names, generations, b"z" * 250, 60, stats)  # k2 is the least recently used: it goes
    assert stats.cache_evictions == 1 and stats.cache_entries == 2 and stats.cache_bytes == store.size <= 1000
    store.bump({"c/db/t"}, stats)
    assert store.get("k1", names)[0] is None and stats.cache_entries == 0 and stats.cache_bytes == 0
    assert not store.put("k1", names, generations, b"x", 60, stats)  # read before the write: not stored


def _batch(*messages: bytes) -> bytes:
    return b"".join(messages)


PARSE = ext.build_parse(b"", b"SELECT $1\x00\x00\x01\x00\x00\x00\x17")
BIND = ext.build_bind(b"", b"", b"\x00\x00\x00\x01\x00\x00\x00\x011\x00\x00")
DESCRIBE = ext.build_target(b"D", ord("P"), b"")
EXECUTE = pg.message(b"E", b"\x00\x00\x00\x00\x00")
SYNC = pg.message(b"S")


def test_unnamed_batches_the_cache_answers() -> None:
    whole = _batch(PARSE, BIND, DESCRIBE, EXECUTE, SYNC)
    found = unnamed_batch(whole + b"Q")
    assert found is not None and found.size == len(whole) and found.text == b"SELECT $1" and found.described
    plain = unnamed_batch(_batch(PARSE, BIND, EXECUTE, SYNC))
    assert plain is not None and not plain.described and plain.extra != found.extra
    other_value = ext.build_bind(b"", b"", b"\x00\x00\x00\x01\x00\x00\x00\x012\x00\x00")
    assert unnamed_batch(_batch(PARSE, other_value, DESCRIBE, EXECUTE, SYNC)).extra != found.extra  # type: ignore[union-attr]
    for refused in (whole[:-1],  # not all there
                    _batch(ext.build_parse(b"s1", b"SELECT 1\x00\x00\x00"), BIND, DESCRIBE, EXECUTE, SYNC),  # named
                    _batch(PARSE, BIND, DESCRIBE, pg.message(b"E", b"\x00\x00\x00\x00\x0a"), SYNC),  # a row limit
                    _batch(PARSE, BIND, DESCRIBE, EXECUTE, pg.message(b"H")),  # Flush, no Sync
                    _batch(PARSE, SYNC)):
        assert unnamed_batch(refused) is None


def test_the_local_store_needs_one_process_and_rules_one_match() -> None:
    from pydantic import ValidationError

    from proxy.config import Config

    with pytest.raises(ValidationError, match="workers = 1"):
        Config.model_validate({"query_cache": {"enabled": True}})
    Config.model_validate({"server": {"workers": 1}, "query_cache": {"enabled": True}})
    Config.model_validate({"query_cache": {"enabled": True, "store": "redis"}})
    with pytest.raises(ValidationError, match="regex or digest"):
        CacheRule(regex="a", digest="b")
    with pytest.raises(ValidationError, match="does not compile"):
        CacheRule(regex="(")


@pytest.mark.parametrize(("sql", "plain"), [
    (b"SELECT abalance FROM pgbench_accounts WHERE aid = 5;", True),
    (b"  select * from t ; ", True),
    (b"SELECT nextval('s')", False),
    (b"SELECT a INTO b FROM c", False),
    (b"SELECT 1; DELETE FROM t", False),
    (b"WITH x AS (DELETE FROM t RETURNING *) SELECT * FROM x", False),
    (b"/* c */ SELECT 1", False),
    (b"UPDATE t SET a = 1", False),
])
def test_plain_selects_are_told_without_parsing(sql: bytes, plain: bool) -> None:
    assert plain_select(sql) is plain
