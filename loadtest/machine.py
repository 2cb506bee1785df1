"""Facts about the machine a run happens on, and the process limits (open files) the harness raises."""

from __future__ import annotations

import contextlib
import os
import platform
import re
import resource
import shutil
import subprocess
from pathlib import Path

from devtools.servers import MARIADBD, PG_BIN_DIR

PGBENCH = os.environ.get("DBPROXY_PGBENCH", str(PG_BIN_DIR / "pgbench"))
PSQL = os.environ.get("DBPROXY_PSQL", str(PG_BIN_DIR / "psql"))
PGBOUNCER = os.environ.get("DBPROXY_PGBOUNCER", shutil.which("pgbouncer") or "/usr/sbin/pgbouncer")
SYSBENCH = os.environ.get("DBPROXY_SYSBENCH", shutil.which("sysbench") or "/usr/bin/sysbench")

#: Open files wanted by every process of a run (1,000-client benchmarks, 50,000 idle connections).
WANTED_OPEN_FILES = 1_048_576


def _nr_open() -> int:
    try:
        return int(Path("/proc/sys/fs/nr_open").read_text().strip())
    except (OSError, ValueError):
        return WANTED_OPEN_FILES


def raise_open_files_limit(wanted: int = WANTED_OPEN_FILES) -> int:
    """Raise RLIMIT_NOFILE as far as allowed (the hard limit too when we may); return the soft limit now in force.

    Children started afterwards inherit it, so this also covers pgbench, sysbench, PgBouncer and the proxy.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = min(wanted, _nr_open())
    if hard != resource.RLIM_INFINITY and hard < target:
        with contextlib.suppress(ValueError, OSError):  # only a privileged process may raise its hard limit
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, target))
            return target
    new_soft = target if hard == resource.RLIM_INFINITY else min(target, hard)
    if new_soft > soft:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (new_soft, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def raise_open_files_to_hard_limit() -> None:
    """``preexec_fn`` for child processes: soft RLIMIT_NOFILE up to the hard limit (no-op on failure)."""
    with contextlib.suppress(ValueError, OSError):
        _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _first_line(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unknown ({exc})"
    text = (out.stdout or out.stderr).strip()
    return text.splitlines()[0] if text else "unknown"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def memory_gib() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / (1024 * 1024)
    except (OSError, ValueError, IndexError):
        pass
    return 0.0


def tool_versions() -> dict[str, str]:
    """Versions of the servers and load generators used in a run."""
    mariadb = _first_line([MARIADBD, "--version"])
    match = re.search(r"Ver\s+(\S+)", mariadb)
    return {
        "PostgreSQL": _first_line([str(PG_BIN_DIR / "postgres"), "--version"]),
        "MariaDB": f"mariadbd {match.group(1)}" if match else mariadb,
        "PgBouncer": _first_line([PGBOUNCER, "--version"]),
        "pgbench": _first_line([PGBENCH, "--version"]),
        "sysbench": _first_line([SYSBENCH, "--version"]),
    }


def machine_facts() -> dict[str, str]:
    """Cores, RAM, CPU model, kernel, Python and tool versions, as display strings."""
    facts = {
        "CPU": f"{cpu_model()} ({os.cpu_count()} cores)",
        "RAM": f"{memory_gib():.1f} GiB",
        "Kernel": f"{platform.system()} {platform.release()}",
        "Python": f"{platform.python_implementation()} {platform.python_version()}",
        "Open files limit": str(resource.getrlimit(resource.RLIMIT_NOFILE)[0]),
    }
    facts.update(tool_versions())
    return facts


def code_version(repo: Path) -> str:
    """The git commit of ``repo`` and which files under proxy/ differ from it (others may be editing them)."""
    head = _first_line(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"])
    try:
        out = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--", "proxy"], capture_output=True,
                             text=True, timeout=10, check=False).stdout
    except (OSError, subprocess.TimeoutExpired):
        return f"commit {head}"
    changed = [line[3:] for line in out.splitlines() if line.strip()]
    if not changed:
        return f"commit {head}, no uncommitted changes under proxy/"
    return f"commit {head} plus uncommitted changes in {', '.join(changed)}"
