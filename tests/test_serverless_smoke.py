"""Smoke test of loadtest.serverless: a small spike on its own stack, and targets given on the command line."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from devtools.servers import MariaDBInstance
from support import ProxyProcess

REPO = Path(__file__).resolve().parent.parent


def _run(args: list[str], out: Path, env: dict[str, str] | None = None) -> str:
    done = subprocess.run([sys.executable, "-m", "loadtest.serverless", *args, "--out", str(out), "--no-live"],
                          cwd=REPO, capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 0, f"stdout:\n{done.stdout}\nstderr:\n{done.stderr[-4000:]}"
    report = (out / "report.md").read_text()
    assert done.stdout.strip() == report.strip()
    return report


def _rows(report: str) -> dict[str, list[str]]:
    """target -> cells of the results table."""
    rows = {}
    for line in report.split("## Results", 1)[1].splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 12 and cells[2] in ("direct", "pgbouncer", "proxy"):
            rows[cells[2]] = cells
    return rows


@pytest.mark.timeout(90)
def test_spike_fails_direct_and_is_served_by_the_proxy_on_a_bounded_pool(tmp_path: Path) -> None:
    report = _run(["--engine", "postgresql", "--profile", "spike", "--invocations", "150", "--max-connections", "20",
                   "--pool-size", "5", "--rounds", "1"], tmp_path)
    rows = _rows(report)
    assert set(rows) == {"direct", "pgbouncer", "proxy"}, report
    assert "too many connections (53300)" in rows["direct"][5], rows["direct"]
    assert not rows["direct"][4].startswith("150 "), "20 connection slots cannot take a spike of 150"
    for target in ("pgbouncer", "proxy"):
        assert rows[target][4] == "150 (100.0%)" and rows[target][5] == "none", rows[target]
        assert 1 <= int(rows[target][9]) <= 5, f"{target} used more backends than its pool: {rows[target]}"
        assert float(rows[target][8].replace(",", "")) > 0
        assert re.fullmatch(r"[\d,.]+ / [\d,.]+ / [\d,.]+", rows[target][6])
    assert "through the proxy 150 of 150 served (100.0%)" in report
    assert "connects per second**: proxy" in report
    png = tmp_path / "postgresql-spike.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "![postgresql-spike](postgresql-spike.png)" in report


@pytest.mark.timeout(90)
def test_given_targets_and_password_from_the_environment(tmp_path: Path, mariadb_server: MariaDBInstance,
                                                         mysql_proxy: ProxyProcess) -> None:
    env = {**os.environ, "SERVERLESS_PASSWORD": "app-secret"}
    report = _run(["--engine", "mysql", "--profile", "steady", "--rate", "100", "--duration", "1",
                   "--direct", f"127.0.0.1:{mariadb_server.port}", "--proxy", f"127.0.0.1:{mysql_proxy.ports['mysql']}",
                   "--user", "app", "--password-env", "SERVERLESS_PASSWORD", "--rounds", "1"], tmp_path, env)
    rows = _rows(report)
    assert set(rows) == {"direct", "proxy"}
    for cells in rows.values():
        assert cells[3] == "100" and cells[4] == "100 (100.0%)", cells
        assert int(cells[9]) >= 1  # the app's sessions counted on the database given with --direct
    assert "app-secret" not in report


def test_wrong_password_is_counted_as_an_authentication_error(tmp_path: Path, mariadb_server: MariaDBInstance,
                                                               mysql_proxy: ProxyProcess) -> None:
    report = _run(["--engine", "mysql", "--profile", "spike", "--invocations", "10", "--rounds", "1",
                   "--proxy", f"127.0.0.1:{mysql_proxy.ports['mysql']}", "--user", "app", "--password", "wrong"],
                  tmp_path)
    (cells,) = _rows(report).values()
    assert cells[4] == "0 (0.0%)" and cells[5] == "authentication (1045): 10", cells
