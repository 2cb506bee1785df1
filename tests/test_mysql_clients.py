"""Real MySQL clients through the proxy against a real MariaDB: mariadb CLI, PyMySQL, aiomysql, mysql-connector."""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import subprocess
from pathlib import Path

import aiomysql
import mysql.connector
import pymysql
import pytest
from pymysql.constants import CLIENT

from devtools.servers import MariaDBInstance
from support import ProxyProcess, running_proxy


def connect(proxy: ProxyProcess, **extra: object) -> pymysql.Connection:
    kwargs: dict[str, object] = {"host": "127.0.0.1", "port": proxy.ports["mysql"], "user": "app",
                                 "password": "app-secret", "database": "app", "autocommit": True}
    kwargs.update(extra)
    return pymysql.connect(**kwargs)  # type: ignore[arg-type]


def cli(proxy: ProxyProcess, sql: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MYSQL")}
    env["MYSQL_PWD"] = "app-secret"
    return subprocess.run(["mariadb", "--no-defaults", "--protocol=TCP", "-h", "127.0.0.1", "-P",
                           str(proxy.ports["mysql"]), "-u", "app", "-D", "app", "-N", "-B", *args],
                          input=sql, capture_output=True, text=True, timeout=60, env=env)


def test_mariadb_cli(mysql_proxy: ProxyProcess) -> None:
    result = cli(mysql_proxy, "SELECT @@version_comment IS NOT NULL, DATABASE(); SELECT 1; SELECT 2;\n"
                              "CREATE TABLE IF NOT EXISTS cli (a int); INSERT INTO cli VALUES (7);\n"
                              "SELECT count(*) > 0 FROM cli; DROP TABLE cli;")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[:4] == ["1\tapp", "1", "2", "1"]
    failed = cli(mysql_proxy, "SELECT no_such_column;")
    assert failed.returncode == 1 and "ERROR 1054 (42S22)" in failed.stderr
    # the CLI's -e sends several statements in one COM_QUERY (multi-statements)
    multi = cli(mysql_proxy, "", "-e", "SELECT 'a'; SELECT 'b'; SELECT 'c'")
    assert multi.returncode == 0 and multi.stdout.split() == ["a", "b", "c"], multi.stderr


def test_pymysql_transactions_errors_and_multi_statements(mysql_proxy: ProxyProcess) -> None:
    with connect(mysql_proxy, client_flag=CLIENT.MULTI_STATEMENTS) as conn, connect(mysql_proxy) as other:
        cur = conn.cursor()
        cur.execute("DROP TABLE IF EXISTS tx; CREATE TABLE tx (id int primary key, v text) ENGINE=InnoDB")
        while cur.nextset():
            pass
        conn.begin()
        cur.execute("INSERT INTO tx VALUES (1, 'one')")
        ocur = other.cursor()
        ocur.execute("SELECT count(*) FROM tx")
        assert ocur.fetchone() == (0,)  # not committed: the transaction stays on its own backend
        conn.rollback()
        cur.execute("INSERT INTO tx VALUES (2, 'two')")
        ocur.execute("SELECT id, v FROM tx")
        assert ocur.fetchall() == ((2, "two"),)
        with pytest.raises(pymysql.err.IntegrityError) as info:
            cur.execute("INSERT INTO tx VALUES (2, 'again')")
        assert info.value.args[0] == 1062
        with pytest.raises(pymysql.err.ProgrammingError):
            cur.execute("SELEC 1")
        cur.execute("SELECT 1; SELECT 'x', 'y'; SELECT id FROM tx")
        results = [cur.fetchall()]
        while cur.nextset():
            results.append(cur.fetchall())
        assert results == [((1,),), (("x", "y"),), ((2,),)]


def test_stored_procedure_with_several_result_sets(mysql_proxy: ProxyProcess) -> None:
    with connect(mysql_proxy) as conn:
        cur = conn.cursor()
        cur.execute("DROP PROCEDURE IF EXISTS three")
        cur.execute("CREATE PROCEDURE three() BEGIN SELECT 1 AS a; SELECT 2 AS b, 3 AS c; SELECT 'x'; END")
        cur.execute("CALL three()")
        results = [cur.fetchall()]
        while cur.nextset():
            results.append(cur.fetchall())
        assert results[:3] == [((1,),), ((2, 3),), (("x",),)]
        cur.execute("SELECT 'after'")
        assert cur.fetchone() == ("after",)


def test_pymysql_64mb_blob_round_trip(mysql_proxy: ProxyProcess) -> None:
    blob = os.urandom(1 << 20) * 64  # 64 MiB: four continuation frames each way
    digest = hashlib.sha256(blob).hexdigest()
    with connect(mysql_proxy, max_allowed_packet=256 << 20) as conn:
        cur = conn.cursor()
        cur.execute("DROP TABLE IF EXISTS blobs")
        cur.execute("CREATE TABLE blobs (id int primary key, b LONGBLOB)")
        cur.execute("INSERT INTO blobs VALUES (1, %s)", (blob,))
        cur.execute("SELECT b, length(b), sha2(b, 256) FROM blobs WHERE id = 1")
        row = cur.fetchone()
        assert row is not None and row[1] == len(blob) and row[2] == digest
        assert hashlib.sha256(row[0]).hexdigest() == digest
        cur.execute("SELECT 'small after big'")
        assert cur.fetchone() == ("small after big",)
        cur.execute("DROP TABLE blobs")


async def test_aiomysql(mysql_proxy: ProxyProcess) -> None:
    pool = await aiomysql.create_pool(host="127.0.0.1", port=mysql_proxy.ports["mysql"], user="app",
                                      password="app-secret", db="app", autocommit=True, minsize=5, maxsize=20)
    try:
        async def work(n: int) -> int:
            async with pool.acquire() as conn, conn.cursor() as cur:
                await cur.execute("SELECT %s * 2", (n,))
                (value,) = await cur.fetchone()
                await conn.begin()
                await cur.execute("SELECT SLEEP(0.01)")
                await conn.commit()
                return int(value)

        results = await asyncio.gather(*(work(n) for n in range(100)))
        assert results == [n * 2 for n in range(100)]
    finally:
        pool.close()
        await pool.wait_closed()


def test_mysql_connector_pure_prepared_and_text(mysql_proxy: ProxyProcess) -> None:
    conn = mysql.connector.connect(host="127.0.0.1", port=mysql_proxy.ports["mysql"], user="app",
                                   password="app-secret", database="app", use_pure=True, autocommit=True)
    try:
        cur = conn.cursor()
        cur.execute("SELECT 'text', 2")
        assert cur.fetchall() == [("text", 2)]
        prepared = conn.cursor(prepared=True)  # binary protocol: COM_STMT_PREPARE/EXECUTE/CLOSE (pins)
        for n in range(5):
            prepared.execute("SELECT ? + 1, CAST(? AS CHAR)", (n, f"v{n}"))
            assert prepared.fetchall() == [(n + 1, f"v{n}")]
        prepared.execute("SELECT LENGTH(?), MD5(?)", (io.BytesIO(b"z" * 300_000), "x"))  # COM_STMT_SEND_LONG_DATA
        assert prepared.fetchall() == [(300_000, hashlib.md5(b"x").hexdigest())]
        prepared.close()
        with pytest.raises(mysql.connector.Error) as info:
            cur.execute("SELECT * FROM no_such_table")
        assert info.value.errno == 1146
        conn.cmd_reset_connection()
        cur = conn.cursor()
        cur.execute("SELECT DATABASE()")
        assert cur.fetchall() == [("app",)]
    finally:
        conn.close()


def test_schema_autocommit_and_session_variables_follow_the_client(tmp_path: Path,
                                                                   mariadb_server: MariaDBInstance) -> None:
    mariadb_server.sql("CREATE DATABASE IF NOT EXISTS app2; GRANT ALL ON app2.* TO 'app'@'%';"
                       "CREATE TABLE IF NOT EXISTS app2.marker (x int); DELETE FROM app2.marker;"
                       "INSERT INTO app2.marker VALUES (42)")
    with running_proxy(tmp_path, mariadb=mariadb_server, mysql__pool={"max_connections": 2}) as proxy:
        with connect(proxy) as mover, connect(proxy) as stayer, connect(proxy, autocommit=False) as manual:
            mcur, scur, acur = mover.cursor(), stayer.cursor(), manual.cursor()
            mcur.execute("USE app2")
            mcur.execute("SET sql_mode = 'ANSI_QUOTES', time_zone = '+03:00'")
            for _ in range(5):  # interleaved: each statement may run on either backend
                mcur.execute("SELECT DATABASE(), x, @@sql_mode, @@time_zone FROM marker")
                assert mcur.fetchone() == ("app2", 42, "ANSI_QUOTES", "+03:00")
                scur.execute("SELECT DATABASE(), @@sql_mode <> 'ANSI_QUOTES', @@time_zone")
                assert scur.fetchone() == ("app", 1, "SYSTEM")
                acur.execute("SELECT @@autocommit")
                assert acur.fetchone() == (0,)
                manual.commit()
            mover.select_db("app")  # COM_INIT_DB
            mcur.execute("SELECT DATABASE()")
            assert mcur.fetchone() == ("app",)
        assert "pinned" not in proxy.log()
