"""MySQL work in flight when the writer dies: replayed on the promoted replica when its replies match, else ended
with ER_LOCK_DEADLOCK (rolled back, retry) or ER_ERROR_DURING_COMMIT/08007 (outcome unknown); the client's
connection stays. Unit tests of the recorder and the command classifier; failover tests with real MariaDB servers
replicating semi-synchronously."""

from __future__ import annotations

import hashlib
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mysql.connector
import pymysql
import pytest

from devtools.servers import MariaDBInstance
from proxy.protocol.mysql import constants as my
from proxy.protocol.mysql.outcome import (
    BEGIN,
    MAY_COMMIT,
    NOT_REPLAYED,
    READ,
    ROLLBACK,
    SESSION,
    SETTING,
    WRITE,
    command_kind,
    query_kind,
)
from proxy.session.replay_log import ReplayCheck, ReplayLog
from replicated import (
    MONITOR,
    PROMOTER_GRANTS,
    cluster_config,
    connect_my,
    kill_mariadb,
    log_monotonic,
    mariadb_pair,
    monitor_secret,
)
from support import ProxyProcess, write_config

INTERVAL = 0.2
GRACE = 1.0  # seconds without a writer before the proxy promotes the replica (auto_promote)

# --- the recorder ---


def test_replay_log_records_until_its_limit_and_hashes_the_replies() -> None:
    replay = ReplayLog(10)
    replay.record(b"abcd")
    replay.record(b"efgh")
    assert replay.chunks == [b"abcd", b"efgh"] and replay.replayable
    replay.sent(b"xy")
    replay.sent(b"z")
    assert replay.sent_bytes == 3
    assert replay.sent_digest() == hashlib.sha256(b"xyz").digest()
    replay.record(b"ijk")  # 11 bytes: over the limit
    assert not replay.replayable and replay.chunks == [] and replay.last == b"ijk"
    replay.reset()
    assert replay.replayable and replay.chunks == [] and replay.sent_bytes == 0
    assert replay.sent_digest() == hashlib.sha256().digest()
    replay.record(b"q")
    replay.sent(b"r" * 160)  # replies are hashed up to 16 times the limit
    assert replay.replayable
    replay.sent(b"r")
    assert not replay.replayable and replay.sent_bytes == 161


def test_replay_check_passes_only_what_the_client_has_not_seen() -> None:
    first = b"0123456789"
    check = ReplayCheck(hashlib.sha256(first[:6]).digest(), 6)
    assert check.feed(first[:4]) == b"" and not check.done
    assert check.feed(first[4:8]) == b"67" and check.done and check.matches
    assert check.feed(b"89") == b"89"
    differs = ReplayCheck(hashlib.sha256(first[:6]).digest(), 6)
    assert differs.feed(b"012399") == b"" and differs.done and not differs.matches
    nothing_seen = ReplayCheck(hashlib.sha256().digest(), 0)
    assert nothing_seen.done and nothing_seen.matches and nothing_seen.feed(b"ab") == b"ab"


@pytest.mark.parametrize(("text", "kind"), [
    (b"SELECT * FROM t", READ),
    (b"  /* note */ select 1", READ),
    (b"-- c\nSHOW TABLES", READ),
    (b"DESCRIBE t", READ),
    (b"EXPLAIN SELECT 1", READ),
    (b"SELECT * FROM t FOR UPDATE", WRITE),
    (b"SELECT 1 INTO @x", WRITE),
    (b"SELECT * FROM t INTO OUTFILE '/tmp/x'", WRITE),
    (b"SELECT GET_LOCK('a', 1)", WRITE),
    (b"SELECT NEXTVAL(s)", WRITE),
    (b"SELECT LAST_INSERT_ID(5)", WRITE),
    (b"SELECT LAST_INSERT_ID()", READ),
    (b"INSERT INTO t VALUES (1)", WRITE),
    (b"update t set a = 1", WRITE),
    (b"DELETE FROM t", WRITE),
    (b"BEGIN", BEGIN),
    (b"START TRANSACTION READ ONLY", BEGIN),
    (b"BEGIN NOT ATOMIC SELECT 1; END", MAY_COMMIT),
    (b"ROLLBACK", ROLLBACK),
    (b"rollback work", ROLLBACK),
    (b"ROLLBACK TO SAVEPOINT a", SESSION),
    (b"ROLLBACK AND CHAIN", MAY_COMMIT),
    (b"SAVEPOINT a", SESSION),
    (b"RELEASE SAVEPOINT a", SESSION),
    (b"SET NAMES utf8mb4", SETTING),
    (b"SET autocommit = 0", SETTING),
    (b"USE app", SETTING),
    (b"SET autocommit=1", MAY_COMMIT),
    (b"SET GLOBAL x = 1", MAY_COMMIT),
    (b"COMMIT", MAY_COMMIT),
    (b"CREATE TABLE x (a INT)", MAY_COMMIT),
    (b"CALL p()", MAY_COMMIT),
    (b"LOCK TABLES t WRITE", MAY_COMMIT),
    (b"SELECT 1; DELETE FROM t", MAY_COMMIT),
    (b"SELECT 1;", READ),
    (b"", MAY_COMMIT),
])
def test_query_kind(text: bytes, kind: int) -> None:
    assert query_kind(text) == kind


