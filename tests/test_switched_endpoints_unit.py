"""What a switchover changes in the running configuration, and what a reload keeps of it (pure functions)."""

from __future__ import annotations

from typing import Any

import pytest

from proxy.commands import plan_switchover
from proxy.config import Config, parse_config
from proxy.endpoints import resolve_endpoints
from proxy.local_commands import SwitchedEndpoints, instance_addresses, switched_config
from proxy.topology.switchover import SwitchoverError


def _config(rw_cluster: str = "blue", extra: dict[str, Any] | None = None) -> Config:
    return parse_config({"postgresql": {
        "clusters": {"blue": {"instances": [{"name": "b1", "host": "10.0.0.1", "port": 5432}]},
                     "green": {"instances": [{"host": "10.0.0.2", "port": 5432, "role": "reader"},
                                             {"name": "g1", "host": "10.0.0.3", "port": 5432, "role": "writer"}]},
                     "red": {"instances": [{"host": "10.0.0.4", "port": 5432}]}},
        "endpoints": {"rw": {"port": 7001, "cluster": rw_cluster, "role": "read_write"},
                      "ro": {"port": 7002, "cluster": "blue", "role": "read_only"}, **(extra or {})},
    }})


def test_switched_config_points_the_endpoint_at_the_new_clusters_writer() -> None:
    moved = {e.name: e for e in resolve_endpoints(switched_config(_config(), "postgresql", ["rw"], "green"))}
    assert (moved["rw"].cluster, moved["rw"].instance, moved["rw"].address) == ("green", "g1", ("10.0.0.3", 5432))
    assert moved["ro"].cluster == "blue"


def test_a_reload_keeps_the_switch_until_the_file_names_another_cluster() -> None:
    switched = SwitchedEndpoints()
    switched.record("postgresql", ["rw"], "blue", "green")
    kept = switched.keep(_config("blue"))  # the file was not changed
    assert kept.postgresql.endpoints["rw"].cluster == "green"
    assert switched.keep(_config("green")).postgresql.endpoints["rw"].cluster == "green"  # changed to match
    assert not switched.moves
    assert switched.keep(_config("blue")).postgresql.endpoints["rw"].cluster == "blue"  # the file rules again


def test_plan_and_instance_names() -> None:
    plan = plan_switchover(_config(), "green", None)
    assert (plan.engine, plan.endpoints, plan.blue_name, plan.green_name) == ("postgresql", ["rw"], "blue", "green")
    with pytest.raises(SwitchoverError, match="is read_only"):
        plan_switchover(_config(), "green", "ro")
    with pytest.raises(SwitchoverError, match="no cluster 'purple'"):
        plan_switchover(_config(), "purple", None)
    two = _config(extra={"rw2": {"port": 7003, "cluster": "red", "role": "read_write"}})
    with pytest.raises(SwitchoverError, match=r"several clusters \(blue, red\): name one"):
        plan_switchover(two, "green", None)
    assert plan_switchover(two, "green", "rw2").blue_name == "red"
    with pytest.raises(SwitchoverError, match="already on cluster 'green'"):
        plan_switchover(switched_config(two, "postgresql", ["rw2"], "green"), "green", "rw2")
    assert instance_addresses(_config(), "g1") == [("postgresql", "green", ("10.0.0.3", 5432))]
    assert instance_addresses(_config(), "10.0.0.1:5432") == [("postgresql", "blue", ("10.0.0.1", 5432))]
    assert instance_addresses(_config(), "nobody") == []
