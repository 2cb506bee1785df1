"""Test helpers for secrets: a folder laid out as the kubelet mounts a Secret, and its atomic update."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import time
from pathlib import Path

from leakcheck import register_secret
from support import ProxyProcess

_serial = itertools.count()


def kubelet_write(folder: Path, entries: dict[str, str]) -> None:
    """Write `entries` as the kubelet does: a new timestamped folder, `..data` swapped to it by rename, a symlink
    per key to `..data/KEY`, the previous timestamped folder removed."""
    folder.mkdir(parents=True, exist_ok=True)
    stamp = f"..2026_12_02_01_00_00.{os.getpid()}{next(_serial):06d}"
    (folder / stamp).mkdir()
    for key, value in entries.items():
        (folder / stamp / key).write_text(value + "\n")
    old = os.readlink(folder / "..data") if (folder / "..data").is_symlink() else None
    os.symlink(stamp, folder / "..data_tmp")
    os.replace(folder / "..data_tmp", folder / "..data")
    for key in entries:
        if not (folder / key).is_symlink():
            os.symlink(f"..data/{key}", folder / key)
    for name in os.listdir(folder):
        if not name.startswith(".") and name not in entries:
            (folder / name).unlink()
    if old is not None:
        for file in (folder / old).iterdir():
            file.unlink()
        (folder / old).rmdir()


def dbproxy(*args: str, stdin: str = "", env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`python -m proxy ARGS` (this checkout's), its output captured."""
    return subprocess.run([sys.executable, "-m", "proxy", *args], input=stdin, capture_output=True, text=True,
                          timeout=60, env=env)


def wait_for_count(proxy: ProxyProcess, text: str, count: int, timeout: float = 10.0) -> None:
    """Wait until `text` appears `count` times in the proxy's log."""
    deadline = time.monotonic() + timeout
    while proxy.log().count(text) < count:
        assert time.monotonic() < deadline, proxy.log()[-3000:]
        time.sleep(0.05)


def stored(proxy: ProxyProcess, entry: str) -> str:
    """What `dbproxy secrets get` says the store holds for `entry` (registered as a secret for the leak check)."""
    got = dbproxy("secrets", "get", "--user", entry, "-c", str(proxy.config))
    assert got.returncode == 0, got.stderr
    value = got.stdout.removesuffix("\n")
    register_secret(value)  # a rotated password: never in a log (tests/leakcheck.py)
    return value
