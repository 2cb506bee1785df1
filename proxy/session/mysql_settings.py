"""A MySQL client's session state as its commands change it: settings, schema, user variables, pins."""

from __future__ import annotations

import re

from proxy.parameter_groups import dynamic_of, rebased
from proxy.pool.mysql_backend import MySQLBackend
from proxy.protocol.mysql import constants as my
from proxy.protocol.mysql.packets import ErrPacket, parse_session_state, read_lenenc_str
from proxy.session.mysql_inspect import (
    ANY,
    FOUND_ROWS,
    INSERT_ID_EXPRESSION,
    NO_NAME,
    STATE_CHANGE,
    TEMPORARY_TABLE,
    QueryEffect,
)
from proxy.session.mysql_lifecycle import MySQLClientBase, log

# Session variables the server reports that are not replayed: followed otherwise, one-shot, or the proxy's own.
UNTRACKED_VARIABLES = frozenset({
    b"autocommit", b"insert_id", b"last_insert_id", b"identity", b"rand_seed1", b"rand_seed2", b"timestamp",
    b"session_track_system_variables", b"session_track_schema", b"session_track_state_change",
    b"session_track_transaction_info", b"session_track_gtids", b"character_set_database", b"collation_database",
})

CHARSET_VARIABLES = frozenset({b"character_set_client", b"character_set_connection", b"character_set_results",
                               b"collation_connection"})

# SET NAMES / character_set_* settings of the client's, applied over its login's character set
CHARSET_SETTINGS = ("character set", *(name.decode() for name in CHARSET_VARIABLES))

ER_INCORRECT_GLOBAL_LOCAL_VAR = 1238  # "Variable '%s' is a read only variable"

NUMBER = re.compile(rb"-?\d+(?:\.\d+)?\Z")

def sql_literal(name: bytes, value: bytes) -> bytes:
    """A session variable's reported value as SQL to assign it again."""
    if NUMBER.match(value):
        return value
    if not value and name in CHARSET_VARIABLES:
        return b"NULL"
    if b"\\" in value:
        return b"0x" + value.hex().encode()
    return b"'" + value.replace(b"'", b"''") + b"'"


