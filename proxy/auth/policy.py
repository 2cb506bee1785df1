"""Token policy: which token subjects and claims may log in as which database users on which endpoints."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any

from proxy.config import TokenPolicyRule

SUBJECT = "{sub}"  # in a rule's users: the token's subject itself


def claim_at(claims: Mapping[str, Any], path: str) -> Any:
    """The claim at a '/'-separated path ('kubernetes.io/serviceaccount/name'); a claim name that itself holds a
    '/' (such as a URL) is found whole first. None when there is none."""
    if path in claims:
        return claims[path]
    cut = path.rfind("/")
    while cut > 0:
        head = claims.get(path[:cut])
        if isinstance(head, Mapping):
            found = claim_at(head, path[cut + 1:])
            if found is not None:
                return found
        cut = path.rfind("/", 0, cut)
    return None


def value_matches(value: Any, pattern: str) -> bool:
    """A claim value against a glob: strings and numbers by their text, a list if any element matches."""
    if isinstance(value, list):
        return any(value_matches(item, pattern) for item in value)
    if isinstance(value, bool):
        return fnmatchcase("true" if value else "false", pattern)
    if isinstance(value, str | int | float):
        return fnmatchcase(str(value), pattern)
    return False


@dataclass(frozen=True)
class Rule:
    """One rule: a subject glob, claim globs, the users it may log in as, the endpoints (globs)."""

    subject: str = "*"
    claims: tuple[tuple[str, str], ...] = ()
    users: tuple[str, ...] = (SUBJECT,)
    endpoints: tuple[str, ...] = ("*",)

    @classmethod
    def from_settings(cls, rule: TokenPolicyRule) -> Rule:
        return cls(rule.subject, tuple(rule.claims.items()), tuple(rule.users), tuple(rule.endpoints))

    def allows(self, subject: str, claims: Mapping[str, Any], user: str, endpoint: str) -> bool:
        return (fnmatchcase(subject, self.subject)
                and all(value_matches(claim_at(claims, path), pattern) for path, pattern in self.claims)
                and any(user == subject if pattern == SUBJECT else fnmatchcase(user, pattern)
                        for pattern in self.users)
                and any(fnmatchcase(endpoint, pattern) for pattern in self.endpoints))


class Policy:
    """Rules; a login is allowed if any matches. No rules: the subject must be the database user."""

    def __init__(self, rules: Sequence[Rule] = ()) -> None:
        self.rules = tuple(rules) or (Rule(),)

    @classmethod
    def from_settings(cls, rules: Sequence[TokenPolicyRule]) -> Policy:
        return cls([Rule.from_settings(rule) for rule in rules])

    def allows(self, subject: str, claims: Mapping[str, Any], user: str, endpoint: str) -> bool:
        return any(rule.allows(subject, claims, user, endpoint) for rule in self.rules)
