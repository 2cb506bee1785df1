"""The /v1 routes: read views, reload, pause/resume, client kill, pool reconnect, failover, switchover and
endpoint edits (each reusing the command the control socket runs)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
from importlib import resources
from typing import Any

from aiohttp import web

from proxy import channel
from proxy.api import dashboard, views
from proxy.api.context import ApiContext
from proxy.api.http import CONTEXT, ApiError, json_body
from proxy.api.redact import redacted_config
from proxy.commands import DEFAULT_SWITCHOVER_TIMEOUT, MAX_SWITCHOVER_TIMEOUT
from proxy.config import NAME_PATTERN
from proxy.endpoint_edits import EditRefused
from proxy.errors import ConfigError
from proxy.failover import (
    AlreadyWriter,
    FailoverRefused,
    OtherWriter,
    PromotionError,
    promote_instance,
)
from proxy.secrets import SecretStore
from proxy.top_sql import top_handler

log = logging.getLogger(__name__)

# A command's error kind -> HTTP status.
STATUS = {"bad_request": 400, "unknown_endpoint": 404, "unknown_client": 404, "unknown_instance": 404,
          "not_fenced": 409, "busy": 409, "switchover_failed": 409, "reload_refused": 409, "no_file": 409,
          "unreachable": 502, "timeout": 504}
NAME = re.compile(NAME_PATTERN)
HISTORY: web.AppKey[dashboard.History] = web.AppKey("history", dashboard.History)
SAMPLER: web.AppKey[asyncio.Task[None]] = web.AppKey("sampler", asyncio.Task)


def _context(request: web.Request) -> ApiContext:
    return request.app[CONTEXT]


def answered(answer: channel.Message, status: int = 200) -> web.Response:
    """A command's answer: its error as {"error"} with the status of its kind, else the answer itself."""
    if "error" in answer:
        return web.json_response({"error": str(answer.get("message", answer["error"])), "kind": answer["error"]},
                                 status=STATUS.get(str(answer["error"]), 500))
    return web.json_response({key: value for key, value in answer.items() if key != "workers"}, status=status)


def _optional_name(body: dict[str, Any], key: str) -> str | None:
    value = body.get(key)
    if value is not None and not isinstance(value, str):
        raise ApiError(400, f"'{key}' must be a string")
    return value


# --- read views ---


async def get_clusters(request: web.Request) -> web.Response:
    context = _context(request)
    return web.json_response(views.clusters(context.config(), await views.worker_views(context.fanout)))


async def get_instances(request: web.Request) -> web.Response:
    context = _context(request)
    return web.json_response(views.instances(context.config(), await views.worker_views(context.fanout)))


async def get_endpoints(request: web.Request) -> web.Response:
    context = _context(request)
    return web.json_response(views.endpoints(context.config(), await views.worker_views(context.fanout)))


async def get_pools(request: web.Request) -> web.Response:
    return web.json_response((await _context(request).stats()).get("pools", []))


async def get_stats(request: web.Request) -> web.Response:
    return web.json_response(await _context(request).stats())


async def get_config(request: web.Request) -> web.Response:
    return web.json_response(redacted_config(_context(request).config()))


async def get_top_sql(request: web.Request) -> web.Response:
    """?limit=N&by=load|calls|errors|rows|mean: the statements with the most of it, over every worker."""
    query = request.query
    limit = query.get("limit", "10")
    if not limit.isdigit():
        raise ApiError(400, "limit is a number")
    answer = await top_handler(_context(request).fanout)({"limit": int(limit), "by": query.get("by", "load")})
    return answered(answer)


async def post_sql_logging(request: web.Request) -> web.Response:
    """{"seconds": S}: enhanced SQL logging on the endpoint for S seconds (default 600; 0 switches it off)."""
    body = await json_body(request)
    seconds = body.get("seconds", 600)
    if not isinstance(seconds, int | float) or isinstance(seconds, bool):
        raise ApiError(400, "'seconds' must be a number")
    handlers = _context(request).commands.handlers()
    return answered(await handlers["sql-logging"]({"endpoint": request.match_info["name"], "seconds": seconds}))


async def get_dashboard(request: web.Request) -> web.Response:
    return web.json_response(await dashboard.dashboard_data(_context(request), request.app[HISTORY]))


async def _start_sampling(app: web.Application) -> None:
    app[SAMPLER] = asyncio.get_running_loop().create_task(dashboard.sample_forever(app[CONTEXT], app[HISTORY]))


async def _stop_sampling(app: web.Application) -> None:
    app[SAMPLER].cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await app[SAMPLER]


async def get_openapi(_request: web.Request) -> web.Response:
    text = resources.files("proxy.api").joinpath("openapi.json").read_text()
    return web.json_response(json.loads(text))


