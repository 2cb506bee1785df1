"""Endpoints follow their cluster's topology: read_write to the writer; read_only and custom endpoints serve the
instances eligible after each probe round."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass

from proxy.config import EndpointRole
from proxy.pool.balance import TargetGroup
from proxy.pool.pool import Target
from proxy.topology.model import InstanceStatus, Role
from proxy.topology.monitor import Address, TopologyMonitor

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Followed:
    """One endpoint of the cluster as the follower sees it: its name, role and target; for an endpoint that
    spreads its work, its group and the read_only rules (lag limit in seconds, 0: none; writer fallback)."""

    name: str
    role: EndpointRole
    target: Target
    group: TargetGroup | None = None
    max_replica_lag: float = 0.0
    reader_fallback: bool = True


class ClusterFollower:
    """Re-points the read_write endpoints of one cluster after every probe round that changed a role or a
    health, and sets the eligible instances of its read_only and custom endpoints after every round (a lag
    moves without any such change).

    Each worker process runs its own monitor and follower (no coordination between workers is needed: they
    all probe the same instances and reach the same answer within one interval).
    """

    def __init__(self, cluster: str, monitor: TopologyMonitor, endpoints: Callable[[], list[Followed]]) -> None:
        self.cluster = cluster
        self.monitor = monitor
        self._endpoints = endpoints
        self._scheduled = False
        monitor.on_change(self._changed)
        monitor.on_round(self.follow_groups)

    def start(self) -> None:
        self.monitor.start()

    async def stop(self) -> None:
        await self.monitor.stop()

    def _changed(self, previous: InstanceStatus | None, status: InstanceStatus) -> None:
        # A round records every instance without yielding: apply once, after the whole round.
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self.apply)

    def apply(self) -> None:
        """Point every read_write endpoint at the writer (paused while there is none), and let read_only and
        custom endpoints serve the instances eligible now."""
        self._scheduled = False
        writer = self.monitor.writer()
        for endpoint in self._endpoints():
            if endpoint.role is EndpointRole.READ_WRITE:
                self._follow_writer(endpoint, writer)
        self.follow_groups()

    def _follow_writer(self, endpoint: Followed, writer: InstanceStatus | None) -> None:
        target = endpoint.target
        if writer is None:
            if not target.paused:
                log.warning("endpoint %s: cluster %s has no healthy writer; new transactions wait for one",
                            endpoint.name, self.cluster)
                target.pause()
            return
        if (target.host, target.port) != writer.address:
            log.warning("endpoint %s: writer is now %s:%d (timeline %d), was %s:%d", endpoint.name, writer.host,
                        writer.port, writer.timeline, target.host, target.port)
            target.repoint(writer.host, writer.port)
        target.resume()

    def follow_groups(self) -> None:
        """After every probe round: each read_only or custom endpoint serves the instances eligible now."""
        statuses = self.monitor.snapshot()
        if not statuses:
            return  # nothing probed yet: the configuration's choice stays
        fenced = self.monitor.fenced()
        writer: InstanceStatus | None = None
        for endpoint in self._endpoints():
            group = endpoint.group
            if group is None or endpoint.role is EndpointRole.READ_WRITE:
                continue
            if endpoint.role is EndpointRole.READ_ONLY:
                if writer is None:
                    writer = self.monitor.writer()
                labels, why = self._eligible_readers(endpoint, group, statuses, fenced, writer)
            else:
                labels = [label for label, target in group.targets.items()
                          if _usable(statuses.get((target.host, target.port)), fenced)]
                why = "" if labels else "no member is healthy; new work waits for one"
            if group.serve(labels):
                self._log_serving(endpoint, group, why)

    def _eligible_readers(self, endpoint: Followed, group: TargetGroup, statuses: dict[Address, InstanceStatus],
                          fenced: set[Address], writer: InstanceStatus | None) -> tuple[list[str], str]:
        """The readers within the lag limit; else the writer (when the fallback is allowed); else none."""
        limit = endpoint.max_replica_lag
        readers: list[str] = []
        for label, target in group.targets.items():
            status = statuses.get((target.host, target.port))
            if (_usable(status, fenced) and status is not None and status.role is Role.READER
                    and (not limit or (status.lag_seconds is not None and status.lag_seconds <= limit))):
                readers.append(label)
        if readers:
            return readers, ""
        if endpoint.reader_fallback and writer is not None:
            for label, target in group.targets.items():
                if (target.host, target.port) == writer.address:
                    return [label], "no reader is eligible; the writer serves meanwhile"
        return [], "no reader is eligible; new work waits for one"

    def _log_serving(self, endpoint: Followed, group: TargetGroup, why: str) -> None:
        serving = ", ".join(f"{label} ({group.targets[label].host}:{group.targets[label].port})"
                            for label in group.serving) or "nothing"
        fenced = self.monitor.fenced()
        left = [f"{label} ({_state(self.monitor.status((target.host, target.port)), endpoint.max_replica_lag, fenced)})"
                for label, target in group.targets.items() if label not in group.serving]
        log.warning("endpoint %s: now serving %s%s%s", endpoint.name, serving,
                    f"; left out: {', '.join(left)}" if left else "", f"; {why}" if why else "")


def _usable(status: InstanceStatus | None, fenced: set[Address]) -> bool:
    return status is not None and status.healthy and status.address not in fenced


def _state(status: InstanceStatus | None, limit: float, fenced: set[Address]) -> str:
    """Why an instance is left out, in a few words."""
    if status is None:
        return "not probed yet"
    if status.address in fenced:
        return "fenced"
    if not status.healthy:
        return "unhealthy"
    if status.role is Role.WRITER:
        return "writer"
    if status.lag_seconds is None:
        return "lag unknown"
    if limit and status.lag_seconds > limit:
        return f"lag {status.lag_seconds:.2f} s"
    return status.role.value
