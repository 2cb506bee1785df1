"""Values the server keeps per connection, through a pool smaller than the number of clients: connection ids
(CONNECTION_ID(), KILL, SHOW PROCESSLIST), LAST_INSERT_ID(), ROW_COUNT(), FOUND_ROWS() and wait_timeout."""

from __future__ import annotations

import asyncio
import itertools
import struct
import threading
import time
from pathlib import Path
from typing import Any

import aiomysql
import mysql.connector
import pymysql
import pytest
from pymysql.constants import CLIENT
from test_mysql_session_state import Client, int_rows

from devtools.servers import MariaDBInstance
from proxy.protocol.mysql import constants as my
from proxy.protocol.mysql.packets import frame
from proxy.session import mysql_ids as ids
from proxy.session.mysql_ids import is_proxy_id, worker_of
from rawmysql import CAPS
from support import ProxyProcess, running_proxy


def connect(proxy: ProxyProcess, user: str = "app", **extra: object) -> pymysql.Connection:
    kwargs: dict[str, object] = {"host": "127.0.0.1", "port": proxy.ports["mysql"], "user": user,
                                 "password": f"{user}-secret", "database": user, "autocommit": True}
    kwargs.update(extra)
    return pymysql.connect(**kwargs)  # type: ignore[arg-type]


def one(conn: pymysql.Connection, sql: str) -> tuple[Any, ...]:
    with conn.cursor() as cur:
        cur.execute(sql)
        row = cur.fetchone()
        assert row is not None
        return tuple(row)


def column_names(conn: pymysql.Connection, sql: str) -> list[str]:
    with conn.cursor() as cur:
        cur.execute(sql)
        cur.fetchall()
        return [column[0] for column in cur.description or ()]


async def test_twenty_clients_each_read_their_own_insert_id(tmp_path: Path, mariadb_server: MariaDBInstance) -> None:
    mariadb_server.sql("CREATE TABLE IF NOT EXISTS app.owned_ids (id int AUTO_INCREMENT PRIMARY KEY, owner int)")
    with running_proxy(tmp_path, mariadb=mariadb_server, mysql__pool={"max_connections": 4}) as proxy:
        port = proxy.ports["mysql"]

        async def client(owner: int) -> list[tuple[int, int, int]]:
            conn = await aiomysql.connect(host="127.0.0.1", port=port, user="app", password="app-secret", db="app",
                                          autocommit=True)
            seen = []
            try:
                async with conn.cursor() as cur:
                    for round_ in range(6):
                        await cur.execute("INSERT INTO owned_ids (owner) VALUES (%s)", (owner,))
                        inserted = cur.lastrowid
                        await asyncio.sleep(0.001 * (owner % 5))  # others insert on the backends meanwhile
                        if round_ % 2:
                            await conn.begin()
                        await cur.execute("SELECT LAST_INSERT_ID(), owner FROM owned_ids WHERE id = LAST_INSERT_ID()")
                        row = await cur.fetchone()
                        if round_ % 2:
                            await conn.commit()
                        assert row is not None
                        seen.append((inserted, int(row[0]), int(row[1])))
                        await cur.execute("SELECT @@identity")  # the same value, under its other name
                        (identity,) = await cur.fetchone()
                        seen.append((inserted, int(identity), owner))
            finally:
                conn.close()
            return seen

        results = await asyncio.gather(*(client(owner) for owner in range(20)))
    for owner, seen in enumerate(results):
        for inserted, read_back, row_owner in seen:
            assert read_back == inserted, (owner, seen)
            assert row_owner == owner, (owner, seen)


