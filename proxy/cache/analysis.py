"""What a statement does to the cache, read with sqlglot: a cacheable read, a write to named tables, or neither."""

from __future__ import annotations

import logging
import re
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import sqlglot
from sqlglot import exp
from sqlglot.errors import SqlglotError

logging.getLogger("sqlglot").setLevel(logging.ERROR)  # ("falling back to parsing as a Command" is expected)

EVERYTHING = "*"  # the table name a write of unknown extent invalidates: every entry's key holds it
DIALECTS = {"postgresql": "postgres", "mysql": "mysql"}
MEMO_SIZE = 4096
MAX_TEXT = 64 * 1024  # longer statements are not analysed: not cacheable, and a write of unknown extent
DIGEST_MAX = 8000  # (a digest of a longer text is cut short: such texts are remembered by their text)

# Expressions whose value changes from one call to the next, or with who asks (never cached).
VOLATILE = tuple(getattr(exp, name) for name in (
    "CurrentTimestamp", "CurrentDate", "CurrentTime", "CurrentDatetime", "CurrentUser", "CurrentSchema",
    "CurrentRole", "CurrentCatalog", "SessionUser", "Rand", "Randn", "Uuid", "UnixSeconds", "Localtime",
    "Localtimestamp", "Anonymous", "AnonymousAggFunc", "Placeholder", "Parameter", "SessionParameter",
) if hasattr(exp, name))
WRITES = tuple(getattr(exp, name) for name in (
    "Insert", "Update", "Delete", "Merge", "TruncateTable", "Create", "Drop", "Alter", "Copy", "Into",
    "LoadData", "Command",
) if hasattr(exp, name))
NEUTRAL = tuple(getattr(exp, name) for name in ("Transaction", "Commit", "Rollback", "Set", "Use", "Show")
                if hasattr(exp, name))
# (EXPLAIN is not one of them: EXPLAIN ANALYZE runs its statement.)
NEUTRAL_COMMANDS = frozenset({"SHOW", "BEGIN", "START", "SAVEPOINT", "RELEASE", "DISCARD", "RESET", "DEALLOCATE",
                              "LISTEN", "UNLISTEN", "DESCRIBE", "DESC"})
# Functions sqlglot does not know that read nothing of the user's tables and write none (not cacheable either).
HARMLESS_FUNCTIONS = frozenset({"pg_sleep", "pg_backend_pid", "version", "txid_current", "pg_is_in_recovery",
                                "set_config", "current_setting", "connection_id", "sleep", "database", "schema",
                                "pg_advisory_lock", "pg_advisory_unlock", "pg_try_advisory_lock", "get_lock",
                                "release_lock", "found_rows", "row_count", "last_insert_id", "now", "uuid", "rand",
                                "random", "sysdate", "curdate", "curtime", "utc_timestamp", "unix_timestamp", "user",
                                "current_user", "clock_timestamp", "statement_timestamp", "timeofday",
                                "gen_random_uuid", "uuid_generate_v4", "transaction_timestamp"})
SYSTEM_SCHEMAS = frozenset({"pg_catalog", "information_schema", "performance_schema", "mysql", "sys"})


INTO = re.compile(rb"(?i)\binto\b")


def plain_select(text: bytes) -> bool:
    """A SELECT that can write nothing, told without parsing: one statement, no parenthesis (so no function call,
    subquery or CTE), no INTO. Most point reads are; the rest are parsed."""
    return (text.lstrip()[:6].upper() == b"SELECT" and b"(" not in text and b";" not in text.rstrip(b" \t\r\n;")
            and INTO.search(text) is None)


@dataclass(frozen=True, slots=True)
class Analysis:
    """A statement's effect: `cacheable` reads of `tables`, or a write to `writes` (EVERYTHING: unknown)."""

    cacheable: bool = False
    tables: frozenset[str] = frozenset()
    writes: frozenset[str] = frozenset()


NOTHING = Analysis()
UNKNOWN_WRITE = Analysis(writes=frozenset({EVERYTHING}))


