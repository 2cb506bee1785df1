"""Smoke test of the load-test harness: a --quick bench run and a small idle-connection probe, as subprocesses."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
NUMBER = re.compile(r"[\d,]+(?:\.\d+)?")


def _run(args: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, check=False)


def _rows(output: str, heading: str, prefix: str = "| `") -> list[list[str]]:
    """Rows of the table printed under ``## heading`` (up to the next heading) whose first cell starts so."""
    rows = []
    section = output.split(f"## {heading}", 1)[-1].split("\n## ", 1)[0]
    for line in section.splitlines():
        if line.startswith(prefix):
            rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    return rows


def _results_rows(output: str) -> list[list[str]]:
    """Rows of the results table (scenario, target, throughput, ...), the first table printed."""
    return _rows(output, "Results")


def _number(cell: str) -> float:
    match = NUMBER.fullmatch(cell)
    assert match is not None, f"not a number: {cell!r}"
    return float(cell.replace(",", ""))


def _assert_cpu_per_transaction(output: str) -> None:
    """PgBouncer's and the proxy's user and system µs per transaction, as numbers, for pgbench simple."""
    rows = {row[0]: row for row in _rows(output, "CPU per transaction")}
    row = next((r for name, r in rows.items() if name.startswith("`pgbench -S -M simple -c") and
                not name.endswith("-c 1`")), None)
    assert row is not None, output
    bouncer_user, bouncer_sys, proxy_user, proxy_sys = (_number(cell) for cell in row[1:5])
    assert bouncer_user + bouncer_sys > 0 and proxy_user + proxy_sys > 0, row
    assert re.fullmatch(r"[\d.]+x", row[5]), row
    assert re.search(r"sysbench `oltp_point_select` query vs per `pgbench -S -M simple` transaction .*: "
                     r"[\d.,]+ µs vs [\d.,]+ µs, [\d.]+x", output), output


def _assert_syscalls(output: str) -> None:
    """The strace step's table: reads, writes, epoll waits, others and total per transaction for both."""
    rows = {row[0]: row for row in _rows(output, "System calls per transaction", prefix="| ")
            if row[0] in ("pgbouncer", "proxy")}
    assert set(rows) == {"pgbouncer", "proxy"}, output
    for name, row in rows.items():
        if shutil.which("strace") is None:
            assert "apt-get install strace" in row[-1], row
            continue
        assert row[-1] == "ok", row
        reads, writes, waits, others, total = (_number(cell) for cell in row[3:8])
        assert reads > 0 and writes > 0 and total >= reads + writes, (name, row)
        assert waits >= 0 and others >= 0, (name, row)


@pytest.mark.timeout(200)
def test_quick_bench_prints_a_table_for_every_target() -> None:
    done = _run(["loadtest.bench", "--quick", "--no-write"], timeout=150)
    assert done.returncode == 0, f"stdout:\n{done.stdout}\nstderr:\n{done.stderr[-4000:]}"
    throughput: dict[str, float] = {}
    for row in _results_rows(done.stdout):
        scenario, target, cell = row[0], row[1], row[2]
        if scenario.startswith("`pgbench -S -M simple -c") and not scenario.endswith("-c 1`"):
            match = NUMBER.match(cell)
            throughput[target] = float(match.group().replace(",", "")) if match else 0.0
    assert set(throughput) == {"direct", "pgbouncer", "proxy"}, done.stdout
    for target, value in throughput.items():
        assert value > 0, f"{target} had no pgbench simple throughput:\n{done.stdout}"
    _assert_cpu_per_transaction(done.stdout)
    _assert_syscalls(done.stdout)
    assert "## Targets" in done.stdout
    assert "| 200 | 200 |" in done.stdout, "the idle probe row is missing"


@pytest.mark.timeout(150)
def test_idle_probe_reports_memory_per_connection() -> None:
    done = _run(["loadtest.idle_probe", "--counts", "200"], timeout=120)
    assert done.returncode == 0, f"stdout:\n{done.stdout}\nstderr:\n{done.stderr[-4000:]}"
    match = re.search(r"^\s*200 idle clients: RSS .* ([\d.]+) KiB per connection", done.stdout, re.MULTILINE)
    assert match, done.stdout
    assert float(match.group(1)) > 0


@pytest.mark.timeout(60)
def test_auth_throttle_prints_latencies_and_throttled_attempts() -> None:
    done = _run(["loadtest.auth_throttle", "--engine", "postgresql", "--attempts", "100", "--concurrency", "10",
                 "--quiet", "0.5", "--good-rate", "50"], timeout=40)
    assert done.returncode == 0, f"stdout:\n{done.stdout}\nstderr:\n{done.stderr[-4000:]}"
    for phase in ("before", "during"):
        assert re.search(rf"good logins from 127\.0\.0\.1, {phase} the burst: n=\s*\d+\s+p50\s+[\d.]+ ms\s+p99\s+"
                         r"[\d.]+ ms", done.stdout), done.stdout
    found = re.search(r"100 wrong-password attempts \(10 at once\) in [\d.]+ s: (\d+) throttled, (\d+) failed",
                      done.stdout)
    assert found is not None, done.stdout
    throttled, failed = int(found.group(1)), int(found.group(2))
    assert (throttled, failed) == (80, 20), done.stdout
