"""SIGTERM under load: transactions in progress finish, every acknowledged one is in the database, clients get
the protocol's shutdown error (57P01 / 1053), and the proxy exits within shutdown_grace."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

import psycopg
import pymysql
import pytest

from devtools.servers import MariaDBInstance, PostgresInstance
from support import running_proxy

GRACE = 4.0
SCRIPT = ("\\set v random(1, 1000000)\nBEGIN;\nINSERT INTO drain_rows (v) VALUES (:v);\nSELECT pg_sleep(0.01);\n"
          "COMMIT;\n")


def test_pgbench_transactions_survive_a_sigterm(tmp_path: Path, pg_server: PostgresInstance) -> None:
    pg_server.psql("DROP TABLE IF EXISTS drain_rows; CREATE TABLE drain_rows (id bigserial PRIMARY KEY, v int)",
                   db="app", user="app")
    (tmp_path / "insert.sql").write_text(SCRIPT)
    with running_proxy(tmp_path / "proxy", pg_server, server={"workers": 2, "shutdown_grace": GRACE}) as proxy:
        dsn = f"host=127.0.0.1 port={proxy.ports['postgresql']} user=app password=app-secret dbname=app"
        bench = subprocess.Popen(["pgbench", "-n", "-c", "8", "-j", "2", "-T", "30", "-f", str(tmp_path / "insert.sql"),
                                  "-h", "127.0.0.1", "-p", str(proxy.ports["postgresql"]), "-U", "app", "app"],
                                 env=dict(os.environ, PGPASSWORD="app-secret"), stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)
        held: dict[str, object] = {}
        open_transaction = psycopg.connect(dsn)  # a transaction open across the SIGTERM: it may still commit
        open_transaction.execute("INSERT INTO drain_rows (v) VALUES (-1)")
        time.sleep(2.5)
        assert proxy.process is not None
        signalled = time.monotonic()
        proxy.process.send_signal(signal.SIGTERM)

        def finish() -> None:
            time.sleep(0.5)
            open_transaction.commit()  # acknowledged: it must be in the database
            held["committed"] = True
            try:
                open_transaction.execute("SELECT 1")
            except psycopg.Error as exc:
                held["after"] = exc.sqlstate

        finisher = threading.Thread(target=finish)
        finisher.start()
        proxy.process.wait(GRACE + 10)
        exited = time.monotonic() - signalled
        finisher.join(10)
        out, err = bench.communicate(timeout=60)
    processed = int(re.search(r"actually processed: (\d+)", out).group(1))  # type: ignore[union-attr]
    rows = int(pg_server.psql("SELECT count(*) FROM drain_rows WHERE v > 0", db="app", user="app").strip())
    assert processed > 50, out + err
    assert processed <= rows <= processed + 8, (processed, rows)  # nothing acknowledged is lost
    assert held.get("committed") and held.get("after") == "57P01", held
    assert pg_server.psql("SELECT count(*) FROM drain_rows WHERE v = -1", db="app", user="app").strip() == "1"
    assert "the proxy is shutting down" in err, err[-2000:]
    assert exited < GRACE + 3, exited


def test_mysql_clients_get_1053_and_lose_nothing(tmp_path: Path, mariadb_server: MariaDBInstance) -> None:
    mariadb_server.sql("DROP TABLE IF EXISTS app.drain_rows; CREATE TABLE app.drain_rows "
                       "(id BIGINT AUTO_INCREMENT PRIMARY KEY, v INT);")
    with running_proxy(tmp_path / "proxy", mariadb=mariadb_server,
                       server={"workers": 2, "shutdown_grace": GRACE}) as proxy:
        acknowledged: list[int] = []
        errors: list[int] = []
        stop = threading.Event()

        def writer(number: int) -> None:
            conn = pymysql.connect(host="127.0.0.1", port=proxy.ports["mysql"], user="app", password="app-secret",
                                   database="app", ssl_disabled=True)
            value = number * 1_000_000
            try:
                while not stop.is_set():
                    value += 1
                    with conn.cursor() as cursor:
                        cursor.execute("BEGIN")
                        cursor.execute("INSERT INTO drain_rows (v) VALUES (%s)", (value,))
                        cursor.execute("DO SLEEP(0.01)")
                        cursor.execute("COMMIT")
                    acknowledged.append(value)
            except pymysql.err.MySQLError as exc:
                errors.append(int(exc.args[0]))
            finally:
                conn.close()

        threads = [threading.Thread(target=writer, args=(n,)) for n in range(1, 7)]
        for thread in threads:
            thread.start()
        time.sleep(2.0)
        assert proxy.process is not None
        signalled = time.monotonic()
        proxy.process.send_signal(signal.SIGTERM)
        proxy.process.wait(GRACE + 10)
        exited = time.monotonic() - signalled
        for thread in threads:
            thread.join(10)
        stop.set()
    stored = {int(v) for v in mariadb_server.sql("SELECT v FROM app.drain_rows").split()}
    assert len(acknowledged) > 50 and set(acknowledged) <= stored, (len(acknowledged), len(stored))
    assert errors and all(errno in (1053, 2013) for errno in errors), errors
    assert errors.count(1053) >= len(errors) // 2, errors  # most see the shutdown error itself
    assert exited < GRACE + 3, exited


@pytest.mark.parametrize("grace", [1.0])
def test_a_transaction_left_open_is_cut_at_the_grace(tmp_path: Path, pg_server: PostgresInstance,
                                                      grace: float) -> None:
    with running_proxy(tmp_path / "proxy", pg_server, server={"shutdown_grace": grace}) as proxy:
        conn = psycopg.connect(f"host=127.0.0.1 port={proxy.ports['postgresql']} user=app password=app-secret "
                               "dbname=app")
        conn.execute("SELECT 1")  # a transaction opened, never ended
        assert proxy.process is not None
        signalled = time.monotonic()
        proxy.process.send_signal(signal.SIGTERM)
        proxy.process.wait(grace + 10)
        assert time.monotonic() - signalled < grace + 2
        with pytest.raises(psycopg.OperationalError):
            conn.execute("SELECT 2")
        assert "still in a transaction" in proxy.log()
