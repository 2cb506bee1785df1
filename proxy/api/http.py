"""What every API route shares: the context key, JSON errors and bodies, and the bearer-token middleware."""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from proxy.api.context import ApiContext
from proxy.api.token import bearer_matches

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
CONTEXT: web.AppKey[ApiContext] = web.AppKey("context", ApiContext)
MAX_BODY = 1 << 20  # bytes of a request body
# Served without the token on the API port too (the dashboard page holds no data: it asks /v1/dashboard with it).
OPEN_PATHS = frozenset({"/healthz", "/readyz", "/dashboard"})


class ApiError(Exception):
    """An error answered as {"error": message} with `status`."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def json_error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


@web.middleware
async def errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every error as JSON: ApiError, aiohttp's own (404, 405, 413), and anything unexpected as 500."""
    try:
        return await handler(request)
    except ApiError as exc:
        log.warning("api: %s %s from %s: %d %s", request.method, request.path, request.remote, exc.status,
                    exc.message)
        return json_error(exc.status, exc.message)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        log.warning("api: %s %s from %s: %d %s", request.method, request.path, request.remote, exc.status,
                    exc.reason)
        return json_error(exc.status, exc.reason)
    except Exception as exc:
        log.exception("api: %s %s failed", request.method, request.path)
        return json_error(500, f"{type(exc).__name__}: {exc}")


def bearer_auth(token: bytes) -> Callable[..., Awaitable[web.StreamResponse]]:
    @web.middleware
    async def auth(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path in OPEN_PATHS:
            return await handler(request)
        if not bearer_matches(request.headers.get("Authorization"), token):
            log.warning("api: %s %s from %s: 401 no valid bearer token", request.method, request.path,
                        request.remote)
            response = json_error(401, "a valid bearer token is required (Authorization: Bearer TOKEN)")
            response.headers["WWW-Authenticate"] = 'Bearer realm="dbproxy"'
            return response
        return await handler(request)
    return auth


async def json_body(request: web.Request, required: bool = False) -> dict[str, Any]:
    """The request's JSON object ({} for an empty body unless `required`); ApiError 400 otherwise."""
    raw = await request.read()
    if not raw.strip():
        if required:
            raise ApiError(400, "a JSON object is required as the request body")
        return {}
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"the body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object")
    return body