def test_command_kind() -> None:
    assert command_kind(bytes((my.COM_PING,))) == READ
    assert command_kind(bytes((my.COM_INIT_DB,)) + b"app") == SETTING
    assert command_kind(bytes((my.COM_QUERY,)) + b"SELECT 1") == READ
    execute = bytes((my.COM_STMT_EXECUTE,)) + (1).to_bytes(4, "little") + b"\0\1\0\0\0"
    assert command_kind(execute, b"SELECT a FROM t WHERE id = ?") == READ
    assert command_kind(execute, b"INSERT INTO t VALUES (?)") == WRITE
    assert command_kind(execute, None) == MAY_COMMIT
    assert command_kind(bytes((my.COM_STMT_PREPARE,)) + b"SELECT ?") == NOT_REPLAYED
    assert command_kind(bytes((my.COM_RESET_CONNECTION,))) == MAY_COMMIT
    assert command_kind(b"") == MAY_COMMIT


# --- failover with real servers ---


@pytest.fixture()
def cluster(tmp_path: Path) -> Iterator[tuple[MariaDBInstance, MariaDBInstance]]:
    with mariadb_pair(tmp_path, "CREATE TABLE app.numbered (client INT, n INT, PRIMARY KEY (client, n));\n"
                      "CREATE TABLE app.t (id INT AUTO_INCREMENT PRIMARY KEY, note VARCHAR(40));",
                      semi_sync=True) as pair:
        yield pair


def _proxy(tmp_path: Path, primary: MariaDBInstance, replica: MariaDBInstance, max_connections: int,
           **cluster: Any) -> ProxyProcess:
    config = cluster_config(primary, replica, login_timeout=5.0,
                            pool={"max_connections": max_connections, "connection_borrow_timeout": 20.0},
                            monitor_interval=INTERVAL, monitor_user=MONITOR, **cluster)
    folder = tmp_path / "proxy"
    folder.mkdir()
    proxy = ProxyProcess(write_config(folder, config), folder / "proxy.log")
    proxy.start()
    proxy.wait_for_log(rf"instance .*:{primary.port} is now writer")
    return proxy


class Writer(threading.Thread):
    """One client writing numbered rows through the proxy: autocommit INSERTs, or transactions of three."""

    def __init__(self, port: int, client: int, transactions: bool, stop: threading.Event) -> None:
        super().__init__(daemon=True)
        self.port, self.client, self.transactions, self.stop = port, client, transactions, stop
        self.acknowledged: list[int] = []  # rows whose commit the client saw succeed
        self.uncertain: list[int] = []  # rows whose commit had an unknown outcome (1180)
        self.retried = 0  # transactions ended with 1213 and run again
        self.unknown = 0
        self.failures: list[str] = []  # anything else: the test fails on it
        self.acknowledged_at: list[float] = []

    def run(self) -> None:
        try:
            conn = pymysql.connect(host="127.0.0.1", port=self.port, user="app", password="app-secret",
                                   database="app", autocommit=True)
        except pymysql.Error as exc:
            self.failures.append(f"connect: {exc}")
            return
        n = 0
        try:
            with conn.cursor() as cursor:
                while not self.stop.is_set():
                    batch = [n + 1, n + 2, n + 3] if self.transactions else [n + 1]
                    try:
                        if self.transactions:
                            conn.begin()
                        for row in batch:
                            cursor.execute("INSERT INTO numbered (client, n) VALUES (%s, %s)", (self.client, row))
                        if self.transactions:
                            conn.commit()
                    except pymysql.err.OperationalError as exc:
                        code = exc.args[0]
                        if code == my.ER_LOCK_DEADLOCK:
                            conn.rollback()  # the documented answer: retry the same rows
                            self.retried += 1
                            continue
                        if code == 1180:
                            self.unknown += 1
                            self.uncertain += batch
                            n = batch[-1]
                            continue
                        self.failures.append(f"client {self.client}: {exc!r}")
                        return
                    except pymysql.Error as exc:
                        self.failures.append(f"client {self.client}: {exc!r}")
                        return
                    self.acknowledged += batch
                    self.acknowledged_at.append(time.monotonic())
                    n = batch[-1]
        finally:
            conn.close()


