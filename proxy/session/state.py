"""A client's session state, engine-neutral: what a backend must be given to serve that session."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Generic, TypeVar

SettingT = TypeVar("SettingT")  # how an engine keeps a setting's value (PostgreSQL text, MySQL a SET body)
StatementT = TypeVar("StatementT")  # an engine's record of one named prepared statement


@dataclass(eq=False, slots=True)
class SessionState(Generic[SettingT, StatementT]):
    """One client's session as the client sees it, whichever backend serves it now.

    Re-establishing the session on another backend (after a re-point, after a failover) means applying this object:
    the database/schema, the settings in the order they were last set, autocommit, user variables, and preparing
    the named statements there again on first use. Pin reasons say why the session cannot move at all right now.
    """

    user: str = ""
    database: str = ""  # PostgreSQL: the database; MySQL: the default schema ("" for none)
    settings: dict[str, SettingT] = field(default_factory=dict)  # name -> value, in the order last set
    autocommit: bool = True  # MySQL's autocommit; PostgreSQL sessions always start each statement in autocommit
    user_variables: dict[bytes, bytes] = field(default_factory=dict)  # MySQL @name (lowercased) -> literal
    statements: dict[object, StatementT] = field(default_factory=dict)  # client's name or id -> statement
    pins: dict[str, set[bytes]] = field(default_factory=dict)  # reason -> what it concerns (names; may be empty)
    settings_id: int = 0  # the pool's number for `settings` (equal settings, equal numbers; 0: not numbered yet)

    @property
    def pinned(self) -> bool:
        return bool(self.pins)

    def pin(self, reason: str, name: bytes = b"") -> bool:
        """Record a pin reason; True if the session was not pinned for that reason before."""
        names = self.pins.get(reason)
        if names is None:
            self.pins[reason] = {name} if name else set()
            return True
        if name:
            names.add(name)
        return False

    def unpin(self, reason: str) -> None:
        self.pins.pop(reason, None)
