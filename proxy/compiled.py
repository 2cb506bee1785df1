"""The hot-path modules mypyc compiles at install time, and the switch that runs their Python source instead."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys
import warnings
from collections.abc import Sequence
from importlib.machinery import ModuleSpec
from pathlib import Path
from types import ModuleType

# One source: these typed modules run interpreted where no compiler is present, compiled where setup.py built them.
# They are compiled together (they call each other natively), so they are used all compiled or all interpreted.
MODULES = (
    "proxy.protocol.pg.messages",
    "proxy.protocol.pg.extended",
    "proxy.protocol.pg.replies",
    "proxy.protocol.mysql.packets",
    "proxy.protocol.mysql.outcome",
    "proxy.protocol.mysql.statements",
    "proxy.session.replay_log",
    "proxy.sql_digest",
    "proxy.insights",
    "proxy.query_clock",
)
SWITCH = "DBPROXY_COMPILED"  # "0": run the Python source even where a compiled build is present
PACKAGE_ROOT = Path(__file__).resolve().parent.parent


def source_path(module: str) -> Path:
    return PACKAGE_ROOT.joinpath(*module.split(".")).with_suffix(".py")


def _builds(module: str) -> list[Path]:
    source = source_path(module)
    return [path for suffix in importlib.machinery.EXTENSION_SUFFIXES
            if (path := source.with_name(source.stem + suffix)).exists()]


def unusable_build() -> str:
    """Why the compiled build present cannot run ("" when it can, or when there is none: nothing was compiled).

    A build is usable when every module has one (they are compiled as a group, one calls another natively) and
    no source changed after it was built (an edit since `pip install -e .`)."""
    builds = {module: _builds(module) for module in MODULES}
    if not any(builds.values()):
        return ""
    missing = [module for module, paths in builds.items() if not paths]
    if missing:
        return f"{', '.join(missing)} not compiled"
    # The compiled code is in the group's library (`<hash>__mypyc...so` beside the package); a module's own file is a
    # small stub that a rebuild leaves as it was. A source newer than both was edited after the last build.
    library = max((path.stat().st_mtime for path in PACKAGE_ROOT.glob("*__mypyc.*")), default=0.0)
    stale = [module for module, paths in builds.items()
             if source_path(module).stat().st_mtime > max(library, *(path.stat().st_mtime for path in paths))]
    return f"{', '.join(stale)} changed after it was compiled" if stale else ""


def in_use() -> bool:
    """Whether the compiled build of the hot path is what runs in this process."""
    module = sys.modules.get(MODULES[-1]) or importlib.import_module(MODULES[-1])
    return not (module.__file__ or "").endswith(".py")


class _SourceFirst:
    """A meta path finder that loads the hot-path modules from their .py files, never from a compiled build."""

    @staticmethod
    def find_spec(name: str, path: Sequence[str] | None = None, target: ModuleType | None = None) -> ModuleSpec | None:
        if name not in MODULES:
            return None
        return importlib.util.spec_from_file_location(name, source_path(name))


def choose() -> None:
    """At import of the package: the source runs if asked (DBPROXY_COMPILED=0) or if a build is stale."""
    if any(isinstance(finder, _SourceFirst) for finder in sys.meta_path):
        return
    if os.environ.get(SWITCH) == "0":
        sys.meta_path.insert(0, _SourceFirst())
        return
    reason = unusable_build()
    if reason:
        warnings.warn(f"{reason}: running the Python source of the hot path; `pip install -e .` compiles it again",
                      RuntimeWarning, stacklevel=2)
        sys.meta_path.insert(0, _SourceFirst())
