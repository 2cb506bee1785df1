"""Promotion by the proxy: `dbproxy failover --to INSTANCE` promotes a standby with the cluster's monitor_user
(clear errors and exit codes otherwise), and `auto_promote` promotes the most advanced healthy reader when the
writer has been gone for the grace period; writes through the proxy then land on the promoted instance."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from devtools.servers import PostgresInstance
from proxy.topology.model import InstanceStatus, Role
from proxy.topology.promote import promotion_candidate
from replicated import (
    PROMOTER_GRANTS,
    cluster_config,
    connect_my,
    kill_mariadb,
    log_time,
    mariadb_pair,
    monitor_secret,
    postgres_pair,
    running_proxy,
)
from support import ProxyProcess, write_config

GRACE = 1.0  # seconds without a writer before auto_promote promotes


@pytest.fixture()
def cluster(tmp_path: Path) -> Iterator[tuple[PostgresInstance, PostgresInstance]]:
    with postgres_pair(tmp_path) as pair:
        yield pair


def _proxy(folder: Path, primary: PostgresInstance, standby: PostgresInstance, **cluster: Any) -> ProxyProcess:
    folder.mkdir()
    config = cluster_config(primary, standby, names=True, roles=False,
                            pool={"max_connections": 2, "connection_borrow_timeout": 20.0},
                            monitor_user=primary.superuser, **cluster)
    return ProxyProcess(write_config(folder, config), folder / "proxy.log")


def _dbproxy(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "proxy", *args], capture_output=True, text=True, timeout=90,
                          env=dict(os.environ))


def _write(port: int) -> int:
    with psycopg.connect(host="127.0.0.1", port=port, user="app", password="app-secret", dbname="app",
                         connect_timeout=10) as conn:
        row = conn.execute("INSERT INTO t (port) SELECT inet_server_port() RETURNING port").fetchone()
    assert row is not None
    return int(row[0])


def test_failover_command_promotes_the_named_standby(
    tmp_path: Path, cluster: tuple[PostgresInstance, PostgresInstance], monkeypatch: pytest.MonkeyPatch
) -> None:
    primary, standby = cluster
    monitor_secret(monkeypatch, primary)
    proxy = _proxy(tmp_path / "proxy", primary, standby, monitor_interval=0.5)
    proxy.start()
    try:
        proxy.wait_for_log(rf"instance .*:{primary.port} is now writer")
        config = str(proxy.config)
        assert _write(proxy.ports["rw"]) == primary.port

        unknown = _dbproxy("failover", "--to", "three", "-c", config)
        assert unknown.returncode == 2, unknown
        assert "no instance 'three' in any cluster (known: main/one, main/two)" in unknown.stderr
        other_cluster = _dbproxy("failover", "--to", "two", "--cluster", "other", "-c", config)
        assert other_cluster.returncode == 2 and "no instance 'two' in cluster 'other'" in other_cluster.stderr

        writer = _dbproxy("failover", "--to", "one", "-c", config)
        assert writer.returncode == 3, writer
        assert f"one ({primary.host}:{primary.port}) is the writer already" in writer.stderr, writer

        primary.kill()
        dead = _dbproxy("failover", "--to", "one", "-c", config)
        assert dead.returncode == 1, dead
        assert f"one ({primary.host}:{primary.port}) is unreachable: " in dead.stderr
        assert primary.superuser_password not in dead.stderr

        promoted = _dbproxy("failover", "--to", f"{standby.host}:{standby.port}", "-c", config)
        assert promoted.returncode == 0, promoted
        assert re.search(rf"promoted two \({standby.host}:{standby.port}\) in postgresql cluster main", promoted.stdout)
        assert standby.psql("SELECT pg_is_in_recovery()") == "f"
        proxy.wait_for_log(rf"endpoint rw: writer is now 127\.0\.0\.1:{standby.port} \(timeline 2\)", timeout=5.0)
        assert _write(proxy.ports["rw"]) == standby.port

        again = _dbproxy("failover", "--to", "two", "-c", config)
        assert again.returncode == 3 and "is the writer already" in again.stderr, again
    finally:
        proxy.stop()


def test_auto_promote_promotes_the_standby_when_the_primary_is_gone(
    tmp_path: Path, cluster: tuple[PostgresInstance, PostgresInstance], monkeypatch: pytest.MonkeyPatch
) -> None:
    primary, standby = cluster
    monitor_secret(monkeypatch, primary)
    proxy = _proxy(tmp_path / "proxy", primary, standby, monitor_interval=0.5, auto_promote=True,
                   failover_grace=GRACE)
    proxy.start()
    try:
        proxy.wait_for_log(rf"instance .*:{standby.port} is now reader")
        conn = psycopg.connect(host="127.0.0.1", port=proxy.ports["rw"], user="app", password="app-secret",
                               dbname="app", autocommit=True)
        ports: list[tuple[float, int]] = []  # (wall-clock time, inet_server_port()) of each committed insert
        stop = threading.Event()

        def write() -> None:
            nonlocal conn
            while not stop.is_set():
                try:
                    row = conn.execute("INSERT INTO t (port) SELECT inet_server_port() RETURNING port").fetchone()
                    assert row is not None
                    ports.append((time.time(), row[0]))
                except psycopg.Error:
                    if conn.closed:
                        conn = psycopg.connect(host="127.0.0.1", port=proxy.ports["rw"], user="app",
                                               password="app-secret", dbname="app", autocommit=True)
                time.sleep(0.02)

        thread = threading.Thread(target=write, daemon=True)
        thread.start()
        time.sleep(0.5)
        killed_at = time.time()
        primary.kill()
        line = proxy.wait_for_log(rf"cluster main: promoted 127\.0\.0\.1:{standby.port} in \d+ ms", timeout=10.0)
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline and not any(port == standby.port for _, port in ports):
            time.sleep(0.05)
        stop.set()
        thread.join(10)
        conn.close()
    finally:
        proxy.stop()
    log = proxy.log()
    assert re.search(rf"no healthy writer for \d+\.\d s; promoting 127\.0\.0\.1:{standby.port} \(timeline 1", log)
    assert log.count("; promoting ") == 1, log
    promoted_at = log_time(line)
    first = next(t for t, port in ports if port == standby.port)
    assert promoted_at - killed_at >= GRACE
    assert first - promoted_at < 2.0, first - promoted_at
    assert all(port == standby.port for t, port in ports if t > first)
    print(f"auto_promote: promoted {promoted_at - killed_at:.2f} s after the kill (grace {GRACE:g} s); first "
          f"write through the proxy {(first - promoted_at) * 1000:.0f} ms after the promotion")


def test_the_candidate_is_the_reader_furthest_ahead_then_the_lowest_address() -> None:
    def reader(host: str, port: int, timeline: int, position: int) -> InstanceStatus:
        return InstanceStatus(host, port, Role.READER, True, 0.0, timeline=timeline, position=position)

    behind, ahead, later_timeline = reader("10.0.0.1", 5432, 1, 90), reader("10.0.0.2", 5432, 1, 100), reader(
        "10.0.0.3", 5432, 2, 5)
    assert promotion_candidate([behind, ahead]) == ahead
    assert promotion_candidate([behind, ahead, later_timeline]) == later_timeline
    tie = [reader("10.0.0.9", 5432, 1, 100), reader("10.0.0.2", 5433, 1, 100), ahead]
    assert promotion_candidate(tie) == ahead and promotion_candidate(list(reversed(tie))) == ahead
    assert promotion_candidate([]) is None




def test_auto_promote_promotes_the_mariadb_replica(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A monitor_user that may promote: REPLICA MONITOR to probe, the admin privileges to stop and forget
    # replication and to clear read_only.
    with mariadb_pair(tmp_path, grants=PROMOTER_GRANTS) as (primary, replica), running_proxy(
            tmp_path / "proxy", cluster_config(
                primary, replica, roles=False, pool={"max_connections": 2, "connection_borrow_timeout": 20.0},
                monitor_interval=0.5, monitor_user=monitor_secret(monkeypatch, primary), auto_promote=True,
                failover_grace=GRACE)) as proxy:
        proxy.wait_for_log(rf"instance .*:{replica.port} is now reader")
        # By hand, while the primary lives: refused, since nothing would tell the proxies which writer to follow.
        live = _dbproxy("failover", "--to", f"{replica.host}:{replica.port}", "-c", str(proxy.config))
        assert live.returncode == 4, live
        assert f"{primary.host}:{primary.port} still writes: make it read-only" in live.stderr
        writer = _dbproxy("failover", "--to", f"{primary.host}:{primary.port}", "-c", str(proxy.config))
        assert writer.returncode == 3 and "is the writer already" in writer.stderr, writer
        conn = connect_my(proxy)
        with conn.cursor() as cursor:
            cursor.execute("INSERT INTO t (port) SELECT @@port")
        replica.wait_caught_up(primary.sql("SELECT @@gtid_binlog_pos"))  # (replication is asynchronous)
        kill_mariadb(primary)
        line = proxy.wait_for_log(rf"cluster main: promoted 127\.0\.0\.1:{replica.port} in \d+ ms", timeout=10.0)
        promoted_at = log_time(line)
        conn = connect_my(proxy)
        with conn.cursor() as cursor:
            cursor.execute("INSERT INTO t (port) SELECT @@port")
            cursor.execute("SELECT port FROM t WHERE id = LAST_INSERT_ID()")
            assert cursor.fetchone() == (replica.port,)
            cursor.execute("SELECT COUNT(*) FROM t")
            assert cursor.fetchone() == (2,)  # the write made before the kill is kept
        first = time.time()
        conn.close()
        assert replica.sql("SELECT @@read_only") == "0"
        print(f"MySQL auto_promote: first write through the proxy {(first - promoted_at) * 1000:.0f} ms after the "
              "promotion")
