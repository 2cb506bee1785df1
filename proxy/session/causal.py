"""Causal reads on a read_only endpoint: before a transaction runs on a replica, the replica replays every write the
writer acknowledged before the transaction began; if it does not in time, the writer serves the transaction.

At each borrow the proxy asks the cluster's writer for its position P through a kept admin connection (one question
in flight per cluster, see proxy.topology.writer_position: a transaction only uses an answer to a question that
started after it arrived, so P covers every commit acknowledged before it), then waits on the borrowed backend until
its replica has replayed P, within the endpoint's causal_read_timeout. The wait is skipped when the topology monitor
last saw the replica at P or beyond (positions only grow), or when the endpoint's backend is the writer itself.
Whatever keeps the proxy from proving the replica caught up (no answer from the writer, the wait timed out, the
replica failed) sends the transaction to the writer, through the pools of the cluster's read_write endpoint, with
one log line: a causal read never returns data older than the client's own acknowledged writes; without a writer,
it waits for one up to the borrow timeout, then the client gets the borrow error in the protocol's form.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from proxy.errors import BackendUnavailable, ProxyError
from proxy.netio import ConnectionClosed
from proxy.pool.mysql_backend import MySQLBackend
from proxy.pool.pg_backend import PostgresBackend
from proxy.pool.pool import Pool
from proxy.topology.model import InstanceStatus
from proxy.topology.monitor import TopologyMonitor
from proxy.topology.mysql_probe import gtid_sequence
from proxy.topology.writer_position import NoWriter, Position, PositionUnknown, WriterPosition

log = logging.getLogger(__name__)

FIRST_PAUSE = 0.0005  # seconds between two looks at a PostgreSQL standby's replay position, doubling ...
LAST_PAUSE = 0.008  # ... up to this
LOG_EVERY = 1.0  # seconds between two log lines of an endpoint about transactions sent to the writer

B = TypeVar("B", PostgresBackend, MySQLBackend)


@dataclass(frozen=True)
class CausalCluster:
    """What causal reads need of a cluster: its monitor (who writes, where replicas were) and the writer's position."""

    monitor: TopologyMonitor
    position: WriterPosition


