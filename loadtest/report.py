"""Turning results into markdown tables with ratios, PNG plots under docs/perf/, and docs/PERFORMANCE.md."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from loadtest import goals
from loadtest.goals import Lookup, Outcome
from loadtest.idle_probe import ProbeResult
from loadtest.results import Result
from loadtest.syscalls import COLUMNS, SyscallCount
from loadtest.targets import DIRECT, PGBOUNCER_TARGET, PROXY, TARGET_ORDER

TARGET_LABELS = {DIRECT: "direct", PGBOUNCER_TARGET: "pgbouncer", PROXY: "proxy"}
TARGET_COLOURS = {DIRECT: "#4c72b0", PGBOUNCER_TARGET: "#dd8452", PROXY: "#55a868"}
DASH = "—"
DISTURBED = " (disturbed)"
DISTURBED_SHARE = 0.25
QUICK_WARNING = ("\n**This is a `--quick` smoke run: 1-second scenarios at tiny concurrency. Its numbers mean "
                 "nothing; run `python -m loadtest.bench` for real ones.**\n")


def _num(value: float | None, digits: int = 1) -> str:
    return DASH if value is None else f"{value:,.{digits}f}"


def _throughput(result: Result) -> str:
    if not result.ok:
        return DASH
    digits = 1 if result.unit == "MB/s" or result.throughput < 100 else 0
    text = f"{result.throughput:,.{digits}f} {result.unit}"
    qps = result.extra.get("qps")
    if qps is not None and abs(qps - result.throughput) > 0.5:
        text += f" ({qps:,.0f} qps)"
    return text


def _ratio(lookup: Lookup, result: Result, denominator: str) -> str:
    if result.target != PROXY:
        return ""
    ratio, _ = lookup.ratio(result.scenario, PROXY, denominator)
    return DASH if ratio is None else f"{ratio:.2f}x"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def results_table(results: Sequence[Result]) -> str:
    """One row per scenario x target; the proxy's rows carry its throughput ratios."""
    lookup = Lookup(list(results))
    header = ["scenario", "target", "throughput", "p50 ms", "p99 ms", "middleman CPU s", "middleman peak RSS MiB",
              "backend conns (max)", "other CPU s", "proxy / PgBouncer", "proxy / direct", "status"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for result in results:
        rss = None if result.middleman_peak_rss is None else result.middleman_peak_rss / 2**20
        row = [
            f"`{result.scenario}`", TARGET_LABELS.get(result.target, result.target), _throughput(result),
            _num(result.p50_ms, 3), _num(result.p99_ms, 3), _num(result.middleman_cpu_s, 2), _num(rss, 1),
            DASH if result.backend_connections_max is None else str(result.backend_connections_max),
            _num(result.other_cpu_s, 1),
            _ratio(lookup, result, PGBOUNCER_TARGET), _ratio(lookup, result, DIRECT), result.status_text(),
        ]
        lines.append("| " + " | ".join(_cell(c) for c in row) + " |")
    return "\n".join(lines)


def disturbed(result: Result | None) -> bool:
    """Other processes used more than DISTURBED_SHARE of the machine while this row ran."""
    import os

    if result is None or result.other_cpu_s is None or result.wall_seconds <= 0:
        return False
    return result.other_cpu_s > DISTURBED_SHARE * result.wall_seconds * (os.cpu_count() or 1)


def ratio_table(results: Sequence[Result]) -> str:
    """Per scenario: the proxy's throughput relative to PgBouncer and direct, and its added p50 latency."""
    lookup = Lookup(list(results))
    scenarios = list(OrderedDict.fromkeys(r.scenario for r in results))
    lines = ["| scenario | proxy / PgBouncer | proxy / direct | proxy p50 - direct p50 "
             "| proxy CPU / PgBouncer CPU, per transaction |",
             "|---|---|---|---|---|"]
    for scenario in scenarios:
        vs_bouncer, why_bouncer = lookup.ratio(scenario, PROXY, PGBOUNCER_TARGET)
        vs_direct, why_direct = lookup.ratio(scenario, PROXY, DIRECT)
        proxy, direct, bouncer = (lookup.get(scenario, t) for t in (PROXY, DIRECT, PGBOUNCER_TARGET))
        added = DASH
        if proxy and direct and proxy.ok and direct.ok and proxy.p50_ms is not None and direct.p50_ms is not None:
            added = f"{(proxy.p50_ms - direct.p50_ms) * 1000:+,.0f} µs"
        cpu = DASH
        per_proxy, per_bouncer = goals.cpu_per_tx_us(proxy), goals.cpu_per_tx_us(bouncer)
        if per_proxy is not None and per_bouncer:  # per unit of work: a faster target does more of it
            cpu = f"{per_proxy / per_bouncer:.2f}x"

        def show(ratio: float | None, why: str) -> str:
            if ratio is not None:
                return f"{ratio:.2f}x"
            if "n/a" in why:
                return "n/a"
            return DASH if "was not run" in why else why.split(":", 1)[0] + " failed"

        mark_bouncer = DISTURBED if disturbed(proxy) or disturbed(bouncer) else ""
        mark_direct = DISTURBED if disturbed(proxy) or disturbed(direct) else ""
        lines.append(f"| `{scenario}` | {show(vs_bouncer, why_bouncer)}{mark_bouncer if vs_bouncer else ''} "
                     f"| {show(vs_direct, why_direct)}{mark_direct if vs_direct else ''} | {added} | {cpu} |")
    return "\n".join(lines)


def _us(split: tuple[float, float] | None, index: int) -> str:
    return DASH if split is None else f"{split[index]:,.1f}"


def cpu_table(results: Sequence[Result]) -> str:
    """Per scenario: PgBouncer's and the proxy's user and system CPU µs per transaction, and their ratio."""
    lookup = Lookup(list(results))
    lines = ["| scenario | PgBouncer user µs/tx | PgBouncer sys µs/tx | proxy user µs/tx | proxy sys µs/tx "
             "| proxy/PgBouncer total |", "|---|---|---|---|---|---|"]
    for scenario in OrderedDict.fromkeys(r.scenario for r in results):
        bouncer_row, proxy_row = lookup.get(scenario, PGBOUNCER_TARGET), lookup.get(scenario, PROXY)
        if bouncer_row is None and proxy_row is None:
            continue
        bouncer = bouncer_row.cpu_us_per_unit() if bouncer_row is not None else None
        proxy = proxy_row.cpu_us_per_unit() if proxy_row is not None else None
        counterpart = lookup.get(goals.bouncer_counterpart(scenario), PGBOUNCER_TARGET)
        against = counterpart.cpu_us_per_unit() if counterpart is not None else None
        ratio = f"{sum(proxy) / sum(against):.2f}x" if proxy and against and sum(against) > 0 else DASH
        if ratio != DASH and counterpart is not bouncer_row:
            ratio += " (vs PgBouncer `-M extended`)"
        unit = " (per MB)" if proxy_row is not None and proxy_row.unit == "MB/s" else ""
        lines.append(f"| `{scenario}`{unit} | {_us(bouncer, 0)} | {_us(bouncer, 1)} | {_us(proxy, 0)} "
                     f"| {_us(proxy, 1)} | {ratio} |")
    return "\n".join(lines)


def mysql_pg_line(results: Sequence[Result], concurrency: int) -> str:
    """Proxy CPU per MySQL point select against per PostgreSQL select-only transaction, same concurrency."""
    found = goals.mysql_pg_cpu(Lookup(list(results)), concurrency)
    what = (f"Proxy CPU per sysbench `oltp_point_select` query vs per `pgbench -S -M simple` transaction "
            f"(one SELECT each), {concurrency} clients")
    if found is None:
        return f"{what}: not measured."
    mysql, pg = found
    return f"{what}: {mysql:,.1f} µs vs {pg:,.1f} µs, {mysql / pg:.2f}x (target <= 1.2x)."


def syscall_table(counts: Sequence[SyscallCount]) -> str:
    """System calls per transaction of each middleman, by call."""
    header = [label for label, _ in COLUMNS]
    lines = ["| middleman | processes | transactions | " + " | ".join(f"{h} /tx" for h in header)
             + " | others /tx | total /tx | status |", "|" + "---|" * (len(header) + 6)]
    for found in counts:
        name = TARGET_LABELS.get(found.target, found.target)
        if not found.calls:
            lines.append(f"| {name} | {found.processes or DASH} | {DASH} | " + " | ".join(DASH for _ in header)
                         + f" | {DASH} | {DASH} | {_cell(found.error or 'no data')} |")
            continue
        cells = " | ".join(f"{found.per_transaction(names):.2f}" for _, names in COLUMNS)
        status = f"failed: {_cell(found.error)}" if found.error else "ok"
        lines.append(f"| {name} | {found.processes} | {found.transactions:,} | {cells} "
                     f"| {found.others_per_transaction():.2f} | {found.total_per_transaction():.2f} | {status} |")
    return "\n".join(lines)


def workers_table(compared: Sequence[Result], results: Sequence[Result]) -> str:
    """Per scenario and proxy worker count: throughput, CPU µs per transaction, and PgBouncer's from the main run."""
    lookup = Lookup(list(results))
    lines = ["| scenario | workers | processes | throughput | user µs/tx | sys µs/tx | total µs/tx "
             "| PgBouncer throughput | PgBouncer total µs/tx | status |", "|---|---|---|---|---|---|---|---|---|---|"]
    for result in compared:
        split = result.cpu_us_per_unit()
        bouncer = lookup.get(goals.bouncer_counterpart(result.scenario), PGBOUNCER_TARGET)
        bouncer_cpu = goals.cpu_per_tx_us(bouncer)
        lines.append(
            f"| `{result.scenario}` | {result.extra.get('workers', DASH)} | {result.extra.get('processes', DASH)} "
            f"| {_throughput(result)} | {_us(split, 0)} | {_us(split, 1)} "
            f"| {DASH if split is None else f'{sum(split):,.1f}'} "
            f"| {_throughput(bouncer) if bouncer is not None else DASH} | {_num(bouncer_cpu, 1)} "
            f"| {_cell(result.status_text())} |")
    return "\n".join(lines)


def idle_table(probes: Sequence[ProbeResult]) -> str:
    lines = ["| idle clients | logged in | proxy processes | proxy RSS before MiB | proxy RSS after MiB "
             "| RSS per connection KiB | login time s | status |", "|---|---|---|---|---|---|---|---|"]
    for probe in probes:
        if probe.error and not probe.connected:
            lines.append(f"| {probe.count:,} | 0 | {DASH} | {DASH} | {DASH} | {DASH} | {DASH} "
                         f"| failed: {_cell(probe.error)} |")
            continue
        status = f"failed: {_cell(probe.error)}" if probe.error else "ok"
        lines.append(f"| {probe.count:,} | {probe.connected:,} | {probe.processes} | {probe.rss_before / 2**20:.1f} | "
                     f"{probe.rss_after / 2**20:.1f} | {probe.per_connection / 1024:.2f} | {probe.login_seconds:.1f} "
                     f"| {status} |")
    return "\n".join(lines)


def targets_section(outcomes: Sequence[Outcome], extra: Sequence[Outcome] = ()) -> str:
    lines = []
    for outcome in outcomes:
        lines.append(f"- **{outcome.verdict}** — {outcome.target}. Measured: {outcome.measured}.")
    if extra:
        lines += ["", "Also checked (a product promise, not one of the targets above):", ""]
        lines += [f"- **{o.verdict}** — {o.target}. Measured: {o.measured}." for o in extra]
    return "\n".join(lines)


def failures_section(results: Sequence[Result], probes: Sequence[ProbeResult]) -> str:
    lines: list[str] = []
    for result in results:
        if result.status == "failed":
            lines.append(f"- `{result.scenario}` via {result.target}: {_cell(result.reason)}")
        log = result.extra.get("proxy_log")
        if log:
            count = result.extra.get("proxy_log_lines", len(log))
            lines.append(f"- proxy log during `{result.scenario}` ({count} lines at warning level or above), first:")
            lines.append("  ```")
            lines += [f"  {line[:300]}" for line in log[:5]]
            lines.append("  ```")
    for probe in probes:
        if probe.error:
            lines.append(f"- idle probe with {probe.count:,} clients: {_cell(probe.error)}")
    return "\n".join(lines) if lines else "None."


# ----------------------------------------------------------------------------------------------- plots


def _grouped_bars(ax: Any, groups: list[str], series: dict[str, list[float | None]], ylabel: str,
                  log: bool = False) -> None:
    width = 0.8 / max(1, len(series))
    for index, (target, values) in enumerate(series.items()):
        xs = [g + (index - (len(series) - 1) / 2) * width for g in range(len(groups))]
        heights = [v if v is not None else 0.0 for v in values]
        bars = ax.bar(xs, heights, width, label=TARGET_LABELS.get(target, target),
                      color=TARGET_COLOURS.get(target))
        for bar, value in zip(bars, values, strict=True):
            if value is None:
                ax.annotate("failed / n/a", (bar.get_x() + bar.get_width() / 2, 0), rotation=90, fontsize=7,
                            ha="center", va="bottom", xytext=(0, 2), textcoords="offset points")
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups, fontsize=8)
    ax.set_ylabel(ylabel)
    if log:
        ax.set_yscale("log")
    ax.grid(axis="y", alpha=0.3)


