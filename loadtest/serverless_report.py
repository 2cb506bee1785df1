"""The serverless harness's results: per-run figures, the markdown report and its PNG plots."""

from __future__ import annotations

import statistics
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from loadtest.latency import percentile
from loadtest.serverless_client import Outcome

TARGET_COLOURS = {"direct": "tab:red", "pgbouncer": "tab:blue", "proxy": "tab:green"}


@dataclass
class Run:
    """One scenario against one target."""

    engine: str
    profile: str
    target: str
    outcomes: list[Outcome]
    backends: list[tuple[float, int]]  # (seconds from the start, the user's sessions on the database)
    wall: float  # seconds from the first start to the last end
    limit: str = ""  # what bounds the backend sessions (the database's max_connections, or the pool size)
    round: int = 1
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Figures:
    invocations: int
    served: int
    errors: dict[str, int]
    connect_ms: tuple[float, float, float] | None  # p50, p95, p99
    query_ms: tuple[float, float, float] | None
    connects_per_second: float
    peak_backends: int | None

    @property
    def success(self) -> float:
        return 100.0 * self.served / self.invocations if self.invocations else 0.0


def _percentiles_ms(values: list[float]) -> tuple[float, float, float] | None:
    if not values:
        return None
    ordered = sorted(values)
    p50, p95, p99 = (percentile(ordered, q) * 1000.0 for q in (50, 95, 99))
    return p50, p95, p99


def figures(run: Run) -> Figures:
    outcomes = run.outcomes
    connected = [o for o in outcomes if o.connected is not None]
    served = [o for o in outcomes if o.ok]
    span = 0.0
    if connected:
        span = max(o.connected for o in connected if o.connected is not None) - min(o.start for o in outcomes)
    return Figures(
        invocations=len(outcomes),
        served=len(served),
        errors=dict(Counter(o.error for o in outcomes if o.error).most_common()),
        connect_ms=_percentiles_ms([o.connect_latency for o in connected if o.connect_latency is not None]),
        query_ms=_percentiles_ms([q for o in outcomes for q in o.queries]),
        connects_per_second=len(connected) / span if span > 0 else 0.0,
        peak_backends=max((n for _, n in run.backends), default=None),
    )


def _ms(values: tuple[float, float, float] | None) -> str:
    return "-" if values is None else " / ".join(f"{v:,.1f}" for v in values)


def _errors(errors: dict[str, int]) -> str:
    return "none" if not errors else "; ".join(f"{kind}: {count:,}" for kind, count in errors.items())


def table(runs: list[Run]) -> list[str]:
    lines = [
        "| engine | profile | target | invocations | served | errors by kind | connect ms p50 / p95 / p99 | "
        "query ms p50 / p95 / p99 | connects/s | peak backends | bound | round |",
        "|---|---|---|---:|---:|---|---:|---:|---:|---:|---|---:|",
    ]
    for run in runs:
        f = figures(run)
        lines.append(
            f"| {run.engine} | {run.profile} | {run.target} | {f.invocations:,} | {f.served:,} ({f.success:.1f}%) | "
            f"{_errors(f.errors)} | {_ms(f.connect_ms)} | {_ms(f.query_ms)} | {f.connects_per_second:,.0f} | "
            f"{'-' if f.peak_backends is None else f.peak_backends} | {run.limit} | {run.round} |")
    return lines


def _rate(values: list[float]) -> str:
    text = f"{statistics.median(values):,.0f}"
    if len(values) == 1:
        return text
    return f"{text} (median of {len(values)} rounds, {min(values):,.0f}-{max(values):,.0f})"


