"""The admin console's commands (SHOW POOLS, PAUSE, KILL, ...): parsed, asked of every worker, answered as a table."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from proxy import __version__, channel
from proxy.api.redact import redacted_config
from proxy.config import RESTART_KEYS, Config
from proxy.endpoints import resolve_endpoints
from proxy.errors import ConsoleCommandError, NoSuchThread
from proxy.insights import merged, top
from proxy.stats import Series, merge
from proxy.top_sql import Fanout

log = logging.getLogger(__name__)

# The databases that name the console: ours, and PgBouncer's so its exporters and scripts work unchanged.
CONSOLE_DATABASES = frozenset({"dbproxy", "pgbouncer"})
ANSWER_TIMEOUT = 5.0  # seconds a worker has to answer
DEFAULT_TOP = 10
MAX_TOP = 1000

Value = str | int | float | None
Reload = Callable[[], Awaitable[channel.Message]]  # a reload of the configuration file; its answer
# Session settings client libraries send at connect (PyMySQL's SET NAMES, JDBC's autocommit, ...): accepted, no-op.
SESSION_SETTINGS = frozenset({"NAMES", "CHARACTER", "CHARSET", "AUTOCOMMIT", "SESSION", "SQL_MODE", "TIME_ZONE",
                              "CLIENT_ENCODING", "APPLICATION_NAME", "EXTRA_FLOAT_DIGITS", "DATESTYLE",
                              "@@SESSION.AUTOCOMMIT", "@@AUTOCOMMIT", "@@SQL_MODE"})
VERSION_QUERIES = frozenset({"@@version_comment limit 1", "@@version_comment"})  # the mysql client's at start


@dataclass
class ConsoleResult:
    """A command's answer: a table (columns and rows; none for a command that only acts) and the command tag."""

    tag: str
    columns: list[str] = field(default_factory=list)
    rows: list[list[Value]] = field(default_factory=list)
    message: str = ""  # said as a notice (PostgreSQL) or the OK's info (MySQL) by commands that only act


POOL_COLUMNS = ["database", "user", "cl_active", "cl_waiting", "cl_active_cancel_req", "cl_waiting_cancel_req",
                "sv_active", "sv_active_cancel", "sv_being_canceled", "sv_idle", "sv_used", "sv_tested", "sv_login",
                "maxwait", "maxwait_us", "pool_mode", "engine", "endpoint", "cluster", "instance", "host", "port",
                "max_connections", "server_lifetime", "paused"]
CLIENT_COLUMNS = ["type", "user", "database", "state", "addr", "port", "local_addr", "local_port", "connect_time",
                  "request_time", "wait", "wait_us", "close_needed", "ptr", "link", "remote_pid", "tls",
                  "application_name", "prepared_statements", "id", "engine", "endpoint", "worker_pid", "pinned"]
SERVER_COLUMNS = CLIENT_COLUMNS[:-1]
STATS_COLUMNS = ["database", "total_server_assignment_count", "total_xact_count", "total_query_count",
                 "total_received", "total_sent", "total_xact_time", "total_query_time", "total_wait_time",
                 "total_client_parse_count", "total_server_parse_count", "total_bind_count",
                 "avg_server_assignment_count", "avg_xact_count", "avg_query_count", "avg_recv", "avg_sent",
                 "avg_xact_time", "avg_query_time", "avg_wait_time", "avg_client_parse_count",
                 "avg_server_parse_count", "avg_bind_count", "engine", "endpoint"]
ENDPOINT_COLUMNS = ["engine", "endpoint", "cluster", "clients_current", "clients_accepted", "clients_refused",
                    "logins_ok", "logins_failed", "logins_throttled", "queries", "query_errors", "pinned_now",
                    "protocol_errors", "cancel_requests", "idle_client_timeouts", "login_timeouts", "paused"]
INSTANCE_COLUMNS = ["engine", "cluster", "instance", "role", "available", "lag_seconds", "writer_changes"]
DATABASE_COLUMNS = ["name", "host", "port", "database", "force_user", "pool_size", "min_pool_size", "reserve_pool",
                    "server_lifetime", "pool_mode", "max_connections", "current_connections", "paused", "disabled",
                    "engine", "endpoint"]
