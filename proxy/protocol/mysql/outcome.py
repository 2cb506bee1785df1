"""What a MySQL command lost with its server may have done: read only, written without committing, or maybe
committed (sans-IO: from the command's bytes or the text of the statement it executes)."""

from __future__ import annotations

import re

from proxy.protocol.mysql import constants as my

# Kinds of command, for a command whose server was lost before it answered.
READ = 0  # changes nothing: run it again anywhere
WRITE = 1  # may write, but cannot end a transaction: inside one, it went with the rest
SESSION = 6  # changes the transaction's savepoints only: run it again anywhere
SETTING = 7  # changes the session (SET, USE): replayed, it must come first (what ran before it saw the old value)
BEGIN = 2  # starts a transaction (inside one it would commit the open one first)
ROLLBACK = 3  # ends the transaction without committing: the lost server did the same
MAY_COMMIT = 4  # may have committed (COMMIT, DDL, a write outside a transaction, a procedure, unknown)
NOT_REPLAYED = 5  # commits nothing, but its replay would not answer the same (a prepare: a new statement id)

_SPACE_AND_COMMENTS = re.compile(rb"(?:\s+|/\*(?!!|M!).*?\*/|--(?:[ \t][^\n]*)?(?:\n|$)|#[^\n]*(?:\n|$))*", re.S)
_WORD = re.compile(rb"[A-Za-z_]+")
_READ_WORDS = frozenset({b"SELECT", b"SHOW", b"DESCRIBE", b"DESC", b"EXPLAIN", b"HELP", b"VALUES", b"TABLE"})
_WRITE_WORDS = frozenset({b"INSERT", b"UPDATE", b"DELETE", b"REPLACE", b"DO", b"WITH"})
# In a read, what makes it more than a read: a write to a file or variables, a row lock, a named lock, a sequence.
_NOT_READ = re.compile(
    rb"\bINTO\b|\bFOR\s+UPDATE\b|\bLOCK\s+IN\s+SHARE\s+MODE\b|\bFOR\s+SHARE\b|\bGET_LOCK\b|\bRELEASE_(?:ALL_)?LOCKS?\b"
    rb"|\bNEXTVAL\b|\bSETVAL\b|\bNEXT\s+VALUE\b|\bLASTVAL\b|\bLAST_INSERT_ID\s*\(\s*[^\s)]|:=",
    re.I,
)
# In a SET, what can end a transaction or reach beyond the session (autocommit may be turned off).
_SET_COMMITS = re.compile(rb"\bAUTOCOMMIT\b(?!\s*:?=\s*(?:0|OFF|FALSE)\b)|\bGLOBAL\b|@@GLOBAL|\bPASSWORD\b|\bROLE\b",
                          re.I)
_STATEMENT_END = re.compile(rb";\s*\S")

# Commands that change nothing on the server (or only what the session re-establishes).
_READ_COMMANDS = frozenset({
    my.COM_PING, my.COM_FIELD_LIST, my.COM_STATISTICS, my.COM_STMT_CLOSE, my.COM_STMT_RESET,
    my.COM_STMT_SEND_LONG_DATA,
})


def _words(text: bytes, start: int, count: int) -> list[bytes]:
    """Up to `count` upper-cased keywords of `text` from `start` (comments and spaces skipped)."""
    words: list[bytes] = []
    pos = start
    while len(words) < count:
        pos = _SPACE_AND_COMMENTS.match(text, pos).end()  # type: ignore[union-attr]
        match = _WORD.match(text, pos)
        if match is None:
            break
        words.append(match.group().upper())
        pos = match.end()
    return words


def query_kind(text: bytes) -> int:
    """The kind of an SQL text (COM_QUERY, or the statement a COM_STMT_EXECUTE runs)."""
    if _STATEMENT_END.search(text):
        return MAY_COMMIT  # several statements: not looked into
    words = _words(text, 0, 3)
    if not words:
        return MAY_COMMIT
    first = words[0]
    if first in _READ_WORDS:
        return WRITE if _NOT_READ.search(text) else READ
    if first in _WRITE_WORDS:
        return WRITE
    if first == b"SAVEPOINT":
        return SESSION
    if first == b"START":
        return BEGIN if words[1:2] == [b"TRANSACTION"] else MAY_COMMIT
    if first == b"BEGIN":
        return BEGIN if words[1:2] in ([], [b"WORK"]) else MAY_COMMIT  # (BEGIN NOT ATOMIC: a compound statement)
    if first == b"ROLLBACK":
        rest = [word for word in words[1:] if word != b"WORK"]
        if not rest:
            return ROLLBACK
        return SESSION if rest[0] == b"TO" else MAY_COMMIT  # (ROLLBACK TO SAVEPOINT; AND CHAIN, RELEASE: not)
    if first == b"RELEASE":
        return SESSION if words[1:2] == [b"SAVEPOINT"] else MAY_COMMIT
    if first == b"SET":
        return MAY_COMMIT if _SET_COMMITS.search(text) else SETTING
    if first == b"USE":
        return SETTING
    return MAY_COMMIT


def command_kind(payload: bytes, statement_sql: bytes | None = None) -> int:
    """The kind of a client command (`payload`: the command byte and its body); `statement_sql` is the text of
    the statement a COM_STMT_EXECUTE runs (None when unknown)."""
    if not payload:
        return MAY_COMMIT
    command = payload[0]
    if command == my.COM_QUERY:
        return query_kind(payload[1:])
    if command in (my.COM_STMT_EXECUTE, my.COM_STMT_BULK_EXECUTE):
        return MAY_COMMIT if statement_sql is None else query_kind(statement_sql)
    if command in _READ_COMMANDS:
        return READ
    if command in (my.COM_INIT_DB, my.COM_SET_OPTION):
        return SETTING
    if command == my.COM_STMT_PREPARE:
        return NOT_REPLAYED
    return MAY_COMMIT
