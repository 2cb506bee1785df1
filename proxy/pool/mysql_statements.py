"""One MySQL backend connection's prepared statements: a capped LRU by statement key, shared by its clients."""

from __future__ import annotations

from collections import OrderedDict

from proxy.protocol.mysql import constants as my
from proxy.protocol.mysql.packets import frame


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
