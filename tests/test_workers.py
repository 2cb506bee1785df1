"""Several worker processes: one budget of backend connections, cancels and KILLs routed to the owner over the
internal channel, metrics of every worker summed series by series."""

from __future__ import annotations

import asyncio
import re
import socket
import threading
import time
import urllib.request
from pathlib import Path

import asyncpg
import psutil
import psycopg
import pymysql
import pytest
from prometheus_client.parser import text_string_to_metric_families
from psycopg import errors

from devtools.servers import MariaDBInstance, PostgresInstance
from proxy.channel import HEADER, ask_blocking, encode
from proxy.rundir import worker_channel
from support import ProxyProcess, backend_connections, metric_value, running_proxy, scrape


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory: pytest.TempPathFactory, pg_server: PostgresInstance) -> ProxyProcess:
    with running_proxy(tmp_path_factory.mktemp("workers"), pg_server, server={"workers": 2, "metrics_port": 0},
                       postgresql__pool={"max_connections": 4}) as proxy:
        yield proxy  # type: ignore[misc]


async def test_clients_spread_over_workers_within_one_budget(two_workers: ProxyProcess,
                                                            pg_server: PostgresInstance) -> None:
    port = two_workers.ports["postgresql"]
    peak = 0

    async def client(n: int) -> int:
        nonlocal peak
        conn = await asyncpg.connect(host="127.0.0.1", port=port, user="bench", password="bench-secret",
                                     database="bench", ssl=False)
        try:
            value = 0
            for _ in range(5):
                value = await conn.fetchval("SELECT $1::int FROM pg_sleep(0.002)", n)
            peak = max(peak, backend_connections(pg_server, "bench"))
            return int(value)
        finally:
            await conn.close()

    assert await asyncio.gather(*(client(n) for n in range(120))) == list(range(120))
    assert 0 < peak <= 4
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{two_workers.ports['metrics']}/metrics").read().decode()
    assert metric_value(metrics, "dbproxy_client_connections_received_total") >= 120
    assert len(re.findall(r"this worker's share of 4", two_workers.log())) == 2


def test_cancel_reaches_the_worker_that_owns_the_client(two_workers: ProxyProcess) -> None:
    port = two_workers.ports["postgresql"]
    for _ in range(12):  # a cancel lands on either worker; with 12 tries both routes are taken
        with psycopg.connect(host="127.0.0.1", port=port, user="app", password="app-secret", dbname="app",
                             sslmode="disable", autocommit=True) as conn:
            timer = threading.Timer(0.3, conn.cancel)
            timer.start()
            started = time.monotonic()
            with pytest.raises(errors.QueryCanceled):
                conn.execute("SELECT pg_sleep(10)")
            assert time.monotonic() - started < 5
    two_workers.wait_for_log("passed to worker")


def test_config_workers_zero_means_one_per_core(tmp_path: Path) -> None:
    from proxy.config import parse_config

    assert parse_config({}).server.workers == 0


def test_kill_query_reaches_the_worker_that_owns_the_client(tmp_path: Path, mariadb_server: MariaDBInstance) -> None:
    with running_proxy(tmp_path, mariadb=mariadb_server, server={"workers": 2}) as proxy:
        port = proxy.ports["mysql"]

        def connect() -> pymysql.Connection:
            return pymysql.connect(host="127.0.0.1", port=port, user="app", password="app-secret", database="app")

        with connect() as killer:
            for _ in range(8):  # victims land on either worker; the killer on one of them
                with connect() as victim:
                    outcome: list[object] = []
                    thread = threading.Thread(target=lambda v=victim, out=outcome: out.append(_sleep(v)))
                    started = time.monotonic()
                    thread.start()
                    time.sleep(0.4)
                    with killer.cursor() as cursor:
                        cursor.execute(f"KILL QUERY {victim.thread_id()}")
                    thread.join()
                    assert time.monotonic() - started < 4
                    assert outcome == [1] or outcome == ["interrupted"], outcome
        proxy.wait_for_log(r"KILL QUERY \d+ passed to worker")


def _sleep(conn: pymysql.Connection) -> object:
    try:
        with conn.cursor() as cursor:
            cursor.execute("SELECT SLEEP(10)")
            return cursor.fetchone()[0]  # type: ignore[index]
    except pymysql.err.OperationalError as exc:
        return "interrupted" if exc.args[0] in (1317, 1028) else exc


@pytest.fixture(scope="module")
def both_engines(tmp_path_factory: pytest.TempPathFactory, pg_server: PostgresInstance,
                 mariadb_server: MariaDBInstance) -> ProxyProcess:
    with running_proxy(tmp_path_factory.mktemp("both"), pg_server, mariadb_server,
                       server={"workers": 2, "metrics_port": 0}) as proxy:
        yield proxy  # type: ignore[misc]


def _run_folder(proxy: ProxyProcess) -> Path:
    """The supervisor's folder of channel sockets, as its workers were told."""
    worker = psutil.Process(proxy.pid).children()[0]
    listening = [c.laddr for c in worker.net_connections(kind="unix") if str(c.laddr).endswith(".sock")]
    assert listening, "the worker listens on no channel socket"
    return Path(str(listening[0])).parent


def _worker_snapshots(proxy: ProxyProcess) -> list[dict[str, list[dict[str, object]]]]:
    folder = _run_folder(proxy)
    return [ask_blocking(worker_channel(index, folder), {"kind": "stats"}, 5)["snapshot"] for index in range(2)]