class MySQLSessionTracking(MySQLClientBase):
    """Follows what the client's commands (and the server's session-state reports) do to its session."""

    group_defaults: dict[str, bytes] = {}  # its parameter group's variables (replaced, never changed in place)
    group_previous: dict[str, bytes] = {}  # the group's variables before the last reload changed them
    group_refused: bytes | None = None  # the server's ERR for a group variable while the client logs in

    def _settings_fingerprint(self) -> bytes:
        key = self._settings_key
        if key is None:
            key = self._settings_key = b"%d\x02" % self.profile.charset + b"\x00".join(
                name.encode() + b"\x01" + body for name, body in self.session.settings.items())
        return key

    def _forget_session_state(self) -> None:
        self.session.statements.clear()
        self._last_prepared = 0
        if self.session.pins:
            self.session.pins.clear()
            self.stats.unpinned()
        self._pins_logged.clear()
        self.group_defaults = self._group_settings()
        self.session.settings = dict(self.group_defaults)
        self._settings_key = None
        self.session.user_variables = {}
        self.last_insert_id = self.row_count = 0  # (FOUND_ROWS() survives a reset on the server too)
        self.cursors = self.long_data = self._hold_next = 0
        self.session.autocommit = self._default_autocommit

    def _group_settings(self) -> dict[str, bytes]:
        """The client's parameter group as session variables (SET bodies), its defaults under its own SETs."""
        values = dynamic_of(self.service.settings, self.session.user, {})
        return {name.lower(): b"@@SESSION." + name.lower().encode() + b"=" + sql_literal(b"", value.encode())
                for name, value in values.items()}

    def parameter_group_changed(self) -> None:
        """A reload changed the client's parameter group: the variables it left at the group's value take the new
        one (given to the backend at its next borrow); those it set itself stay."""
        new = self._group_settings()
        rebased(self.session.settings, self.group_defaults, new, {})
        self.group_previous = self.group_defaults
        self.group_defaults = new
        self._settings_key = None

    def _group_refused(self, name: str, failure: bytes) -> bool:
        """The server refused the group's value of `name`: after a reload the client keeps the value it had (True);
        else it goes without it (and a login fails with the server's error)."""
        if self.group_refused is None:
            self.group_refused = failure
        previous = self.group_previous.get(name)
        if previous is not None:
            log.error("client %s keeps its previous %s: the server refuses its parameter group's (%s)", self.peer,
                      name, ErrPacket.parse(failure).message)
            self.session.settings[name] = previous
            self.group_defaults = {**self.group_defaults, name: previous}
            self._settings_key = None
            return True
        self.group_defaults = {key: body for key, body in self.group_defaults.items() if key != name}
        return False

    def _query_done(self, backend: MySQLBackend, effect: QueryEffect) -> None:
        """A statement with a session effect has its response: track what it set, pin or unpin."""
        if backend.tracker.error is not None and effect.single:
            return
        if effect.schema is not None:
            self._schema_changed(backend, effect.schema)
        if effect.charset:  # SET NAMES / CHARACTER SET override earlier character_set_* settings
            for name in ("character_set_client", "character_set_connection", "character_set_results",
                         "collation_connection"):
                if self.session.settings.pop(name, None) is not None:
                    backend.setting_dropped(name)
                    self._settings_key = None
        for name, body, _ in effect.settings:
            self._setting(backend, name, body)
        for user_name, value in effect.user_vars:
            if value.upper() == b"NULL":
                self.session.user_variables.pop(user_name, None)
                backend.user_variable_set(user_name, None)
            else:
                self.session.user_variables[user_name] = value
                backend.user_variable_set(user_name, value)
        if effect.hold_next:
            self._hold_next = 1
        for reason, names in effect.unpins:
            self._unpin(reason, None if names is None else self._qualified(reason, names))
        if effect.pin is not None and not (effect.pin == INSERT_ID_EXPRESSION and backend.tracker.last_insert_id):
            if effect.variable_set and self.service.exclude_variable_sets:
                log.debug("client %s: not pinned for %s (pinning filter exclude_variable_sets)", self.peer,
                          effect.detail or effect.pin)
            else:
                self._pin(backend, effect.pin, self._qualified(effect.pin, effect.pin_names), effect.detail)
                if effect.pin == FOUND_ROWS:
                    self._hold_next = 1

    def _qualified(self, reason: str, names: frozenset[bytes]) -> frozenset[bytes]:
        """Temporary table names with the default database they belong to."""
        if reason != TEMPORARY_TABLE:
            return names
        prefix = self.session.database.encode("utf-8", "surrogateescape") + b"."
        return frozenset(name if name in (ANY, NO_NAME) or b"." in name else prefix + name for name in names)

    def _setting(self, backend: MySQLBackend, name: str, body: bytes) -> None:
        """A session variable the client set: replayed (in the order last set) wherever the client goes."""
        settings = self.session.settings
        settings.pop(name, None)
        settings[name] = body
        backend.setting_applied(name, body)
        self._settings_key = None

    def _schema_changed(self, backend: MySQLBackend, schema: str) -> None:
        self.session.database = schema
        backend.schema_changed(schema)
        self._use_pool(schema)

    def _state_reported(self, backend: MySQLBackend, reports: list[bytes], query: QueryEffect | None) -> None:
        """Session state changes the server reported (CLIENT_SESSION_TRACK) for the client's command."""
        explained = False
        changed = False
        exact = {name for name, _, literal in query.settings if literal} if query is not None else set()
        for report in reports:
            for kind, payload in parse_session_state(report):
                if kind == my.SESSION_TRACK_SYSTEM_VARIABLES:
                    explained = True
                    name, p = read_lenenc_str(payload, 0)
                    value, _ = read_lenenc_str(payload, p)
                    name = name.lower()
                    if name in UNTRACKED_VARIABLES or name in self.service.read_only_variables or (
                            query is not None and (query.transient or (query.charset and name in CHARSET_VARIABLES))):
                        continue
                    text = name.decode("ascii", "replace")
                    if text in exact:  # the client's own literal says it best (e.g. timestamp = DEFAULT)
                        continue
                    self._setting(backend, text, b"@@SESSION." + name + b"=" + sql_literal(name, value))
                elif kind == my.SESSION_TRACK_SCHEMA:
                    explained = True
                    schema, _ = read_lenenc_str(payload, 0)
                    text = schema.decode("utf-8", "surrogateescape")
                    if text != self.session.database:
                        self._schema_changed(backend, text)
                elif kind == my.SESSION_TRACK_STATE_CHANGE:
                    changed = True
        if changed and not explained and not (query is not None and query.tracked) and not self.session.pins:
            self._pin(backend, STATE_CHANGE, frozenset((ANY,)),
                      "the server reported a session state change the proxy does not follow")

    def _pin(self, backend: MySQLBackend, reason: str, names: frozenset[bytes], detail: str) -> None:
        pins = self.session.pins
        held = pins.get(reason)
        if held is not None:
            held |= names
            return
        if not pins:
            self.stats.pinned_now += 1
        pins[reason] = set(names)
        self.stats.pinned(reason)
        if reason not in self._pins_logged:
            self._pins_logged.add(reason)
            log.info("client %s pinned to %s: %s%s", self.peer, backend, reason, f" ({detail})" if detail else "")

    def _unpin(self, reason: str, names: frozenset[bytes] | None) -> None:
        pins = self.session.pins
        held = pins.get(reason)
        if held is None:
            return
        if names is None:
            held.clear()
        else:
            held -= names
        if held:
            return
        del pins[reason]
        if not pins:
            self.stats.unpinned()
            log.info("client %s unpinned: %s ended", self.peer, reason)

    def _state_refused(self, backend: MySQLBackend, name: str | None, failure: bytes) -> None:
        """The backend refused a session variable of the client's (or its character set, name None): a session
        variable leaves the client's session (logged)."""
        error = ErrPacket.parse(failure)
        if name is None:
            log.warning("client %s: its character set %d could not be given to %s: %s", self.peer,
                        self.profile.charset, backend, error.message)
            return
        log.warning("client %s: session variable %s could not be set again on %s (%d %s); it is dropped from "
                    "the client's session", self.peer, name, backend, error.error_code, error.message)
        if name in self.group_defaults and self._group_refused(name, failure):
            return
        if error.error_code == ER_INCORRECT_GLOBAL_LOCAL_VAR:  # read only: never followed again on this target
            self.service.read_only_variables.add(name.encode("ascii", "replace"))
        self.session.settings.pop(name, None)
        self._settings_key = None
