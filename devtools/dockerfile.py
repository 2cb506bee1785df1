"""A small Dockerfile parser: instructions with their flags and arguments, grouped into build stages."""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

INSTRUCTIONS = frozenset({
    "ADD", "ARG", "CMD", "COPY", "ENTRYPOINT", "ENV", "EXPOSE", "FROM", "HEALTHCHECK", "LABEL", "ONBUILD",
    "RUN", "SHELL", "STOPSIGNAL", "USER", "VOLUME", "WORKDIR",
})
_FLAG = re.compile(r"--([a-z-]+)=(\S+)\s*")


class DockerfileError(ValueError):
    """A line that is not a Dockerfile instruction."""


@dataclass
class Instruction:
    """One instruction: keyword, its --flags, and the rest of the line (continuations joined)."""

    keyword: str
    flags: dict[str, list[str]]
    arguments: str
    line: int

    def exec_form(self) -> list[str] | None:
        """The JSON array form of the arguments (``["a", "b"]``), or None for the shell form."""
        text = self.arguments.strip()
        if not text.startswith("["):
            return None
        value = json.loads(text)
        if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
            raise DockerfileError(f"line {self.line}: {self.keyword} array must hold strings")
        return value

    def words(self) -> list[str]:
        return self.exec_form() or shlex.split(self.arguments)


@dataclass
class Stage:
    """A FROM and the instructions after it."""

    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def of(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]


def _logical_lines(text: str) -> list[tuple[int, str]]:
    lines: list[tuple[int, str]] = []
    pending, start = "", 0
    for number, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue  # blank lines and comments (parser directives included)
        if pending and stripped.startswith("#"):
            continue  # a comment inside a continued instruction
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        lines.append((start, pending + stripped))
        pending = ""
    if pending:
        raise DockerfileError(f"line {start}: the file ends inside a continued instruction")
    return lines


def _instruction(number: int, text: str) -> Instruction:
    keyword, _, rest = text.partition(" ")
    keyword = keyword.upper()
    if keyword not in INSTRUCTIONS:
        raise DockerfileError(f"line {number}: unknown instruction {keyword!r}")
    flags: dict[str, list[str]] = {}
    rest = rest.strip()
    while match := _FLAG.match(rest):
        flags.setdefault(match.group(1), []).append(match.group(2))
        rest = rest[match.end():]
    return Instruction(keyword, flags, rest, number)


def parse(text: str) -> list[Stage]:
    """The stages of a Dockerfile; instructions before the first FROM may only be ARG."""
    stages: list[Stage] = []
    for number, line in _logical_lines(text):
        instruction = _instruction(number, line)
        if instruction.keyword == "FROM":
            words = instruction.arguments.split()
            if len(words) not in (1, 3) or (len(words) == 3 and words[1].upper() != "AS"):
                raise DockerfileError(f"line {number}: FROM image [AS name]")
            stages.append(Stage(words[0], words[2] if len(words) == 3 else None))
        elif not stages:
            if instruction.keyword != "ARG":
                raise DockerfileError(f"line {number}: {instruction.keyword} before the first FROM")
        else:
            stages[-1].instructions.append(instruction)
    if not stages:
        raise DockerfileError("no FROM")
    return stages


def parse_file(path: Path) -> list[Stage]:
    return parse(Path(path).read_text())
