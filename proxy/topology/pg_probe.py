"""The PostgreSQL probe: one instance's role, timeline, WAL position and replay lag, asked over asyncpg."""

from __future__ import annotations

import asyncio
import time

import asyncpg

from proxy.topology.model import InstanceStatus, Role

# On the writer: the timeline is the one its current WAL file is named after (pg_control_checkpoint() would
# lag behind a promotion until the next checkpoint); the position is the end of the WAL it has generated
# (the insert LSN: with synchronous_commit off, pg_current_wal_lsn() trails the commits not yet written).
_WRITER_SQL = """
SELECT ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::bigint AS timeline,
       pg_current_wal_insert_lsn() - '0/0'::pg_lsn AS position
"""
# On a standby: the timeline it receives (or, with no WAL receiver, its last restartpoint's), the position it
# has replayed, and its lag: 0 once everything received is replayed (the replay timestamp ages without writes),
# else the age of the last replayed transaction (NULL if none was replayed yet: not known).
_STANDBY_SQL = """
SELECT COALESCE((SELECT received_tli FROM pg_stat_wal_receiver), (pg_control_checkpoint()).timeline_id)::bigint
         AS timeline,
       COALESCE(pg_last_wal_replay_lsn() - '0/0'::pg_lsn, 0) AS position,
       CASE WHEN pg_last_wal_receive_lsn() IS NOT DISTINCT FROM pg_last_wal_replay_lsn() THEN 0.0
            ELSE EXTRACT(EPOCH FROM now() - pg_last_xact_replay_timestamp())::float8 END AS lag
"""


def _reason(exc: BaseException, timeout: float) -> str:
    """Why a probe failed, in words that carry no secret (asyncpg and OS errors name no password)."""
    if isinstance(exc, TimeoutError):
        return f"no answer within {timeout:g}s"
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}"[:200]


class PostgresProbe:
    """Asks PostgreSQL instances who they are over one kept monitoring connection per instance.

    The connection is opened at the first probe and kept; when it fails (the server restarted, an idle timeout
    closed it) a fresh one is tried once within the same timeout. ``user`` needs the ``pg_monitor`` role on a
    standby (to read ``pg_stat_wal_receiver.received_tli`` and ``pg_control_checkpoint()``). Never raises for a
    dead or refusing instance: any failure is an unhealthy ``UNKNOWN`` status with the reason.
    """

    def __init__(self, user: str, password: str, database: str, ssl: str) -> None:
        self._user = user
        self._password = password
        self._database = database
        self._ssl = ssl
        self._kept: dict[tuple[str, int], asyncpg.Connection] = {}

    def __repr__(self) -> str:
        return f"PostgresProbe(user={self._user!r}, database={self._database!r})"

    async def __call__(self, host: str, port: int, timeout: float) -> InstanceStatus:
        try:
            return await asyncio.wait_for(self._ask(host, port), timeout)
        except asyncio.CancelledError:
            self._drop((host, port))
            raise
        except Exception as exc:  # refused, timed out, auth, protocol: the instance is not usable now
            self._drop((host, port))
            return InstanceStatus(host, port, Role.UNKNOWN, False, time.monotonic(), error=_reason(exc, timeout))

    async def _ask(self, host: str, port: int) -> InstanceStatus:
        kept = self._kept.get((host, port))
        if kept is not None and not kept.is_closed():
            try:
                return await _status(kept, host, port)
            except (asyncpg.PostgresConnectionError, asyncpg.InterfaceError, OSError):
                self._drop((host, port))  # a stale connection: one fresh try below
        conn = await asyncpg.connect(host=host, port=port, user=self._user, password=self._password,
                                     database=self._database, ssl=self._ssl, timeout=None, statement_cache_size=0)
        self._kept[(host, port)] = conn
        return await _status(conn, host, port)

    def _drop(self, address: tuple[str, int]) -> None:
        conn = self._kept.pop(address, None)
        if conn is not None:
            conn.terminate()

    async def close(self) -> None:
        """Close every kept connection (the monitor stops)."""
        for address in list(self._kept):
            self._drop(address)


async def _status(conn: asyncpg.Connection, host: str, port: int) -> InstanceStatus:
    in_recovery = await conn.fetchval("SELECT pg_is_in_recovery()")
    if not in_recovery:
        row = await conn.fetchrow(_WRITER_SQL)
        assert row is not None
        return InstanceStatus(host, port, Role.WRITER, True, time.monotonic(),
                              timeline=int(row["timeline"]), position=int(row["position"]))
    row = await conn.fetchrow(_STANDBY_SQL)
    assert row is not None
    lag = row["lag"]
    return InstanceStatus(host, port, Role.READER, True, time.monotonic(),
                          timeline=int(row["timeline"] or 0), position=int(row["position"]),
                          lag_seconds=None if lag is None else max(0.0, float(lag)))


def postgres_probe(user: str, password: str, database: str, *, ssl: str = "prefer") -> PostgresProbe:
    """A :data:`Probe` that logs in as ``user`` to ``database`` and asks each instance who it is."""
    return PostgresProbe(user, password, database, ssl)
