"""Where worker processes find each other: the supervisor's folder of unix sockets, and who we are."""

from __future__ import annotations

import os
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


def worker_index() -> int:
    return int(os.environ.get("DBPROXY_WORKER", "0"))


def worker_count() -> int:
    """How many worker processes share the backend budget."""
    return max(1, int(os.environ.get("DBPROXY_WORKERS", "1")))
