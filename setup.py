"""Build of dbproxy: the hot-path modules (proxy.compiled.MODULES) are compiled by mypyc from their Python source.

DBPROXY_COMPILE=0 skips the compilation (the package then runs interpreted, as it does where mypyc is missing)."""

import os
import sys

from setuptools import setup

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from proxy.compiled import MODULES, source_path


def extensions() -> list:
    if os.environ.get("DBPROXY_COMPILE", "1") == "0":
        return []
    try:
        from mypyc.build import mypycify
    except ImportError:
        print("mypyc is not installed: the hot path runs interpreted", file=sys.stderr)
        return []
    root = os.path.dirname(os.path.abspath(__file__))
    built = mypycify([os.path.relpath(source_path(module), root) for module in MODULES], opt_level="3")
    for extension in built:
        extension.optional = True  # no C compiler: a warning, and the package runs interpreted (proxy.compiled)
    return built


setup(ext_modules=extensions())
