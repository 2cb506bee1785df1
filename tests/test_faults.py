"""Faults: kill -9 and restart each database under a 20-client transactional load; refused backend logins;
server termination errors passed once. These tests start their OWN servers, since they kill them."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import psycopg
import pymysql
import pytest

from devtools.servers import MariaDBInstance, PostgresInstance, start_mariadb, start_postgres
from support import ProxyProcess, running_proxy

CLIENTS = 20
LIMIT = 5
RECOVERY_BOUND = 20.0  # seconds from the server accepting logins again to every client served (shared 2-core box)


@pytest.fixture(scope="module")
def own_pg(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostgresInstance]:
    """A PostgreSQL only this module uses; bench's server password differs from the proxy's stored secret."""
    server = start_postgres(tmp_path_factory.mktemp("faultpg"), users={"app": "app-secret", "bench": "not-the-secret"},
                            settings={"max_connections": "60"})
    server.psql("CREATE TABLE items (owner int NOT NULL, n int NOT NULL, tx bigint NOT NULL DEFAULT txid_current())",
                user="app", db="app")
    # COMMIT of a row in slow_commit takes 3 s (a deferred trigger): time to end the session during a COMMIT
    server.psql("CREATE TABLE slow_commit (x int); CREATE FUNCTION sleep_3() RETURNS trigger LANGUAGE plpgsql AS "
                "$$ BEGIN PERFORM pg_sleep(3); RETURN NULL; END $$; CREATE CONSTRAINT TRIGGER slow AFTER INSERT ON "
                "slow_commit DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION sleep_3()",
                user="app", db="app")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def own_mariadb(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MariaDBInstance]:
    server = start_mariadb(tmp_path_factory.mktemp("faultmy"), users={"app": "app-secret", "bench": "not-the-secret"},
                           settings={"max_connections": "60"})
    server.sql("CREATE TABLE items (id bigint AUTO_INCREMENT PRIMARY KEY, owner int NOT NULL, n int NOT NULL, "
               "conn bigint NOT NULL, KEY (conn, id))", user="app", db="app")
    yield server
    server.stop()


def kill9(pid: int | None) -> None:
    """SIGKILL a server process and everything it started, and wait until they are gone."""
    assert pid, "the server is not running"
    root = psutil.Process(pid)
    victims = [root, *root.children(recursive=True)]
    for process in victims:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
    psutil.wait_procs(victims, timeout=15)


# --- the load ---


class Load:
    """CLIENTS threads, each running short transactions that insert its own row and read back what its
    transaction wrote; a sampler counts the server's connections of user app meanwhile."""

    def __init__(self, connect: Callable[[], Any], transaction: Callable[[Any, int, int], None],
                 count_backends: Callable[[], int]) -> None:
        self.connect = connect
        self.transaction = transaction
        self.count_backends = count_backends
        self.stop = threading.Event()
        self.served: list[list[float]] = [[] for _ in range(CLIENTS)]  # monotonic times of committed transactions
        self.wrong: list[str] = []  # any client that saw rows that were not its own
        self.errors: list[str] = []
        self.samples: list[int] = []
        self.threads = [threading.Thread(target=self._client, args=(me,), daemon=True) for me in range(CLIENTS)]
        self.threads.append(threading.Thread(target=self._sample, daemon=True))

    def __enter__(self) -> Load:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(60)

    def _client(self, me: int) -> None:
        conn = None
        n = 0
        while not self.stop.is_set():
            try:
                if conn is None:
                    conn = self.connect()
                n += 1
                self.transaction(conn, me, n)
                self.served[me].append(time.monotonic())
            except AssertionError as exc:
                self.wrong.append(f"client {me}: {exc}")
            except Exception as exc:  # the server went away: connect again
                self.errors.append(f"{type(exc).__name__}: {exc}")
                with contextlib.suppress(Exception):
                    if conn is not None:
                        conn.close()
                conn = None
                time.sleep(0.05)
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()

    def _sample(self) -> None:
        while not self.stop.is_set():
            try:
                self.samples.append(self.count_backends())
            except Exception:
                time.sleep(0.05)  # the server is down
            time.sleep(0.02)

    def wait_served(self, after: float, timeout: float) -> float:
        """Seconds until every client has committed a transaction that started after `after`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            firsts = [next((t for t in times if t > after), None) for times in self.served]
            if all(t is not None for t in firsts):
                return max(t for t in firsts if t is not None) - after
            time.sleep(0.05)
        missing = [me for me, times in enumerate(self.served) if not times or times[-1] <= after]
        raise AssertionError(f"clients {missing} not served within {timeout} s; errors: {self.errors[-5:]}")


def pg_transaction(conn: psycopg.Connection[Any], me: int, n: int) -> None:
    with conn.transaction():
        conn.execute("INSERT INTO items (owner, n) VALUES (%s, %s)", (me, n))
        rows = conn.execute("SELECT owner, n FROM items WHERE tx = txid_current()").fetchall()
    assert rows == [(me, n)], f"transaction {n} read {rows}"


def my_transaction(conn: Any, me: int, n: int) -> None:
    with conn.cursor() as cursor:
        cursor.execute("BEGIN")
        cursor.execute("INSERT INTO items (owner, n, conn) VALUES (%s, %s, CONNECTION_ID())", (me, n))
        # the newest row on this server session must be the one this transaction just wrote
        cursor.execute("SELECT owner, n FROM items WHERE conn = CONNECTION_ID() ORDER BY id DESC LIMIT 1")
        rows = cursor.fetchall()
        cursor.execute("COMMIT")
    assert [tuple(r) for r in rows] == [(me, n)], f"transaction {n} read {rows}"


def pg_count(pg: PostgresInstance) -> Callable[[], int]:
    holder: dict[str, psycopg.Connection[Any]] = {}

    def count() -> int:
        conn = holder.get("conn")
        if conn is None or conn.closed:
            conn = holder["conn"] = psycopg.connect(pg.dsn("postgres", pg.superuser_password), autocommit=True,
                                                    connect_timeout=2)
        try:
            row = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE usename = 'app' "
                               "AND backend_type = 'client backend'").fetchone()
        except Exception:
            conn.close()
            raise
        assert row is not None
        return int(row[0])

    return count


def my_count(mariadb: MariaDBInstance) -> Callable[[], int]:
    holder: dict[str, Any] = {}

    def count() -> int:
        conn = holder.get("conn")
        if conn is None:
            conn = holder["conn"] = pymysql.connect(host=mariadb.host, port=mariadb.port, user="root",
                                                    password=mariadb.root_password, connect_timeout=2,
                                                    autocommit=True)
        try:
            with conn.cursor() as cursor:
                cursor.execute("SELECT count(*) FROM information_schema.processlist WHERE user = 'app'")
                return int(cursor.fetchone()[0])
        except Exception:
            holder.pop("conn", None)
            raise

    return count


def pg_proxy_for(folder: Path, pg: PostgresInstance,
                 replay: bool = True) -> contextlib.AbstractContextManager[ProxyProcess]:
    pool: dict[str, Any] = {"max_connections": LIMIT, "connection_borrow_timeout": 30.0}
    if not replay:
        pool["replay_max_size"] = 0  # a lost backend ends its client's session, the server's error passed on
    return running_proxy(folder, pg, server={"client_login_timeout": 30.0}, postgresql={"backend_connect_timeout": 3.0},
                         postgresql__pool=pool)


def pg_client(proxy: ProxyProcess, user: str = "app", password: str = "app-secret", **extra: Any) -> Any:
    return psycopg.connect(host="127.0.0.1", port=proxy.ports["postgresql"], user=user, password=password,
                           dbname=user, connect_timeout=10, **extra)


def restart_pg(pg: PostgresInstance) -> float:
    kill9(pg.pid)
    time.sleep(1.0)
    pg.start()
    return time.monotonic()


# --- PostgreSQL ---


def test_pg_kill9_and_restart_under_load(tmp_path: Path, own_pg: PostgresInstance) -> None:
    with pg_proxy_for(tmp_path, own_pg) as proxy, Load(lambda: pg_client(proxy), pg_transaction,
                                                      pg_count(own_pg)) as load:
        load.wait_served(time.monotonic(), 30)
        ready = restart_pg(own_pg)
        recovery = load.wait_served(ready, RECOVERY_BOUND)
        time.sleep(2)
        load.__exit__()
        assert not load.wrong, load.wrong[:5]
        assert len(load.samples) > 50
        assert max(load.samples) <= LIMIT, f"{max(load.samples)} backend connections for a limit of {LIMIT}"
        assert recovery < RECOVERY_BOUND
        assert "Traceback" not in proxy.log()
        print(f"PostgreSQL kill -9: every client served {recovery:.2f} s after the server was back; "
              f"peak {max(load.samples)} backend connections; {len(load.errors)} client errors: "
              f"{sorted(set(load.errors))[:8]}")


def test_pg_refused_backend_logins_do_not_inflate_the_count(tmp_path: Path, own_pg: PostgresInstance) -> None:
    with pg_proxy_for(tmp_path, own_pg) as proxy:
        for _ in range(12):  # the proxy's secret for bench is not the server's password
            with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
                pg_client(proxy, "bench", "bench-secret").execute("SELECT 1")
        with Load(lambda: pg_client(proxy), pg_transaction, pg_count(own_pg)) as load:
            load.wait_served(time.monotonic(), 30)
            time.sleep(3)
        assert not load.wrong
        assert max(load.samples) <= LIMIT, f"{max(load.samples)} backend connections for a limit of {LIMIT}"


def test_pg_waiting_and_new_clients_are_served_after_a_restart(tmp_path: Path, own_pg: PostgresInstance) -> None:
    with pg_proxy_for(tmp_path, own_pg) as proxy:
        idle = pg_client(proxy, autocommit=True)
        waiting = pg_client(proxy, autocommit=True)
        assert idle.execute("SELECT 1").fetchone() == (1,)
        assert waiting.execute("SELECT 1").fetchone() == (1,)
        kill9(own_pg.pid)
        results: dict[str, Any] = {}

        def ask(name: str, connect: Callable[[], Any]) -> None:
            try:
                conn = connect()
                results[name] = conn.execute("SELECT 42").fetchone()
            except Exception as exc:
                results[name] = exc

        threads = [threading.Thread(target=ask, args=("waiting", lambda: waiting)),
                   threading.Thread(target=ask, args=("new", lambda: pg_client(proxy, autocommit=True)))]
        for thread in threads:
            thread.start()
        time.sleep(2.0)  # both wait (the pool retries the connect with backoff) while the server is down
        early = dict(results)
        own_pg.start()
        assert not early, early
        for thread in threads:
            thread.join(30)
        assert results == {"waiting": (42,), "new": (42,)}
        assert idle.execute("SELECT 1").fetchone() == (1,)  # an idle client was not disturbed
        for conn in (idle, waiting):
            conn.close()


def test_pg_terminated_backend_error_reaches_the_client_once(tmp_path: Path, own_pg: PostgresInstance) -> None:
    """Replay off: pg_terminate_backend during a COMMIT: psycopg gets the server's 57P01 once, not "received 2
    results"."""
    with pg_proxy_for(tmp_path, own_pg, replay=False) as proxy:
        conn = pg_client(proxy)
        conn.execute("INSERT INTO slow_commit VALUES (1)")
        threading.Timer(1.0, own_pg.psql, args=("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                                                "WHERE usename = 'app' AND query = 'COMMIT'",)).start()
        with pytest.raises(psycopg.errors.AdminShutdown):
            conn.commit()
        conn.close()
        busy = pg_client(proxy)
        threading.Timer(1.0, own_pg.psql, args=("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                                                "WHERE query = 'SELECT pg_sleep(20)'",)).start()
        with pytest.raises(psycopg.errors.AdminShutdown):
            busy.execute("SELECT pg_sleep(20)")
        busy.close()
        after = pg_client(proxy, autocommit=True)
        assert after.execute("SELECT 1").fetchone() == (1,)
        after.close()
        proxy.wait_for_log("the database ended backend")


def test_pg_terminated_commit_is_unknown_and_the_client_stays(tmp_path: Path, own_pg: PostgresInstance) -> None:
    """Replay on (the default): pg_terminate_backend during a COMMIT gives 08007 once; the connection stays."""
    with pg_proxy_for(tmp_path, own_pg) as proxy:
        conn = pg_client(proxy)
        conn.execute("INSERT INTO slow_commit VALUES (3)")
        threading.Timer(1.0, own_pg.psql, args=("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                                                "WHERE usename = 'app' AND query = 'COMMIT'",)).start()
        with pytest.raises(psycopg.errors.TransactionResolutionUnknown):
            conn.commit()
        assert conn.execute("SELECT 1").fetchone() == (1,)
        conn.close()


def test_pg_fast_shutdown_error_reaches_the_client_once(tmp_path: Path, own_pg: PostgresInstance) -> None:
    with pg_proxy_for(tmp_path, own_pg, replay=False) as proxy:
        conn = pg_client(proxy)
        conn.execute("INSERT INTO slow_commit VALUES (2)")
        stopper = threading.Timer(1.0, own_pg.stop)
        stopper.start()
        try:
            with pytest.raises(psycopg.errors.AdminShutdown):
                conn.commit()
        finally:
            stopper.join()
            own_pg.start()
        conn.close()


# --- MariaDB ---


def my_proxy_for(folder: Path, mariadb: MariaDBInstance) -> contextlib.AbstractContextManager[ProxyProcess]:
    return running_proxy(folder, mariadb=mariadb, server={"client_login_timeout": 30.0},
                         mysql={"backend_connect_timeout": 3.0},
                         mysql__pool={"max_connections": LIMIT, "connection_borrow_timeout": 30.0})


def my_client(proxy: ProxyProcess, user: str = "app", password: str = "app-secret") -> Any:
    return pymysql.connect(host="127.0.0.1", port=proxy.ports["mysql"], user=user, password=password,
                           database=user, connect_timeout=10, read_timeout=60, autocommit=True)


def test_mariadb_refused_backend_logins_do_not_inflate_the_count(tmp_path: Path,
                                                                 own_mariadb: MariaDBInstance) -> None:
    with my_proxy_for(tmp_path, own_mariadb) as proxy:
        for _ in range(12):  # the proxy's secret for bench is not the server's password
            with pytest.raises(pymysql.err.OperationalError) as refused:
                my_client(proxy, "bench", "bench-secret")
            assert refused.value.args[0] == 1045
        with Load(lambda: my_client(proxy), my_transaction, my_count(own_mariadb)) as load:
            load.wait_served(time.monotonic(), 30)
            time.sleep(3)
        assert not load.wrong
        assert max(load.samples) <= LIMIT, f"{max(load.samples)} backend connections for a limit of {LIMIT}"


def test_mariadb_kill9_and_restart_under_load(tmp_path: Path, own_mariadb: MariaDBInstance) -> None:
    with my_proxy_for(tmp_path, own_mariadb) as proxy, \
            Load(lambda: my_client(proxy), my_transaction, my_count(own_mariadb)) as load:
        load.wait_served(time.monotonic(), 30)
        kill9(own_mariadb.pid)
        time.sleep(1.0)
        own_mariadb.start()
        ready = time.monotonic()
        recovery = load.wait_served(ready, RECOVERY_BOUND)
        time.sleep(2)
        load.__exit__()
        assert not load.wrong, load.wrong[:5]
        assert len(load.samples) > 50
        assert max(load.samples) <= LIMIT, f"{max(load.samples)} backend connections for a limit of {LIMIT}"
        assert recovery < RECOVERY_BOUND
        assert "Traceback" not in proxy.log()
        print(f"MariaDB kill -9: every client served {recovery:.2f} s after the server was back; "
              f"peak {max(load.samples)} backend connections; {len(load.errors)} client errors: "
              f"{sorted(set(load.errors))[:8]}")
