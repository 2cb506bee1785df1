"""Clusters and instances edited through the control API on a running proxy (two workers): a standby added to a
cluster is monitored and served by its read_only endpoint, removed again, and a cluster added and removed; edits
that cannot work are refused with the reason."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from devtools.servers import PostgresInstance
from replicated import cluster_config, connect_pg, monitor_secret, postgres_pair
from replicated import running_proxy as running_cluster_proxy
from support import API_TOKEN, Api, ProxyProcess


@pytest.fixture()
def pair(tmp_path: Path) -> Iterator[tuple[PostgresInstance, PostgresInstance]]:
    with postgres_pair(tmp_path) as found:
        yield found


@pytest.fixture()
def proxy(tmp_path: Path, pair: tuple[PostgresInstance, PostgresInstance],
          monkeypatch: pytest.MonkeyPatch) -> Iterator[ProxyProcess]:
    primary, standby = pair
    config = cluster_config(primary, standby, names=True, endpoints={"rw": "read_write", "ro": "read_only"},
                            monitor_interval=0.3, monitor_user=monitor_secret(monkeypatch, primary))
    config["postgresql.clusters.main"]["instances"] = config["postgresql.clusters.main"]["instances"][:1]
    config["server"]["workers"] = 2
    config["api"] = {"port": 0, "token": API_TOKEN}
    with running_cluster_proxy(tmp_path / "proxy", config) as process:
        yield process


def in_recovery(proxy: ProxyProcess) -> bool:
    with connect_pg(proxy, "ro", autocommit=True) as conn:
        row = conn.execute("SELECT pg_is_in_recovery()").fetchone()
        assert row is not None
        return bool(row[0])


def until(check: object, what: str, limit: float = 10.0) -> None:
    deadline = time.monotonic() + limit
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def test_an_instance_added_and_removed_through_the_api(proxy: ProxyProcess,
                                                       pair: tuple[PostgresInstance, PostgresInstance]) -> None:
    _, standby = pair
    api = Api(proxy)
    assert not in_recovery(proxy)  # only the primary: the read_only endpoint falls back to the writer
    added = api.post("/v1/clusters/main/instances", {"host": standby.host, "port": standby.port, "name": "two"},
                     expect=201)
    assert [instance["name"] for instance in added["instances"]] == ["one", "two"], added

    def reader_seen() -> bool:
        rows = {row["name"]: row for row in api.get("/v1/instances")}
        return rows.get("two", {}).get("role") == "reader" and bool(rows["two"].get("healthy"))

    until(reader_seen, "the added standby is monitored as a healthy reader")
    until(lambda: in_recovery(proxy), "the read_only endpoint serves the added standby")
    assert api.call("POST", "/v1/clusters/main/instances", {"host": standby.host, "port": standby.port,
                                                            "name": "two"})[0] == 409
    assert api.call("DELETE", "/v1/clusters/main/instances/nosuch")[0] == 404
    removed = api.call("DELETE", "/v1/clusters/main/instances/two")
    assert removed[0] == 200 and [i["name"] for i in removed[1]["instances"]] == ["one"], removed
    until(lambda: not in_recovery(proxy), "the read_only endpoint is back on the writer")
    assert api.call("DELETE", "/v1/clusters/main/instances/one")[0] == 409  # the last one stays
    monitoring = re.findall(r"reload: cluster main: monitoring (.*)", proxy.log())
    assert monitoring[-1] == "one" and "one, two" in monitoring, monitoring  # its monitor follows the edits


def test_a_cluster_added_changed_and_removed(proxy: ProxyProcess,
                                             pair: tuple[PostgresInstance, PostgresInstance]) -> None:
    _, standby = pair
    api = Api(proxy)
    assert api.call("POST", "/v1/clusters", {"name": "spare", "instances": []})[0] == 400
    added = api.post("/v1/clusters", {"name": "spare", "engine": "postgresql",
                                      "instances": [{"host": standby.host, "port": standby.port, "name": "s1"}]},
                     expect=201)
    assert added["name"] == "spare" and added["instances"][0]["name"] == "s1"
    changed = api.call("PATCH", "/v1/clusters/spare", {"monitor_interval": 0.5, "monitor_user": "postgres"})
    assert changed[0] == 200, changed
    until(lambda: any(row["name"] == "s1" and row["role"] == "reader" for row in api.get("/v1/instances")),
          "the changed cluster is monitored")
    assert api.call("DELETE", "/v1/clusters/main")[0] == 409  # endpoints use it
    assert api.call("DELETE", "/v1/clusters/spare")[0] == 200
    assert all(row["cluster"] != "spare" for row in api.get("/v1/instances"))
    assert connect_pg(proxy, "rw", autocommit=True).execute("SELECT 1").fetchone() == (1,)
