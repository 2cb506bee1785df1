"""One command that benchmarks the proxy against direct connections and PgBouncer, side by side, and reports.

Usage::

    python -m loadtest.bench [--quick] [--duration SECONDS] [--only REGEX] [--pool-size N]
                             [--idle-probe COUNTS] [--no-write] [--keep-workdir] [--list]

What it does, all on 127.0.0.1 and all bounded in time:

1. Starts its own throwaway PostgreSQL 15 and MariaDB (``devtools.servers``, in a temporary directory, on free
   ports; ``max_connections`` 1,100 so 1,000 direct clients fit), PgBouncer (transaction mode,
   ``default_pool_size`` = ``--pool-size``, SCRAM auth) and the proxy (``python -m proxy run``, transaction
   pooling, ``max_connections`` = ``--pool-size``). All of them are stopped at the end, on errors and on
   Ctrl-C / SIGTERM. The machine's own services on 5432/3306 are never touched.
2. Creates the data: ``pgbench -i`` (scale 10) and ``sysbench prepare`` (4 tables x 10,000 rows).
3. Runs every scenario against each target in turn (direct, PgBouncer, proxy):

   - ``pgbench -S -M simple -c 1`` (the per-query latency the proxy adds);
   - ``pgbench -S`` in ``-M simple``, ``-M extended`` and ``-M prepared`` at 10, 100 and 1,000 clients (``-j 2``);
   - ``pgbench -S -C -c 10`` (a new connection per transaction);
   - sysbench ``oltp_point_select``, ``oltp_read_only``, ``oltp_read_write`` at 10, 100 and 1,000 threads against
     MariaDB (``--db-ps-mode=disable`` for every target); the proxy column reads "n/a (no MySQL listener yet)"
     until ``proxy.config.Config`` has a ``mysql`` section;
   - a 1 GB ``COPY ... TO STDOUT`` through psql.

   Failures (``-M prepared`` through a transaction pooler, for instance) are recorded as "failed: <reason>"
   with the tool's own error text, never hidden.
   For every scenario the middleman's (PgBouncer's, the proxy's: all its processes) user and system CPU time
   is read from /proc (psutil) and divided by the transactions done: CPU microseconds per transaction, the
   headline figure (for pgbench over the steady part of the run, the clients' logins left out).
4. With ``--compare-workers``, runs the selected scenarios again against one proxy per worker count.
5. Counts system calls (:mod:`loadtest.syscalls`): ``pgbench -S -M simple -c 100`` for 20,000 transactions once
   through PgBouncer and once through the proxy, ``strace -c -f`` attached to every process of the middleman.
6. Runs the idle-connection memory probe (:mod:`loadtest.idle_probe`) with 10,000 clients.
7. Prints markdown tables (throughput, p50/p99 latency, the middleman's CPU time and peak RSS, the maximum
   number of backend connections, proxy/PgBouncer and proxy/direct ratios; CPU per transaction; system calls
   per transaction; the worker comparison) and whether the proxy ran its compiled hot path, and, unless
   ``--no-write``,
   writes PNG plots to ``docs/perf/``, regenerates ``docs/PERFORMANCE.md`` (machine, date, command, tables and the
   Targets section with each target "met" or "NOT met"), and saves raw results to ``loadtest/results/latest.json``.

Options:

``--quick``
    A smoke run (about a minute): 1-second scenarios, 4 clients/threads, small data, 200 idle clients.
    It exercises every code path of the harness; its numbers mean nothing.
``--duration SECONDS``
    Length of each pgbench/sysbench scenario (default 15; 1 with ``--quick``). pgbench gets one more second per
    100 clients, because its clock includes connecting the clients, which its tps leaves out. The full run has
    45 such scenario x target runs (54 once the proxy speaks MySQL) plus COPY and the idle probe: about
    15 minutes at the default.
``--only REGEX``
    Run only the scenarios whose name matches (``re.search``), e.g. ``--only 'pgbench -S -M simple'`` or
    ``--only 'COPY|-C'``; the idle probe runs only if ``idle`` matches too (e.g. ``--only 'idle'``).
``--pool-size N``
    Backend connections for PgBouncer and for the proxy (default 20; a proxy with several workers splits it).
``--proxy-workers N``
    The proxy's ``[server] workers`` (default: not set, so the proxy's own default of one worker per core).
    The idle probe always runs the proxy as one process (``workers = 1``): its target is per process.
``--idle-probe COUNTS``
    Comma-separated idle client counts for the memory probe (default ``10000``; ``200`` with ``--quick``);
    ``none`` skips it.
``--compare-workers COUNTS``
    Comma-separated ``[server] workers`` counts, e.g. ``1,2``: the selected scenarios (``--only``) also run
    against one proxy per count, side by side on the same data, and a "Workers" table gives throughput and CPU
    per transaction for each count next to PgBouncer's.
``--no-syscalls``
    Skip the ``strace`` step (it also runs only if ``--only`` is not given or matches ``syscalls``). Without
    strace installed the step reads "n/a" (``apt-get install strace``).
``--no-write``
    Print the tables only; do not touch ``docs/`` or ``loadtest/results/``.
``--keep-workdir``
    Keep the temporary directory (database logs, PgBouncer and proxy logs and configs) for inspection.
``--list``
    Print the scenario names (after ``--only``) and exit.

The exit status is 0 when the harness itself worked, whatever the measurements say (a benchmark is a script
that prints a table, not a test that can flake); 2 for bad options; 1 when the harness could not run.
"""

