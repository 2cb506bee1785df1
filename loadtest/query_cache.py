"""What the query result cache gains: two proxies in front of one throwaway PostgreSQL, the cache off in one and on
(local store, one rule) in the other, driven in turns by the same read-heavy pgbench custom script where 90% of the
transactions repeat one aggregate over pgbench_accounts and 10% read one account by its key; then by pgbench's
select-only script, which no rule matches (what an endpoint with a cache costs the traffic it does not cache).
Prints tx/s and the proxy's CPU microseconds per transaction of each, side by side, and the ratios.

Usage: python -m loadtest.query_cache [--rounds 3] [--seconds 8] [--clients 8] [--scale 5] [--mode simple]
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

from devtools.servers import PostgresInstance, free_port, start_postgres

USER, PASSWORD = "bench", "bench-secret"
SCRIPT = r"""\set r random(1, 100)
\set aid random(1, 100000 * :scale)
\if :r <= 90
SELECT bid, count(*), sum(abalance) FROM pgbench_accounts GROUP BY bid ORDER BY bid;
\else
SELECT abalance FROM pgbench_accounts WHERE aid = :aid;
\endif
"""
RULE = '[[query_cache.rules]]\nregex = "^SELECT bid, count"\nttl = 30.0\n'


def write_config(folder: Path, pg: PostgresInstance, cache: bool, pool: int) -> int:
    """The proxy's config (one process, `pool` backends, the cache on or off) and secrets in `folder`; its port."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "secrets.toml").write_text(f'[users]\n{USER} = "{PASSWORD}"\n')
    port = free_port()
    (folder / "proxy.toml").write_text(f"""[server]
log_level = "warning"
workers = 1
[secrets]
file = "secrets.toml"
[postgresql]
port = {port}
backend_port = {pg.port}
[postgresql.pool]
max_connections = {pool}
[query_cache]
enabled = {"true" if cache else "false"}
{RULE if cache else ""}""")
    return port


@contextmanager
def proxy(folder: Path, pg: PostgresInstance, cache: bool, pool: int) -> Iterator[tuple[int, int]]:
    """A one-process proxy with the cache on or off; yields its pid and port."""
    port = write_config(folder, pg, cache, pool)
    process = subprocess.Popen([sys.executable, "-m", "proxy", "run", "-c", str(folder / "proxy.toml")],
                               stdout=subprocess.PIPE, stderr=(folder / "proxy.log").open("w"), text=True)
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        if not line.startswith("dbproxy ready"):
            raise RuntimeError(f"the proxy did not start: {(folder / 'proxy.log').read_text()[-2000:]}")
        yield process.pid, port
    finally:
        process.terminate()
        process.wait(15)


def cpu_seconds(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


def pgbench(port: int, script: Path | None, mode: str, clients: int, seconds: int) -> int:
    """Transactions pgbench ran: the custom `script`, or (None) its built-in select-only script."""
    workload = ["-f", str(script)] if script is not None else ["-S"]
    out = subprocess.run(["pgbench", "-n", *workload, "-M", mode, "-c", str(clients), "-j", "2",
                          "-T", str(seconds), "-h", "127.0.0.1", "-p", str(port), "-U", USER, USER],
                         env=dict(os.environ, PGPASSWORD=PASSWORD), capture_output=True, text=True,
                         timeout=seconds + 60)
    found = re.search(r"number of transactions actually processed: (\d+)", out.stdout)
    if out.returncode != 0 or found is None:
        raise RuntimeError(f"pgbench failed: {out.stderr[-1000:]}")
    return int(found.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=8)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--scale", type=int, default=5)
    parser.add_argument("--mode", default="simple", choices=("simple",))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="query-cache-") as tmp, ExitStack() as stack:
        work = Path(tmp)
        os.chmod(work, 0o711)
        pg = start_postgres(work / "pg", users={USER: PASSWORD})
        stack.callback(pg.stop)
        subprocess.run(["pgbench", "-i", "-q", "-s", str(args.scale), "-h", "127.0.0.1", "-p", str(pg.port), "-U",
                        USER, USER], env=dict(os.environ, PGPASSWORD=PASSWORD), check=True, capture_output=True)
        script = work / "read_heavy.sql"
        script.write_text(SCRIPT)
        os.chmod(script, 0o644)
        proxies = {"off": stack.enter_context(proxy(work / "off", pg, False, pool=4)),
                   "on": stack.enter_context(proxy(work / "on", pg, True, pool=4))}
        scenarios = {"read-heavy script (90% one aggregate)": script,
                     "pgbench -S (no statement cached)": None}
        totals = {(name, side): [0.0, 0] for name in scenarios for side in proxies}  # cpu seconds, transactions
        for round_number in range(args.rounds):
            order = list(proxies) if round_number % 2 == 0 else list(reversed(proxies))  # alternate who goes first
            for name, workload in scenarios.items():
                for side in order:
                    pid, port = proxies[side]
                    before = cpu_seconds(pid)
                    done = pgbench(port, workload, args.mode, args.clients, args.seconds)
                    totals[(name, side)][0] += cpu_seconds(pid) - before
                    totals[(name, side)][1] += done
            print(f"round {round_number + 1} of {args.rounds} done", file=sys.stderr, flush=True)
            time.sleep(1)
        print(f"| pgbench -M {args.mode}, scale {args.scale}, {args.clients} clients, {args.rounds} x {args.seconds} s "
              "each | off: tx/s | on: tx/s | tx/s on/off | off: proxy CPU µs/tx | on: proxy CPU µs/tx | CPU on/off |")
        print("|---|---|---|---|---|---|---|")
        for name in scenarios:
            rate = {side: totals[(name, side)][1] / (args.rounds * args.seconds) for side in proxies}
            per = {side: totals[(name, side)][0] / totals[(name, side)][1] * 1e6 for side in proxies}
            print(f"| {name} | {rate['off']:.0f} | {rate['on']:.0f} | {rate['on'] / rate['off']:.2f} | "
                  f"{per['off']:.1f} | {per['on']:.1f} | {per['on'] / per['off']:.2f} |")

if __name__ == "__main__":
    main()