# --- actions ---


async def post_reload(request: web.Request) -> web.Response:
    await json_body(request)
    return answered(await _context(request).reload(None))


async def post_pause(request: web.Request) -> web.Response:
    body = await json_body(request)
    return answered(await _context(request).commands.pause({"endpoint": _optional_name(body, "endpoint")}))


async def post_resume(request: web.Request) -> web.Response:
    body = await json_body(request)
    return answered(await _context(request).commands.resume({"endpoint": _optional_name(body, "endpoint")}))


async def post_reconnect(request: web.Request) -> web.Response:
    body = await json_body(request)
    return answered(await _context(request).commands.reconnect({"endpoint": _optional_name(body, "endpoint")}))


async def post_kill(request: web.Request) -> web.Response:
    await json_body(request)
    raw = request.match_info["id"]
    if not raw.isdigit():
        raise ApiError(400, "the client id is a number (PostgreSQL process id, MySQL connection id)")
    return answered(await _context(request).commands.kill_client({"id": int(raw)}))


async def post_switchover(request: web.Request) -> web.Response:
    body = await json_body(request, required=True)
    to = body.get("to")
    if not isinstance(to, str) or not to:
        raise ApiError(400, "'to' (the cluster to switch to) is required")
    timeout = body.get("timeout", DEFAULT_SWITCHOVER_TIMEOUT)
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not 0 < timeout <= MAX_SWITCHOVER_TIMEOUT:
        raise ApiError(400, f"'timeout' must be a number of seconds above 0, at most {MAX_SWITCHOVER_TIMEOUT:g}")
    message = {"to": to, "endpoint": _optional_name(body, "endpoint"), "timeout": float(timeout)}
    return answered(await _context(request).commands.switchover(message))


async def post_failover(request: web.Request) -> web.Response:
    body = await json_body(request, required=True)
    to = body.get("to")
    if not isinstance(to, str) or not to:
        raise ApiError(400, "'to' (the instance to promote: its name or host:port) is required")
    config = _context(request).config()
    try:
        secrets = SecretStore.from_settings(config.secrets)
    except ConfigError as exc:
        raise ApiError(500, f"the secrets cannot be read: {exc}") from None
    warnings: list[str] = []
    try:
        promoted = await promote_instance(config, secrets, to, _optional_name(body, "cluster"), warnings.append)
    except FailoverRefused as exc:
        raise ApiError(404 if str(exc).startswith("no instance") else 409, str(exc)) from None
    except (AlreadyWriter, OtherWriter) as exc:
        raise ApiError(409, str(exc)) from None
    except PromotionError as exc:
        raise ApiError(502, str(exc)) from None
    log.warning("api: %s", promoted.message)
    return web.json_response({"ok": True, "message": promoted.message, "engine": promoted.engine,
                              "cluster": promoted.cluster, "seconds": round(promoted.seconds, 3),
                              "warnings": warnings})


# --- endpoint edits (kept over the file at each reload until the process restarts) ---


async def _edit(context: ApiContext, what: str, make: Any) -> channel.Message:
    try:
        edits = make(context.edits(), context.config())
    except EditRefused as exc:
        raise ApiError(exc.status, str(exc)) from None
    answer = await context.reload(edits)
    if "error" in answer:
        raise ApiError(STATUS.get(str(answer["error"]), 400) if answer["error"] != "reload_refused" else 400,
                       str(answer.get("message", answer["error"])))
    log.warning("api: %s (until the next restart: the configuration file is not rewritten)", what)
    return answer


def _name_and_engine(body: dict[str, Any]) -> tuple[str, str]:
    """The new table's name and engine, taken out of the request's body (ApiError 400 when they cannot be)."""
    name, engine = body.pop("name", None), body.pop("engine", "postgresql")
    if not isinstance(name, str) or not NAME.match(name):
        raise ApiError(400, "'name' is required: letters, digits and underscores, not starting with a digit")
    if not isinstance(engine, str):
        raise ApiError(400, "'engine' must be a string")
    return name, engine


def _endpoint_row(context: ApiContext, name: str, views_: list[channel.Message]) -> dict[str, Any]:
    return next((row for row in views.endpoints(context.config(), views_) if row["name"] == name), {"name": name})


async def post_endpoint(request: web.Request) -> web.Response:
    body = await json_body(request, required=True)
    name, engine = _name_and_engine(body)
    context = _context(request)
    await _edit(context, f"endpoint {name} added", lambda edits, config: edits.add(config, engine, name, body))
    return web.json_response(_endpoint_row(context, name, await views.worker_views(context.fanout)), status=201)


