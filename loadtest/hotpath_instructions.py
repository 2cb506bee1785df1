"""What the hot path costs in instructions per transaction (callgrind: the same count for the same work whatever
else the machine does), with the compiled build of proxy.compiled.MODULES, with the same modules interpreted
(DBPROXY_COMPILED=0), and optionally with the code of an earlier commit (interpreted): one proxy process under
valgrind per side, counters zeroed after a warm-up, then a fixed number of pgbench and sysbench transactions.
TLS is off for every client, as in loadtest.bench.

Usage: python -m loadtest.hotpath_instructions [--transactions 2000] [--baseline-commit REV]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path

from loadtest.insights_callgrind import count_sides, pgbench_count, sysbench_events
from loadtest.insights_cost import REPO, checkout, start_servers
from proxy import compiled


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--transactions", type=int, default=2000, help="per scenario (4 clients)")
    parser.add_argument("--baseline-commit", default="")
    args = parser.parse_args()
    if not compiled.in_use():
        sys.exit("the compiled build is not in use here: `pip install -e .` first (see setup.py)")
    os.environ["PGSSLMODE"] = "disable"
    per_client = max(1, args.transactions // 4)
    scenarios = {
        "pgbench -S simple": lambda ports: pgbench_count(ports["postgresql"], "simple", per_client),
        "pgbench -S extended": lambda ports: pgbench_count(ports["postgresql"], "extended", per_client),
        "pgbench -S prepared": lambda ports: pgbench_count(ports["postgresql"], "prepared", per_client),
        "sysbench point_select": lambda ports: sysbench_events(ports["mysql"], per_client * 4),
    }
    with tempfile.TemporaryDirectory(prefix="hotpath-callgrind-") as tmp, ExitStack() as stack:
        work = Path(tmp)
        os.chmod(work, 0o711)
        pg, mariadb = start_servers(work, stack, scale=1)
        sides: dict[str, tuple[Path, dict[str, str]]] = {
            "compiled": (REPO, {}), "interpreted": (REPO, {compiled.SWITCH: "0"})}
        if args.baseline_commit:
            sides["baseline"] = (checkout(work / "baseline", stack, args.baseline_commit), {})
        per_tx = count_sides(work, pg, mariadb, {side: (0, code, env) for side, (code, env) in sides.items()},
                             scenarios)
        print_table(per_tx, list(sides), list(scenarios))


def print_table(per_tx: dict[tuple[str, str], float], sides: list[str], scenarios: list[str]) -> None:
    print("| scenario (4 clients) | " + " | ".join(f"{side}: instructions/tx" for side in sides)
          + " | compiled/interpreted |" + (" compiled/baseline |" if "baseline" in sides else ""))
    print("|---" * (len(sides) + 2 + ("baseline" in sides)) + "|")
    for name in scenarios:
        cells = " | ".join(f"{per_tx[(side, name)]:,.0f}" for side in sides)
        ratio = f"{per_tx[('compiled', name)] / per_tx[('interpreted', name)]:.3f}"
        extra = f" {per_tx[('compiled', name)] / per_tx[('baseline', name)]:.3f} |" if "baseline" in sides else ""
        print(f"| {name} | {cells} | {ratio} |{extra}")


if __name__ == "__main__":
    main()
