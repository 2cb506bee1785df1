"""Virtual prepared statements: each client's stable statement ids, and each backend's capped LRU of real ones.

A client's COM_STMT_PREPARE runs on whichever backend serves it; the client gets an id of the proxy's own
(`ClientStatement`), which names the statement text (its key also holds the default database and session
settings it was prepared under). Each backend keeps the statements prepared on it in a `StatementCache` by key,
shared by every client that backend serves, least recently used first and capped, so no backend ever holds more
than its share of the server's max_prepared_stmt_count. A statement command naming a statement the borrowed
backend does not have makes the proxy prepare it there first (that response is the proxy's own).
"""

from __future__ import annotations

from collections import OrderedDict

from proxy.protocol.mysql import constants as my
from proxy.protocol.mysql.packets import frame
from proxy.session.mysql_inspect import QueryEffect


class ClientStatement:
    """A statement a client prepared, under the id the proxy gave it."""

    __slots__ = ("columns", "cursor", "effect", "failure", "key", "long_data", "params", "schema", "sql",
                 "statement_id", "types")

    def __init__(self, statement_id: int, key: bytes, sql: bytes, schema: str, effect: QueryEffect | None) -> None:
        self.statement_id = statement_id  # the client's: stable wherever the statement runs
        self.key = key  # see MySQLService.statement_key
        self.sql = sql
        self.schema = schema  # the default database it was prepared in (tables without one resolve there)
        self.effect = effect  # what executing it does to the session (a prepared SET, CREATE TEMPORARY TABLE ...)
        self.params = 0
        self.columns = 0
        self.types: bytes | None = None  # the parameter types the client sent last (2 bytes per parameter)
        self.cursor = False  # a cursor of it is open on the linked backend
        self.long_data = False  # parameter data was sent ahead (COM_STMT_SEND_LONG_DATA) to the linked backend
        self.failure: bytes | None = None  # the ERR payload of a failed prepare on the linked backend


class BackendStatement:
    """A statement prepared on one backend connection."""

    __slots__ = ("held", "statement_id", "types")

    def __init__(self, statement_id: int) -> None:
        self.statement_id = statement_id
        self.types: bytes | None = None  # the parameter types it was last executed with
        self.held = 0  # an open cursor or long data of the linked client: not to be closed now


class StatementCache:
    """One backend's prepared statements by key, least recently used first, at most `cap` of them."""

    __slots__ = ("cap", "entries", "pending_closes", "preparing")

    def __init__(self, cap: int) -> None:
        self.cap = max(1, cap)
        self.entries: OrderedDict[bytes, BackendStatement] = OrderedDict()
        self.preparing = 0  # prepares sent whose response has not come yet (each will take a slot)
        self.pending_closes: list[int] = []  # statement ids to close at the next command boundary

    def __len__(self) -> int:
        return len(self.entries)

    def get(self, key: bytes) -> BackendStatement | None:
        entry = self.entries.get(key)
        if entry is not None:
            self.entries.move_to_end(key)
        return entry

    def add(self, key: bytes, statement_id: int) -> BackendStatement:
        """A prepare completed; a second statement of the same key is closed (at the next boundary)."""
        entry = self.entries.get(key)
        if entry is not None:
            self.pending_closes.append(statement_id)
            self.entries.move_to_end(key)
            return entry
        entry = self.entries[key] = BackendStatement(statement_id)
        return entry

    def make_room(self) -> bytes:
        """COM_STMT_CLOSE frames that free a slot for one more prepare (and any closes pending); may be empty."""
        excess = len(self.entries) + self.preparing + 1 - self.cap
        if excess > 0:
            victims: list[bytes] = []
            for key, entry in self.entries.items():  # oldest first
                if not entry.held:
                    victims.append(key)
                    if len(victims) == excess:
                        break
            for key in victims:
                self.pending_closes.append(self.entries.pop(key).statement_id)
        return self.take_closes()

    def take_closes(self) -> bytes:
        """The COM_STMT_CLOSE frames pending (a duplicate prepare's), to write at a command boundary."""
        closes = self.pending_closes
        if not closes:
            return b""
        self.pending_closes = []
        return b"".join(frame(bytes((my.COM_STMT_CLOSE,)) + sid.to_bytes(4, "little")) for sid in closes)

    def clear(self) -> None:
        """The server forgot them all (COM_RESET_CONNECTION, COM_CHANGE_USER)."""
        self.entries.clear()
        self.pending_closes = []