from __future__ import annotations

import argparse
import datetime
import re
import shlex
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from devtools.servers import DevServerError
from loadtest import goals, report, syscalls, workers_compare
from loadtest.idle_probe import ProbeResult, format_result, probe
from loadtest.machine import code_version, machine_facts, raise_open_files_limit
from loadtest.results import Result, save_results
from loadtest.scenarios import FULL, QUICK, SYSBENCH, Scenario, ScenarioRunner, Sizes, catalogue
from loadtest.sysbench import TABLES
from loadtest.syscalls import SyscallCount, SyscallRun
from loadtest.targets import (
    BACKEND_MAX_CONNECTIONS,
    MYSQL,
    PGBOUNCER_MAX_CLIENTS,
    PGBOUNCER_TARGET,
    POSTGRESQL,
    PROXY,
    REPO_ROOT,
    Stack,
    TargetError,
    compiled_state,
    temporary_workdir,
)

DOCS = REPO_ROOT / "docs"
IDLE_SCENARIO = "idle connections"
SYSCALL_SCENARIO = "syscalls (strace -c -f)"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m loadtest.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny durations, client counts and data")
    parser.add_argument("--duration", type=int, default=None, help="seconds per scenario (default 15, quick 1)")
    parser.add_argument("--only", default=None, metavar="REGEX", help="run only scenarios whose name matches")
    parser.add_argument("--pool-size", type=int, default=20, help="backend pool size of PgBouncer and the proxy")
    parser.add_argument("--proxy-workers", type=int, default=None, metavar="N",
                        help="proxy worker processes ([server] workers; default: the proxy's own, one per core)")
    parser.add_argument("--idle-probe", default=None, metavar="COUNTS",
                        help="idle-client counts for the memory probe (default 10000, quick 200; 'none' skips)")
    parser.add_argument("--no-syscalls", action="store_true", help="skip the strace system-call count step")
    parser.add_argument("--compare-workers", type=_worker_counts, default=None, metavar="COUNTS",
                        help="also run the selected scenarios against a proxy per [server] workers count, e.g. 1,2")
    parser.add_argument("--no-write", action="store_true", help="do not write docs/ or loadtest/results/")
    parser.add_argument("--keep-workdir", action="store_true", help="keep the temporary directory with all logs")
    parser.add_argument("--list", action="store_true", help="list the selected scenarios and exit")
    args = parser.parse_args(argv)
    if args.duration is not None and args.duration < 1:
        parser.error("--duration must be at least 1")
    if args.pool_size < 1:
        parser.error("--pool-size must be at least 1")
    if args.only is not None:
        try:
            re.compile(args.only)
        except re.error as exc:
            parser.error(f"--only: bad regular expression: {exc}")
    return args


