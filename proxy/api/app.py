"""The aiohttp applications: the bearer-token API under /v1, and the health endpoints without auth."""

from __future__ import annotations

from aiohttp import web

from proxy.api.context import ApiContext
from proxy.api.health import add_health_routes
from proxy.api.http import CONTEXT, MAX_BODY, bearer_auth, errors
from proxy.api.routes import add_routes


def api_app(context: ApiContext, token: bytes) -> web.Application:
    app = web.Application(middlewares=[errors, bearer_auth(token)], client_max_size=MAX_BODY)
    app[CONTEXT] = context
    add_routes(app)
    add_health_routes(app, metrics=False)
    return app


def health_app(context: ApiContext) -> web.Application:
    app = web.Application(middlewares=[errors])
    app[CONTEXT] = context
    add_health_routes(app)
    return app
