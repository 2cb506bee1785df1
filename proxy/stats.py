"""Counters kept in one place, read by logs, the admin console and the metrics endpoint."""

from __future__ import annotations

from dataclasses import dataclass, field, fields


@dataclass(slots=True)
class PoolStats:
    """Per-pool counters; plain integer increments on the hot path."""

    borrows: int = 0
    waits: int = 0
    wait_time: float = 0.0
    borrow_timeouts: int = 0
    opened: int = 0
    closed: int = 0
    connect_failures: int = 0
    transactions: int = 0
    queries: int = 0

    def as_dict(self) -> dict[str, float]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(slots=True)
class ProxyStats:
    """Process-wide counters."""

    clients_accepted: int = 0
    clients_current: int = 0
    clients_refused: int = 0  # turned away at connect: max_client_connections reached
    logins_ok: int = 0
    logins_failed: int = 0
    protocol_errors: int = 0
    cancel_requests: int = 0
    idle_client_timeouts: int = 0
    login_timeouts: int = 0

    def as_dict(self) -> dict[str, float]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


PROXY = ProxyStats()


@dataclass(slots=True)
class PinStats:
    """Sessions pinned to their backend: how many now, and how often for each reason."""

    current: int = 0
    by_reason: dict[str, int] = field(default_factory=dict)

    def pinned(self, reason: str) -> None:
        self.by_reason[reason] = self.by_reason.get(reason, 0) + 1

    def unpinned(self) -> None:
        self.current -= 1


PINS = PinStats()