class Analyzer:
    """Analyses statements of one engine, remembering the latest MEMO_SIZE by their digest (statements that differ
    in literals only name the same tables and functions) or, without a digest, by their text."""

    def __init__(self, engine: str, digest: Callable[[bytes], str] | None = None) -> None:
        self.dialect = DIALECTS[engine]
        self.digest = digest
        self._memo: OrderedDict[bytes | str, Analysis] = OrderedDict()

    def analyse(self, text: bytes) -> Analysis:
        memo = self._memo
        key: bytes | str = text
        if self.digest is not None and len(text) < DIGEST_MAX:
            key = self.digest(text)
        found = memo.get(key)
        if found is not None:
            memo.move_to_end(key)
            return found
        found = self._analyse(text)
        memo[key] = found
        if len(memo) > MEMO_SIZE:
            memo.popitem(last=False)
        return found

    def _analyse(self, text: bytes) -> Analysis:
        if len(text) > MAX_TEXT:
            return UNKNOWN_WRITE
        try:
            sql = text.decode()
            trees = [tree for tree in sqlglot.parse(sql, read=self.dialect) if tree is not None]
        except (SqlglotError, UnicodeDecodeError, ValueError, RecursionError):
            return _unparsed(text)
        if not trees:
            return NOTHING
        if len(trees) == 1 and isinstance(trees[0], exp.Query):
            return _read(trees[0], self.dialect == "postgres")
        writes: set[str] = set()
        for tree in trees:
            effect = _statement(tree)
            writes |= effect.writes
        return Analysis(writes=frozenset(writes))


def _unparsed(text: bytes) -> Analysis:
    """A statement sqlglot cannot parse: harmless if it starts with a word that never writes."""
    first = text.lstrip().split(None, 1)[:1]
    if first and first[0].decode("latin-1").upper().rstrip(";") in NEUTRAL_COMMANDS:
        return NOTHING
    return UNKNOWN_WRITE


def _statement(tree: exp.Expr) -> Analysis:
    """One statement of several (or one that is not a query): the tables it writes, if any."""
    if isinstance(tree, NEUTRAL):
        return NOTHING
    if isinstance(tree, exp.Command):
        word = str(tree.this).upper()
        return NOTHING if word in NEUTRAL_COMMANDS else UNKNOWN_WRITE
    if isinstance(tree, exp.Query):
        read = _read(tree, False)
        return read if read.writes else NOTHING
    if isinstance(tree, WRITES):
        return Analysis(writes=_tables(tree) or frozenset({EVERYTHING}))
    return UNKNOWN_WRITE


def _read(tree: exp.Expr, parameters: bool) -> Analysis:
    """A query: cacheable if it only reads user tables with deterministic functions; a write if it hides one."""
    if any(True for _ in tree.find_all(*WRITES)):
        return Analysis(writes=_tables(tree) | {EVERYTHING})
    if any(True for _ in tree.find_all(exp.Lock)) or tree.args.get("locks"):
        return NOTHING
    for node in tree.find_all(*VOLATILE):
        if parameters and type(node) is exp.Parameter:  # PostgreSQL's $1 (MySQL's @x is a user variable)
            continue
        if isinstance(node, exp.Anonymous | exp.AnonymousAggFunc):  # a user's function may write anything
            return UNKNOWN_WRITE if str(node.name).lower() not in HARMLESS_FUNCTIONS else NOTHING
        return NOTHING
    tables = _tables(tree)
    for table in tree.find_all(exp.Table):
        if table.db.lower() in SYSTEM_SCHEMAS or table.name.lower().startswith("pg_"):
            return NOTHING
    return Analysis(cacheable=True, tables=tables)


def _tables(tree: exp.Expr) -> frozenset[str]:
    """The bare names (lowercased) of the tables a statement names: a write to s.t invalidates reads of any t."""
    return frozenset(table.name.lower() for table in tree.find_all(exp.Table) if table.name)
