"""TopologyMonitor's bookkeeping with a scripted probe: who writes, who reads, which changes are reported."""

from __future__ import annotations

import asyncio

from proxy.topology.model import InstanceStatus, Role
from proxy.topology.monitor import TopologyMonitor

A, B, C = ("10.0.0.1", 5432), ("10.0.0.2", 5432), ("10.0.0.3", 5432)


def test_writer_readers_and_changes() -> None:
    answers: dict[tuple[str, int], InstanceStatus | Exception] = {}

    async def probe(host: str, port: int, timeout: float) -> InstanceStatus:
        answer = answers[(host, port)]
        if isinstance(answer, Exception):
            raise answer
        return answer

    def status(addr: tuple[str, int], role: Role, timeline: int = 1, position: int = 0,
               lag: float | None = None) -> InstanceStatus:
        return InstanceStatus(addr[0], addr[1], role, True, 0.0, timeline, position, lag)

    async def scenario() -> None:
        monitor = TopologyMonitor([A, B, C], probe, interval=1.0, timeout=1.0)
        seen: list[tuple[Role | None, Role, bool]] = []
        monitor.on_change(lambda old, new: seen.append((old.role if old else None, new.role, new.healthy)))
        monitor.on_change(lambda old, new: 1 / 0)  # a broken listener hides nothing from the others
        answers.update({A: status(A, Role.WRITER, 1, 900), B: status(B, Role.READER, lag=0.0),
                        C: status(C, Role.READER, lag=5.0)})
        await monitor.probe_now()
        assert (monitor.writer() or status(C, Role.UNKNOWN)).address == A
        assert {s.address for s in monitor.readers()} == {B, C}
        assert [s.address for s in monitor.readers(max_lag=1.0)] == [B]
        assert seen == [(None, Role.WRITER, True), (None, Role.READER, True), (None, Role.READER, True)]

        seen.clear()
        answers[C] = status(C, Role.READER, lag=0.5)  # only the lag moved: no change reported
        await monitor.probe_now()
        assert seen == [] and {s.address for s in monitor.readers(max_lag=1.0)} == {B, C}

        # B promoted on timeline 2; A (stale, further along its own old timeline) still claims to write.
        answers[B] = status(B, Role.WRITER, 2, 100)
        answers[C] = RuntimeError("a probe that broke its promise")
        await monitor.probe_now()
        assert (monitor.writer() or status(C, Role.UNKNOWN)).address == B
        broken = monitor.status(C)
        assert broken is not None and not broken.healthy and broken.role is Role.UNKNOWN
        assert broken.error == "probe raised RuntimeError"
        assert seen == [(Role.READER, Role.WRITER, True), (Role.READER, Role.UNKNOWN, False)]
        assert monitor.readers() == []

    asyncio.run(scenario())


def test_a_replaced_writer_is_fenced_until_readmitted() -> None:
    answers: dict[tuple[str, int], InstanceStatus] = {}

    async def probe(host: str, port: int, timeout: float) -> InstanceStatus:
        return answers[(host, port)]

    def status(addr: tuple[str, int], role: Role, timeline: int = 1, position: int = 0,
               healthy: bool = True) -> InstanceStatus:
        return InstanceStatus(addr[0], addr[1], role if healthy else Role.UNKNOWN, healthy, 0.0, timeline, position)

    async def scenario() -> None:
        monitor = TopologyMonitor([A, B], probe, interval=1.0, timeout=1.0)
        answers.update({A: status(A, Role.WRITER, 1, 500), B: status(B, Role.READER, 1, 400)})
        await monitor.probe_now()
        assert (writer := monitor.writer()) is not None and writer.address == A
        # A dies; B is promoted; A comes back still claiming to write, further along its old timeline's WAL.
        answers.update({A: status(A, Role.UNKNOWN, healthy=False), B: status(B, Role.WRITER, 2, 10)})
        await monitor.probe_now()
        assert (writer := monitor.writer()) is not None and writer.address == B
        assert monitor.fenced() == {A}
        answers[A] = status(A, Role.WRITER, 3, 10_000)  # even on a higher timeline: fenced means fenced
        await monitor.probe_now()
        assert (writer := monitor.writer()) is not None and writer.address == B
        assert monitor.readers() == []
        # Re-admitted, A is a candidate again and wins on its timeline; B is fenced in turn.
        assert monitor.readmit(A) and not monitor.readmit(A)
        assert (writer := monitor.writer()) is not None and writer.address == A
        assert monitor.fenced() == {B}

    asyncio.run(scenario())
