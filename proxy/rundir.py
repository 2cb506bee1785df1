"""Where worker processes find each other (the supervisor's folder of unix sockets), who we are, and the pid file."""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from pathlib import Path


def run_dir() -> Path | None:
    """The folder of the workers' unix sockets, when running under a supervisor."""
    folder = os.environ.get("DBPROXY_RUNDIR")
    return Path(folder) if folder else None


def worker_channel(index: int, folder: Path | None = None) -> Path:
    """The unix socket of worker `index`'s internal channel (in `folder`, or this process's run folder)."""
    folder = folder or run_dir()
    if folder is None:
        raise RuntimeError("not running under a supervisor")
    return folder / f"worker-{index}.sock"


def worker_config_path(folder: Path | None = None) -> Path:
    """Where the supervisor leaves a reloaded configuration, validated, for its workers."""
    folder = folder or run_dir()
    if folder is None:
        raise RuntimeError("not running under a supervisor")
    return folder / "config.json"


def worker_index() -> int:
    return int(os.environ.get("DBPROXY_WORKER", "0"))


def worker_count() -> int:
    """How many worker processes share the backend budget."""
    return max(1, int(os.environ.get("DBPROXY_WORKERS", "1")))


def pid_file_path(config_path: Path | None, configured: Path | None) -> Path:
    """The pid file: `[server] pid_file`, else one in the temporary folder named after the config file's path."""
    if configured is not None:
        return configured
    name = str(config_path.resolve()) if config_path is not None else "(built-in defaults)"
    digest = hashlib.sha256(name.encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"dbproxy.{digest}.pid"


def write_pid_file(path: Path) -> None:
    """Write this process's pid (replacing the file at once, so a reader never sees half of it)."""
    partial = path.with_name(path.name + f".{os.getpid()}")
    partial.write_text(f"{os.getpid()}\n")
    partial.replace(path)


def remove_pid_file(path: Path) -> None:
    """Remove the pid file if it is still this process's."""
    with contextlib.suppress(OSError, ValueError):
        if int(path.read_text().strip()) == os.getpid():
            path.unlink()


def read_pid_file(path: Path) -> int:
    """The pid in the file (OSError, ValueError when it is missing or not a pid)."""
    return int(path.read_text().strip())


def looks_like_dbproxy(pid: int) -> bool:
    """Whether process `pid` runs dbproxy (`dbproxy run` or `python -m proxy run`), so a stale pid file never gets
    another program signalled; True where /proc cannot tell."""
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except FileNotFoundError:
        return not Path("/proc/self").exists()
    except OSError:
        return True
    return b"run" in args and any(arg == b"proxy" or arg.endswith(b"dbproxy") for arg in args)