def _series(results: Sequence[Result], scenarios: list[str], targets: Sequence[str], attr: str
            ) -> dict[str, list[float | None]]:
    lookup = Lookup(list(results))
    out: dict[str, list[float | None]] = {}
    for target in targets:
        values: list[float | None] = []
        for scenario in scenarios:
            result = lookup.get(scenario, target)
            value = getattr(result, attr) if result is not None and result.ok else None
            values.append(value)
        if any(v is not None for v in values) or any(lookup.get(s, target) is not None for s in scenarios):
            out[target] = values
    return out


def _groups(results: Sequence[Result]) -> OrderedDict[str, list[str]]:
    groups: OrderedDict[str, list[str]] = OrderedDict()
    for result in results:
        names = groups.setdefault(result.group, [])
        if result.scenario not in names:
            names.append(result.scenario)
    return groups


def _concurrency_label(results: Sequence[Result], scenario: str) -> str:
    for result in results:
        if result.scenario == scenario:
            return f"{result.concurrency}"
    return scenario


def write_plots(results: Sequence[Result], probes: Sequence[ProbeResult], outdir: Path) -> list[Path]:
    """Throughput, latency and middleman-resource plots; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    outdir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    groups = _groups(results)

    def save(fig: Any, name: str) -> None:
        path = outdir / name
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    families = [("pgbench_select_only.png", "pgbench -S -M ", "clients"), ("sysbench_oltp.png", "sysbench ", "threads")]
    for filename, prefix, axis_label in families:
        members = [g for g in groups if g.startswith(prefix)]
        if not members:
            continue
        for attr, ylabel, suffix in (("throughput", "transactions / s", ""), ("p99_ms", "p99 latency, ms (log)",
                                                                              "_p99")):
            fig, axes = plt.subplots(1, len(members), figsize=(4.2 * len(members), 3.8), squeeze=False)
            for ax, group in zip(axes[0], members, strict=True):
                scenarios = groups[group]
                targets = [t for t in TARGET_ORDER if any(r.target == t and r.group == group for r in results)]
                _grouped_bars(ax, [_concurrency_label(results, s) for s in scenarios],
                              _series(results, scenarios, targets, attr), ylabel, log=attr != "throughput")
                ax.set_title(group, fontsize=9)
                ax.set_xlabel(axis_label)
            axes[0][0].legend(fontsize=8)
            save(fig, filename.replace(".png", f"{suffix}.png"))

    singles = [g for g in groups if not g.startswith(("pgbench -S -M ", "sysbench "))]
    if singles:
        fig, axes = plt.subplots(1, len(singles), figsize=(4.2 * len(singles), 3.8), squeeze=False)
        for ax, group in zip(axes[0], singles, strict=True):
            scenarios = groups[group]
            unit = next((r.unit for r in results if r.group == group and r.ok), "")
            targets = [t for t in TARGET_ORDER if any(r.target == t and r.group == group for r in results)]
            attr = "p50_ms" if group.startswith("pgbench latency") else "throughput"
            ylabel = "p50 latency, ms" if attr == "p50_ms" else unit
            _grouped_bars(ax, ["" for _ in scenarios], _series(results, scenarios, targets, attr), ylabel)
            ax.set_title(group, fontsize=9)
        axes[0][0].legend(fontsize=8)
        save(fig, "latency_connect_copy.png")

    middle = [r for r in results if r.target in (PGBOUNCER_TARGET, PROXY) and r.ok and r.middleman_cpu_s is not None]
    if middle:
        scenarios = list(OrderedDict.fromkeys(r.scenario for r in middle))
        fig, axes = plt.subplots(1, 2, figsize=(12, 0.32 * len(scenarios) + 2))
        lookup = Lookup(list(results))
        for ax, attr, label in ((axes[0], "cpu_per_kilo_tx", "CPU ms per 1,000 transactions (COPY: per GB)"),
                                (axes[1], "middleman_peak_rss", "peak RSS, MiB")):
            height = 0.4
            for index, target in enumerate((PGBOUNCER_TARGET, PROXY)):
                values = []
                for scenario in scenarios:
                    result = lookup.get(scenario, target)
                    if result is None or not result.ok or result.middleman_cpu_s is None or not result.work:
                        values.append(0.0)
                    elif attr == "cpu_per_kilo_tx":
                        values.append(result.middleman_cpu_s * 1e6 / result.work)
                    else:
                        values.append((result.middleman_peak_rss or 0) / 2**20)
                ys = [y + (index - 0.5) * height for y in range(len(scenarios))]
                ax.barh(ys, values, height, label=TARGET_LABELS[target], color=TARGET_COLOURS[target])
            ax.set_yticks(range(len(scenarios)))
            ax.set_yticklabels(scenarios, fontsize=7)
            ax.invert_yaxis()
            ax.set_xlabel(label)
            ax.grid(axis="x", alpha=0.3)
        axes[0].legend(fontsize=8)
        save(fig, "middleman_resources.png")

    measured = [p for p in probes if p.connected]
    if measured:
        fig, ax = plt.subplots(figsize=(5, 3.6))
        ax.plot([p.connected for p in measured], [p.rss_after / 2**20 for p in measured], marker="o",
                color=TARGET_COLOURS[PROXY], label="proxy RSS with N idle clients")
        ax.axhline(150e6 / 2**20, color="grey", linestyle="--", label="target: 150 MB at 10,000")
        ax.set_xlabel("idle authenticated clients")
        ax.set_ylabel("RSS, MiB")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        save(fig, "idle_memory.png")
    return written


# ----------------------------------------------------------------------------------------------- document


def performance_markdown(*, results: Sequence[Result], probes: Sequence[ProbeResult], outcomes: Sequence[Outcome],
                         extra_outcomes: Sequence[Outcome], facts: dict[str, str], meta: dict[str, Any],
                         plots: Sequence[Path], docs_dir: Path, syscalls: Sequence[SyscallCount] = (),
                         compared: Sequence[Result] = ()) -> str:
    met = sum(1 for o in outcomes if o.met)
    other = other_load_summary(results)
    machine = "\n".join(f"| {k} | {_cell(v)} |" for k, v in facts.items())
    plot_lines = "\n\n".join(f"![{p.stem}]({p.relative_to(docs_dir).as_posix()})" for p in plots)
    return f"""# Performance

