"""What a client's SQL text does to its session: settings to track, state that pins, and the statements ending it.

The proxy reads only the first keyword of each statement on the hot path (plus one regex search for a few
characters and words that may mean session state); statements that matter get a `QueryEffect`, applied by the
session when the server's response is complete. Tracked state (session variables, the default database, user
variables set to literals) is re-applied on whichever backend serves the client. State that cannot move
between backend connections pins the client to its backend, under a reason from PIN_REASONS; the statement
that drops the state (DROP TEMPORARY TABLE, UNLOCK TABLES, RELEASE_LOCK, DEALLOCATE PREPARE, HANDLER ... CLOSE,
XA COMMIT) ends that pin.
"""

from __future__ import annotations

import re
from typing import Any, Final

from proxy.errors import CommandNotAllowed, NotSupported, ProxyError
from proxy.protocol.mysql.effects import QUERY
from proxy.session.mysql_ids import function_flags

# --- what to do with a command ---
FORWARD, ANSWER_OK, ANSWER_ERR, SWALLOW, QUIT, KILL, CHANGE_USER = range(7)

# --- pin reasons (metrics labels: a short, fixed set) ---
TEMPORARY_TABLE: Final = "temporary table"
TABLE_LOCK: Final = "LOCK TABLES"
GLOBAL_READ_LOCK: Final = "FLUSH TABLES WITH READ LOCK"
NAMED_LOCK: Final = "GET_LOCK"
SQL_PREPARE: Final = "SQL PREPARE"
HANDLER: Final = "HANDLER"
XA_TRANSACTION: Final = "XA transaction"
FOUND_ROWS: Final = "SQL_CALC_FOUND_ROWS"
USER_VARIABLE: Final = "user variable"
SET_STATEMENT: Final = "SET statement"
USE_STATEMENT: Final = "USE statement"
STATE_CHANGE: Final = "session state change"
EXECUTABLE_COMMENT: Final = "executable comment"
INSERT_ID_EXPRESSION: Final = "LAST_INSERT_ID(expr)"  # set to a value no OK packet told (until an insert does)
# a prepared statement reads ROW_COUNT() / FOUND_ROWS() (its text cannot carry the client's values): while it is open
PREPARED_ROW_COUNT: Final = "prepared ROW_COUNT()/FOUND_ROWS()"
PIN_REASONS: Final = (TEMPORARY_TABLE, TABLE_LOCK, GLOBAL_READ_LOCK, NAMED_LOCK, SQL_PREPARE, HANDLER, XA_TRANSACTION,
                      FOUND_ROWS, USER_VARIABLE, SET_STATEMENT, USE_STATEMENT, STATE_CHANGE, EXECUTABLE_COMMENT,
                      INSERT_ID_EXPRESSION, PREPARED_ROW_COUNT)
ANY: Final = b"*"  # the names a pin holds are unknown: only the statement ending them all (or a reset) ends it
NO_NAME: Final = b""

# --- COM_QUERY inspection: the first keyword of each statement, and a few session-binding constructs ---
_SKIP = rb"(?:\s+|\(|/\*(?![!M]).*?\*/|(?:--[ \t]|#)[^\n]*(?:\n|\Z))*"
FIRST_WORD = re.compile(_SKIP + rb"([A-Za-z_]+)", re.S)
NEXT_STATEMENT = re.compile(rb";" + _SKIP + rb"([A-Za-z_]+)", re.S)
# A fast first look (one alternation, no per-word boundaries): may match more than it needs to, never less.
# (`_id(`, `_count(`, `_rows(`: CONNECTION_ID(), ROW_COUNT(), FOUND_ROWS(), see mysql_ids)
ATTENTION = re.compile(rb"[;@]|_(?:locks?\s*\(|calc_found_rows\b|insert_id\s*\(|id\s*\(|count\s*\(|rows\s*\()"
                       rb"|\btemporary\b", re.I)
# What each ATTENTION match starts with (lowercased): a long text is searched for these with bytes.find (memchr
# speed) and ATTENTION is tried only where one is, not by the regex engine at every byte (a 15 MB prepared text).
ATTENTION_STARTS = (b";", b"@", b"_lock", b"_calc_found_rows", b"_insert_id", b"_id", b"_count", b"_rows",
                    b"temporary")
KEYWORDS = frozenset({b"KILL", b"LOAD", b"SET", b"USE", b"CREATE", b"DROP", b"LOCK", b"UNLOCK", b"FLUSH", b"PREPARE",
                      b"DEALLOCATE", b"HANDLER", b"XA"})
