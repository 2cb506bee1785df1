"""Enhanced SQL logging: for a while, per endpoint, each statement's text with its timing, rows, outcome and the
backend that ran it, as a log line (event `sql_statement`); it switches itself off when its time is up, as RDS
Proxy's enhanced logging does. Statement texts hold the literals clients send: switch it on only to debug."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable

from proxy import channel
from proxy.stats import StatsRegistry

log = logging.getLogger(__name__)

MAX_SECONDS = 86_400.0  # the longest it may stay on (24 h)
DEFAULT_SECONDS = 600.0
TEXT_SHOWN = 4096  # characters of a statement's text logged
Fanout = Callable[[channel.Message, float], Awaitable[list[channel.Message]]]
ANSWER_TIMEOUT = 5.0


def log_statement(peer: str, user: str, database: str, endpoint: str, backend: object, text: bytes,
                  seconds: float, rows: int, failed: bool) -> None:
    shown = text[:TEXT_SHOWN].decode("utf-8", "replace") + ("..." if len(text) > TEXT_SHOWN else "")
    log.info("sql: client %s (user %r, database %r) on endpoint %s ran on %s in %.3f ms (%d rows%s): %s", peer,
             user, database, endpoint, backend, seconds * 1000, rows, ", failed" if failed else "", shown)


def local_switch(registry: StatsRegistry) -> channel.Handler:
    """A worker's part: {"endpoint": NAME, "seconds": S} (0: off) on every series of that endpoint."""

    async def switch(message: channel.Message) -> channel.Message:
        name = str(message.get("endpoint", ""))
        seconds = float(str(message.get("seconds", 0)))
        until = time.monotonic() + seconds if seconds > 0 else 0.0
        found = [stats for stats in list(registry.endpoints.values()) if stats.labels.get("endpoint") == name]
        for stats in found:
            stats.sql_log_until = until
        return {"endpoints": len(found)}

    return switch


def switch_handler(fanout: Fanout, known: Callable[[str], bool]) -> channel.Handler:
    """{"endpoint": NAME, "seconds": S}: enhanced SQL logging on that endpoint for S seconds (0: off now)."""

    async def sql_logging(message: channel.Message) -> channel.Message:
        name = str(message.get("endpoint") or "")
        try:
            seconds = float(str(message.get("seconds", DEFAULT_SECONDS)))
        except (TypeError, ValueError):
            seconds = -1.0
        if not known(name):
            return {"error": "unknown_endpoint", "message": f"no endpoint {name!r}"}
        if not 0 <= seconds <= MAX_SECONDS:
            return {"error": "bad_request", "message": f"seconds is 0 (off) to {MAX_SECONDS:.0f}"}
        await fanout({"kind": "sql-logging", "endpoint": name, "seconds": seconds}, ANSWER_TIMEOUT)
        if seconds:
            log.warning("sql logging on endpoint %s for %.0f s: statement texts (with their literals) are logged",
                        name, seconds)
            return {"ok": True, "message": f"SQL logging on endpoint {name} for {seconds:.0f} s",
                    "endpoint": name, "seconds": seconds}
        log.warning("sql logging on endpoint %s switched off", name)
        return {"ok": True, "message": f"SQL logging on endpoint {name} is off", "endpoint": name, "seconds": 0}

    return sql_logging
