"""A read_write endpoint follows a PostgreSQL failover: clients through the proxy keep their connections and
write to the promoted standby; while there is no writer, new transactions wait instead of failing."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from devtools.servers import PostgresInstance
from replicated import PortWriter, cluster_config, connect_pg, monitor_secret, postgres_pair, running_proxy
from support import ProxyProcess

CLIENTS = 6
BACKENDS = 2  # fewer backends than clients: the clients share them
INTERVAL = 0.2
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
                            endpoints={"rw": "read_write", "ro": "read_only"},
                            monitor_interval=INTERVAL, monitor_user=monitor_secret(monkeypatch, primary))
    with running_proxy(tmp_path / "proxy", config) as process:
        yield process


def test_read_write_endpoint_follows_the_promoted_standby(
    cluster: tuple[PostgresInstance, PostgresInstance], proxy: ProxyProcess
) -> None:
    primary, standby = cluster
    proxy.wait_for_log(rf"instance .*:{primary.port} is now writer")
    writers = [PortWriter(lambda: connect_pg(proxy)) for _ in range(CLIENTS)]
    stop = threading.Event()
    threads = [threading.Thread(target=w.run, args=(stop,), daemon=True) for w in writers]
    try:
        for thread in threads:
            thread.start()
        time.sleep(1.0)
        killed_at = time.monotonic()
        primary.kill()
        proxy.wait_for_log(r"endpoint rw: cluster main has no healthy writer", timeout=5.0)
        # A client arriving while there is no writer: its transaction waits for one, then succeeds.
        late = PortWriter(lambda: connect_pg(proxy))
        late_thread = threading.Thread(target=late.run, args=(stop,), daemon=True)
        late_thread.start()
        time.sleep(1.0)
        assert not late.records, f"a transaction finished while there was no writer: {late.records}"
        standby.promote()
        promoted_at = time.monotonic()
        proxy.wait_for_log(rf"endpoint rw: writer is now 127\.0\.0\.1:{standby.port} \(timeline 2\), "
                           rf"was 127\.0\.0\.1:{primary.port}", timeout=5.0)
        time.sleep(FOLLOW_WITHIN + 0.5)
        primary.start()  # the old primary comes back on the old timeline: it must get nothing
        restarted_at = time.monotonic()
        time.sleep(1.5)
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)

    everyone = [*writers, late]
    late_thread.join(30)
    # A client whose transaction was on a backend of the primary when it died gets the backend's error and loses
    # its connection (at most one per backend); no other client does.
    closed = [record for w in everyone for record in w.closed]
    assert len(closed) <= BACKENDS, closed
    assert all(killed_at - 1.0 < record.started < killed_at + 0.5 for record in closed), closed
    for number, w in enumerate(everyone):
        before = [r for r in w.records if r.ended < killed_at]
        assert w is late or (before and all(r.port == primary.port for r in before)), (number, before[:3])
        for record in w.records:
            # Only a transaction that was in flight while there was no writer may fail.
            assert not record.error or record.started < promoted_at, (number, record)
            if record.port is not None and record.ended > promoted_at:
                assert record.port == standby.port, (number, record)
        after = [r for r in w.records if r.started >= promoted_at]
        assert after and all(r.port == standby.port for r in after), (number, after[:3])
        first = next(r for r in w.records if r.port == standby.port)
        assert first.ended - promoted_at <= FOLLOW_WITHIN, (number, first.ended - promoted_at)
        assert any(r.started > restarted_at and r.port == standby.port for r in w.records), number
    assert late.records[0].port == standby.port and late.records[0].started < promoted_at, late.records[0]
    first_write = min(r.ended for w in everyone for r in w.records if r.port == standby.port) - promoted_at
    print(f"{len(closed)} connection(s) lost with the transaction in flight at the kill")
    errors = [r.error for w in everyone for r in w.records if r.error]
    print(f"first write through the proxy {first_write * 1000:.0f} ms after the promotion; "
          f"{len(errors)} failed transaction(s) around the kill: {sorted(set(errors))[:3]}")
    for w in everyone:
        w.conn.close()


def test_read_only_endpoint_leaves_a_dead_standby_for_the_writer(
    cluster: tuple[PostgresInstance, PostgresInstance], proxy: ProxyProcess
) -> None:
    primary, standby = cluster
    proxy.wait_for_log(rf"instance .*:{standby.port} is now reader")
    with connect_pg(proxy, "ro") as reader:
        reader.autocommit = True
        assert reader.execute("SELECT inet_server_port()").fetchone() == (standby.port,)
        standby.kill()
        proxy.wait_for_log(rf"endpoint ro: now serving one \(127\.0\.0\.1:{primary.port}\); left out: two "
                           r"\(unhealthy\); no reader is eligible; the writer serves meanwhile", timeout=5.0)
        # The idle client's connection stays; its next statement runs on the writer.
        assert reader.execute("SELECT inet_server_port()").fetchone() == (primary.port,)
    assert "endpoint rw: writer is now" not in proxy.log()
