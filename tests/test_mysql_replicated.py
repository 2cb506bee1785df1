"""MySQL through the proxy against a replicated MariaDB (binary log + GTIDs), with fewer backends than clients:
read-only variables the server reports, character sets sharing one budget, an unreachable or stopping server."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiomysql
import mysql.connector
import pymysql
import pytest

from devtools.servers import MARIADB_CLIENT, DevServerError, MariaDBInstance, free_port, start_mariadb
from proxy.auth.mysql import scramble_native_password
from proxy.protocol.mysql import constants as my
from proxy.protocol.mysql.packets import ErrPacket, HandshakeResponse41, HandshakeV10, OkPacket, PacketReader, frame
from rawmysql import CAPS, RawClient
from support import ProxyProcess, running_proxy

SMALL_POOL = {"max_connections": 2, "connection_borrow_timeout": 20.0}


@pytest.fixture(scope="module")
def small_proxy(tmp_path_factory: pytest.TempPathFactory, mariadb_server: MariaDBInstance) -> Iterator[ProxyProcess]:
    """Transaction mode, two backends for every client of the target."""
    with running_proxy(tmp_path_factory.mktemp("replicated"), mariadb=mariadb_server, mysql__pool=SMALL_POOL,
                       server={"client_login_timeout": 5.0}) as proxy:
        yield proxy


def connect(proxy: ProxyProcess, **extra: Any) -> pymysql.Connection:
    kwargs: dict[str, Any] = {"host": "127.0.0.1", "port": proxy.ports["mysql"], "user": "app",
                              "password": "app-secret", "database": "app", "ssl_disabled": True,
                              "read_timeout": 60}
    kwargs.update(extra)
    return pymysql.connect(**kwargs)


# --- 8.2: read-only variables the server reports are not re-applied ---


def test_pymysql_autocommit_off_after_another_clients_commit(small_proxy: ProxyProcess) -> None:
    """The issue's repro: A creates a table, B inserts and commits, A runs anything (last_gtid was re-applied)."""
    clients = [connect(small_proxy, autocommit=False) for _ in range(4)]
    try:
        a, b = clients[0], clients[1]
        with a.cursor() as cur:
            cur.execute("DROP TABLE IF EXISTS ro_repro")
            cur.execute("CREATE TABLE ro_repro (id INT PRIMARY KEY, who VARCHAR(10))")
        for round_ in range(5):
            for n, conn in enumerate(clients):
                with conn.cursor() as cur:
                    cur.execute("INSERT INTO ro_repro VALUES (%s, %s)", (round_ * 10 + n, f"c{n}"))
                conn.commit()
            with a.cursor() as cur:
                cur.execute("SELECT COUNT(*) FROM ro_repro")
                assert cur.fetchone() == ((round_ + 1) * 4,)
            a.commit()
            with b.cursor() as cur:
                cur.execute("SELECT @@last_gtid <> ''")
                assert cur.fetchone() == (1,)
            b.commit()
    finally:
        for conn in clients:
            conn.close()
    assert "read only variable" not in small_proxy.log()


def test_a_setting_the_server_refuses_to_reapply_is_dropped_not_the_client(
        small_proxy: ProxyProcess, mariadb_server: MariaDBInstance) -> None:
    """sql_log_bin was set while the user could; on a new backend after a REVOKE the re-apply fails (1227): the
    setting leaves the session with a log line, the client's statement runs and the client stays."""
    mariadb_server.sql("GRANT BINLOG ADMIN ON *.* TO 'bench'@'%'")
    client = connect(small_proxy, autocommit=True, user="bench", password="bench-secret", database="bench")
    try:
        with client.cursor() as cur:
            cur.execute("SET SESSION sql_log_bin = 0")
            cur.execute("SELECT @@SESSION.sql_log_bin")
            assert cur.fetchone() == (0,)
        mariadb_server.sql("REVOKE BINLOG ADMIN ON *.* FROM 'bench'@'%'")
        threads = mariadb_server.sql("SELECT id FROM information_schema.processlist WHERE user = 'bench'")
        mariadb_server.sql("".join(f"KILL {thread};" for thread in threads.split()))
        time.sleep(0.5)
        with client.cursor() as cur:
            cur.execute("SELECT @@SESSION.sql_log_bin, 1 + 1")
            assert cur.fetchone() == (1, 2)
            cur.execute("SELECT 3")
            assert cur.fetchone() == (3,)
    finally:
        client.close()
        with contextlib.suppress(DevServerError):  # (already revoked when the test got that far)
            mariadb_server.sql("REVOKE BINLOG ADMIN ON *.* FROM 'bench'@'%'")
    small_proxy.wait_for_log(r"session variable sql_log_bin could not be set again")