_NAME = rb"(?:`(?:[^`]|``)+`|[\w$]+)"
_STRING = rb"""(?:'((?:[^'\\]|\\.|'')*)'|"((?:[^"\\]|\\.|"")*)")"""
USER_VARIABLE_ASSIGNMENT = re.compile(
    rb"""(?<![@\w$.`'"])@(?:[\w$.]+|`[^`]*`|'[^']*'|"[^"]*")\s*:=|\bINTO\s+@(?!@)""", re.I)
USER_VARIABLE_USE = re.compile(rb"""(?:^|[^\w@.$`'"])@(?!@)[\w$.`'"]""")
GET_LOCK = re.compile(rb"\bget_lock\s*\(\s*(?:" + _STRING + rb")?", re.I)
RELEASE_LOCK = re.compile(rb"\brelease_lock\s*\(\s*(?:" + _STRING + rb")?", re.I)
RELEASE_ALL_LOCKS = re.compile(rb"\brelease_all_locks\s*\(", re.I)
CALC_FOUND_ROWS = re.compile(rb"\bsql_calc_found_rows\b", re.I)
# reads of the session's LAST_INSERT_ID() (also as @@last_insert_id / @@identity), and calls that set it
LAST_INSERT_ID = re.compile(rb"\blast_insert_id\s*\(\s*\)|@@(?:session\.)?(?:last_insert_id|identity)\b", re.I)
SET_INSERT_ID = re.compile(rb"\blast_insert_id\s*\(\s*+(?!\))", re.I)
CREATE_TEMPORARY = re.compile(rb"\s*CREATE\s+(?:OR\s+REPLACE\s+)?TEMPORARY\b", re.I)
CREATE_TEMPORARY_TABLE = re.compile(
    rb"\s*CREATE\s+(?:OR\s+REPLACE\s+)?TEMPORARY\s+TABLE\s+(?:IF\s+NOT\s+EXISTS\s+)?(" + _NAME + rb"(?:\s*\.\s*"
    + _NAME + rb")?)", re.I)
DROP_TABLE = re.compile(rb"\s*DROP\s+(?:TEMPORARY\s+)?TABLES?\s+(?:IF\s+EXISTS\s+)?(.+?)\s*"
                        rb"(?:\b(?:RESTRICT|CASCADE)\s*)?;?\s*\Z", re.I | re.S)
DROP_PREPARE = re.compile(rb"\s*(?:DEALLOCATE|DROP)\s+PREPARE\s+(" + _NAME + rb")", re.I)
SQL_PREPARE_FROM = re.compile(rb"\s*PREPARE\s+(" + _NAME + rb")\s+FROM\b", re.I)
LOCK_TABLES = re.compile(rb"\s*LOCK\s+TABLES?\b", re.I)
UNLOCK_TABLES = re.compile(rb"\s*UNLOCK\s+TABLES?\b", re.I)
FLUSH_WITH_LOCK = re.compile(rb"\bWITH\s+READ\s+LOCK\b|\bFOR\s+EXPORT\b", re.I)
HANDLER_OPEN = re.compile(rb"\s*HANDLER\s+(" + _NAME + rb"(?:\s*\.\s*" + _NAME + rb")?)\s+OPEN\b(?:\s+(?:AS\s+)?("
                          + _NAME + rb"))?", re.I)
HANDLER_CLOSE = re.compile(rb"\s*HANDLER\s+(" + _NAME + rb")\s+CLOSE\b", re.I)
XA_START = re.compile(rb"\s*XA\s+(?:START|BEGIN)\b", re.I)
XA_END = re.compile(rb"\s*XA\s+(?:COMMIT|ROLLBACK)\b", re.I)
AUTOCOMMIT_ONLY = re.compile(
    rb"\s*SET\s+(?:(?:SESSION|LOCAL)\s+|@@(?:SESSION\.|LOCAL\.)?)?autocommit\s*:?=\s*(?:0|1|ON|OFF|TRUE|FALSE)"
    rb"\s*;?\s*\Z", re.I)
USE_SCHEMA = re.compile(rb"\s*USE\s+(`(?:[^`]|``)+`|[\w$]+)\s*;?\s*\Z", re.I)
KILL_STATEMENT = re.compile(rb"\s*KILL\s+(?:(?:HARD|SOFT)\s+)?(?:(CONNECTION|QUERY)\s+)?(\d+)\s*;?\s*\Z", re.I)
LOAD_LOCAL = re.compile(rb"\bLOAD\s+(?:DATA|XML)\s+(?:(?:LOW_PRIORITY|CONCURRENT)\s+)?LOCAL\b", re.I)

