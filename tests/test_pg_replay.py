"""Work in flight when the PostgreSQL writer dies is not lost and no client connection drops: transactions are
replayed on the promoted standby (synchronous replication: what was acknowledged is there), or end with 40001
(rolled back, retry) or 08007 (a COMMIT whose outcome is unknown)."""

from __future__ import annotations

import asyncio
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import psycopg
import pytest
from asyncpg.transaction import Transaction

from devtools.servers import PostgresInstance
from replicated import cluster_config, log_monotonic, monitor_secret, postgres_pair, running_proxy
from support import ProxyProcess

CLIENTS = 20
BACKENDS = 6  # fewer backends than clients
INTERVAL = 0.2
THINK = 0.05  # seconds a client spends between the statements of a transaction
GRACE = 1.0  # seconds without a writer before the proxy promotes the standby (auto_promote)


@pytest.fixture()
def cluster(tmp_path: Path) -> Iterator[tuple[PostgresInstance, PostgresInstance]]:
    with postgres_pair(tmp_path, "CREATE TABLE rows (client int NOT NULL, n int NOT NULL)", synchronous=True) as pair:
        yield pair


@pytest.fixture()
def promoter() -> str:
    """Who promotes the standby when the writer dies: "test" (by hand) or "proxy" (auto_promote)."""
    return "test"


@pytest.fixture()
def proxy(tmp_path: Path, cluster: tuple[PostgresInstance, PostgresInstance], monkeypatch: pytest.MonkeyPatch,
          request: pytest.FixtureRequest, promoter: str) -> Iterator[ProxyProcess]:
    primary, standby = cluster
    backends = getattr(request, "param", BACKENDS)
    promotion = {"auto_promote": True, "failover_grace": GRACE} if promoter == "proxy" else {}
    config = cluster_config(primary, standby, names=True,
                            pool={"max_connections": backends, "connection_borrow_timeout": 30.0},
                            monitor_interval=INTERVAL, monitor_user=monitor_secret(monkeypatch, primary), **promotion)
    # No backend kept between a client's transactions for its sequence values (table rows has no sequence): with
    # the default hold, the autocommit writers would keep the backends and the transactions would wait in line at
    # the kill instead of being on a backend.
    config["postgresql"] = {"sequence_hold": 0}
    with running_proxy(tmp_path / "proxy", config) as process:
        yield process


def _connect(proxy: ProxyProcess, autocommit: bool = True) -> psycopg.Connection[tuple[int, ...]]:
    return psycopg.connect(host="127.0.0.1", port=proxy.ports["rw"], user="app", password="app-secret",
                           dbname="app", connect_timeout=10, autocommit=autocommit)


def _sqlstate(exc: psycopg.Error) -> str:
    return exc.sqlstate or f"{type(exc).__name__}: {exc}"


@dataclass
class Attempt:
    rows: list[int]  # the numbers written
    started: float
    ended: float = 0.0
    outcome: str = ""  # "ok" (acknowledged) or the SQLSTATE of the error


@dataclass
class Client:
    """One connection writing numbered rows in a loop: alone (autocommit) or several in a transaction."""

    number: int
    conn: psycopg.Connection[tuple[int, ...]]
    in_transactions: bool
    attempts: list[Attempt] = field(default_factory=list)
    dropped: str = ""
    next_row: int = 0

    def run(self, stop: threading.Event) -> None:
        conn = self.conn
        while not stop.is_set() and not self.dropped:
            size = 2 if self.in_transactions else 1
            attempt = Attempt(list(range(self.next_row, self.next_row + size)), time.monotonic())
            self.next_row += size
            self.attempts.append(attempt)
            try:
                if self.in_transactions:
                    conn.execute("BEGIN")
                    for n in attempt.rows:
                        conn.execute("INSERT INTO rows (client, n) VALUES (%s, %s)", (self.number, n))
                        time.sleep(THINK)  # the application works between its statements
                    seen = conn.execute("SELECT count(*) FROM rows WHERE client = %s", (self.number,)).fetchone()
                    assert seen is not None and seen[0] >= len(attempt.rows)
                    conn.execute("COMMIT")
                else:
                    conn.execute("INSERT INTO rows (client, n) VALUES (%s, %s)", (self.number, attempt.rows[0]))
                attempt.outcome = "ok"
            except psycopg.Error as exc:
                attempt.outcome = _sqlstate(exc)
                if conn.closed:
                    self.dropped = attempt.outcome
                    break
                try:
                    if conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
                        conn.execute("ROLLBACK")
                except psycopg.Error as again:
                    self.dropped = f"after {attempt.outcome}: {_sqlstate(again)}"
            finally:
                attempt.ended = time.monotonic()


