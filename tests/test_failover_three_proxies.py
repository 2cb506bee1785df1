"""Three proxies in front of one PostgreSQL cluster see a failover at different moments (two have clients writing,
whose lost backends make them look at once; the third is idle and sees it at its own monitoring round): all three
agree on the promoted standby within one monitoring interval of the first, and once any of them has seen it, no
write through any of them lands on the old primary, though it is started again at that moment as a writer on the
old timeline. Each proxy monitors on its own (no messages between them): the promotion waits failover_grace
(longer than the interval) without a writer, so every proxy has seen the old writer gone before a new one exists,
and the highest timeline wins from then on."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from devtools.servers import PostgresInstance
from replicated import cluster_config, log_monotonic, monitor_secret, postgres_pair, running_proxy
from support import ProxyProcess, backend_connections

INTERVAL = 1.0
GRACE = 1.5  # > INTERVAL: every proxy has a round without the old writer before anyone promotes
PROXIES = 3


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
            for number in range(PROXIES)]


class Writer(threading.Thread):
    """Inserts (proxy number, inet_server_port()) through one proxy in a loop; a new connection for each insert
    when `fresh` (so every insert goes wherever that proxy points now); what each commit reported."""

    def __init__(self, proxy: ProxyProcess, number: int, fresh: bool,
                 committed: list[tuple[float, int, int]]) -> None:
        super().__init__(daemon=True)
        self.proxy, self.number, self.fresh, self.committed = proxy, number, fresh, committed
        self.stop = threading.Event()

    def _connect(self) -> psycopg.Connection[tuple[int]]:
        return psycopg.connect(host="127.0.0.1", port=self.proxy.ports["rw"], user="app", password="app-secret",
                               dbname="app", autocommit=True, connect_timeout=10)

    def run(self) -> None:
        conn: psycopg.Connection[tuple[int]] | None = None
        while not self.stop.is_set():
            try:
                if conn is None or conn.closed:
                    conn = self._connect()
                row = conn.execute("INSERT INTO t (proxy, port) SELECT %s, inet_server_port() RETURNING port",
                                   (self.number,)).fetchone()
                assert row is not None
                self.committed.append((time.monotonic(), self.number, row[0]))
                if self.fresh:
                    conn.close()
            except psycopg.Error:
                if conn is not None:
                    conn.close()
            time.sleep(0.02)
        if conn is not None:
            conn.close()


def _first_line(proxy: ProxyProcess, text: str) -> str | None:
    return next((line for line in proxy.log().splitlines() if text in line), None)


def test_three_proxies_agree_on_the_new_writer_within_one_interval_and_never_write_to_the_old(
    cluster: tuple[PostgresInstance, PostgresInstance], fleet: list[ProxyProcess]
) -> None:
    primary, standby = cluster
    for proxy in fleet:
        proxy.wait_for_log(rf"instance .*:{standby.port} is now reader")
    committed: list[tuple[float, int, int]] = []
    writers = [Writer(fleet[number], number, fresh=False, committed=committed) for number in (0, 1)]
    for writer in writers:
        writer.start()
    new_writer = f"endpoint rw: writer is now 127.0.0.1:{standby.port} (timeline 2)"
    try:
        deadline = time.monotonic() + 5
        while {n for _, n, p in committed if p == primary.port} != {0, 1}:
            assert time.monotonic() < deadline, committed[-5:]
            time.sleep(0.05)
        primary.kill()
        deadline = time.monotonic() + 20
        while not any(_first_line(proxy, new_writer) for proxy in fleet):
            assert time.monotonic() < deadline, "no proxy saw the promotion"
            time.sleep(0.02)
        first_seen = time.monotonic()
        primary.start()  # at once: the old primary writes again, on the old timeline
        rows_at_restart = primary.psql("SELECT count(*) FROM t", db="app")
        late = Writer(fleet[2], 2, fresh=True, committed=committed)  # the idle proxy gets a client now
        writers.append(late)
        late.start()
        lines = []
        for proxy in fleet:
            proxy.wait_for_log(rf"endpoint rw: writer is now 127\.0\.0\.1:{standby.port} \(timeline 2\)", 20)
            lines.append(_first_line(proxy, new_writer))
        deadline = time.monotonic() + 10
        while {n for t, n, p in committed if p == standby.port and t > first_seen} != {0, 1, 2}:
            assert time.monotonic() < deadline, committed[-5:]
            time.sleep(0.05)
        time.sleep(2 * INTERVAL)  # rounds that see the old primary back as a writer
        for proxy in fleet:
            proxy.wait_for_log(rf"instance 127\.0\.0\.1:{primary.port} is now writer \(timeline 1\)")
    finally:
        for writer in writers:
            writer.stop.set()
        for writer in writers:
            writer.join(30)
    lost = [log_monotonic(proxy.wait_for_log("endpoint rw: cluster main has no healthy writer")) for proxy in fleet]
    seen = sorted(log_monotonic(line) for line in lines if line is not None)
    spread = seen[-1] - seen[0]
    assert spread <= INTERVAL, f"the proxies saw the new writer {spread:.2f} s apart"
    # Nothing written to the old primary after its restart, and no client connection of any proxy there.
    assert primary.psql("SELECT count(*) FROM t", db="app") == rows_at_restart
    assert backend_connections(primary) == 0
    after = [(t, n, p) for t, n, p in committed if t > seen[0]]
    assert after and all(p == standby.port for _, _, p in after), [c for c in after if c[2] != standby.port][:5]
    winners = sum(proxy.log().count(f"cluster main: promoted 127.0.0.1:{standby.port}") for proxy in fleet)
    assert winners >= 1
    print(f"three proxies saw the writer gone at +{', +'.join(f'{t - min(lost):.2f}' for t in lost)} s, "
          f"the new writer at +{', +'.join(f'{t - seen[0]:.2f}' for t in seen)} s "
          f"(interval {INTERVAL} s); {len(after)} commits after the first saw it, all on the promoted standby, "
          f"none on the old primary started again")
