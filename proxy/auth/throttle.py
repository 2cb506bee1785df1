"""Failed-login throttle: a source address with too many failed logins in a window is locked out for a while."""

from __future__ import annotations

import hashlib
import time
from collections import deque
from collections.abc import Callable
from enum import IntEnum

MAX_ADDRESSES = 10_000  # addresses tracked at most; beyond, the one whose last failure is oldest is forgotten


class Failure(IntEnum):
    """What a failed login did to its address."""

    COUNTED = 0
    LOCKED_NOW = 1  # it reached the limit: the address is locked out from now on
    LOCKED_BEFORE = 2  # the address was already locked out (elsewhere): the login is refused as throttled


def throttle_key(host: str, user: str, per_user: bool) -> str:
    """What the throttle counts by: the address, or with failed_login_scope = "user" the address and a hash of the
    user name (the name itself is kept nowhere, Redis included)."""
    if not per_user:
        return host
    return f"{host}/{hashlib.sha256(user.encode()).hexdigest()[:16]}"


class _Record:
    """One address: the times of its latest failed logins (at most `limit`) and the end of its lockout (0: none)."""

    __slots__ = ("failures", "until")

    def __init__(self, limit: int) -> None:
        self.failures: deque[float] = deque(maxlen=limit)
        self.until = 0.0


class LoginThrottle:
    """Counts failed logins per source address; `limit` of them within `window` seconds lock the address out for
    `lockout` seconds (its logins are then refused before any password check). A limit of 0 turns it off.

    Per worker process: an address spread over several workers has `limit` failures in each before it is locked
    out of all of them (`SharedThrottle` shares the counts through Redis and uses this one for what it learns and
    while Redis fails). Memory is bounded by
    `max_addresses` records of at most `limit` timestamps each."""

    def __init__(self, limit: int, window: float, lockout: float, max_addresses: int = MAX_ADDRESSES,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.max_addresses = max_addresses
        self._records: dict[str, _Record] = {}  # in the order of their latest failure, oldest first
        self.limit, self.window, self.lockout = 0, 0.0, 0.0
        self.configure(limit, window, lockout)

    def configure(self, limit: int, window: float, lockout: float) -> None:
        """New settings (a reload); addresses locked out stay so until their lockout ends."""
        if limit != self.limit:
            for record in self._records.values():
                record.failures = deque(record.failures, maxlen=limit or 1)
        self.limit, self.window, self.lockout = limit, window, lockout
        if not limit:
            self._records.clear()

    def locked_for(self, host: str) -> float:
        """Seconds the address stays locked out (0.0: it may log in); one dict look-up when it is not tracked."""
        record = self._records.get(host)
        if record is None or not record.until:
            return 0.0
        left = record.until - self.clock()
        if left <= 0:
            record.until = 0.0
            return 0.0
        return left

    def lock(self, host: str, seconds: float) -> None:
        """A lockout learned elsewhere (the shared store): `host` is refused for the next `seconds`."""
        record = self._record(host)
        record.until = max(record.until, self.clock() + seconds)

    def _record(self, host: str) -> _Record:
        """The address's record, made the most recent one (the oldest forgotten if there are too many)."""
        records = self._records
        record = records.pop(host, None)
        if record is None:
            record = _Record(self.limit or 1)
            if len(records) >= self.max_addresses:
                del records[next(iter(records))]
        records[host] = record  # (last in the order: the most recent failure)
        return record

    def failed(self, host: str) -> bool:
        """A failed login from `host`; True when it starts a lockout."""
        if not self.limit:
            return False
        now = self.clock()
        record = self._record(host)
        failures = record.failures
        failures.append(now)
        if len(failures) >= self.limit and now - failures[0] <= self.window:
            failures.clear()
            record.until = now + self.lockout
            return True
        return False

    def __len__(self) -> int:
        return len(self._records)