@pytest.mark.parametrize("promoter", ["test", "proxy"])
def test_writers_keep_their_connections_and_rows_through_a_failover(
    tmp_path: Path, cluster: tuple[MariaDBInstance, MariaDBInstance], monkeypatch: pytest.MonkeyPatch, promoter: str
) -> None:
    primary, replica = cluster
    monitor_secret(monkeypatch, primary)
    promotion: dict[str, Any] = {}
    if promoter == "proxy":  # a monitor_user that may promote: stop and forget replication, clear read_only
        primary.sql(f"GRANT {PROMOTER_GRANTS} ON *.* TO {MONITOR}@'%';")
        replica.wait_caught_up(primary.sql("SELECT @@gtid_binlog_pos"))
        promotion = {"auto_promote": True, "failover_grace": GRACE}
    proxy = _proxy(tmp_path, primary, replica, max_connections=6, **promotion)
    stop = threading.Event()
    writers = [Writer(proxy.ports["rw"], client, client % 2 == 0, stop) for client in range(20)]
    try:
        for writer in writers:
            writer.start()
        started = time.monotonic()  # (the 20 logins take a few seconds on a busy machine)
        while not all(w.acknowledged for w in writers) and time.monotonic() - started < 20:
            time.sleep(0.05)
        assert all(w.acknowledged for w in writers), [w.failures for w in writers]
        time.sleep(0.5)
        killed_at = time.monotonic()
        kill_mariadb(primary)
        proxy.wait_for_log(r"endpoint rw: cluster main has no healthy writer", timeout=5.0)
        if promoter == "proxy":
            line = proxy.wait_for_log(rf"cluster main: promoted 127\.0\.0\.1:{replica.port} in \d+ ms", timeout=10.0)
            promoted_at = log_monotonic(line)
        else:
            replica.promote()
            promoted_at = time.monotonic()
        deadline = promoted_at + 10.0
        while time.monotonic() < deadline and not all(
                any(t > promoted_at for t in w.acknowledged_at) for w in writers if not w.failures):
            time.sleep(0.05)
        time.sleep(0.5)
        stop.set()
        for writer in writers:
            writer.join(15)
        failures = [f for w in writers for f in w.failures]
        assert not failures, failures
        assert all(not w.is_alive() for w in writers)
        assert all(any(t > promoted_at for t in w.acknowledged_at) for w in writers), "a client made no progress"
        first_write = min(t for w in writers for t in w.acknowledged_at if t > promoted_at) - promoted_at
        rows: dict[int, list[int]] = {}
        for line in replica.sql("SELECT client, n FROM app.numbered").split("\n"):
            client, n = map(int, line.split("\t"))
            rows.setdefault(client, []).append(n)
        for writer in writers:
            have = rows.get(writer.client, [])
            assert len(have) == len(set(have))  # (the primary key says so too)
            missing = set(writer.acknowledged) - set(have)
            assert not missing, f"client {writer.client}: acknowledged rows missing: {sorted(missing)}"
            extra = set(have) - set(writer.acknowledged) - set(writer.uncertain)
            assert not extra, f"client {writer.client}: rows never acknowledged: {sorted(extra)}"
        log_text = proxy.log()
        replayed = len(re.findall(r"replayed \d+ command\(s\) on", log_text))
        aborted = len(re.findall(r"WARNING .*(?:cannot be replayed|the replay of its transaction failed)", log_text))
        retried = sum(w.retried for w in writers)
        unknown = sum(w.unknown for w in writers)
        if promoter == "proxy":
            assert log_text.count("; promoting ") == 1
        print(f"failover with 20 writers, promoted by the {promoter}: {replayed} replayed, {aborted} ended with an "
              f"error ({retried} rolled back and retried [1213], {unknown} outcome unknown [1180]); promoted "
              f"{(promoted_at - killed_at) * 1000:.0f} ms after the kill; first write acknowledged "
              f"{(first_write + promoted_at - killed_at) * 1000:.0f} ms after the kill, "
              f"{first_write * 1000:.0f} ms after the promotion")
        assert replayed + retried + unknown > 0  # the kill caught work in flight
    finally:
        stop.set()
        proxy.stop()


