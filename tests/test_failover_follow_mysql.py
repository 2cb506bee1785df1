"""A MySQL read_write endpoint follows a MariaDB failover: an idle client keeps its connection and its next
statement runs on the promoted replica; while there is no writer, its statement waits for one."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pymysql
import pytest

from devtools.servers import MariaDBInstance, free_port, start_mariadb, start_mariadb_replica
from support import ProxyProcess, write_config

MONITOR = "monitor"
MONITOR_PASSWORD = "Monitor-Secret-3e9a"
INTERVAL = 0.2


@pytest.fixture()
def cluster(tmp_path: Path) -> Iterator[tuple[MariaDBInstance, MariaDBInstance]]:
    primary = start_mariadb(tmp_path / "primary", users={"app": "app-secret"})
    replica = None
    try:
        replica = start_mariadb_replica(primary, tmp_path / "replica")
        primary.sql(f"CREATE USER {MONITOR}@'%' IDENTIFIED BY '{MONITOR_PASSWORD}';\n"
                    f"GRANT REPLICA MONITOR ON *.* TO {MONITOR}@'%';\n"
                    "CREATE TABLE app.t (id INT AUTO_INCREMENT PRIMARY KEY, port INT);")
        replica.wait_caught_up(primary.sql("SELECT @@gtid_binlog_pos"))
        yield primary, replica
    finally:
        if replica is not None:
            replica.stop()
        primary.stop()


def test_read_write_endpoint_follows_the_promoted_replica(
    tmp_path: Path, cluster: tuple[MariaDBInstance, MariaDBInstance], monkeypatch: pytest.MonkeyPatch
) -> None:
    primary, replica = cluster
    monkeypatch.setenv("DBPROXY_PASSWORD_" + MONITOR.upper(), MONITOR_PASSWORD)
    folder = tmp_path / "proxy"
    folder.mkdir()
    config = write_config(folder, {
        "server": {"log_level": "info", "client_login_timeout": 3.0, "workers": 1},
        "secrets": {"file": "secrets.toml"},
        "postgresql": {"enabled": False},
        "mysql.pool": {"max_connections": 2, "connection_borrow_timeout": 20.0},
        "mysql.clusters.main": {
            "instances": [{"host": primary.host, "port": primary.port, "role": "writer"},
                          {"host": replica.host, "port": replica.port, "role": "reader"}],
            "monitor_interval": INTERVAL, "monitor_user": MONITOR},
        "mysql.endpoints.rw": {"port": free_port(), "cluster": "main", "role": "read_write"},
    })
    proxy = ProxyProcess(config, folder / "proxy.log")
    proxy.start()
    try:
        proxy.wait_for_log(rf"instance .*:{primary.port} is now writer")
        conn = pymysql.connect(host="127.0.0.1", port=proxy.ports["rw"], user="app", password="app-secret",
                               database="app", autocommit=True)
        with conn.cursor() as cursor:
            cursor.execute("INSERT INTO t (port) SELECT @@port")
            cursor.execute("SELECT @@port")
            assert cursor.fetchone() == (primary.port,)
        pid = primary.pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        primary.stop()  # reaps the killed process
        proxy.wait_for_log(r"endpoint rw: cluster main has no healthy writer", timeout=5.0)
        answer: list[object] = []

        def write() -> None:
            with conn.cursor() as cursor:
                cursor.execute("INSERT INTO t (port) SELECT @@port")
                cursor.execute("SELECT @@port")
                answer.append(cursor.fetchone())

        waiting = threading.Thread(target=write, daemon=True)
        waiting.start()
        time.sleep(1.0)
        assert not answer, "a statement ran while there was no writer"
        replica.promote()
        promoted_at = time.monotonic()
        waiting.join(10)
        took = time.monotonic() - promoted_at
        assert answer == [(replica.port,)]
        assert took <= 2.0, took
        print(f"MySQL: the waiting statement ran {took * 1000:.0f} ms after the promotion")
        proxy.wait_for_log(rf"endpoint rw: writer is now 127\.0\.0\.1:{replica.port} \(timeline 0\), "
                           rf"was 127\.0\.0\.1:{primary.port}")
        conn.close()
    finally:
        proxy.stop()
