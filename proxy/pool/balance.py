"""Spreading an endpoint's work over several instances: one Target per instance, and per borrow the eligible one
with the least outstanding work."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

from proxy.config import EndpointRole
from proxy.endpoints import Endpoint, Member
from proxy.errors import BorrowTimeout
from proxy.pool.pool import Pool, PoolNaming, Target
from proxy.stats import StatsRegistry


def outstanding(target: Target) -> int:
    """Work an instance has from this worker now: its connections that are not idle (lent out, being opened for
    a borrower, being cleaned) and the borrowers waiting in line, over its pools (one per database and user: a
    handful)."""
    count = len(target.owned)
    for pool in target.pools.values():
        count += len(pool.waiters) - len(pool.idle)
    return count


class TargetGroup:
    """The targets of one endpoint, one per instance it may use (each with its own pools and budget), and the
    ones eligible now (set from the configuration, then by the topology follower after every probe round).

    `choose` is called per borrow: among the eligible targets, the one with the least outstanding work; ties go
    round in turn, so that sequential clients spread too. With no eligible target, borrowers wait (`wait`).
    """

    def __init__(self, name: str, targets: dict[str, Target], serving: Iterable[str], home: str) -> None:
        self.name = name
        self.targets = targets  # instance label -> its target; fixed for the group's life
        self.home = targets[home]  # the configured instance's target: logins while nothing is eligible
        self.single = len(targets) == 1  # nothing to choose (read_write endpoints): the callers skip the choice
        self._serving: tuple[Target, ...] = ()
        self._serving_ids: frozenset[int] = frozenset()
        self._orders: tuple[tuple[Target, tuple[Target, ...]], ...] = ()
        self._labels: tuple[str, ...] = ()
        self._turn = 0
        self._waiters: list[asyncio.Future[None]] = []
        self.serve(serving)

    def __repr__(self) -> str:
        return f"TargetGroup({self.name}: serving {', '.join(self._labels) or 'nothing'})"

    # --- which instances are eligible ---

    def serve(self, labels: Iterable[str]) -> bool:
        """Make the instances named eligible (in that order; names the group does not have are ignored); False
        when that is what it serves already. Borrowers that waited for an eligible instance go on at once."""
        wanted = tuple(label for label in dict.fromkeys(labels) if label in self.targets)
        if wanted == self._labels:
            return False
        self._labels = wanted
        self._serving = tuple(self.targets[label] for label in wanted)
        self._serving_ids = frozenset(id(target) for target in self._serving)
        # per turn, the target asked first and then the others in order (made here, not per borrow)
        serving = self._serving
        self._orders = tuple((serving[turn], serving[turn + 1:] + serving[:turn]) for turn in range(len(serving)))
        if self._serving:
            waiters, self._waiters = self._waiters, []
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)
        return True

    @property
    def serving(self) -> tuple[str, ...]:
        """The labels of the eligible instances."""
        return self._labels

    def serves(self, target: Target) -> bool:
        return id(target) in self._serving_ids

    # --- the choice, per borrow ---

    def choose(self) -> Target | None:
        """The eligible target with the least outstanding work (ties in turn); None when none is eligible."""
        orders = self._orders
        if not orders:
            return None
        turn = self._turn + 1
        if turn >= len(orders):
            turn = 0
        self._turn = turn
        best, others = orders[turn]
        if others:
            best_load = outstanding(best)
            for candidate in others:
                if not best_load:
                    break
                load = outstanding(candidate)
                if load < best_load:
                    best, best_load = candidate, load
        return best

    async def wait(self, timeout: float) -> Target | None:
        """The choice once an instance is eligible, waiting at most `timeout` seconds (None: still none)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            chosen = self.choose()
            remaining = deadline - loop.time()
            if chosen is not None or remaining <= 0:
                return chosen
            waiter: asyncio.Future[None] = loop.create_future()
            self._waiters.append(waiter)
            try:
                await asyncio.wait_for(asyncio.shield(waiter), remaining)
            except TimeoutError:
                pass
            finally:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)

    # --- pools and maintenance ---

    def naming(self, key: tuple[str, str]) -> PoolNaming:
        """The statement names and settings numbers a new pool for `key` shares with that key's pools on the
        group's other instances (new when there is none)."""
        for target in self.targets.values():
            pool = target.pools.get(key)
            if pool is not None:
                return pool.naming
        return PoolNaming()

    def all(self) -> list[Target]:
        return list(self.targets.values())

    def reshape(self, targets: dict[str, Target], serving: Iterable[str], home: str) -> list[Target]:
        """A reload changed the endpoint's instances: a target whose instance stays (same label and address) is
        kept with its pools, the new ones join; returns the targets that left (their idle connections close at
        once, lent-out ones when given back; their clients move on at their next borrow)."""
        kept: dict[str, Target] = {}
        for label, target in targets.items():
            old = self.targets.get(label)
            kept[label] = old if old is not None and (old.host, old.port) == (target.host, target.port) else target
        left = [target for target in self.targets.values() if all(target is not t for t in kept.values())]
        self.targets = kept
        self.home = kept[home]
        self.single = self.single and len(kept) == 1 and not left  # once spread, always chosen per borrow
        self._labels = ()
        self.serve(serving)
        for target in left:
            target.repoint(target.host, target.port)
        return left


def no_eligible_instance(group: TargetGroup, pool: Pool, timeout: float) -> BorrowTimeout:
    """The borrow timeout for work that waited in vain for an eligible instance (counted in `pool`)."""
    pool.stats.borrow_timeouts += 1
    return BorrowTimeout(f"timed out after {timeout:g} s waiting for a backend connection (endpoint {group.name}: "
                         "no eligible instance)")


def target_group(engine: str, endpoint: Endpoint, stats: StatsRegistry) -> TargetGroup:
    """The group of an endpoint: a target per member instance, each counting under its instance's labels."""
    targets, home = member_targets(engine, endpoint, stats)
    return TargetGroup(endpoint.name, targets, endpoint.serving or (home,), home)


def member_targets(engine: str, endpoint: Endpoint, stats: StatsRegistry) -> tuple[dict[str, Target], str]:
    """A new target per instance the endpoint may use (by label), and the label of the configured one."""
    targets: dict[str, Target] = {}
    settings = endpoint.settings
    members = endpoint.members or ()
    if not members:  # (an endpoint made by hand: its one instance)
        members = (Member(endpoint.instance, settings.backend_host, settings.backend_port),)
    for member in members:
        name = endpoint.name if endpoint.role is EndpointRole.READ_WRITE else f"{endpoint.name}/{member.label}"
        target = Target(name, member.host, member.port, settings.pool)
        target.stats = stats.target(engine, endpoint.name, endpoint.cluster, member.label)
        targets[member.label] = target
    home = endpoint.instance if endpoint.instance in targets else next(iter(targets))
    return targets, home
