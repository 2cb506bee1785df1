"""GET /healthz (the event loop runs), /readyz (listeners up, every endpoint with a healthy instance for its role)
and /metrics (Prometheus text of the merged stats); no auth (on the health port, or the API's with its token)."""

from __future__ import annotations

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from proxy.api import views
from proxy.api.http import CONTEXT
from proxy.metrics import SnapshotCollector


async def healthz(_request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    context = request.app[CONTEXT]
    problems = await views.readiness(context.config(), await views.worker_views(context.fanout))
    if problems:
        return web.json_response({"status": "not ready", "reasons": problems}, status=503)
    return web.json_response({"status": "ready", "reasons": []})


async def serve_metrics(request: web.Request) -> web.Response:
    snapshot = await request.app[CONTEXT].stats()
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SnapshotCollector(lambda: snapshot))
    return web.Response(body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST})


def add_health_routes(app: web.Application, metrics: bool = True) -> None:
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    if metrics:
        app.router.add_get("/metrics", serve_metrics)
