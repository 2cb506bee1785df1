"""Test helpers: run the proxy as a real subprocess against a throwaway database, and small client utilities."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psutil
from prometheus_client.parser import text_string_to_metric_families

from devtools.servers import MariaDBInstance, PostgresInstance, free_port
from leakcheck import record_output

SECRETS = {"app": "app-secret", "bench": "bench-secret"}


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{key} = {_toml_value(item)}" for key, item in value.items()) + " }"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_config(folder: Path, sections: dict[str, dict[str, Any]]) -> Path:
    """Write a TOML config (sections may be dotted, e.g. 'postgresql.pool') and a secrets file beside it. The
    failed-login throttle is off unless [auth] sets failed_login_limit: many tests fail logins from 127.0.0.1 on
    purpose, then log in from there."""
    sections = {**sections, "auth": {"failed_login_limit": 0, **sections.get("auth", {})}}
    (folder / "secrets.toml").write_text(
        "[users]\n" + "".join(f"{user} = {_toml_value(pw)}\n" for user, pw in SECRETS.items())
    )
    lines: list[str] = []
    for name, values in sections.items():
        lines.append(f"[{name}]")
        lines.extend(f"{key} = {_toml_value(value)}" for key, value in values.items())
        lines.append("")
    path = folder / "proxy.toml"
    path.write_text("\n".join(lines))
    return path


class ProxyProcess:
    """`python -m proxy run -c CONFIG` in a subprocess, with its log captured to a file."""

    def __init__(self, config: Path, log: Path) -> None:
        self.config = config
        self.log_path = log
        self.process: subprocess.Popen[str] | None = None
        self.ports: dict[str, int] = {}

    def start(self, timeout: float = 20.0) -> None:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "proxy", "run", "-c", str(self.config)],
            stdout=subprocess.PIPE, stderr=self.log_path.open("w"), text=True, env=env,
        )
        assert self.process.stdout is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.process.stdout.readline()
            if not line:
                break
            if line.startswith("dbproxy ready:"):
                self.ports = {k: int(v) for k, v in re.findall(r"(\w+) port (\d+)", line)}
                return
        self.stop()
        raise RuntimeError(f"proxy did not start:\n{self.log()}")

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def rss(self) -> int:
        return int(psutil.Process(self.pid).memory_info().rss)

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def wait_for_log(self, pattern: str, timeout: float = 10.0) -> str:
        """Wait until a log line matches `pattern` (regex); returns the line."""
        deadline = time.monotonic() + timeout
        regex = re.compile(pattern)
        while time.monotonic() < deadline:
            for line in self.log().splitlines():
                if regex.search(line):
                    return line
            time.sleep(0.05)
        raise AssertionError(f"no log line matches {pattern!r}:\n{self.log()[-3000:]}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None


@contextmanager
def running_proxy(folder: Path, pg: PostgresInstance | None = None, mariadb: MariaDBInstance | None = None,
                  **overrides: dict[str, Any]) -> Iterator[ProxyProcess]:
    """A proxy in front of `pg` and/or `mariadb` on free ports; `overrides` are extra keys per section."""
    sections: dict[str, dict[str, Any]] = {
        "server": {"log_level": "info", "client_login_timeout": 3.0, "workers": 1},
        "secrets": {"file": "secrets.toml"},
        "postgresql": {"port": free_port(), "backend_port": pg.port} if pg is not None else {"enabled": False},
        "postgresql.pool": {"max_connections": 10, "connection_borrow_timeout": 30.0},
        "mysql": ({"enabled": True, "port": free_port(), "backend_port": mariadb.port} if mariadb is not None
                  else {"enabled": False}),
        "mysql.pool": {"max_connections": 10, "connection_borrow_timeout": 30.0},
    }
    for name, values in overrides.items():
        sections.setdefault(name.replace("__", "."), {}).update(values)
    folder.mkdir(parents=True, exist_ok=True)
    proxy = ProxyProcess(write_config(folder, sections), folder / "proxy.log")
    proxy.start()
    try:
        yield proxy
    finally:
        proxy.stop()


API_TOKEN = "api-token-7f3c9a1e5b"  # the [api] token of the tests


class Api:
    """Calls to the proxy's API port (and its health port)."""

    def __init__(self, proxy: ProxyProcess) -> None:
        self.proxy = proxy
        self.base = f"http://127.0.0.1:{proxy.ports['api']}"

    def call(self, method: str, path: str, body: Any = None, token: str | None = API_TOKEN,
             raw: bytes | None = None, port: str = "api") -> tuple[int, Any]:
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        headers = {"Content-Type": "application/json"}
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        url = f"http://127.0.0.1:{self.proxy.ports[port]}{path}"
        request = urllib.request.Request(url, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                status, text = response.status, response.read().decode()
        except urllib.error.HTTPError as exc:
            status, text = exc.code, exc.read().decode()
        record_output(f"{method} {path}", text)
        try:
            return status, json.loads(text)
        except ValueError:
            return status, text

    def get(self, path: str) -> Any:
        status, answer = self.call("GET", path)
        assert status == 200, answer
        return answer

    def post(self, path: str, body: Any = None, expect: int = 200) -> Any:
        status, answer = self.call("POST", path, body)
        assert status == expect, answer
        return answer

    def endpoint(self, name: str) -> dict[str, Any]:
        return next(row for row in self.get("/v1/endpoints") if row["name"] == name)


def backend_connections(pg: PostgresInstance, user: str = "app") -> int:
    """Client backends of `user` on the server right now (from pg_stat_activity)."""
    out = pg.psql(f"SELECT count(*) FROM pg_stat_activity WHERE usename = '{user}' AND backend_type = 'client backend'")
    return int(out.strip())


def mysql_backend_connections(mariadb: MariaDBInstance, user: str = "app") -> int:
    """Connections of `user` on the MariaDB server right now (from the processlist)."""
    return int(mariadb.sql(f"SELECT count(*) FROM information_schema.processlist WHERE user = '{user}'"))


def scrape(proxy: ProxyProcess) -> str:
    """The proxy's /metrics page."""
    page = str(urllib.request.urlopen(f"http://127.0.0.1:{proxy.ports['metrics']}/metrics").read().decode())
    record_output("/metrics", page)
    return page


def metric_value(text: str, name: str, **labels: str) -> float:
    """The sum of the samples called `name` whose labels include `labels` (0 when there is none)."""
    return sum(sample.value for family in text_string_to_metric_families(text) for sample in family.samples
               if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()))
