"""Normalized statement text: literals replaced by `?`, comments dropped, lists and whitespace folded."""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Callable
from operator import itemgetter
from typing import Any

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


# A text's shape: every digit made 0. Texts of one shape tokenize alike (they differ only in digit values at the same
# places), so their digests differ only where a digit is kept (in a name, a parameter): those places are noted
# once per shape and their digits pick the digest. One C-speed translate instead of a scan per statement.
_ZEROS = bytes.maketrans(b"123456789", b"000000000")
DIGESTS_PER_SHAPE = 64  # kept digits seen per shape (sbtest1..sbtestN, $1..$N); beyond this the shape starts over


def _kept_digits(text: str, engine: str) -> list[int]:
    """Where `text` has digits that its digest keeps: in names and parameters, not in literals or comments."""
    pattern = MYSQL if engine == "mysql" else POSTGRES
    gone = [match.span() for match in pattern.finditer(text[:MAX_TEXT]) if match.lastgroup not in _KEPT]
    kept = []
    for index, char in enumerate(text[:MAX_TEXT]):
        if "0" <= char <= "9" and not any(start <= index < end for start, end in gone):
            kept.append(index)
    return kept


class Digester:
    """normalize() for one engine, with recent digests kept by shape (most statements repeat, or differ only in
    their literal numbers); a text that is not ASCII, or whose shape has a 0x, is kept by its whole text."""

    def __init__(self, engine: str, cache_size: int = CACHE_SIZE) -> None:
        self.engine = engine
        self.cache_size = cache_size
        self._shapes: OrderedDict[bytes, tuple[Callable[[bytes], Any] | None, dict[Any, str]]] = OrderedDict()
        self._texts: OrderedDict[bytes, str] = OrderedDict()

    def digest(self, text: bytes) -> str:
        """The normalized form of `text` (bytes as they came from the client)."""
        shape = text.translate(_ZEROS)
        found = self._shapes.get(shape)
        if found is not None:
            pick, digests = found
            digest = digests.get(pick(text) if pick is not None else None)
            if digest is not None:
                return digest
        elif not text.isascii() or b"0x" in shape or b"0X" in shape:
            return self._by_text(text)
        decoded = text.decode("ascii")
        digest = normalize(decoded, self.engine)
        if found is None:
            kept = _kept_digits(decoded, self.engine)
            found = self._shapes[shape] = (itemgetter(*kept) if kept else None, {})
            if len(self._shapes) > self.cache_size:
                self._shapes.popitem(last=False)
        pick, digests = found
        if len(digests) >= DIGESTS_PER_SHAPE:
            digests.clear()
        digests[pick(text) if pick is not None else None] = digest
        return digest

    def _by_text(self, text: bytes) -> str:
        texts = self._texts
        digest = texts.get(text)
        if digest is None:
            digest = texts[text] = normalize(text.decode("utf-8", "replace"), self.engine)
            if len(texts) > self.cache_size:
                texts.popitem(last=False)
        return digest