def _log_count(proxy: ProxyProcess, pattern: str) -> int:
    return len(re.findall(pattern, proxy.log()))


@pytest.mark.parametrize("promoter", ["test", "proxy"])
def test_writes_in_flight_survive_the_writer_dying(
    cluster: tuple[PostgresInstance, PostgresInstance], proxy: ProxyProcess, promoter: str
) -> None:
    primary, standby = cluster
    proxy.wait_for_log(rf"instance .*:{primary.port} is now writer")
    clients = [Client(number, _connect(proxy), in_transactions=number % 2 == 0) for number in range(CLIENTS)]
    idle = _connect(proxy)  # idle outside a transaction during the failover: nothing to recover
    idle.execute("SET application_name = 'idle one'")
    stop = threading.Event()
    threads = [threading.Thread(target=c.run, args=(stop,), daemon=True) for c in clients]
    try:
        for thread in threads:
            thread.start()
        time.sleep(1.5)
        killed_at = time.monotonic()
        primary.kill()
        if promoter == "proxy":
            line = proxy.wait_for_log(rf"cluster main: promoted 127\.0\.0\.1:{standby.port} in \d+ ms", timeout=10.0)
            promoted_at = log_monotonic(line)
        else:
            time.sleep(0.5)
            standby.promote()
            promoted_at = time.monotonic()
        proxy.wait_for_log(rf"endpoint rw: writer is now 127\.0\.0\.1:{standby.port}", timeout=10.0)
        time.sleep(2.0)
    finally:
        stop.set()
        for thread in threads:
            thread.join(40)
    assert not any(thread.is_alive() for thread in threads), "a client hung"

    assert idle.execute("SELECT current_setting('application_name'), inet_server_port()").fetchone() == (
        "idle one", standby.port)
    idle.close()
    dropped = {c.number: c.dropped for c in clients if c.dropped}
    assert not dropped, f"client connections dropped: {dropped}"
    written: dict[tuple[int, int], int] = {}
    for line in standby.psql("SELECT client, n, count(*) FROM rows GROUP BY client, n", db="app",
                             user="app").splitlines():
        client, n, count = map(int, line.split("|"))
        written[(client, n)] = count
    twice = {key: count for key, count in written.items() if count > 1}
    assert not twice, f"rows written more than once: {twice}"
    outcomes: dict[str, int] = {}
    for c in clients:
        for attempt in c.attempts:
            outcomes[attempt.outcome] = outcomes.get(attempt.outcome, 0) + 1
            present = [(c.number, n) in written for n in attempt.rows]
            if attempt.outcome == "ok":
                assert all(present), f"an acknowledged write is missing: client {c.number}, {attempt}"
            elif attempt.outcome == "40001":
                assert not any(present), f"a rolled back transaction left rows: client {c.number}, {attempt}"
            elif attempt.outcome == "08007":
                assert all(present) or not any(present), f"half a transaction: client {c.number}, {attempt}"
            else:
                pytest.fail(f"client {c.number}: unexpected outcome {attempt.outcome} of {attempt}")
    replayed = _log_count(proxy, r"transaction replayed on .* the replies matched|it is sent again as it is")
    aborted = _log_count(proxy, r"\((?:40001|08007)\)")
    first_write = min((a.ended for c in clients for a in c.attempts
                       if a.outcome == "ok" and a.ended > promoted_at), default=None)
    after = [a for c in clients for a in c.attempts if a.outcome == "ok" and a.ended > promoted_at]
    if promoter == "proxy":
        assert _log_count(proxy, r"; promoting ") == 1
    print(f"\npromoted by the {promoter}: attempts by outcome: {outcomes}; replayed transactions: {replayed}; "
          f"ended with 40001/08007: {aborted}; acknowledged after promotion: {len(after)}; kill to promotion: "
          f"{promoted_at - killed_at:.2f} s; kill to first write acknowledged after the promotion: "
          f"{(first_write - killed_at) if first_write is not None else None!r} s; promotion to it: "
          f"{(first_write - promoted_at) if first_write is not None else None!r} s")
    # (how many were replayed depends on what each backend was doing at the kill: replays are checked one by one
    # in the next test)
    assert replayed + aborted >= 1, "nothing was in flight when the writer died"
    assert after, "no write succeeded after the promotion"