def test_last_insert_id_set_to_an_expression(tmp_path: Path, mariadb_server: MariaDBInstance) -> None:
    """LAST_INSERT_ID(expr) sets the value without an OK packet telling it: the client stays on that backend until
    an insert reports a value again."""
    mariadb_server.sql("CREATE TABLE IF NOT EXISTS app.expr_ids (id int AUTO_INCREMENT PRIMARY KEY, v int)")
    with running_proxy(tmp_path, mariadb=mariadb_server, mysql__pool={"max_connections": 2}) as proxy:
        with connect(proxy) as a, connect(proxy) as b:
            for n in range(3):
                with a.cursor() as cur:
                    cur.execute("INSERT INTO expr_ids (v) VALUES (1)")
                with b.cursor() as cur:
                    cur.execute("INSERT INTO expr_ids (v) VALUES (2)")  # the backend now has B's id, not A's
                assert one(a, f"SELECT LAST_INSERT_ID({1000 + n})") == (1000 + n,)
                with b.cursor() as cur:
                    cur.execute("INSERT INTO expr_ids (v) VALUES (2)")  # B's own id, on some backend
                b.begin()
                one(b, "SELECT 1")
                assert one(a, "SELECT LAST_INSERT_ID(), @@last_insert_id") == (1000 + n, 1000 + n)
                b.commit()
            with a.cursor() as cur:
                cur.execute("INSERT INTO expr_ids (v) VALUES (1)")
                inserted = cur.lastrowid
            b.begin()
            one(b, "SELECT 1")
            assert one(a, "SELECT LAST_INSERT_ID()") == (inserted,)
            b.commit()
        proxy.wait_for_log(r"pinned to .*: LAST_INSERT_ID\(expr\)")
        proxy.wait_for_log(r"unpinned: LAST_INSERT_ID\(expr\) ended")


def test_row_count_and_found_rows_are_the_clients_own(tmp_path: Path, mariadb_server: MariaDBInstance) -> None:
    mariadb_server.sql("CREATE TABLE IF NOT EXISTS app.counted (n int); DELETE FROM app.counted;"
                       "INSERT INTO app.counted VALUES (1), (2), (3), (4), (5)")
    with running_proxy(tmp_path, mariadb=mariadb_server, mysql__pool={"max_connections": 2}) as proxy:
        with connect(proxy) as a, connect(proxy) as b:
            for _ in range(3):
                with a.cursor() as cur:
                    assert cur.execute("UPDATE counted SET n = n WHERE n <= 3 OR n = 0") in (0, 3)
                    cur.execute("UPDATE counted SET n = n + 10 WHERE n <= 3")
                with b.cursor() as cur:
                    cur.execute("DELETE FROM counted WHERE n = 99")  # another client's statement: 0 rows
                b.begin()
                one(b, "SELECT 1")  # B holds the backend A used (the pool is LIFO): A runs on the other one
                assert one(a, "SELECT ROW_COUNT()") == (3,)
                assert one(a, "SELECT ROW_COUNT()") == (-1,)  # after a SELECT
                b.commit()
                with a.cursor() as cur:
                    cur.execute("UPDATE counted SET n = n - 10 WHERE n > 10")
                    cur.execute("SELECT n FROM counted ORDER BY n LIMIT 2")
                    cur.execute("DO 1")  # FOUND_ROWS() stays with the last result set
                b.begin()
                one(b, "SELECT 1, 2, 3 UNION SELECT 4, 5, 6 UNION SELECT 7, 8, 9")
                assert one(a, "SELECT FOUND_ROWS(), ROW_COUNT()") == (2, 0)
                b.commit()
                # SQL_CALC_FOUND_ROWS: the total lives only on that backend; the client stays there until a
                # later result set replaces it
                assert one(a, "SELECT SQL_CALC_FOUND_ROWS n FROM counted ORDER BY n LIMIT 1") == (1,)
                with a.cursor() as cur:
                    cur.execute("DO 1")
                b.begin()
                one(b, "SELECT 1")
                assert one(a, "SELECT FOUND_ROWS()") == (5,)
                b.commit()
            assert column_names(a, "SELECT ROW_COUNT(), found_rows() AS total, CONNECTION_ID()") == [
                "ROW_COUNT()", "total", "CONNECTION_ID()"]
            assert one(a, "SELECT 'ROW_COUNT()', `n` FROM counted WHERE n = 1") == ("ROW_COUNT()", 1)