# --- SET ---
SET_WITHOUT_STATE = re.compile(
    rb"\s*SET\s+(?:PASSWORD\b|DEFAULT\s+ROLE\b|(?:GLOBAL\s+|PERSIST\s+|PERSIST_ONLY\s+|@@(?:GLOBAL|PERSIST|PERSIST_ONLY)"
    rb"\.)(?:'[^']*'|[^,'])*\Z)", re.I | re.S)
SET_STATEMENT_FOR = re.compile(rb"\s*SET\s+STATEMENT\s", re.I)
SET_ROLE = re.compile(rb"\s*SET\s+(ROLE\s+" + _NAME + rb")\s*;?\s*\Z", re.I)
SET_TRANSACTION = re.compile(rb"\s*SET\s+TRANSACTION\b", re.I)
SET_SESSION_TRANSACTION = re.compile(rb"\s*SET\s+(SESSION\s+TRANSACTION\s+[^;]+?)\s*;?\s*\Z", re.I | re.S)
SET_BODY = re.compile(rb"\s*SET\s+(.*?)\s*;?\s*\Z", re.I | re.S)
TOP_LEVEL_ITEM = re.compile(rb"""(?:'(?:[^'\\]|\\.|'')*'|"(?:[^"\\]|\\.|"")*"|`[^`]*`|\([^()]*\)|[^,'"`()])+""", re.S)
CHARSET_ITEM = re.compile(rb"\s*(?:NAMES|CHARACTER\s+SET|CHARSET)\s+\S", re.I)
GLOBAL_ITEM = re.compile(rb"\s*(?:GLOBAL\s|PERSIST\s|PERSIST_ONLY\s|@@(?:GLOBAL|PERSIST|PERSIST_ONLY)\.)", re.I)
SESSION_ASSIGNMENT = re.compile(
    rb"\s*(?:(?:SESSION|LOCAL)\s+|@@(?:SESSION\.|LOCAL\.)?)?([A-Za-z_][A-Za-z0-9_]*)\s*:?=\s*(.+?)\s*\Z", re.I | re.S)
USER_ASSIGNMENT = re.compile(rb"""\s*@((?:[\w$.]+|`[^`]*`|'[^']*'|"[^"]*"))\s*:?=\s*(.+?)\s*\Z""", re.S)
LITERAL = re.compile(
    rb"""(?:[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?|'(?:[^'\\]|\\.|'')*'|"(?:[^"\\]|\\.|"")*"|NULL|TRUE|FALSE"""
    rb"""|0x[0-9A-Fa-f]+|[Xx]'[0-9A-Fa-f]*'|_[A-Za-z0-9]+\s*'(?:[^'\\]|\\.|'')*')\Z""", re.I | re.S)
BARE_WORD = re.compile(rb"[A-Za-z_][\w-]*\Z")  # DEFAULT, ON, SYSTEM, READ-COMMITTED ...
NOT_SESSION_VARIABLES = frozenset({"global", "persist", "persist_only", "transaction", "role", "password", "statement",
                                   "names", "character", "charset", "default"})


