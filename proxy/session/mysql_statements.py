"""Virtual prepared statements: each client's stable statement ids, and each backend's capped LRU of real ones.

A client's COM_STMT_PREPARE runs on whichever backend serves it; the client gets an id of the proxy's own
(`ClientStatement`), which names the statement text (its key also holds the default database and session
settings it was prepared under). Each backend keeps the statements prepared on it in a `StatementCache` by key
(proxy.pool.mysql_statements), shared by every client that backend serves, least recently used first and capped,
so no backend ever holds more than its share of the server's max_prepared_stmt_count. A statement command naming
a statement the borrowed backend does not have makes the proxy prepare it there first (that response is the
proxy's own).
"""

from __future__ import annotations

from proxy.pool.mysql_statements import BackendStatement, StatementCache
from proxy.session.mysql_inspect import QueryEffect

__all__ = ["BackendStatement", "ClientStatement", "StatementCache"]


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
