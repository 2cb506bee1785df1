"""Test helpers for auth passthrough: a proxy whose secrets name the lookup user, and a search of its memory."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psutil

from devtools.servers import MariaDBInstance, PostgresInstance
from support import SECRETS, ProxyProcess, _toml_value, running_proxy

SECRETS_FILE = "passthrough-secrets.toml"
MAPPING = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) (\S+)")


@contextmanager
def passthrough_proxy(folder: Path, admin: dict[str, str], pg: PostgresInstance | None = None,
                      mariadb: MariaDBInstance | None = None, **overrides: dict[str, Any]) -> Iterator[ProxyProcess]:
    """A proxy (one worker) whose secrets are the tests' usual ones plus `admin` (the auth_user's)."""
    folder.mkdir(parents=True, exist_ok=True)
    users = {**SECRETS, **admin}
    (folder / SECRETS_FILE).write_text("[users]\n" + "".join(f"{u} = {_toml_value(p)}\n" for u, p in users.items()))
    overrides.setdefault("secrets", {})["file"] = SECRETS_FILE
    with running_proxy(folder, pg, mariadb, **overrides) as proxy:
        yield proxy


def memory_holds(pid: int, needle: bytes) -> list[str]:
    """Where `needle` occurs in the readable memory of process `pid` and its children (read as root through
    /proc/<pid>/mem): one "pid:address" per hit."""
    hits: list[str] = []
    process = psutil.Process(pid)
    for each in [process, *process.children(recursive=True)]:
        hits.extend(f"{each.pid}:{hex(at)}" for at in _search(each.pid, needle))
    return hits


def _search(pid: int, needle: bytes) -> Iterator[int]:
    with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
        for line in maps:
            match = MAPPING.match(line)
            if match is None or not match.group(3).startswith("r") or line.rstrip().endswith("[vvar]"):
                continue
            start, end = int(match.group(1), 16), int(match.group(2), 16)
            try:
                mem.seek(start)
                data = mem.read(end - start)
            except (OSError, ValueError, OverflowError):
                continue
            at = data.find(needle)
            while at >= 0:
                yield start + at
                at = data.find(needle, at + 1)