LIST_NAMES = ["databases", "users", "pools", "free_clients", "used_clients", "login_clients", "free_servers",
              "used_servers", "dns_names", "dns_zones", "dns_queries", "dns_pending"]
TOP_COLUMNS = ["calls", "errors", "rows", "mean_ms", "p95_ms", "p99_ms", "wait_ms", "total_ms", "user", "database",
               "endpoint", "statement"]

SAME_IN_EVERY_WORKER = ("port", "server_lifetime")  # pool columns not added up over the workers

HELP = [
    ("SHOW POOLS", "backend pools: clients and server connections per database and user"),
    ("SHOW CLIENTS", "client connections"),
    ("SHOW SERVERS", "backend connections"),
    ("SHOW STATS", "totals per database"),
    ("SHOW ENDPOINTS", "counters per endpoint"),
    ("SHOW INSTANCES", "monitored instances: role, availability, lag"),
    ("SHOW CONFIG", "the effective configuration (secrets redacted)"),
    ("SHOW PINS", "sessions pinned to their backend, by reason"),
    ("SHOW TOP [N]", "the N statements with the most load (default 10)"),
    ("SHOW DATABASES", "the databases in use per endpoint, with their backend address and limits"),
    ("SHOW LISTS", "how many databases, users, pools, clients and servers"),
    ("SHOW VERSION", "the proxy's version"),
    ("SHOW HELP", "this list"),
    ("PAUSE [endpoint]", "hold new transactions (each waits at most its borrow timeout) until RESUME"),
    ("RESUME [endpoint]", "let held transactions go on"),
    ("RELOAD", "re-read the configuration file and the secrets"),
    ("KILL <client id>", "close a client connection (its id from SHOW CLIENTS)"),
    ("RECONNECT [endpoint]", "renew backend connections: idle ones now, lent-out ones when given back"),
]


def split_commands(text: str) -> list[str]:
    """The commands of a query string, split at `;` (the console's commands hold no quoted text); [""] if none."""
    return [part.strip() for part in text.split(";") if part.strip()] or [""]


def is_admin(config: Config, user: str) -> bool:
    return user in config.admin.users


def _failures(answers: list[channel.Message]) -> str:
    return "; ".join(str(answer.get("message", answer["error"])) for answer in answers if "error" in answer)


def _table(columns: list[str], rows: list[dict[str, Any]]) -> ConsoleResult:
    return ConsoleResult("SHOW", columns, [[row.get(name) for name in columns] for row in rows])


def config_rows(current: Any, default: Any, prefix: str = "", changeable: bool = True) -> list[list[Value]]:
    """One row per leaf of the configuration data (secrets already redacted): key, value, default, changeable."""
    if isinstance(current, dict):
        rows: list[list[Value]] = []
        for key, value in current.items():
            below = default.get(key) if isinstance(default, dict) else None
            fixed = (prefix == "server" and key in RESTART_KEYS) or (prefix.endswith("pool") and key == "mode")
            rows.extend(config_rows(value, below, f"{prefix}.{key}" if prefix else str(key), changeable and not fixed))
        return rows

    def shown(value: Any) -> Value:
        return value if isinstance(value, str | int | float) and not isinstance(value, bool) else _text(value)

    return [[prefix, shown(current), shown(default), "yes" if changeable else "no"]]


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