class QueryEffect:
    """What one COM_QUERY (or prepared statement) does to the session, applied when its response is complete."""

    __slots__ = ("charset", "detail", "functions", "hold_next", "insert_id", "pin", "pin_names", "retrack", "schema",
                 "settings", "single", "transient", "unpins", "user_vars", "variable_set")

    def __init__(self) -> None:
        # session variables: (name, SET body to replay, whether the body is a literal value rather than an
        # expression, which is better replayed with the value the server reports)
        self.settings: list[tuple[str, bytes, bool]] = []
        self.user_vars: list[tuple[bytes, bytes]] = []  # user variables set to literals: (lowercased name, literal)
        self.schema: str | None = None  # USE
        self.pin: str | None = None  # a reason from PIN_REASONS
        self.pin_names: frozenset[bytes] = frozenset((NO_NAME,))
        self.detail = ""  # for the log: the construct that pins
        self.unpins: list[tuple[str, frozenset[bytes] | None]] = []  # (reason, names; None: all of them)
        self.hold_next = False  # SET TRANSACTION: the next statement must run on the same backend
        self.charset = False  # SET NAMES / CHARACTER SET (their character_set_* reports are not replayed)
        self.transient = False  # SET STATEMENT ... FOR: the variables it reports are for that statement only
        self.variable_set = False  # the pin comes from a SET statement (see pinning filter exclude_variable_sets)
        self.insert_id = False  # reads LAST_INSERT_ID(): the backend must have the client's value
        self.functions = 0  # calls CONNECTION_ID() / ROW_COUNT() / FOUND_ROWS(): flags from mysql_ids
        self.retrack = False  # sets session_track_*: the proxy's own session state tracking is turned on again after
        self.single = True  # one statement (not a multi-statement query)

    def pinning(self, reason: str, names: frozenset[bytes] | None = None, detail: str = "") -> None:
        """Pin for `reason` (the first reason found wins; names of the same reason add up)."""
        names = names if names is not None else frozenset((NO_NAME,))
        if self.pin is None:
            self.pin = reason
            self.pin_names = names
            self.detail = detail
        elif self.pin == reason:
            self.pin_names |= names

    @property
    def tracked(self) -> bool:
        """It changes tracked state (so a state-change report from the server is explained)."""
        return bool(self.settings or self.user_vars or self.schema is not None or self.pin or self.unpins
                    or self.hold_next or self.transient or self.retrack)

    def __repr__(self) -> str:
        parts = [f"{name}={getattr(self, name)!r}" for name in self.__slots__ if getattr(self, name)]
        return f"QueryEffect({', '.join(parts)})"


class Inspection:
    """What the proxy does with one client command (a small value object; FORWARD_PLAIN is shared)."""

    __slots__ = ("action", "effect", "error")

    def __init__(self, action: int, effect: tuple[int, Any] | None = None, error: ProxyError | None = None) -> None:
        self.action = action
        self.effect = effect
        self.error = error

    @property
    def query_effect(self) -> QueryEffect | None:
        effect = self.effect
        return effect[1] if effect is not None and effect[0] == QUERY else None


FORWARD_PLAIN = Inspection(FORWARD)


def unquote(name: bytes) -> bytes:
    name = name.strip()
    if name[:1] == b"`" and name[-1:] == b"`" and len(name) > 1:
        return name[1:-1].replace(b"``", b"`")
    return name


def _table_name(raw: bytes) -> bytes:
    """`db`.`t` -> db.t; t -> t (the session qualifies it with its default database)."""
    parts = re.findall(_NAME, raw)
    return b".".join(unquote(part) for part in parts)


def _string(match: re.Match[bytes]) -> bytes | None:
    value = match.group(1) if match.group(1) is not None else match.group(2)
    return value


def parse_set(text: bytes, effect: QueryEffect) -> None:
    """Fill `effect` with what a single SET statement does to the session, or the reason it pins.

    `SET NAMES`/`CHARACTER SET`, `SET ROLE`, `SET SESSION TRANSACTION ...` and assignments of session system
    variables are tracked (replayed on whichever backend serves the client); user variables set to literals
    are tracked too. `SET TRANSACTION` (for the next transaction only) keeps the backend for the next
    statement. User variables set from expressions, and what cannot be parsed, pin the client.
    """
    effect.variable_set = True
    if SET_STATEMENT_FOR.match(text):
        effect.transient = True
        return
    if SET_WITHOUT_STATE.match(text):
        return
    role = SET_ROLE.match(text)
    if role is not None:
        effect.settings.append(("role", role.group(1), True))
        return
    if SET_TRANSACTION.match(text):
        effect.hold_next = True
        return
    session_tx = SET_SESSION_TRANSACTION.match(text)
    if session_tx is not None:
        effect.settings.append(("session transaction", session_tx.group(1), True))
        return
    body = SET_BODY.match(text)
    if body is None:
        effect.pinning(SET_STATEMENT, detail="SET")
        return
    for raw in TOP_LEVEL_ITEM.findall(body.group(1)):
        item = raw.strip()
        if item[:1] == b"@" and item[1:2] != b"@":
            user = USER_ASSIGNMENT.match(item)
            if user is not None and LITERAL.match(user.group(2)):
                effect.user_vars.append((user.group(1).lower(), user.group(2)))
            else:
                effect.pinning(USER_VARIABLE, detail="SET " + item[:40].decode("utf-8", "replace"))
            continue
        if CHARSET_ITEM.match(item):
            effect.settings.append(("character set", item, True))
            effect.charset = True
            continue
        if GLOBAL_ITEM.match(item):
            continue
        assignment = SESSION_ASSIGNMENT.match(item)
        if assignment is None:
            effect.pinning(SET_STATEMENT, detail="SET " + item[:40].decode("utf-8", "replace"))
            continue
        name = assignment.group(1).lower().decode()
        if name == "autocommit":  # tracked from the server's status flags
            continue
        if name.startswith("session_track"):  # (drivers turn it on at connect): the client gets all of it
            effect.retrack = True
            continue
        if name in NOT_SESSION_VARIABLES:
            effect.pinning(SET_STATEMENT, detail="SET " + name)
            continue
        value = assignment.group(2)
        exact = bool(LITERAL.match(value) or BARE_WORD.match(value))
        effect.settings.append((name, b"@@SESSION." + assignment.group(1) + b"=" + value, exact))


