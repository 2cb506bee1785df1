"""The topology monitor with the PostgreSQL probe against a real primary and streaming standby."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from devtools.servers import PostgresInstance
from proxy.topology.model import InstanceStatus, Role
from proxy.topology.monitor import TopologyMonitor
from proxy.topology.pg_probe import postgres_probe
from replicated import postgres_pair

INTERVAL = 0.2
TIMEOUT = 1.0
MAX_LAG = 0.5


@pytest.fixture()
def cluster(tmp_path: Path) -> Iterator[tuple[PostgresInstance, PostgresInstance]]:
    with postgres_pair(tmp_path, "") as pair:
        yield pair


def _monitor(*instances: PostgresInstance) -> TopologyMonitor:
    probe = postgres_probe(instances[0].superuser, instances[0].superuser_password, "postgres")
    return TopologyMonitor([(i.host, i.port) for i in instances], probe, INTERVAL, TIMEOUT)


async def _until(check: object, what: str, limit: float = 15.0) -> None:
    assert callable(check)
    deadline = time.monotonic() + limit
    while not check():
        assert time.monotonic() < deadline, f"not within {limit}s: {what}"
        await asyncio.sleep(INTERVAL / 4)


def test_roles_and_replay_lag(cluster: tuple[PostgresInstance, PostgresInstance]) -> None:
    primary, standby = cluster
    primary_at, standby_at = (primary.host, primary.port), (standby.host, standby.port)

    async def scenario() -> None:
        monitor = _monitor(primary, standby)
        await monitor.probe_now()
        writer = monitor.writer()
        assert writer is not None and writer.address == primary_at and writer.timeline == 1
        assert [s.address for s in monitor.readers(MAX_LAG)] == [standby_at]
        monitor.start()
        try:
            await asyncio.to_thread(primary.psql, "CREATE TABLE t (a int); INSERT INTO t VALUES (1)", db="app",
                                    user="app")
            written = (await monitor.probe_now())[primary_at].position
            await _until(lambda: (monitor.status(standby_at) or writer).position >= written,
                         "the standby replays the primary's writes")
            await asyncio.to_thread(standby.pause_replay)
            await asyncio.to_thread(primary.psql, "INSERT INTO t VALUES (2)", db="app", user="app")
            await _until(lambda: not monitor.readers(MAX_LAG), "the paused standby falls out of the readers")
            paused = monitor.status(standby_at)
            assert paused is not None and paused.healthy and paused.role is Role.READER
            assert paused.lag_seconds is not None and paused.lag_seconds > MAX_LAG
            assert [s.address for s in monitor.readers()] == [standby_at]  # no limit: still a reader
            await asyncio.to_thread(standby.resume_replay)
            await _until(lambda: bool(monitor.readers(MAX_LAG)), "the resumed standby is a reader again")
            caught_up = monitor.status(standby_at)
            assert caught_up is not None and caught_up.lag_seconds == 0.0
        finally:
            await monitor.stop()

    asyncio.run(scenario())


def test_primary_killed_standby_promoted(cluster: tuple[PostgresInstance, PostgresInstance]) -> None:
    primary, standby = cluster
    primary_at, standby_at = (primary.host, primary.port), (standby.host, standby.port)

    async def scenario() -> None:
        monitor = _monitor(primary, standby)
        changes: list[InstanceStatus] = []
        primary_down = asyncio.Event()

        def changed(previous: InstanceStatus | None, status: InstanceStatus) -> None:
            changes.append(status)
            if status.address == primary_at and not status.healthy:
                primary_down.set()

        monitor.on_change(changed)
        monitor.start()
        try:
            await _until(lambda: len(monitor.snapshot()) == 2, "a first round")
            assert {(s.address, s.role) for s in changes} == {(primary_at, Role.WRITER), (standby_at, Role.READER)}
            await asyncio.to_thread(primary.kill)
            killed_at = time.monotonic()
            await asyncio.wait_for(primary_down.wait(), INTERVAL + TIMEOUT + 1.0)
            assert time.monotonic() - killed_at <= INTERVAL + TIMEOUT + 1.0
            down = monitor.status(primary_at)
            assert down is not None and down.role is Role.UNKNOWN and down.error
            assert monitor.writer() is None

            await asyncio.to_thread(standby.promote)
            await _until(lambda: monitor.writer() is not None, "the promoted standby is the writer")
            promoted = monitor.writer()
            assert promoted is not None and promoted.address == standby_at and promoted.timeline == 2

            # The old primary comes back from its crash as a writer on the old timeline: the promoted one wins.
            await asyncio.to_thread(primary.start)
            await _until(lambda: (monitor.status(primary_at) or down).healthy, "the old primary answers again")
            stale = monitor.status(primary_at)
            assert stale is not None and stale.role is Role.WRITER and stale.timeline == 1
            now_writer = monitor.writer()
            assert now_writer is not None and now_writer.address == standby_at
        finally:
            await monitor.stop()

    asyncio.run(scenario())


def test_probe_failures_are_statuses_without_secrets(cluster: tuple[PostgresInstance, PostgresInstance]) -> None:
    primary, _ = cluster

    async def scenario() -> None:
        wrong = await postgres_probe("app", "not-the-Secret-42", "app")(primary.host, primary.port, TIMEOUT)
        assert not wrong.healthy and wrong.role is Role.UNKNOWN
        assert "password authentication failed" in wrong.error and "Secret-42" not in wrong.error
        right = await postgres_probe("app", "app-secret", "app")(primary.host, primary.port, TIMEOUT)
        assert right.healthy and right.role is Role.WRITER

    asyncio.run(scenario())


def test_probe_keeps_one_connection_and_reconnects_after_a_restart(
        cluster: tuple[PostgresInstance, PostgresInstance]) -> None:
    primary, _ = cluster
    user = primary.superuser
    count_sql = (f"SELECT count(*) FROM pg_stat_activity WHERE usename = '{user}' AND datname = 'postgres' "
                 "AND backend_type = 'client backend' AND pid <> pg_backend_pid()")

    async def scenario() -> None:
        probe = postgres_probe(user, primary.superuser_password, "postgres")
        try:
            for _ in range(5):
                status = await probe(primary.host, primary.port, TIMEOUT)
                assert status.healthy and status.role is Role.WRITER
            assert (await asyncio.to_thread(primary.psql, count_sql)).strip() == "1"  # kept, not one per probe
            await asyncio.to_thread(primary.stop)
            await asyncio.to_thread(primary.start)
            back = await probe(primary.host, primary.port, TIMEOUT)  # the stale connection is replaced at once
            assert back.healthy and back.role is Role.WRITER, back.error
            await asyncio.to_thread(primary.stop)
            down = await probe(primary.host, primary.port, TIMEOUT)
            assert not down.healthy and down.role is Role.UNKNOWN
            await asyncio.to_thread(primary.start)
            again = await probe(primary.host, primary.port, TIMEOUT)
            assert again.healthy and again.role is Role.WRITER, again.error
        finally:
            await probe.close()
        assert (await asyncio.to_thread(primary.psql, count_sql)).strip() == "0"

    asyncio.run(scenario())
