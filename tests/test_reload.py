"""Live reload (SIGHUP, `dbproxy reload`): bad files refused, endpoints added and removed, secrets re-read, pools
resized, and an endpoint moved to another server under load."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import pymysql
import pytest

from devtools.servers import MariaDBInstance, PostgresInstance, free_port, start_mariadb, start_postgres
from proxy.pool.pool import Target
from support import SECRETS, ProxyProcess, backend_connections, write_config

SOURCE = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pg_second(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostgresInstance]:
    server = start_postgres(tmp_path_factory.mktemp("pg2"), users=SECRETS, auth="scram-sha-256")
    yield server
    server.stop()


class ClusterProxy:
    """A proxy run from a cluster config that the test edits and reloads."""

    def __init__(self, folder: Path, engine: str, instances: list[int], workers: int = 1,
                 pool: dict[str, Any] | None = None) -> None:
        self.folder = folder
        self.engine = engine
        self.server: dict[str, Any] = {"log_level": "info", "workers": workers}
        self.pool = {"max_connections": 4, "connection_borrow_timeout": 20.0, **(pool or {})}
        self.instances = [{"name": f"i{n + 1}", "host": "127.0.0.1", "port": port}
                          for n, port in enumerate(instances)]
        self.endpoints: dict[str, dict[str, Any]] = {}
        self.proxy: ProxyProcess | None = None

    def write(self) -> Path:
        sections: dict[str, dict[str, Any]] = {
            "server": self.server, "secrets": {"file": "secrets.toml"},
            **({"postgresql": {"enabled": False}} if self.engine == "mysql" else {}),
            f"{self.engine}.pool": self.pool,
            f"{self.engine}.clusters.main": {"instances": self.instances},
        }
        for name, endpoint in self.endpoints.items():
            sections[f"{self.engine}.endpoints.{name}"] = endpoint
        return write_config(self.folder, sections)

    def start(self) -> ProxyProcess:
        self.proxy = ProxyProcess(self.write(), self.folder / "proxy.log")
        self.proxy.start()
        return self.proxy

    def reload(self, done: str = r"reload: serving", expect: int | None = None, command: bool = False) -> None:
        """Write the config, SIGHUP the proxy (or run `dbproxy reload`), wait until every worker logged `done`
        once more."""
        assert self.proxy is not None
        before = self.count(done)
        config = self.write()
        if command:
            result = subprocess.run([sys.executable, "-m", "proxy", "reload", "-c", str(config)],
                                    capture_output=True, text=True, cwd=SOURCE, timeout=60)
            assert (result.returncode, result.stderr) == (0, "")
            assert result.stdout.startswith(f"dbproxy: reload sent to pid {self.proxy.pid} ")
        else:
            os.kill(self.proxy.pid, signal.SIGHUP)
        wanted = before + (expect if expect is not None else self.server["workers"])
        deadline = time.monotonic() + 15
        while self.count(done) < wanted:
            assert time.monotonic() < deadline, f"no {done!r} after the reload:\n{self.proxy.log()[-3000:]}"
            time.sleep(0.05)

    def count(self, pattern: str) -> int:
        assert self.proxy is not None
        return len(re.findall(pattern, self.proxy.log()))

    def stop(self) -> None:
        if self.proxy is not None:
            self.proxy.stop()


@pytest.fixture
def cluster_proxy(tmp_path: Path) -> Iterator[list[ClusterProxy]]:
    made: list[ClusterProxy] = []
    yield made
    for proxy in made:
        proxy.stop()


def make(made: list[ClusterProxy], *args: Any, **kwargs: Any) -> ClusterProxy:
    proxy = ClusterProxy(*args, **kwargs)
    made.append(proxy)
    return proxy


def server_port(port: int, user: str = "app") -> int:
    with psycopg.connect(host="127.0.0.1", port=port, user=user, password=f"{user}-secret", dbname=user,
                         sslmode="disable", connect_timeout=5) as conn:
        row = conn.execute("SELECT inet_server_port()").fetchone()
        assert row is not None
        return int(row[0])


# --- a bad file changes nothing ---


@pytest.mark.parametrize("workers", [1, 2])
def test_a_reload_with_a_bad_config_is_refused_once_and_changes_nothing(
        tmp_path: Path, cluster_proxy: list[ClusterProxy], pg_server: PostgresInstance,
        pg_second: PostgresInstance, workers: int) -> None:
    setup = make(cluster_proxy, tmp_path, "postgresql", [pg_server.port, pg_second.port], workers=workers)
    setup.endpoints = {"rw": {"port": free_port(), "cluster": "main"},
                       "ro": {"port": free_port(), "cluster": "main", "role": "read_only"}}
    proxy = setup.start()
    setup.endpoints["rw"] = {**setup.endpoints["rw"], "cluster": "mian"}
    setup.pool["max_connections"] = 1
    config = setup.write()
    # `dbproxy reload` checks the file first: one line, nothing sent.
    result = subprocess.run([sys.executable, "-m", "proxy", "reload", "-c", str(config)], capture_output=True,
                            text=True, cwd=SOURCE, timeout=60)
    assert result.returncode == 2
    reason = f"{config}: 'postgresql.endpoints.rw.cluster': no cluster 'mian' in [postgresql.clusters] (known: main)"
    assert result.stderr.strip() == f"dbproxy: configuration error: {reason}; nothing sent"
    assert "reload:" not in proxy.log()
    # A SIGHUP anyway: refused with the reason, logged once (by the supervisor when there are workers).
    setup.reload(done=r"reload refused", expect=1)
    time.sleep(0.5)
    assert setup.count(re.escape(f"reload refused, the running configuration stays: {reason}")) == 1
    assert setup.count(r"reload refused") == 1
    assert server_port(proxy.ports["rw"]) == pg_server.port
    assert server_port(proxy.ports["ro"]) == pg_second.port
    assert proxy.alive


@pytest.mark.parametrize("workers", [1, 2])
def test_a_reload_onto_a_port_another_program_holds_is_refused_whole(
        tmp_path: Path, cluster_proxy: list[ClusterProxy], pg_server: PostgresInstance,
        pg_second: PostgresInstance, workers: int) -> None:
    setup = make(cluster_proxy, tmp_path, "postgresql", [pg_server.port, pg_second.port], workers=workers)
    setup.endpoints = {"rw": {"port": free_port(), "cluster": "main"},
                       "ro": {"port": free_port(), "cluster": "main", "role": "read_only"}}
    proxy = setup.start()
    with socket.create_server(("127.0.0.1", 0)) as holder:
        taken = holder.getsockname()[1]
        del setup.endpoints["ro"]
        setup.endpoints["extra"] = {"port": taken, "cluster": "main"}
        setup.reload(done=r"reload refused", expect=1)
    time.sleep(0.5)
    assert setup.count(rf"reload refused, .*endpoint extra: cannot listen on port {taken}: Address already in "
                       "use") == 1
    assert server_port(proxy.ports["ro"]) == pg_second.port  # the endpoint the file removed still serves
    assert server_port(proxy.ports["rw"]) == pg_server.port


# --- endpoints added and removed ---


@pytest.mark.parametrize("workers", [1, 2])
def test_a_reload_adds_and_removes_endpoints(tmp_path: Path, cluster_proxy: list[ClusterProxy],
                                             pg_server: PostgresInstance, pg_second: PostgresInstance,
                                             workers: int) -> None:
    setup = make(cluster_proxy, tmp_path, "postgresql", [pg_server.port, pg_second.port], workers=workers)
    setup.endpoints = {"rw": {"port": free_port(), "cluster": "main"},
                       "ro": {"port": 0, "cluster": "main", "role": "read_only"}}
    proxy = setup.start()
    ro_port = proxy.ports["ro"]
    staying = psycopg.connect(host="127.0.0.1", port=ro_port, user="app", password="app-secret", dbname="app",
                              sslmode="disable", autocommit=True)
    try:
        # The same file again: the endpoint given port 0 keeps the port it has.
        setup.reload(command=True)
        assert server_port(ro_port) == pg_second.port
        extra = free_port()
        del setup.endpoints["ro"]
        setup.endpoints["reports"] = {"port": extra, "cluster": "main", "role": "custom", "members": ["i2"]}
        setup.reload()
        assert server_port(extra) == pg_second.port
        assert server_port(proxy.ports["rw"]) == pg_server.port
        with pytest.raises(psycopg.OperationalError):
            server_port(ro_port)
        # A client of the removed endpoint finishes what it does; its backend pool closes when it leaves.
        assert staying.execute("SELECT inet_server_port()").fetchone() == (pg_second.port,)
    finally:
        staying.close()
    deadline = time.monotonic() + 10
    while setup.count(r"endpoint ro: its last client left") < 1:
        assert time.monotonic() < deadline, proxy.log()[-3000:]
        time.sleep(0.1)


def test_a_reload_re_reads_the_secrets_file(tmp_path: Path, cluster_proxy: list[ClusterProxy],
                                           pg_server: PostgresInstance) -> None:
    setup = make(cluster_proxy, tmp_path, "postgresql", [pg_server.port])
    setup.endpoints = {"rw": {"port": free_port(), "cluster": "main"}}
    setup.write()
    secrets = tmp_path / "secrets.toml"
    secrets.write_text('[users]\napp = "app-secret"\n')
    proxy = ProxyProcess(tmp_path / "proxy.toml", tmp_path / "proxy.log")
    setup.proxy = proxy
    proxy.start()
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        server_port(proxy.ports["rw"], "bench")
    setup.reload()  # writes secrets.toml again, with every user of SECRETS (bench too)
    assert server_port(proxy.ports["rw"], "bench") == pg_server.port


# --- pool sizes follow a reload under load ---


class Load:
    """Clients running short transactions through the proxy in a thread until stopped; errors are kept."""

    def __init__(self, port: int, clients: int) -> None:
        self.port = port
        self.clients = clients
        self.errors: list[BaseException] = []
        self.transactions = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    def __enter__(self) -> Load:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(60)

    async def _run(self) -> None:
        async def client() -> None:
            try:
                conn = await asyncpg.connect(host="127.0.0.1", port=self.port, user="bench",
                                             password="bench-secret", database="bench", ssl=False)
                try:
                    while not self._stop.is_set():
                        await conn.fetchval("SELECT $1::int FROM pg_sleep(0.02)", 1)
                        self.transactions += 1
                finally:
                    await conn.close()
            except Exception as exc:
                self.errors.append(exc)

        await asyncio.gather(*(client() for _ in range(self.clients)))


def wait_for_connections(server: PostgresInstance, check: Any, what: str, timeout: float = 10.0) -> int:
    deadline = time.monotonic() + timeout
    while True:
        count = backend_connections(server, "bench")
        if check(count):
            return count
        assert time.monotonic() < deadline, f"{what}: {count} backend connections"
        time.sleep(0.1)


def test_pool_size_follows_a_reload_under_load(tmp_path: Path, cluster_proxy: list[ClusterProxy],
                                               pg_server: PostgresInstance) -> None:
    setup = make(cluster_proxy, tmp_path, "postgresql", [pg_server.port], pool={"max_connections": 3})
    setup.endpoints = {"rw": {"port": free_port(), "cluster": "main"}}
    proxy = setup.start()
    with Load(proxy.ports["rw"], 16) as load:
        wait_for_connections(pg_server, lambda n: n == 3, "before the reload")
        setup.pool["max_connections"] = 8
        setup.reload()
        wait_for_connections(pg_server, lambda n: n == 8, "after raising to 8")
        for _ in range(10):
            assert backend_connections(pg_server, "bench") <= 8
            time.sleep(0.05)
        if hasattr(Target, "apply_settings"):
            setup.pool["max_connections"] = 2
            setup.reload()
            wait_for_connections(pg_server, lambda n: n <= 2, "after lowering to 2")
            for _ in range(10):
                assert backend_connections(pg_server, "bench") <= 2
                time.sleep(0.05)
        served = load.transactions
        time.sleep(0.3)
        assert load.transactions > served  # still running
    assert load.errors == []
    if not hasattr(Target, "apply_settings"):
        pytest.skip("lowering under load needs Target.apply_settings (lent-out connections closed on release)")


def test_pool_size_lowered_by_reload_closes_idle_connections(tmp_path: Path, cluster_proxy: list[ClusterProxy],
                                                             pg_server: PostgresInstance) -> None:
    setup = make(cluster_proxy, tmp_path, "postgresql", [pg_server.port],
                 pool={"max_connections": 6, "max_idle_connections": 6})
    setup.endpoints = {"rw": {"port": free_port(), "cluster": "main"}}
    proxy = setup.start()
    with Load(proxy.ports["rw"], 12) as load:
        wait_for_connections(pg_server, lambda n: n == 6, "under load")
    assert load.errors == []
    assert backend_connections(pg_server, "bench") == 6  # idle now, kept
    setup.pool.update(max_connections=2, max_idle_connections=2)
    setup.reload()
    wait_for_connections(pg_server, lambda n: n <= 2, "after lowering to 2", timeout=5)


# --- an endpoint moved to another server under load (needs Target.repoint) ---

needs_repoint = pytest.mark.skipif(not hasattr(Target, "repoint"),
                                   reason="re-pointing a live endpoint needs Target.repoint (proxy/pool/pool.py)")


@pytest.fixture(scope="module")
def pg_pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[PostgresInstance, PostgresInstance]]:
    """Two servers holding the same pgbench data (scale 1, database bench)."""
    servers = [start_postgres(tmp_path_factory.mktemp(f"pgpair{n}"), users=SECRETS, auth="scram-sha-256")
               for n in range(2)]
    env = dict(os.environ, PGPASSWORD="bench-secret")
    for server in servers:
        subprocess.run(["pgbench", "-i", "-q", "-s", "1", "-h", server.host, "-p", str(server.port), "-U", "bench",
                        "bench"], env=env, check=True, capture_output=True)
        server.psql("CREATE TABLE moves (client int, at timestamptz DEFAULT clock_timestamp())", user="bench",
                    db="bench")
    yield servers[0], servers[1]
    for server in servers:
        server.stop()


def last_and_first(server: PostgresInstance) -> tuple[float, float]:
    """Server times (epoch seconds) of the first and last pgbench/asyncpg transaction it committed."""
    out = server.psql("SELECT coalesce(extract(epoch FROM min(at)), 0), coalesce(extract(epoch FROM max(at)), 0) "
                      "FROM (SELECT mtime AS at FROM pgbench_history UNION ALL SELECT at FROM moves) t",
                      user="bench", db="bench")
    first, last = out.split("|")
    return float(first), float(last)


@needs_repoint
def test_an_endpoint_moved_by_reload_under_load_drops_nobody(tmp_path: Path, cluster_proxy: list[ClusterProxy],
                                                             pg_pair: tuple[PostgresInstance, PostgresInstance]
                                                             ) -> None:
    old, new = pg_pair
    for server in pg_pair:
        server.psql("TRUNCATE pgbench_history, moves", user="bench", db="bench")
    setup = make(cluster_proxy, tmp_path, "postgresql", [old.port, new.port], pool={"max_connections": 6})
    setup.instances[0]["role"] = "writer"
    setup.endpoints = {"rw": {"port": free_port(), "cluster": "main", "role": "read_write"}}
    proxy = setup.start()
    port = proxy.ports["rw"]
    env = dict(os.environ, PGPASSWORD="bench-secret")
    benches = [subprocess.Popen(["pgbench", "-n", "-h", "127.0.0.1", "-p", str(port), "-U", "bench", "-M", mode,
                                 "-c", "3", "-T", "6", "bench"], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
               for mode in ("prepared", "extended")]
    errors: list[BaseException] = []
    stop = threading.Event()

    async def prepared_client(number: int) -> None:
        try:
            conn = await asyncpg.connect(host="127.0.0.1", port=port, user="bench", password="bench-secret",
                                         database="bench", ssl=False)  # default statement cache
            try:
                while not stop.is_set():
                    await conn.execute("INSERT INTO moves (client) VALUES ($1)", number)
                    await conn.fetchval("SELECT abalance FROM pgbench_accounts WHERE aid = $1", number + 1)
            finally:
                await conn.close()
        except Exception as exc:
            errors.append(exc)

    async def prepared_clients() -> None:
        await asyncio.gather(*(prepared_client(n) for n in range(4)))

    clients = threading.Thread(target=lambda: asyncio.run(prepared_clients()), daemon=True)
    clients.start()
    time.sleep(2.5)
    setup.instances[0]["role"] = None
    setup.instances[0] = {k: v for k, v in setup.instances[0].items() if v is not None}
    setup.instances[1]["role"] = "writer"
    moved_at = time.time()
    setup.reload()
    for bench in benches:
        out, err = bench.communicate(timeout=60)
        assert bench.returncode == 0, out[-2000:] + err[-2000:]
        assert "number of failed transactions: 0" in out or "failed" not in out, out
        assert re.search(r"number of clients: 3", out), out
    stop.set()
    clients.join(30)
    assert errors == []
    first_new, _ = last_and_first(new)
    _, last_old = last_and_first(old)
    assert moved_at < first_new < moved_at + 1.0, (moved_at, first_new)
    assert last_old < moved_at + 1.0, (moved_at, last_old)  # what was in flight at the reload, nothing after


@pytest.fixture(scope="module")
def mariadb_pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[MariaDBInstance, MariaDBInstance]]:
    """Two MariaDB servers holding the same sysbench tables (database bench)."""
    servers = [start_mariadb(tmp_path_factory.mktemp(f"mariadbpair{n}"), users=SECRETS) for n in range(2)]
    for server in servers:
        subprocess.run(["sysbench", "oltp_read_write", "--db-driver=mysql", "--mysql-host=127.0.0.1",
                        f"--mysql-port={server.port}", "--mysql-user=bench", "--mysql-password=bench-secret",
                        "--mysql-db=bench", "--tables=2", "--table-size=10000", "--mysql-ssl=off", "prepare"],
                       capture_output=True, timeout=120, check=True)
    yield servers[0], servers[1]
    for server in servers:
        server.stop()


def commits(server: MariaDBInstance) -> int:
    return int(server.sql("SELECT VARIABLE_VALUE FROM information_schema.GLOBAL_STATUS "
                          "WHERE VARIABLE_NAME = 'COM_COMMIT'"))


@needs_repoint
@pytest.mark.parametrize("ps_mode", ["disable", "auto"])
def test_a_mysql_endpoint_moved_by_reload_under_sysbench_drops_nobody(
        tmp_path: Path, cluster_proxy: list[ClusterProxy], mariadb_pair: tuple[MariaDBInstance, MariaDBInstance],
        ps_mode: str) -> None:
    old, new = mariadb_pair
    setup = make(cluster_proxy, tmp_path, "mysql", [old.port, new.port], pool={"max_connections": 6})
    setup.instances[0]["role"] = "writer"
    setup.endpoints = {"rw": {"port": free_port(), "cluster": "main", "role": "read_write"}}
    proxy = setup.start()
    bench = subprocess.Popen(["sysbench", "oltp_read_write", "--db-driver=mysql", "--mysql-host=127.0.0.1",
                              f"--mysql-port={proxy.ports['rw']}", "--mysql-user=bench",
                              "--mysql-password=bench-secret", "--mysql-db=bench", "--tables=2", "--table-size=10000",
                              f"--db-ps-mode={ps_mode}", "--mysql-ssl=off", "--threads=4", "--time=6", "run"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(2.5)
    new_before = commits(new)
    setup.instances[0] = {k: v for k, v in setup.instances[0].items() if k != "role"}
    setup.instances[1]["role"] = "writer"
    setup.reload()
    time.sleep(1.0)
    assert commits(new) > new_before  # new transactions on the new server within a second
    old_after = commits(old)
    out, err = bench.communicate(timeout=60)
    assert bench.returncode == 0, out[-2000:] + err[-2000:]
    # sysbench exits non-zero on any error but the deadlocks its workload retries (1213, 1020, 1205), which the
    # server gives through the proxy as it does directly; no connection is lost.
    assert re.search(r"reconnects:\s+0 ", out), out
    assert commits(old) == old_after  # nothing on the old server after that
    conn = pymysql.connect(host="127.0.0.1", port=proxy.ports["rw"], user="app", password="app-secret",
                           database="app")
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT @@port")
            assert cur.fetchone() == (new.port,)
    finally:
        conn.close()


def test_dbproxy_reload_never_signals_another_program_through_a_stale_pid_file(tmp_path: Path) -> None:
    config = write_config(tmp_path, {"server": {"pid_file": "proxy.pid"}, "secrets": {"file": "secrets.toml"},
                                     "postgresql": {"port": free_port()}})
    bystander = subprocess.Popen(["sleep", "30"])
    try:
        (tmp_path / "proxy.pid").write_text(f"{bystander.pid}\n")
        result = subprocess.run([sys.executable, "-m", "proxy", "reload", "-c", str(config)], capture_output=True,
                                text=True, cwd=SOURCE, timeout=60)
        assert result.returncode == 1
        assert result.stderr.strip() == (f"dbproxy: no running dbproxy found through {tmp_path / 'proxy.pid'}: "
                                         f"process {bystander.pid} is not dbproxy (a stale pid file)")
        assert bystander.poll() is None
    finally:
        bystander.kill()
        bystander.wait()