class CausalReads:
    """The causal-read step of one read_only endpoint; its cluster and the writer's pools are looked up at each use
    (they follow reloads and failovers)."""

    def __init__(self, endpoint: str, cluster: Callable[[], CausalCluster | None],
                 writer_service: Callable[[], object | None]) -> None:
        self.endpoint = endpoint
        self._cluster = cluster
        self._writer_service = writer_service
        self._logged_at = float("-inf")
        self._unlogged = 0  # transactions sent to the writer since the last log line

    def sent_to_writer(self, peer: str, why: str) -> None:
        """Log a transaction the writer serves (at most one line a second, with how many were not logged)."""
        now = asyncio.get_running_loop().time()
        if now - self._logged_at < LOG_EVERY:
            self._unlogged += 1
            return
        more = f" ({self._unlogged} more since the last such line)" if self._unlogged else ""
        self._logged_at, self._unlogged = now, 0
        log.info("client %s: causal read on endpoint %s served by the writer: %s%s", peer, self.endpoint, why, more)

    async def caught_up(self, backend: B, timeout: float,
                        wait: Callable[[B, Position, float], Awaitable[bool]]) -> str:
        """Whether `backend`'s server has every write acknowledged before now: "" if so, else why not.

        `wait(backend, position, deadline)` waits on the backend until its server has replayed `position` or the
        loop's clock passes `deadline`; it says whether it has."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        cluster = self._cluster()
        if cluster is None:
            return "the cluster is not monitored"
        monitor = cluster.monitor
        writer = monitor.writer()
        if writer is not None and writer.address == (backend.host, backend.port):
            return ""  # the endpoint serves the writer itself
        try:
            position = await asyncio.wait_for(asyncio.shield(cluster.position.after_now()), timeout)
        except TimeoutError:
            return f"the writer did not tell its position within {timeout:g} s"
        except Exception as exc:  # no writer, refused, lost: nothing proves the replica caught up
            known = isinstance(exc, NoWriter | PositionUnknown)  # (their messages name no secret)
            return f"the writer's position is not known ({exc if known else type(exc).__name__})"
        if _known_at(monitor.status((backend.host, backend.port)), monitor.writer(), position):
            return ""
        if await wait(backend, position, deadline):
            return ""
        return f"the replica did not replay the writer's position {_shown(position)} within {timeout:g} s"

    def writer_service(self) -> object:
        """The service of the cluster's read_write endpoint (its engine's type: the caller checks it)."""
        found = self._writer_service()
        if found is None:
            raise BackendUnavailable("causal read: the cluster has no read_write endpoint to serve it")
        return found


def _known_at(replica: InstanceStatus | None, writer: InstanceStatus | None, position: Position) -> bool:
    """Whether the monitor last saw the replica at `position` or beyond (on the writer's timeline)."""
    if replica is None or writer is None or not replica.healthy or replica.timeline != writer.timeline:
        return False
    if isinstance(position, int):
        return replica.position >= position
    gtids = [part for part in position.split(",") if part.strip()]
    if len(gtids) != 1:  # one domain per cluster (as the MariaDB probe reads positions); else no shortcut
        return not gtids
    domain = gtids[0].strip().split("-")[0]
    return domain.isdigit() and replica.position >= gtid_sequence(position, int(domain))


def _shown(position: Position) -> str:
    return _lsn(position) if isinstance(position, int) else position or "(empty)"


def _reason(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}"[:200] if text else type(exc).__name__


def _lsn(position: int) -> str:
    return f"{position >> 32:X}/{position & 0xFFFFFFFF:X}"


async def from_writer(pool: Pool, sync: Callable[[B], Awaitable[None]], kind: type[B]) -> B:
    """A backend of the writer's pool, given the client's session."""
    while True:
        backend = await pool.borrow()
        assert isinstance(backend, kind)
        if not backend.buffered and not backend.closed:
            break
        pool.discard(backend)
    try:
        await sync(backend)
    except BaseException:
        pool.discard(backend)
        raise
    return backend


async def checked(reads: CausalReads, backend: B, timeout: float,
                   wait: Callable[[B, Position, float], Awaitable[bool]], peer: str) -> bool:
    """Whether the replica backend may serve; if not, it has gone back to its pool (or was dropped)."""
    pool = backend.pool
    try:
        why = await reads.caught_up(backend, timeout, wait)
    except (ProxyError, ConnectionClosed, OSError) as exc:
        pool.discard(backend)
        why = f"the replica failed ({_reason(exc)})"
    except BaseException:
        pool.discard(backend)
        raise
    else:
        if not why:
            return True
        pool.release(backend)
    reads.sent_to_writer(peer, why)
    return False


# --- PostgreSQL ---

async def pg_replayed(backend: PostgresBackend, position: Position, deadline: float) -> bool:
    """Look at the standby's replay position until it reaches `position` (pauses doubling up to LAST_PAUSE)."""
    assert isinstance(position, int)
    sql = f"SELECT COALESCE(pg_last_wal_replay_lsn() >= '{_lsn(position)}'::pg_lsn, false)"
    loop = asyncio.get_running_loop()
    pause = FIRST_PAUSE
    while True:
        rows = await backend.simple_query(sql)
        if rows and rows[0][0] == "t":
            return True
        left = deadline - loop.time()
        if left <= 0:
            return False
        await asyncio.sleep(min(pause, left))
        pause = min(2 * pause, LAST_PAUSE)


# --- MariaDB ---

async def mariadb_replayed(backend: MySQLBackend, position: Position, deadline: float) -> bool:
    """MASTER_GTID_WAIT on the replica until it has applied `position` (the server bounds the wait)."""
    assert isinstance(position, str)
    if not position:
        return True  # the writer has committed nothing
    left = max(0.0, deadline - asyncio.get_running_loop().time())
    left = min(left, 0.9 * backend.pool.settings.internal_query_timeout)  # the server ends it before the proxy would
    quoted = position.replace("\\", "\\\\").replace("'", "\\'")
    rows = await backend.query(f"SELECT MASTER_GTID_WAIT('{quoted}', {left:.6f})")
    return bool(rows) and rows[0][0] == b"0"
