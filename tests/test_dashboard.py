"""The live dashboard in headless Chromium (Debian's chromium) against a proxy under pgbench load: it shows the
endpoint's instance and health, the pool, the top statements and the charts, and keeps updating."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path

import pytest

from devtools.servers import PostgresInstance
from support import API_TOKEN, Api, ProxyProcess, write_config

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DOCS = Path(__file__).resolve().parent.parent / "docs"
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium package is not installed")


class Tables(HTMLParser):
    """The text of every table cell, by table id, and the body's data-updates."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self.updates = 0
        self._table = ""
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = dict(attrs)
        if tag == "body":
            self.updates = int(found.get("data-updates") or 0)
        elif tag == "table":
            self._table = found.get("id") or ""
            self.tables[self._table] = []
        elif tag == "tr" and self._table:
            self.tables[self._table].append([])
        elif tag == "td":
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag == "td" and self._cell is not None and self._table:
            self.tables[self._table][-1].append("".join(self._cell))
            self._cell = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)


@pytest.fixture()
def proxy(tmp_path: Path, pg_bench_tables: PostgresInstance) -> Iterator[ProxyProcess]:
    sections = {
        "server": {"log_level": "info", "workers": 2},
        "secrets": {"file": "secrets.toml"},
        "api": {"port": 0, "token": API_TOKEN},
        "postgresql.pool": {"max_connections": 10},
        "postgresql.clusters.main": {"instances": [{"host": pg_bench_tables.host, "port": pg_bench_tables.port,
                                                    "name": "primary"}],
                                     "monitor_interval": 0.5, "monitor_user": "app"},
        "postgresql.endpoints.rw": {"port": 0, "cluster": "main"},
    }
    folder = tmp_path / "proxy"
    folder.mkdir()
    running = ProxyProcess(write_config(folder, sections), folder / "proxy.log")
    running.start(timeout=30)
    try:
        yield running
    finally:
        running.stop()


def chromium(url: str, *args: str) -> str:
    out = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",  # type: ignore[list-item]
                          "--virtual-time-budget=7000", *args, url], capture_output=True, text=True, timeout=90)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def test_the_dashboard_shows_the_proxy_under_load(proxy: ProxyProcess, tmp_path: Path) -> None:
    api = Api(proxy)
    status, page = api.call("GET", "/dashboard", token=None)
    assert status == 200 and "<title>dbproxy</title>" in page  # the page holds no data: no token needed
    assert api.call("GET", "/v1/dashboard", token=None)[0] == 401  # its data does
    bench = subprocess.Popen(["pgbench", "-n", "-S", "-c", "6", "-j", "2", "-T", "25", "-h", "127.0.0.1", "-p",
                              str(proxy.ports["rw"]), "-U", "app", "app"],
                             env=dict(os.environ, PGPASSWORD="app-secret"), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(6)  # a few samples of the series
        url = f"http://127.0.0.1:{proxy.ports['api']}/dashboard#token={API_TOKEN}"
        tables = Tables()
        tables.feed(chromium(url, "--dump-dom"))
        assert tables.updates >= 2, tables.updates  # it polled more than once
        endpoints = [row for row in tables.tables["endpoints"] if row]
        assert endpoints[0][:6] == ["postgresql", "rw", "main", "primary", "writer", "healthy"], endpoints
        pools = [row for row in tables.tables["pools"] if row and row[1] == "rw"]
        assert pools and all(int(row[4]) + int(row[5]) <= 20 for row in pools), pools  # borrowed + idle
        statements = [row[0] for row in tables.tables["top-sql"] if row]
        assert any(re.search(r"SELECT abalance FROM pgbench_accounts WHERE aid = \?", text) for text in statements)
        data = api.get("/v1/dashboard")
        assert len(data["series"]["clients"]) >= 2 and max(v for _, v in data["series"]["clients"]) >= 6
        assert max(v for _, v in data["series"]["queries_per_second"]) > 0
        shot = tmp_path / "dashboard.png"
        chromium(url, f"--screenshot={shot}", "--window-size=1280,1100", "--hide-scrollbars")
        assert shot.stat().st_size > 10_000
        if os.environ.get("DBPROXY_UPDATE_DOCS"):
            shutil.copy(shot, DOCS / "dashboard.png")
    finally:
        bench.terminate()
        bench.communicate(timeout=30)