Generated by `{meta['command']}` on {meta['date']} (total run time {meta['runtime_min']:.1f} min).
Do not edit by hand: re-run the command to regenerate this page and the plots in `docs/perf/`.
The harness and every option are described in [`loadtest/bench.py`](../loadtest/bench.py).
Proxy code measured: {meta.get('code_version', 'unknown')}.
{QUICK_WARNING if meta.get('quick') else ''}
Everything — load generators, PgBouncer, the proxy and the databases — runs on the one machine below, on
127.0.0.1, so they compete for the same {facts.get('CPU', '').rsplit('(', 1)[-1].rstrip(')')}. Absolute numbers
are therefore low and only the ratios between targets, measured side by side in the same run (each scenario
runs against direct, PgBouncer and the proxy one after the other), mean anything.
{other}

## Targets

{met} of {len(outcomes)} targets met in this run.

{targets_section(outcomes, extra_outcomes)}

## CPU per transaction

The headline figure: far less noisy than throughput on a shared machine. The middleman's (PgBouncer's, the
proxy's: all its processes, supervisor and workers) user and system CPU time over the scenario, from /proc
(psutil `cpu_times` of the process tree, reaped children included), divided by the transactions pgbench or
sysbench completed (COPY: per MB). For pgbench (without `-C`) only the steady part counts: from half a second
after the first transaction completed (the clients have logged in) to just before the last, with the
transactions completed in that window (from pgbench's per-transaction log); shorter runs use the whole run.

{cpu_table(results)}

{mysql_pg_line(results, int(meta.get('mysql_pg_concurrency') or 10))}

## System calls

{syscall_section(syscalls, meta)}
{workers_section(compared, results, meta)}
## Machine

| | |
|---|---|
{machine}

## Settings

- Duration per scenario: {meta['duration']} s; pool size (PgBouncer `default_pool_size` and proxy
  `max_connections`): {meta['pool_size']}; PostgreSQL and MariaDB `max_connections` {meta['backend_max_connections']}.
- pgbench: built-in select-only script (`-S`), `-j 2` (never more than `-c`), scale {meta['pgbench_scale']},
  `-n` (vacuum done once at `pgbench -i`).
- sysbench: {meta['sysbench_tables']} tables x {meta['sysbench_table_size']:,} rows, `--rand-type=uniform`,
  `--db-ps-mode=disable` for every target (the proxy has no prepared statements yet; direct uses the same mode so
  the comparison is fair).
- COPY: `psql -c "COPY (SELECT repeat('x', 1000) FROM generate_series(1, N)) TO STDOUT" > /dev/null`, timed
  end to end (psql start and login included), {meta['copy_repeats']} time(s) per target; throughput = payload
  bytes / median time, MB = 10^6 bytes.
- {meta.get('pgbouncer_version', 'PgBouncer')}: `pool_mode = transaction`, `auth_type = scram-sha-256` (plaintext
  password in the userlist), `max_client_conn = {meta['pgbouncer_max_client_conn']}`, connection logging off.
- Proxy: `python -m proxy run`, {proxy_processes(meta)}, `log_level = "warning"`, SCRAM-SHA-256 client auth,
  transaction pooling; hot path: {meta.get('proxy_compiled', 'unknown')}. Its CPU and RSS are those of all its
  processes together. TLS is off for every target
  (`PGSSLMODE=disable`; the proxy would otherwise negotiate TLS). The proxy runs from a copy of `proxy/` taken
  at the start of the run, so edits made meanwhile cannot mix into it.

## Results

{results_table(results)}

### Ratios

"(disturbed)": other processes used more than {DISTURBED_SHARE:.0%} of the machine's CPU while one of the two
compared rows ran (see the `other CPU s` column), so that ratio is less trustworthy.

{ratio_table(results)}

### Idle client connections

`python -m loadtest.idle_probe`: N clients log in (startup + SCRAM-SHA-256) and stay idle; a fresh proxy
running as one process (`workers = 1`) per count; RSS is read after the logins have settled.

{idle_table(probes) if probes else 'Not run.'}

## How it is measured

- **Throughput**: pgbench's own `tps` (without the initial connection time, except with `-C`, where it includes
  the reconnections); sysbench's transactions per second (qps in brackets where a transaction has several
  queries); COPY in MB/s as above.