def test_prepared_row_count_pins_while_the_statement_is_open(tmp_path: Path, mariadb_server: MariaDBInstance) -> None:
    """A prepared statement's text cannot carry the client's ROW_COUNT(): the client stays on its backend while it
    has the statement open."""
    mariadb_server.sql("CREATE TABLE IF NOT EXISTS app.counted_ps (n int); DELETE FROM app.counted_ps;"
                       "INSERT INTO app.counted_ps VALUES (1), (2), (3), (4)")
    with running_proxy(tmp_path, mariadb=mariadb_server, mysql__pool={"max_connections": 2}) as proxy:
        raw = Client(proxy.ports["mysql"])
        raw.login_with(CAPS)
        statement, _ = raw.prepare("SELECT ROW_COUNT(), ? + 1")
        other = Client(proxy.ports["mysql"])  # the same capabilities: the same pool
        other.login_with(CAPS)
        for n in range(3):
            raw.command(b"\x03UPDATE counted_ps SET n = n + 10 WHERE n <= 3")
            # another client, on the backend the raw client used last (the pool is LIFO): 1 row
            other.command(b"\x03UPDATE counted_ps SET n = n + 100 WHERE n = 4")
            other.command(b"\x03UPDATE counted_ps SET n = n - 100 WHERE n = 104")
            assert int_rows(raw.execute(statement, [n], types=True)) == [(3, n + 1)]
            assert int_rows(raw.execute(statement, [n], types=True)) == [(-1, n + 1)]
            raw.command(b"\x03UPDATE counted_ps SET n = n - 10 WHERE n > 10")
        other.close()
        proxy.wait_for_log(r"pinned to .*: prepared ROW_COUNT\(\)/FOUND_ROWS\(\)")
        raw.send(frame(struct.pack("<BI", my.COM_STMT_CLOSE, statement), 0))  # no response
        proxy.wait_for_log(r"unpinned: prepared ROW_COUNT\(\)/FOUND_ROWS\(\) ended")
        raw.close()


def test_connection_id_is_the_greeting_id(tmp_path: Path, mariadb_server: MariaDBInstance) -> None:
    with running_proxy(tmp_path, mariadb=mariadb_server, mysql__pool={"max_connections": 2}) as proxy:
        clients = [connect(proxy) for _ in range(6)]
        try:
            ids = []
            for conn in clients:
                (reported,) = one(conn, "SELECT CONNECTION_ID()")
                assert reported == conn.thread_id()  # what the client was greeted with
                assert one(conn, "select connection_id() + 0") == (reported,)
                ids.append(reported)
            assert len(set(ids)) == len(ids)
            assert all(is_proxy_id(int(n)) for n in ids)  # never a server thread id
            threads = {int(row[0]) for row in _processlist(clients[0])}
            assert not threads & set(ids)
        finally:
            for conn in clients:
                conn.close()
        # binary protocol: a prepared statement says the client's id on every backend it is prepared on
        first = mysql.connector.connect(host="127.0.0.1", port=proxy.ports["mysql"], user="app",
                                        password="app-secret", database="app", autocommit=True)
        second = mysql.connector.connect(host="127.0.0.1", port=proxy.ports["mysql"], user="app",
                                         password="app-secret", database="app", autocommit=True)
        try:
            cur = first.cursor(prepared=True)
            other = second.cursor()
            for n in range(4):
                if n % 2:
                    second.start_transaction()
                    other.execute("SELECT 1")  # holds the backend `first` used last: it prepares on the other
                    other.fetchall()
                cur.execute("SELECT CONNECTION_ID(), %s", (n,))
                assert cur.fetchall() == [(first.connection_id, n)]
                assert cur.column_names == ("CONNECTION_ID()", "?")
                if n % 2:
                    second.commit()
        finally:
            first.close()
            second.close()


def _processlist(conn: pymysql.Connection) -> list[tuple[Any, ...]]:
    with conn.cursor() as cur:
        cur.execute("SHOW FULL PROCESSLIST")
        return list(cur.fetchall())


