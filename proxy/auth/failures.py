"""Failed logins in the log: the first few per client address in full, the rest as one summary line per interval."""

from __future__ import annotations

import asyncio
import logging
import time

FULL_LINES = 10  # failed logins per client address logged one by one in each interval
INTERVAL = 10.0  # seconds: the failed logins beyond FULL_LINES are summed up at its end
USERS_NAMED = 10  # user names a summary line lists, with their counts (the rest are counted)
USERS_KEPT = 100  # user names counted one by one per address; beyond that they only add to the total
HOSTS_KEPT = 1000  # addresses counted one by one; the failed logins of any further ones are summed up together
OTHER_HOSTS = "(other addresses)"
SUMMARY_LINE = "client %s: %d more failed login(s) within %g s, not logged one by one: %s"
NAME_SHOWN = 64  # characters of a user name a summary line shows
_ALL: list[FailedLogins] = []  # one per protocol's client module


def flush_all() -> None:
    """Log the summary lines still held (at shutdown)."""
    for failed in _ALL:
        failed.flush()


class FailedLogins:
    """Logs each failed login as its own warning line while they are few; a burst of them from one address (a
    password guesser, a misconfigured client) becomes one summary line per interval with counts per user, so
    that the burst costs the proxy neither a formatted line per attempt nor an unbounded log."""

    def __init__(self, logger: logging.Logger, interval: float = INTERVAL, full_lines: int = FULL_LINES,
                 summary: str = SUMMARY_LINE) -> None:
        self._log = logger
        self.summary = summary  # the summary line: address, count, interval, "'name' xN, ..." (what was counted)
        self.interval = interval
        self.full_lines = full_lines
        self._window_end = 0.0
        self._lines: dict[str, int] = {}  # address -> failed logins logged in full in this interval
        self._held: dict[str, dict[str, int]] = {}  # address -> user -> failed logins not logged one by one
        self._held_total: dict[str, int] = {}  # address -> failed logins not logged one by one
        self._timer: asyncio.TimerHandle | None = None
        self._timer_loop: asyncio.AbstractEventLoop | None = None
        _ALL.append(self)

    def record(self, host: str, user: str, message: str, *args: object) -> None:
        """A failed login of `user` from `host` (an address without its port): `message % args` is its warning
        line, if it gets one."""
        now = time.monotonic()
        if now >= self._window_end:
            self._window_end = now + self.interval
            self._lines.clear()
        logged = self._lines.get(host, 0)
        if logged < self.full_lines:
            self._lines[host] = logged + 1
            self._log.warning(message, *args)
            return
        if host not in self._held and len(self._held) >= HOSTS_KEPT:
            host = OTHER_HOSTS
        users = self._held.get(host)
        if users is None:
            users = self._held[host] = {}
        if user in users or len(users) < USERS_KEPT:
            users[user] = users.get(user, 0) + 1
        self._held_total[host] = self._held_total.get(host, 0) + 1
        self._schedule()

    def _schedule(self) -> None:
        if self._timer is not None and self._timer_loop is not None and not self._timer_loop.is_closed():
            return  # the summary is due already
        self._timer_loop = loop = asyncio.get_running_loop()
        self._timer = loop.call_later(max(0.0, self._window_end - time.monotonic()), self.flush)

    def flush(self) -> None:
        """Log one summary line per address for the failed logins not logged one by one, and start a new interval."""
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self._timer_loop = None
        held, totals = self._held, self._held_total
        self._held, self._held_total = {}, {}
        self._lines.clear()
        self._window_end = time.monotonic() + self.interval
        for host, users in held.items():
            total = totals[host]
            named = sorted(users.items(), key=lambda item: (-item[1], item[0]))[:USERS_NAMED]
            listed = ", ".join(f"{user[:NAME_SHOWN]!r} x{count}" for user, count in named)
            rest = total - sum(count for _, count in named)
            if rest:
                listed += f", other users x{rest}"
            self._log.warning(self.summary, host, total, self.interval, listed)
