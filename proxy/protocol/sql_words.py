"""Whole SQL words found fast: the text folded to lowercase words separated by spaces, then one regex pass.

A pattern of the form `(?i)\\b(?:word|...)\\b` gives the regex engine nothing to skip ahead with, so it tries every
alternative at every byte; on the folded text the same words are ` (?:word|...)\\b`, whose leading space lets it
jump from one word start to the next. Word characters are those of a bytes regex: ASCII letters, digits and `_`.
"""

from __future__ import annotations

import re

# Each byte folded: ASCII letters to lowercase, digits and `_` kept, every other byte (NUL included) a space.
WORD_BYTES = bytes(
    c + 32 if 65 <= c <= 90 else c if (48 <= c <= 57 or 97 <= c <= 122 or c == 95) else 32 for c in range(256)
)


def folded(text: bytes | bytearray) -> bytes:
    """`text` folded for a `spaced` pattern (a space in front, so a word at the very start is found too)."""
    return b" " + text.translate(WORD_BYTES)


def spaced(alternatives: bytes) -> re.Pattern[bytes]:
    """The pattern that finds the words of `alternatives` (a regex alternation in lowercase) in folded text; a
    group around them, so findall() gives the words."""
    return re.compile(rb" (" + alternatives + rb")\b")
