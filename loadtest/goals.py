"""The product's performance targets, each judged "met" or "NOT met" from one run's results."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from loadtest.idle_probe import ProbeResult
from loadtest.results import Result
from loadtest.scenarios import LATENCY_SCENARIO, copy_name, pgbench_name, sysbench_name
from loadtest.targets import DIRECT, PGBOUNCER_TARGET, PROXY

IDLE_TARGET_COUNT = 10_000
IDLE_TARGET_BYTES = 150 * 1_000_000
IDLE_TARGET_KIB = 4.6  # the per-connection RSS of the report before issue 14
MET = "met"
NOT_MET = "NOT met"


@dataclass
class Outcome:
    """One target: what it asks, what was measured, and the verdict."""

    target: str
    measured: str
    verdict: str  # MET or NOT_MET

    @property
    def met(self) -> bool:
        return self.verdict == MET


class Lookup:
    """Find results by (scenario, target)."""

    def __init__(self, results: list[Result]) -> None:
        self._by_key = {(r.scenario, r.target): r for r in results}

    def get(self, scenario: str, target: str) -> Result | None:
        return self._by_key.get((scenario, target))

    def ratio(self, scenario: str, numerator: str, denominator: str) -> tuple[float | None, str]:
        """Throughput ratio numerator/denominator, or None and why it could not be computed."""
        return self.cross_ratio(scenario, numerator, scenario, denominator)

    def cross_ratio(self, scenario: str, numerator: str, other: str, denominator: str) -> tuple[float | None, str]:
        """Throughput of (scenario, numerator) over (other, denominator), or None and why not."""
        top, bottom = self.get(scenario, numerator), self.get(other, denominator)
        for name, result, run in ((numerator, top, scenario), (denominator, bottom, other)):
            if result is None:
                return None, f"`{run}` was not run"
            if not result.ok:
                return None, f"{name}: {result.status_text()}"
        assert top is not None and bottom is not None
        return top.throughput / bottom.throughput, ""


Check = tuple[str, str, str, Callable[[float], bool], str]  # label, scenario, denominator target, passes, needs


def _ratio_outcome(lookup: Lookup, text: str, checks: list[Check], denominator_scenarios: dict[str, str] | None = None
                   ) -> Outcome:
    """Throughput ratios of the proxy; ``denominator_scenarios`` maps a label to another scenario for the bottom."""
    parts: list[str] = []
    met = True
    for label, scenario, denominator, passes, threshold in checks:
        other = (denominator_scenarios or {}).get(label, scenario)
        ratio, why = lookup.cross_ratio(scenario, PROXY, other, denominator)
        if ratio is None:
            parts.append(f"{label}: not measured ({why})")
            met = False
            continue
        parts.append(f"{label}: {ratio:.2f}x (needs {threshold})")
        met = met and passes(ratio)
    return Outcome(text, "; ".join(parts), MET if met else NOT_MET)


def _at_least(threshold: float) -> Callable[[float], bool]:
    return lambda ratio: ratio >= threshold


def evaluate(results: list[Result], probes: list[ProbeResult]) -> list[Outcome]:
    """Issue 14's targets, in the order the issue lists them."""
    lookup = Lookup(results)
    c100 = {mode: pgbench_name(mode, 100) for mode in ("simple", "extended", "prepared")}
    return [
        _ratio_outcome(lookup, "pgbench `-S -c 100` through the proxy at least 1.0x PgBouncer, `-M simple`, "
                       "`-M extended` and `-M prepared` (PgBouncer 1.18 has no prepared statements: `-M prepared` "
                       "is compared with its `-M extended` row)",
                       [(mode, c100[mode], PGBOUNCER_TARGET, _at_least(1.0), ">= 1.0x") for mode in c100],
                       {"prepared": c100["extended"]}),
        cpu_outcome(lookup),
        _latency_outcome(lookup),
        _ratio_outcome(lookup, "sysbench oltp_point_select through the proxy at least 0.65x direct MariaDB at 10 "
                       "threads, and above direct at 1,000 threads", [
                           ("10 threads", sysbench_name("oltp_point_select", 10), DIRECT, _at_least(0.65),
                            ">= 0.65x"),
                           ("1,000 threads", sysbench_name("oltp_point_select", 1000), DIRECT, lambda r: r > 1.0,
                            "> 1.0x"),
                       ]),
        _idle_outcome(probes),
        mysql_cpu_outcome(lookup, 10),
    ]


