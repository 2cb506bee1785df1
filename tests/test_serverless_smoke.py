"""Smoke test of loadtest.serverless: a small spike on its own stack (direct, PgBouncer, the proxy)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from serverless_support import result_rows, run_harness


@pytest.mark.timeout(90)
def test_spike_fails_direct_and_is_served_by_the_proxy_on_a_bounded_pool(tmp_path: Path) -> None:
    report = run_harness(["--engine", "postgresql", "--profile", "spike", "--invocations", "100",
                          "--max-connections", "15", "--pool-size", "5", "--rounds", "1"], tmp_path)
    rows = result_rows(report)
    assert set(rows) == {"direct", "pgbouncer", "proxy"}, report
    assert "too many connections (53300)" in rows["direct"][5], rows["direct"]
    assert not rows["direct"][4].startswith("100 "), "15 connection slots cannot take a spike of 100"
    for target in ("pgbouncer", "proxy"):
        assert rows[target][4] == "100 (100.0%)" and rows[target][5] == "none", rows[target]
        assert 1 <= int(rows[target][9]) <= 5, f"{target} used more backends than its pool: {rows[target]}"
        assert float(rows[target][8].replace(",", "")) > 0
        assert re.fullmatch(r"[\d,.]+ / [\d,.]+ / [\d,.]+", rows[target][6])
    assert "through the proxy 100 of 100 served (100.0%)" in report
    assert "connects per second**: proxy" in report
    png = tmp_path / "postgresql-spike.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "![postgresql-spike](postgresql-spike.png)" in report
