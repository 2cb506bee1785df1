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
        top, bottom = self.get(scenario, numerator), self.get(scenario, denominator)
        for name, result in ((numerator, top), (denominator, bottom)):
            if result is None:
                return None, f"`{scenario}` was not run"
            if not result.ok:
                return None, f"{name}: {result.status_text()}"
        assert top is not None and bottom is not None
        return top.throughput / bottom.throughput, ""


def _ratio_outcome(lookup: Lookup, text: str, checks: list[tuple[str, str, str, Callable[[float], bool], str]]
                   ) -> Outcome:
    parts: list[str] = []
    met = True
    for label, scenario, denominator, passes, threshold in checks:
        ratio, why = lookup.ratio(scenario, PROXY, denominator)
        if ratio is None:
            parts.append(f"{label}: not measured ({why})")
            met = False
            continue
        parts.append(f"{label}: {ratio:.2f}x (needs {threshold})")
        met = met and passes(ratio)
    return Outcome(text, "; ".join(parts), MET if met else NOT_MET)


def evaluate(results: list[Result], probes: list[ProbeResult]) -> list[Outcome]:
    lookup = Lookup(results)
    outcomes = [
        _ratio_outcome(lookup, "pgbench `-S -c 100` through the proxy at least 1.0x PgBouncer, `-M simple` and "
                       "`-M extended`", [
                           ("simple", pgbench_name("simple", 100), PGBOUNCER_TARGET, lambda r: r >= 1.0, ">= 1.0x"),
                           ("extended", pgbench_name("extended", 100), PGBOUNCER_TARGET, lambda r: r >= 1.0,
                            ">= 1.0x"),
                       ]),
        _ratio_outcome(lookup, "sysbench oltp_point_select through the proxy at least 0.8x direct MariaDB at 10 "
                       "threads, and above direct at 1,000 threads", [
                           ("10 threads", sysbench_name("oltp_point_select", 10), DIRECT, lambda r: r >= 0.8,
                            ">= 0.8x"),
                           ("1,000 threads", sysbench_name("oltp_point_select", 1000), DIRECT, lambda r: r > 1.0,
                            "> 1.0x"),
                       ]),
        _ratio_outcome(lookup, "pgbench `-C` (new connection per transaction) through the proxy at least 1.5x direct", [
            ("-C -c 10", pgbench_name("simple", 10, connect_each=True), DIRECT, lambda r: r >= 1.5, ">= 1.5x"),
        ]),
        _latency_outcome(lookup),
        _idle_outcome(probes),
        _ratio_outcome(lookup, "COPY TO STDOUT (1 GB) through the proxy at least 0.8x direct throughput", [
            ("COPY 1 GB", copy_name(1_000_000), DIRECT, lambda r: r >= 0.8, ">= 0.8x"),
        ]),
    ]
    return outcomes


def _latency_outcome(lookup: Lookup) -> Outcome:
    text = ("Added latency of a simple query at one client at most 60 µs over direct at p50 "
            "(`pgbench -c 1 -S -M simple`)")
    proxy, direct = lookup.get(LATENCY_SCENARIO, PROXY), lookup.get(LATENCY_SCENARIO, DIRECT)
    if proxy is None or direct is None:
        return Outcome(text, f"not measured (`{LATENCY_SCENARIO}` was not run)", NOT_MET)
    for name, result in (("proxy", proxy), ("direct", direct)):
        if not result.ok or result.p50_ms is None:
            return Outcome(text, f"not measured ({name}: {result.status_text()})", NOT_MET)
    assert proxy.p50_ms is not None and direct.p50_ms is not None
    added_us = (proxy.p50_ms - direct.p50_ms) * 1000.0
    measured = f"p50 {proxy.p50_ms * 1000:.0f} µs vs {direct.p50_ms * 1000:.0f} µs direct: +{added_us:.0f} µs"
    return Outcome(text, measured, MET if added_us <= 60.0 else NOT_MET)


def _idle_outcome(probes: list[ProbeResult]) -> Outcome:
    text = "10,000 idle client connections in at most 150 MB RSS for one proxy process"
    probe = next((p for p in probes if p.count == IDLE_TARGET_COUNT), None)
    if probe is None:
        counts = ", ".join(str(p.count) for p in probes) or "none"
        return Outcome(text, f"not measured (idle probe counts in this run: {counts})", NOT_MET)
    if probe.error and probe.connected < probe.count:
        return Outcome(text, f"not measured: {probe.error}", NOT_MET)
    where = "one process" if probe.processes == 1 else f"{probe.processes} processes together"
    measured = (f"{probe.rss_after / 1e6:.0f} MB RSS with {probe.connected:,} idle clients in {where} "
                f"({probe.rss_before / 1e6:.0f} MB before, {probe.per_connection / 1024:.1f} KiB per connection)")
    return Outcome(text, measured, MET if probe.rss_after <= IDLE_TARGET_BYTES else NOT_MET)


def pool_never_exceeded(results: list[Result], pool_size: int) -> Outcome:
    """Not one of the six targets, but the product promises it: the proxy never opens more than its pool."""
    through_proxy = [r for r in results if r.target == PROXY and r.backend_connections_max is not None]
    if not through_proxy:
        return Outcome(f"Backend connections through the proxy never above the pool size ({pool_size})",
                       "not measured", NOT_MET)
    worst = max(through_proxy, key=lambda r: r.backend_connections_max or 0)
    peak = worst.backend_connections_max or 0
    return Outcome(f"Backend connections through the proxy never above the pool size ({pool_size})",
                   f"max {peak} (in `{worst.scenario}`)", MET if peak <= pool_size else NOT_MET)