def test_kill_with_a_processlist_thread_id(tmp_path: Path, mariadb_server: MariaDBInstance) -> None:
    with running_proxy(tmp_path, mariadb=mariadb_server, mysql__pool={"max_connections": 3}) as proxy:
        with connect(proxy) as victim, connect(proxy) as bystander, connect(proxy) as killer:
            outcome: dict[str, Any] = {}

            def run_victim() -> None:
                started = time.monotonic()
                try:
                    outcome["row"] = one(victim, "SELECT SLEEP(20) /* runaway-7 */")
                except pymysql.err.OperationalError as exc:
                    outcome["row"] = exc.args[0]
                outcome["took"] = time.monotonic() - started

            thread = threading.Thread(target=run_victim)
            thread.start()
            deadline = time.monotonic() + 10
            runaway: int | None = None
            while runaway is None and time.monotonic() < deadline:
                for row in _processlist(killer):
                    if "runaway-7" in str(row[7]) and "PROCESSLIST" not in str(row[7]):
                        runaway = int(row[0])
                time.sleep(0.1)
            assert runaway is not None
            with killer.cursor() as cur:
                cur.execute(f"KILL QUERY {runaway}")
            thread.join(15)
            assert outcome["row"] in ((1,), 1317)  # MariaDB: SLEEP returns 1 when killed (or: interrupted)
            assert outcome["took"] < 10
            for conn in (victim, bystander, killer):
                assert one(conn, "SELECT 7") == (7,)
            with killer.cursor() as cur:
                for unknown in (987654, 0x40FFFFF0, runaway + 100000):
                    with pytest.raises(pymysql.err.OperationalError) as caught:
                        cur.execute(f"KILL QUERY {unknown}")
                    assert caught.value.args[0] == 1094
                    with pytest.raises(pymysql.err.OperationalError) as caught:
                        cur.execute(f"KILL {unknown}")
                    assert caught.value.args[0] == 1094
            for conn in (victim, bystander, killer):
                assert one(conn, "SELECT 8") == (8,)
            # KILL CONNECTION with a thread id: the client that thread serves is closed, no one else
            victim.begin()
            one(victim, "SELECT 1")  # the victim holds a backend now
            held = {int(row[0]) for row in _processlist(killer) if row[1] == "app"}
            victim_thread = int(one(victim, "SELECT @@pseudo_thread_id")[0])
            assert victim_thread in held
            with killer.cursor() as cur:
                cur.execute(f"KILL {victim_thread}")
            with pytest.raises(pymysql.err.OperationalError):
                one(victim, "SELECT 1")
            assert one(bystander, "SELECT 9") == (9,)
            assert one(killer, "SELECT 10") == (10,)
    assert "Unknown thread id: 987654" in proxy.log()


def test_session_wait_timeout_closes_the_idle_client(tmp_path: Path, mariadb_server: MariaDBInstance) -> None:
    with running_proxy(tmp_path, mariadb=mariadb_server, mysql__pool={"max_connections": 2}) as proxy:
        with connect(proxy) as sleepy, connect(proxy) as busy, connect(proxy) as plain, \
                connect(proxy, client_flag=CLIENT.INTERACTIVE) as interactive:
            with interactive.cursor() as cur:  # as on the server: the session's wait_timeout is what counts
                cur.execute("SET SESSION interactive_timeout = 1")
            with busy.cursor() as cur:
                cur.execute("SET @@wait_timeout = 2")
                cur.execute("SELECT SLEEP(3.5)")  # a long query is not idle time
                cur.execute("SELECT 1")
            with sleepy.cursor() as cur:
                cur.execute("SET SESSION wait_timeout = 2")
            started = time.monotonic()
            sock = sleepy._sock
            assert sock is not None
            sock.settimeout(15)
            assert sock.recv(100) == b""  # closed by the proxy, without a word (as MariaDB 10.11 does)
            assert 1.5 < time.monotonic() - started < 8
            assert one(plain, "SELECT 1") == (1,)
            assert one(interactive, "SELECT 2") == (2,)
    assert "closed after 2 s of inactivity (its wait_timeout)" in proxy.log()


