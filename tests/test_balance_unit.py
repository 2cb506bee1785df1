"""The per-borrow choice among an endpoint's instances (TargetGroup) and which instances the follower makes
eligible after a probe round (scripted probe answers)."""

from __future__ import annotations

import asyncio

from proxy.config import EndpointRole, PoolSettings
from proxy.pool.balance import TargetGroup
from proxy.pool.pool import Backend, Pool, Target
from proxy.topology.follow import ClusterFollower, Followed
from proxy.topology.model import InstanceStatus, Role
from proxy.topology.monitor import TopologyMonitor


class Lent:
    """A backend as the pool counts it (the choice looks at counts only)."""

    closed = False
    forgotten = False
    created_at = 0.0
    idle_since = 0.0
    generation = 0

    def close(self) -> None:
        self.closed = True


async def _never(pool: Pool) -> Backend:
    raise AssertionError("the choice never connects")


def _group(*labels: str) -> TargetGroup:
    targets = {label: Target(label, "127.0.0.1", 5000 + number, PoolSettings()) for number, label in
               enumerate(labels)}
    return TargetGroup("ro", targets, labels, labels[0])


def _pool(group: TargetGroup, label: str) -> Pool:
    target = group.targets[label]
    key = ("app", "app")
    pool = target.pools.get(key)
    if pool is None:
        pool = target.pools[key] = Pool(target, "app", "app", _never, group.naming(key))
    return pool


def _lend(pool: Pool, count: int) -> None:
    """`count` backends of the pool lent out (owned by its target, busy in the pool)."""
    for _ in range(count):
        backend = Lent()
        pool.target.owned.add(backend)
        pool.busy.add(backend)


def test_ties_go_round_in_turn() -> None:
    group = _group("a", "b", "c")
    picks = [group.choose() for _ in range(9)]
    assert [p.name for p in picks if p is not None].count("a") == 3
    assert {p.name for p in picks if p is not None} == {"a", "b", "c"}
    assert all(picks[i] is not picks[i + 1] for i in range(8))  # never the same one twice in a row


def test_the_least_outstanding_work_wins() -> None:
    group = _group("a", "b", "c")
    _lend(_pool(group, "a"), 2)
    _lend(_pool(group, "b"), 1)
    pool_c = _pool(group, "c")
    _lend(pool_c, 1)
    assert {group.choose().name for _ in range(6)} == {"b", "c"}  # type: ignore[union-attr]
    pool_c.queue(object())  # type: ignore[arg-type]  # a client waiting counts as work of that instance
    assert {group.choose().name for _ in range(6)} == {"b"}  # type: ignore[union-attr]
    _lend(_pool(group, "b"), 3)
    assert {group.choose().name for _ in range(6)} == {"c", "a"}  # type: ignore[union-attr]
    idle = Lent()  # an idle connection is no work
    group.targets["a"].owned.add(idle)
    _pool(group, "a").idle.append(idle)
    assert {group.choose().name for _ in range(6)} == {"c", "a"}  # type: ignore[union-attr]


def test_only_eligible_instances_are_chosen() -> None:
    group = _group("a", "b", "c")
    assert group.serve(["c", "nowhere"])  # an unknown name is ignored
    assert not group.serve(["c"])  # unchanged
    assert {group.choose().name for _ in range(4)} == {"c"}  # type: ignore[union-attr]
    assert group.serves(group.targets["c"]) and not group.serves(group.targets["a"])
    assert group.serve([])
    assert group.choose() is None
    assert group.serving == ()


def test_waiting_for_an_eligible_instance() -> None:
    async def scenario() -> None:
        group = _group("a", "b")
        group.serve([])
        loop = asyncio.get_running_loop()
        started = loop.time()
        assert await group.wait(0.2) is None
        assert 0.15 <= loop.time() - started < 1.0
        loop.call_later(0.1, group.serve, ["b"])
        started = loop.time()
        chosen = await group.wait(5.0)
        assert chosen is group.targets["b"]
        assert loop.time() - started < 1.0  # woken when it became eligible, not at the timeout

    asyncio.run(scenario())


def test_pools_of_one_key_share_statement_names_and_settings_numbers() -> None:
    group = _group("a", "b")
    on_a, on_b = _pool(group, "a"), _pool(group, "b")
    assert on_a.naming is on_b.naming
    assert on_a.statement_name(b"SELECT 1\x00\x00\x00") == on_b.statement_name(b"SELECT 1\x00\x00\x00")
    assert on_b.statement_name(b"SELECT 2\x00\x00\x00") != on_a.statement_name(b"SELECT 1\x00\x00\x00")
    assert on_a.settings_id({"search_path": "x"}) == on_b.settings_id({"search_path": "x"})


W, R1, R2 = ("10.0.0.1", 5432), ("10.0.0.2", 5432), ("10.0.0.3", 5432)


def test_the_follower_makes_readers_within_the_lag_limit_eligible() -> None:
    answers: dict[tuple[str, int], InstanceStatus] = {}

    async def probe(host: str, port: int, timeout: float) -> InstanceStatus:
        return answers[(host, port)]

    def reader(address: tuple[str, int], lag: float | None, healthy: bool = True) -> InstanceStatus:
        return InstanceStatus(*address, Role.READER if healthy else Role.UNKNOWN, healthy, 0.0, 1, 0, lag)

    def group() -> TargetGroup:
        targets = {label: Target(label, *address, PoolSettings())
                   for label, address in (("w", W), ("r1", R1), ("r2", R2))}
        return TargetGroup("ro", targets, ["r1", "r2"], "r1")

    async def scenario() -> None:
        monitor = TopologyMonitor([W, R1, R2], probe, interval=1.0, timeout=1.0)
        ro, strict, unlimited, custom = group(), group(), group(), group()
        custom.serve(["w", "r1"])
        endpoints = [
            Followed("ro", EndpointRole.READ_ONLY, ro.home, ro, 1.0, True),
            Followed("strict", EndpointRole.READ_ONLY, strict.home, strict, 1.0, False),
            Followed("unlimited", EndpointRole.READ_ONLY, unlimited.home, unlimited, 0.0, True),
            Followed("custom", EndpointRole.CUSTOM, custom.home, custom),
        ]
        ClusterFollower("main", monitor, lambda: endpoints)
        writer = InstanceStatus(*W, Role.WRITER, True, 0.0, 1, 100)
        answers.update({W: writer, R1: reader(R1, 0.2), R2: reader(R2, None)})
        await monitor.probe_now()
        assert ro.serving == ("r1",)  # r2's lag is not known: left out while there is a limit
        assert unlimited.serving == ("r1", "r2")
        assert custom.serving == ("w", "r1", "r2")  # healthy members, whatever their role
        answers[R1] = reader(R1, 3.5)
        await monitor.probe_now()  # only a lag moved: applied after the round all the same
        assert ro.serving == ("w",)  # no reader within the limit: the writer serves
        assert strict.serving == ()  # ... unless the fallback is off
        answers.update({R1: reader(R1, 0.0), R2: reader(R2, 0.5)})
        await monitor.probe_now()
        assert ro.serving == strict.serving == ("r1", "r2")
        answers[R2] = reader(R2, None, healthy=False)
        await monitor.probe_now()
        await asyncio.sleep(0)  # (role and health changes are applied once the round is over)
        assert ro.serving == ("r1",)
        assert custom.serving == ("w", "r1")
        monitor.fence(R1)
        await monitor.probe_now()
        assert ro.serving == ("w",) and strict.serving == ()
        assert custom.serving == ("w",)

    asyncio.run(scenario())