def headline(runs: list[Run]) -> list[str]:
    """The sentences the report leads with: direct vs proxy success, proxy vs PgBouncer connects per second
    (summed, or the median, over the rounds)."""
    lines: list[str] = []
    groups: dict[tuple[str, str, str], list[Run]] = {}
    for run in runs:
        groups.setdefault((run.engine, run.profile, run.target), []).append(run)
    for (engine, profile, target), proxy_runs in groups.items():
        if target != "proxy":
            continue
        proxy = [figures(r) for r in proxy_runs]
        served, invocations = sum(f.served for f in proxy), sum(f.invocations for f in proxy)
        peak = max((f.peak_backends or 0) for f in proxy)
        each = f"{len(proxy)} rounds of {proxy[0].invocations:,}" if len(proxy) > 1 else f"{invocations:,}"
        proxy_text = (f"through the proxy {served:,} of {invocations:,} served ({100.0 * served / invocations:.1f}%) "
                      f"on at most {peak} backend connections ({proxy_runs[0].limit})")
        direct_runs = groups.get((engine, profile, "direct"))
        if direct_runs:
            direct = [figures(r) for r in direct_runs]
            d_served, d_total = sum(f.served for f in direct), sum(f.invocations for f in direct)
            refused = sum(n for f in direct for kind, n in f.errors.items() if "too many" in kind)
            lines.append(
                f"- **{engine}, {profile}, {each} invocations**: directly {d_served:,} of {d_total:,} served "
                f"({100.0 * d_served / d_total:.1f}%), {d_total - d_served:,} failed ({refused:,} refused by the "
                f"server at max_connections, {direct_runs[0].limit}); {proxy_text}.")
        else:
            lines.append(f"- **{engine}, {profile}, {each} invocations**: {proxy_text}.")
        bouncer_runs = groups.get((engine, profile, "pgbouncer"))
        if bouncer_runs:
            bouncer = [figures(r) for r in bouncer_runs]
            mine = [f.connects_per_second for f in proxy]
            theirs = [f.connects_per_second for f in bouncer]
            ratio = statistics.median(mine) / statistics.median(theirs) if statistics.median(theirs) else 0.0
            p99 = [f.connect_ms[2] for f in proxy if f.connect_ms]
            bp99 = [f.connect_ms[2] for f in bouncer if f.connect_ms]
            lines.append(
                f"- **{engine}, {profile}: connects per second**: proxy {_rate(mine)}, PgBouncer {_rate(theirs)}: "
                f"{ratio:.2f}x; connect p99 (median over rounds) proxy {statistics.median(p99):,.0f} ms, PgBouncer "
                f"{statistics.median(bp99):,.0f} ms.")
    return lines


def plot(runs: list[Run], out: Path) -> list[Path]:
    """Per engine and profile: backend sessions and served invocations over time, and the connect latency CDF."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written: list[Path] = []
    groups: dict[tuple[str, str], list[Run]] = {}
    for run in runs:
        if run.round == 1:
            groups.setdefault((run.engine, run.profile), []).append(run)
    rounds = max((r.round for r in runs), default=1)
    for (engine, profile), group in groups.items():
        fig, (top, middle, bottom) = plt.subplots(3, 1, figsize=(9, 10))
        for run in group:
            colour = TARGET_COLOURS.get(run.target)
            if run.backends:
                times, counts = zip(*run.backends, strict=True)
                top.step(times, counts, where="post", label=run.target, color=colour)
            ends = sorted(o.end for o in run.outcomes if o.ok and o.end is not None)
            middle.plot(ends, range(1, len(ends) + 1), label=f"{run.target} served", color=colour)
            failed = sorted((o.end or o.start) for o in run.outcomes if not o.ok)
            if failed:
                middle.plot(failed, range(1, len(failed) + 1), linestyle="--", color=colour,
                            label=f"{run.target} failed")
            latencies = sorted(1000.0 * o.connect_latency for o in run.outcomes if o.connect_latency is not None)
            if latencies:
                bottom.plot(latencies, [i / len(run.outcomes) for i in range(1, len(latencies) + 1)],
                            label=run.target, color=colour)
        which = f" (round 1 of {rounds})" if rounds > 1 else ""
        top.set(title=f"{engine}, {profile}{which}: backend sessions of the invocations' user", xlabel="seconds",
                ylabel="sessions")
        middle.set(title="invocations served and failed (cumulative)", xlabel="seconds", ylabel="invocations")
        bottom.set(title="connect + login latency (share of all invocations connected within)", xlabel="ms",
                   ylabel="share", xscale="log", ylim=(0, 1.02))
        for axes in (top, middle, bottom):
            axes.grid(alpha=0.3)
            axes.legend(fontsize="small")
        fig.tight_layout()
        path = out / f"{engine}-{profile}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)
    return written


def markdown(runs: list[Run], plots: list[Path], setup: list[str], command: str) -> str:
    lines = ["# Serverless invocations: directly, through PgBouncer and through dbproxy", "",
             f"Made by `{command}`.", "", "## Headline", ""]
    lines += headline(runs) or ["- (no proxy run to compare)"]
    lines += ["", "## Setup", "", *setup, "", "## Results", "",
              "Served: the invocation connected, logged in, ran its queries and closed. Connect: from the "
              "invocation's start to the end of its login. Connects/s: the invocations that connected, divided by "
              "the seconds from the first start to the last login. Peak backends: the most sessions of the "
              "invocations' user the database had at one sample.", "", *table(runs), ""]
    notes = [f"- {run.engine}/{run.profile}/{run.target}: {note}" for run in runs for note in run.notes]
    if notes:
        lines += ["## Notes", "", *notes, ""]
    lines += ["## Plots", ""]
    lines += [f"![{p.stem}]({p.name})" for p in plots]
    return "\n".join(lines) + "\n"
