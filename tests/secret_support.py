"""Test helpers for secrets: a folder laid out as the kubelet mounts a Secret, and its atomic update."""

from __future__ import annotations

import itertools
import os
from pathlib import Path

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
