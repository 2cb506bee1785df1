"""The Grafana dashboard in deploy/grafana: valid JSON whose every query names a metric family the proxy really
serves (scraped from a running proxy with a monitored cluster), with the labels it groups by."""

from __future__ import annotations

import json
import re
from pathlib import Path

import psycopg
from prometheus_client.parser import text_string_to_metric_families

from devtools.servers import PostgresInstance
from support import ProxyProcess, scrape, write_config

DASHBOARD = Path(__file__).resolve().parent.parent / "deploy" / "grafana" / "dbproxy.json"
SUFFIXES = ("_bucket", "_count", "_sum", "_total")


def _family(name: str) -> str:
    for suffix in SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def test_every_panel_queries_metrics_the_proxy_serves(tmp_path: Path, pg_server: PostgresInstance) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    expressions = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    assert len(dashboard["panels"]) >= 10 and expressions
    sections = {
        "server": {"workers": 1, "metrics_port": 0},
        "secrets": {"file": "secrets.toml"},
        "postgresql.clusters.main": {"instances": [{"host": pg_server.host, "port": pg_server.port, "name": "one"}],
                                     "monitor_interval": 0.5, "monitor_user": "app"},
        "postgresql.endpoints.rw": {"port": 0, "cluster": "main"},
    }
    folder = tmp_path / "proxy"
    folder.mkdir()
    proxy = ProxyProcess(write_config(folder, sections), folder / "proxy.log")
    proxy.start()
    try:
        proxy.wait_for_log("instance .* is now writer")
        with psycopg.connect(host="127.0.0.1", port=proxy.ports["rw"], user="app", password="app-secret",
                             dbname="app") as conn:
            conn.execute("SELECT 1")
        families = {family.name: family for family in text_string_to_metric_families(scrape(proxy))}
    finally:
        proxy.stop()
    for expression in expressions:
        for name in re.findall(r"\b(dbproxy_[a-z_]+)", expression):
            family = families.get(_family(name))
            assert family is not None, f"{name} (in {expression!r}) is not a metric the proxy serves"
            grouped = re.findall(r"by \(([^)]*)\)", expression)
            labels = {label for sample in family.samples for label in sample.labels}
            for group in grouped:
                for label in (part.strip() for part in group.split(",")):
                    assert label == "le" or not family.samples or label in labels, (label, name, sorted(labels))
