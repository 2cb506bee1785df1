"""`python -m loadtest.failover_compare`, one PostgreSQL round: numbers for both kinds of client, the proxy's under
a second after the promotion."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ROUND_WITHIN = 120.0  # seconds for the whole run (about 10 s on an idle 2-core machine)


def test_one_postgresql_round_measures_both_kinds(tmp_path: Path) -> None:
    results = tmp_path / "failover.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    run = subprocess.run(
        [sys.executable, "-m", "loadtest.failover_compare", "--engines", "postgresql", "--rounds", "1",
         "--clients", "2", "--gap", "0.5", "--results", str(results)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=ROUND_WITHIN,
    )
    assert run.returncode in (0, 1), run.stdout + run.stderr
    print(run.stdout)
    data = json.loads(results.read_text())
    summary = {row["kind"]: row for row in data["summary"]}
    assert set(summary) == {"proxy", "direct"}, summary
    for row in summary.values():
        assert row["engine"] == "postgresql" and row["clients"] == 2
        assert row["wrote_again"] == 2, row  # every client wrote again after the failover
        assert row["median_s"] is not None and row["max_s"] is not None
    clients = data["rounds"][0]["clients"]
    assert all(c["writes_before_kill"] > 0 for c in clients), clients
    assert all(c["new_connections"] >= 1 for c in clients if c["kind"] == "direct"), clients  # they reconnected
    assert summary["proxy"]["max_s"] < 1.0, run.stdout
    assert summary["proxy"]["target_met"] is True
    assert "proxy / direct median" in run.stdout
