"""Endpoints follow their cluster's topology: read_write to the writer; read_only and custom endpoints serve the
instances eligible after each probe round."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from proxy.config import EndpointRole
from proxy.pool.balance import TargetGroup
from proxy.pool.pool import READ_ONLY_TROUBLE, Target
from proxy.topology.model import InstanceStatus, Role
from proxy.topology.monitor import Address, TopologyMonitor
from proxy.topology.promote import AlreadyWriter, Promoter, PromotionError, promotion_candidate

log = logging.getLogger(__name__)

REACT_GAP = 0.2  # seconds at least between the starts of two rounds asked for by trouble reports
NO_WRITER_INTERVAL = 0.5  # seconds between rounds while a read_write endpoint waits for a writer (at most)


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


@dataclass(frozen=True, slots=True)
class AutoPromote:
    """Promote a reader when the cluster has had no healthy writer for `grace` seconds, with `promote`."""

    promote: Promoter
    grace: float


class ClusterFollower:
    """Re-points the read_write endpoints of one cluster after every probe round that changed a role or a
    health, and sets the eligible instances of its read_only and custom endpoints after every round (a lag
    moves without any such change).

    Each worker process runs its own monitor and follower (no coordination between workers is needed: they
    all probe the same instances and reach the same answer within one interval).

    Client traffic can tell sooner than the next round: a target's trouble report (a refused connect, a lost
    backend, a read-only or shutdown error) starts a round at once and applies its answer; reports that come
    during that round ask for one more round right after it, no more. While a read_write endpoint has no writer,
    rounds follow each other every `no_writer_interval` seconds until a writer appears.
    With `auto_promote`, a cluster without a healthy writer for its grace period gets its most advanced healthy
    reader promoted (one attempt at a time).
    """

    def __init__(self, cluster: str, monitor: TopologyMonitor, endpoints: Callable[[], list[Followed]],
                 auto_promote: AutoPromote | None = None, no_writer_interval: float = NO_WRITER_INTERVAL) -> None:
        self.cluster = cluster
        self.monitor = monitor
        self._endpoints = endpoints
        self._auto_promote = auto_promote
        self._no_writer_interval = no_writer_interval
        self._scheduled = False
        self._reaction: asyncio.Task[None] | None = None  # the rounds asked for by trouble reports
        self._again = False  # a report came during the reaction's round: one more round after it
        self._last_reaction = 0.0  # loop time the last reaction round started
        self._waiting_for_writer = False  # a read_write endpoint is paused: rounds come every no_writer_interval
        self._no_writer_since: float | None = None  # monotonic time the follower first saw no healthy writer
        self._promotion: asyncio.Task[None] | None = None
        self._stopped = False  # after stop(), reports (of clients closed at shutdown) start nothing
        monitor.on_change(self._changed)
        monitor.on_round(self.follow_groups)

    def start(self) -> None:
        self._hook_targets()
        self.monitor.start()

    async def stop(self) -> None:
        self._stopped = True
        for task in (self._reaction, self._promotion):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        await self.monitor.stop()

    def _hook_targets(self) -> None:
        """Hear the trouble reports of every endpoint target of the cluster (once per target): all of them from a
        read_write endpoint, all but read-only errors (a reader's normal answer to a write) from the others."""
        for endpoint in self._endpoints():
            hook = self.trouble if endpoint.role is EndpointRole.READ_WRITE else self._reader_trouble
            targets = [endpoint.target] if endpoint.group is None else [endpoint.target, *endpoint.group.all()]
            for target in targets:
                if hook not in target.on_trouble:
                    target.on_trouble.append(hook)

    # -- reacting to client traffic -------------------------------------------------

    def trouble(self, reason: str) -> None:
        """Traffic suggests an instance failed or was demoted: probe now (debounced) and follow the answer."""
        if self._stopped:
            return
        reaction = self._reaction
        if reaction is not None and not reaction.done():
            self._again = True
            return
        log.info("cluster %s: %s; probing the instances now", self.cluster, reason)
        self._reaction = asyncio.get_running_loop().create_task(self._react(), name="topology-reaction")

    def _reader_trouble(self, reason: str) -> None:
        if not reason.startswith(READ_ONLY_TROUBLE):
            self.trouble(reason)

    async def _react(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            wait = self._last_reaction + REACT_GAP - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            self._again = False  # the reports so far are answered by this round
            self._last_reaction = loop.time()
            try:
                await self.monitor.probe_now()
            except Exception:
                log.exception("cluster %s: probe round failed", self.cluster)
            self.apply()
            if self._again:
                continue
            if not self._waiting_for_writer:
                return
            await asyncio.sleep(self._no_writer_interval)
            if not (self._again or self._waiting_for_writer):
                return

    # -- following the topology -----------------------------------------------------

    def _changed(self, previous: InstanceStatus | None, status: InstanceStatus) -> None:
        # A round records every instance without yielding: apply once, after the whole round.
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self.apply)

    def apply(self) -> None:
        """Point every read_write endpoint at the writer (paused while there is none), and let read_only and
        custom endpoints serve the instances eligible now."""
        self._scheduled = False
        self._hook_targets()
        writer = self.monitor.writer()
        waiting = False
        for endpoint in self._endpoints():
            if endpoint.role is EndpointRole.READ_WRITE:
                self._follow_writer(endpoint, writer)
                waiting = waiting or writer is None
        self.follow_groups()
        self._writer_seen(writer, waiting)

    def _writer_seen(self, writer: InstanceStatus | None, waiting: bool) -> None:
        """Keep rounds coming while an endpoint waits for a writer; promote one when auto_promote says so."""
        self._waiting_for_writer = waiting
        if writer is not None:
            self._no_writer_since = None
            return
        now = time.monotonic()
        if self._no_writer_since is None:
            self._no_writer_since = now
        if self._stopped:
            return
        if waiting and (self._reaction is None or self._reaction.done()):
            self._reaction = asyncio.get_running_loop().create_task(self._react(), name="topology-reaction")
        auto = self._auto_promote
        if (auto is not None and now - self._no_writer_since >= auto.grace
                and (self._promotion is None or self._promotion.done())):
            self._promotion = asyncio.get_running_loop().create_task(self._promote(auto), name="auto-promote")

    async def _promote(self, auto: AutoPromote) -> None:
        """Promote the most advanced healthy reader, then look again at once."""
        since = self._no_writer_since
        waited = 0.0 if since is None else time.monotonic() - since
        candidate = promotion_candidate(self.monitor.readers())
        if candidate is None:
            log.error("cluster %s: no healthy writer for %.1f s and no healthy reader to promote", self.cluster,
                      waited)
            self._no_writer_since = time.monotonic()  # the next attempt after another grace period
            return
        log.warning("cluster %s: no healthy writer for %.1f s; promoting %s:%d (timeline %d, position %d)",
                    self.cluster, waited, candidate.host, candidate.port, candidate.timeline, candidate.position)
        started = time.monotonic()
        try:
            await auto.promote(candidate.host, candidate.port)
        except AlreadyWriter:
            log.info("cluster %s: %s:%d is a writer already", self.cluster, candidate.host, candidate.port)
        except PromotionError as exc:
            log.error("cluster %s: %s", self.cluster, exc)
            self._no_writer_since = time.monotonic()
            return
        except Exception:
            log.exception("cluster %s: promoting %s:%d failed", self.cluster, candidate.host, candidate.port)
            self._no_writer_since = time.monotonic()
            return
        else:
            log.warning("cluster %s: promoted %s:%d in %.0f ms", self.cluster, candidate.host, candidate.port,
                        (time.monotonic() - started) * 1000)
        try:
            await self.monitor.probe_now()
        except Exception:
            log.exception("cluster %s: probe round failed", self.cluster)
        self.apply()

    def _follow_writer(self, endpoint: Followed, writer: InstanceStatus | None) -> None:
        target = endpoint.target
        if writer is None:
            if not target.held:
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