def test_metrics_add_up_both_workers_series_by_series_with_every_label(
        both_engines: ProxyProcess, pg_server: PostgresInstance, mariadb_server: MariaDBInstance) -> None:
    for user in ("app", "bench"):
        for _ in range(15):
            with psycopg.connect(host="127.0.0.1", port=both_engines.ports["postgresql"], user=user,
                                 password=f"{user}-secret", dbname=user, sslmode="disable", autocommit=True) as conn:
                conn.execute("SELECT 1")
    for _ in range(15):
        with pymysql.connect(host="127.0.0.1", port=both_engines.ports["mysql"], user="app", password="app-secret",
                             database="app") as my_conn, my_conn.cursor() as cursor:
            cursor.execute("SELECT 1")
    parts = _worker_snapshots(both_engines)
    text = scrape(both_engines)
    for engine, port in (("postgresql", pg_server.port), ("mysql", mariadb_server.port)):
        endpoint = {"engine": engine, "endpoint": engine, "cluster": engine}
        accepted = [sum(int(s["clients_accepted"]) for s in part["endpoints"] if s["engine"] == engine)  # type: ignore[call-overload]
                    for part in parts]
        assert all(count > 0 for count in accepted), accepted  # both workers took clients
        assert metric_value(text, "dbproxy_client_connections_received_total", **endpoint) == sum(accepted) >= 15
        for user in ("app", "bench") if engine == "postgresql" else ("app",):
            pool = {**endpoint, "instance": f"127.0.0.1:{port}", "database": user, "user": user}
            served = [sum(int(s["transactions"]) for s in part["pools"]  # type: ignore[call-overload]
                          if all(s.get(k) == v for k, v in pool.items())) for part in parts]
            assert metric_value(text, "dbproxy_transactions_total", **pool) == sum(served) >= 15, (served, text)
            assert metric_value(text, "dbproxy_database_connections_opened_total", **pool) >= 1
    family = next(f for f in text_string_to_metric_families(text) if f.name == "dbproxy_transactions")
    assert {tuple(sorted(sample.labels)) for sample in family.samples} == {
        ("cluster", "database", "endpoint", "engine", "instance", "user")}


def test_channel_answers_bad_messages_without_harm_and_never_logs_a_cancel_key(both_engines: ProxyProcess) -> None:
    path = worker_channel(0, _run_folder(both_engines))
    secret = 1234567891
    answer = ask_blocking(path, {"kind": "cancel", "process_id": (7 << 24) + 5, "secret_key": secret}, 5)
    assert answer == {}  # an unknown key is ignored, as a CancelRequest for it is
    assert ask_blocking(path, {"kind": "no such kind"}, 5)["error"] == "unknown"
    for garbage in (b"\xff\xff\xff\xff", HEADER.pack(3) + b"[1]", encode({"kind": "kill"})):
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(5)
            sock.connect(str(path))
            sock.sendall(garbage)
            sock.shutdown(socket.SHUT_WR)
            sock.recv(65536)
    assert ask_blocking(path, {"kind": "stats"}, 5)["snapshot"]["endpoints"]
    both_engines.wait_for_log("internal channel: a message could not be read")
    assert str(secret) not in both_engines.log()
    assert "too large" not in scrape(both_engines)


def test_kill_across_workers_is_refused_to_another_user_and_closes_the_owners_connection(
        both_engines: ProxyProcess) -> None:
    def connect(user: str) -> pymysql.Connection:
        return pymysql.connect(host="127.0.0.1", port=both_engines.ports["mysql"], user=user,
                               password=f"{user}-secret", database=user)

    victims = [connect("app") for _ in range(8)]  # on either worker: some KILLs cross to the other one
    try:
        with connect("bench") as stranger, stranger.cursor() as cursor:
            for victim in victims:
                with pytest.raises(pymysql.err.OperationalError) as info:
                    cursor.execute(f"KILL {victim.thread_id()}")
                assert info.value.args[0] == 1095, info.value.args  # not owner of thread
        with connect("app") as owner, owner.cursor() as cursor:
            for victim in victims:
                cursor.execute(f"KILL {victim.thread_id()}")
        for victim in victims:
            with pytest.raises(pymysql.err.OperationalError), victim.cursor() as victim_cursor:
                victim_cursor.execute("SELECT 1")
    finally:
        for victim in victims:
            victim.close()
    both_engines.wait_for_log(r"KILL \d+ passed to worker")


def test_totals_never_go_down_when_a_worker_dies_and_is_started_again(tmp_path: Path,
                                                                      pg_server: PostgresInstance) -> None:
    def clients(count: int) -> None:
        for _ in range(count):
            with psycopg.connect(host="127.0.0.1", port=proxy.ports["postgresql"], user="app", password="app-secret",
                                 dbname="app", sslmode="disable", autocommit=True) as conn:
                conn.execute("SELECT 1")

    def totals() -> tuple[float, float]:
        text = scrape(proxy)
        return (metric_value(text, "dbproxy_client_connections_received_total"),
                metric_value(text, "dbproxy_transactions_total"))

    with running_proxy(tmp_path, pg_server, server={"workers": 2, "metrics_port": 0}) as proxy:
        clients(12)
        before = totals()
        assert before[0] >= 12 and before[1] >= 12
        victim = psutil.Process(proxy.pid).children()[0]
        victim.kill()
        proxy.wait_for_log("starting it again")
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:  # while it is away, and once it answers again
            now = totals()
            assert now[0] >= before[0] and now[1] >= before[1], (before, now)
        clients(12)
        after = totals()
        assert after[0] >= before[0] + 12 and after[1] >= before[1] + 12, (before, after)
        assert len(psutil.Process(proxy.pid).children()) == 2 and victim.pid not in {
            child.pid for child in psutil.Process(proxy.pid).children()}
