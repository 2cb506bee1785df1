"""What an endpoint with a query cache costs the statements it does not cache, in instructions (callgrind: the same
for the same work whatever else the machine does): a one-process proxy under valgrind with [query_cache] off, then
on with one rule that pgbench's select-only statements do not match; instructions per transaction of each.

Usage: python -m loadtest.query_cache_callgrind [--transactions 2000]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path

from loadtest.insights_callgrind import instructions, pgbench_count, proxy_under_callgrind
from loadtest.insights_cost import REPO, start_servers

CACHE = '\n[query_cache]\nenabled = true\n[[query_cache.rules]]\nregex = "^SELECT bid, count"\nttl = 30.0\n'


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--transactions", type=int, default=2000, help="per side (4 clients)")
    args = parser.parse_args()
    per_client = max(1, args.transactions // 4)
    with tempfile.TemporaryDirectory(prefix="query-cache-callgrind-") as tmp, ExitStack() as stack:
        work = Path(tmp)
        os.chmod(work, 0o711)
        pg, mariadb = start_servers(work, stack, scale=1)
        per_tx: dict[str, float] = {}
        for side in ("off", "on"):
            folder = work / side
            with proxy_under_callgrind(folder, pg, mariadb, None, REPO, config=CACHE if side == "on" else "") as ports:
                pgbench_count(ports["postgresql"], "simple", per_client)  # warm: pools filled, caches made
                done: list[int] = []
                count = instructions(ports["pid"], folder, lambda ports=ports, done=done: done.append(
                    pgbench_count(ports["postgresql"], "simple", per_client)))
                per_tx[side] = count / done[0]
                print(f"{side}: {count:,} instructions for {done[0]} transactions", file=sys.stderr, flush=True)
        print("| pgbench -S -M simple (4 clients), nothing cached | cache off: instructions/tx | cache on: "
              "instructions/tx | on/off |")
        print("|---|---|---|---|")
        print(f"| proxy | {per_tx['off']:,.0f} | {per_tx['on']:,.0f} | {per_tx['on'] / per_tx['off']:.3f} |")


if __name__ == "__main__":
    main()
