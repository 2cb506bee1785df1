"""Long protocol fuzz run: `python -m loadtest.fuzz --minutes N` against a proxy in front of throwaway servers.

Starts its own PostgreSQL and MariaDB (devtools/servers.py) and a proxy subprocess with small pools, runs a
checked bystander client per protocol, sends fuzz connections (pre-login packets and, after a valid login,
mutated protocol messages, pipelined) concurrently for N minutes or until the packet target is reached, then
reports packets sent, proxy crashes, tracebacks by kind, bystander errors and stalls, and RSS at the start,
after a warm-up (the first 10% of the packet target or of the time) and at the end, with the growth over both.
Loopback only; bounded in time and count; stops everything it started.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import subprocess
import sys
import tempfile
import time
from collections import Counter, deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from devtools.servers import free_port, start_mariadb, start_postgres
from loadtest.fuzzclient import (
    STALL_SECONDS,
    Bystander,
    LogWatcher,
    Outcome,
    mysql_bystander,
    pg_bystander,
    run_case,
    tracebacks_by_kind,
    tree_rss,
)
from loadtest.fuzzgen import Case, preauth_case, session_case

PROTOCOLS = ("postgresql", "mysql")
SECRETS = {"app": "app-secret"}
READY = "dbproxy ready:"


def proxy_config(folder: Path, pg_port: int | None, mysql_port: int | None, pool_size: int = 3) -> Path:
    """Write a proxy config (small pools, short login timeout) and its secrets file; returns the config path."""
    (folder / "secrets.toml").write_text("[users]\n" + "".join(f'{u} = "{p}"\n' for u, p in SECRETS.items()))
    lines = ["[server]", 'log_level = "info"', "client_login_timeout = 3.0", "workers = 1", "",
             "[secrets]", 'file = "secrets.toml"', "",
             # the fuzzed logins' wrong credentials come from the bystanders' address: no lockout of them
             "[auth]", "failed_login_limit = 0", ""]
    if pg_port is not None:
        lines += ["[postgresql]", f"port = {free_port()}", f"backend_port = {pg_port}", "",
                  "[postgresql.pool]", f"max_connections = {pool_size}", "connection_borrow_timeout = 30.0", ""]
    else:
        lines += ["[postgresql]", "enabled = false", ""]
    if mysql_port is not None:
        lines += ["[mysql]", "enabled = true", f"port = {free_port()}", f"backend_port = {mysql_port}", "",
                  "[mysql.pool]", f"max_connections = {pool_size}", "connection_borrow_timeout = 30.0", ""]
    path = folder / "proxy.toml"
    path.write_text("\n".join(lines))
    return path


# PostgreSQL: "server process (PID n) was terminated by signal 11"; MariaDB: "mysqld got signal 11".
DB_CRASH_MARKS = ("was terminated by signal", "was terminated by exception", "got signal")


def server_crashes(server: Any) -> int:
    """Server processes that crashed (from the database server's own log): their fault, not the proxy's."""
    try:
        text = Path(server.log_file).read_text(errors="replace")
    except OSError:
        return 0
    return sum(text.count(mark) for mark in DB_CRASH_MARKS)


class Proxy:
    """The proxy under test as a subprocess; its log goes to a file."""

    def __init__(self, config: Path, log: Path) -> None:
        self.config, self.log = config, log
        self.process: subprocess.Popen[str] | None = None
        self.ports: dict[str, int] = {}

    def start(self) -> None:
        import re
        self.process = subprocess.Popen([sys.executable, "-m", "proxy", "run", "-c", str(self.config)],
                                        stdout=subprocess.PIPE, stderr=self.log.open("a"), text=True)
        assert self.process.stdout is not None
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            line = self.process.stdout.readline()
            if not line:
                break
            if line.startswith(READY):
                self.ports = {k: int(v) for k, v in re.findall(r"(\w+) port (\d+)", line)}
                return
        self.stop()
        raise RuntimeError(f"proxy did not start; see {self.log}")

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@dataclass
class ProtocolStats:
    """Figures for one protocol."""

    packets: int = 0  # fuzz packets written (pre-login and post-login)
    preauth_packets: int = 0
    session_packets: int = 0
    mutated: int = 0
    connections: int = 0
    answered: int = 0  # sessions whose sentinel query came back after the fuzz
    closed_by_proxy: int = 0
    login_failures: Counter[str] = field(default_factory=Counter)
    case_errors: Counter[str] = field(default_factory=Counter)  # unexpected exceptions in the fuzz client

    def add(self, case: Case, outcome: Outcome) -> None:
        self.connections += 1
        self.packets += outcome.sent
        if case.stage == "session":
            self.session_packets += outcome.sent
        else:
            self.preauth_packets += outcome.sent
        self.mutated += case.mutated if outcome.sent else 0
        self.answered += outcome.answered
        self.closed_by_proxy += outcome.closed_by_proxy
        if outcome.login_error:
            self.login_failures[outcome.login_error[:160]] += 1


class Run:
    """One fuzz run: the workers per protocol, sharing a deadline and a packet target."""

    def __init__(self, ports: dict[str, int], deadline: float, target: int, seed: int, units: int,
                 mutation_rate: float) -> None:
        self.ports, self.deadline, self.target = ports, deadline, target
        self.seed, self.units, self.mutation_rate = seed, units, mutation_rate
        self.stats = {protocol: ProtocolStats() for protocol in ports}
        self.recent: dict[str, deque[tuple[float, float, Case]]] = {p: deque(maxlen=5000) for p in ports}

    def _more(self, protocol: str) -> bool:
        return time.monotonic() < self.deadline and self.stats[protocol].packets < self.target

    async def worker(self, protocol: str, index: int, session: bool) -> None:
        rng = random.Random(f"{self.seed}/{protocol}/{index}/{session}")
        stats = self.stats[protocol]
        while self._more(protocol):
            if session:
                case = session_case(protocol, rng, self.units, self.mutation_rate)
            else:
                case = preauth_case(protocol, rng)
            began = time.monotonic()
            try:
                # most read the answers; the rest leave as soon as their bytes are out (mid-stream departures)
                linger = rng.random() < 0.7
                outcome = await asyncio.wait_for(
                    run_case(case, self.ports[protocol], idle=0.1, total=1.0, linger=linger), 15)
            except (ConnectionRefusedError, ConnectionResetError):
                await asyncio.sleep(0.2)  # the listener is gone or busy: the monitor tells which
                continue
            except Exception as exc:  # a fuzz-client defect or a hang: count it, keep going
                stats.case_errors[f"{type(exc).__name__}: {exc}"[:160]] += 1
                continue
            stats.add(case, outcome)
            self.recent[protocol].append((began, time.monotonic(), case))

    def dump_suspects(self, protocol: str, why: str, folder: Path, seconds: float = 3.0) -> Path:
        """Write the cases of `protocol` that ran in the last `seconds` (candidates for what hurt a bystander)."""
        now = time.monotonic()
        folder.mkdir(exist_ok=True)
        path = folder / f"{protocol}-{len(list(folder.glob(protocol + '-*')))}.txt"
        with path.open("w") as out:
            out.write(f"# {why}\n")
            for began, ended, case in self.recent[protocol]:
                if ended >= now - seconds:
                    out.write(f"{began - now:+.3f}s..{ended - now:+.3f}s {case.describe()}\n")
        return path


def _print_progress(run: Run, started: float) -> None:
    elapsed = time.monotonic() - started
    parts = [f"{p}: {s.packets:,} packets ({s.packets / max(elapsed, 1e-9):,.0f}/s), {s.connections:,} conns"
             for p, s in run.stats.items()]
    print(f"[{elapsed:6.0f}s] " + "; ".join(parts), flush=True)


async def fuzz(ports: dict[str, int], proxy: Proxy, args: argparse.Namespace, log: LogWatcher,
               bystanders: list[Bystander]) -> dict[str, Any]:
    started = time.monotonic()
    run = Run(ports, started + args.minutes * 60, args.packets, args.seed, args.units, args.mutation_rate)
    tasks = []
    for protocol in ports:
        tasks += [asyncio.create_task(run.worker(protocol, i, True)) for i in range(args.session_workers)]
        tasks += [asyncio.create_task(run.worker(protocol, i, False)) for i in range(args.preauth_workers)]
    crashes = 0
    tracebacks: Counter[str] = Counter()
    warm: dict[str, Any] = {}  # RSS once the warm-up is over (see _warmed_up), and when that was
    next_print = started + 15
    seen_errors = {b.report.name: 0 for b in bystanders}
    stuck = {b.report.name: False for b in bystanders}
    dumps = 0
    while not all(task.done() for task in tasks):
        await asyncio.sleep(0.5)
        for bystander in bystanders:
            name = bystander.report.name
            errors = bystander.report.errors
            in_flight = bystander.in_flight_since
            stuck_now = in_flight is not None and time.monotonic() - in_flight > STALL_SECONDS
            why = ""
            if len(errors) > seen_errors[name]:
                why = errors[-1]
            elif stuck_now and not stuck[name]:
                why = f"bystander query in flight for over {STALL_SECONDS} s"
            seen_errors[name], stuck[name] = len(errors), stuck_now
            if why and dumps < 20 and name in run.recent:
                dumps += 1
                path = run.dump_suspects(name, why, args.workdir / "suspects")
                print(f"{name} bystander: {why[:200]} (recent cases in {path})", flush=True)
        tracebacks += tracebacks_by_kind(log.new_text())
        if not warm and _warmed_up(run, started, args.warm_up) and proxy.process is not None:
            warm = {"rss": tree_rss(proxy.process.pid), "seconds": round(time.monotonic() - started, 1),
                    "packets": {p: s.packets for p, s in run.stats.items()}}
        if not proxy.alive:
            crashes += 1
            print(f"proxy died (exit {proxy.process.returncode if proxy.process else '?'}); restarting", flush=True)
            tracebacks += tracebacks_by_kind(log.new_text())
            proxy.start()  # same ports: the workers and bystanders reconnect
        if time.monotonic() >= next_print:
            _print_progress(run, started)
            next_print += 15
    await asyncio.gather(*tasks, return_exceptions=True)
    _print_progress(run, started)
    return {"seconds": round(time.monotonic() - started, 1), "crashes": crashes, "tracebacks": tracebacks,
            "warm": warm, "stats": run.stats}


def _warmed_up(run: Run, started: float, share: float) -> bool:
    """The warm-up is over once every protocol has sent `share` of its packet target, or `share` of the time
    has passed (whichever comes first): pools, caches and the allocator have reached their working size."""
    if time.monotonic() - started >= share * (run.deadline - started):
        return True
    return all(s.packets >= share * run.target for s in run.stats.values())


def _growth(before: int, after: int) -> float | None:
    return round(100 * (after - before) / before, 1) if before and after else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.fuzz", description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, required=True, help="stop after this long (per run)")
    parser.add_argument("--protocols", default="postgresql,mysql", help="comma-separated: postgresql,mysql")
    parser.add_argument("--packets", type=int, default=1_000_000, help="stop a protocol once this many were sent")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--session-workers", type=int, default=2,
                        help="concurrent logged-in fuzz clients per protocol (keep below the pool size)")
    parser.add_argument("--preauth-workers", type=int, default=6, help="concurrent pre-login fuzz clients")
    parser.add_argument("--units", type=int, default=40, help="exchanges per logged-in fuzz connection")
    parser.add_argument("--mutation-rate", type=float, default=0.02, help="share of messages mutated")
    parser.add_argument("--pool-size", type=int, default=3)
    parser.add_argument("--warm-up", type=float, default=0.1,
                        help="share of the packet target (or of the time) after which RSS is read again")
    parser.add_argument("--workdir", type=Path, default=None, help="keep servers' and proxy's files here")
    parser.add_argument("--json", type=Path, default=None, help="also write the report here")
    args = parser.parse_args(argv)
    protocols = [p.strip() for p in args.protocols.split(",") if p.strip()]
    if not protocols or any(p not in PROTOCOLS for p in protocols):
        parser.error(f"--protocols takes {', '.join(PROTOCOLS)}")
    args.seed = args.seed if args.seed is not None else random.getrandbits(32)
    workdir = args.workdir = args.workdir or Path(tempfile.mkdtemp(prefix="dbproxy-fuzz-"))
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"fuzz seed {args.seed}; files in {workdir}", flush=True)

    servers: list[Any] = []
    bystanders: list[Bystander] = []
    controls: list[Bystander] = []
    proxy: Proxy | None = None
    try:
        pg_server = mariadb = None
        if "postgresql" in protocols:
            pg_server = start_postgres(workdir / "pg", users=SECRETS, auth="scram-sha-256")
            servers.append(pg_server)
        if "mysql" in protocols:
            mariadb = start_mariadb(workdir / "mariadb", users=SECRETS)
            servers.append(mariadb)
        config = proxy_config(workdir, pg_server.port if pg_server else None, mariadb.port if mariadb else None,
                              args.pool_size)
        proxy = Proxy(config, workdir / "proxy.log")
        proxy.start()
        log = LogWatcher(proxy.log)
        ports = {p: proxy.ports[p] for p in protocols}
        for protocol in protocols:  # through the proxy, and a control straight to the database
            maker = pg_bystander if protocol == "postgresql" else mysql_bystander
            bystanders.append(maker(ports[protocol]))
            server = pg_server if protocol == "postgresql" else mariadb
            assert server is not None
            controls.append(maker(server.port, f"{protocol} (control, straight to the database)"))
        for bystander in bystanders + controls:
            bystander.start()
        time.sleep(1.0)
        assert proxy.process is not None
        rss_before = tree_rss(proxy.process.pid)
        result = asyncio.run(fuzz(ports, proxy, args, log, bystanders))
        alive = proxy.alive
        warm = result["warm"]
        rss_warm = warm.get("rss", 0)
        time.sleep(2.0)  # let closed sessions be cleaned up before measuring
        rss_after = tree_rss(proxy.process.pid) if alive else 0
        in_flight = {b.report.name: round(time.monotonic() - since, 1) for b in bystanders + controls
                     if (since := b.in_flight_since) is not None}
        for bystander in bystanders + controls:
            bystander.stop()
        tracebacks = result["tracebacks"] + tracebacks_by_kind(log.new_text())
        report = {
            "seed": args.seed, "seconds": result["seconds"], "proxy_alive_at_end": alive,
            "database_server_crashes": {type(srv).__name__: server_crashes(srv) for srv in servers},
            "crashes": result["crashes"], "tracebacks": dict(tracebacks.most_common()),
            "tracebacks_total": sum(tracebacks.values()),
            "rss_before_mib": round(rss_before / 2**20, 1), "rss_warm_mib": round(rss_warm / 2**20, 1),
            "rss_after_mib": round(rss_after / 2**20, 1),
            "rss_growth_pct": _growth(rss_before, rss_after),
            "rss_growth_after_warm_up_pct": _growth(rss_warm, rss_after),
            "warm_up": {"rule": f"first {args.warm_up:.0%} of the packet target or of the time",
                        "seconds": warm.get("seconds"), "packets": warm.get("packets")},
            "protocols": {p: {**asdict(s), "login_failures": dict(s.login_failures),
                              "case_errors": dict(s.case_errors)} for p, s in result["stats"].items()},
            "bystanders": {b.report.name: {"cycles": b.report.cycles, "errors": len(b.report.errors),
                                           "first_errors": b.report.errors[:10], "stalls": b.report.stalls[:20],
                                           "stall_count": len(b.report.stalls),
                                           "max_latency_s": round(b.report.max_latency, 3),
                                           "in_flight_at_end_s": in_flight.get(b.report.name)}
                           for b in bystanders + controls},
            "proxy_log": str(proxy.log),
        }
        text = json.dumps(report, indent=2, default=str)
        print(text)
        if args.json:
            args.json.write_text(text)
        failed = (report["crashes"] or report["tracebacks_total"] or not alive
                  or any(b.report.errors or b.report.stalls or in_flight.get(b.report.name, 0) > STALL_SECONDS
                         for b in bystanders))
        return 1 if failed else 0
    finally:
        for bystander in bystanders + controls:
            if bystander.is_alive():
                bystander.stop()
        if proxy is not None:
            proxy.stop()
        for server in servers:
            server.stop()


if __name__ == "__main__":
    raise SystemExit(main())
