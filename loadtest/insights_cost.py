"""What the statement statistics cost: two proxies, one with them on and one off, driven in turns by the same
pgbench and sysbench runs against one throwaway PostgreSQL and MariaDB; CPU microseconds per transaction and
throughput of each, side by side, as ratios.

Usage: python -m loadtest.insights_cost [--rounds 3] [--seconds 8] [--clients 20] [--baseline-commit REV]

With --baseline-commit, a third proxy runs the code of that commit (checked out into a temporary folder), so the
cost of the per-query timing itself (the latency histograms, always on) is measured too.
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
REPO = Path(__file__).resolve().parent.parent


def start_servers(work: Path, stack: ExitStack, scale: int) -> tuple[PostgresInstance, MariaDBInstance]:
    """A throwaway PostgreSQL with pgbench's tables (`scale`) and a MariaDB with sysbench's, both stopped by
    `stack`."""
    pg = start_postgres(work / "pg", users={USER: PASSWORD})
    stack.callback(pg.stop)
    mariadb = start_mariadb(work / "mariadb", users={USER: PASSWORD})
    stack.callback(mariadb.stop)
    subprocess.run(["pgbench", "-i", "-q", "-s", str(scale), "-h", "127.0.0.1", "-p", str(pg.port), "-U", USER,
                    USER], env=dict(os.environ, PGPASSWORD=PASSWORD), check=True, capture_output=True)
    subprocess.run(["sysbench", "oltp_point_select", "--db-driver=mysql", "--mysql-host=127.0.0.1",
                    f"--mysql-port={mariadb.port}", f"--mysql-user={USER}", f"--mysql-password={PASSWORD}",
                    f"--mysql-db={USER}", "--tables=1", "--table-size=10000", "--mysql-ssl=off", "prepare"],
                   check=True, capture_output=True)
    return pg, mariadb


def checkout(folder: Path, stack: ExitStack, commit: str) -> Path:
    """The repository's code at `commit` in `folder` (a detached worktree, removed by `stack`)."""
    subprocess.run(["git", "worktree", "add", "--detach", str(folder), commit], check=True, capture_output=True,
                   cwd=REPO)
    stack.callback(subprocess.run, ["git", "worktree", "remove", "--force", str(folder)], capture_output=True,
                   cwd=REPO)
    return folder


def write_config(folder: Path, pg: PostgresInstance, mariadb: MariaDBInstance, insights: int | None, pool: int,
                 server: str = "") -> dict[str, int]:
    """The proxy's config (one process, both engines, `pool` backends each) and secrets in `folder`; its ports."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "secrets.toml").write_text(f'[users]\n{USER} = "{PASSWORD}"\n')
    ports = {"postgresql": free_port(), "mysql": free_port()}
    (folder / "proxy.toml").write_text(f"""[server]
log_level = "warning"
workers = 1
{server}
{"" if insights is None else f"statement_insights = {insights}"}
[secrets]
file = "secrets.toml"
[postgresql]
port = {ports["postgresql"]}
backend_port = {pg.port}
[postgresql.pool]
max_connections = {pool}
[mysql]
enabled = true
port = {ports["mysql"]}
backend_port = {mariadb.port}
[mysql.pool]
max_connections = {pool}
""")
    return ports


@contextmanager
def proxy(folder: Path, pg: PostgresInstance, mariadb: MariaDBInstance, insights: int | None,
          code: Path | None = None) -> Iterator[dict[str, int]]:
    """A one-process proxy with `statement_insights` = `insights` (None: a code that has no such key), running the
    package in `code` (default: this one); yields its pid and ports."""
    ports = write_config(folder, pg, mariadb, insights, pool=10)
    env = dict(os.environ, PYTHONPATH=str(code)) if code is not None else None
    process = subprocess.Popen([sys.executable, "-m", "proxy", "run", "-c", str(folder / "proxy.toml")],
                               stdout=subprocess.PIPE, stderr=(folder / "proxy.log").open("w"), text=True,
                               env=env, cwd=code)
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
    parser.add_argument("--baseline-commit", default="", help="also measure the proxy of this git commit")
    parser.add_argument("--only", default="", help="run the scenarios whose name matches this regex")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="insights-cost-") as tmp, ExitStack() as stack:
        work = Path(tmp)
        os.chmod(work, 0o711)
        pg, mariadb = start_servers(work, stack, scale=5)
        proxies = {"on": stack.enter_context(proxy(work / "on", pg, mariadb, 5000)),
                   "off": stack.enter_context(proxy(work / "off", pg, mariadb, 0))}
        if args.baseline_commit:
            code = checkout(work / "baseline", stack, args.baseline_commit)
            proxies["baseline"] = stack.enter_context(proxy(work / "base", pg, mariadb, None, code))
        scenarios = {"pgbench -S simple": lambda port: pgbench(port["postgresql"], "simple", args.clients,
                                                               args.seconds),
                     "pgbench -S prepared": lambda port: pgbench(port["postgresql"], "prepared", args.clients,
                                                                 args.seconds),
                     "sysbench point_select": lambda port: sysbench(port["mysql"], args.clients, args.seconds)}
        scenarios = {name: run for name, run in scenarios.items() if re.search(args.only, name)}
        totals = {(name, side): [0.0, 0] for name in scenarios for side in proxies}  # cpu seconds, transactions
        for round_number in range(args.rounds):
            order = list(proxies) if round_number % 2 == 0 else list(reversed(proxies))  # alternate who goes first
            for name, run in scenarios.items():
                for side in order:
                    ports = proxies[side]
                    before = cpu_seconds(ports["pid"])
                    done = run(ports)
                    totals[(name, side)][0] += cpu_seconds(ports["pid"]) - before
                    totals[(name, side)][1] += done
            print(f"round {round_number + 1} of {args.rounds} done", file=sys.stderr, flush=True)
            time.sleep(1)
        sides = list(proxies)
        print(f"| scenario ({args.clients} clients, {args.rounds} x {args.seconds} s each) | "
              + " | ".join(f"{side}: µs CPU/tx | {side}: tx/s" for side in sides)
              + " | CPU on/off | tx/s on/off |" + (" CPU on/baseline | tx/s on/baseline |" if len(sides) > 2 else ""))
        print("|---" * (1 + 2 * len(sides) + 2 * (len(sides) - 1)) + "|")
        for name in scenarios:
            per = {side: totals[(name, side)][0] / totals[(name, side)][1] * 1e6 for side in sides}
            rate = {side: totals[(name, side)][1] / (args.rounds * args.seconds) for side in sides}
            cells = " | ".join(f"{per[side]:.1f} | {rate[side]:.0f}" for side in sides)
            ratios = [per["on"] / per[other] for other in sides[1:]], [rate["on"] / rate[other] for other in sides[1:]]
            print(f"| {name} | {cells} | " + " | ".join(f"{cpu:.3f} | {tx:.3f}" for cpu, tx in zip(*ratios,
                                                                                                     strict=True))
                  + " |")


if __name__ == "__main__":
    main()
