"""A MySQL read_write endpoint follows a MariaDB failover: an idle client keeps its connection and its next
statement runs on the promoted replica; while there is no writer, its statement waits for one."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from devtools.servers import MariaDBInstance
from replicated import cluster_config, connect_my, kill_mariadb, mariadb_pair, monitor_secret, running_proxy

INTERVAL = 0.2


@pytest.fixture()
def cluster(tmp_path: Path) -> Iterator[tuple[MariaDBInstance, MariaDBInstance]]:
    with mariadb_pair(tmp_path) as pair:
        yield pair


def test_read_write_endpoint_follows_the_promoted_replica(
    tmp_path: Path, cluster: tuple[MariaDBInstance, MariaDBInstance], monkeypatch: pytest.MonkeyPatch
) -> None:
    primary, replica = cluster
    config = cluster_config(primary, replica, pool={"max_connections": 2, "connection_borrow_timeout": 20.0},
                            monitor_interval=INTERVAL, monitor_user=monitor_secret(monkeypatch, primary))
    with running_proxy(tmp_path / "proxy", config) as proxy:
        proxy.wait_for_log(rf"instance .*:{primary.port} is now writer")
        conn = connect_my(proxy)
        with conn.cursor() as cursor:
            cursor.execute("INSERT INTO t (port) SELECT @@port")
            cursor.execute("SELECT @@port")
            assert cursor.fetchone() == (primary.port,)
        kill_mariadb(primary)
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