def _worker_counts(text: str) -> list[int]:
    try:
        return workers_compare.parse_counts(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def idle_counts(args: argparse.Namespace, sizes: Sizes) -> list[int]:
    if args.idle_probe is None:
        counts = list(sizes.idle_counts)
    elif args.idle_probe.strip().lower() in ("none", "0", ""):
        counts = []
    else:
        counts = [int(c.replace("_", "")) for c in args.idle_probe.split(",") if c.strip()]
    if args.only is not None and counts and not re.search(args.only, IDLE_SCENARIO):
        counts = []
    return counts


def syscall_step(args: argparse.Namespace) -> bool:
    """The strace step runs unless --no-syscalls, or --only selects scenarios and not it."""
    return not args.no_syscalls and (args.only is None or bool(re.search(args.only, SYSCALL_SCENARIO)))


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


@dataclass
class Collected:
    """Everything one run measured."""

    results: list[Result] = field(default_factory=list)
    probes: list[ProbeResult] = field(default_factory=list)
    syscalls: list[SyscallCount] = field(default_factory=list)
    compared: list[Result] = field(default_factory=list)
    processes: int = 0
    compiled: str = "unknown"


def _say(text: str) -> None:
    print(f"[bench] {text}", file=sys.stderr, flush=True)


@dataclass
class Plan:
    """What this run measures."""

    sizes: Sizes
    duration: int
    scenarios: list[Scenario]
    counts: list[int]
    worker_counts: list[int]
    workdir: Path = Path()


def _measure(stack: Stack, args: argparse.Namespace, plan: Plan, found: Collected) -> None:
    """The scenarios, the worker comparison, the system-call counts and the idle probe, in that order."""
    runner = ScenarioRunner(stack, plan.sizes, plan.duration, plan.workdir)
    try:
        runner.prepare(plan.scenarios)
        for result in runner.run_all(plan.scenarios):
            found.results.append(result)
        if plan.worker_counts:
            found.compared = workers_compare.compare(stack, runner, plan.scenarios, plan.worker_counts)
    finally:
        runner.close()
    if syscall_step(args) and stack.postgres is not None:
        spec = SyscallRun(plan.sizes.syscall_clients, plan.sizes.syscall_transactions)
        for target in (PGBOUNCER_TARGET, PROXY):
            _say(f"system calls: {spec.label()} via {target}")
            found.syscalls.append(syscalls.count(stack.endpoint(POSTGRESQL, target), spec, plan.workdir / "strace"))
    if plan.counts and stack.proxy is not None:
        for count in plan.counts:
            _say(f"idle probe: {count} clients")
            probed = probe(stack.proxy, count, workers=1)
            _say(format_result(probed).strip())
            found.probes.append(probed)


def _collect(args: argparse.Namespace, plan: Plan, found: Collected) -> None:
    engines = {s.engine for s in plan.scenarios}
    limit = raise_open_files_limit()
    with temporary_workdir(keep=args.keep_workdir) as workdir, Stack(
        workdir, pool_size=args.pool_size,
        with_postgres=POSTGRESQL in engines or bool(plan.counts) or syscall_step(args),
        with_mariadb=MYSQL in engines,
        with_pgbouncer=POSTGRESQL in engines or syscall_step(args), proxy_workers=args.proxy_workers,
    ) as stack:
        plan.workdir = workdir
        if stack.proxy is not None:
            found.processes = stack.proxy.process_count()
            found.compiled = compiled_state(stack.proxy.code_dir)
        _say(f"open files limit {limit}; work directory {workdir}; proxy processes {found.processes}; "
             f"hot path {found.compiled}")
        _measure(stack, args, plan, found)


def run(args: argparse.Namespace) -> int:
    sizes = QUICK if args.quick else FULL
    scenarios: list[Scenario] = catalogue(sizes)
    if args.only is not None:
        scenarios = [s for s in scenarios if re.search(args.only, s.name)]
    plan = Plan(sizes, args.duration if args.duration is not None else (1 if args.quick else 15), scenarios,
                idle_counts(args, sizes), args.compare_workers or [])
    if args.list:
        for scenario in scenarios:
            print(f"{scenario.name}  [{', '.join(scenario.targets)}]")
        if syscall_step(args):
            print(f"{SYSCALL_SCENARIO}  [pgbouncer, proxy]")
        for count in plan.counts:
            print(f"{IDLE_SCENARIO} {count}  [proxy]")
        return 0
    if not scenarios and not plan.counts and not syscall_step(args):
        print("nothing to run: --only matched no scenario", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even when started in the background (SIG_IGN)
    command = "python -m loadtest.bench" + "".join(f" {shlex.quote(a)}" for a in sys.argv[1:])
    version = code_version(REPO_ROOT)  # at start: the proxy process imports the code as it is now
    started = time.monotonic()
    found = Collected()
    try:
        _collect(args, plan, found)
    except KeyboardInterrupt:
        print("\n[bench] interrupted: everything started has been stopped; partial results follow",
              file=sys.stderr)
        print(report.results_table(found.results))
        return 130
    except (TargetError, DevServerError, RuntimeError) as exc:
        print(f"[bench] cannot run: {exc}", file=sys.stderr)
        if found.results:
            print(report.results_table(found.results))
        return 1
    runtime = time.monotonic() - started
    meta = {
        "command": command, "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "runtime_min": runtime / 60, "duration": plan.duration, "pool_size": args.pool_size, "quick": args.quick,
        "backend_max_connections": BACKEND_MAX_CONNECTIONS, "pgbench_scale": sizes.pgbench_scale,
        "sysbench_tables": TABLES, "sysbench_table_size": sizes.sysbench_table_size,
        "copy_repeats": sizes.copy_repeats, "pgbouncer_max_client_conn": PGBOUNCER_MAX_CLIENTS,
        "sysbench_run": any(s.kind == SYSBENCH for s in scenarios), "code_version": version,
        "proxy_processes": found.processes, "proxy_workers_option": args.proxy_workers,
        "proxy_compiled": found.compiled, "mysql_pg_concurrency": mysql_pg_concurrency(sizes),
        "syscall_run": SyscallRun(sizes.syscall_clients, sizes.syscall_transactions).label(),
        "compare_workers": ",".join(str(c) for c in plan.worker_counts),
    }
    outcomes = goals.evaluate(found.results, found.probes)
    extra = goals.also_checked(found.results, found.probes, args.pool_size)
    print_report(found, outcomes, extra, meta)
    if not args.no_write:
        write_outputs(found, outcomes, extra, meta)
    return 0


def mysql_pg_concurrency(sizes: Sizes) -> int:
    """The client count at which MySQL and PostgreSQL CPU per query are compared: 10, or the smallest both run."""
    common = sorted(set(sizes.clients) & set(sizes.threads))
    return 10 if 10 in common or not common else common[0]


def print_report(found: Collected, outcomes: list[goals.Outcome], extra: list[goals.Outcome],
                 meta: dict[str, Any]) -> None:
    print(f"\n## Results ({meta['runtime_min']:.1f} min)\n")
    print(f"Proxy: {report.proxy_processes(meta)}; hot path {found.compiled}.\n")
    print(report.results_table(found.results))
    print("\n## Ratios\n")
    print(report.ratio_table(found.results))
    print("\n## CPU per transaction\n")
    print(report.cpu_table(found.results))
    print()
    print(report.mysql_pg_line(found.results, meta["mysql_pg_concurrency"]))
    print("\n## System calls per transaction\n")
    print(f"`{meta['syscall_run']}` under `strace -c -f`\n")
    print(report.syscall_table(found.syscalls) if found.syscalls else "Not run.")
    if found.compared:
        print("\n## Workers\n")
        print(report.workers_table(found.compared, found.results))
    if found.probes:
        print("\n## Idle client connections\n")
        print(report.idle_table(found.probes))
    print("\n## Targets\n")
    print(report.targets_section(outcomes, extra))


def write_outputs(found: Collected, outcomes: list[goals.Outcome], extra: list[goals.Outcome],
                  meta: dict[str, Any]) -> None:
    facts = machine_facts()
    meta["pgbouncer_version"] = facts.get("PgBouncer", "")
    try:
        plots = report.write_plots(found.results, found.probes, DOCS / "perf")
    except ImportError as exc:
        print(f"[bench] no plots: {exc} (pip install matplotlib, or the project's 'bench' extra)", file=sys.stderr)
        plots = []
    text = report.performance_markdown(results=found.results, probes=found.probes, outcomes=outcomes,
                                       extra_outcomes=extra, facts=facts, meta=meta, plots=plots, docs_dir=DOCS,
                                       syscalls=found.syscalls, compared=found.compared)
    report.write_document(DOCS / "PERFORMANCE.md", text)
    save_results(REPO_ROOT / "loadtest" / "results" / "latest.json", found.results,
                 {**meta, "probes": [vars(p) for p in found.probes], "machine": facts,
                  "syscalls": [vars(c) for c in found.syscalls],
                  "workers_compared": [asdict(r) for r in found.compared]})
    print(f"\n[bench] wrote {DOCS / 'PERFORMANCE.md'} and {len(plots)} plot(s) in {DOCS / 'perf'}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    return run(parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