def _run(conn: pymysql.Connection, statements: list[str], errors: list[BaseException]) -> None:
    try:
        with conn.cursor() as cursor:
            for statement in statements:
                cursor.execute(statement)
    except pymysql.Error as exc:
        errors.append(exc)


def test_a_transaction_whose_replay_differs_is_rolled_back_and_a_commit_in_flight_is_unknown(
    tmp_path: Path, cluster: tuple[MariaDBInstance, MariaDBInstance], monkeypatch: pytest.MonkeyPatch
) -> None:
    primary, replica = cluster
    monitor_secret(monkeypatch, primary)
    proxy = _proxy(tmp_path, primary, replica, max_connections=5)
    try:
        conn, same, committer, writer = connect_my(proxy), connect_my(proxy), connect_my(proxy), connect_my(proxy)
        changed = connect_my(proxy)  # read a row another client then changed: its replay differs
        with conn.cursor() as cursor, same.cursor() as steady, changed.cursor() as reader:
            _run(writer, ["INSERT INTO numbered (client, n) VALUES (300, 1)"], [])
            changed.begin()
            reader.execute("SELECT n FROM numbered WHERE client = 300")
            assert reader.fetchone() == (1,)
            primary.sql("UPDATE app.numbered SET n = 2 WHERE client = 300")  # acknowledged by the replica too
            conn.begin()
            cursor.execute("SELECT RAND()")  # the replay reads another number: it cannot stand for this one
            cursor.execute("INSERT INTO t (note) VALUES ('random')")
            same.begin()  # a transaction whose replay answers the same
            steady.execute("SELECT COUNT(*) FROM numbered")
            steady.execute("INSERT INTO numbered (client, n) VALUES (99, 1)")
            # A COMMIT and an autocommit INSERT wait for the replica's acknowledgement, which never comes: their
            # outcome is unknown when the primary dies (and here they are not on the replica).
            replica.sql("STOP SLAVE IO_THREAD")
            committer.begin()
            _run(committer, ["INSERT INTO numbered (client, n) VALUES (98, 1)"], [])
            unknown: list[BaseException] = []
            waiting = [threading.Thread(target=_run, args=(committer, ["COMMIT"], unknown)),
                       threading.Thread(target=_run, args=(writer, ["INSERT INTO numbered (client, n) VALUES (97, 1)"],
                                                                unknown))]
            for thread in waiting:
                thread.start()
            time.sleep(1.0)
            assert all(thread.is_alive() for thread in waiting)  # in flight
            kill_mariadb(primary)
            proxy.wait_for_log(r"endpoint rw: cluster main has no healthy writer", timeout=5.0)
            replica.promote()
            with pytest.raises(pymysql.err.OperationalError) as raised:
                cursor.execute("INSERT INTO t (note) VALUES ('after')")
            assert raised.value.args[0] == my.ER_LOCK_DEADLOCK
            assert getattr(raised.value, "sqlstate", "40001") == "40001"
            assert "rolled back by a failover" in raised.value.args[1]
            conn.rollback()  # what the client does after the error: it succeeds
            with pytest.raises(pymysql.err.OperationalError) as raised:  # never silently committed
                reader.execute("UPDATE numbered SET n = 3 WHERE client = 300")
            assert raised.value.args[0] == my.ER_LOCK_DEADLOCK
            changed.rollback()
            reader.execute("SELECT n FROM numbered WHERE client = 300")
            assert reader.fetchone() == (2,)
            steady.execute("INSERT INTO numbered (client, n) VALUES (99, 2)")
            same.commit()
            cursor.execute("SELECT COUNT(*) FROM t")
            assert cursor.fetchone() == (0,)  # nothing of the rolled back transaction was committed
            cursor.execute("SELECT @@port")
            assert cursor.fetchone() == (replica.port,)  # the same connection goes on, on the new writer
            for thread in waiting:
                thread.join(10)
            assert sorted((exc.args[0], getattr(exc, "sqlstate", "08007"), "outcome of the transaction is unknown"
                           in exc.args[1]) for exc in unknown) == [(1180, "08007", True)] * 2
            for client in (committer, writer):
                client.rollback()  # (nothing to roll back: it succeeds)
                with client.cursor() as other:
                    other.execute("SELECT @@port")
                    assert other.fetchone() == (replica.port,)
        assert replica.sql("SELECT n FROM app.numbered WHERE client = 99 ORDER BY n") == "1\n2"
        assert replica.sql("SELECT COUNT(*) FROM app.numbered WHERE client IN (97, 98)") == "0"
        proxy.wait_for_log(r"the replay of its transaction failed: it(s replies differ| answered with fewer bytes)")
        proxy.wait_for_log(r"replayed 3 command\(s\) on")
        for client in (conn, same, committer, writer, changed):
            client.close()
    finally:
        proxy.stop()


