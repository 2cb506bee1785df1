"""ruff and mypy are part of the test suite: the code base stays clean."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(*command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *command], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_ruff() -> None:
    result = run("ruff", "check", "proxy", "devtools", "tests", "loadtest")
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy() -> None:
    result = run("mypy", "proxy", "devtools", "loadtest")
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_module_opens_with_a_docstring() -> None:
    missing = [str(path.relative_to(ROOT)) for folder in ("proxy", "loadtest") for path in (ROOT / folder).rglob("*.py")
               if not path.read_text().lstrip().startswith('"""')]
    assert not missing, missing
