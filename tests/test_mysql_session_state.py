"""MySQL/MariaDB session state without pinning: virtual prepared statements, tracked settings, precise pinning.

Real MariaDB, real drivers (sysbench with its default --db-ps-mode=auto, mysql-connector-python prepared
cursors, PyMySQL) and a raw-protocol client for what drivers do not show (parameter types, cursors, OK bytes).
"""

from __future__ import annotations

import re
import struct
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import mysql.connector
import pymysql
import pytest

from devtools.servers import MariaDBInstance
from proxy.auth.mysql import scramble_native_password
from proxy.protocol.mysql import constants as my
from proxy.protocol.mysql.packets import (
    ErrPacket,
    HandshakeResponse41,
    OkPacket,
    ResponseTracker,
    frame,
    parse_session_state,
)
from rawmysql import CAPS, RawClient
from support import ProxyProcess, metric_value, running_proxy

SYSBENCH = ["sysbench", "oltp_read_write", "--db-driver=mysql", "--mysql-host=127.0.0.1", "--mysql-user=bench",
            "--mysql-password=bench-secret", "--mysql-db=bench", "--tables=2", "--table-size=10000",
            "--mysql-ssl=off"]


def connect(proxy: ProxyProcess, user: str = "app", **extra: object) -> pymysql.Connection:
    kwargs: dict[str, object] = {"host": "127.0.0.1", "port": proxy.ports["mysql"], "user": user,
                                 "password": f"{user}-secret", "database": user, "autocommit": True}
    kwargs.update(extra)
    return pymysql.connect(**kwargs)  # type: ignore[arg-type]


def one(conn: pymysql.Connection, sql: str) -> tuple[object, ...]:
    with conn.cursor() as cur:
        cur.execute(sql)
        row = cur.fetchone()
        assert row is not None
        return tuple(row)


def metrics(proxy: ProxyProcess) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{proxy.ports['metrics']}/metrics").read().decode()


def server_status(mariadb: MariaDBInstance, name: str) -> int:
    return int(mariadb.sql(f"SELECT VARIABLE_VALUE FROM information_schema.GLOBAL_STATUS WHERE VARIABLE_NAME = "
                           f"'{name.upper()}'"))


@contextmanager
def watching(sample: Callable[[], int]) -> Iterator[list[int]]:
    """Sample a number every 50 ms in a thread while the block runs; yields the list of samples."""
    samples: list[int] = []
    done = threading.Event()

    def run() -> None:
        while not done.is_set():
            samples.append(sample())
            time.sleep(0.05)

    thread = threading.Thread(target=run)
    thread.start()
    try:
        yield samples
    finally:
        done.set()
        thread.join()


def bench_connections(mariadb: MariaDBInstance, user: str = "bench") -> int:
    return int(mariadb.sql(f"SELECT count(*) FROM information_schema.processlist WHERE user = '{user}'"))


@pytest.fixture(scope="module")
def sysbench_tables(mariadb_server: MariaDBInstance) -> MariaDBInstance:
    base = [*SYSBENCH, f"--mysql-port={mariadb_server.port}"]
    subprocess.run([*base, "cleanup"], capture_output=True, timeout=60)
    subprocess.run([*base, "prepare"], capture_output=True, timeout=120, check=True)
    return mariadb_server


