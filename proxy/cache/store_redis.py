"""The fleet store: results and per-table generations in Redis (or ElastiCache), shared by every proxy using it.

A key holds the generations of the tables its statement read, read in the same script that reads the entry; a
write through any proxy bumps them, so every proxy's next lookup misses. A result is stored only if the
generations are still those of its lookup (checked in the script that stores it)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque

from redis.asyncio import Redis
from redis.exceptions import RedisError

from proxy.config import QueryCacheSettings
from proxy.redis_client import connect_redis
from proxy.stats import EndpointStats as CacheStats

log = logging.getLogger(__name__)

# KEYS: the generation keys; ARGV[1]: the entry key's prefix. Returns {generations joined by ",", value or false}.
GET = """
local generations = redis.call('MGET', unpack(KEYS))
for i, g in ipairs(generations) do if not g then generations[i] = '0' end end
local joined = table.concat(generations, ',')
return {joined, redis.call('GET', ARGV[1] .. ':' .. joined)}
"""
# KEYS: the generation keys; ARGV: entry key prefix, generations joined, value, ttl in ms. Returns 1 if stored.
PUT = """
local generations = redis.call('MGET', unpack(KEYS))
for i, g in ipairs(generations) do if not g then generations[i] = '0' end end
local joined = table.concat(generations, ',')
if joined ~= ARGV[2] then return 0 end
redis.call('SET', ARGV[1] .. ':' .. joined, ARGV[3], 'PX', ARGV[4])
return 1
"""
BUMP_ATTEMPTS = 5  # (one while Redis is known to fail: a write then waits for one attempt at most)
PAUSE_AFTER_FAILURE = 1.0  # seconds lookups and stores are skipped (misses) after Redis failed


class RedisStore:
    """Results by (base key, generations), in Redis; bumps go out in order on one background task."""

    synchronous = False

    def __init__(self, settings: QueryCacheSettings) -> None:
        self.redis: Redis = connect_redis(settings)
        self.prefix = settings.redis_key_prefix
        self.timeout = settings.redis_timeout
        self._get = self.redis.register_script(GET)
        self._put = self.redis.register_script(PUT)
        self._bumps: deque[tuple[tuple[str, ...], CacheStats, asyncio.Future[None]]] = deque()
        self._inflight: dict[str, int] = {}  # tables with a bump not yet acknowledged: lookups of them miss
        self._wake = asyncio.Event()
        self._worker: asyncio.Task[None] | None = None
        self._failing = False
        self._skip_until = 0.0  # monotonic time until which lookups and stores are skipped (Redis failed)

    def _generation_keys(self, names: tuple[str, ...]) -> list[str]:
        return [f"{self.prefix}g:{name}" for name in names]

    async def get(self, base: str, names: tuple[str, ...], stats: CacheStats) -> tuple[bytes | None, str | None]:
        """The value for `base` at the tables' generations now (None: a miss) and those generations (None: the
        result must not be stored: a bump of one of the tables is on its way, or Redis failed)."""
        if any(name in self._inflight for name in names) or time.monotonic() < self._skip_until:
            return None, None
        try:
            joined, value = await asyncio.wait_for(
                self._get(keys=self._generation_keys(names), args=[f"{self.prefix}e:{base}"]), self.timeout)
        except (RedisError, OSError, TimeoutError) as exc:
            self._failed(stats, "lookup", exc)
            return None, None
        self._recovered()
        if any(name in self._inflight for name in names):
            return None, None
        return value, joined.decode()

    async def put(self, base: str, names: tuple[str, ...], generations: str, value: bytes, ttl: float,
                  stats: CacheStats) -> bool:
        if time.monotonic() < self._skip_until:
            return False
        try:
            stored = await asyncio.wait_for(self._put(
                keys=self._generation_keys(names),
                args=[f"{self.prefix}e:{base}", generations, value, max(1, int(ttl * 1000))]), self.timeout)
        except (RedisError, OSError, TimeoutError) as exc:
            self._failed(stats, "store", exc)
            return False
        return bool(stored)

    def bump(self, names: frozenset[str] | set[str], stats: CacheStats) -> asyncio.Future[None]:
        """Tables were written: their generations move on in Redis (in order, retried); until then this proxy's
        lookups of them miss. The future is done once Redis has them (or they were given up)."""
        ordered = tuple(sorted(names))
        for name in ordered:
            self._inflight[name] = self._inflight.get(name, 0) + 1
        stats.cache_invalidations += len(ordered)
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        self._bumps.append((ordered, stats, done))
        if self._worker is None:
            self._worker = loop.create_task(self._send_bumps())
        self._wake.set()
        return done

    async def _send_bumps(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._bumps:
                names, stats, done = self._bumps[0]
                await self._send_bump(names, stats)
                self._bumps.popleft()
                if not done.done():
                    done.set_result(None)
                for name in names:
                    left = self._inflight[name] - 1
                    if left:
                        self._inflight[name] = left
                    else:
                        del self._inflight[name]

    async def _send_bump(self, names: tuple[str, ...], stats: CacheStats) -> None:
        attempts = 1 if self._failing else BUMP_ATTEMPTS
        for attempt in range(attempts):
            try:
                pipe = self.redis.pipeline(transaction=False)
                for key in self._generation_keys(names):
                    pipe.incr(key)
                await asyncio.wait_for(pipe.execute(), self.timeout)
                self._recovered()
                return
            except (RedisError, OSError, TimeoutError) as exc:
                self._failed(stats, "invalidation", exc)
                await asyncio.sleep(0.05 * (attempt + 1))
        log.error("query cache: invalidation of %s could not reach Redis after %d attempt(s); other proxies may "
                  "serve their results until the entries expire", ", ".join(names), attempts)

    def _failed(self, stats: CacheStats, what: str, exc: BaseException) -> None:
        stats.cache_errors += 1
        self._skip_until = time.monotonic() + PAUSE_AFTER_FAILURE
        if not self._failing:
            self._failing = True
            log.warning("query cache: Redis %s failed (%s); serving from the database meanwhile", what,
                        type(exc).__name__)

    def _recovered(self) -> None:
        if self._failing:
            self._failing = False
            log.info("query cache: Redis answers again")

    async def close(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
        await self.redis.aclose()
