"""Serverless-style traffic: bursts of short invocations (connect, log in, 1-3 queries, close) direct and proxied.

    python -m loadtest.serverless                      # the default scenario on a throwaway stack
    python -m loadtest.serverless --engine postgresql --profile steady --rate 300 --duration 20 \\
        --direct db.internal:5432 --proxy dbproxy.internal:6432 --user app --password-env PGPASSWORD
    python -m loadtest.serverless --engine mysql --proxy 10.0.0.5:6033 --user app --tls \\
        --token-command 'dbproxy token generate --sub app -c dbproxy.toml'

With no target given it starts its own: PostgreSQL and MariaDB with max_connections 50, PgBouncer (PostgreSQL)
and the proxy, both with a pool of 20 backend connections, and runs the profile against the database directly,
through PgBouncer and through the proxy, one target after the other. Given targets, it runs against those only.
Each invocation opens its own connection, logs in with the password (or a token the token command prints,
rerun every --token-ttl seconds), runs one to three queries (the first `SELECT $1 + 1`, the others a sleep of
--query-ms on the server) and closes. While it runs a live table shows each target's progress; at the end the
report (report.md, one PNG per engine and profile) goes to --out.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import os
import pwd
import random
import shlex
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.live import Live
from rich.table import Table

from devtools.servers import PG_OS_USER, MariaDBInstance, PostgresInstance, start_mariadb, start_postgres
from loadtest.machine import code_version, machine_facts, raise_open_files_limit
from loadtest.serverless_client import (
    ENGINES,
    MYSQL,
    POSTGRESQL,
    Address,
    BackendSampler,
    Outcome,
    cache_client_key_derivation,
    invoke,
)
from loadtest.serverless_profiles import PROFILES, Shape, arrivals
from loadtest.serverless_report import Run, markdown, plot, table
from loadtest.targets import BENCH_PASSWORD, BENCH_USER, REPO_ROOT, PgBouncer, ProxyProcess, temporary_workdir

DEFAULT_OUT = Path("docs/serverless")
DATABASE_MAX_CONNECTIONS = 50
POOL_SIZE = 20
SAMPLE_INTERVAL = 0.05  # seconds between two counts of the backend sessions
DEFAULT_PORTS = {POSTGRESQL: 5432, MYSQL: 3306}


class Credentials:
    """The password every invocation sends: a fixed one, or a token from a command, rerun when it is old."""

    def __init__(self, password: str, token_command: str = "", token_ttl: float = 300.0) -> None:
        self.password = password
        self.token_command = token_command
        self.token_ttl = token_ttl
        self.fetched = -1e9
        self.lock = asyncio.Lock()

    async def get(self) -> str:
        if not self.token_command or time.monotonic() - self.fetched < self.token_ttl:
            return self.password
        async with self.lock:
            if time.monotonic() - self.fetched >= self.token_ttl:
                proc = await asyncio.create_subprocess_shell(self.token_command, stdout=asyncio.subprocess.PIPE)
                out, _ = await proc.communicate()
                if proc.returncode != 0 or not out.strip():
                    raise RuntimeError(f"token command exited with {proc.returncode} and printed no token")
                self.password, self.fetched = out.decode().strip(), time.monotonic()
        return self.password


@dataclass
class Progress:
    """What the live display shows about the run in progress, and the runs done."""

    label: str = ""
    planned: int = 0
    launched: int = 0
    in_flight: int = 0
    done: int = 0
    served: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    samples: list[tuple[float, int]] = field(default_factory=list)  # the run in progress's session counts
    started: float = 0.0
    finished: list[Run] = field(default_factory=list)

    def render(self) -> Table:
        grid = Table(title="serverless invocations", expand=False)
        for column in ("run", "planned", "started", "in flight", "served", "failed", "backends", "seconds",
                       "errors"):
            grid.add_column(column)
        for run in self.finished:
            failed = [o for o in run.outcomes if not o.ok]
            grid.add_row(f"{run.engine}/{run.profile}/{run.target}", str(len(run.outcomes)), str(len(run.outcomes)),
                         "0", str(len(run.outcomes) - len(failed)), str(len(failed)),
                         str(max((n for _, n in run.backends), default="-")), f"{run.wall:.1f}",
                         ", ".join(f"{k}: {v}" for k, v in Counter(o.error for o in failed).most_common(2)))
        if self.label:
            grid.add_row(f"[bold]{self.label}", str(self.planned), str(self.launched), str(self.in_flight),
                         str(self.served), str(self.done - self.served),
                         str(self.samples[-1][1]) if self.samples else "-",
                         f"{time.monotonic() - self.started:.1f}",
                         ", ".join(f"{k}: {v}" for k, v in self.errors.most_common(2)))
        return grid


@dataclass(frozen=True)
class Scenario:
    profile: str
    shape: Shape
    max_concurrency: int
    timeout: float  # seconds an invocation may take to connect, or to run one query
    query_seconds: float
    seed: int = 7


async def run_scenario(engine: str, target: str, address: Address, credentials: Credentials,
                       sampler: BackendSampler | None, scenario: Scenario, progress: Progress) -> Run:
    """Start every invocation of the profile on time (at most max_concurrency at once) and wait for them."""
    offsets = arrivals(scenario.profile, scenario.shape)
    rng = random.Random(scenario.seed)
    gate = asyncio.Semaphore(scenario.max_concurrency)
    began = time.monotonic()

    def clock() -> float:
        return time.monotonic() - began

    progress.label, progress.planned = f"{engine}/{scenario.profile}/{target}", len(offsets)
    progress.launched = progress.in_flight = progress.done = progress.served = 0
    progress.errors = Counter()
    progress.started = time.monotonic()
    backends: list[tuple[float, int]] = []
    progress.samples = backends
    if sampler is not None:
        sampler.start(address.user, SAMPLE_INTERVAL, backends, clock)

    async def one(offset: float) -> Outcome:
        async with gate:
            progress.launched += 1
            progress.in_flight += 1
            try:
                password = await credentials.get()
                outcome = await invoke(address, password, random.Random(rng.random()), scenario.query_seconds,
                                       scenario.timeout, clock(), clock)
            finally:
                progress.in_flight -= 1
            progress.done += 1
            progress.served += outcome.ok
            if outcome.error:
                progress.errors[outcome.error] += 1
            return outcome

    tasks: list[asyncio.Task[Outcome]] = []
    for offset in offsets:
        delay = offset - clock()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(offset)))
    deadline = scenario.shape.duration + 4 * scenario.timeout
    _, pending = await asyncio.wait(tasks, timeout=deadline) if tasks else (set(), set())
    for task in pending:
        task.cancel()
    outcomes = [await t for t in tasks]
    wall = clock()
    await asyncio.sleep(4 * SAMPLE_INTERVAL)  # the sessions closing after the last invocation
    if sampler is not None:
        sampler.stop()
    return Run(engine, scenario.profile, target, outcomes, backends, wall)


# --- targets -------------------------------------------------------------------------------------------------


@dataclass
class Target:
    """A place to send invocations: its address, how its backend sessions are counted, what bounds them."""

    name: str
    address: Address
    sampler: BackendSampler | None
    limit: str = ""


class OwnStack:
    """Throwaway databases (max_connections low), PgBouncer and the proxy, each started only for its own run."""

    def __init__(self, workdir: Path, max_connections: int, pool_size: int) -> None:
        self.workdir = workdir
        self.max_connections = max_connections
        self.pool_size = pool_size
        self.postgres: PostgresInstance | None = None
        self.mariadb: MariaDBInstance | None = None
        self.stack = contextlib.ExitStack()

    def start(self, engines: list[str]) -> None:
        os.chmod(self.workdir, 0o711)  # the postgres OS account (PostgreSQL, PgBouncer) must traverse it
        users = {BENCH_USER: BENCH_PASSWORD}
        limit = str(self.max_connections)
        if POSTGRESQL in engines:
            self.postgres = start_postgres(self.workdir / "pg", users=users, settings={"max_connections": limit})
            self.stack.callback(self.postgres.stop)
        if MYSQL in engines:
            self.mariadb = start_mariadb(self.workdir / "mariadb", users=users, settings={"max_connections": limit})
            self.stack.callback(self.mariadb.stop)

    def close(self) -> None:
        self.stack.close()

    def setup(self) -> list[str]:
        return [f"- Databases: throwaway PostgreSQL and MariaDB with `max_connections = {self.max_connections}`, "
                f"the invocations' user `{BENCH_USER}` logging in with a password (PostgreSQL SCRAM-SHA-256, "
                "MariaDB mysql_native_password); the session counts come from a superuser connection opened "
                "before the load (it uses a reserved slot).",
                f"- PgBouncer: transaction pooling, `default_pool_size = {self.pool_size}`, "
                "`listen_backlog = 4096` (as the proxy's), SCRAM-SHA-256 with the user's SCRAM secret in its "
                "userlist (no key derived per login; the server login made with the client's proof).",
                f"- dbproxy: transaction pooling, `max_connections = {self.pool_size}` per engine, one worker per "
                "core, the same SCRAM-SHA-256 / mysql_native_password logins (the SCRAM key derived once per "
                "worker).",
                "- Clients: one asyncio process (asyncpg, aiomysql) on the same two-core machine as the servers; "
                "every invocation opens its own TCP connection and logs in. The client's SCRAM key (PBKDF2) is "
                "derived once per salt, as if each function had its own CPU for it (`--derive-every-key` "
                "derives it at every login, in this one process).",
                f"- Backend sessions: counted every {SAMPLE_INTERVAL * 1000:.0f} ms from a thread of the harness "
                "(pg_stat_activity, information_schema.processlist); less often while the harness's CPU is busy."]

    def _sampler(self, engine: str) -> BackendSampler:
        if engine == POSTGRESQL:
            assert self.postgres is not None
            return BackendSampler(Address(engine, "127.0.0.1", self.postgres.port, "postgres", "postgres"),
                                  "postgres")
        assert self.mariadb is not None
        return BackendSampler(Address(engine, "127.0.0.1", self.mariadb.port, "root", "mysql"), "root")

    def _address(self, engine: str, port: int) -> Address:
        return Address(engine, "127.0.0.1", port, BENCH_USER, BENCH_USER)

    def targets(self, engine: str) -> list[str]:
        return ["direct", "pgbouncer", "proxy"] if engine == POSTGRESQL else ["direct", "proxy"]

    @contextlib.contextmanager
    def target(self, engine: str, name: str) -> Iterator[Target]:
        database = self.postgres if engine == POSTGRESQL else self.mariadb
        assert database is not None
        if name == "direct":
            yield Target(name, self._address(engine, database.port), self._sampler(engine),
                         f"max_connections {self.max_connections}")
        elif name == "pgbouncer":
            assert self.postgres is not None
            bouncer = _WideBacklogBouncer(self.workdir / "pgbouncer", self.postgres, self.pool_size)
            try:
                bouncer.start()
                yield Target(name, self._address(engine, bouncer.port), self._sampler(engine),
                             f"pool {self.pool_size}")
            finally:
                bouncer.stop()
        else:
            proxy = ProxyProcess(self.workdir / f"proxy-{engine}", self.postgres if engine == POSTGRESQL else None,
                                 self.mariadb if engine == MYSQL else None, self.pool_size)
            try:
                proxy.start()
                yield Target(name, self._address(engine, proxy.ports[engine]), self._sampler(engine),
                             f"pool {self.pool_size}")
            finally:
                proxy.stop()


class _WideBacklogBouncer(PgBouncer):
    """PgBouncer at its best for logins: the proxy's listen backlog (neither drops a spike's connects at the SYN),
    and the user's SCRAM secret from pg_authid in its userlist, so it derives no key per login (with a plaintext
    password it would, at every login) and logs in to the server with the client's proof."""

    USERLIST = "userlist-scram.txt"

    def config_text(self) -> str:
        return super().config_text().replace("userlist.txt", self.USERLIST) + "listen_backlog = 4096\n"

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        secret = self.backend.psql_local(f"SELECT rolpassword FROM pg_authid WHERE rolname = '{BENCH_USER}'")
        userlist = self.workdir / self.USERLIST
        userlist.write_text(f'"{BENCH_USER}" "{secret}"\n')
        if os.geteuid() == 0:
            account = pwd.getpwnam(PG_OS_USER)
            os.chown(userlist, account.pw_uid, account.pw_gid)
        super().start()


