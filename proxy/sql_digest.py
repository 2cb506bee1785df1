"""Normalized statement text: literals replaced by `?`, comments dropped, lists and whitespace folded."""

from __future__ import annotations

import re
from collections import OrderedDict

# One pass over the text; what each alternative matches decides what it becomes (see _replace).
_COMMON = (
    r"(?P<comment>--[^\n]*|/\*.*?(?:\*/|\Z))"
    r"|(?P<dollar>\$(?P<tag>[A-Za-z_][A-Za-z_0-9]*|)\$.*?(?:\$(?P=tag)\$|\Z))"
    r"|(?P<param>\$\d+)"
)
_NUMBER = r"|(?P<number>(?P<minus>-\s*)?(?:0[xX][0-9A-Fa-f]+|(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?))(?![A-Za-z_0-9$])"
_WORD = r"|(?P<word>[A-Za-z_][A-Za-z_0-9$]*)"
POSTGRES = re.compile(
    _COMMON
    + r"|(?P<string>[EeBbXxNnUu]&?'(?:[^'\\]|\\.|'')*(?:'|\Z)|'(?:[^']|'')*(?:'|\Z))"
    + r"|(?P<ident>\"(?:[^\"]|\"\")*\")"
    + _WORD + _NUMBER,
    re.DOTALL,
)
MYSQL = re.compile(
    _COMMON.replace(r"--[^\n]*", r"--[ \t][^\n]*|--$|#[^\n]*")
    + r"|(?P<string>(?:_[A-Za-z0-9]+\s*)?[BbXxNn]?'(?:[^'\\]|\\.|'')*(?:'|\Z)|\"(?:[^\"\\]|\\.|\"\")*(?:\"|\Z))"
    + r"|(?P<ident>`(?:[^`]|``)*`)"
    + _WORD + _NUMBER,
    re.DOTALL,
)
# A literal after one of these is a signed number ("= -1"); after anything else the minus is an operator ("a -1").
_SIGN_CONTEXT = frozenset("=<>(,+-*/%|&^~[")
_VALUE_LIST = re.compile(r"\(\s*\?(?:\s*,\s*\?)+\s*\)")
_ROW_LIST = re.compile(r"(\((?:\?|\.\.\.)(?:, \?)*\))(?:\s*,\s*\((?:\?|\.\.\.)(?:, \?)*\))+")
_SPACE = re.compile(r"\s+")
_KEPT = ("ident", "word", "param")
CACHE_SIZE = 512  # texts seen before (prepared statements, repeated queries) are not scanned again
MAX_TEXT = 8192  # characters of a statement normalized; a longer one is cut there (its digest ends in "...")


def _replace(match: re.Match[str]) -> str:
    kind = match.lastgroup
    if kind == "tag":  # the lastgroup of a dollar-quoted string is its tag
        kind = "dollar"
    if kind in _KEPT:
        return match.group()
    if kind == "comment":
        return " "
    if kind == "number" and match.group("minus"):
        before = match.string[:match.start()].rstrip()
        if before and before[-1] not in _SIGN_CONTEXT and not before.upper().endswith(
                ("SELECT", "WHERE", "AND", "OR", "NOT", "THEN", "ELSE", "WHEN", "RETURN", "BY", "LIMIT")):
            return "- ?"
    return "?"


def normalize(text: str, engine: str = "postgresql") -> str:
    """The statement with its literals as `?`, IN lists and VALUES rows folded, comments and spacing dropped."""
    cut = len(text) > MAX_TEXT
    pattern = MYSQL if engine == "mysql" else POSTGRES
    folded = pattern.sub(_replace, text[:MAX_TEXT] if cut else text)
    folded = _SPACE.sub(" ", folded).strip().rstrip(";").rstrip()
    folded = _VALUE_LIST.sub("(...)", folded)
    folded = _ROW_LIST.sub(r"\1, ...", folded)
    return folded + " ..." if cut else folded


# Texts that differ only in these numbers have one digest (a digit after a letter, `$`, `.` or another digit is
# part of a name, a parameter or a number, and kept); found with one C-speed pass instead of the full scan.
_NUMBERS = re.compile(rb"(?<![A-Za-z0-9_$.])[0-9]+")


class Digester:
    """normalize() for one engine, with recent digests kept by text and by text with its numbers folded (most
    statements repeat, or differ only in their numbers)."""

    def __init__(self, engine: str, cache_size: int = CACHE_SIZE) -> None:
        self.engine = engine
        self.cache_size = cache_size
        self._cache: OrderedDict[bytes, str] = OrderedDict()

    def digest(self, text: bytes) -> str:
        """The normalized form of `text` (bytes as they came from the client)."""
        cache = self._cache
        found = cache.get(text)
        if found is not None:
            return found
        shape = _NUMBERS.sub(b"0", text)
        found = cache.get(shape)
        if found is None:
            found = normalize(text.decode("utf-8", "replace"), self.engine)
            cache[shape] = found
            if len(cache) > self.cache_size:
                cache.popitem(last=False)
        return found