async def patch_endpoint(request: web.Request) -> web.Response:
    body = await json_body(request, required=True)
    name = request.match_info["name"]
    if "name" in body or "engine" in body:
        raise ApiError(400, "an endpoint's name and engine do not change (remove it and add another)")
    context = _context(request)
    await _edit(context, f"endpoint {name} changed", lambda edits, config: edits.change(config, name, body))
    return web.json_response(_endpoint_row(context, name, await views.worker_views(context.fanout)))


async def delete_endpoint(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    context = _context(request)
    await _edit(context, f"endpoint {name} removed", lambda edits, config: edits.remove(config, name))
    return web.json_response({"ok": True, "message": f"endpoint {name} removed"})


def _cluster_row(context: ApiContext, name: str, views_: list[channel.Message]) -> dict[str, Any]:
    return next((row for row in views.clusters(context.config(), views_) if row["name"] == name), {"name": name})


async def _cluster_answer(context: ApiContext, name: str, status: int = 200) -> web.Response:
    return web.json_response(_cluster_row(context, name, await views.worker_views(context.fanout)), status=status)


async def post_cluster(request: web.Request) -> web.Response:
    body = await json_body(request, required=True)
    name, engine = _name_and_engine(body)
    context = _context(request)
    await _edit(context, f"cluster {name} added", lambda edits, config: edits.add_cluster(config, engine, name, body))
    return await _cluster_answer(context, name, 201)


async def patch_cluster(request: web.Request) -> web.Response:
    body = await json_body(request, required=True)
    name = request.match_info["name"]
    if "name" in body or "engine" in body:
        raise ApiError(400, "a cluster's name and engine do not change (add another and move the endpoints)")
    context = _context(request)
    await _edit(context, f"cluster {name} changed", lambda edits, config: edits.change_cluster(config, name, body))
    return await _cluster_answer(context, name)


async def delete_cluster(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    context = _context(request)
    await _edit(context, f"cluster {name} removed", lambda edits, config: edits.remove_cluster(config, name))
    return web.json_response({"ok": True, "message": f"cluster {name} removed"})


async def post_instance(request: web.Request) -> web.Response:
    body = await json_body(request, required=True)
    name = request.match_info["name"]
    context = _context(request)
    await _edit(context, f"cluster {name}: instance added",
                lambda edits, config: edits.add_instance(config, name, body))
    return await _cluster_answer(context, name, 201)


async def patch_instance(request: web.Request) -> web.Response:
    body = await json_body(request, required=True)
    name, instance = request.match_info["name"], request.match_info["instance"]
    context = _context(request)
    await _edit(context, f"cluster {name}: instance {instance} changed",
                lambda edits, config: edits.change_instance(config, name, instance, body))
    return await _cluster_answer(context, name)


async def delete_instance(request: web.Request) -> web.Response:
    name, instance = request.match_info["name"], request.match_info["instance"]
    context = _context(request)
    await _edit(context, f"cluster {name}: instance {instance} removed",
                lambda edits, config: edits.remove_instance(config, name, instance))
    return await _cluster_answer(context, name)


def add_routes(app: web.Application) -> None:
    router = app.router
    app[HISTORY] = dashboard.History()
    app.on_startup.append(_start_sampling)
    app.on_cleanup.append(_stop_sampling)
    router.add_get("/dashboard", dashboard.page, allow_head=False)
    for path, handler in (("clusters", get_clusters), ("instances", get_instances), ("endpoints", get_endpoints),
                          ("pools", get_pools), ("stats", get_stats), ("config", get_config),
                          ("openapi.json", get_openapi), ("top-sql", get_top_sql), ("dashboard", get_dashboard)):
        router.add_get(f"/v1/{path}", handler, allow_head=False)
    for path, handler in (("reload", post_reload), ("pause", post_pause), ("resume", post_resume),
                          ("pools/reconnect", post_reconnect), ("clients/{id}/kill", post_kill),
                          ("failover", post_failover), ("switchover", post_switchover),
                          ("endpoints", post_endpoint)):
        router.add_post(f"/v1/{path}", handler)
    router.add_patch("/v1/endpoints/{name}", patch_endpoint)
    router.add_post("/v1/endpoints/{name}/sql-logging", post_sql_logging)
    router.add_post("/v1/clusters", post_cluster)
    router.add_patch("/v1/clusters/{name}", patch_cluster)
    router.add_delete("/v1/clusters/{name}", delete_cluster)
    router.add_post("/v1/clusters/{name}/instances", post_instance)
    router.add_patch("/v1/clusters/{name}/instances/{instance}", patch_instance)
    router.add_delete("/v1/clusters/{name}/instances/{instance}", delete_instance)
    router.add_delete("/v1/endpoints/{name}", delete_endpoint)