def _host_port(text: str, engine: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return (host, int(port)) if host else (text, DEFAULT_PORTS[engine])


class GivenTargets:
    """Targets the user named on the command line; sessions are counted on --direct when it is given."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args

    def setup(self) -> list[str]:
        a = self.args
        given = ", ".join(f"{name} `{getattr(a, name)}`" for name in ("direct", "pgbouncer", "proxy")
                          if getattr(a, name))
        auth = "a token from `--token-command`" if a.token_command else "a password"
        return [f"- Targets given on the command line: {given}; user `{a.user}` with {auth}"
                f"{' over TLS' if a.tls else ''}."]

    def targets(self, engine: str) -> list[str]:
        return [name for name in ("direct", "pgbouncer", "proxy") if getattr(self.args, name)]

    @contextlib.contextmanager
    def target(self, engine: str, name: str) -> Iterator[Target]:
        a = self.args
        host, port = _host_port(getattr(a, name), engine)
        address = Address(engine, host, port, a.user, a.database or a.user, a.tls)
        sampler = None
        if a.direct:
            db_host, db_port = _host_port(a.direct, engine)
            sampler = BackendSampler(Address(engine, db_host, db_port, a.monitor_user or a.user,
                                             a.database or a.user, a.tls),
                                     a.monitor_password if a.monitor_user else _static_password(a))
        yield Target(name, address, sampler, "")


def _static_password(args: argparse.Namespace) -> str:
    if args.password_env:
        return os.environ.get(args.password_env, "")
    return str(args.password or "")


# --- the command -------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engine", choices=[*ENGINES, "both"], default="both")
    parser.add_argument("--profile", choices=[*PROFILES, "all"], default="spike")
    parser.add_argument("--invocations", type=int, default=1000, help="invocations in all (default 1000)")
    parser.add_argument("--rate", type=float, default=200.0, help="per second: steady, sawtooth peak")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of arrivals (not for spike)")
    parser.add_argument("--period", type=float, default=2.0, help="seconds: a sawtooth ramp, between waves")
    parser.add_argument("--waves", type=int, default=4, help="cold-start waves")
    parser.add_argument("--max-concurrency", type=int, default=1000, help="invocations running at once at most")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each target, in turn (default 3)")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds to connect, or for one query")
    parser.add_argument("--query-ms", type=float, default=5.0, help="server-side sleep of queries 2 and 3")
    parser.add_argument("--direct", metavar="HOST:PORT", help="the database itself (also where sessions are counted)")
    parser.add_argument("--proxy", metavar="HOST:PORT", help="dbproxy")
    parser.add_argument("--pgbouncer", metavar="HOST:PORT", help="PgBouncer")
    parser.add_argument("--user", default=BENCH_USER)
    parser.add_argument("--password")
    parser.add_argument("--password-env", metavar="VAR", help="read the password from this environment variable")
    parser.add_argument("--token-command", default="", help="a shell command printing a login token")
    parser.add_argument("--token-ttl", type=float, default=300.0, help="seconds a token is reused")
    parser.add_argument("--database", help="default: the user's name")
    parser.add_argument("--tls", action="store_true", help="connect with TLS (tokens need it)")
    parser.add_argument("--monitor-user", help="counts sessions on --direct (default: --user)")
    parser.add_argument("--monitor-password", default="")
    parser.add_argument("--max-connections", type=int, default=DATABASE_MAX_CONNECTIONS,
                        help="own stack: the databases' max_connections")
    parser.add_argument("--pool-size", type=int, default=POOL_SIZE, help="own stack: PgBouncer's and the proxy's")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="report folder (default docs/serverless)")
    parser.add_argument("--no-live", action="store_true", help="no live display (a line per run instead)")
    parser.add_argument("--derive-every-key", action="store_true",
                        help="run the client's SCRAM key derivation at every login (default: once per salt)")
    args = parser.parse_args(argv)
    if args.engine == "both" and (args.direct or args.proxy or args.pgbouncer):
        parser.error("with targets given, name one --engine")
    if args.token_command and not args.tls:
        parser.error("--token-command needs --tls (tokens are accepted over TLS only)")
    return args


async def _run_target(engine: str, target: Target, credentials: Credentials, scenario: Scenario,
                      progress: Progress) -> Run:
    if target.sampler is not None:
        try:
            await asyncio.to_thread(target.sampler.open)
        except Exception as exc:
            print(f"[serverless] cannot count backend sessions: {exc}", file=sys.stderr)
            target.sampler = None
    try:
        run = await run_scenario(engine, target.name, target.address, credentials, target.sampler, scenario,
                                 progress)
    finally:
        if target.sampler is not None:
            target.sampler.close()
    run.limit = target.limit
    return run


async def run_all(args: argparse.Namespace, source: OwnStack | GivenTargets, console: Console) -> list[Run]:
    engines = list(ENGINES) if args.engine == "both" else [args.engine]
    profiles = list(PROFILES) if args.profile == "all" else [args.profile]
    shape = Shape(invocations=args.invocations, rate=args.rate, duration=args.duration, period=args.period,
                  waves=args.waves)
    password = BENCH_PASSWORD if isinstance(source, OwnStack) else _static_password(args)
    credentials = Credentials(password, args.token_command, args.token_ttl)
    progress = Progress()
    live = None if args.no_live else Live(progress.render(), console=console, refresh_per_second=4)
    with live or contextlib.nullcontext():
        refresher = asyncio.create_task(_refresh(live, progress)) if live else None
        for engine in engines:
            for profile, round_ in itertools.product(profiles, range(1, args.rounds + 1)):
                scenario = Scenario(profile, shape, args.max_concurrency, args.timeout, args.query_ms / 1000.0)
                names = source.targets(engine)
                shift = (round_ - 1) % len(names)
                for name in names[shift:] + names[:shift]:  # each target goes first in some round
                    with source.target(engine, name) as target:
                        run = await _run_target(engine, target, credentials, scenario, progress)
                    run.round = round_
                    progress.finished.append(run)
                    progress.label = ""
                    if live is None:
                        console.print(table([run])[-1])
                    await asyncio.sleep(1.0)  # sessions of the last run end on the server
        if live is not None and refresher is not None:
            refresher.cancel()
            live.update(progress.render())
    return progress.finished


async def _refresh(live: Live | None, progress: Progress) -> None:
    while live is not None:
        live.update(progress.render())
        await asyncio.sleep(0.25)


def write_report(runs: list[Run], out: Path, setup: list[str], command: str) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    plots = plot(runs, out)
    report = out / "report.md"
    report.write_text(markdown(runs, plots, setup, command))
    return report


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    raise_open_files_limit()
    if not args.derive_every_key:
        cache_client_key_derivation()
    console = Console(stderr=True, width=None if sys.stderr.isatty() else 150)
    command = shlex.join(["python", "-m", "loadtest.serverless", *(sys.argv[1:] if argv is None else argv)])
    own = not (args.direct or args.proxy or args.pgbouncer)
    load_at_start = os.getloadavg()
    with temporary_workdir() as workdir:
        source: OwnStack | GivenTargets
        if own:
            stack = OwnStack(workdir, args.max_connections, args.pool_size)
            console.print(f"[serverless] starting the databases (max_connections {args.max_connections})")
            stack.start(list(ENGINES) if args.engine == "both" else [args.engine])
            source = stack
        else:
            source = GivenTargets(args)
        try:
            runs = asyncio.run(run_all(args, source, console))
        finally:
            if isinstance(source, OwnStack):
                source.close()
    facts = machine_facts()
    machine = ", ".join(f"{k} {facts[k]}" for k in ("CPU", "PostgreSQL", "MariaDB", "PgBouncer") if k in facts)
    load = ", ".join(f"{v:.1f}" for v in load_at_start)
    setup = [*source.setup(), f"- Machine: {machine}; load average {load} at the start (the machine is shared); "
             f"{code_version(REPO_ROOT)}.", f"- Each target ran {args.rounds} time(s), in turn; an invocation "
             f"that could not connect, or run a query, within {args.timeout:g} s counts as a timeout."]
    report = write_report(runs, args.out, setup, command)
    print(report.read_text())
    print(f"report: {report}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
