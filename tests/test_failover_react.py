"""A read_write endpoint reacts to what client traffic shows at once, not at the next monitor round: a demoted
PostgreSQL writer (read-only errors) or a killed one (refused connects, lost backends) makes the proxy probe now
and follow the promoted standby within about a second, with the monitor interval set far longer than that."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest

from devtools.servers import PostgresInstance
from proxy.protocol.pg import messages as pg
from proxy.protocol.pg.extended import FORWARD, QUERY, Expectation
from proxy.protocol.pg.replies import ReplyMatcher
from replicated import (
    PortWriter,
    cluster_config,
    connect_pg,
    monitor_secret,
    postgres_pair,
    running_proxy,
    writers_around,
)
from support import ProxyProcess

CLIENTS = 3
BACKENDS = 2
INTERVAL = 30.0  # far longer than the test: only the reaction to traffic can explain a fast switch
REACTION_ROUND = 1.0  # seconds: the gap between reaction rounds (0.2 s) plus a probe round, with room to spare
FOLLOW_WITHIN = 2.0  # seconds from the promotion until every client writes to the new writer


@pytest.fixture()
def cluster(tmp_path: Path) -> Iterator[tuple[PostgresInstance, PostgresInstance]]:
    with postgres_pair(tmp_path) as pair:
        yield pair


@pytest.fixture()
def proxy(tmp_path: Path, cluster: tuple[PostgresInstance, PostgresInstance],
          monkeypatch: pytest.MonkeyPatch) -> Iterator[ProxyProcess]:
    primary, standby = cluster
    config = cluster_config(primary, standby, names=True,
                            pool={"max_connections": BACKENDS, "connection_borrow_timeout": 20.0},
                            monitor_interval=INTERVAL, monitor_user=monitor_secret(monkeypatch, primary))
    with running_proxy(tmp_path / "proxy", config) as process:
        yield process


def _run_writers(proxy: ProxyProcess, event: Callable[[], float]) -> tuple[list[PortWriter], float]:
    """Clients writing through the proxy around `event` (which returns when the new writer accepts writes)."""
    writers = [PortWriter(lambda: connect_pg(proxy)) for _ in range(CLIENTS)]
    return writers, writers_around(writers, event, FOLLOW_WITHIN + 0.5)


def _check_followed(writers: list[PortWriter], old: PostgresInstance, new: PostgresInstance, promoted_at: float,
                    ) -> float:
    """Every client wrote to the old writer before and to the new one within FOLLOW_WITHIN after the promotion,
    nothing to the old one after; returns the first write's delay in seconds."""
    for number, w in enumerate(writers):
        assert any(r.port == old.port for r in w.records), number
        assert not [r for r in w.records if r.port == old.port and r.ended > promoted_at], number
        first = next((r for r in w.records if r.port == new.port), None)
        assert first is not None, (number, w.records[-3:])
        assert first.ended - promoted_at <= FOLLOW_WITHIN, (number, first.ended - promoted_at)
        assert w.records[-1].port == new.port, (number, w.records[-1])
    return min(r.ended for w in writers for r in w.records if r.port == new.port) - promoted_at


def test_a_demoted_writer_is_left_at_its_first_read_only_errors(
    cluster: tuple[PostgresInstance, PostgresInstance], proxy: ProxyProcess
) -> None:
    primary, standby = cluster
    proxy.wait_for_log(rf"instance .*:{primary.port} is now writer")
    proxy.wait_for_log(rf"instance .*:{standby.port} is now reader")

    def demote_and_promote() -> float:
        # Behind the proxy's back: the writer turns read-only, the standby is promoted.
        primary.psql("ALTER SYSTEM SET default_transaction_read_only = on")
        primary.psql("SELECT pg_reload_conf()")
        standby.promote()
        return time.monotonic()

    writers, promoted_at = _run_writers(proxy, demote_and_promote)
    first_write = _check_followed(writers, primary, standby, promoted_at)
    errors = [r for w in writers for r in w.records if r.error]
    assert {r.sqlstate for r in errors} <= {"25006"}, sorted({r.error for r in errors})
    # After the promotion, a client's read-only errors end within one reaction round (a few transactions).
    late = [r for r in errors if r.started > promoted_at]
    assert all(r.started - promoted_at < REACTION_ROUND for r in late), late
    proxy.wait_for_log(r"read-only error \(SQLSTATE 25006\) from .*; probing the instances now")
    proxy.wait_for_log(rf"endpoint rw: writer is now 127\.0\.0\.1:{standby.port} \(timeline 2\)")
    print(f"read-only writer: first write on the promoted standby {first_write * 1000:.0f} ms after the promotion; "
          f"{len(errors)} read-only error(s) in all, {len(late)} after the promotion")