def also_checked(results: list[Result], probes: list[ProbeResult], pool_size: int) -> list[Outcome]:
    """Product promises and the earlier targets, still reported."""
    lookup = Lookup(results)
    return [
        pool_never_exceeded(results, pool_size),
        _ratio_outcome(lookup, "pgbench `-C` (new connection per transaction) through the proxy at least 1.5x direct", [
            ("-C -c 10", pgbench_name("simple", 10, connect_each=True), DIRECT, _at_least(1.5), ">= 1.5x"),
        ]),
        _ratio_outcome(lookup, "COPY TO STDOUT (1 GB) through the proxy at least 0.8x direct throughput", [
            ("COPY 1 GB", copy_name(1_000_000), DIRECT, _at_least(0.8), ">= 0.8x"),
        ]),
        _idle_total_outcome(probes),
    ]


def bouncer_counterpart(scenario: str) -> str:
    """PgBouncer's row to compare with: its ``-M extended`` for ``-M prepared`` (PgBouncer 1.18 cannot prepare)."""
    return scenario.replace("-M prepared", "-M extended")


def cpu_per_tx_us(result: Result | None) -> float | None:
    """The middleman's user + system CPU microseconds per transaction, when measured."""
    split = result.cpu_us_per_unit() if result is not None else None
    return None if split is None else split[0] + split[1]


def cpu_outcome(lookup: Lookup) -> Outcome:
    text = ("Proxy CPU per transaction (user + system, all its processes) at most PgBouncer's at `pgbench -S -c 100` "
            "(`-M prepared` against PgBouncer's `-M extended`)")
    parts: list[str] = []
    met = True
    for mode in ("simple", "extended", "prepared"):
        proxy = cpu_per_tx_us(lookup.get(pgbench_name(mode, 100), PROXY))
        bouncer = cpu_per_tx_us(lookup.get(bouncer_counterpart(pgbench_name(mode, 100)), PGBOUNCER_TARGET))
        if proxy is None or bouncer is None:
            parts.append(f"{mode}: not measured")
            met = False
            continue
        parts.append(f"{mode}: {proxy:.1f} µs vs {bouncer:.1f} µs ({proxy / bouncer:.2f}x)")
        met = met and proxy <= bouncer
    return Outcome(text, "; ".join(parts), MET if met else NOT_MET)


def mysql_pg_cpu(lookup: Lookup, concurrency: int) -> tuple[float, float] | None:
    """Proxy CPU µs per sysbench point select and per ``pgbench -S -M simple`` transaction (one SELECT each)."""
    point = lookup.get(sysbench_name("oltp_point_select", concurrency), PROXY)
    pg = cpu_per_tx_us(lookup.get(pgbench_name("simple", concurrency), PROXY))
    per_tx = cpu_per_tx_us(point)
    if point is None or per_tx is None or pg is None:
        return None
    qps = point.extra.get("qps")
    queries_per_tx = qps / point.throughput if qps and point.throughput else 1.0
    return per_tx / queries_per_tx, pg


def mysql_cpu_outcome(lookup: Lookup, concurrency: int) -> Outcome:
    text = (f"MySQL path's CPU per query at most 1.2x the PostgreSQL path's (proxy CPU per sysbench point select vs "
            f"per `pgbench -S -M simple` transaction, {concurrency} clients)")
    found = mysql_pg_cpu(lookup, concurrency)
    if found is None:
        return Outcome(text, "not measured", NOT_MET)
    mysql, pg = found
    return Outcome(text, f"{mysql:.1f} µs vs {pg:.1f} µs ({mysql / pg:.2f}x, needs <= 1.2x)",
                   MET if mysql <= 1.2 * pg else NOT_MET)


