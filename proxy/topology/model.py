"""What the proxy knows of one instance at one moment: its role, health, replication position and lag."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import StrEnum


class Role(StrEnum):
    WRITER = "writer"  # accepts writes: PostgreSQL not in recovery; MariaDB read_only off and not a replica
    READER = "reader"  # a replica (PostgreSQL standby; MariaDB with read_only on or replicating)
    UNKNOWN = "unknown"  # not reachable, or the answer could not be read


@dataclass(frozen=True, slots=True)
class InstanceStatus:
    """One probe's answer for one instance (frozen: a new probe gives a new object)."""

    host: str
    port: int
    role: Role
    healthy: bool  # the probe connected and got its answer within the timeout
    checked_at: float  # time.monotonic() of the probe's answer (or failure)
    # Replication position, comparable only within one engine: PostgreSQL (timeline, LSN as an integer);
    # MariaDB (0, the sequence number of gtid_current_pos in the writer's domain).
    timeline: int = 0
    position: int = 0
    lag_seconds: float | None = None  # how far a reader's replay is behind (None: writer, or not known)
    error: str = ""  # why the probe failed (never a secret: no password, no connection string)

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.port


# A probe: ask one instance (host, port) who it is, within `timeout` seconds; never raises for a dead instance,
# it answers an unhealthy InstanceStatus with the reason instead.
Probe = Callable[[str, int, float], Awaitable[InstanceStatus]]
