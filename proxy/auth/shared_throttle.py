"""The failed-login throttle shared through Redis: every worker and proxy using the same Redis counts an address's
failed logins together and sees its lockout; while Redis fails, the process counts on its own."""

from __future__ import annotations

import asyncio
import logging
import time

from redis.exceptions import RedisError

from proxy.auth.throttle import Failure, LoginThrottle
from proxy.config import AuthSettings
from proxy.redis_client import connect_redis

log = logging.getLogger(__name__)

# KEYS: the address's count key, its lockout key; ARGV: limit, window (ms), lockout (ms).
# Returns {milliseconds left of a lockout that was already on (0: none), 1 if this failure started one}.
FAILED = """
local left = redis.call('PTTL', KEYS[2])
if left > 0 then return {left, 0} end
local count = redis.call('INCR', KEYS[1])
if count == 1 then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
if count >= tonumber(ARGV[1]) then
  redis.call('DEL', KEYS[1])
  redis.call('SET', KEYS[2], '1', 'PX', ARGV[3])
  return {0, 1}
end
return {0, 0}
"""
PAUSE_AFTER_FAILURE = 1.0  # seconds Redis is not asked after it failed (the process counts on its own meanwhile)


class SharedThrottle:
    """Counts in Redis: `{prefix}f:{key}` (a count, expiring a window after its first failure) and
    `{prefix}l:{key}` (present while the key is locked out), the key being the address or, per user, the address
    and a hash of the user name (`throttle_key`): never a user name or a password. What it learns goes into
    `local` (refusals before any password check in this process)."""

    def __init__(self, settings: AuthSettings, local: LoginThrottle) -> None:
        self.local = local
        self.redis = connect_redis(settings)
        self.prefix = settings.redis_key_prefix
        self.timeout = settings.redis_timeout
        self._failed = self.redis.register_script(FAILED)
        self._probes: set[asyncio.Task[None]] = set()
        self._failing = False
        self._skip_until = 0.0

    def _keys(self, key: str) -> list[str]:
        tag = "{" + key + "}"  # (one hash slot for both: a Redis Cluster runs the script)
        return [f"{self.prefix}f:{tag}", f"{self.prefix}l:{tag}"]

    def probe(self, host: str) -> asyncio.Task[None] | None:
        """Start looking up the address's lockout (one PTTL); a lockout found is learned by `local`. None: Redis is
        not asked (it failed a moment ago, or the throttle is off)."""
        if not self.local.limit or time.monotonic() < self._skip_until:
            return None
        task = asyncio.get_running_loop().create_task(self._probe(host))
        self._probes.add(task)
        task.add_done_callback(self._probes.discard)
        return task

    async def _probe(self, host: str) -> None:
        try:
            left = await asyncio.wait_for(self.redis.pttl(self._keys(host)[1]), self.timeout)
        except (RedisError, OSError, TimeoutError) as exc:
            self._unreachable("lockout check", exc)
            return
        self._reachable()
        if left > 0:
            self.local.lock(host, left / 1000)

    async def failed(self, host: str) -> Failure:
        """A failed login from `host`, counted in Redis (one round trip); in this process alone if Redis fails."""
        local = self.local
        if not local.limit:
            return Failure.COUNTED
        if time.monotonic() >= self._skip_until:
            try:
                left, started = await asyncio.wait_for(self._failed(keys=self._keys(host), args=[
                    local.limit, max(1, int(local.window * 1000)), max(1, int(local.lockout * 1000))]), self.timeout)
            except (RedisError, OSError, TimeoutError) as exc:
                self._unreachable("failed-login count", exc)
            else:
                self._reachable()
                return self._learned(host, left, started)
        return Failure.LOCKED_NOW if local.failed(host) else Failure.COUNTED

    def _learned(self, host: str, left: int, started: int) -> Failure:
        if started:
            self.local.lock(host, self.local.lockout)
            return Failure.LOCKED_NOW
        if left > 0:
            self.local.lock(host, left / 1000)
            return Failure.LOCKED_BEFORE
        return Failure.COUNTED

    def _unreachable(self, what: str, exc: BaseException) -> None:
        self._skip_until = time.monotonic() + PAUSE_AFTER_FAILURE
        if not self._failing:
            self._failing = True
            log.warning("failed-login throttle: Redis did not answer the %s (%s); counting failed logins in this "
                        "process meanwhile", what, type(exc).__name__)

    def _reachable(self) -> None:
        if self._failing:
            self._failing = False
            log.info("failed-login throttle: Redis answers again; failed logins are counted there")

    async def close(self) -> None:
        for task in list(self._probes):
            task.cancel()
        await self.redis.aclose()
