"""The MariaDB probe: read_only, replica status and GTID position of one instance over a monitoring connection."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiomysql
import pymysql

from proxy.topology.model import InstanceStatus, Role

_VARIABLES = "SELECT @@read_only, @@gtid_current_pos, @@gtid_binlog_pos, @@gtid_domain_id, @@server_id"


def gtid_sequence(gtid_pos: str, domain_id: int) -> int:
    """The sequence number of ``domain_id`` in a GTID position ("0-1-42,1-2-7" and domain 0 -> 42; absent -> 0)."""
    for gtid in gtid_pos.split(","):
        parts = gtid.strip().split("-")
        if len(parts) == 3 and parts[0].isdigit() and int(parts[0]) == domain_id and parts[2].isdigit():
            return int(parts[2])
    return 0


def _status_from(host: str, port: int, variables: tuple[Any, ...], replica: dict[str, Any] | None) -> InstanceStatus:
    read_only, current_pos, _binlog_pos, domain_id, _server_id = variables
    position = gtid_sequence(str(current_pos or ""), int(domain_id or 0))
    if replica is None and not int(read_only):
        return InstanceStatus(host, port, Role.WRITER, True, time.monotonic(), position=position)
    lag: float | None = None
    if replica is not None and replica.get("Slave_SQL_Running") == "Yes":
        behind = replica.get("Seconds_Behind_Master")
        lag = None if behind is None else float(behind)
    return InstanceStatus(host, port, Role.READER, True, time.monotonic(), position=position, lag_seconds=lag)


def _reason(exc: BaseException, password: str) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    text = f"{type(exc).__name__}: {exc}"
    return text.replace(password, "***") if password else text


class MySQLProbe:
    """Asks MariaDB instances who they are over one kept monitoring connection per instance (``user`` needs
    ``REPLICA MONITOR`` for SHOW SLAVE STATUS).

    The connection is opened at the first probe and kept; when it fails (the server restarted, wait_timeout
    closed it) a fresh one is tried once within the same timeout.

    Role: WRITER when ``read_only`` is off and the instance is not configured as a replica (no row in
    ``SHOW SLAVE STATUS``); READER otherwise. ``lag_seconds`` is ``Seconds_Behind_Master`` while the SQL
    thread runs, None when it is not known (SQL thread stopped, or no connection to the primary): a lag
    limit must treat None as "too far behind" and exclude such a reader. ``position`` is the sequence
    number in ``gtid_current_pos`` of the instance's ``gtid_domain_id`` (one domain per cluster), ``timeline``
    is 0. Any failure gives an unhealthy UNKNOWN status whose ``error`` says why, never the password.
    """

    def __init__(self, user: str, password: str) -> None:
        self._user = user
        self._password = password
        self._kept: dict[tuple[str, int], aiomysql.Connection] = {}

    def __repr__(self) -> str:
        return f"MySQLProbe(user={self._user!r})"

    async def __call__(self, host: str, port: int, timeout: float) -> InstanceStatus:
        try:
            return await asyncio.wait_for(self._ask(host, port, timeout), timeout)
        except asyncio.CancelledError:
            self._drop((host, port))
            raise
        except Exception as exc:  # a dead or refusing instance is an answer, not an error of the caller
            self._drop((host, port))
            return InstanceStatus(host, port, Role.UNKNOWN, False, time.monotonic(),
                                  error=_reason(exc, self._password))

    async def _ask(self, host: str, port: int, timeout: float) -> InstanceStatus:
        kept = self._kept.get((host, port))
        if kept is not None and not kept.closed:
            try:
                return await _status(kept, host, port)
            except (pymysql.err.OperationalError, pymysql.err.InterfaceError, OSError):
                self._drop((host, port))  # a stale connection: one fresh try below
        conn = await aiomysql.connect(host=host, port=port, user=self._user, password=self._password,
                                      connect_timeout=timeout, autocommit=True)
        self._kept[(host, port)] = conn
        return await _status(conn, host, port)

    def _drop(self, address: tuple[str, int]) -> None:
        conn = self._kept.pop(address, None)
        if conn is not None:
            conn.close()

    async def close(self) -> None:
        """Close every kept connection (the monitor stops)."""
        for address in list(self._kept):
            self._drop(address)


async def _status(conn: aiomysql.Connection, host: str, port: int) -> InstanceStatus:
    async with conn.cursor() as cur:
        await cur.execute(_VARIABLES)
        variables = await cur.fetchone()
    async with conn.cursor(aiomysql.DictCursor) as cur:
        await cur.execute("SHOW SLAVE STATUS")
        replica = await cur.fetchone()
    return _status_from(host, port, tuple(variables), replica)


def mysql_probe(user: str, password: str) -> MySQLProbe:
    """A :data:`Probe` for MariaDB, logging in as ``user``."""
    return MySQLProbe(user, password)
