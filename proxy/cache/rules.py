"""Which statements of an endpoint are cached and for how long: its opt-in rules and the SQL-comment hint."""

from __future__ import annotations

import re
from collections.abc import Callable
from fnmatch import fnmatchcase

from proxy.config import CacheRule, QueryCacheSettings

HINT = re.compile(rb"/\*\s*dbproxy:cache\s+ttl\s*=\s*(\d{1,7}(?:\.\d{1,6})?)\s*\*/")


class CachePolicy:
    """One endpoint's rules (regex or digest, with a TTL) and whether hints are honoured there."""

    def __init__(self, rules: list[CacheRule], hints: bool, max_hint_ttl: float) -> None:
        self.regexes = [(re.compile(rule.regex.encode()), rule.ttl) for rule in rules if rule.regex is not None]
        self.digests = {rule.digest: rule.ttl for rule in rules if rule.digest is not None}
        self.hints = hints
        self.max_hint_ttl = max_hint_ttl

    @property
    def active(self) -> bool:
        return bool(self.regexes or self.digests or self.hints)

    def ttl(self, text: bytes, digest: Callable[[bytes], str]) -> float | None:
        """Seconds the result of `text` may be served from the cache; None: not cached."""
        if self.hints and b"dbproxy:cache" in text:
            hint = HINT.search(text)
            if hint is not None:
                return min(float(hint.group(1)), self.max_hint_ttl) or None
        for pattern, ttl in self.regexes:
            if pattern.search(text) is not None:
                return ttl
        if self.digests:
            return self.digests.get(digest(text))
        return None


def endpoint_policy(settings: QueryCacheSettings, endpoint: str) -> CachePolicy | None:
    """The policy of `endpoint`, or None when the cache has nothing to do there (decided once per endpoint)."""
    if not settings.enabled:
        return None
    rules = [rule for rule in settings.rules if fnmatchcase(endpoint, rule.endpoint)]
    hints = settings.hints and any(fnmatchcase(endpoint, glob) for glob in settings.hint_endpoints)
    policy = CachePolicy(rules, hints, settings.max_hint_ttl)
    return policy if policy.active else None