async def _asyncpg_begin(proxy: ProxyProcess) -> tuple[asyncpg.Connection, Transaction]:
    conn = await asyncpg.connect(host="127.0.0.1", port=proxy.ports["rw"], user="app", password="app-secret",
                                 database="app", timeout=10)
    transaction = conn.transaction()
    await transaction.start()
    await conn.execute("INSERT INTO rows (client, n) VALUES ($1, 1)", 103)
    assert await conn.fetchval("SELECT count(*) FROM rows WHERE client = $1", 103) == 1
    return conn, transaction


async def _asyncpg_finish(conn: asyncpg.Connection, transaction: Transaction) -> None:
    """After the failover: the transaction was replayed; it goes on and commits."""
    await conn.execute("INSERT INTO rows (client, n) VALUES ($1, 2)", 103)
    assert await conn.fetchval("SELECT count(*) FROM rows WHERE client = $1", 103) == 2
    await transaction.commit()
    assert await conn.fetchval("SELECT 5") == 5
    await conn.close()


@pytest.mark.parametrize("proxy", [10], indirect=True)  # a backend for each client: all of them are in flight
def test_what_cannot_be_replayed_ends_with_an_error_and_the_connection_stays(
    cluster: tuple[PostgresInstance, PostgresInstance], proxy: ProxyProcess
) -> None:
    primary, standby = cluster
    proxy.wait_for_log(rf"instance .*:{primary.port} is now writer")
    # its replay reads another random(): 40001 at its next statement (psycopg's own BEGIN and ROLLBACK: simple
    # queries; the others' are extended-protocol statements)
    random_then_write = _connect(proxy, autocommit=False)
    random_then_commit = _connect(proxy)  # the same, and its next statement is COMMIT: 40001, no silent rollback
    random_then_rollback = _connect(proxy)  # the same, then an extended-protocol ROLLBACK answered by the proxy
    same_reads = _connect(proxy)  # replays the same replies: its transaction goes on
    slow_read = _connect(proxy)  # an autocommit read in flight: replayed
    slow_write = _connect(proxy)  # an autocommit write in flight: 08007
    _connect(proxy).execute("INSERT INTO rows (client, n) VALUES (300, 1)")
    changed_row = _connect(proxy, autocommit=False)  # read a row another client then changed: its replay differs
    assert changed_row.execute("SELECT n FROM rows WHERE client = 300").fetchone() == (1,)
    primary.psql("UPDATE rows SET n = 2 WHERE client = 300", db="app", user="app")  # committed on the standby too
    for number, conn in ((100, random_then_write), (101, random_then_commit), (102, same_reads),
                         (104, random_then_rollback)):
        if conn.autocommit:
            conn.execute("BEGIN")
        conn.execute("INSERT INTO rows (client, n) VALUES (%s, 1)", (number,))
        if number != 102:
            conn.execute("SELECT random()")
        else:
            conn.execute("SELECT count(*) FROM rows")
    loop = asyncio.new_event_loop()
    asyncpg_conn, transaction = loop.run_until_complete(_asyncpg_begin(proxy))  # reads that replay identically
    results: dict[str, object] = {}

    def run(name: str, conn: psycopg.Connection[tuple[int, ...]], sql: str) -> None:
        try:
            results[name] = conn.execute(sql).fetchone()
        except psycopg.Error as exc:
            results[name] = _sqlstate(exc)

    threads = [threading.Thread(target=run, args=("read", slow_read, "SELECT 42 FROM pg_sleep(2)")),
               threading.Thread(target=run, args=("write", slow_write, "INSERT INTO rows (client, n) SELECT 200, 1 "
                                                  "FROM pg_sleep(2) RETURNING n"))]
    for thread in threads:
        thread.start()
    time.sleep(0.7)
    primary.kill()
    time.sleep(0.3)
    standby.promote()
    proxy.wait_for_log(rf"endpoint rw: writer is now 127\.0\.0\.1:{standby.port}", timeout=10.0)
    for thread in threads:
        thread.join(40)
    assert results == {"read": (42,), "write": "08007"}, results

    with pytest.raises(psycopg.Error) as raised:
        random_then_write.execute("INSERT INTO rows (client, n) VALUES (100, 2)")
    assert raised.value.sqlstate == "40001" and "failover" in str(raised.value)
    assert random_then_write.info.transaction_status == psycopg.pq.TransactionStatus.INERROR
    with pytest.raises(psycopg.Error) as raised:
        random_then_write.execute("SELECT 1")
    assert raised.value.sqlstate == "25P02"
    random_then_write.rollback()
    assert random_then_write.execute("SELECT 7").fetchone() == (7,)
    random_then_write.commit()

    with pytest.raises(psycopg.Error) as raised:
        random_then_commit.execute("COMMIT")
    assert raised.value.sqlstate == "40001"
    assert random_then_commit.info.transaction_status == psycopg.pq.TransactionStatus.IDLE

    with pytest.raises(psycopg.Error) as raised:
        random_then_rollback.execute("SELECT 1")
    assert raised.value.sqlstate == "40001"
    random_then_rollback.execute("ROLLBACK")
    assert random_then_rollback.info.transaction_status == psycopg.pq.TransactionStatus.IDLE

    with pytest.raises(psycopg.Error) as raised:  # the row it read is not what it was: never silently committed
        changed_row.execute("UPDATE rows SET n = 3 WHERE client = 300")
    assert raised.value.sqlstate == "40001"
    changed_row.rollback()
    assert changed_row.execute("SELECT n FROM rows WHERE client = 300").fetchone() == (2,)
    changed_row.commit()

    same_reads.execute("INSERT INTO rows (client, n) VALUES (102, 2)")
    same_reads.execute("COMMIT")
    loop.run_until_complete(_asyncpg_finish(asyncpg_conn, transaction))
    loop.close()

    for conn in (random_then_write, random_then_commit, random_then_rollback, same_reads, slow_read, slow_write,
                 changed_row):
        assert conn.execute("SELECT 1").fetchone() == (1,)
        conn.close()
    rows = standby.psql("SELECT client, n FROM rows WHERE client >= 100 ORDER BY client, n", db="app", user="app")
    written = {tuple(map(int, line.split("|"))) for line in rows.splitlines()}
    assert {(100, 1), (100, 2), (101, 1), (104, 1)}.isdisjoint(written), written
    kept = {(102, 1), (102, 2), (103, 1), (103, 2), (300, 2)}
    assert kept <= written, written
    assert written - kept <= {(200, 1)}, written  # the 08007 write may or may not be there
    proxy.wait_for_log(r"the replayed transaction was rolled back: its replies differ \(40001\)")
