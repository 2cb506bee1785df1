"""Running a load generator as a bounded subprocess: a clean environment, a hard timeout, and its error text."""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from loadtest.latency import Percentiles


@dataclass
class Measurement:
    """What a load generator reported for one run (before the harness adds its own samples)."""

    throughput: float = 0.0
    unit: str = "tps"
    work: float = 0.0  # transactions processed (MB for COPY): CPU per unit of work is CPU / work
    latency: Percentiles | None = None
    error: str = ""  # non-empty: the run failed, and this is why (the tool's own words)
    extra: dict[str, Any] = field(default_factory=dict)
    #: Completion times of every transaction (seconds since the epoch, sorted), where the tool logs them.
    completions: list[float] = field(default_factory=list)


@dataclass
class Completed:
    returncode: int
    stdout: str
    stderr: str
    timed_out: bool


def client_env(password: str | None = None, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment without libpq/MySQL variables, TLS off (the three targets compared in plaintext)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("PG") and k not in ("MYSQL_PWD", "MYSQL_HOST", "MYSQL_TCP_PORT")}
    env["PGSSLMODE"] = "disable"  # the proxy offers TLS by default; PostgreSQL and PgBouncer here do not
    env["PGCONNECT_TIMEOUT"] = "30"
    if password is not None:
        env["PGPASSWORD"] = password
    if extra:
        env.update(extra)
    return env


def run_bounded(cmd: Sequence[str], *, timeout: float, env: Mapping[str, str] | None = None,
                discard_stdout: bool = False) -> Completed:
    """Run ``cmd`` to completion or until ``timeout`` seconds (then it is killed); never raises for its failure."""
    try:
        proc = subprocess.run(
            list(cmd), stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL if discard_stdout else subprocess.PIPE,
            stderr=subprocess.PIPE, text=True, env=dict(env) if env is not None else None,
            timeout=timeout, check=False,
        )
    except subprocess.TimeoutExpired as exc:
        def text(value: Any) -> str:
            return value.decode(errors="replace") if isinstance(value, bytes) else (value or "")

        return Completed(-9, text(exc.stdout), text(exc.stderr), True)
    except OSError as exc:
        return Completed(-1, "", f"cannot run {cmd[0]}: {exc}", False)
    return Completed(proc.returncode, proc.stdout or "", proc.stderr or "", False)


_NOISE = re.compile(r"^(pgbench|psql|sysbench):\s*(error:\s*)?", re.IGNORECASE)


def first_error(text: str, markers: Sequence[str] = ("error", "fatal", "aborted", "failed")) -> str:
    """The first line of ``text`` that reads like an error, without the tool's name prefix."""
    for line in text.splitlines():
        lowered = line.lower()
        if any(marker in lowered for marker in markers):
            text = line.strip()
            while _NOISE.match(text):  # interleaved output of several threads can repeat the prefix
                text = _NOISE.sub("", text, count=1)
            return text[:300]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""