def _schema_change_workload(port: int, table: str) -> None:
    """mysql-connector threads and aiomysql tasks insert and read, autocommit off, while the table is altered."""
    setup = mysql.connector.connect(host="127.0.0.1", port=port, user="app", password="app-secret", database="app",
                                    use_pure=True, ssl_disabled=True)
    cur = setup.cursor()
    cur.execute(f"DROP TABLE IF EXISTS {table}")
    cur.execute(f"CREATE TABLE {table} (id INT AUTO_INCREMENT PRIMARY KEY, who VARCHAR(20))")
    setup.commit()
    errors: list[BaseException] = []

    def connector_worker(n: int) -> None:
        try:
            conn = mysql.connector.connect(host="127.0.0.1", port=port, user="app", password="app-secret",
                                           database="app", autocommit=False, use_pure=True, ssl_disabled=True)
            cursor = conn.cursor()
            for i in range(15):
                cursor.execute(f"INSERT INTO {table} (who) VALUES (%s)", (f"connector{n}-{i}",))
                conn.commit()
                cursor.execute(f"SELECT COUNT(*) FROM {table}")
                cursor.fetchall()
                conn.commit()
            conn.close()
        except BaseException as exc:
            errors.append(exc)

    async def aiomysql_worker(n: int) -> None:
        conn = await aiomysql.connect(host="127.0.0.1", port=port, user="app", password="app-secret", db="app",
                                      autocommit=False)
        try:
            async with conn.cursor() as acur:
                for i in range(15):
                    await acur.execute(f"INSERT INTO {table} (who) VALUES (%s)", (f"aio{n}-{i}",))
                    await conn.commit()
                    await acur.execute(f"SELECT COUNT(*) FROM {table}")
                    await acur.fetchall()
                    await conn.commit()
                    if n == 0 and i == 7:  # the schema changes in the middle
                        await acur.execute(f"ALTER TABLE {table} ADD COLUMN note VARCHAR(10) DEFAULT 'x'")
        finally:
            conn.close()

    async def aio_all() -> None:
        await asyncio.gather(*(aiomysql_worker(n) for n in range(3)))

    threads = [threading.Thread(target=connector_worker, args=(n,)) for n in range(3)]
    for thread in threads:
        thread.start()
    asyncio.run(aio_all())
    for thread in threads:
        thread.join(120)
    assert not errors, errors
    cur.execute(f"SELECT COUNT(*), SUM(note = 'x') FROM {table}")
    count, _ = cur.fetchone()  # type: ignore[misc]
    assert count == 6 * 15
    setup.close()


def test_connector_and_aiomysql_with_a_schema_change(small_proxy: ProxyProcess) -> None:
    _schema_change_workload(small_proxy.ports["mysql"], "ro_schema_change")


# --- 8.5: clients of another character set share the backends, in turn ---


def test_a_utf8mb3_client_is_served_while_utf8mb4_clients_hold_every_backend(small_proxy: ProxyProcess) -> None:
    stop = threading.Event()
    errors: list[BaseException] = []

    def busy() -> None:
        try:
            conn = connect(small_proxy, autocommit=True, charset="utf8mb4")
            with conn.cursor() as cur:
                while not stop.is_set():
                    cur.execute("SELECT SLEEP(0.3)")
                    cur.fetchall()
            conn.close()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=busy) for _ in range(5)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(2.0)  # every backend is in use, and clients wait
        started = time.monotonic()
        other = connect(small_proxy, autocommit=True, charset="utf8mb3")
        with other.cursor() as cur:
            cur.execute("SELECT @@character_set_client, @@collation_connection, CHAR_LENGTH('é')")
            assert cur.fetchone() == ("utf8mb3", "utf8mb3_general_ci", 1)
        elapsed = time.monotonic() - started
        other.close()
        # and the utf8mb4 clients keep their own character set on the backends the other one used
        check = connect(small_proxy, autocommit=True, charset="utf8mb4")
        with check.cursor() as cur:
            for _ in range(4):
                cur.execute("SELECT @@character_set_client, @@character_set_results, _utf8mb4'😀' = '😀'")
                assert cur.fetchone() == ("utf8mb4", "utf8mb4", 1)
        check.close()
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
    assert not errors, errors
    assert elapsed < SMALL_POOL["connection_borrow_timeout"]


