"""`dbproxy control params diff|apply`: what backend sessions run against their parameter groups, and replacing
the backends whose static parameters differ."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Awaitable, Callable, Iterable, Iterator
from typing import Any, cast

from proxy import channel
from proxy.parameter_groups import dynamic_of, group_of, static_of
from proxy.pool.mysql_backend import MySQLBackend
from proxy.pool.pool import Pool, Target
from proxy.session.mysql_service import MySQLService
from proxy.session.mysql_settings import sql_literal
from proxy.session.pg_service import PostgresService, pool_backends

log = logging.getLogger(__name__)

Fanout = Callable[[channel.Message, float], Awaitable[list[channel.Message]]]
Service = PostgresService | MySQLService
Services = Callable[[], Iterable[tuple[str, object]]]  # (endpoint name, its service) of the process
ANSWER_TIMEOUT = 10.0
DEFAULT = "(server default)"
KEY = ("endpoint", "instance", "database", "user", "group", "parameter", "kind", "group_value")


def _pools(services: Services, group: str | None) -> Iterator[tuple[str, Service, Target, Pool, str]]:
    """(endpoint, service, target, pool, group name) of every pool whose user has a parameter group (`group`)."""
    for name, service in services():
        if not isinstance(service, PostgresService | MySQLService):
            continue
        for target in service.group.all():
            for pool in list(target.pools.values()):
                found = group_of(service.settings, pool.user)
                if found is not None and (group is None or found[0] == group):
                    yield name, service, target, pool, found[0]


def _diff_rows(endpoint: str, service: Service, target: Target, pool: Pool, group: str) -> list[dict[str, Any]]:
    """The parameters some backend of `pool` runs with another value than its group gives."""
    where = {"endpoint": endpoint, "instance": target.name, "database": pool.database, "user": pool.user,
             "group": group}
    if isinstance(service, MySQLService):
        return _mysql_rows(where, service, pool)
    backends = pool_backends(pool)
    rows = []
    dynamic = dynamic_of(service.settings, pool.user, pool.server_params)
    for name, value in dynamic.items():
        server_form = pool.group_values.get((name, value), value)
        running = [backend.params.get(name, DEFAULT) for backend in backends]
        if any(found != server_form for found in running):
            rows.append({**where, "parameter": name, "kind": "dynamic", "group_value": value,
                         "backends": _counts(running), "applies": "at each client's next transaction"})
    static = static_of(service.settings, pool.user)
    for name in sorted(static.keys() | {name for backend in backends for name in backend.static_params}):
        running = [backend.static_params.get(name, DEFAULT) for backend in backends]
        if any(found != static.get(name, DEFAULT) for found in running):
            rows.append({**where, "parameter": name, "kind": "static", "group_value": static.get(name, DEFAULT),
                         "backends": _counts(running), "applies": "at `dbproxy control params apply`"})
    return rows


def _mysql_rows(where: dict[str, Any], service: MySQLService, pool: Pool) -> list[dict[str, Any]]:
    """MySQL: the session variables as the proxy last gave them to each backend (SET bodies, `@@SESSION.x=v`)."""
    generation = pool.target.generation
    backends = [cast(MySQLBackend, backend) for backend in (*pool.idle, *pool.busy) if backend.generation == generation]
    rows = []
    for name, value in dynamic_of(service.settings, pool.user, {}).items():
        name = name.lower()
        running = [_set_value(backend.settings.get(name)) for backend in backends]
        if any(found != _set_value(_group_body(name, value)) for found in running):
            rows.append({**where, "parameter": name, "kind": "dynamic", "group_value": value,
                         "backends": _counts(running), "applies": "at each client's next transaction"})
    return rows


def _group_body(name: str, value: str) -> bytes:
    return b"@@SESSION." + name.encode() + b"=" + sql_literal(b"", value.encode())


def _set_value(body: bytes | None) -> str:
    """The value of a SET body as text (its literal), or the server's default when none was given."""
    return DEFAULT if body is None else body.partition(b"=")[2].decode("utf-8", "replace")


def _counts(values: list[str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for value in values:
        counts[value] = counts.get(value, 0) + 1
    return counts


def local_params(services: Services) -> dict[str, channel.Handler]:
    """A worker's part: its pools' differences ("params-diff") and replacing backends ("params-apply")."""

    async def diff(message: channel.Message) -> channel.Message:
        group = message.get("group")
        rows = [row for found in _pools(services, None if group is None else str(group)) for row in _diff_rows(*found)]
        return {"pid": os.getpid(), "rows": rows}

    async def apply(message: channel.Message) -> channel.Message:
        group = message.get("group")
        replaced: dict[str, Target] = {}
        for endpoint, service, target, pool, _name in _pools(services, None if group is None else str(group)):
            if not isinstance(service, PostgresService):
                continue  # (MySQL groups have no static parameters)
            wanted = static_of(service.settings, pool.user)
            if any(backend.static_params != wanted for backend in pool_backends(pool)):
                replaced[f"{endpoint}/{target.name}"] = target
        for where, target in replaced.items():
            log.info("params apply: %s: replacing backend connections for their static parameters", where)
            target.reconnect()
        return {"pid": os.getpid(), "replaced": sorted(replaced)}

    return {"params-diff": diff, "params-apply": apply}


def params_handler(fanout: Fanout) -> channel.Handler:
    """{"action": "diff" | "apply", "group": NAME | None}: over every worker."""

    async def params(message: channel.Message) -> channel.Message:
        action = message.get("action")
        if action not in ("diff", "apply"):
            return {"error": "bad_request", "message": "action is diff or apply"}
        answers = await fanout({"kind": f"params-{action}", "group": message.get("group")}, ANSWER_TIMEOUT)
        failed = [str(answer.get("message", answer["error"])) for answer in answers if "error" in answer]
        if failed:
            return {"error": "failed", "message": f"params {action}: not every worker answered: {'; '.join(failed)}"}
        if action == "apply":
            replaced = sorted({str(where) for answer in answers for where in answer.get("replaced", [])})
            return {"replaced": replaced, "message": ("replacing the backend connections of " + ", ".join(replaced))
                    if replaced else "no backend runs other static parameters than its group's"}
        rows = _merged(row for answer in answers for row in answer.get("rows", []))
        return {"rows": rows, "message": f"{len(rows)} differences"}

    return params


def _merged(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows of several workers: one per pool and parameter, backend counts added up."""
    merged: dict[tuple[Any, ...], dict[str, Any]] = {}
    for row in rows:
        key = tuple(row[name] for name in KEY)
        found = merged.setdefault(key, {**row, "backends": {}})
        for value, count in row["backends"].items():
            found["backends"][value] = found["backends"].get(value, 0) + int(count)
    return sorted(merged.values(), key=lambda row: tuple(str(row[name]) for name in KEY))


def format_diff(answer: dict[str, Any], as_json: bool) -> str:
    """The differences as lines (or as JSON)."""
    if as_json:
        return json.dumps(answer, indent=2)
    rows = answer.get("rows", [])
    if not rows:
        return "no differences: every backend session runs its parameter group's values"
    lines = []
    for row in rows:
        running = ", ".join(f"{value} x{count}" for value, count in sorted(row["backends"].items()))
        lines.append(f"{row['endpoint']}/{row['instance']} {row['user']}@{row['database']} group {row['group']}: "
                     f"{row['kind']} {row['parameter']} = {row['group_value']}; backends run {running}; "
                     f"applies {row['applies']}")
    return "\n".join(lines)
