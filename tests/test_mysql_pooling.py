"""MySQL pooling against a real MariaDB: 500 clients on 10 backends, KILL mapping, sysbench, session mode, cleanup."""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import subprocess
import threading
import time
from pathlib import Path

import aiomysql
import mysql.connector
import pymysql
import pytest

from devtools.servers import MariaDBInstance
from support import ProxyProcess, mysql_backend_connections, running_proxy


def connect(proxy: ProxyProcess, user: str = "app", **extra: object) -> pymysql.Connection:
    kwargs: dict[str, object] = {"host": "127.0.0.1", "port": proxy.ports["mysql"], "user": user,
                                 "password": f"{user}-secret", "database": user, "autocommit": True,
                                 "ssl_disabled": True}
    kwargs.update(extra)
    return pymysql.connect(**kwargs)  # type: ignore[arg-type]


async def test_500_clients_share_at_most_10_backends(mysql_proxy: ProxyProcess,
                                                     mariadb_server: MariaDBInstance) -> None:
    port = mysql_proxy.ports["mysql"]
    peak = 0
    done = asyncio.Event()

    async def watch() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, await asyncio.to_thread(mysql_backend_connections, mariadb_server, "bench"))
            await asyncio.sleep(0.05)

    async def client(n: int) -> int:
        conn = await aiomysql.connect(host="127.0.0.1", port=port, user="bench", password="bench-secret",
                                      db="bench", autocommit=True)
        try:
            total = 0
            async with conn.cursor() as cur:
                for i in range(3):
                    await cur.execute("SELECT %s + %s, SLEEP(0.005)", (n, i))
                    total += (await cur.fetchone())[0]
                await conn.begin()
                await cur.execute("SELECT %s", (n,))
                total += (await cur.fetchone())[0]
                await conn.commit()
            return total
        finally:
            conn.close()

    watcher = asyncio.create_task(watch())
    try:
        results = await asyncio.gather(*(client(n) for n in range(500)))
    finally:
        done.set()
        await watcher
    assert results == [4 * n + 3 for n in range(500)]
    assert 1 <= peak <= 10, peak
    assert mysql_backend_connections(mariadb_server, "bench") <= 10


def test_kill_query_hits_only_that_clients_query(mysql_proxy: ProxyProcess) -> None:
    with connect(mysql_proxy) as victim, connect(mysql_proxy) as bystander, connect(mysql_proxy) as killer:
        outcome: dict[str, object] = {}

        def bystander_sleep() -> None:
            started = time.monotonic()
            with bystander.cursor() as cur:
                cur.execute("SELECT SLEEP(1.5)")
                outcome["bystander"] = (cur.fetchone(), time.monotonic() - started)

        thread = threading.Thread(target=bystander_sleep)
        thread.start()
        victim_id = victim.thread_id()
        timer = threading.Timer(0.5, lambda: killer.cursor().execute(f"KILL QUERY {victim_id}"))
        timer.start()
        started = time.monotonic()
        with victim.cursor() as cur:
            try:
                cur.execute("SELECT SLEEP(20)")
                interrupted = cur.fetchone() == (1,)  # MariaDB: SLEEP returns 1 when killed
            except pymysql.err.OperationalError as exc:
                interrupted = exc.args[0] == 1317
        assert interrupted
        assert time.monotonic() - started < 5
        thread.join()
        timer.join()
        result, elapsed = outcome["bystander"]  # type: ignore[misc]
        assert result == (0,) and 1.4 < elapsed < 5  # the bystander's query ran to its end
        with victim.cursor() as cur:
            cur.execute("SELECT 'still usable'")
            assert cur.fetchone() == ("still usable",)
        kcur = killer.cursor()
        with pytest.raises(pymysql.err.OperationalError) as info:
            kcur.execute("KILL QUERY 987654")
        assert info.value.args[0] == 1094
        kcur.execute(f"KILL {victim_id}")  # the connection: the victim is closed by the proxy
        with pytest.raises(pymysql.err.OperationalError):
            victim.cursor().execute("SELECT 1")
    mysql_proxy.wait_for_log(r"KILL QUERY sent for backend thread \d+")


def test_kill_of_another_users_connection_is_denied(mysql_proxy: ProxyProcess) -> None:
    with connect(mysql_proxy) as app, connect(mysql_proxy, "bench") as bench:
        with pytest.raises(pymysql.err.OperationalError) as info:
            bench.cursor().execute(f"KILL QUERY {app.thread_id()}")
        assert info.value.args[0] == 1095
        with app.cursor() as cur:
            cur.execute("SELECT 1")
            assert cur.fetchone() == (1,)


