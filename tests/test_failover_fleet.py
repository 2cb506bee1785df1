"""Two proxies in front of one PostgreSQL cluster: after the primary is killed, both promote the same standby (one
attempt wins, the other finds it promoted) and write to it; when the old primary comes back as a stale writer on
the old timeline, neither sends it anything: it stays fenced."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from devtools.servers import PostgresInstance
from replicated import cluster_config, monitor_secret, postgres_pair, running_proxy
from support import ProxyProcess, backend_connections

INTERVAL = 0.5
GRACE = 1.0


@pytest.fixture()
def cluster(tmp_path: Path) -> Iterator[tuple[PostgresInstance, PostgresInstance]]:
    with postgres_pair(tmp_path, "CREATE TABLE t (id serial PRIMARY KEY, proxy int, port int)") as pair:
        yield pair


@pytest.fixture()
def fleet(tmp_path: Path, cluster: tuple[PostgresInstance, PostgresInstance],
          monkeypatch: pytest.MonkeyPatch) -> Iterator[list[ProxyProcess]]:
    primary, standby = cluster
    monitor_user = monitor_secret(monkeypatch, primary)
    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(running_proxy(tmp_path / f"proxy{number}", cluster_config(
            primary, standby, roles=False, pool={"max_connections": 2, "connection_borrow_timeout": 20.0},
            monitor_interval=INTERVAL, monitor_user=monitor_user, auto_promote=True, failover_grace=GRACE)))
            for number in range(2)]


class Writes:
    """A client per proxy inserting (proxy number, inet_server_port()) in a loop; what each commit reported."""

    def __init__(self, proxies: list[ProxyProcess]) -> None:
        self.proxies = proxies
        self.committed: list[tuple[float, int, int]] = []  # (time.monotonic(), proxy number, server port)
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(n,), daemon=True) for n in range(len(proxies))]

    def _connect(self, number: int) -> psycopg.Connection[tuple[int]]:
        return psycopg.connect(host="127.0.0.1", port=self.proxies[number].ports["rw"], user="app",
                               password="app-secret", dbname="app", autocommit=True, connect_timeout=10)

    def _run(self, number: int) -> None:
        conn = self._connect(number)
        while not self.stop.is_set():
            try:
                row = conn.execute("INSERT INTO t (proxy, port) SELECT %s, inet_server_port() RETURNING port",
                                   (number,)).fetchone()
                assert row is not None
                self.committed.append((time.monotonic(), number, row[0]))
            except psycopg.Error:
                if conn.closed:
                    conn = self._connect(number)
            time.sleep(0.02)
        conn.close()

    def __enter__(self) -> Writes:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(30)

    def wait_for(self, port: int, timeout: float) -> None:
        """Until every proxy's client has committed on `port`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if {n for _, n, p in self.committed if p == port} == set(range(len(self.proxies))):
                return
            time.sleep(0.05)
        raise AssertionError(f"not every proxy wrote to port {port}: {self.committed[-5:]}")


def test_two_proxies_follow_one_promotion_and_fence_the_stale_primary(
    cluster: tuple[PostgresInstance, PostgresInstance], fleet: list[ProxyProcess]
) -> None:
    primary, standby = cluster
    for proxy in fleet:
        proxy.wait_for_log(rf"instance .*:{standby.port} is now reader")
    with Writes(fleet) as writes:
        writes.wait_for(primary.port, 5.0)
        primary.kill()
        writes.wait_for(standby.port, 15.0)
        promoted_at = time.monotonic()
        for proxy in fleet:
            proxy.wait_for_log(rf"endpoint rw: writer is now 127\.0\.0\.1:{standby.port} \(timeline 2\)")
        primary.start()  # the old data directory: a writer again, on the old timeline
        restarted_at = time.monotonic()
        assert primary.psql("SELECT pg_is_in_recovery()") == "f"
        rows_at_restart = primary.psql("SELECT count(*) FROM t", db="app")
        time.sleep(3 * INTERVAL + 1.0)  # several monitor rounds see the stale writer
        for proxy in fleet:
            proxy.wait_for_log(rf"instance 127\.0\.0\.1:{primary.port} is now writer \(timeline 1\)")
        ended_at = time.monotonic()
    # Fenced: no client connection of either proxy on the stale primary, no write through either landed there.
    assert backend_connections(primary) == 0
    assert primary.psql("SELECT count(*) FROM t", db="app") == rows_at_restart
    after = [(t, n, p) for t, n, p in writes.committed if t > promoted_at]
    assert after and all(p == standby.port for _, _, p in after), after[:5]
    for number in range(len(fleet)):
        assert any(n == number and restarted_at < t < ended_at for t, n, _ in after), number
    attempts = sum(proxy.log().count("; promoting 127.0.0.1") for proxy in fleet)
    winners = sum(proxy.log().count(f"cluster main: promoted 127.0.0.1:{standby.port}") for proxy in fleet)
    assert attempts >= 1 and winners >= 1, (attempts, winners)
    for proxy in fleet:
        assert f"promoting 127.0.0.1:{primary.port}" not in proxy.log()
    print(f"two proxies: {attempts} promotion attempt(s), {winners} promotion(s) done; both wrote to the promoted "
          f"standby, none to the stale primary in {ended_at - restarted_at:.1f} s after its restart")
