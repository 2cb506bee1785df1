"""Endpoints and clusters (and so instances) added, changed or removed through the control API: kept in memory over
the configuration file at every reload (a reload of the file does not undo them) until the process restarts; the
file itself is not rewritten."""

from __future__ import annotations

import copy
import logging
from typing import Any

from proxy.config import ENGINES, Config, engine_settings

log = logging.getLogger(__name__)

EndpointTable = dict[str, Any]  # an endpoint as the file would give it ([<engine>.endpoints.<name>])


class EditRefused(ValueError):
    """The edit names an engine or an endpoint that cannot be edited so (the message says why)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def endpoint_engine(config: Config, name: str) -> str | None:
    """The engine whose section has an endpoint called `name` (None: no such endpoint)."""
    return next((engine for engine, settings in engine_settings(config) if name in settings.endpoints), None)


class EndpointEdits:
    """(engine, endpoint name) -> the endpoint's whole table, or None for an endpoint removed."""

    def __init__(self, edits: dict[tuple[str, str], EndpointTable | None] | None = None,
                 clusters: dict[tuple[str, str], EndpointTable | None] | None = None) -> None:
        self.edits: dict[tuple[str, str], EndpointTable | None] = dict(edits or {})
        self.clusters: dict[tuple[str, str], EndpointTable | None] = dict(clusters or {})  # (engine, cluster)

    def __bool__(self) -> bool:
        return bool(self.edits or self.clusters)

    def apply(self, data: dict[str, Any]) -> None:
        """Change the file's data (before it is validated) by every edit."""
        for (engine, name), table in self.edits.items():
            section = data.setdefault(engine, {})
            endpoints = section.setdefault("endpoints", {}) if isinstance(section, dict) else None
            if not isinstance(endpoints, dict):
                continue  # the file's own error is reported by the validation
            if table is None:
                endpoints.pop(name, None)
            else:
                endpoints[name] = copy.deepcopy(table)
        for (engine, name), table in self.clusters.items():
            section = data.setdefault(engine, {})
            clusters = section.setdefault("clusters", {}) if isinstance(section, dict) else None
            if not isinstance(clusters, dict):
                continue
            if table is None:
                clusters.pop(name, None)
            else:
                clusters[name] = copy.deepcopy(table)

    def add(self, config: Config, engine: str, name: str, table: EndpointTable) -> EndpointEdits:
        """These edits and a new endpoint (EditRefused if the name is taken or the engine unknown)."""
        if engine not in ENGINES:
            raise EditRefused(f"engine must be one of {', '.join(ENGINES)}")
        if endpoint_engine(config, name) is not None:
            raise EditRefused(f"an endpoint {name!r} exists already", 409)
        return self._with(engine, name, table)

    def change(self, config: Config, name: str, changes: EndpointTable) -> EndpointEdits:
        """These edits and the endpoint `name` with the keys of `changes` replaced (a key set to null goes back to
        its default)."""
        engine = endpoint_engine(config, name)
        if engine is None:
            raise EditRefused(f"no endpoint {name!r}", 404)
        settings = dict(engine_settings(config))[engine]
        table = settings.endpoints[name].model_dump(mode="json", exclude_unset=True)
        _replace_keys(table, changes)
        return self._with(engine, name, table)

    def remove(self, config: Config, name: str) -> EndpointEdits:
        engine = endpoint_engine(config, name)
        if engine is None:
            raise EditRefused(f"no endpoint {name!r}", 404)
        return self._with(engine, name, None)

    def _with(self, engine: str, name: str, table: EndpointTable | None) -> EndpointEdits:
        return EndpointEdits({**self.edits, (engine, name): table}, self.clusters)

    # --- clusters and their instances ---

    def add_cluster(self, config: Config, engine: str, name: str, table: EndpointTable) -> EndpointEdits:
        if engine not in ENGINES:
            raise EditRefused(f"engine must be one of {', '.join(ENGINES)}")
        if cluster_engine(config, name) is not None:
            raise EditRefused(f"a cluster {name!r} exists already", 409)
        return self._with_cluster(engine, name, table)

    def change_cluster(self, config: Config, name: str, changes: EndpointTable) -> EndpointEdits:
        """The cluster `name` with the keys of `changes` replaced (null: back to the default)."""
        engine, table = self._cluster_table(config, name)
        _replace_keys(table, changes)
        return self._with_cluster(engine, name, table)

    def remove_cluster(self, config: Config, name: str) -> EndpointEdits:
        engine, _ = self._cluster_table(config, name)
        users = [endpoint for endpoint, settings in dict(engine_settings(config))[engine].endpoints.items()
                 if settings.cluster == name]
        if users:
            raise EditRefused(f"cluster {name!r} is used by endpoints {', '.join(sorted(users))}: remove or move "
                              "them first", 409)
        return self._with_cluster(engine, name, None)

    def add_instance(self, config: Config, cluster: str, instance: EndpointTable) -> EndpointEdits:
        engine, table = self._cluster_table(config, cluster)
        label = _label(instance)
        if any(_label(found) == label for found in table["instances"]):
            raise EditRefused(f"cluster {cluster!r} has an instance {label!r} already", 409)
        table["instances"] = [*table["instances"], instance]
        return self._with_cluster(engine, cluster, table)

    def change_instance(self, config: Config, cluster: str, label: str, changes: EndpointTable) -> EndpointEdits:
        engine, table = self._cluster_table(config, cluster)
        index = _instance_index(table, cluster, label)
        entry = dict(table["instances"][index])
        _replace_keys(entry, changes)
        table["instances"] = [*table["instances"][:index], entry, *table["instances"][index + 1:]]
        return self._with_cluster(engine, cluster, table)

    def remove_instance(self, config: Config, cluster: str, label: str) -> EndpointEdits:
        engine, table = self._cluster_table(config, cluster)
        index = _instance_index(table, cluster, label)
        if len(table["instances"]) == 1:
            raise EditRefused(f"instance {label!r} is the last of cluster {cluster!r}: remove the cluster instead",
                              409)
        table["instances"] = [*table["instances"][:index], *table["instances"][index + 1:]]
        return self._with_cluster(engine, cluster, table)

    def _cluster_table(self, config: Config, name: str) -> tuple[str, EndpointTable]:
        engine = cluster_engine(config, name)
        if engine is None:
            raise EditRefused(f"no cluster {name!r}", 404)
        cluster = dict(engine_settings(config))[engine].clusters[name]
        table = cluster.model_dump(mode="json", exclude_unset=True)
        table["instances"] = [instance.model_dump(mode="json", exclude_unset=True) for instance in cluster.instances]
        return engine, table

    def _with_cluster(self, engine: str, name: str, table: EndpointTable | None) -> EndpointEdits:
        return EndpointEdits(self.edits, {**self.clusters, (engine, name): table})


def cluster_engine(config: Config, name: str) -> str | None:
    """The engine whose section has a cluster called `name` (None: no such cluster)."""
    return next((engine for engine, settings in engine_settings(config) if name in settings.clusters), None)


def _replace_keys(table: EndpointTable, changes: EndpointTable) -> None:
    """The keys of `changes` replace the table's; a key set to None goes (back to its default)."""
    for key, value in changes.items():
        if value is None:
            table.pop(key, None)
        else:
            table[key] = value


def _label(instance: EndpointTable) -> str:
    return str(instance.get("name") or f"{instance.get('host')}:{instance.get('port')}")


def _instance_index(table: EndpointTable, cluster: str, label: str) -> int:
    for index, found in enumerate(table["instances"]):
        if _label(found) == label:
            return index
    raise EditRefused(f"cluster {cluster!r} has no instance {label!r}", 404)
