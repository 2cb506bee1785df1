"""Parameter group configuration: names and references are checked at load, with the key that is wrong."""

from __future__ import annotations

from typing import Any

import pytest

from proxy.config import ConfigError, parse_config
from proxy.endpoints import resolve_endpoints
from proxy.parameter_groups import dynamic_of, group_of, rebased, static_of, text


def _postgres(**extra: Any) -> dict[str, Any]:
    return {"postgresql": {"parameter_groups": {"app": {"parameters": {"work_mem": "8MB"}}}, **extra}}


@pytest.mark.parametrize(("data", "problem"), [
    ({"postgresql": {"parameter_groups": {"g": {"parameters": {"work mem": "1"}}}}}, "is not a parameter name"),
    ({"postgresql": {"parameter_groups": {"g": {"parameters": {"x;drop": "1"}}}}}, "is not a parameter name"),
    ({"postgresql": {"parameter_groups": {"g": {"static_parameters": {"a": "x\x00"}}}}}, "NUL"),
    ({"postgresql": {"parameter_groups": {"g": {"parameters": {"work_mem": "1"},
                                                "static_parameters": {"WORK_MEM": "2"}}}}}, "both dynamic and static"),
    ({"postgresql": {"parameter_group": "nope"}}, "'postgresql.parameter_group': no parameter group 'nope'"),
    ({"postgresql": {"parameter_groups": {"a": {"users": ["u"]}, "b": {"users": ["u"]}}}}, "user 'u' is in group"),
    ({"mysql": {"parameter_groups": {"a": {"static_parameters": {"x": 1}}}}}, "MySQL takes no parameters at connect"),
    ({"postgresql": {"parameter_groups": {"g": {"static_apply": "later"}}}}, "static_apply"),
])
def test_bad_parameter_groups_are_refused(data: dict[str, Any], problem: str) -> None:
    with pytest.raises(ConfigError, match=problem):
        parse_config(data)


def test_precedence_user_endpoint_cluster_engine() -> None:
    config = parse_config({"postgresql": {
        "parameter_group": "engine",
        "parameter_groups": {"engine": {"parameters": {"work_mem": "1MB"}},
                             "cluster": {"parameters": {"work_mem": "2MB"}},
                             "endpoint": {"parameters": {"work_mem": "3MB", "TimeZone": "UTC"}},
                             "user": {"users": ["special"], "parameters": {"work_mem": "4MB"},
                                      "static_parameters": {"jit": False}}},
        "clusters": {"main": {"instances": [{"host": "127.0.0.1", "port": 5432}], "parameter_group": "cluster"},
                     "other": {"instances": [{"host": "127.0.0.1", "port": 5433}]}},
        "endpoints": {"rw": {"port": 0, "cluster": "main", "parameter_group": "endpoint"},
                      "ro": {"port": 0, "cluster": "main", "role": "read_only"},
                      "plain": {"port": 0, "cluster": "other"}},
    }})
    settings = {endpoint.name: endpoint.settings for endpoint in resolve_endpoints(config)}
    assert group_of(settings["rw"], "app") is not None and group_of(settings["rw"], "app")[0] == "endpoint"  # type: ignore[index]
    assert dynamic_of(settings["rw"], "app", {"TimeZone": "Etc/UTC"}) == {"work_mem": "3MB", "TimeZone": "UTC"}
    assert dynamic_of(settings["ro"], "app", {}) == {"work_mem": "2MB"}
    assert dynamic_of(settings["plain"], "app", {}) == {"work_mem": "1MB"}
    assert dynamic_of(settings["rw"], "special", {}) == {"work_mem": "4MB"}
    assert static_of(settings["plain"], "special") == {"jit": "off"} and text(True) == "on"


def test_rebased_keeps_the_clients_own_values() -> None:
    wanted = {"TimeZone": "UTC", "work_mem": "5MB", "statement_timeout": "7000", "DateStyle": "ISO"}
    rebased(wanted, {"work_mem": "3072", "statement_timeout": "7000"}, {"work_mem": "9216", "TimeZone": "Asia/Tokyo"},
            {"TimeZone": "UTC", "DateStyle": "ISO"})
    assert wanted == {"TimeZone": "Asia/Tokyo", "work_mem": "5MB", "DateStyle": "ISO"}