def _pinning_statement(word: bytes, text: bytes, single: bool, effect: QueryEffect) -> None:
    """The keyword-led statements that take or drop state bound to one backend connection."""
    if word == b"CREATE":
        if single:
            table = CREATE_TEMPORARY_TABLE.match(text)
            if table is not None:
                effect.pinning(TEMPORARY_TABLE, frozenset((_table_name(table.group(1)),)))
            elif CREATE_TEMPORARY.match(text):
                effect.pinning(TEMPORARY_TABLE, frozenset((ANY,)))
        elif CREATE_TEMPORARY.search(text.replace(b";", b" ")):
            effect.pinning(TEMPORARY_TABLE, frozenset((ANY,)))
    elif word == b"DROP":
        prepared = DROP_PREPARE.match(text) if single else None
        if prepared is not None:
            effect.unpins.append((SQL_PREPARE, frozenset((unquote(prepared.group(1)),))))
            return
        tables = DROP_TABLE.match(text) if single else None
        if tables is not None:
            names = frozenset(_table_name(name) for name in tables.group(1).split(b","))
            effect.unpins.append((TEMPORARY_TABLE, names))
    elif word == b"LOCK":
        if LOCK_TABLES.match(text) or not single:
            effect.pinning(TABLE_LOCK)
    elif word == b"UNLOCK":
        if UNLOCK_TABLES.match(text) or not single:
            effect.unpins.append((TABLE_LOCK, None))
            effect.unpins.append((GLOBAL_READ_LOCK, None))
    elif word == b"FLUSH":
        if FLUSH_WITH_LOCK.search(text):
            effect.pinning(GLOBAL_READ_LOCK)
    elif word == b"PREPARE":
        prepared = SQL_PREPARE_FROM.match(text) if single else None
        effect.pinning(SQL_PREPARE, frozenset((unquote(prepared.group(1)) if prepared is not None else ANY,)))
    elif word == b"DEALLOCATE":
        prepared = DROP_PREPARE.match(text) if single else None
        if prepared is not None:
            effect.unpins.append((SQL_PREPARE, frozenset((unquote(prepared.group(1)),))))
    elif word == b"HANDLER":
        opened = HANDLER_OPEN.match(text) if single else None
        if opened is not None:
            alias = opened.group(2) or opened.group(1).split(b".")[-1]
            effect.pinning(HANDLER, frozenset((unquote(alias),)))
            return
        closed = HANDLER_CLOSE.match(text) if single else None
        if closed is not None:
            effect.unpins.append((HANDLER, frozenset((unquote(closed.group(1)),))))
        elif not single:
            effect.pinning(HANDLER, frozenset((ANY,)))
    elif word == b"XA":
        if XA_START.match(text) or not single:
            effect.pinning(XA_TRANSACTION)
        elif XA_END.match(text):
            effect.unpins.append((XA_TRANSACTION, None))


def _needs_attention(text: bytes, start: int) -> bool:
    """ATTENTION matches text[start:]; in linear time with a small constant, whatever the text's length."""
    if len(text) - start < 4096:
        return ATTENTION.search(text, start) is not None
    lowered = text.lower()
    for literal in ATTENTION_STARTS:
        at = lowered.find(literal, start)
        while at >= 0:
            if ATTENTION.match(text, at) is not None:
                return True
            at = lowered.find(literal, at + 1)
    return False