- **p50 / p99 latency**: pgbench runs with `--log`; the percentiles are nearest-rank over the `time` column of
  every logged transaction (microsecond resolution, all clients and threads). With `-C` that column starts after
  the connection is made, so for `-C` the latency is instead the time between a client's consecutive
  transaction completions: connect + SCRAM login + query + disconnect. sysbench: nearest-rank over its
  `--histogram` of transaction latencies (buckets are about 2% wide). COPY has no per-query latency.
- **Middleman CPU s**: user + system CPU time of the PgBouncer or proxy process and all its children (the proxy's
  workers; reaped children's times included) from the start to the end of the scenario (psutil `cpu_times`
  delta); the CPU-per-transaction table shows user and system separately, divided by the transactions done.
  Its **peak RSS**: psutil sampled every 0.2 s.
- **Backend conns (max)**: every 0.2 s the harness lists the benchmark user's sessions in `pg_stat_activity`
  (MariaDB: `information_schema.processlist`) and attributes them by client port: a middleman's are the ones
  whose port is the local end of one of its TCP connections to the database (psutil); direct's are those of no
  middleman. The maximum over the scenario is shown.
- **Other CPU s**: the machine's busy CPU time (user + nice + system, all cores) during the scenario minus the
  CPU time of the benchmark's own processes (the harness and everything it started, and the PostgreSQL
  postmaster's tree): work by other processes on the shared machine, such as someone else's test suite. Kernel
  work for our own loopback traffic done outside our processes also lands here, so it is an upper bound. A row
  with a large value was disturbed.
