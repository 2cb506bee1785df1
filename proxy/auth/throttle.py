"""Failed-login throttle: a source address with too many failed logins in a window is locked out for a while."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

MAX_ADDRESSES = 10_000  # addresses tracked at most; beyond, the one whose last failure is oldest is forgotten


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
    out of all of them (a fleet would share the counts through Redis later). Memory is bounded by
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

    def failed(self, host: str) -> bool:
        """A failed login from `host`; True when it starts a lockout."""
        if not self.limit:
            return False
        now = self.clock()
        records = self._records
        record = records.pop(host, None)
        if record is None:
            record = _Record(self.limit)
            if len(records) >= self.max_addresses:
                del records[next(iter(records))]
        records[host] = record  # (last in the order: the most recent failure)
        failures = record.failures
        failures.append(now)
        if len(failures) >= self.limit and now - failures[0] <= self.window:
            failures.clear()
            record.until = now + self.lockout
            return True
        return False

    def __len__(self) -> int:
        return len(self._records)
