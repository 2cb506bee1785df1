"""The query result cache on MariaDB through PyMySQL (COM_QUERY): hits, invalidation by writes, what never hits."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pymysql
import pytest

from devtools.servers import MariaDBInstance
from support import ProxyProcess, metric_value, running_proxy, scrape


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory, mariadb_server: MariaDBInstance) -> Iterator[ProxyProcess]:
    conn = pymysql.connect(host="127.0.0.1", port=mariadb_server.port, user="app", password="app-secret",
                           database="app", autocommit=True)
    with conn.cursor() as cursor:
        cursor.execute("DROP TABLE IF EXISTS qc_items")
        cursor.execute("CREATE TABLE qc_items (id int PRIMARY KEY, value int NOT NULL, label varchar(20))")
        cursor.execute("INSERT INTO qc_items SELECT seq, 0, CONCAT('item ', seq) FROM seq_1_to_20")
        for row in range(10, 16):  # one table per client of the read-after-write test
            cursor.execute(f"DROP TABLE IF EXISTS qc_row{row}")
            cursor.execute(f"CREATE TABLE qc_row{row} (id int, value int)")
            cursor.execute(f"INSERT INTO qc_row{row} VALUES ({row}, 0)")
    conn.close()
    rules = [{"endpoint": "mysql", "regex": "FROM qc_(items|row)", "ttl": 60.0}]
    settings = {"enabled": True, "hints": True, "rules": rules}
    with running_proxy(tmp_path_factory.mktemp("qcache-mysql"), mariadb=mariadb_server, query_cache=settings,
                       server={"metrics_port": 0}, mysql__pool={"max_connections": 3}) as running:
        yield running


def connect(proxy: ProxyProcess, **kwargs: object) -> pymysql.Connection:
    return pymysql.connect(host="127.0.0.1", port=proxy.ports["mysql"], user="app", password="app-secret",
                           database="app", autocommit=True, **kwargs)  # type: ignore[arg-type]


def counter(proxy: ProxyProcess, name: str) -> float:
    return metric_value(scrape(proxy), f"dbproxy_{name}_total", endpoint="mysql")


def query(conn: pymysql.Connection, sql: str) -> tuple[tuple[object, ...], ...]:
    with conn.cursor() as cursor:
        cursor.execute(sql)
        return tuple(cursor.fetchall())


def test_a_hit_returns_the_same_rows(proxy: ProxyProcess) -> None:
    sql = "SELECT id, value, label, NULL AS n FROM qc_items WHERE id <= 3 ORDER BY id"
    hits = counter(proxy, "query_cache_hits")
    with connect(proxy) as conn:
        first = query(conn, sql)
        second = query(conn, sql)
        with conn.cursor() as cursor:
            cursor.execute(sql)
            third = tuple(cursor.fetchall())
            assert [d[0] for d in cursor.description] == ["id", "value", "label", "n"]
            assert cursor.rowcount == 3
        assert query(conn, "SELECT FOUND_ROWS()") == ((3,),)
        assert query(conn, "SELECT 1") == ((1,),)  # the session goes on after hits
    assert first == second == third == ((1, 0, "item 1", None), (2, 0, "item 2", None), (3, 0, "item 3", None))
    assert counter(proxy, "query_cache_hits") >= hits + 2


def test_writes_invalidate(proxy: ProxyProcess) -> None:
    sql = "SELECT value FROM qc_items WHERE id = 5"
    with connect(proxy) as reader, connect(proxy) as writer:
        assert query(reader, sql) == ((0,),)
        assert query(reader, sql) == ((0,),)
        query(writer, "UPDATE qc_items SET value = 7 WHERE id = 5")
        assert query(reader, sql) == ((7,),)
        writer.begin()
        query(writer, "UPDATE qc_items SET value = 8 WHERE id = 5")
        assert query(reader, sql) == ((7,),)
        writer.commit()
        assert query(reader, sql) == ((8,),)
        query(writer, "REPLACE INTO qc_items VALUES (5, 9, 'x')")
        assert query(reader, sql) == ((9,),)
        query(writer, "UPDATE qc_items SET value = 0 WHERE id = 5")
        assert query(reader, sql) == ((0,),)


def test_reads_that_never_hit(proxy: ProxyProcess) -> None:
    hits = counter(proxy, "query_cache_hits")
    with connect(proxy) as conn:
        for _ in range(3):
            query(conn, "SELECT NOW(6), COUNT(*) FROM qc_items")
            query(conn, "SELECT RAND(), COUNT(*) FROM qc_items")
            query(conn, "SELECT UUID(), COUNT(*) FROM qc_items")
            query(conn, "SELECT CURRENT_USER(), COUNT(*) FROM qc_items")
            conn.begin()
            query(conn, "SELECT COUNT(*) FROM qc_items WHERE id < 4")
            conn.commit()
        conn.autocommit(False)
        query(conn, "SELECT COUNT(*) FROM qc_items WHERE id < 5")
        query(conn, "SELECT COUNT(*) FROM qc_items WHERE id < 5")
        conn.rollback()
    assert counter(proxy, "query_cache_hits") == hits


def test_session_state_is_part_of_the_key(proxy: ProxyProcess) -> None:
    sql = "SELECT CAST(value AS CHAR) AS v, 1/3 AS third FROM qc_items WHERE id = 1"
    with connect(proxy) as conn:
        plain = query(conn, sql)
        assert query(conn, sql) == plain
        query(conn, "SET div_precision_increment = 8")
        changed = query(conn, sql)
        assert changed != plain
        assert query(conn, sql) == changed
    with connect(proxy) as other:
        assert query(other, sql) == plain


def test_no_stale_read_after_a_write_many_clients(proxy: ProxyProcess) -> None:
    """6,000 read-after-write checks by 6 clients at once over 3 backends (each client its own table, so that the
    second read of each value is a hit)."""
    stale: list[str] = []
    hits = counter(proxy, "query_cache_hits")

    def client(row: int) -> None:
        with connect(proxy) as conn:
            for value in range(1, 501):
                query(conn, f"UPDATE qc_row{row} SET value = {value} WHERE id = {row}")
                for _ in range(2):
                    got = query(conn, f"SELECT value FROM qc_row{row} WHERE id = {row}")
                    if got != ((value,),):
                        stale.append(f"row {row}: wrote {value}, read {got}")

    threads = [threading.Thread(target=client, args=(row,)) for row in range(10, 16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert stale == []
    assert counter(proxy, "query_cache_hits") - hits >= 2000


def test_the_mariadb_client_sees_the_same_output_from_the_cache(proxy: ProxyProcess) -> None:
    import subprocess

    hits = counter(proxy, "query_cache_hits")
    command = ["mariadb", "-h", "127.0.0.1", "-P", str(proxy.ports["mysql"]), "-u", "app", "-papp-secret",
               "--skip-ssl", "app", "-e", "SELECT id, label, id * 1.5 AS x FROM qc_items WHERE id BETWEEN 2 AND 4"]
    outputs = [subprocess.run(command, capture_output=True, text=True, check=True, timeout=30).stdout
               for _ in range(2)]
    assert outputs[0] == outputs[1] and "item 3" in outputs[0]
    assert counter(proxy, "query_cache_hits") == hits + 1