def _raw_login(port: int, charset: int) -> RawClient:
    """A raw client logged in as app with the given collation id (CAPS: one pool for all of them)."""
    raw = RawClient(port)
    greeting = raw.read_greeting()
    scramble = scramble_native_password(b"app-secret", greeting.auth_plugin_data)
    raw.send(frame(HandshakeResponse41(CAPS, "app", scramble, "app", my.MYSQL_NATIVE_PASSWORD,
                                       charset=charset).build(), 1))
    assert raw.packet()[1][:1] == b"\x00"
    return raw


def test_a_reset_keeps_the_clients_character_set(tmp_path: Path, mariadb_server: MariaDBInstance) -> None:
    """COM_RESET_CONNECTION goes back to the login's character set: the client's, not the backend's."""
    with running_proxy(tmp_path, mariadb=mariadb_server, mysql__pool={"max_connections": 1}) as proxy:
        opener = _raw_login(proxy.ports["mysql"], 45)  # the backend logs in as utf8mb4_general_ci
        other = _raw_login(proxy.ports["mysql"], 33)  # utf8mb3_general_ci
        try:
            assert opener.query("SELECT 1")[-2] == b"\x011"
            assert other.query("BEGIN")[0][:1] == b"\x00"  # linked to the one backend
            query = b"\x03SELECT @@character_set_client, @@collation_connection"
            other.send(frame(bytes((my.COM_RESET_CONNECTION,)), 0) + frame(query, 0))  # on the same backend
            assert other.packet()[1][:1] == b"\x00"
            packets = [other.packet()[1] for _ in range(6)]  # count, 2 columns, EOF, row, EOF
            assert packets[4] == b"\x07utf8mb3\x12utf8mb3_general_ci", packets
            assert opener.query("SELECT @@character_set_client")[-2] == b"\x07utf8mb4"
        finally:
            other.close()
            opener.close()


def test_another_users_client_is_served_while_one_user_holds_every_backend(small_proxy: ProxyProcess) -> None:
    """Pools of different users share the target's budget: a backend given back goes to whoever waited longest."""
    stop = threading.Event()
    errors: list[BaseException] = []

    def busy() -> None:
        try:
            conn = connect(small_proxy, autocommit=True)
            with conn.cursor() as cur:
                while not stop.is_set():
                    cur.execute("SELECT SLEEP(0.3)")
                    cur.fetchall()
            conn.close()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=busy) for _ in range(5)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(2.0)
        started = time.monotonic()
        other = connect(small_proxy, autocommit=True, user="bench", password="bench-secret", database="bench")
        with other.cursor() as cur:
            cur.execute("SELECT CURRENT_USER()")
            assert cur.fetchone() == ("bench@%",)
        elapsed = time.monotonic() - started
        other.close()
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
    assert not errors, errors
    assert elapsed < SMALL_POOL["connection_borrow_timeout"] / 2, elapsed


def test_a_login_that_cannot_get_a_backend_gets_the_borrow_timeout(tmp_path: Path,
                                                                   mariadb_server: MariaDBInstance) -> None:
    """Session mode, one backend: the second client's login waits for it; it hears 1040, not 1159."""
    with running_proxy(tmp_path, mariadb=mariadb_server,
                       mysql__pool={"max_connections": 1, "mode": "session", "connection_borrow_timeout": 2.0},
                       server={"client_login_timeout": 1.0}) as proxy:
        holder = connect(proxy, autocommit=True)
        try:
            with pytest.raises(pymysql.err.OperationalError) as info:
                connect(proxy, autocommit=True)
            assert info.value.args[0] == 1040, info.value.args
        finally:
            holder.close()


# --- 9.6: an unreachable backend; the server's own termination error ---


@pytest.fixture
def unreachable_proxy(tmp_path: Path) -> Iterator[tuple[ProxyProcess, int]]:
    port = free_port()  # nothing listens there
    dead = MariaDBInstance(datadir=tmp_path / "none", port=port, socket_path=tmp_path / "none.sock")
    with running_proxy(tmp_path, mariadb=dead, mysql={"backend_connect_timeout": 2.0}) as proxy:
        yield proxy, port


