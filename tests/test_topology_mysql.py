"""The MariaDB probe against a real primary and GTID replica: roles, positions, lag, death and promotion."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Iterator

import pytest

from devtools.servers import MariaDBInstance
from proxy.topology.model import Role
from proxy.topology.mysql_probe import gtid_sequence, mysql_probe
from replicated import MONITOR, MONITOR_PASSWORD, mariadb_pair

TIMEOUT = 5.0


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[MariaDBInstance, MariaDBInstance]]:
    table = "CREATE TABLE app.t (id INT AUTO_INCREMENT PRIMARY KEY, v INT);"
    with mariadb_pair(tmp_path_factory.mktemp("topo"), table) as pair:  # (the replica gets the monitor user too)
        yield pair


def _write(primary: MariaDBInstance, rows: int) -> None:
    primary.sql("\n".join("INSERT INTO t (v) VALUES (1);" for _ in range(rows)), user="app", db="app")


def test_gtid_sequence_parses_the_domain_asked_for() -> None:
    assert gtid_sequence("0-1-42", 0) == 42
    assert gtid_sequence("0-1-42,1-2-7", 1) == 7
    assert gtid_sequence("1-2-7", 0) == 0
    assert gtid_sequence("", 0) == 0


async def test_roles_and_positions_follow_writes(cluster: tuple[MariaDBInstance, MariaDBInstance]) -> None:
    primary, replica = cluster
    probe = mysql_probe(MONITOR, MONITOR_PASSWORD)
    writer = await probe(primary.host, primary.port, TIMEOUT)
    reader = await probe(replica.host, replica.port, TIMEOUT)
    assert (writer.healthy, writer.role, writer.lag_seconds, writer.error) == (True, Role.WRITER, None, "")
    assert (reader.healthy, reader.role, reader.error) == (True, Role.READER, "")
    assert reader.lag_seconds is not None and reader.lag_seconds >= 0
    assert writer.position > 0 and reader.position == writer.position
    assert writer.timeline == reader.timeline == 0

    _write(primary, 3)
    replica.wait_caught_up(primary.sql("SELECT @@gtid_binlog_pos"))
    writer2 = await probe(primary.host, primary.port, TIMEOUT)
    reader2 = await probe(replica.host, replica.port, TIMEOUT)
    assert writer2.position == writer.position + 3
    assert reader2.position == writer2.position


async def test_paused_replay_shows_unknown_lag_and_a_position_behind(
    cluster: tuple[MariaDBInstance, MariaDBInstance],
) -> None:
    primary, replica = cluster
    probe = mysql_probe(MONITOR, MONITOR_PASSWORD)
    replica.pause_replay()
    try:
        _write(primary, 2)
        writer = await probe(primary.host, primary.port, TIMEOUT)
        reader = await probe(replica.host, replica.port, TIMEOUT)
        assert (reader.healthy, reader.role, reader.lag_seconds) == (True, Role.READER, None)
        assert reader.position == writer.position - 2
    finally:
        replica.resume_replay()
    replica.wait_caught_up(primary.sql("SELECT @@gtid_binlog_pos"))
    reader = await probe(replica.host, replica.port, TIMEOUT)
    assert reader.position == writer.position
    assert reader.lag_seconds is not None


async def test_wrong_password_and_closed_port_are_unhealthy_without_the_secret(
    cluster: tuple[MariaDBInstance, MariaDBInstance],
) -> None:
    primary, _replica = cluster
    denied = await mysql_probe(MONITOR, "Wrong-Secret-55aa")(primary.host, primary.port, TIMEOUT)
    assert (denied.healthy, denied.role) == (False, Role.UNKNOWN)
    assert "Access denied" in denied.error and "Wrong-Secret-55aa" not in denied.error


async def test_probe_keeps_one_connection_and_reconnects_after_a_restart(
    cluster: tuple[MariaDBInstance, MariaDBInstance],
) -> None:
    _, replica = cluster
    count_sql = f"SELECT COUNT(*) FROM information_schema.processlist WHERE user = '{MONITOR}'"
    probe = mysql_probe(MONITOR, MONITOR_PASSWORD)
    try:
        for _ in range(5):
            status = await probe(replica.host, replica.port, TIMEOUT)
            assert status.healthy and status.role is Role.READER, status.error
        assert (await asyncio.to_thread(replica.sql, count_sql)).strip() == "1"  # kept, not one per probe
        await asyncio.to_thread(replica.stop)
        await asyncio.to_thread(replica.start)
        back = await probe(replica.host, replica.port, TIMEOUT)  # the stale connection is replaced at once
        assert back.healthy and back.role is Role.READER, back.error
    finally:
        await probe.close()
    await asyncio.sleep(0.2)  # the server notices the closed socket
    assert (await asyncio.to_thread(replica.sql, count_sql)).strip() == "0"


async def test_dead_primary_is_unhealthy_and_the_promoted_replica_is_writer(
    cluster: tuple[MariaDBInstance, MariaDBInstance],
) -> None:
    primary, replica = cluster
    probe = mysql_probe(MONITOR, MONITOR_PASSWORD)
    pid = primary.pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    primary.stop()  # reaps the killed process
    dead = await probe(primary.host, primary.port, TIMEOUT)
    assert (dead.healthy, dead.role) == (False, Role.UNKNOWN)
    assert dead.error and MONITOR_PASSWORD not in dead.error

    before = await probe(replica.host, replica.port, TIMEOUT)
    assert before.role == Role.READER
    replica.promote()
    after = await probe(replica.host, replica.port, TIMEOUT)
    assert (after.healthy, after.role, after.lag_seconds) == (True, Role.WRITER, None)
    assert after.position == before.position
    replica.sql("INSERT INTO t (v) VALUES (2)", user="app", db="app")
    assert (await probe(replica.host, replica.port, TIMEOUT)).position == after.position + 1


async def test_a_silent_server_times_out_and_the_connection_is_closed() -> None:
    closed = asyncio.Event()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # never sends a handshake; returns at EOF
        closed.set()
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    try:
        port = server.sockets[0].getsockname()[1]
        status = await mysql_probe(MONITOR, MONITOR_PASSWORD)("127.0.0.1", port, 0.3)
        assert (status.healthy, status.role, status.error) == (False, Role.UNKNOWN, "timed out")
        await asyncio.wait_for(closed.wait(), TIMEOUT)  # the probe did not leave its socket open
    finally:
        server.close()