def test_a_killed_writer_is_left_at_its_first_lost_backend(
    cluster: tuple[PostgresInstance, PostgresInstance], proxy: ProxyProcess
) -> None:
    primary, standby = cluster
    proxy.wait_for_log(rf"instance .*:{primary.port} is now writer")

    def kill_and_promote() -> float:
        primary.kill()
        standby.promote()
        return time.monotonic()

    writers, promoted_at = _run_writers(proxy, kill_and_promote)
    first_write = _check_followed(writers, primary, standby, promoted_at)
    errors = [r for w in writers for r in w.records if r.error]
    assert not [r for r in errors if r.started > promoted_at], errors
    proxy.wait_for_log(r"; probing the instances now")  # a refused connect, a lost backend or a shutdown error
    print(f"killed writer: first write on the promoted standby {first_write * 1000:.0f} ms after the promotion; "
          f"{len(errors)} failed transaction(s) around the kill")


def test_a_backend_lost_mid_transaction_has_the_instances_probed_at_once(
    cluster: tuple[PostgresInstance, PostgresInstance], proxy: ProxyProcess
) -> None:
    primary, standby = cluster
    proxy.wait_for_log(rf"instance .*:{primary.port} is now writer")
    with connect_pg(proxy) as conn:
        conn.autocommit = True
        assert conn.execute("SELECT inet_server_port()").fetchone() == (primary.port,)
        failure: list[BaseException] = []
        rows: list[tuple[object, ...] | None] = []

        def sleep() -> None:
            try:
                rows.append(conn.execute("SELECT pg_sleep(1), inet_server_port()").fetchone())
            except psycopg.Error as exc:
                failure.append(exc)

        thread = threading.Thread(target=sleep, daemon=True)
        thread.start()
        time.sleep(0.3)
        killed_at = time.monotonic()
        primary.kill()  # the only traffic is the statement in flight: its lost backend is the first sign
        proxy.wait_for_log(r"cluster main: backend .* lost: .*; probing the instances now", timeout=2.0)
        proxy.wait_for_log(r"endpoint rw: cluster main has no healthy writer", timeout=2.0)
        noticed = time.monotonic() - killed_at
        standby.promote()
        thread.join(15)
    # The read in flight waited for the new writer and was run again there: the client saw no error.
    assert not failure and rows and rows[0] is not None and rows[0][1] == standby.port, (failure, rows)
    assert noticed < 2.0, noticed
    print(f"a killed writer was seen through a lost backend within {noticed * 1000:.0f} ms")


def _trouble_read(sqlstate: str, severity: str = "ERROR") -> tuple[int, list[str]]:
    """An error reply and ReadyForQuery fed to the matcher cut at every offset: the number of cuts and the trouble
    reported over all of them (the reader clears it after each feed, as the backend does)."""
    reply = pg.error_response(sqlstate, "some text", severity) + b"Z\x00\x00\x00\x05I"
    seen: list[str] = []
    for cut in range(1, len(reply)):
        matcher = ReplyMatcher()
        matcher.expect.append(Expectation(QUERY, FORWARD))
        out = b""
        for part in (reply[:cut], reply[cut:]):
            out += matcher.feed(part)
            if matcher.trouble:
                assert matcher.eventful
                seen.append(matcher.trouble)
                matcher.trouble = ""
        assert out == reply
    return len(reply) - 1, seen


@pytest.mark.parametrize("sqlstate", ["25006", "57P01", "57P02", "57P03"])
def test_read_only_and_shutdown_errors_are_trouble(sqlstate: str) -> None:
    cuts, seen = _trouble_read(sqlstate, "FATAL" if sqlstate.startswith("57") else "ERROR")
    assert seen == [sqlstate] * cuts


@pytest.mark.parametrize("sqlstate", ["23505", "42P01", "25P02", "57014"])
def test_other_errors_are_not_trouble(sqlstate: str) -> None:
    assert _trouble_read(sqlstate)[1] == []
