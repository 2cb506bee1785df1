"""Endpoints follow their cluster's topology: read_write to the writer, read_only to a healthy reader."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass

from proxy.config import EndpointRole
from proxy.pool.pool import Target
from proxy.topology.model import InstanceStatus, Role
from proxy.topology.monitor import TopologyMonitor

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Followed:
    """One endpoint of the cluster as the follower sees it: its name, role and target."""

    name: str
    role: EndpointRole
    target: Target


class ClusterFollower:
    """Re-points the endpoints of one cluster after every probe round that changed a role or a health.

    Each worker process runs its own monitor and follower (no coordination between workers is needed: they
    all probe the same instances and reach the same answer within one interval).
    """

    def __init__(self, cluster: str, monitor: TopologyMonitor, endpoints: Callable[[], list[Followed]]) -> None:
        self.cluster = cluster
        self.monitor = monitor
        self._endpoints = endpoints
        self._scheduled = False
        monitor.on_change(self._changed)

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
        """Point every read_write endpoint at the writer (paused while there is none) and every read_only
        endpoint whose instance is not a healthy reader at the least-lagging healthy reader, else the writer."""
        self._scheduled = False
        writer = self.monitor.writer()
        for endpoint in self._endpoints():
            if endpoint.role is EndpointRole.READ_WRITE:
                self._follow_writer(endpoint, writer)
            elif endpoint.role is EndpointRole.READ_ONLY:
                self._follow_reader(endpoint, writer)

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

    def _follow_reader(self, endpoint: Followed, writer: InstanceStatus | None) -> None:
        target = endpoint.target
        current = self.monitor.status((target.host, target.port))
        if current is not None and current.healthy and (
            current.role is Role.READER or (writer is not None and current.address == writer.address)
        ):
            return
        readers = sorted(self.monitor.readers(),
                         key=lambda s: float("inf") if s.lag_seconds is None else s.lag_seconds)
        chosen = readers[0] if readers else writer
        if chosen is None or chosen.address == (target.host, target.port):
            return
        log.warning("endpoint %s: instance %s:%d is %s; now serving %s %s:%d", endpoint.name, target.host,
                    target.port, "unhealthy" if current is None or not current.healthy else "not a reader",
                    chosen.role.value, chosen.host, chosen.port)
        target.repoint(chosen.host, chosen.port)
