"""ClusterFollower's reaction to trouble reports, with a scripted probe: one round at once, at most one more for
the reports that came during it, rounds while a read_write endpoint waits for a writer, none once it has one."""

from __future__ import annotations

import asyncio

from proxy.config import EndpointRole, PoolSettings
from proxy.pool.pool import Target
from proxy.topology.follow import ClusterFollower, Followed
from proxy.topology.model import InstanceStatus, Role
from proxy.topology.monitor import TopologyMonitor

A, B = ("10.0.0.1", 5432), ("10.0.0.2", 5432)
ROUND = 0.05  # seconds a scripted probe round takes


def _status(address: tuple[str, int], role: Role, timeline: int = 1, healthy: bool = True) -> InstanceStatus:
    return InstanceStatus(address[0], address[1], role, healthy, 0.0, timeline=timeline)


class Cluster:
    """Scripted answers for A and B, and the number of probe rounds asked for."""

    def __init__(self) -> None:
        self.answers = {A: _status(A, Role.WRITER), B: _status(B, Role.READER)}
        self.probes = 0

    async def probe(self, host: str, port: int, timeout: float) -> InstanceStatus:
        self.probes += 1
        await asyncio.sleep(ROUND)
        return self.answers[(host, port)]

    @property
    def rounds(self) -> int:
        return self.probes // 2


def _follower(cluster: Cluster, no_writer_interval: float = 0.1,
              role: EndpointRole = EndpointRole.READ_WRITE) -> tuple[ClusterFollower, Target]:
    target = Target("rw", *A, PoolSettings())
    monitor = TopologyMonitor([A, B], cluster.probe, interval=3600.0, timeout=1.0)
    follower = ClusterFollower("main", monitor, lambda: [Followed("rw", role, target)],
                               no_writer_interval=no_writer_interval)
    follower.start()  # its first round runs now; the next one in an hour
    return follower, target


def test_reports_are_debounced_to_one_round_and_one_more() -> None:
    async def scenario() -> None:
        cluster = Cluster()
        follower, target = _follower(cluster)
        await asyncio.sleep(ROUND * 3)
        assert cluster.rounds == 1 and target.on_trouble == [follower.trouble]
        for _ in range(20):  # a burst: one round
            target.report_trouble("read-only error (SQLSTATE 25006) from 10.0.0.1:5432")
        await asyncio.sleep(ROUND / 2)
        for _ in range(20):  # during that round: one more right after it, however many
            target.report_trouble("read-only error (SQLSTATE 25006) from 10.0.0.1:5432")
        await asyncio.sleep(1.0)
        assert cluster.rounds == 3
        assert (target.host, target.port) == A and not target.paused
        await follower.stop()

    asyncio.run(scenario())


def test_a_demoted_writer_is_left_for_the_promoted_one_and_rounds_go_on_while_there_is_none() -> None:
    async def scenario() -> None:
        cluster = Cluster()
        follower, target = _follower(cluster)
        await asyncio.sleep(ROUND * 3)
        cluster.answers[A] = _status(A, Role.READER)  # read-only, and no writer yet
        target.report_trouble("read-only error (errno 1290) from 10.0.0.1:5432")
        await asyncio.sleep(ROUND * 3)
        assert target.paused and (target.host, target.port) == A
        waiting = cluster.rounds
        await asyncio.sleep(0.5)  # no report needed: rounds come every no_writer_interval
        assert cluster.rounds >= waiting + 2
        cluster.answers[B] = _status(B, Role.WRITER, timeline=2)
        await asyncio.sleep(0.4)
        assert not target.paused and (target.host, target.port) == B
        settled = cluster.rounds
        await asyncio.sleep(0.5)  # a writer again: the extra rounds stop
        assert cluster.rounds == settled
        await follower.stop()

    asyncio.run(scenario())


def test_a_reader_endpoint_hears_no_read_only_error() -> None:
    async def scenario() -> None:
        cluster = Cluster()
        follower, target = _follower(cluster, role=EndpointRole.READ_ONLY)
        await asyncio.sleep(ROUND * 3)
        for _ in range(5):  # a client writing on a read-only endpoint: the reader's normal answer
            target.report_trouble("read-only error (SQLSTATE 25006) from 10.0.0.1:5432")
        await asyncio.sleep(ROUND * 3)
        assert cluster.rounds == 1
        target.report_trouble("a backend connection to 10.0.0.1:5432 was lost")  # but a lost backend counts
        await asyncio.sleep(ROUND * 3)
        assert cluster.rounds == 2
        await follower.stop()

    asyncio.run(scenario())


def test_no_follower_no_hook() -> None:
    target = Target("rw", *A, PoolSettings())
    target.report_trouble("a backend connection to 10.0.0.1:5432 was lost")  # nobody listens: nothing happens
    assert target.on_trouble == [] and not target.paused
