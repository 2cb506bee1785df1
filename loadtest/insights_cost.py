"""What the statement statistics cost: two proxies, one with them on and one off, driven in turns by the same
pgbench and sysbench runs against one throwaway PostgreSQL and MariaDB; CPU microseconds per transaction and
throughput of each, side by side, as ratios.

Usage: python -m loadtest.insights_cost [--rounds 3] [--seconds 8] [--clients 20]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import psutil

from devtools.servers import MariaDBInstance, PostgresInstance, free_port, start_mariadb, start_postgres

USER, PASSWORD = "bench", "bench-secret"


@contextmanager
def proxy(folder: Path, pg: PostgresInstance, mariadb: MariaDBInstance, insights: int) -> Iterator[dict[str, int]]:
    """A one-process proxy with `statement_insights` = `insights`; yields its pid and ports."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "secrets.toml").write_text(f'[users]\n{USER} = "{PASSWORD}"\n')
    ports = {"postgresql": free_port(), "mysql": free_port()}
    (folder / "proxy.toml").write_text(f"""[server]
log_level = "warning"
workers = 1
statement_insights = {insights}
[secrets]
file = "secrets.toml"
[postgresql]
port = {ports["postgresql"]}
backend_port = {pg.port}
[postgresql.pool]
max_connections = 10
[mysql]
enabled = true
port = {ports["mysql"]}
backend_port = {mariadb.port}
[mysql.pool]
max_connections = 10
""")
    process = subprocess.Popen([sys.executable, "-m", "proxy", "run", "-c", str(folder / "proxy.toml")],
                               stdout=subprocess.PIPE, stderr=(folder / "proxy.log").open("w"), text=True)
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        if not line.startswith("dbproxy ready"):
            raise RuntimeError(f"the proxy did not start: {(folder / 'proxy.log').read_text()[-2000:]}")
        yield {"pid": process.pid, **ports}
    finally:
        process.terminate()
        process.wait(15)


def cpu_seconds(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


def pgbench(port: int, mode: str, clients: int, seconds: int) -> int:
    out = subprocess.run(["pgbench", "-n", "-S", "-M", mode, "-c", str(clients), "-j", "2", "-T", str(seconds),
                          "-h", "127.0.0.1", "-p", str(port), "-U", USER, USER],
                         env=dict(os.environ, PGPASSWORD=PASSWORD), capture_output=True, text=True,
                         timeout=seconds + 60)
    found = re.search(r"number of transactions actually processed: (\d+)", out.stdout)
    if out.returncode != 0 or found is None:
        raise RuntimeError(f"pgbench failed: {out.stderr[-1000:]}")
    return int(found.group(1))


def sysbench(port: int, clients: int, seconds: int) -> int:
    out = subprocess.run(["sysbench", "oltp_point_select", "--db-driver=mysql", "--mysql-host=127.0.0.1",
                          f"--mysql-port={port}", f"--mysql-user={USER}", f"--mysql-password={PASSWORD}",
                          f"--mysql-db={USER}", "--tables=1", "--table-size=10000", "--mysql-ssl=off",
                          "--db-ps-mode=disable", f"--threads={clients}", f"--time={seconds}", "run"],
                         capture_output=True, text=True, timeout=seconds + 60)
    found = re.search(r"read:\s+(\d+)", out.stdout)
    if out.returncode != 0 or found is None:
        raise RuntimeError(f"sysbench failed: {out.stdout[-1000:]}")
    return int(found.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=8)
    parser.add_argument("--clients", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="insights-cost-") as tmp, ExitStack() as stack:
        work = Path(tmp)
        os.chmod(work, 0o711)
        pg = start_postgres(work / "pg", users={USER: PASSWORD})
        stack.callback(pg.stop)
        mariadb = start_mariadb(work / "mariadb", users={USER: PASSWORD})
        stack.callback(mariadb.stop)
        subprocess.run(["pgbench", "-i", "-q", "-s", "5", "-h", "127.0.0.1", "-p", str(pg.port), "-U", USER, USER],
                       env=dict(os.environ, PGPASSWORD=PASSWORD), check=True, capture_output=True)
        subprocess.run(["sysbench", "oltp_point_select", "--db-driver=mysql", "--mysql-host=127.0.0.1",
                        f"--mysql-port={mariadb.port}", f"--mysql-user={USER}", f"--mysql-password={PASSWORD}",
                        f"--mysql-db={USER}", "--tables=1", "--table-size=10000", "--mysql-ssl=off", "prepare"],
                       check=True, capture_output=True)
        proxies = {"on": stack.enter_context(proxy(work / "on", pg, mariadb, 5000)),
                   "off": stack.enter_context(proxy(work / "off", pg, mariadb, 0))}
        scenarios = {"pgbench -S simple": lambda port: pgbench(port["postgresql"], "simple", args.clients,
                                                               args.seconds),
                     "pgbench -S prepared": lambda port: pgbench(port["postgresql"], "prepared", args.clients,
                                                                 args.seconds),
                     "sysbench point_select": lambda port: sysbench(port["mysql"], args.clients, args.seconds)}
        totals = {(name, side): [0.0, 0] for name in scenarios for side in proxies}  # cpu seconds, transactions
        for round_number in range(args.rounds):
            order = ["on", "off"] if round_number % 2 == 0 else ["off", "on"]  # alternate who goes first
            for name, run in scenarios.items():
                for side in order:
                    ports = proxies[side]
                    before = cpu_seconds(ports["pid"])
                    done = run(ports)
                    totals[(name, side)][0] += cpu_seconds(ports["pid"]) - before
                    totals[(name, side)][1] += done
            print(f"round {round_number + 1} of {args.rounds} done", file=sys.stderr, flush=True)
            time.sleep(1)
        print(f"| scenario ({args.clients} clients, {args.rounds} x {args.seconds} s each) | statistics on: "
              "µs CPU/tx | off: µs CPU/tx | CPU ratio on/off | tx ratio on/off |")
        print("|---|---|---|---|---|")
        for name in scenarios:
            cpu_on, tx_on = totals[(name, "on")]
            cpu_off, tx_off = totals[(name, "off")]
            per_on, per_off = cpu_on / tx_on * 1e6, cpu_off / tx_off * 1e6
            print(f"| {name} | {per_on:.1f} | {per_off:.1f} | {per_on / per_off:.3f} | {tx_on / tx_off:.3f} |")


if __name__ == "__main__":
    main()
