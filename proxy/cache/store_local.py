"""The in-process store: an LRU bounded in bytes, with per-table generations that writes bump."""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass

from proxy.stats import EndpointStats as CacheStats

ENTRY_OVERHEAD = 200  # bytes counted per entry besides its value (key, record, index)


@dataclass(slots=True)
class Entry:
    value: bytes
    expires: float
    names: tuple[str, ...]
    stats: CacheStats
    size: int


class LocalStore:
    """Results by (base key, generations of the tables read); a bump drops the entries that read the table."""

    synchronous = True

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.generations: dict[str, int] = {}
        self.entries: OrderedDict[tuple[str, tuple[int, ...]], Entry] = OrderedDict()
        self.by_name: dict[str, set[tuple[str, tuple[int, ...]]]] = {}
        self.size = 0

    def snapshot(self, names: tuple[str, ...]) -> tuple[int, ...]:
        generations = self.generations
        return tuple(generations.get(name, 0) for name in names)

    def get(self, base: str, names: tuple[str, ...]) -> tuple[bytes | None, tuple[int, ...]]:
        """The value stored for `base` at the tables' current generations (None: a miss), and those generations."""
        generations = self.snapshot(names)
        key = (base, generations)
        entry = self.entries.get(key)
        if entry is None:
            return None, generations
        if entry.expires <= time.monotonic():
            self._remove(key)
            return None, generations
        self.entries.move_to_end(key)
        return entry.value, generations

    def put(self, base: str, names: tuple[str, ...], generations: tuple[int, ...], value: bytes, ttl: float,
            stats: CacheStats) -> bool:
        """Store `value` if no table it read was written since `generations` were taken; whether it was."""
        if generations != self.snapshot(names):
            return False
        size = len(value) + len(base) + ENTRY_OVERHEAD
        if size > self.max_bytes:
            return False
        key = (base, generations)
        if key in self.entries:
            self._remove(key)
        self.entries[key] = Entry(value, time.monotonic() + ttl, names, stats, size)
        for name in names:
            self.by_name.setdefault(name, set()).add(key)
        self.size += size
        stats.cache_entries += 1
        stats.cache_bytes += size
        while self.size > self.max_bytes:
            oldest = next(iter(self.entries))
            self.entries[oldest].stats.cache_evictions += 1
            self._remove(oldest)
        return True

    def bump(self, names: frozenset[str] | set[str], stats: CacheStats) -> None:
        """Tables were written: their generation moves on and the entries that read them go (at once: None)."""
        generations = self.generations
        for name in names:
            generations[name] = generations.get(name, 0) + 1
            keys = self.by_name.pop(name, ())  # (every entry holds its scope's EVERYTHING name too)
            stats.cache_invalidations += 1
            for key in keys:
                if key in self.entries:
                    self._remove(key)

    def _remove(self, key: tuple[str, tuple[int, ...]]) -> None:
        entry = self.entries.pop(key)
        self.size -= entry.size
        entry.stats.cache_entries -= 1
        entry.stats.cache_bytes -= entry.size
        for name in entry.names:
            keys = self.by_name.get(name)
            if keys is not None:
                keys.discard(key)
                if not keys:
                    del self.by_name[name]

    async def close(self) -> None:
        self.entries.clear()
        self.by_name.clear()