- Before each run the harness waits until the previous run's clients have left the database.

## Plots

{plot_lines or 'No plots (matplotlib missing or nothing to plot).'}

## Failures and problems seen in this run

{failures_section(results, probes)}
"""


def syscall_section(syscalls: Sequence[SyscallCount], meta: dict[str, Any]) -> str:
    if not syscalls:
        return "Not run."
    return (f"`{meta.get('syscall_run', 'pgbench')}` once through PgBouncer and once through the proxy, with "
            "`strace -c -f -p PID ...` attached to every process of the middleman meanwhile (stopped with SIGINT "
            "once pgbench has ended); calls divided by the transactions pgbench completed (the clients' logins "
            "are included). strace slows the traced process: the counts matter here, not the time.\n\n"
            + syscall_table(syscalls))


def workers_section(compared: Sequence[Result], results: Sequence[Result], meta: dict[str, Any]) -> str:
    if not compared:
        return ""
    return (f"\n## Workers\n\n`--compare-workers {meta.get('compare_workers', '')}`: the selected scenarios "
            "against one proxy per `[server] workers` count (all started beside the main one, same databases and "
            "data, each count in turn per scenario); PgBouncer's columns come from the main run.\n\n"
            + workers_table(compared, results) + "\n")


def proxy_processes(meta: dict[str, Any]) -> str:
    processes = int(meta.get("proxy_processes") or 0)
    chosen = meta.get("proxy_workers_option")
    how = f"`workers = {chosen}`" if chosen is not None else "its default worker count"
    if processes > 1:
        return f"{processes} processes (a supervisor and {processes - 1} workers sharing the ports; {how})"
    return f"one process ({how})"


def other_load_summary(results: Sequence[Result]) -> str:
    import os

    measured = [r for r in results if r.other_cpu_s is not None]
    if not measured:
        return ""
    other = sum(r.other_cpu_s or 0.0 for r in measured)
    capacity = sum(r.wall_seconds for r in measured) * (os.cpu_count() or 1)
    worst = max(measured, key=lambda r: (r.other_cpu_s or 0.0) / max(r.wall_seconds, 0.1))
    share = 100.0 * other / capacity if capacity else 0.0
    worst_share = 100.0 * (worst.other_cpu_s or 0.0) / max(worst.wall_seconds * (os.cpu_count() or 1), 0.1)
    return (f"\nWhile the scenarios ran, processes outside the benchmark used {other:,.0f} CPU-seconds, about "
            f"{share:.0f}% of the machine (worst row: `{worst.scenario}` via {worst.target}, {worst_share:.0f}%); "
            "the `other CPU s` column shows it per row.\n")


def write_document(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
