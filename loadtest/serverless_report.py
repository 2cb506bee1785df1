"""The serverless harness's results: per-run figures, the markdown report and its PNG plots."""

from __future__ import annotations

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
        "query ms p50 / p95 / p99 | connects/s | peak backends | bound |",
        "|---|---|---|---:|---:|---|---:|---:|---:|---:|---|",
    ]
    for run in runs:
        f = figures(run)
        lines.append(
            f"| {run.engine} | {run.profile} | {run.target} | {f.invocations:,} | {f.served:,} ({f.success:.1f}%) | "
            f"{_errors(f.errors)} | {_ms(f.connect_ms)} | {_ms(f.query_ms)} | {f.connects_per_second:,.0f} | "
            f"{'-' if f.peak_backends is None else f.peak_backends} | {run.limit} |")
    return lines


def headline(runs: list[Run]) -> list[str]:
    """The sentences the report leads with: direct vs proxy success, proxy vs PgBouncer connects per second."""
    lines: list[str] = []
    by_key = {(r.engine, r.profile, r.target): r for r in runs}
    for (engine, profile, target), run in by_key.items():
        if target != "proxy":
            continue
        proxy = figures(run)
        direct_run = by_key.get((engine, profile, "direct"))
        if direct_run is not None:
            direct = figures(direct_run)
            refused = sum(n for kind, n in direct.errors.items() if "too many" in kind)
            lines.append(
                f"- **{engine}, {profile}, {proxy.invocations:,} invocations**: directly "
                f"{direct.served:,} served ({direct.success:.1f}%), {direct.invocations - direct.served:,} failed "
                f"({refused:,} refused by the server at max_connections); through the proxy {proxy.served:,} served "
                f"({proxy.success:.1f}%) on at most {proxy.peak_backends} backend connections ({run.limit}).")
        bouncer_run = by_key.get((engine, profile, "pgbouncer"))
        if bouncer_run is not None:
            bouncer = figures(bouncer_run)
            ratio = proxy.connects_per_second / bouncer.connects_per_second if bouncer.connects_per_second else 0.0
            lines.append(
                f"- **{engine}, {profile}: connects per second**: proxy {proxy.connects_per_second:,.0f}, "
                f"PgBouncer {bouncer.connects_per_second:,.0f} ({ratio:.2f}x); connect p50 / p95 / p99 proxy "
                f"{_ms(proxy.connect_ms)} ms, PgBouncer {_ms(bouncer.connect_ms)} ms.")
    return lines


def plot(runs: list[Run], out: Path) -> list[Path]:
    """Per engine and profile: backend sessions and served invocations over time, and the connect latency CDF."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written: list[Path] = []
    groups: dict[tuple[str, str], list[Run]] = {}
    for run in runs:
        groups.setdefault((run.engine, run.profile), []).append(run)
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
        top.set(title=f"{engine}, {profile}: backend sessions of the invocations' user", xlabel="seconds",
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
    lines += ["", "## Setup", "", *setup, "", "## Results", "", *table(runs), ""]
    notes = [f"- {run.engine}/{run.profile}/{run.target}: {note}" for run in runs for note in run.notes]
    if notes:
        lines += ["## Notes", "", *notes, ""]
    lines += ["## Plots", ""]
    lines += [f"![{p.stem}]({p.name})" for p in plots]
    return "\n".join(lines) + "\n"