def _kill_when_running(server: MariaDBInstance, statement: str, killed: list[str]) -> None:
    """KILL CONNECTION the server thread that runs `statement` (as soon as it shows in the processlist)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        found = server.sql(f"SELECT ID FROM information_schema.PROCESSLIST WHERE INFO LIKE '{statement}'")
        if found:
            server.sql(f"KILL CONNECTION {found.split()[0]}")
            killed.append(found)
            return
        time.sleep(0.02)


def test_a_transaction_whose_connection_is_killed_mid_statement_is_replayed(
    mysql_proxy: ProxyProcess, mariadb_server: MariaDBInstance
) -> None:
    mariadb_server.sql("CREATE TABLE IF NOT EXISTS app.killed (a INT PRIMARY KEY); DELETE FROM app.killed;")
    conn = pymysql.connect(host="127.0.0.1", port=mysql_proxy.ports["mysql"], user="app", password="app-secret",
                           database="app", autocommit=True)
    statement = "SELECT SLEEP(1.5) AS s, 7 AS seven"
    killed: list[str] = []
    with conn.cursor() as cursor:
        conn.begin()
        cursor.execute("INSERT INTO killed VALUES (1)")
        killer = threading.Thread(target=_kill_when_running, args=(mariadb_server, statement, killed))
        killer.start()
        cursor.execute(statement)  # its server session is killed: replayed on another one
        killer.join()
        assert killed
        assert cursor.fetchone() == (0, 7)  # (the replay slept the whole time)
        cursor.execute("INSERT INTO killed VALUES (2)")
        conn.commit()
        # outside a transaction: a read is replayed, its first run's ERR never seen
        killer = threading.Thread(target=_kill_when_running, args=(mariadb_server, statement, killed))
        killer.start()
        cursor.execute(statement)
        killer.join()
        assert len(killed) == 2 and cursor.fetchone() == (0, 7)
    assert mariadb_server.sql("SELECT a FROM app.killed ORDER BY a") == "1\n2"
    mysql_proxy.wait_for_log(r"replaying its command \(1 command\(s\)\)")
    conn.close()


def test_a_transaction_of_prepared_statements_is_replayed_with_its_statements_prepared_again(
    mysql_proxy: ProxyProcess, mariadb_server: MariaDBInstance
) -> None:
    mariadb_server.sql("CREATE TABLE IF NOT EXISTS app.killed_prepared (a INT PRIMARY KEY); "
                       "DELETE FROM app.killed_prepared;")
    conn = mysql.connector.connect(host="127.0.0.1", port=mysql_proxy.ports["mysql"], user="app",
                                   password="app-secret", database="app", use_pure=True, autocommit=True)
    sleep = "SELECT SLEEP(?) AS s, ? AS v"
    insert = "INSERT INTO killed_prepared VALUES (?)"
    killed: list[str] = []
    try:
        reader = conn.cursor(prepared=True)
        writer = conn.cursor(prepared=True)
        reader.execute(sleep, (0, 1))  # prepared (and run) outside the transaction
        assert reader.fetchall() == [(0, 1)]
        writer.execute(insert, (10,))
        conn.start_transaction()
        writer.execute(insert, (11,))  # COM_STMT_EXECUTE only: the statement is the client's already
        killer = threading.Thread(target=_kill_when_running, args=(mariadb_server, "SELECT SLEEP(%", killed))
        killer.start()
        reader.execute(sleep, (1.5, 7))  # killed; replayed where both statements are prepared again
        assert reader.fetchall() == [(0, 7)]
        killer.join()
        assert killed
        writer.execute(insert, (12,))
        conn.commit()
    finally:
        conn.close()
    assert mariadb_server.sql("SELECT a FROM app.killed_prepared ORDER BY a") == "10\n11\n12"
