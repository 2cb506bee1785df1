"""What one scenario run against one target measured, and how a run's results are saved."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

OK = "ok"
FAILED = "failed"
NOT_AVAILABLE = "n/a"


@dataclass
class Result:
    """One cell of the comparison: a scenario against one target (direct, pgbouncer or proxy)."""

    scenario: str
    group: str  # scenarios plotted together, e.g. "pgbench -S -M simple"
    engine: str
    target: str
    status: str = OK  # OK, FAILED or NOT_AVAILABLE
    reason: str = ""  # why it failed / is not available (the tool's own error text)
    throughput: float = 0.0
    unit: str = "tps"
    work: float = 0.0  # transactions processed (MB copied for COPY) during the run
    p50_ms: float | None = None
    p99_ms: float | None = None
    latency_samples: int = 0
    middleman_cpu_s: float | None = None  # user+sys of PgBouncer / the proxy over the scenario
    middleman_user_s: float | None = None  # user CPU of all the middleman's processes (None in older results)
    middleman_sys_s: float | None = None  # system CPU of all the middleman's processes
    #: CPU µs per transaction over the steady part of a pgbench run (logins excluded); None: use the totals
    steady_user_us: float | None = None
    steady_sys_us: float | None = None
    middleman_peak_rss: int | None = None  # bytes
    backend_connections_max: int | None = None
    other_cpu_s: float | None = None  # CPU used meanwhile by processes outside the benchmark (noise indicator)
    concurrency: int = 0
    wall_seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == OK

    def status_text(self) -> str:
        if self.status == OK:
            return "ok"
        if self.status == NOT_AVAILABLE:
            return self.reason if self.reason.startswith("n/a") else f"n/a ({self.reason})"
        return f"failed: {self.reason}"

    def cpu_us_per_unit(self) -> tuple[float, float] | None:
        """The middleman's (user, system) CPU µs per transaction (per MB for COPY): steady part, else whole run."""
        if not self.ok:
            return None
        if self.steady_user_us is not None and self.steady_sys_us is not None:
            return self.steady_user_us, self.steady_sys_us
        if not self.work or self.middleman_user_s is None or self.middleman_sys_s is None:
            return None
        return self.middleman_user_s * 1e6 / self.work, self.middleman_sys_s * 1e6 / self.work


def save_results(path: Path, results: list[Result], meta: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"meta": meta, "results": [asdict(r) for r in results]}, indent=1))


def load_results(path: Path) -> tuple[list[Result], dict[str, Any]]:
    """Results saved by this or an older version of the harness (fields added since take their defaults)."""
    data = json.loads(path.read_text())
    known = set(Result.__dataclass_fields__)
    return [Result(**{k: v for k, v in row.items() if k in known}) for row in data["results"]], data["meta"]
