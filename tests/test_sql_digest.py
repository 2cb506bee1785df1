"""Statement normalization for both engines, the digest cache, and the bounded statement statistics."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.insights import BOUNDS, Insights, merged, top
from proxy.sql_digest import MAX_TEXT, Digester, normalize


@pytest.mark.parametrize(("text", "digest"), [
    ("UPDATE pgbench_accounts SET abalance = abalance + -2345 WHERE aid = 123;",
     "UPDATE pgbench_accounts SET abalance = abalance + ? WHERE aid = ?"),
    ("INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES (3, 1, 88, -2345, CURRENT_TIMESTAMP);",
     "INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES (?, ?, ?, ?, CURRENT_TIMESTAMP)"),
    ("select * from t where name = 'it''s' and x in (1, 2,3) -- note\n and y=$$a'b$$ and z = $1",
     "select * from t where name = ? and x in (...) and y=? and z = $1"),
    ("SELECT $tag$ it's $1 $tag$, E'a\\'b', x'ff', .5, 1e-3, \"Col 1\", t1.c2 FROM t1 /* why */",
     "SELECT ?, ?, ?, ?, ?, \"Col 1\", t1.c2 FROM t1"),
    ("select a -1, b - 2, -3, f(-4)", "select a - ?, b - ?, ?, f(?)"),
    ("INSERT INTO t VALUES (1, 'a'), (2, 'b'),(3,'c')", "INSERT INTO t VALUES (...), ..."),
])
def test_postgresql_statements(text: str, digest: str) -> None:
    assert normalize(text) == digest


@pytest.mark.parametrize(("text", "digest"), [
    ("SELECT c FROM sbtest1 WHERE id=5012", "SELECT c FROM sbtest1 WHERE id=?"),
    ("SELECT DISTINCT c FROM sbtest3 WHERE id BETWEEN 4 AND 103 ORDER BY c",
     "SELECT DISTINCT c FROM sbtest3 WHERE id BETWEEN ? AND ? ORDER BY c"),
    ("UPDATE sbtest1 SET c='8386-2877' WHERE id=5", "UPDATE sbtest1 SET c=? WHERE id=?"),
    ('INSERT INTO `t 1` (a, b) VALUES (5, "x\\"y"), (6, _utf8mb4\'z\')', "INSERT INTO `t 1` (a, b) VALUES (...), ..."),
    ("select 0xFF, b'101', 1 # trailing\n from dual -- comment", "select ?, ?, ? from dual"),
])
def test_mysql_statements(text: str, digest: str) -> None:
    assert normalize(text, "mysql") == digest


def test_unterminated_and_huge_texts_do_not_break_it() -> None:
    assert normalize("select 'open") == "select ?"
    assert normalize("select 1 /* open") == "select ?"
    assert normalize("select $$ open") == "select ?"
    huge = "select " + ", ".join(str(n) for n in range(10_000))
    assert normalize(huge).endswith(" ...") and len(normalize(huge)) <= MAX_TEXT + 4


def test_the_digester_folds_numbers_but_not_names() -> None:
    digester = Digester("mysql", cache_size=4)
    assert digester.digest(b"SELECT c FROM sbtest1 WHERE id=1") == "SELECT c FROM sbtest1 WHERE id=?"
    assert digester.digest(b"SELECT c FROM sbtest2 WHERE id=1") == "SELECT c FROM sbtest2 WHERE id=?"
    assert digester.digest(b"SELECT c FROM sbtest1 WHERE id=77") == "SELECT c FROM sbtest1 WHERE id=?"
    assert digester.digest(b"select a -1") == "select a - ?" and digester.digest(b"select = -1") == "select = ?"
    assert digester.digest(b"SELECT $1 + 2") == "SELECT $1 + ?"
    assert digester.digest(b"SELECT $2 + 3") == "SELECT $2 + ?"  # one shape, the kept digit picks the digest
    assert digester.digest(b"SELECT 0x1F, 'x9' /* 7 */") == "SELECT ?, ?"
    assert digester.digest(b"SELECT 1x1F") != "SELECT ?"  # (not a literal: a shape with 0x is kept by its text)
    assert digester.digest("SELECT 'ä', 5 FROM t1".encode()) == "SELECT ?, ? FROM t1"
    assert digester.digest("SELECT 'ä', 6 FROM t2".encode()) == "SELECT ?, ? FROM t2"
    for n in range(10):
        digester.digest(b"SELECT %d FROM t%d" % (n, n))
        digester.digest(b"SELECT %d FROM t%d %s" % (n, n, "é".encode()))
    assert len(digester._shapes) == len(digester._texts) == 4  # bounded


def test_statistics_are_bounded_ranked_and_merged() -> None:
    insights = Insights(max_statements=3)
    for n, seconds in enumerate((0.001, 0.002, 0.004, 0.008)):
        insights.entry((f"SELECT {n}", "app", "app", "main")).add(seconds, 0.0001, 1, n == 1)
    assert len(insights.stats) == 3 and insights.evicted == 1
    assert ("SELECT 0", "app", "app", "main") not in insights.stats  # the least recent went
    for _ in range(99):
        insights.entry(("SELECT 3", "app", "app", "main")).add(0.0002, 0.0, 2, False)
    both = merged([insights.snapshot(), insights.snapshot()])
    ranked = top(both, limit=2)  # by load
    assert [row["statement"] for row in ranked] == ["SELECT 3", "SELECT 2"]
    assert ranked[0]["calls"] == 200 and ranked[0]["rows"] == 2 * (1 + 99 * 2)
    assert ranked[0]["p99_ms"] <= 10 and ranked[0]["p95_ms"] <= 0.3  # 2 of 200 calls took 8 ms
    assert top(both, by="errors")[0]["statement"] == "SELECT 1"
    assert BOUNDS[0] <= 0.0002 <= BOUNDS[-1]
    with pytest.raises(ValueError, match="unknown order"):
        top(both, by="nonsense")


@settings(max_examples=400, deadline=None)
@given(texts=st.lists(st.text(alphabet="SELCT ab$_.0123456789xX'\"-/*=(),;\n`#e", max_size=40), min_size=1,
                      max_size=8),
       engine=st.sampled_from(["postgresql", "mysql"]))
def test_the_digester_agrees_with_normalize(texts: list[str], engine: str) -> None:
    digester = Digester(engine, cache_size=8)
    shifted = [text.translate(str.maketrans("0123456789", "1234567890")) for text in texts]  # the same shapes
    for text in texts + shifted + texts:  # the last round from the cache
        assert digester.digest(text.encode()) == normalize(text, engine), text
