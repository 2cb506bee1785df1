"""Top SQL: the statement statistics of every worker process merged and ranked (`dbproxy top`, the control API)."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

from proxy import channel
from proxy.insights import merged, top
from proxy.stats import StatsRegistry

ORDERS = ("load", "calls", "errors", "rows", "mean")
MAX_LIMIT = 1000
# Sends one message to every worker process and returns their answers (see proxy/commands.py).
Fanout = Callable[[channel.Message, float], Awaitable[list[channel.Message]]]
ANSWER_TIMEOUT = 5.0


def local_statements(registry: StatsRegistry) -> channel.Handler:
    """A worker's part: its statement statistics as plain data."""

    async def statements(_message: channel.Message) -> channel.Message:
        insights = registry.insights
        if insights is None:
            return {"enabled": False, "statements": [], "evicted": 0}
        return {"enabled": True, "statements": insights.snapshot(), "evicted": insights.evicted}

    return statements


def top_handler(fanout: Fanout) -> channel.Handler:
    """{"limit": N, "by": ORDER}: the top statements over every worker."""

    async def top_sql(message: channel.Message) -> channel.Message:
        by = str(message.get("by") or "load")
        try:
            limit = int(str(message.get("limit", 10)))
        except (TypeError, ValueError):
            limit = 0
        if by not in ORDERS or not 0 < limit <= MAX_LIMIT:
            return {"error": "bad_request",
                    "message": f"by is one of {', '.join(ORDERS)} and limit is 1 to {MAX_LIMIT}"}
        answers = await fanout({"kind": "statements"}, ANSWER_TIMEOUT)
        usable = [answer for answer in answers if "error" not in answer]
        rows = top(merged(answer["statements"] for answer in usable), limit, by)
        return {"enabled": any(answer.get("enabled") for answer in usable), "by": by, "statements": rows,
                "evicted": sum(int(answer.get("evicted", 0)) for answer in usable),
                "processes": len(answers), "processes_answered": len(usable),
                "message": f"{len(rows)} statements by {by}"}

    return top_sql


COLUMNS = (("calls", 9), ("errors", 7), ("rows", 10), ("mean_ms", 9), ("p95_ms", 9), ("p99_ms", 9),
           ("wait_ms", 10), ("total_ms", 11))


def format_top(answer: dict[str, Any], as_json: bool, width: int = 160) -> str:
    """The answer as a table (statement text cut to the width left) or as JSON."""
    if as_json:
        return json.dumps(answer, indent=2)
    if not answer.get("enabled"):
        return "statement statistics are off ([server] statement_insights = 0)"
    head = " ".join(f"{name:>{size}}" for name, size in COLUMNS) + "  user@database/endpoint  statement"
    lines = [head]
    room = max(60, width - len(head) + len("statement"))
    for row in answer["statements"]:
        values = " ".join(f"{row[name]:>{size}}" for name, size in COLUMNS)
        where = f"{row['user']}@{row['database']}/{row['endpoint']}"
        text = " ".join(str(row["statement"]).split())
        lines.append(f"{values}  {where}  {text[:room]}")
    return "\n".join(lines)