def test_unreachable_backend_raw_greeting_then_2003(unreachable_proxy: tuple[ProxyProcess, int]) -> None:
    proxy, port = unreachable_proxy
    raw = RawClient(proxy.ports["mysql"], timeout=20)
    try:
        seq, payload = raw.packet()
        assert (seq, payload[0]) == (0, 10), payload  # a greeting the client can parse
        greeting = HandshakeV10.parse(payload)
        scramble = scramble_native_password(b"app-secret", greeting.auth_plugin_data)
        response = HandshakeResponse41(CAPS, "app", scramble, "app", my.MYSQL_NATIVE_PASSWORD)
        raw.send(frame(response.build(), 1))
        seq, payload = raw.packet()
        assert payload[0] == 0xFF, payload
        err = ErrPacket.parse(payload)
        assert err.error_code == 2003, err
        assert f"127.0.0.1:{port}" in err.message
        assert greeting.capabilities & my.CLIENT_PROTOCOL_41
    finally:
        raw.close()


def test_unreachable_backend_pymysql_sees_2003(unreachable_proxy: tuple[ProxyProcess, int]) -> None:
    proxy, port = unreachable_proxy
    with pytest.raises(pymysql.err.OperationalError) as info:
        connect(proxy, connect_timeout=20)
    assert info.value.args[0] == 2003, info.value.args
    assert f"127.0.0.1:{port}" in info.value.args[1]


