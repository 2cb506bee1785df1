"""A pytest plugin: after the whole run, every proxy log line, audit line and recorded interface output (metrics
pages, API answers, command output) is searched for the test secrets (passwords and tokens); one found fails the
run and names the file and line."""

from __future__ import annotations

from pathlib import Path

import pytest

# Passwords every test setup uses (tests/support.py, tests/replicated.py); tests add what they make.
_SECRETS: set[str] = {"app-secret", "bench-secret", "Monitor-Secret-7c1d"}
_OUTPUTS: list[tuple[str, str]] = []  # (where, text) of interface outputs seen by the tests
SERVER_LOGS = frozenset({"server.log", "error.log"})  # the database servers' own logs: not the proxy's
MIN_LENGTH = 8  # a shorter registered value would match by chance


def register_secret(value: str) -> None:
    """A secret the proxy must never show (a generated password, a signed token)."""
    if len(value) >= MIN_LENGTH:
        _SECRETS.add(value)


def record_output(where: str, text: str) -> None:
    """An interface's output to search at the end of the run (kept only up to a bound)."""
    if len(_OUTPUTS) < 100_000:
        _OUTPUTS.append((where, text))


def _searched_files(root: Path) -> list[Path]:
    return [path for path in root.rglob("*") if path.is_file() and path.name not in SERVER_LOGS
            and (path.suffix in (".log", ".jsonl") or "audit" in path.name)]


def _leaks(root: Path | None) -> list[str]:
    found: list[str] = []
    secrets = sorted(_SECRETS)
    texts: list[tuple[str, str]] = list(_OUTPUTS)
    if root is not None and root.exists():
        for path in _searched_files(root):
            try:
                texts.append((str(path), path.read_text(errors="replace")))
            except OSError:
                continue
    for where, text in texts:
        for number, line in enumerate(text.splitlines(), 1):
            for secret in secrets:
                if secret in line:
                    shown = line.replace(secret, "<secret>")[:200]
                    found.append(f"{where}:{number}: holds a test secret ({secret[:3]}...): {shown}")
    return found


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    factory = getattr(session.config, "_tmp_path_factory", None)
    root = getattr(factory, "_basetemp", None)  # (None when no test made a temporary folder)
    leaks = _leaks(root)
    session.config.stash[_FOUND] = leaks
    if leaks:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


_FOUND = pytest.StashKey[list[str]]()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    leaks = config.stash.get(_FOUND, [])
    searched = len(_OUTPUTS)
    if leaks:
        terminalreporter.section("secrets found in logs or interface outputs", red=True)
        for line in leaks[:50]:
            terminalreporter.line(line)
    else:
        terminalreporter.line(f"leakcheck: no test secret in the proxy logs, audit files or {searched} recorded "
                              "interface outputs")
