"""Module layering: backend connections and wire codecs never import client sessions."""

from __future__ import annotations

import ast
from pathlib import Path

PROXY = Path(__file__).resolve().parent.parent / "proxy"


def imported(path: Path) -> set[str]:
    """Every proxy module `path` imports, TYPE_CHECKING imports included (they tie the concepts too)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {name for name in found if name.startswith("proxy.")}


def test_pool_and_protocol_never_import_session() -> None:
    offenders = {}
    for folder in ("pool", "protocol"):
        for path in sorted((PROXY / folder).rglob("*.py")):
            name = str(path.relative_to(PROXY))
            sessions = sorted(m for m in imported(path) if m.startswith("proxy.session"))
            if sessions:
                offenders[name] = sessions
    assert offenders == {}
