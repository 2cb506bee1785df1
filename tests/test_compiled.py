"""The compiled hot path: built from the same source, used when present and current, and the codec tables pass
interpreted too (DBPROXY_COMPILED=0), so both builds stay correct."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from proxy import compiled

REPO = Path(__file__).resolve().parent.parent
# The unit tables of the modules that are compiled: they run again, interpreted, in a process of their own.
CODEC_TABLES = ["tests/test_pg_codec.py", "tests/test_pg_replies_unit.py", "tests/test_mysql_codec.py",
                "tests/test_pg_replay_unit.py", "tests/test_mysql_session_unit.py", "tests/test_sql_digest.py"]


def test_every_compiled_module_has_its_source_and_the_build_is_current() -> None:
    for module in compiled.MODULES:
        assert compiled.source_path(module).is_file(), module
    assert compiled.unusable_build() == ""


@pytest.mark.skipif(os.environ.get("CI") != "true", reason="a build is required on CI only (setup.py compiles it)")
def test_ci_runs_the_compiled_build() -> None:
    assert compiled.in_use(), "the suite must run against the compiled hot path on CI"


def test_the_switch_runs_the_source() -> None:
    code = ("import proxy.compiled as c, proxy.protocol.pg.replies as r, proxy.query_clock as q; "
            "print(c.in_use(), r.__file__.endswith('.py'), q.__file__.endswith('.py'))")
    done = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, DBPROXY_COMPILED="0"), cwd=REPO,
                          capture_output=True, text=True, timeout=60, check=True)
    assert done.stdout.split() == ["False", "True", "True"]


def test_a_partial_or_stale_build_is_not_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for module in compiled.MODULES:
        source = tmp_path.joinpath(*module.split(".")).with_suffix(".py")
        source.parent.mkdir(parents=True, exist_ok=True)
        source.write_text("")
    monkeypatch.setattr(compiled, "PACKAGE_ROOT", tmp_path)
    assert compiled.unusable_build() == ""  # nothing compiled: the source runs, nothing to say
    suffix = compiled.importlib.machinery.EXTENSION_SUFFIXES[0]
    first = compiled.source_path(compiled.MODULES[0])
    build = first.with_name(first.stem + suffix)
    build.write_bytes(b"")
    assert "not compiled" in compiled.unusable_build()
    for module in compiled.MODULES[1:]:
        source = compiled.source_path(module)
        source.with_name(source.stem + suffix).write_bytes(b"")
    assert compiled.unusable_build() == ""
    os.utime(first, (build.stat().st_mtime + 10, build.stat().st_mtime + 10))
    assert "changed after it was compiled" in compiled.unusable_build()


@pytest.mark.timeout(240)
def test_codec_tables_pass_interpreted(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:randomly",
                           f"--basetemp={tmp_path / 'run'}", *CODEC_TABLES],
                          env=dict(os.environ, DBPROXY_COMPILED="0"), cwd=REPO, capture_output=True, text=True,
                          timeout=220)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert " passed" in done.stdout and "failed" not in done.stdout