def test_kill_with_a_thread_id_reaches_the_worker_that_owns_the_backend(tmp_path: Path,
                                                                        mariadb_server: MariaDBInstance) -> None:
    with running_proxy(tmp_path, mariadb=mariadb_server, server={"workers": 2}) as proxy:
        with connect(proxy) as killer:
            crossed = 0
            for attempt in range(20):  # victims land on either worker; the killer on one of them
                if crossed >= 2:
                    break
                with connect(proxy) as victim:
                    marker = f"victim-{attempt}"
                    outcome: list[Any] = []

                    def run(conn: pymysql.Connection = victim, out: list[Any] = outcome, tag: str = marker) -> None:
                        try:
                            out.append(one(conn, f"SELECT SLEEP(10) /* {tag} */"))
                        except pymysql.err.OperationalError as exc:
                            out.append(exc.args[0])

                    thread = threading.Thread(target=run)
                    started = time.monotonic()
                    thread.start()
                    runaway = None
                    while runaway is None and time.monotonic() - started < 5:
                        for row in _processlist(killer):
                            if marker in str(row[7]) and "PROCESSLIST" not in str(row[7]):
                                runaway = int(row[0])
                        time.sleep(0.05)
                    assert runaway is not None
                    with killer.cursor() as cursor:
                        cursor.execute(f"KILL QUERY {runaway}")
                    thread.join()
                    assert time.monotonic() - started < 8
                    assert outcome in ([(1,)], [1317]), outcome
                    crossed += worker_of(victim.thread_id()) != worker_of(killer.thread_id())
            assert crossed >= 1


@pytest.mark.parametrize(("text", "expected"), [
    (b"SELECT ROW_COUNT()", b"SELECT 5 AS `ROW_COUNT()`"),
    (b"select distinct connection_id() from t", b"select distinct 1073741825 AS `connection_id()` from t"),
    (b"SELECT FOUND_ROWS() AS total, 'ROW_COUNT()', `row_count()`", b"SELECT 3 AS total, 'ROW_COUNT()', `row_count()`"),
    (b"SELECT IF(ROW_COUNT() > 0, 1, 0) /* ROW_COUNT() */", b"SELECT IF(5 > 0, 1, 0) /* ROW_COUNT() */"),
    (b"INSERT INTO log VALUES (CONNECTION_ID(), ROW_COUNT())", b"INSERT INTO log VALUES (1073741825, 5)"),
    (b"SELECT ROW_COUNT(); SELECT ROW_COUNT()", b"SELECT 5 AS `ROW_COUNT()`; SELECT ROW_COUNT()"),
    (b"SELECT my_row_count(), x.found_rows", b"SELECT my_row_count(), x.found_rows"),
])
def test_session_functions_are_replaced_outside_quotes(text: bytes, expected: bytes) -> None:
    values = {ids.CONNECTION_ID: 1073741825, ids.ROW_COUNT: 5, ids.FOUND_ROWS: 3}
    assert ids.substitute(text, values, whole=b";" not in text) == expected


def test_proxy_ids_stay_in_their_worker_and_apart_from_thread_ids() -> None:
    for worker in (0, 1, 63):
        first = ids.make_proxy_id(worker, 1)
        wrapped = ids.make_proxy_id(worker, ids.COUNTER_MASK + 1)
        last = ids.make_proxy_id(worker, ids.COUNTER_MASK)
        assert wrapped == first and ids.worker_of(last) == worker and ids.worker_of(first) == worker
        assert ids.is_proxy_id(first) and ids.is_proxy_id(last) and last < 2**31
    assert not ids.is_proxy_id(583) and not ids.is_proxy_id(0)
    counter = itertools.count(1)
    taken = {ids.make_proxy_id(0, 1), ids.make_proxy_id(0, 2)}
    assert ids.next_proxy_id(0, counter, taken) == ids.make_proxy_id(0, 3)


@pytest.mark.parametrize(("body", "seconds"), [
    (b"@@SESSION.wait_timeout=2", 2.0), (b"@@SESSION.wait_timeout = 30", 30.0),
    (b"@@SESSION.wait_timeout=DEFAULT", None), (b"@@SESSION.wait_timeout=@@global.wait_timeout", None), (None, None),
])
def test_session_timeout_from_the_tracked_setting(body: bytes | None, seconds: float | None) -> None:
    assert ids.session_timeout(body) == seconds
