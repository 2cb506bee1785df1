"""Running loadtest.serverless from tests, and reading its results table."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def run_harness(args: list[str], out: Path, env: dict[str, str] | None = None) -> str:
    """`python -m loadtest.serverless ARGS --out OUT`; the report (also its standard output)."""
    done = subprocess.run([sys.executable, "-m", "loadtest.serverless", *args, "--out", str(out), "--no-live"],
                          cwd=REPO, capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 0, f"stdout:\n{done.stdout}\nstderr:\n{done.stderr[-4000:]}"
    report = (out / "report.md").read_text()
    assert done.stdout.strip() == report.strip()
    return report


def result_rows(report: str) -> dict[str, list[str]]:
    """target -> cells of the results table."""
    rows = {}
    for line in report.split("## Results", 1)[1].splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 12 and cells[2] in ("direct", "pgbouncer", "proxy"):
            rows[cells[2]] = cells
    return rows
