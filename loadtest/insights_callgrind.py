"""What the statement statistics cost in instructions (callgrind counts instructions, not seconds: the same for the
same work whatever else the machine does): a one-process proxy under valgrind, counters zeroed once it is up,
then a fixed number of pgbench and sysbench transactions, with the statistics on, off, and (with
--baseline-commit) the code of a commit before the per-statement timing existed; instructions per transaction.

Usage: python -m loadtest.insights_callgrind [--transactions 2000] [--baseline-commit REV]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from devtools.servers import MariaDBInstance, PostgresInstance
from loadtest.insights_cost import PASSWORD, REPO, USER, checkout, start_servers, write_config


@contextmanager
def proxy_under_callgrind(folder: Path, pg: PostgresInstance, mariadb: MariaDBInstance, insights: int | None,
                          code: Path, env: dict[str, str] | None = None, config: str = "") -> Iterator[dict[str, int]]:
    """A one-process proxy under callgrind (collecting from start), with `env` added to its environment and `config`
    (TOML) to its configuration; yields its pid and ports."""
    ports = write_config(folder, pg, mariadb, insights, pool=4, server="client_login_timeout = 60.0" + config)
    out = folder / "callgrind.out"
    process = subprocess.Popen(["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", "--dump-instr=no",
                                sys.executable, "-m", "proxy", "run", "-c", str(folder / "proxy.toml")],
                               stdout=subprocess.PIPE, stderr=(folder / "proxy.log").open("w"), text=True,
                               env=dict(os.environ, PYTHONPATH=str(code), **(env or {})), cwd=code)
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        if not line.startswith("dbproxy ready"):
            raise RuntimeError(f"the proxy did not start: {(folder / 'proxy.log').read_text()[-2000:]}")
        yield {"pid": process.pid, **ports}
    finally:
        process.terminate()
        process.wait(120)


def instructions(pid: int, folder: Path, work: object) -> int:
    """Instructions the process ran during `work()` (counters zeroed before, dumped after)."""
    subprocess.run(["callgrind_control", "--zero", str(pid)], check=True, capture_output=True, timeout=60)
    work()  # type: ignore[operator]
    subprocess.run(["callgrind_control", "--dump", str(pid)], check=True, capture_output=True, timeout=60)
    time.sleep(0.5)
    dumps = sorted(folder.glob("callgrind.out.*"), key=lambda path: path.stat().st_mtime)
    text = dumps[-1].read_text(errors="replace")
    found = re.search(r"^(?:summary|totals): (\d+)", text, re.M)
    if found is None:
        raise RuntimeError(f"no instruction total in {dumps[-1]}")
    return int(found.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--transactions", type=int, default=2000, help="per scenario (4 clients)")
    parser.add_argument("--baseline-commit", default="")
    args = parser.parse_args()
    per_client = max(1, args.transactions // 4)
    scenarios = {
        "pgbench -S simple": lambda ports: pgbench_count(ports["postgresql"], "simple", per_client),
        "pgbench -S prepared": lambda ports: pgbench_count(ports["postgresql"], "prepared", per_client),
        "sysbench point_select": lambda ports: sysbench_events(ports["mysql"], per_client * 4),
    }
    with tempfile.TemporaryDirectory(prefix="insights-callgrind-") as tmp, ExitStack() as stack:
        work = Path(tmp)
        os.chmod(work, 0o711)
        pg, mariadb = start_servers(work, stack, scale=1)
        sides: dict[str, tuple[int | None, Path]] = {"on": (5000, REPO), "off": (0, REPO)}
        if args.baseline_commit:
            sides["baseline"] = (None, checkout(work / "baseline", stack, args.baseline_commit))
        counted: dict[str, tuple[int | None, Path, dict[str, str]]] = {
            side: (insights, code, {}) for side, (insights, code) in sides.items()}
        per_tx = count_sides(work, pg, mariadb, counted, scenarios)
        names = list(sides)
        print("| scenario (4 clients) | " + " | ".join(f"{side}: instructions/tx" for side in names)
              + " | on/off |" + (" on/baseline |" if "baseline" in names else ""))
        print("|---" * (len(names) + 2 + ("baseline" in names)) + "|")
        for name in scenarios:
            cells = " | ".join(f"{per_tx[(side, name)]:,.0f}" for side in names)
            ratio = f"{per_tx[('on', name)] / per_tx[('off', name)]:.3f}"
            extra = f" {per_tx[('on', name)] / per_tx[('baseline', name)]:.3f} |" if "baseline" in names else ""
            print(f"| {name} | {cells} | {ratio} |{extra}")


Scenario = Callable[[dict[str, int]], int]


def count_sides(work: Path, pg: PostgresInstance, mariadb: MariaDBInstance,
                sides: dict[str, tuple[int | None, Path, dict[str, str]]],
                scenarios: dict[str, Scenario]) -> dict[tuple[str, str], float]:
    """Instructions per transaction of each scenario against each side (statement_insights, code, environment):
    one proxy under callgrind per side, each scenario run once to warm up, then counted."""
    per_tx: dict[tuple[str, str], float] = {}
    for side, (insights, code, env) in sides.items():
        folder = work / side
        with proxy_under_callgrind(folder, pg, mariadb, insights, code, env) as ports:
            for name, run in scenarios.items():
                run(ports)  # warm: pools filled, statements prepared, caches made
                done: list[int] = []
                count = instructions(ports["pid"], folder,
                                     lambda run=run, ports=ports, done=done: done.append(run(ports)))
                per_tx[(side, name)] = count / done[0]
                print(f"{side}: {name}: {count:,} instructions for {done[0]} transactions", file=sys.stderr,
                      flush=True)
    return per_tx


def pgbench_count(port: int, mode: str, per_client: int) -> int:
    out = subprocess.run(["pgbench", "-n", "-S", "-M", mode, "-c", "4", "-j", "2", "-t", str(per_client), "-h",
                          "127.0.0.1", "-p", str(port), "-U", USER, USER], env=dict(os.environ, PGPASSWORD=PASSWORD),
                         capture_output=True, text=True, timeout=1200)
    found = re.search(r"actually processed: (\d+)", out.stdout)
    if out.returncode != 0 or found is None:
        raise RuntimeError(f"pgbench failed: {out.stderr[-1000:]}")
    return int(found.group(1))


def sysbench_events(port: int, events: int) -> int:
    out = subprocess.run(["sysbench", "oltp_point_select", "--db-driver=mysql", "--mysql-host=127.0.0.1",
                          f"--mysql-port={port}", f"--mysql-user={USER}", f"--mysql-password={PASSWORD}",
                          f"--mysql-db={USER}", "--tables=1", "--table-size=10000", "--mysql-ssl=off",
                          "--db-ps-mode=disable", "--threads=4", f"--events={events}", "--time=0", "run"],
                         capture_output=True, text=True, timeout=1200)
    found = re.search(r"transactions:\s+(\d+)", out.stdout)
    if out.returncode != 0 or found is None:
        raise RuntimeError(f"sysbench failed: {out.stdout[-1000:]}")
    return int(found.group(1))


if __name__ == "__main__":
    main()