def _added_p50_us(lookup: Lookup, target: str) -> tuple[float | None, str]:
    """p50 of ``target`` minus direct p50 at one client, in µs, or None and why not."""
    result, direct = lookup.get(LATENCY_SCENARIO, target), lookup.get(LATENCY_SCENARIO, DIRECT)
    if result is None or direct is None:
        return None, f"`{LATENCY_SCENARIO}` was not run"
    for name, row in ((target, result), (DIRECT, direct)):
        if not row.ok or row.p50_ms is None:
            return None, f"{name}: {row.status_text()}"
    assert result.p50_ms is not None and direct.p50_ms is not None
    return (result.p50_ms - direct.p50_ms) * 1000.0, ""


def _latency_outcome(lookup: Lookup) -> Outcome:
    text = ("Added p50 latency of a simple query at one client no more than PgBouncer's added latency "
            "(`pgbench -c 1 -S -M simple`, p50 minus direct p50)")
    proxy, why_proxy = _added_p50_us(lookup, PROXY)
    bouncer, why_bouncer = _added_p50_us(lookup, PGBOUNCER_TARGET)
    if proxy is None or bouncer is None:
        return Outcome(text, f"not measured ({why_proxy or why_bouncer})", NOT_MET)
    return Outcome(text, f"proxy {proxy:+.0f} µs, PgBouncer {bouncer:+.0f} µs", MET if proxy <= bouncer else NOT_MET)


def _idle_probe(probes: list[ProbeResult]) -> tuple[ProbeResult | None, str]:
    probe = next((p for p in probes if p.count == IDLE_TARGET_COUNT), None)
    if probe is None:
        counts = ", ".join(str(p.count) for p in probes) or "none"
        return None, f"not measured (idle probe counts in this run: {counts})"
    if probe.error and probe.connected < probe.count:
        return None, f"not measured: {probe.error}"
    return probe, ""


def _idle_outcome(probes: list[ProbeResult]) -> Outcome:
    text = f"10,000 idle clients: RSS at most {IDLE_TARGET_KIB} KiB per connection (one proxy process)"
    probe, why = _idle_probe(probes)
    if probe is None:
        return Outcome(text, why, NOT_MET)
    per = probe.per_connection / 1024
    return Outcome(text, f"{per:.2f} KiB per connection ({probe.connected:,} clients)",
                   MET if per <= IDLE_TARGET_KIB else NOT_MET)


def _idle_total_outcome(probes: list[ProbeResult]) -> Outcome:
    text = "10,000 idle client connections in at most 150 MB RSS for one proxy process"
    probe, why = _idle_probe(probes)
    if probe is None:
        return Outcome(text, why, NOT_MET)
    where = "one process" if probe.processes == 1 else f"{probe.processes} processes together"
    measured = (f"{probe.rss_after / 1e6:.0f} MB RSS with {probe.connected:,} idle clients in {where} "
                f"({probe.rss_before / 1e6:.0f} MB before, {probe.per_connection / 1024:.1f} KiB per connection)")
    return Outcome(text, measured, MET if probe.rss_after <= IDLE_TARGET_BYTES else NOT_MET)


def pool_never_exceeded(results: list[Result], pool_size: int) -> Outcome:
    """Not one of the targets, but the product promises it: the proxy never opens more than its pool."""
    through_proxy = [r for r in results if r.target == PROXY and r.backend_connections_max is not None]
    if not through_proxy:
        return Outcome(f"Backend connections through the proxy never above the pool size ({pool_size})",
                       "not measured", NOT_MET)
    worst = max(through_proxy, key=lambda r: r.backend_connections_max or 0)
    peak = worst.backend_connections_max or 0
    return Outcome(f"Backend connections through the proxy never above the pool size ({pool_size})",
                   f"max {peak} (in `{worst.scenario}`)", MET if peak <= pool_size else NOT_MET)
