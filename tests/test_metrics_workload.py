"""/metrics under real pgbench and sysbench load through a two-worker proxy: connections, borrows, statements and
their latency histograms, TLS logins, failed logins, pins by reason, and instance availability for a cluster."""

from __future__ import annotations

import os
import re
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from devtools.servers import MariaDBInstance, PostgresInstance
from replicated import cluster_config, monitor_secret, postgres_pair
from replicated import running_proxy as running_cluster_proxy
from support import ProxyProcess, metric_value, running_proxy, scrape

BACKENDS = 4


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory, pg_bench_tables: PostgresInstance,
          mariadb_server: MariaDBInstance) -> Iterator[ProxyProcess]:
    folder = tmp_path_factory.mktemp("metrics")
    with running_proxy(folder, pg_bench_tables, mariadb_server, server={"workers": 2, "metrics_port": 0},
                       postgresql__pool={"max_connections": BACKENDS},
                       mysql__pool={"max_connections": BACKENDS}) as running:
        yield running


def histogram_count(text: str, name: str, **labels: str) -> float:
    return metric_value(text, f"{name}_count", **labels)


def test_pgbench_moves_the_counters_and_histograms(proxy: ProxyProcess) -> None:
    before = scrape(proxy)
    peak_borrowed = [0.0]
    stop = threading.Event()

    def watch() -> None:  # the borrowed gauge during the run: never above the pool size, and used
        while not stop.is_set():
            text = scrape(proxy)
            peak_borrowed[0] = max(peak_borrowed[0], metric_value(
                text, "dbproxy_database_connections_currently_borrowed", engine="postgresql"))
            time.sleep(0.1)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    out = subprocess.run(["pgbench", "-n", "-S", "-c", "12", "-j", "2", "-t", "200", "-h", "127.0.0.1", "-p",
                          str(proxy.ports["postgresql"]), "-U", "app", "app"],
                         env=dict(os.environ, PGPASSWORD="app-secret"), capture_output=True, text=True, timeout=120)
    stop.set()
    watcher.join()
    assert out.returncode == 0, out.stderr
    transactions = int(re.search(r"actually processed: (\d+)", out.stdout).group(1))  # type: ignore[union-attr]
    after = scrape(proxy)

    def moved(name: str, **labels: str) -> float:
        return metric_value(after, name, **labels) - metric_value(before, name, **labels)

    pg = {"engine": "postgresql"}
    assert 12 <= moved("dbproxy_client_connections_setup_succeeded_total", **pg) <= 13  # (+ its own first login)
    assert transactions <= moved("dbproxy_query_requests_total", **pg) <= transactions + 12 * 3
    assert moved("dbproxy_query_response_latency_seconds_count", **pg) == moved("dbproxy_query_requests_total", **pg)
    assert moved("dbproxy_database_response_latency_seconds_count", **pg) == moved(
        "dbproxy_query_requests_total", **pg)
    assert moved("dbproxy_query_response_latency_seconds_sum", **pg) >= moved(
        "dbproxy_database_response_latency_seconds_sum", **pg) > 0
    borrows = moved("dbproxy_database_connection_borrows_total", **pg)
    assert borrows >= transactions
    assert moved("dbproxy_database_connection_borrow_latency_seconds_count", **pg) == borrows
    assert moved("dbproxy_database_connection_borrow_waits_total", **pg) > 0  # 12 clients on 4 backends
    assert 0 < peak_borrowed[0] <= BACKENDS * 2  # (each of the two workers has its own pool of BACKENDS)
    assert metric_value(after, "dbproxy_max_database_connections_allowed", **pg) > 0
    assert metric_value(after, "dbproxy_database_connections", **pg) <= BACKENDS * 2
    buckets = [(sample_le, value) for sample_le, value in re.findall(
        r'dbproxy_query_response_latency_seconds_bucket\{[^}]*engine="postgresql"[^}]*le="([^"]+)"\} ([\d.e+]+)',
        after)]
    assert buckets and buckets[-1][0] == "+Inf"