class Console:
    """Runs console commands for the whole proxy: `fanout` asks every worker (this one included) for its part;
    `reload` asks for a configuration reload as SIGHUP would."""

    def __init__(self, config: Callable[[], Config], fanout: Fanout, reload: Reload) -> None:
        self.config = config
        self.fanout = fanout
        self.reload = reload

    async def execute(self, text: str, who: str) -> ConsoleResult:
        """Run one command; ConsoleCommandError (the session goes on) when it is unknown or cannot run."""
        words = text.strip().rstrip(";").strip().split()
        if not words:
            return ConsoleResult("EMPTY")
        verb = words[0].upper()
        args = words[1:]
        if verb == "SHOW" and args:
            return await self._show(args[0].upper(), args[1:], text)
        actions = {"PAUSE": self._pause, "RESUME": self._resume, "RECONNECT": self._reconnect}
        if verb in actions and len(args) <= 1:
            return await actions[verb](args[0] if args else None, who)
        if verb == "SET" and args and args[0].split("=")[0].upper() in SESSION_SETTINGS:
            return ConsoleResult("SET")  # what client libraries set at connect: nothing to do here
        if verb == "SELECT" and " ".join(args).lower() in VERSION_QUERIES:
            return ConsoleResult("SELECT", ["@@version_comment"], [["dbproxy admin console"]])
        if verb == "RELOAD" and not args:
            log.warning("admin console: %s asked for a reload", who)
            answer = await self.reload()
            if "error" in answer:
                raise ConsoleCommandError(str(answer.get("message", answer["error"])))
            return ConsoleResult("RELOAD", message=str(answer.get("message", "reloaded")))
        if verb == "KILL" and len(args) == 1 and args[0].isdigit():
            return await self._kill(int(args[0]), who)
        raise ConsoleCommandError(f"unknown admin console command {text.strip()[:200]!r} (SHOW HELP lists them)")

    async def _ask(self, message: channel.Message) -> list[channel.Message]:
        answers = await self.fanout(message, ANSWER_TIMEOUT)
        if all("error" in answer for answer in answers):
            raise ConsoleCommandError(f"no worker answered: {_failures(answers)}")
        if any("error" in answer for answer in answers):
            log.warning("admin console: %s: some workers did not answer, the answer is partial: %s",
                        message["kind"], _failures(answers))
        return [answer for answer in answers if "error" not in answer]

    async def _show(self, what: str, args: list[str], text: str) -> ConsoleResult:
        if what == "TOP" and len(args) <= 1:
            return await self._top(args[0] if args else None)
        if args:
            raise ConsoleCommandError(f"unknown admin console command {text.strip()[:200]!r} (SHOW HELP lists them)")
        if what == "HELP":
            return ConsoleResult("SHOW", ["command", "description"], [[name, about] for name, about in HELP])
        if what == "VERSION":
            return ConsoleResult("SHOW", ["version"], [[f"dbproxy {__version__}"]])
        if what == "CONFIG":
            config = self.config()
            rows = config_rows(redacted_config(config), redacted_config(Config()))
            return ConsoleResult("SHOW", ["key", "value", "default", "changeable"], rows)
        shows = {"POOLS": self._pools, "CLIENTS": self._clients, "SERVERS": self._servers, "STATS": self._stats,
                 "ENDPOINTS": self._endpoints, "INSTANCES": self._instances, "PINS": self._pins,
                 "DATABASES": self._databases, "LISTS": self._lists}
        show = shows.get(what)
        if show is None:
            raise ConsoleCommandError(f"unknown admin console command {text.strip()[:200]!r} (SHOW HELP lists them)")
        return show(await self._ask({"kind": "console-state", "statements": what == "STATS"}))

    # --- SHOW: the workers' parts put together ---

    @staticmethod
    def _pools(answers: list[channel.Message]) -> ConsoleResult:
        keys = ("engine", "endpoint", "instance", "database", "user")
        found: dict[tuple[str, ...], dict[str, Any]] = {}
        for answer in answers:
            for row in answer["pools"]:
                key = tuple(str(row[name]) for name in keys)
                total = found.get(key)
                if total is None:
                    found[key] = dict(row)
                    continue
                for name, value in row.items():
                    if name in ("maxwait", "maxwait_us"):
                        continue
                    if name == "paused":
                        total[name] = int(bool(total[name] or value))
                    elif isinstance(value, int) and name not in keys and name not in SAME_IN_EVERY_WORKER:
                        total[name] += value
                if row["maxwait"] * 1_000_000 + row["maxwait_us"] > total["maxwait"] * 1_000_000 + total["maxwait_us"]:
                    total["maxwait"], total["maxwait_us"] = row["maxwait"], row["maxwait_us"]
        rows = sorted(found.values(), key=lambda row: tuple(str(row[name]) for name in keys))
        return _table(POOL_COLUMNS, rows)

    @classmethod
    def _databases(cls, answers: list[channel.Message]) -> ConsoleResult:
        """One row per endpoint, instance and database (the pools of every user added up)."""
        found: dict[tuple[str, str, str], dict[str, Any]] = {}
        for row in cls._pools(answers).rows:
            pool = dict(zip(POOL_COLUMNS, row, strict=True))
            key = (str(pool["endpoint"]), str(pool["instance"]), str(pool["database"]))
            total = found.get(key)
            if total is None:
                total = found[key] = {
                    "name": pool["database"], "host": pool["host"], "port": pool["port"],
                    "database": pool["database"], "force_user": "", "pool_size": pool["max_connections"],
                    "min_pool_size": 0, "reserve_pool": 0, "server_lifetime": pool["server_lifetime"],
                    "pool_mode": pool["pool_mode"], "max_connections": pool["max_connections"],
                    "current_connections": 0, "paused": 0, "disabled": 0, "engine": pool["engine"],
                    "endpoint": pool["endpoint"]}
            total["current_connections"] += int(pool["sv_active"] or 0) + int(pool["sv_idle"] or 0)
            total["paused"] = int(bool(total["paused"] or pool["paused"]))
        return _table(DATABASE_COLUMNS, [found[key] for key in sorted(found)])

    @staticmethod
    def _lists(answers: list[channel.Message]) -> ConsoleResult:
        pools = [row for answer in answers for row in answer["pools"]]
        clients = [row for answer in answers for row in answer["clients"]]
        servers = sum(len(answer["servers"]) for answer in answers)
        items = {"databases": len({(row["endpoint"], row["database"]) for row in pools}),
                 "users": len({row["user"] for row in pools}),
                 "pools": len({(row["endpoint"], row["instance"], row["database"], row["user"]) for row in pools}),
                 "used_clients": len(clients), "login_clients": sum(row["state"] == "login" for row in clients),
                 "used_servers": servers}
        return ConsoleResult("SHOW", ["list", "items"], [[name, items.get(name, 0)] for name in LIST_NAMES])

    @staticmethod
    def _clients(answers: list[channel.Message]) -> ConsoleResult:
        rows = [row for answer in answers for row in answer["clients"]]
        return _table(CLIENT_COLUMNS, sorted(rows, key=lambda row: int(row["id"])))

    @staticmethod
    def _servers(answers: list[channel.Message]) -> ConsoleResult:
        rows = [row for answer in answers for row in answer["servers"]]
        return _table(SERVER_COLUMNS, sorted(rows, key=lambda row: (str(row["endpoint"]), int(row["remote_pid"]))))

    @staticmethod
    def _snapshot(answers: list[channel.Message]) -> dict[str, list[Series]]:
        return merge(answer["snapshot"] for answer in answers)

    def _stats(self, answers: list[channel.Message]) -> ConsoleResult:
        """Totals per endpoint and database: the pools' counters, and the statement statistics' (when they are
        on) for queries; times in microseconds as PgBouncer's. Rates per period (avg_*) are not tracked: 0."""
        found: dict[tuple[str, str, str], dict[str, Any]] = {}

        def row_for(engine: str, endpoint: str, database: str) -> dict[str, Any]:
            key = (engine, endpoint, database)
            row = found.get(key)
            if row is None:
                row = found[key] = {name: 0 for name in STATS_COLUMNS}
                row.update(engine=engine, endpoint=endpoint, database=database)
            return row

        snapshot = self._snapshot(answers)
        for series in snapshot["pools"]:
            if not series.get("database"):
                continue  # the retired total of removed pools
            row = row_for(str(series["engine"]), str(series["endpoint"]), str(series["database"]))
            row["total_server_assignment_count"] += int(series.get("borrows", 0))
            row["total_xact_count"] += int(series.get("transactions", 0))
            row["total_wait_time"] += round(float(series.get("wait_time", 0.0)) * 1_000_000)
        engines = {str(series["endpoint"]): str(series["engine"]) for series in snapshot["endpoints"]}
        for (_text, _user, database, endpoint), statement in merged(
                answer.get("statements", []) for answer in answers).items():
            row = row_for(engines.get(endpoint, ""), endpoint, database)
            row["total_query_count"] += statement.calls
            row["total_query_time"] += round(statement.total * 1_000_000)
        rows = sorted(found.values(), key=lambda row: (row["endpoint"], row["database"]))
        return _table(STATS_COLUMNS, rows)

    def _endpoints(self, answers: list[channel.Message]) -> ConsoleResult:
        paused = {name for answer in answers for name in answer.get("paused", [])}
        rows = [{**series, "paused": int(series["endpoint"] in paused)}
                for series in self._snapshot(answers)["endpoints"]]
        return _table(ENDPOINT_COLUMNS, sorted(rows, key=lambda row: str(row["endpoint"])))

    def _instances(self, answers: list[channel.Message]) -> ConsoleResult:
        return _table(INSTANCE_COLUMNS, self._snapshot(answers)["instances"])

    def _pins(self, answers: list[channel.Message]) -> ConsoleResult:
        rows: list[list[Value]] = []
        for series in sorted(self._snapshot(answers)["endpoints"], key=lambda found: str(found["endpoint"])):
            for reason, count in sorted(series.get("pins", {}).items()):
                rows.append([series["engine"], series["endpoint"], reason, count, series.get("pinned_now", 0)])
        return ConsoleResult("SHOW", ["engine", "endpoint", "reason", "times_pinned", "pinned_now"], rows)

    async def _top(self, count: str | None) -> ConsoleResult:
        if count is not None and not count.isdigit():
            raise ConsoleCommandError(f"SHOW TOP takes a number of statements (1 to {MAX_TOP}), not {count[:50]!r}")
        limit = int(count) if count is not None else DEFAULT_TOP
        if not 0 < limit <= MAX_TOP:
            raise ConsoleCommandError(f"SHOW TOP takes a number of statements from 1 to {MAX_TOP}")
        answers = await self._ask({"kind": "statements"})
        if not any(answer.get("enabled") for answer in answers):
            raise ConsoleCommandError("statement statistics are off ([server] statement_insights = 0)")
        rows = top(merged(answer["statements"] for answer in answers), limit, "load")
        return _table(TOP_COLUMNS, rows)

    # --- actions ---

    async def _act(self, kind: str, endpoint: str | None, who: str, done: str) -> ConsoleResult:
        """PAUSE, RESUME, RECONNECT: the operator commands' own handlers in every worker."""
        if endpoint is not None and endpoint not in self._endpoint_names():
            raise ConsoleCommandError(f"no endpoint {endpoint[:100]!r} (SHOW ENDPOINTS lists them)")
        answers = await self._ask({"kind": kind, "endpoint": endpoint})
        what = f"endpoint {endpoint}" if endpoint is not None else "every endpoint"
        log.warning("admin console: %s: %s %s", who, done, what)
        return ConsoleResult(kind.upper(), message=f"{done} {what} in {len(answers)} worker(s)")

    def _endpoint_names(self) -> list[str]:
        return [endpoint.name for endpoint in resolve_endpoints(self.config())]

    async def _pause(self, endpoint: str | None, who: str) -> ConsoleResult:
        return await self._act("pause", endpoint, who, "paused")

    async def _resume(self, endpoint: str | None, who: str) -> ConsoleResult:
        return await self._act("resume", endpoint, who, "resumed")

    async def _reconnect(self, endpoint: str | None, who: str) -> ConsoleResult:
        return await self._act("reconnect", endpoint, who, "reconnecting")

    async def _kill(self, client_id: int, who: str) -> ConsoleResult:
        answers = await self._ask({"kind": "kill-client", "id": client_id})
        if not any(answer.get("killed") for answer in answers):
            raise NoSuchThread(f"no client with id {client_id} (SHOW CLIENTS lists them)")
        log.warning("admin console: %s: client %d killed", who, client_id)
        return ConsoleResult("KILL", message=f"client {client_id} killed")
