"""The process's query cache (its store and statement analysers) and each endpoint's part of it."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine, Mapping
from dataclasses import dataclass
from typing import Any

from proxy.cache.analysis import EVERYTHING, Analyzer, plain_select
from proxy.cache.keys import base_key
from proxy.cache.rules import CachePolicy, endpoint_policy
from proxy.cache.store_local import LocalStore
from proxy.cache.store_redis import RedisStore
from proxy.config import QueryCacheSettings
from proxy.stats import EndpointStats, StatsRegistry

log = logging.getLogger(__name__)
NO_WRITES: frozenset[str] = frozenset()


@dataclass(slots=True)
class Plan:
    """A cacheable statement of a session: its key, the (scoped) tables its key depends on, its TTL, and the
    generations its lookup saw (None: the result is not to be stored)."""

    base: str
    names: tuple[str, ...]
    ttl: float
    generations: tuple[int, ...] | str | None = None


class QueryCache:
    """One per process: the store every endpoint shares, and one statement analyser per engine."""

    def __init__(self, settings: QueryCacheSettings) -> None:
        self.settings = settings
        self.store: LocalStore | RedisStore = (RedisStore(settings) if settings.store == "redis"
                                               else LocalStore(settings.max_bytes))
        self.analyzers: dict[str, Analyzer] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def endpoint(self, engine: str, name: str, cluster: str, registry: StatsRegistry) -> EndpointCache | None:
        """The cache of one endpoint; None when it has no rules and takes no hints (its clients are untouched)."""
        policy = endpoint_policy(self.settings, name)
        if policy is None:
            return None
        return EndpointCache(self, policy, engine, name, cluster, registry)

    def spawn(self, work: Coroutine[Any, Any, None]) -> None:
        """Run `work` in the background (kept referenced until it ends)."""
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        await self.store.close()


class EndpointCache:
    """What a client session of one endpoint asks the cache: plan a read, look it up, store it, note writes."""

    def __init__(self, cache: QueryCache, policy: CachePolicy, engine: str, name: str, cluster: str,
                 registry: StatsRegistry) -> None:
        self.cache = cache
        self.policy = policy
        self.engine = engine
        self.cluster = cluster
        self.store = cache.store
        self.synchronous = cache.store.synchronous
        self.digest = registry.digester(engine).digest
        self.analyzer = cache.analyzers.get(engine) or cache.analyzers.setdefault(engine, Analyzer(engine, self.digest))
        self.max_result = cache.settings.max_result_bytes
        self.stats: EndpointStats = registry.endpoint(engine, name, cluster)

    def may_cache(self, text: bytes) -> bool:
        """A rule or a hint names `text` (whether it is cacheable is the analysis's to say)."""
        return self.policy.ttl(text, self.digest) is not None

    def scope(self, database: str) -> str:
        """Where table names live: PostgreSQL's databases apart; MySQL's schemas all one (a statement may name any)."""
        return f"{self.cluster}/{database}/" if self.engine == "postgresql" else f"{self.cluster}//"

    def plan(self, text: bytes, user: str, database: str, settings: Mapping[str, object],
             extra: bytes = b"") -> Plan | None:
        """The plan of a statement the endpoint caches and that is cacheable at all; None otherwise. `extra` is what
        else tells its result apart (an extended-query batch's parameters and formats)."""
        ttl = self.policy.ttl(text, self.digest)
        if ttl is None:
            return None
        analysis = self.analyzer.analyse(text)
        if not analysis.cacheable:
            return None
        scope = self.scope(database)
        names = (*sorted(scope + table for table in analysis.tables), scope + EVERYTHING)
        return Plan(base_key(self.engine, user, database, settings, text + extra), names, ttl)

    def writes(self, text: bytes, database: str) -> frozenset[str]:
        """The scoped tables a statement writes (its scope's EVERYTHING when it cannot be told)."""
        if plain_select(text):
            return NO_WRITES
        writes = self.analyzer.analyse(text).writes
        if not writes:
            return writes
        scope = self.scope(database)
        return frozenset(scope + table for table in writes)

    def everything(self, database: str) -> frozenset[str]:
        return frozenset({self.scope(database) + EVERYTHING})

    def bump(self, names: frozenset[str] | set[str]) -> asyncio.Future[None] | None:
        """Invalidate what read these tables; a future while that is on its way to Redis, None when done."""
        return self.store.bump(names, self.stats)

    def lookup_now(self, plan: Plan) -> bytes | None:
        """The local store's value for `plan` (counted as a hit or a miss); notes the generations seen."""
        store = self.store
        assert isinstance(store, LocalStore)
        value, plan.generations = store.get(plan.base, plan.names)
        self._count(value)
        return value

    def generations_now(self, plan: Plan) -> None:
        """Note the local store's generations of the plan's tables (its result is kept under them)."""
        store = self.store
        assert isinstance(store, LocalStore)
        plan.generations = store.snapshot(plan.names)

    async def lookup(self, plan: Plan) -> bytes | None:
        store = self.store
        if isinstance(store, LocalStore):
            return self.lookup_now(plan)
        value, plan.generations = await store.get(plan.base, plan.names, self.stats)
        self._count(value)
        return value

    def _count(self, value: bytes | None) -> None:
        if value is None:
            self.stats.cache_misses += 1
        else:
            self.stats.cache_hits += 1

    def keep(self, plan: Plan, value: bytes) -> None:
        """A complete, successful result of `plan`: stored, unless a table it read was written meanwhile."""
        generations = plan.generations
        if generations is None or len(value) > self.max_result:
            return
        store = self.store
        if isinstance(store, LocalStore):
            assert isinstance(generations, tuple)
            if store.put(plan.base, plan.names, generations, value, plan.ttl, self.stats):
                self.stats.cache_stores += 1
            return
        assert isinstance(generations, str)
        self.cache.spawn(self._put(store, plan, generations, value))

    async def _put(self, store: RedisStore, plan: Plan, generations: str, value: bytes) -> None:
        if await store.put(plan.base, plan.names, generations, value, plan.ttl, self.stats):
            self.stats.cache_stores += 1