def inspect_query(text: bytes, local_infile: bool, tracking: bool = False) -> Inspection:
    """Classify a COM_QUERY statement text (or its first bytes): forward as is, with an effect, or answer here.

    tracking: the backends report session state changes (CLIENT_SESSION_TRACK), so session variables set
    in ways the parser does not follow (multi-statement queries) are still learned.
    """
    match = FIRST_WORD.match(text)
    if match is None:
        effect = QueryEffect()
        effect.pinning(EXECUTABLE_COMMENT)
        return Inspection(FORWARD, (QUERY, effect))
    keyword = match.group(1).upper()
    attention = _needs_attention(text, match.end())
    if not attention and keyword not in KEYWORDS:
        return FORWARD_PLAIN
    keywords = [keyword]
    single = True
    if b";" in text:
        for follow in NEXT_STATEMENT.finditer(text, match.end()):
            keywords.append(follow.group(1).upper())
            single = False
    if b"KILL" in keywords:
        kill = KILL_STATEMENT.match(text) if single else None
        if kill is None:
            return Inspection(ANSWER_ERR, error=NotSupported(
                "through the proxy, KILL takes a connection id (KILL [CONNECTION | QUERY] id) and must be sent alone"))
        return Inspection(KILL, (int(kill.group(1) is not None and kill.group(1).upper() == b"QUERY"),
                                 int(kill.group(2))))
    if b"LOAD" in keywords and not local_infile and LOAD_LOCAL.search(text):
        return Inspection(ANSWER_ERR, error=CommandNotAllowed(
            "LOAD DATA LOCAL INFILE is disabled on this proxy (mysql.local_infile = false)"))
    effect = QueryEffect()
    effect.single = single
    for word in keywords:
        if word == b"SET":
            if single:
                if not AUTOCOMMIT_ONLY.match(text):  # autocommit alone: tracked from the server's status flags
                    parse_set(text, effect)
            elif b"@" in text and USER_VARIABLE_USE.search(text):
                effect.variable_set = True
                effect.pinning(USER_VARIABLE, frozenset((ANY,)), "SET inside a multi-statement query")
            elif not tracking:
                effect.variable_set = True
                effect.pinning(SET_STATEMENT, detail="SET inside a multi-statement query")
        elif word == b"USE":
            use = USE_SCHEMA.match(text) if single else None
            if use is not None:
                effect.schema = unquote(use.group(1)).decode("utf-8", "surrogateescape")
            elif not tracking:
                effect.pinning(USE_STATEMENT, detail="USE inside a multi-statement query")
        elif word in KEYWORDS:
            _pinning_statement(word, text, single, effect)
        elif word == b"CALL" and b"@" in text and USER_VARIABLE_USE.search(text):
            effect.pinning(USER_VARIABLE, frozenset((ANY,)), "CALL with user variables")
    if attention:
        if b"@" in text and not (single and keyword == b"SET") and USER_VARIABLE_ASSIGNMENT.search(text):
            effect.pinning(USER_VARIABLE, frozenset((ANY,)), "user variable assigned in a statement")
        lowered = text.lower()
        if b"_lock" in lowered:
            for lock in GET_LOCK.finditer(text):
                name = _string(lock)
                effect.pinning(NAMED_LOCK, frozenset((name if name is not None else ANY,)))
            for lock in RELEASE_LOCK.finditer(text):
                name = _string(lock)
                if name is not None:
                    effect.unpins.append((NAMED_LOCK, frozenset((name,))))
            if RELEASE_ALL_LOCKS.search(text):
                effect.unpins.append((NAMED_LOCK, None))
        if b"sql_calc_found_rows" in lowered and CALC_FOUND_ROWS.search(text):
            effect.pinning(FOUND_ROWS)
        if b"last_insert_id" in lowered or b"@@identity" in lowered or b".identity" in lowered:
            if LAST_INSERT_ID.search(text):
                effect.insert_id = True
            if SET_INSERT_ID.search(text):
                effect.pinning(INSERT_ID_EXPRESSION, detail="LAST_INSERT_ID() set to an expression")
        effect.functions = function_flags(lowered)
    if not (effect.tracked or effect.insert_id or effect.functions):
        return FORWARD_PLAIN
    return Inspection(FORWARD, (QUERY, effect))


def prepared_effect(effect: QueryEffect | None, tracking: bool) -> QueryEffect | None:
    """The effect of a prepared statement's text: settings assigned from parameters cannot be replayed as text;
    the server's session state reports give their values (without them, such a statement pins)."""
    if effect is None or not any(b"?" in body for _, body, _ in effect.settings):
        return effect
    effect.settings = [setting for setting in effect.settings if b"?" not in setting[1]]
    if not tracking:
        effect.pinning(SET_STATEMENT, detail="prepared SET with parameters")
    return effect