def test_sysbench_moves_the_mysql_counters(proxy: ProxyProcess, mariadb_server: MariaDBInstance) -> None:
    base = ["sysbench", "oltp_point_select", "--db-driver=mysql", "--mysql-host=127.0.0.1",
            "--mysql-user=bench", "--mysql-password=bench-secret", "--mysql-db=bench", "--tables=1",
            "--table-size=1000", "--mysql-ssl=off"]
    subprocess.run([*base, f"--mysql-port={mariadb_server.port}", "cleanup"], capture_output=True, timeout=60)
    subprocess.run([*base, f"--mysql-port={mariadb_server.port}", "prepare"], capture_output=True, timeout=120,
                   check=True)
    before = scrape(proxy)
    out = subprocess.run([*base, f"--mysql-port={proxy.ports['mysql']}", "--threads=8", "--events=1600", "--time=0",
                          "--db-ps-mode=disable", "run"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout[-2000:]
    reads = int(re.search(r"read:\s+(\d+)", out.stdout).group(1))  # type: ignore[union-attr]
    after = scrape(proxy)
    my = {"engine": "mysql"}
    queries = metric_value(after, "dbproxy_query_requests_total", **my) - metric_value(
        before, "dbproxy_query_requests_total", **my)
    assert reads <= queries <= reads * 1.02 + 50, (reads, queries)  # (+ each connection's own setup statements)
    assert metric_value(after, "dbproxy_query_response_latency_seconds_count", **my) == metric_value(
        after, "dbproxy_query_requests_total", **my)
    assert metric_value(after, "dbproxy_database_connection_borrows_total", **my) > metric_value(
        before, "dbproxy_database_connection_borrows_total", **my)


def test_tls_failed_logins_errors_and_pins(proxy: ProxyProcess) -> None:
    before = scrape(proxy)
    dsn = f"host=127.0.0.1 port={proxy.ports['postgresql']} user=app dbname=app"
    with psycopg.connect(dsn + " password=app-secret sslmode=require", autocommit=True) as conn:
        with pytest.raises(psycopg.errors.UndefinedTable):
            conn.execute("SELECT * FROM no_such_table_for_metrics")
        conn.execute("SELECT pg_advisory_lock(4242)")  # pins the session to its backend
        conn.execute("SELECT pg_advisory_unlock(4242)")
    for _ in range(3):
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(dsn + " password=wrong sslmode=disable").close()
    after = scrape(proxy)
    pg = {"engine": "postgresql"}

    def moved(name: str, **labels: str) -> float:
        return metric_value(after, name, **labels) - metric_value(before, name, **labels)

    assert moved("dbproxy_client_connections_tls_total", **pg) == 1
    assert moved("dbproxy_client_connections_closed_total", **pg) >= 4  # the TLS session and the three refused
    assert moved("dbproxy_client_connections_setup_failed_auth_total", **pg) == 3
    assert moved("dbproxy_query_errors_total", **pg) == 1
    assert sum(moved("dbproxy_session_pins_total", **pg, reason=reason)
               for reason in re.findall(r'dbproxy_session_pins_total\{[^}]*reason="([^"]+)"', after)) >= 1


def test_instance_availability_and_roles(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with postgres_pair(tmp_path) as (primary, standby):
        config = cluster_config(primary, standby, names=True, monitor_interval=0.5,
                                monitor_user=monitor_secret(monkeypatch, primary))
        config["server"]["metrics_port"] = 0
        with running_cluster_proxy(tmp_path / "proxy", config) as process:
            process.wait_for_log(rf"instance .*:{standby.port} is now reader")
            text = scrape(process)
            assert metric_value(text, "dbproxy_instance_available", instance="one", role="writer") == 1
            assert metric_value(text, "dbproxy_instance_available", instance="two", role="reader") == 1
            standby.stop()
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                text = scrape(process)
                if metric_value(text, "dbproxy_instance_available", instance="two") == 0:
                    break
                time.sleep(0.2)
            assert metric_value(text, "dbproxy_instance_available", instance="two") == 0, text
            assert metric_value(text, "dbproxy_cluster_writer_changes_total", cluster="main") == 0
