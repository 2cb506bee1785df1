"""Watching a cluster: probe every instance each interval, keep the latest status, tell who writes and who reads."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from proxy.topology.model import InstanceStatus, Probe, Role

log = logging.getLogger(__name__)

Address = tuple[str, int]
# Called with (previous status or None, new status) when an instance's role or health changes.
ChangeCallback = Callable[[InstanceStatus | None, InstanceStatus], None]


class TopologyMonitor:
    """Engine-neutral: the probe decides what an instance is; this keeps the answers and reports changes."""

    def __init__(self, instances: list[Address], probe: Probe, interval: float, timeout: float) -> None:
        self._instances = list(dict.fromkeys(instances))
        self._probe = probe
        self._interval = interval
        self._timeout = timeout
        self._status: dict[Address, InstanceStatus] = {}
        self._callbacks: list[ChangeCallback] = []
        self._round_callbacks: list[Callable[[], None]] = []
        self._task: asyncio.Task[None] | None = None
        self._round_lock = asyncio.Lock()
        # Fencing: the writer chosen last, and the writers it replaced. A fenced instance is never chosen again,
        # even when it comes back claiming to write, until an operator re-admits it.
        self._chosen: Address | None = None
        self._fenced: set[Address] = set()
        self.writer_changes = 0  # times the chosen writer moved to another instance (failovers seen)

    def on_change(self, callback: ChangeCallback) -> None:
        self._callbacks.append(callback)

    def on_round(self, callback: Callable[[], None]) -> None:
        """Call `callback` after every probe round (lag moves without any role or health change)."""
        self._round_callbacks.append(callback)

    # -- lifecycle ------------------------------------------------------------------

    def start(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(), name="topology-monitor")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        close = getattr(self._probe, "close", None)  # a probe that keeps connections closes them
        if close is not None:
            await close()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            await self.probe_now()
            await asyncio.sleep(max(0.0, self._interval - (loop.time() - started)))

    async def probe_now(self) -> dict[Address, InstanceStatus]:
        """One round at once: every instance probed concurrently; returns the snapshot after it."""
        async with self._round_lock:
            answers = await asyncio.gather(
                *(self._probe(host, port, self._timeout) for host, port in self._instances), return_exceptions=True
            )
            for (host, port), answer in zip(self._instances, answers, strict=True):
                if isinstance(answer, BaseException) and not isinstance(answer, Exception):
                    raise answer  # cancelled (stop()) or interrupted
                if isinstance(answer, Exception):  # a probe broke its promise not to raise
                    log.error("probe of %s:%d raised %s", host, port, type(answer).__name__)
                    answer = InstanceStatus(host, port, Role.UNKNOWN, False, time.monotonic(),
                                            error=f"probe raised {type(answer).__name__}")
                self._record(answer)
            for callback in self._round_callbacks:
                try:
                    callback()
                except Exception:
                    log.exception("topology round callback %r failed", callback)
        return self.snapshot()

    def _record(self, status: InstanceStatus) -> None:
        previous = self._status.get(status.address)
        self._status[status.address] = status
        if previous is not None and (previous.role, previous.healthy) == (status.role, status.healthy):
            return
        where = f"{status.host}:{status.port}"
        if status.healthy:
            log.info("instance %s is now %s (timeline %d)", where, status.role.value, status.timeline)
        else:
            log.warning("instance %s is unhealthy: %s", where, status.error)
        for callback in self._callbacks:
            try:
                callback(previous, status)
            except Exception:  # one listener's bug must not hide the change from the others
                log.exception("topology change callback %r failed", callback)

    # -- answers --------------------------------------------------------------------

    def status(self, address: Address) -> InstanceStatus | None:
        return self._status.get(address)

    def snapshot(self) -> dict[Address, InstanceStatus]:
        return dict(self._status)

    def writer(self) -> InstanceStatus | None:
        """The healthy, unfenced writer furthest ahead by (timeline, position): a stale old primary loses to a
        promoted one. Choosing a new writer fences the one chosen before it."""
        writers = [s for s in self._status.values()
                   if s.healthy and s.role is Role.WRITER and s.address not in self._fenced]
        best = max(writers, key=lambda s: (s.timeline, s.position, s.address), default=None)
        if best is not None and best.address != self._chosen:
            if self._chosen is not None:
                self.fence(self._chosen)
                self.writer_changes += 1
            self._chosen = best.address
        return best

    def fence(self, address: Address) -> None:
        """Never choose `address` as the writer again (until `readmit`)."""
        if address not in self._fenced:
            self._fenced.add(address)
            if self._chosen == address:
                self._chosen = None
            log.warning("instance %s:%d is fenced: no work goes to it until an operator re-admits it", *address)

    def readmit(self, address: Address) -> bool:
        """Let a fenced instance be chosen again; False if it was not fenced."""
        if address not in self._fenced:
            return False
        self._fenced.discard(address)
        log.warning("instance %s:%d is re-admitted", *address)
        return True

    def fenced(self) -> set[Address]:
        return set(self._fenced)

    def readers(self, max_lag: float | None = None) -> list[InstanceStatus]:
        """Healthy readers; with ``max_lag``, only those known to be at most that many seconds behind."""
        return [
            s
            for s in self._status.values()
            if s.healthy
            and s.address not in self._fenced
            and s.role is Role.READER
            and (max_lag is None or (s.lag_seconds is not None and s.lag_seconds <= max_lag))
        ]
