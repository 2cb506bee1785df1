"""JSON log lines with stable event names: every named template is still in the source, and a real proxy's log
of logins, a refused login, a pinned session, a reload and a shutdown is one JSON object per line with them."""

from __future__ import annotations

import ast
import json
import signal
from pathlib import Path

import psycopg
import pytest

from devtools.servers import PostgresInstance
from proxy.logs import EVENTS
from support import running_proxy

SOURCE = Path(__file__).resolve().parent.parent / "proxy"


def test_every_named_template_is_written_in_the_source() -> None:
    strings: set[str] = set()
    for path in SOURCE.rglob("*.py"):
        if path.name == "logs.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                strings.add(node.value)
    missing = [template for template in EVENTS if template not in strings]
    assert not missing, f"log templates named in proxy/logs.py but written nowhere: {missing}"


def test_a_proxy_logs_json_lines_with_event_names(tmp_path: Path, pg_server: PostgresInstance) -> None:
    with running_proxy(tmp_path / "proxy", pg_server,
                       server={"log_format": "json", "log_level": "debug", "shutdown_grace": 1.0}) as proxy:
        dsn = f"host=127.0.0.1 port={proxy.ports['postgresql']} user=app dbname=app"
        with psycopg.connect(dsn + " password=app-secret sslmode=require", autocommit=True) as conn:
            conn.execute("SELECT pg_advisory_lock(77)")
            conn.execute("SELECT pg_advisory_unlock(77)")
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(dsn + " password=not-the-password sslmode=disable").close()
        assert proxy.process is not None
        proxy.process.send_signal(signal.SIGHUP)
        proxy.wait_for_log("reload: serving")
        proxy.process.send_signal(signal.SIGTERM)
        proxy.process.wait(20)
        text = proxy.log()
    entries = [json.loads(line) for line in text.splitlines() if line.strip()]  # every line is JSON
    events = {entry.get("event") for entry in entries}
    for wanted in ("client_connected", "client_logged_in", "session_pinned", "client_closed", "client_refused",
                   "reload_started", "reload_done", "shutdown_started"):
        assert wanted in events, (wanted, sorted(e for e in events if e))
    login = next(entry for entry in entries if entry.get("event") == "client_logged_in")
    assert login["user"] == "app" and login["database"] == "app" and login["tls"] is True, login
    pinned = next(entry for entry in entries if entry.get("event") == "session_pinned")
    assert "advisory" in pinned["reason"], pinned
    refused = next(entry for entry in entries if entry.get("event") == "client_refused")
    assert refused["sqlstate"] == "28P01" and refused["user"] == "app", refused
    assert "not-the-password" not in text and "app-secret" not in text