def test_unreachable_backend_mariadb_cli_shows_the_reason(unreachable_proxy: tuple[ProxyProcess, int]) -> None:
    """The issue's symptom was the CLI's `Received malformed packet`: it must show the proxy's reason. (libmariadb
    takes any errno of the client range, 2003 included, from a server for a malformed packet: it gets 1429.)"""
    proxy, port = unreachable_proxy
    result = subprocess.run(
        [MARIADB_CLIENT, "--no-defaults", "--protocol=TCP", "-h", "127.0.0.1", "-P", str(proxy.ports["mysql"]),
         "-u", "app", "-papp-secret", "-e", "SELECT 1"],
        capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode != 0
    assert "ERROR 1429 (08S01)" in result.stderr, result.stderr
    assert f"127.0.0.1:{port}" in result.stderr and "malformed" not in result.stderr


def test_mariadb_stopping_mid_query_gives_one_error(tmp_path: Path) -> None:
    """MariaDB closes its sessions without an error of its own when it stops: the read in flight waits for a server
    to run it again (see mysql_failover) and, with none within the borrow timeout, the client hears one error (not a
    malformed packet for the C library) and keeps its connection."""
    server = start_mariadb(tmp_path / "db", users={"app": "app-secret"})
    try:
        with running_proxy(tmp_path / "proxy", mariadb=server,
                           **{"mysql.pool": {"connection_borrow_timeout": 2.0}}) as proxy:
            raw = RawClient(proxy.ports["mysql"], timeout=30)
            raw.login()
            raw.send(frame(b"\x03SELECT SLEEP(20)", 0))
            cli = subprocess.Popen(
                [MARIADB_CLIENT, "--no-defaults", "--protocol=TCP", "-h", "127.0.0.1", "-P", str(proxy.ports["mysql"]),
                 "-u", "app", "-papp-secret", "-e", "SELECT SLEEP(20)"], stderr=subprocess.PIPE, text=True)
            time.sleep(1.0)
            server.stop()
            _, payload = raw.packet()
            assert payload[:1] == b"\xff", payload
            assert ErrPacket.parse(payload).error_code == 1040  # (the borrow timed out)
            assert raw.query("SELECT 1")[0][:1] == b"\xff"  # still no server; the connection stays
            raw.close()
            _, cli_errors = cli.communicate(timeout=30)
            assert "ERROR 1040 (08004)" in cli_errors and "malformed" not in cli_errors, cli_errors
    finally:
        server.stop()


def _error_codes(raw: RawClient) -> list[int]:
    """The errno of every ERR packet until the proxy closes the connection."""
    codes = []
    try:
        while True:
            _, payload = raw.packet()
            if payload[:1] == b"\xff":
                codes.append(ErrPacket.parse(payload).error_code)
    except (TimeoutError, ConnectionError, OSError):
        pass
    return codes


SHUTDOWN = ErrPacket(1053, "Server shutdown in progress", "08S01").build()


async def _scripted_mysql(handled: list[bytes]) -> asyncio.Server:
    """A MySQL 8-like server that ends sessions with ER_SERVER_SHUTDOWN (1053): as the answer to SLEEP, and
    unsolicited a moment after BEGIN."""
    column = b"\x03def\x00\x00\x00\x01x\x00\x0c?\x00\x15\x00\x00\x00\x08\x80\x00\x00\x00\x00"
    eof = b"\xfe\x00\x00\x02\x00"

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        packets = PacketReader()

        async def packet() -> tuple[int, bytes]:
            while (got := packets.next_packet()) is None:
                data = await reader.read(65536)
                if not data:
                    raise ConnectionResetError
                packets.feed(data)
            return got

        caps = (my.DEFAULT_SERVER_CAPABILITIES | my.CLIENT_MYSQL) & ~my.CLIENT_SSL
        writer.write(frame(HandshakeV10("8.0.36", 7, bytes(range(65, 85)), caps).build(), 0))
        try:
            seq, _ = await packet()
            writer.write(frame(OkPacket().build(), seq + 1))
            while True:
                _, payload = await packet()
                handled.append(payload)
                command, text = payload[0], payload[1:].upper()
                if command == my.COM_QUIT:
                    break
                if command != my.COM_QUERY or text.startswith(b"SET"):
                    writer.write(frame(OkPacket().build(), 1))
                elif text.startswith(b"SELECT @@MAX_CONNECTIONS"):
                    rows = [b"\x02", column, column, eof, b"\x0242\x0516382", eof]
                    writer.write(b"".join(frame(item, n + 1) for n, item in enumerate(rows)))
                elif b"INFORMATION_SCHEMA" in text:
                    writer.write(frame(ErrPacket(1109, "Unknown table", "42S02").build(), 1))
                elif text.startswith(b"SELECT SLEEP"):
                    await asyncio.sleep(0.3)
                    writer.write(frame(SHUTDOWN, 1))
                    break
                elif text.startswith(b"BEGIN"):
                    status = my.SERVER_STATUS_AUTOCOMMIT | my.SERVER_STATUS_IN_TRANS
                    writer.write(frame(OkPacket(status_flags=status).build(), 1))
                    await writer.drain()
                    await asyncio.sleep(0.5)
                    writer.write(frame(SHUTDOWN, 0))
                    break
                else:
                    writer.write(frame(OkPacket().build(), 1))
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        writer.close()

    return await asyncio.start_server(handle, "127.0.0.1", 0)


async def test_server_termination_error_reaches_the_client_once(tmp_path: Path) -> None:
    """As the answer to a read, the server's 1053 makes the proxy run the read again on another backend; refused
    that way each time, the client gets the server's 1053 once and stays. Sent unsolicited inside a transaction,
    the transaction is replayed; ended again and again, the client's next statement gets ER_LOCK_DEADLOCK (its
    transaction is gone), its ROLLBACK succeeds and it goes on."""
    handled: list[bytes] = []
    server = await _scripted_mysql(handled)
    port = server.sockets[0].getsockname()[1]
    stand_in = MariaDBInstance(datadir=tmp_path / "none", port=port, socket_path=tmp_path / "none.sock")

    def client() -> tuple[bytes, bytes, bytes, bytes, bytes]:
        with running_proxy(tmp_path, mariadb=stand_in) as proxy:
            raw = RawClient(proxy.ports["mysql"], timeout=30)
            raw.login()
            answered = raw.query("SELECT SLEEP(20)")[0]
            after = raw.query("SELECT 1")[0]
            began = raw.query("BEGIN")[0]
            time.sleep(3.0)  # (each replay of the BEGIN is ended again half a second later)
            lost = raw.query("SELECT 2")[0]
            rolled_back = raw.query("ROLLBACK")[0]
            raw.close()
            return answered, after, began, lost, rolled_back

    try:
        answered, after, began, lost, rolled_back = await asyncio.to_thread(client)
    finally:
        server.close()
    assert answered == SHUTDOWN
    assert after[:1] == b"\x00"
    assert began[:1] == b"\x00"
    assert lost[:1] == b"\xff" and ErrPacket.parse(lost).error_code == my.ER_LOCK_DEADLOCK
    assert rolled_back[:1] == b"\x00"
    assert handled.count(b"\x03SELECT SLEEP(20)") == 4  # the first run and three replays
    assert b"\x03BEGIN" in handled