def _sysbench(port: int, *extra: str) -> tuple[float, int, str]:
    out = subprocess.run([*SYSBENCH, f"--mysql-port={port}", *extra, "run"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    tps = float(re.search(r"transactions:\s+\d+\s+\(([\d.]+) per sec", out.stdout).group(1))  # type: ignore[union-attr]
    ignored = int(re.search(r"ignored errors:\s+(\d+)", out.stdout).group(1))  # type: ignore[union-attr]
    return tps, ignored, out.stdout


# --- acceptance: real drivers multiplex with prepared statements ---


def test_sysbench_prepared_statements_multiplex_without_pinning(tmp_path: Path,
                                                                 sysbench_tables: MariaDBInstance) -> None:
    mariadb = sysbench_tables
    with running_proxy(tmp_path, mariadb=mariadb, mysql__pool={"max_connections": 4},
                       server={"metrics_port": 0}) as proxy:
        prepares, executes = server_status(mariadb, "Com_stmt_prepare"), server_status(mariadb, "Com_stmt_execute")
        with watching(lambda: bench_connections(mariadb)) as connections, \
                watching(lambda: server_status(mariadb, "Prepared_stmt_count")) as prepared:
            tps, ignored, out = _sysbench(proxy.ports["mysql"], "--threads=8", "--time=4")  # default: ps-mode auto
        transactions = int(re.search(r"transactions:\s+(\d+)", out).group(1))  # type: ignore[union-attr]
        assert transactions > 20 and ignored <= transactions // 50, out
        executed = server_status(mariadb, "Com_stmt_execute") - executes
        assert executed > transactions * 10  # the binary protocol
        assert (server_status(mariadb, "Com_stmt_prepare") - prepares) * 5 < executed  # not once per execution
        assert 1 <= max(connections) <= 4, connections
        assert max(prepared) <= 4 * 256, prepared  # per backend at most max_prepared_statements
        assert "pinned" not in proxy.log()
        assert metric_value(metrics(proxy), "dbproxy_database_connections_currently_session_pinned") == 0
        print(f"sysbench oltp_read_write ps-mode=auto, 8 threads on 4 backends: {tps:.0f} tps")


def test_connector_prepared_cursors_many_clients_few_backends(tmp_path: Path, mariadb_server: MariaDBInstance) -> None:
    """30 mysql-connector clients, prepared cursors, on 3 backends that keep at most 4 statements each."""
    mariadb_server.sql("CREATE TABLE IF NOT EXISTS app.ps_items (id int PRIMARY KEY, name varchar(20));"
                       "REPLACE INTO app.ps_items VALUES (1, 'one'), (2, 'two'), (3, 'three')")
    statements: list[tuple[str, Callable[[int], tuple[object, ...]], Callable[[int], list[tuple[object, ...]]]]] = [
        ("SELECT ? + 1", lambda n: (n,), lambda n: [(n + 1,)]),
        ("SELECT CONCAT(?, '-', ?)", lambda n: (f"a{n}", n), lambda n: [(f"a{n}-{n}",)]),
        ("SELECT name FROM ps_items WHERE id = ?", lambda n: (n % 3 + 1,),
         lambda n: [(("one", "two", "three")[n % 3],)]),
        ("SELECT ? * 2, ? IS NULL", lambda n: (n, None), lambda n: [(n * 2, 1)]),
        ("SELECT COUNT(*) FROM ps_items WHERE id <= ?", lambda n: (n % 3 + 1,), lambda n: [(n % 3 + 1,)]),
        ("SELECT CAST(? AS CHAR), ?", lambda n: (n, 1.5), lambda n: [(str(n), 1.5)]),
    ]
    errors: list[BaseException] = []

    with running_proxy(tmp_path, mariadb=mariadb_server,
                       mysql__pool={"max_connections": 3, "max_prepared_statements": 4}) as proxy:
        def client(number: int) -> None:
            try:
                conn = mysql.connector.connect(host="127.0.0.1", port=proxy.ports["mysql"], user="app",
                                               password="app-secret", database="app", use_pure=True, autocommit=True,
                                               ssl_disabled=True)
                try:
                    cursors = [conn.cursor(prepared=True) for _ in statements]
                    for step in range(20):
                        for (sql, args, expected), cursor in zip(statements, cursors, strict=True):
                            value = number * 100 + step
                            if step % 5 == 0:
                                conn.start_transaction()
                            cursor.execute(sql, args(value))
                            rows = [tuple(v.decode() if isinstance(v, bytes | bytearray) else v for v in row)
                                    for row in cursor.fetchall()]
                            assert rows == expected(value), (sql, rows)
                            if step % 5 == 0:
                                conn.commit()
                    for cursor in cursors:
                        cursor.close()
                finally:
                    conn.close()
            except BaseException as exc:  # reported by the main thread
                errors.append(exc)

        with watching(lambda: bench_connections(mariadb_server, "app")) as connections, \
                watching(lambda: server_status(mariadb_server, "Prepared_stmt_count")) as prepared:
            threads = [threading.Thread(target=client, args=(n,)) for n in range(30)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        assert not errors, errors[:3]
        assert max(connections) <= 3, connections
        assert max(prepared) <= 3 * (4 + 1), prepared  # the cap, and a duplicate prepare closed right after
        assert "pinned" not in proxy.log()


# --- isolation: settings follow the client, never leak ---


def test_settings_follow_the_client_and_never_leak(tmp_path: Path, mariadb_server: MariaDBInstance) -> None:
    with running_proxy(tmp_path, mariadb=mariadb_server, mysql__pool={"max_connections": 1}) as proxy:
        with connect(proxy) as a:
            defaults = one(a, "SELECT @@sql_mode, @@time_zone, @@character_set_client, @@wait_timeout")
            a_thread = one(a, "SELECT @@pseudo_thread_id")[0]
            with a.cursor() as cur:
                cur.execute("SET sql_mode = 'ANSI_QUOTES', time_zone = '+03:00'")
                cur.execute("SET NAMES latin1")
                cur.execute("SET @@session.wait_timeout = 100 + 23")  # an expression: the server reports the value
            mine = ("ANSI_QUOTES", "+03:00", "latin1", 123)
            assert one(a, "SELECT @@sql_mode, @@time_zone, @@character_set_client, @@wait_timeout") == mine
            with connect(proxy) as b:  # the same single backend, right after A
                assert one(b, "SELECT @@pseudo_thread_id")[0] == a_thread
                assert one(b, "SELECT @@sql_mode, @@time_zone, @@character_set_client, @@wait_timeout") == defaults
                assert one(a, "SELECT @@sql_mode, @@time_zone, @@character_set_client, @@wait_timeout") == mine
                assert one(b, "SELECT @@sql_mode, @@time_zone, @@character_set_client, @@wait_timeout") == defaults
        assert "pinned" not in proxy.log()
    with running_proxy(tmp_path / "two", mariadb=mariadb_server, mysql__pool={"max_connections": 2}) as proxy:
        with connect(proxy) as a, connect(proxy) as b:
            with a.cursor() as cur:
                cur.execute("SET sql_mode = CONCAT(@@sql_mode, ',ANSI_QUOTES'), time_zone = '+03:00'")
            mode = one(a, "SELECT @@sql_mode")[0]
            assert "ANSI_QUOTES" in str(mode)
            seen = set()
            for _ in range(6):  # B holds one backend in a transaction now and then: A lands on both
                b.begin()
                b_thread = one(b, "SELECT @@pseudo_thread_id")[0]
                a_thread, a_mode, a_zone = one(a, "SELECT @@pseudo_thread_id, @@sql_mode, @@time_zone")
                assert (a_mode, a_zone) == (mode, "+03:00") and a_thread != b_thread
                assert "ANSI_QUOTES" not in str(one(b, "SELECT @@sql_mode")[0])
                b.commit()
                seen.add(a_thread)
                a_thread, a_zone = one(a, "SELECT @@pseudo_thread_id, @@time_zone")  # B holds nothing now
                assert a_zone == "+03:00"
                seen.add(a_thread)
                assert one(b, "SELECT @@time_zone") == ("SYSTEM",)
            assert len(seen) == 2, seen
            assert one(a, "SET STATEMENT time_zone = '+05:00' FOR SELECT @@time_zone") == ("+05:00",)
            with a.cursor() as cur:  # drivers narrow the server's session tracking: the proxy's stays on
                cur.execute("SET session_track_system_variables = 'autocommit'")
                cur.execute("SET time_zone = CONCAT('+0', '4:00')")
            for _ in range(2):
                b.begin()
                one(b, "SELECT 1")
                assert one(a, "SELECT @@time_zone, @@sql_mode") == ("+04:00", mode)
                b.commit()
                assert one(a, "SELECT @@time_zone") == ("+04:00",)
        assert "pinned" not in proxy.log()


def test_user_variables_are_tracked_or_pin(tmp_path: Path, mariadb_server: MariaDBInstance) -> None:
    with running_proxy(tmp_path, mariadb=mariadb_server, mysql__pool={"max_connections": 1}) as proxy:
        with connect(proxy) as a, connect(proxy) as b:
            with a.cursor() as cur:
                cur.execute("SET @x = 41, @s := 'it''s'")
            assert one(b, "SELECT @x, @s") == (None, None)
            assert one(a, "SELECT @x + 1, @s") == (42, "it's")
            assert one(b, "SELECT @x") == (None,)
            with a.cursor() as cur:
                cur.execute("SET @x = NULL")
            assert one(a, "SELECT @x, @s") == (None, "it's")
        assert "pinned" not in proxy.log()
        with connect(proxy) as a:
            with a.cursor() as cur:
                cur.execute("SELECT 7 INTO @y")  # set from a query: cannot be replayed, pins
            proxy.wait_for_log(r"pinned to .*: user variable")
            assert one(a, "SELECT @y") == (7,)
        with connect(proxy) as b:  # the pinned client left: its backend was reset before reuse
            assert one(b, "SELECT @y, @s") == (None, None)


# --- precise pinning ---


def test_temporary_table_pins_then_unpins(tmp_path: Path, mariadb_server: MariaDBInstance) -> None:
    with running_proxy(tmp_path, mariadb=mariadb_server, server={"metrics_port": 0},
                       mysql__pool={"max_connections": 1, "connection_borrow_timeout": 1.0}) as proxy:
        with connect(proxy) as a:
            with a.cursor() as cur:
                cur.execute("CREATE TEMPORARY TABLE scratch (n int)")
                cur.execute("INSERT INTO scratch VALUES (1), (2)")
            proxy.wait_for_log(r"pinned to .*: temporary table")
            assert metric_value(metrics(proxy), "dbproxy_session_pins_total", reason="temporary table") == 1
            assert metric_value(metrics(proxy), "dbproxy_database_connections_currently_session_pinned") == 1
            with pytest.raises(pymysql.err.OperationalError) as info, connect(proxy) as b:
                one(b, "SELECT 1")  # the only backend is A's while the table lives
            assert info.value.args[0] == 1040
            assert one(a, "SELECT count(*) FROM scratch") == (2,)  # and it still works
            with a.cursor() as cur:
                cur.execute("DROP TEMPORARY TABLE scratch")
            proxy.wait_for_log("unpinned: temporary table ended")
            with connect(proxy) as b:
                assert one(b, "SELECT 1") == (1,)  # A multiplexes again
                assert one(a, "SELECT 2") == (2,)
            assert metric_value(metrics(proxy), "dbproxy_database_connections_currently_session_pinned") == 0


def test_locks_and_found_rows_pin_until_released(tmp_path: Path, mariadb_server: MariaDBInstance) -> None:
    mariadb_server.sql("CREATE TABLE IF NOT EXISTS app.locked (n int); DELETE FROM app.locked;"
                       "INSERT INTO app.locked VALUES (1), (2), (3)")
    with running_proxy(tmp_path, mariadb=mariadb_server, server={"metrics_port": 0},
                       mysql__pool={"max_connections": 2}) as proxy:
        with connect(proxy) as a, connect(proxy) as b:
            assert one(a, "SELECT GET_LOCK('dbproxy-test', 5)") == (1,)
            proxy.wait_for_log(r"pinned to .*: GET_LOCK")
            for _ in range(3):  # B moves between backends; A keeps its lock on its own
                assert one(b, "SELECT IS_USED_LOCK('dbproxy-test') IS NOT NULL") == (1,)
                assert one(a, "SELECT IS_USED_LOCK('dbproxy-test') = @@pseudo_thread_id") == (1,)
            assert one(a, "SELECT RELEASE_LOCK('dbproxy-test')") == (1,)
            proxy.wait_for_log("unpinned: GET_LOCK ended")
            with a.cursor() as cur:
                cur.execute("LOCK TABLES locked READ")
                cur.execute("SELECT count(*) FROM locked")
                assert cur.fetchone() == (3,)
                cur.execute("UNLOCK TABLES")
            proxy.wait_for_log("unpinned: LOCK TABLES ended")
            for _ in range(3):
                b.begin()
                one(b, "SELECT 1")  # B holds a backend: A's next statement may land on the other one
                assert one(a, "SELECT SQL_CALC_FOUND_ROWS n FROM locked ORDER BY n LIMIT 1") == (1,)
                assert one(a, "SELECT FOUND_ROWS()") == (3,)
                b.commit()
            proxy.wait_for_log("unpinned: SQL_CALC_FOUND_ROWS ended")
        text = metrics(proxy)
        for reason, count in (("GET_LOCK", 1), ("LOCK TABLES", 1), ("SQL_CALC_FOUND_ROWS", 3)):
            assert metric_value(text, "dbproxy_session_pins_total", reason=reason) == count, text
        assert metric_value(text, "dbproxy_database_connections_currently_session_pinned") == 0


def test_last_insert_id_follows_the_client(tmp_path: Path, mariadb_server: MariaDBInstance) -> None:
    mariadb_server.sql("CREATE TABLE IF NOT EXISTS app.auto (id int AUTO_INCREMENT PRIMARY KEY, v int)")
    with running_proxy(tmp_path, mariadb=mariadb_server, mysql__pool={"max_connections": 2}) as proxy:
        with connect(proxy) as a, connect(proxy) as b:
            for _ in range(3):
                with a.cursor() as cur:
                    cur.execute("INSERT INTO auto (v) VALUES (1)")
                    inserted = cur.lastrowid
                with b.cursor() as cur:
                    cur.execute("INSERT INTO auto (v) VALUES (2)")
                b.begin()
                one(b, "SELECT 1")  # B holds the backend A last used (the pool is LIFO)
                assert one(a, "SELECT LAST_INSERT_ID()") == (inserted,)
                b.commit()
        assert "pinned" not in proxy.log()


def test_pinning_filter_exclude_variable_sets(tmp_path: Path, mariadb_server: MariaDBInstance) -> None:
    with running_proxy(tmp_path, mariadb=mariadb_server) as proxy:
        with connect(proxy) as a:
            with a.cursor() as cur:
                cur.execute("SET @n = @@wait_timeout + 1")
        proxy.wait_for_log(r"pinned to .*: user variable")
    with running_proxy(tmp_path / "filtered", mariadb=mariadb_server,
                       mysql={"session_pinning_filters": ["exclude_variable_sets"]}) as proxy:
        with connect(proxy) as a:
            with a.cursor() as cur:
                cur.execute("SET @n = @@wait_timeout + 1")
                cur.execute("CREATE TEMPORARY TABLE still_pins (a int)")  # the filter is about SET only
        proxy.wait_for_log(r"pinned to .*: temporary table")
        assert "user variable" not in proxy.log()


# --- the binary protocol, byte by byte ---


class Client(RawClient):
    """RawClient with a choice of capabilities and whole responses read through the codec's tracker."""

    def login_with(self, caps: int, user: str = "app", password: str = "app-secret") -> None:
        greeting = self.read_greeting()
        scramble = scramble_native_password(password.encode(), greeting.auth_plugin_data)
        self.caps = caps
        self.send(frame(HandshakeResponse41(caps, user, scramble, user, my.MYSQL_NATIVE_PASSWORD).build(), 1))
        _, payload = self.packet()
        assert payload[0] == 0x00, payload

    def command(self, payload: bytes) -> list[bytes]:
        self.send(frame(payload, 0))
        tracker = ResponseTracker()
        if tracker.start(payload[0], bool(self.caps & my.CLIENT_DEPRECATE_EOF)):
            return []
        packets = []
        while True:
            _, packet = self.packet()
            packets.append(packet)
            if tracker.feed(packet):
                return packets

    def prepare(self, sql: str) -> tuple[int, int]:
        packets = self.command(bytes((my.COM_STMT_PREPARE,)) + sql.encode())
        assert packets[0][0] == 0, packets[0]
        statement, _columns, params = struct.unpack_from("<IHH", packets[0], 1)
        return statement, params

    def execute(self, statement: int, values: list[int], *, types: bool, flags: int = 0) -> list[bytes]:
        body = struct.pack("<BIBI", my.COM_STMT_EXECUTE, statement, flags, 1)
        if values:
            body += b"\x00" * ((len(values) + 7) // 8) + (b"\x01" + b"\x08\x00" * len(values) if types else b"\x00")
            body += b"".join(struct.pack("<q", value) for value in values)
        return self.command(body)


def int_rows(packets: list[bytes]) -> list[tuple[int, ...]]:
    """BIGINT columns of binary result rows."""
    rows = []
    for packet in packets:
        if packet[0] == 0x00 and len(packet) > 1:  # a binary row: header, NULL bitmap, values
            count = (len(packet) - 2) // 8
            rows.append(struct.unpack_from(f"<{count}q", packet, 2))
    return rows


def test_parameter_types_follow_the_statement_to_another_backend(tmp_path: Path,
                                                                 mariadb_server: MariaDBInstance) -> None:
    """libmysqlclient sends parameter types with the first execution only; another backend still gets them."""
    with running_proxy(tmp_path, mariadb=mariadb_server, mysql__pool={"max_connections": 2}) as proxy:
        raw = Client(proxy.ports["mysql"])
        raw.login_with(CAPS)
        statement, params = raw.prepare("SELECT ? + 1, CAST(@@pseudo_thread_id AS SIGNED)")
        assert (statement, params) == (1, 1)  # the proxy's own statement ids
        [(value, first)] = int_rows(raw.execute(statement, [41], types=True))
        assert value == 42
        threads = {first}
        other = Client(proxy.ports["mysql"])  # the same capabilities: the same pool
        other.login_with(CAPS)
        for n in range(4):
            other.command(b"\x03BEGIN")  # holds the backend the raw client used last (the pool is LIFO)
            [(value, thread)] = int_rows(raw.execute(statement, [n], types=False))
            assert value == n + 1
            threads.add(thread)
            other.command(b"\x03COMMIT")
        other.close()
        assert len(threads) == 2
        missing = raw.execute(99, [1], types=True)
        assert ErrPacket.parse(missing[0]).error_code == my.ER_UNKNOWN_STMT_HANDLER
        raw.send(frame(struct.pack("<BI", my.COM_STMT_CLOSE, statement), 0))  # no response
        gone = raw.execute(statement, [1], types=True)
        assert ErrPacket.parse(gone[0]).error_code == my.ER_UNKNOWN_STMT_HANDLER
        raw.close()
        assert "pinned" not in proxy.log()


def test_server_cursor_keeps_the_backend_until_exhausted(tmp_path: Path, mariadb_server: MariaDBInstance) -> None:
    with running_proxy(tmp_path, mariadb=mariadb_server,
                       mysql__pool={"max_connections": 1, "connection_borrow_timeout": 1.0}) as proxy:
        raw = Client(proxy.ports["mysql"])
        raw.login_with(CAPS)
        statement, _ = raw.prepare("SELECT seq FROM seq_1_to_10")
        opened = raw.execute(statement, [], types=False, flags=my.CURSOR_TYPE_READ_ONLY)
        assert opened[-1][0] == 0xFE and struct.unpack_from("<H", opened[-1], 3)[0] & my.SERVER_STATUS_CURSOR_EXISTS
        fetched = raw.command(struct.pack("<BII", my.COM_STMT_FETCH, statement, 4))
        assert len(int_rows(fetched)) == 4
        with pytest.raises(pymysql.err.OperationalError), connect(proxy) as other:
            one(other, "SELECT 1")  # the cursor holds the only backend
        rest = raw.command(struct.pack("<BII", my.COM_STMT_FETCH, statement, 100))
        assert len(int_rows(rest)) == 6
        assert struct.unpack_from("<H", rest[-1], 3)[0] & my.SERVER_STATUS_LAST_ROW_SENT
        with connect(proxy) as other:
            assert one(other, "SELECT 1") == (1,)  # exhausted: the backend went back to the pool
        raw.close()


@pytest.mark.parametrize("session_track", [False, True])
def test_session_state_reaches_only_clients_that_asked(tmp_path: Path, mariadb_server: MariaDBInstance,
                                                       session_track: bool) -> None:
    """Backends always track session state; a client without CLIENT_SESSION_TRACK gets OK packets without it."""
    with running_proxy(tmp_path, mariadb=mariadb_server) as proxy:
        raw = Client(proxy.ports["mysql"])
        caps = CAPS | my.CLIENT_DEPRECATE_EOF | (my.CLIENT_SESSION_TRACK if session_track else 0)
        raw.login_with(caps)
        [ok] = raw.command(b"\x03SET time_zone = '+02:00'")
        parsed = OkPacket.parse(ok, caps)
        if session_track:
            assert parsed.status_flags & my.SERVER_SESSION_STATE_CHANGED
            assert parsed.session_state_info is not None
            assert (my.SESSION_TRACK_SYSTEM_VARIABLES, b"\ttime_zone\x06+02:00") in parse_session_state(
                parsed.session_state_info)
        else:
            assert ok == b"\x00\x00\x00\x02\x00\x00\x00"  # what the server sends a client without tracking
        packets = raw.command(b"\x03SELECT @@time_zone")
        assert packets[2] == b"\x06+02:00"
        raw.close()


def test_statement_keeps_the_database_it_was_prepared_in(tmp_path: Path, mariadb_server: MariaDBInstance) -> None:
    """Prepared in app2, executed after USE app on a backend that never saw it: still reads app2's table."""
    mariadb_server.sql("CREATE DATABASE IF NOT EXISTS app2; GRANT ALL ON app2.* TO 'app'@'%';"
                       "CREATE TABLE IF NOT EXISTS app2.marker (x int); DELETE FROM app2.marker;"
                       "INSERT INTO app2.marker VALUES (42)")
    with running_proxy(tmp_path, mariadb=mariadb_server) as proxy:
        conn = mysql.connector.connect(host="127.0.0.1", port=proxy.ports["mysql"], user="app", password="app-secret",
                                       database="app2", use_pure=True, autocommit=True, ssl_disabled=True)
        try:
            prepared = conn.cursor(prepared=True)
            prepared.execute("SELECT x, DATABASE() FROM marker WHERE x > ?", (1,))
            assert prepared.fetchall() == [(42, "app2")]
            conn.cmd_init_db("app")  # another pool, another backend
            prepared.execute("SELECT x, DATABASE() FROM marker WHERE x > ?", (1,))
            assert prepared.fetchall() == [(42, "app2")]  # as on a direct connection: MariaDB keeps it from prepare
            cursor = conn.cursor()
            cursor.execute("SELECT DATABASE()")
            assert cursor.fetchall() == [("app",)]
        finally:
            conn.close()
        assert "pinned" not in proxy.log()