def test_mariadb_cli_ctrl_c_style_kill(mysql_proxy: ProxyProcess) -> None:
    """The CLI's own KILL path: a second connection sends KILL QUERY with the id from the handshake."""
    with connect(mysql_proxy) as victim:
        victim_id = victim.thread_id()
        result: dict[str, object] = {}

        def run() -> None:
            try:
                with victim.cursor() as cur:
                    cur.execute("SELECT SLEEP(20)")
                    result["row"] = cur.fetchone()
            except pymysql.err.OperationalError as exc:
                result["error"] = exc.args[0]

        thread = threading.Thread(target=run)
        thread.start()
        time.sleep(0.5)
        out = subprocess.run(["mariadb", "--no-defaults", "--protocol=TCP", "-h", "127.0.0.1", "-P",
                              str(mysql_proxy.ports["mysql"]), "-u", "app", "-papp-secret", "-e",
                              f"KILL QUERY {victim_id}"], capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stderr
        thread.join(10)
        assert result.get("row") == (1,) or result.get("error") == 1317


def _sysbench(port: int, test: str, threads: int, seconds: int, *extra: str) -> str:
    base = ["sysbench", test, "--db-driver=mysql", "--mysql-host=127.0.0.1", f"--mysql-port={port}",
            "--mysql-user=bench", "--mysql-password=bench-secret", "--mysql-db=bench", "--tables=2",
            "--table-size=10000", "--db-ps-mode=disable", "--mysql-ssl=off"]
    out = subprocess.run([*base, f"--threads={threads}", f"--time={seconds}", *extra, "run"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    return out.stdout


@pytest.fixture(scope="module")
def sysbench_tables(mariadb_server: MariaDBInstance) -> MariaDBInstance:
    subprocess.run(["sysbench", "oltp_read_write", "--db-driver=mysql", "--mysql-host=127.0.0.1",
                    f"--mysql-port={mariadb_server.port}", "--mysql-user=bench", "--mysql-password=bench-secret",
                    "--mysql-db=bench", "--tables=2", "--table-size=10000", "--mysql-ssl=off", "cleanup"],
                   capture_output=True, timeout=60)
    subprocess.run(["sysbench", "oltp_read_write", "--db-driver=mysql", "--mysql-host=127.0.0.1",
                    f"--mysql-port={mariadb_server.port}", "--mysql-user=bench", "--mysql-password=bench-secret",
                    "--mysql-db=bench", "--tables=2", "--table-size=10000", "--mysql-ssl=off", "prepare"],
                   capture_output=True, timeout=120, check=True)
    return mariadb_server


@pytest.mark.parametrize("test", ["oltp_point_select", "oltp_read_write"])
def test_sysbench(mysql_proxy: ProxyProcess, sysbench_tables: MariaDBInstance, test: str) -> None:
    out = _sysbench(mysql_proxy.ports["mysql"], test, 16 if test == "oltp_point_select" else 4, 3)
    transactions = int(re.search(r"transactions:\s+(\d+)", out).group(1))  # type: ignore[union-attr]
    # sysbench exits non-zero on any error except the ones its workload expects and retries (deadlock 1213,
    # 1020, lock wait 1205), which it counts as "ignored errors"; those happen directly against MariaDB too.
    retried = int(re.search(r"ignored errors:\s+(\d+)", out).group(1))  # type: ignore[union-attr]
    assert transactions > 100 and retried <= transactions // 100, out
    if test == "oltp_point_select":
        assert retried == 0, out
    assert mysql_backend_connections(sysbench_tables, "bench") <= 10


def test_session_mode_resets_the_backend(tmp_path: Path, mariadb_server: MariaDBInstance) -> None:
    with running_proxy(tmp_path, mariadb=mariadb_server,
                       mysql__pool={"mode": "session", "max_connections": 1}) as proxy:
        with connect(proxy) as first:
            cur = first.cursor()
            cur.execute("SET @leftover = 'x'")
            cur.execute("CREATE TEMPORARY TABLE scratch (a int)")
            cur.execute("SET autocommit = 0")
            cur.execute("SELECT @@pseudo_thread_id")
            (thread,) = cur.fetchone()
        with connect(proxy) as second:
            cur = second.cursor()
            cur.execute("SELECT @@pseudo_thread_id, @leftover, @@autocommit")
            assert cur.fetchone() == (thread, None, 1)  # the same backend, reset
            with pytest.raises(pymysql.err.ProgrammingError):
                cur.execute("SELECT * FROM scratch")


def test_pinned_client_keeps_its_session(tmp_path: Path, mariadb_server: MariaDBInstance) -> None:
    with running_proxy(tmp_path, mariadb=mariadb_server, mysql__pool={"max_connections": 2}) as proxy:
        with connect(proxy) as pinned, connect(proxy) as other:
            pcur, ocur = pinned.cursor(), other.cursor()
            pcur.execute("SET @mine = 41")
            pcur.execute("CREATE TEMPORARY TABLE t_scratch (a int)")
            for _ in range(3):
                ocur.execute("SELECT @mine")
                assert ocur.fetchone() == (None,)
                pcur.execute("SELECT @mine + 1, count(*) FROM t_scratch")
                assert pcur.fetchone() == (42, 0)
        # the pinned client left: its backend was reset before reuse
        proxy.wait_for_log("left inside a transaction or session; cleaning")
        with connect(proxy) as again:
            for _ in range(3):
                cur = again.cursor()
                cur.execute("SELECT @mine")
                assert cur.fetchone() == (None,)


def test_vanished_client_mid_transaction_is_rolled_back(tmp_path: Path, mariadb_server: MariaDBInstance) -> None:
    with running_proxy(tmp_path, mariadb=mariadb_server, mysql__pool={"max_connections": 1}) as proxy:
        with connect(proxy) as setup:
            setup.cursor().execute("DROP TABLE IF EXISTS vanish")
            setup.cursor().execute("CREATE TABLE vanish (a int) ENGINE=InnoDB")
        conn = connect(proxy)
        conn.begin()
        conn.cursor().execute("INSERT INTO vanish VALUES (1)")
        sock = conn._sock
        assert sock is not None
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        sock.shutdown(socket.SHUT_RDWR)  # gone without COM_QUIT
        with connect(proxy) as other:  # the one backend comes back clean
            cur = other.cursor()
            cur.execute("SELECT count(*) FROM vanish")
            assert cur.fetchone() == (0,)
        proxy.wait_for_log("left inside a transaction or session; cleaning")


def test_vanished_client_mid_query_has_it_killed(tmp_path: Path, mariadb_server: MariaDBInstance) -> None:
    with running_proxy(tmp_path, mariadb=mariadb_server, mysql__pool={"max_connections": 2}) as proxy:
        conn = connect(proxy, "bench", database="bench")
        thread = threading.Thread(target=lambda: _swallow(conn, "SELECT SLEEP(30)"))
        thread.start()
        time.sleep(0.5)
        sock = conn._sock
        assert sock is not None
        sock.shutdown(socket.SHUT_RDWR)
        thread.join()
        deadline = time.monotonic() + 10
        while "SLEEP(30)" in _bench_queries(mariadb_server) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "SLEEP(30)" not in _bench_queries(mariadb_server)
        proxy.wait_for_log("left while a query was running; cancelling it")


def _bench_queries(mariadb: MariaDBInstance) -> str:
    return mariadb.sql("SELECT IFNULL(GROUP_CONCAT(info), '') FROM information_schema.processlist "
                       "WHERE user = 'bench' AND command = 'Query'")


def _swallow(conn: pymysql.Connection, sql: str) -> None:
    with contextlib.suppress(pymysql.Error):
        conn.cursor().execute(sql)


def test_local_infile_passes_through_and_can_be_refused(tmp_path: Path, mariadb_server: MariaDBInstance) -> None:
    data = tmp_path / "rows.csv"
    data.write_text("".join(f"{i},row{i}\n" for i in range(5000)))
    with running_proxy(tmp_path / "on", mariadb=mariadb_server) as proxy:
        with connect(proxy, local_infile=True) as conn:
            cur = conn.cursor()
            cur.execute("DROP TABLE IF EXISTS loaded")
            cur.execute("CREATE TABLE loaded (id int, v text)")
            cur.execute(f"LOAD DATA LOCAL INFILE '{data}' INTO TABLE loaded FIELDS TERMINATED BY ','")
            cur.execute("SELECT count(*), max(id) FROM loaded")
            assert cur.fetchone() == (5000, 4999)
    with running_proxy(tmp_path / "off", mariadb=mariadb_server, mysql={"local_infile": False}) as proxy:
        with connect(proxy, local_infile=True) as conn:
            cur = conn.cursor()
            with pytest.raises(pymysql.err.OperationalError) as info:
                cur.execute(f"LOAD DATA LOCAL INFILE '{data}' INTO TABLE loaded")
            assert info.value.args[0] == 1148 and "disabled on this proxy" in info.value.args[1]
            cur.execute("SELECT 1")
            assert cur.fetchone() == (1,)


def test_change_user(mysql_proxy: ProxyProcess) -> None:
    conn = mysql.connector.connect(host="127.0.0.1", port=mysql_proxy.ports["mysql"], user="app",
                                   password="app-secret", database="app", use_pure=True, autocommit=True)
    try:
        conn.cmd_change_user(username="bench", password="bench-secret", database="bench")
        cur = conn.cursor()
        cur.execute("SELECT CURRENT_USER(), DATABASE()")
        assert cur.fetchall() == [("bench@%", "bench")]
        with pytest.raises(mysql.connector.Error) as info:
            conn.cmd_change_user(username="app", password="wrong", database="app")
        assert info.value.errno == 1045
    finally:
        with contextlib.suppress(Exception):
            conn.close()
