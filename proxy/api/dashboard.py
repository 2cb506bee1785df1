"""The live dashboard: its page, and the JSON the page polls (what the views and the merged stats say now, with
client connections, backend connections and the query rate sampled over the last minutes)."""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import deque
from importlib import resources
from typing import Any

from aiohttp import web

from proxy.api import views
from proxy.api.context import ApiContext
from proxy.stats import Snapshot
from proxy.top_sql import top_handler

log = logging.getLogger(__name__)

SAMPLE_INTERVAL = 2.0  # seconds between samples of the series
SAMPLES = 150  # five minutes of them
TOP_STATEMENTS = 10


class History:
    """The series the dashboard charts: (time, client connections, backend connections, statements answered)."""

    def __init__(self) -> None:
        self.samples: deque[tuple[float, int, int, int]] = deque(maxlen=SAMPLES)

    def sample(self, snapshot: Snapshot, now: float) -> None:
        clients = sum(int(row.get("clients_current", 0)) for row in snapshot.get("endpoints", []))
        backends = sum(int(row.get("open", 0)) for row in snapshot.get("pools", []))
        queries = sum(int(row.get("queries", 0)) for row in snapshot.get("endpoints", []))
        self.samples.append((now, clients, backends, queries))

    def series(self) -> dict[str, list[list[float]]]:
        samples = list(self.samples)
        rates = [[now, max(0.0, (queries - before) / (now - then))]
                 for (then, _, _, before), (now, _, _, queries) in itertools.pairwise(samples)
                 if now > then]
        return {"clients": [[now, clients] for now, clients, _, _ in samples],
                "backends": [[now, backends] for now, _, backends, _ in samples],
                "queries_per_second": rates}


async def sample_forever(context: ApiContext, history: History) -> None:
    """Sample the merged stats every SAMPLE_INTERVAL seconds (a worker that does not answer skips a sample)."""
    while True:
        try:
            history.sample(await context.stats(), time.time())
        except Exception:  # a worker restarting: the next sample tries again
            log.debug("dashboard: no sample", exc_info=True)
        await asyncio.sleep(SAMPLE_INTERVAL)


def _pools(snapshot: Snapshot) -> list[dict[str, Any]]:
    return [{"engine": row.get("engine"), "endpoint": row.get("endpoint"), "instance": row.get("instance"),
             "database": row.get("database"), "user": row.get("user"), "clients": row.get("borrowed", 0)
             + row.get("waiting", 0), "borrowed": row.get("borrowed", 0),
             "idle": int(row.get("open", 0)) - int(row.get("borrowed", 0)), "waiting": row.get("waiting", 0)}
            for row in snapshot.get("pools", []) if row.get("database") or row.get("user")]


def _endpoints(context: ApiContext, seen: list[dict[str, Any]]) -> list[dict[str, Any]]:
    instances = {(row["engine"], row["cluster"], row["name"]): row for row in views.instances(context.config(), seen)}
    rows = []
    for endpoint in views.endpoints(context.config(), seen):
        members = []
        for label in endpoint["instances"] or endpoint["serving"]:
            status = instances.get((endpoint["engine"], endpoint["cluster"], label), {})
            healthy = status.get("healthy")
            members.append({"instance": label, "role": status.get("role", "unknown"),
                            "health": "healthy" if healthy else "unknown" if healthy is None else "unhealthy",
                            "lag_seconds": status.get("lag_seconds"), "serving": label in endpoint["serving"]})
        rows.append({"name": endpoint["name"], "engine": endpoint["engine"], "cluster": endpoint["cluster"],
                     "role": endpoint["role"], "paused": endpoint["paused"], "clients": endpoint["clients"],
                     "instances": members})
    return rows


async def dashboard_data(context: ApiContext, history: History) -> dict[str, Any]:
    snapshot, seen, top = await asyncio.gather(context.stats(), views.worker_views(context.fanout),
                                               top_handler(context.fanout)({"limit": TOP_STATEMENTS, "by": "load"}))
    now = time.time()
    if not history.samples or now - history.samples[-1][0] >= SAMPLE_INTERVAL / 2:
        history.sample(snapshot, now)
    pins: dict[str, int] = {}
    for row in snapshot.get("endpoints", []):
        for reason, count in row.get("pins", {}).items():
            pins[reason] = pins.get(reason, 0) + int(count)
    return {"time": now, "endpoints": _endpoints(context, seen), "pools": _pools(snapshot),
            "pins": [{"reason": reason, "count": count} for reason, count in sorted(pins.items())],
            "top_sql": top.get("statements", []), "series": history.series()}


async def page(_request: web.Request) -> web.Response:
    text = resources.files("proxy.api").joinpath("dashboard.html").read_text()
    return web.Response(text=text, content_type="text/html", headers={"Cache-Control": "no-store"})
