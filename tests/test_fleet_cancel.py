"""Three proxies behind a round-robin TCP balancer: psql's Ctrl-C, an asyncpg timeout and a KILL QUERY from another
connection reach the client's query whichever proxy receives them; a forward that is not signed with the fleet's
key, or is replayed, is refused; a cancel or KILL naming a proxy the fleet does not have is dropped with a log line."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Iterator

import asyncpg
import pymysql
import pytest

from devtools.servers import MariaDBInstance, PostgresInstance, free_port
from proxy.fleet.wire import encode, sign
from proxy.protocol.pg.messages import cancel_request
from proxy.session import mysql_ids, pg_ids
from support import ProxyProcess, metric_value, running_proxy, scrape

FLEET_KEY = b"fleet-key-3c5e0a9d41b7f2e8"
PROXIES = 3


class RoundRobin:
    """A TCP balancer for the test: each new connection goes to the next proxy in turn (asyncio, in a thread)."""

    def __init__(self, targets: list[int]) -> None:
        self.targets = targets
        self.chosen: list[int] = []  # which proxy (index) each connection went to, in order
        self.port = 0
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.server: asyncio.Server | None = None

    def __enter__(self) -> RoundRobin:
        self.thread.start()
        self.server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._serve, "127.0.0.1", 0), self.loop).result(5)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    def __exit__(self, *_: object) -> None:
        asyncio.run_coroutine_threadsafe(self._close(), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()

    async def _close(self) -> None:
        assert self.server is not None
        self.server.close()
        tasks = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        index = len(self.chosen) % len(self.targets)
        self.chosen.append(index)
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", self.targets[index])
        except OSError:
            writer.close()
            return
        await asyncio.gather(self._pipe(reader, upstream_writer), self._pipe(upstream_reader, writer))

    @staticmethod
    async def _pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        try:
            while data := await source.read(65536):
                sink.write(data)
                await sink.drain()
            if sink.can_write_eof():
                sink.write_eof()
            await asyncio.sleep(0.5)  # let the other direction finish, then close
        except (ConnectionError, OSError):
            pass
        finally:
            sink.close()


class Fleet:
    """The three proxies, the balancers in front of them (one per engine) and the owner of each connection."""

    def __init__(self, proxies: list[ProxyProcess], pg: RoundRobin, mysql: RoundRobin, fleet_ports: list[int]) -> None:
        self.proxies = proxies
        self.pg = pg
        self.mysql = mysql
        self.fleet_ports = fleet_ports

    def count(self, pattern: str) -> list[int]:
        """How many log lines match `pattern`, per proxy."""
        regex = re.compile(pattern)
        return [sum(1 for line in proxy.log().splitlines() if regex.search(line)) for proxy in self.proxies]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, pg_server: PostgresInstance,
          mariadb_server: MariaDBInstance) -> Iterator[Fleet]:
    folder = tmp_path_factory.mktemp("fleet")
    key_file = folder / "fleet.key"
    key_file.write_bytes(FLEET_KEY + b"\n")
    fleet_ports = [free_port() for _ in range(PROXIES)]
    peers = [f"127.0.0.1:{port}" for port in fleet_ports]
    by_name = [f"localhost:{port}" for port in fleet_ports]  # the first proxy resolves names, as of a Service
    with contextlib.ExitStack() as stack:
        proxies = [stack.enter_context(running_proxy(
            folder / f"proxy{number}", pg_server, mariadb_server,
            server={"workers": 2 if number == 2 else 1,  # the last one also passes cancels between its workers
                    "metrics_port": 0},
            fleet={"proxy_id": number + 1, "port": fleet_ports[number], "peers": by_name if number == 0 else peers,
                   "key_file": str(key_file), "discovery_interval": 5.0}))
            for number in range(PROXIES)]
        for proxy, port in zip(proxies, fleet_ports, strict=True):
            assert proxy.ports["fleet"] == port
        pg = stack.enter_context(RoundRobin([proxy.ports["postgresql"] for proxy in proxies]))
        mysql = stack.enter_context(RoundRobin([proxy.ports["mysql"] for proxy in proxies]))
        yield Fleet(proxies, pg, mysql, fleet_ports)


def _running(pg: PostgresInstance, text: str) -> int:
    return int(pg.psql(f"SELECT count(*) FROM pg_stat_activity WHERE state = 'active' AND query = '{text}'").strip())


def _wait_running(pg: PostgresInstance, text: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while _running(pg, text) == 0:
        assert time.monotonic() < deadline, f"{text} does not run"
        time.sleep(0.05)


def test_psql_ctrl_c_reaches_the_query_whichever_proxy_gets_the_cancel(fleet: Fleet, pg_server: PostgresInstance
                                                                        ) -> None:
    env = dict(os.environ, PGPASSWORD="app-secret", PGSSLMODE="disable", PGCONNECT_TIMEOUT="10")
    owners = set()
    for _ in range(PROXIES):  # the session lands on each proxy in turn; its cancel on the next one
        forwarded = fleet.count(r"fleet: cancel request for client \d+ passed to proxy")
        first = len(fleet.pg.chosen)
        psql = subprocess.Popen(["psql", "-h", "127.0.0.1", "-p", str(fleet.pg.port), "-U", "app", "-d", "app",
                                 "-X", "-c", "select pg_sleep(30)"], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        try:
            _wait_running(pg_server, "select pg_sleep(30)")
            started = time.monotonic()
            psql.send_signal(signal.SIGINT)  # Ctrl-C: psql sends a CancelRequest on a new connection
            output, _ = psql.communicate(timeout=10)
        finally:
            psql.kill()
            psql.wait()
        assert time.monotonic() - started < 5
        assert "canceling statement due to user request" in output, output
        owner, receiver = fleet.pg.chosen[first], fleet.pg.chosen[first + 1]
        assert owner != receiver
        owners.add(owner)
        after = fleet.count(r"fleet: cancel request for client \d+ passed to proxy")
        assert after[receiver] == forwarded[receiver] + 1, (after, forwarded)
    assert owners == set(range(PROXIES))
    assert _running(pg_server, "select pg_sleep(30)") == 0


def test_asyncpg_timeouts_cancel_the_query_through_another_proxy(fleet: Fleet, pg_server: PostgresInstance) -> None:
    async def run() -> None:
        for _ in range(PROXIES):
            forwarded = fleet.count(r"fleet: cancel request for client \d+ passed to proxy")
            first = len(fleet.pg.chosen)
            conn = await asyncpg.connect(host="127.0.0.1", port=fleet.pg.port, user="app", password="app-secret",
                                         database="app", ssl=False)
            try:
                started = time.monotonic()
                with pytest.raises(TimeoutError):
                    await conn.fetchval("select pg_sleep(31)", timeout=0.5)
                assert await conn.fetchval("select 41 + 1") == 42  # the connection is free again: cancelled
                assert time.monotonic() - started < 5
                receiver = fleet.pg.chosen[first + 1]
                assert fleet.pg.chosen[first] != receiver
                after = fleet.count(r"fleet: cancel request for client \d+ passed to proxy")
                assert after[receiver] == forwarded[receiver] + 1, (after, forwarded)
            finally:
                await conn.close()

    asyncio.run(run())
    assert _running(pg_server, "select pg_sleep(31)") == 0


def test_kill_query_from_another_connection_reaches_the_owner(fleet: Fleet) -> None:
    env = dict(os.environ, MYSQL_PWD="app-secret")
    for _ in range(PROXIES):
        forwarded = fleet.count(r"fleet: KILL QUERY \d+ passed to proxy")
        first = len(fleet.mysql.chosen)
        victim = pymysql.connect(host="127.0.0.1", port=fleet.mysql.port, user="app", password="app-secret",
                                 database="app")
        try:
            assert mysql_ids.fleet_proxy_of(victim.thread_id()) == fleet.mysql.chosen[first] + 1
            outcome: list[object] = []
            thread = threading.Thread(target=lambda v=victim, out=outcome: out.append(_sleep(v)))
            started = time.monotonic()
            thread.start()
            time.sleep(0.4)
            killed = subprocess.run(["mysql", "-h", "127.0.0.1", "-P", str(fleet.mysql.port), "-u", "app",
                                     "-e", f"KILL QUERY {victim.thread_id()}"], env=env, capture_output=True,
                                    text=True, timeout=10)
            assert killed.returncode == 0, killed.stderr
            thread.join(10)
            assert outcome == [1] or outcome == ["interrupted"], outcome
            assert time.monotonic() - started < 5
        finally:
            victim.close()
        receiver = fleet.mysql.chosen[first + 1]
        assert receiver != fleet.mysql.chosen[first]
        assert fleet.count(r"fleet: KILL QUERY \d+ passed to proxy")[receiver] == forwarded[receiver] + 1


def _sleep(conn: pymysql.Connection) -> object:
    try:
        with conn.cursor() as cursor:
            cursor.execute("SELECT SLEEP(30)")
            return cursor.fetchone()[0]  # type: ignore[index]
    except pymysql.err.OperationalError as exc:
        return "interrupted" if exc.args[0] in (1317, 1028) else exc


def _ask(port: int, message: dict[str, object]) -> dict[str, object]:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(encode(message))
        with sock.makefile("rb") as stream:
            size = struct.unpack("!I", stream.read(4))[0]
            answer = json.loads(stream.read(size))
    assert isinstance(answer, dict)
    return answer


def test_forged_stale_and_replayed_forwards_are_refused(fleet: Fleet, pg_server: PostgresInstance) -> None:
    async def run() -> None:  # a client of the proxy with two workers: either may own it
        conn = await asyncpg.connect(host="127.0.0.1", port=fleet.proxies[2].ports["postgresql"], user="app",
                                     password="app-secret", database="app", ssl=False)
        # (asyncpg reads them as signed integers; on the wire they are 32 bits)
        process_id, secret_key = conn._protocol.backend_pid, conn._protocol.backend_secret & 0xFFFFFFFF
        owner = pg_ids.fleet_proxy_of(process_id)
        assert owner == 3
        port = fleet.fleet_ports[owner - 1]
        query = asyncio.ensure_future(conn.fetchval("select pg_sleep(32)"))
        await asyncio.to_thread(_wait_running, pg_server, "select pg_sleep(32)")
        body = {"kind": "cancel", "to": owner, "process_id": process_id, "secret_key": secret_key}
        refusals = fleet.count(r"fleet: refused a message from")[owner - 1]
        assert _ask(port, sign(b"another-key-0123456789", body, time.time())) == {"error": "refused"}
        assert _ask(port, sign(FLEET_KEY, body, time.time() - 120)) == {"error": "refused"}  # stale
        unsigned = {"body": body, "ts": time.time(), "nonce": "00", "reply_to": ""}
        assert _ask(port, unsigned) == {"error": "refused"}
        await asyncio.sleep(0.5)
        assert _running(pg_server, "select pg_sleep(32)") == 1  # none of them cancelled anything
        assert fleet.count(r"fleet: refused a message from")[owner - 1] == refusals + 3
        signed = sign(FLEET_KEY, body, time.time())
        assert "mac" in _ask(port, signed)  # the fleet's own forward is applied
        with pytest.raises(asyncpg.QueryCanceledError):
            await asyncio.wait_for(query, 5)
        for _ in range(4):  # the same message again, whichever worker of the proxy owns the client
            assert _ask(port, signed) == {"error": "refused"}
        assert "replayed" in fleet.proxies[owner - 1].log()
        await conn.close()

    asyncio.run(run())
    logs = "".join(proxy.log() for proxy in fleet.proxies)
    assert FLEET_KEY.decode() not in logs


def test_a_cancel_or_kill_for_an_unknown_proxy_is_dropped_with_a_log_line(fleet: Fleet) -> None:
    stranger = 9  # no proxy of the fleet has this id
    dropped = metric_value(scrape(fleet.proxies[0]), "dbproxy_fleet_forwards_dropped_total")
    process_id = pg_ids.make_process_id(0, 5, stranger)
    with socket.create_connection(("127.0.0.1", fleet.proxies[0].ports["postgresql"]), timeout=5) as sock:
        sock.sendall(cancel_request(process_id, 12345))
        sock.settimeout(5)
        assert sock.recv(1) == b""  # the proxy closes the cancel connection when it is done
    fleet.proxies[0].wait_for_log(rf"fleet: cancel request for client {process_id} for proxy 9 dropped: no such "
                                  "peer known")
    connection_id = mysql_ids.make_proxy_id(0, 5, stranger)
    with pymysql.connect(host="127.0.0.1", port=fleet.proxies[0].ports["mysql"], user="app",
                         password="app-secret", database="app") as conn, conn.cursor() as cursor:
        with pytest.raises(pymysql.err.OperationalError) as refused:
            cursor.execute(f"KILL QUERY {connection_id}")
        assert refused.value.args[0] == 1094
    fleet.proxies[0].wait_for_log(rf"fleet: KILL QUERY {connection_id} for proxy 9 dropped: no such peer known")
    assert metric_value(scrape(fleet.proxies[0]), "dbproxy_fleet_forwards_dropped_total") == dropped + 2
    forwarded = [metric_value(scrape(proxy), "dbproxy_fleet_forwards_total") for proxy in fleet.proxies]
    assert forwarded == fleet.count(r"fleet: .* passed to proxy")  # what the tests before passed on, if they ran


def test_a_cancel_for_a_dead_peer_is_dropped_with_a_log_line(fleet: Fleet) -> None:
    """(Last: it stops a proxy of the module's fleet.)"""
    process_id = pg_ids.make_process_id(0, 7, 2)  # (no such client of proxy 2: it logs and ignores the cancel)

    def cancel() -> None:
        with socket.create_connection(("127.0.0.1", fleet.proxies[0].ports["postgresql"]), timeout=5) as sock:
            sock.sendall(cancel_request(process_id, 12345))
            sock.settimeout(5)
            assert sock.recv(1) == b""

    cancel()  # proxy 2 is alive: the first proxy knows where it is
    fleet.proxies[0].wait_for_log(rf"fleet: cancel request for client {process_id} passed to proxy 2")
    fleet.proxies[1].stop()
    cancel()  # at the address known (unless a round of discovery has dropped it already: dropped either way)
    fleet.proxies[0].wait_for_log(
        rf"fleet: cancel request for client {process_id} for proxy 2 dropped: (.*refused|no such peer known)")
    cancel()  # after asking the peers again
    fleet.proxies[0].wait_for_log(rf"fleet: cancel request for client {process_id} for proxy 2 dropped: no such "
                                  "peer known")
