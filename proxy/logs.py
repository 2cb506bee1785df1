"""Log output: text lines, or JSON lines where the proxy's notable records carry a stable event name and fields.

A record is named by its message template (the format string before its arguments, fixed at its call site), so
the call sites stay plain logging calls; tests/test_logs.py checks that every template below is still written in
the source, so a reworded message cannot silently lose its event name."""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

# message template -> (event name, names of its arguments in order)
EVENTS: dict[str, tuple[str, tuple[str, ...]]] = {
    # connection lifecycle
    "client %s connected to endpoint %s": ("client_connected", ("client", "endpoint")),
    "client %s logged in as %r to database %r (%s, tls %s)": (
        "client_logged_in", ("client", "user", "database", "method", "tls")),
    "client %s closed after %.1f s": ("client_closed", ("client", "seconds")),
    "client %s closed the connection during login": ("client_closed_during_login", ("client",)),
    "client %s: TLS handshake failed: %s": ("client_tls_failed", ("client", "reason")),
    "client %s: backend %s was lost: %s": ("backend_lost", ("client", "backend", "reason")),
    # auth
    "client %s (user %r): %s [%s]": ("client_refused", ("client", "user", "reason", "sqlstate")),
    "client %s (user %r): %s [%d %s]": ("client_refused", ("client", "user", "reason", "errno", "sqlstate")),
    "client %s: %d more failed login(s) within %g s, not logged one by one: %s": (
        "failed_logins_summary", ("client", "count", "seconds", "users")),
    # pinning
    "client %s pinned to backend %s: %s": ("session_pinned", ("client", "backend", "reason")),
    "client %s pinned to its backend: %s": ("session_pinned", ("client", "reason")),
    "client %s pinned to %s: %s%s": ("session_pinned", ("client", "backend", "reason", "detail")),
    "client %s unpinned: its session state is gone": ("session_unpinned", ("client",)),
    "client %s unpinned: %s ended": ("session_unpinned", ("client", "reason")),
    # replays
    "client %s: transaction replayed on %s after its backend was lost; the replies matched": (
        "transaction_replayed", ("client", "backend")),
    "client %s: replayed %d command(s) on %s in %.0f ms; the client goes on": (
        "transaction_replayed", ("client", "commands", "backend", "milliseconds")),
    "client %s: the replayed transaction was rolled back: %s (40001)": ("replay_aborted", ("client", "reason")),
    # enhanced SQL logging
    "sql: client %s (user %r, database %r) on endpoint %s ran on %s in %.3f ms (%d rows%s): %s": (
        "sql_statement", ("client", "user", "database", "endpoint", "backend", "milliseconds", "rows", "failed",
                          "statement")),
    "sql logging on endpoint %s for %.0f s: statement texts (with their literals) are logged": (
        "sql_logging_on", ("endpoint", "seconds")),
    "sql logging on endpoint %s switched off": ("sql_logging_off", ("endpoint",)),
    # topology, failover and switchover
    "instance %s is now %s (timeline %d)": ("instance_role", ("instance", "role", "timeline")),
    "instance %s is unhealthy: %s": ("instance_unhealthy", ("instance", "reason")),
    "instance %s:%d is fenced: no work goes to it until an operator re-admits it": (
        "instance_fenced", ("host", "port")),
    "instance %s:%d is re-admitted": ("instance_readmitted", ("host", "port")),
    "endpoint %s: cluster %s has no healthy writer; new transactions wait for one": (
        "writer_lost", ("endpoint", "cluster")),
    "endpoint %s: writer is now %s:%d (timeline %d), was %s:%d": (
        "writer_changed", ("endpoint", "host", "port", "timeline", "old_host", "old_port")),
    "endpoint %s: now serving %s%s%s": ("endpoint_serving", ("endpoint", "instances", "detail", "why")),
    "cluster %s: no healthy writer for %.1f s; promoting %s:%d (timeline %d, position %d)": (
        "promotion_started", ("cluster", "seconds", "host", "port", "timeline", "position")),
    "cluster %s: promoted %s:%d in %.0f ms": ("promotion_done", ("cluster", "host", "port", "milliseconds")),
    "switchover: endpoints %s from cluster %s (%s:%d) to cluster %s (%s at %s:%d), within %.1fs": (
        "switchover_started", ("endpoints", "from_cluster", "from_host", "from_port", "to_cluster", "to_instance",
                               "to_host", "to_port", "timeout")),
    "switchover: endpoints %s now on cluster %s; writes held %.0f ms (ms after the hold began: %s)%s": (
        "switchover_done", ("endpoints", "cluster", "held_milliseconds", "steps", "detail")),
    "switchover called off; ms after the hold began: %s": ("switchover_called_off", ("steps",)),
    "switchover refused or called off: %s": ("switchover_refused", ("reason",)),
    # reloads and lifecycle of the process
    "reload: reading %s%s": ("reload_started", ("path", "detail")),
    "reload refused, the running configuration stays: %s": ("reload_refused", ("reason",)),
    "reload: serving %s": ("reload_done", ("listeners",)),
    "secrets reloaded (%d users)": ("secrets_reloaded", ("users",)),
    "shutting down: %d client connections, waiting up to %.1f s for their transactions": (
        "shutdown_started", ("clients", "grace_seconds")),
    "shutdown: %d clients were still in a transaction after %.1f s and were closed": (
        "shutdown_cut", ("clients", "grace_seconds")),
    # the admin console
    "client %s (user %r): admin console session %d": ("admin_console_login", ("client", "user", "session")),
    "admin console %s: %s [%s]": ("admin_console_error", ("admin", "reason", "sqlstate")),
    "admin console %s: %s [%d]": ("admin_console_error", ("admin", "reason", "errno")),
    "admin console %s: %s": ("admin_console_error", ("admin", "reason")),
    "admin console: %s: %s %s": ("admin_console_action", ("admin", "action", "target")),
    "admin console: %s: client %d killed": ("admin_console_kill", ("admin", "client_id")),
    "admin console: %s asked for a reload": ("admin_console_reload", ("admin",)),
}


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message, and for a named record its event and fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {"time": self.formatTime(record), "level": record.levelname.lower(),
                                 "logger": record.name, "message": record.getMessage()}
        named = EVENTS.get(record.msg) if isinstance(record.msg, str) else None
        if named is not None:
            event, fields = named
            entry["event"] = event
            args = record.args if isinstance(record.args, tuple) else ()
            entry.update({name: _plain(value) for name, value in zip(fields, args, strict=False)})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def _plain(value: object) -> object:
    return value if isinstance(value, str | int | float | bool) or value is None else str(value)


def setup_logging(level: str, fmt: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
