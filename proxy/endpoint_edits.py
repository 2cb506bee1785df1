"""Endpoints added, changed or removed through the control API: kept in memory over the configuration file at every
reload (a reload of the file does not undo them) until the process restarts; the file itself is not rewritten."""

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

    def __init__(self, edits: dict[tuple[str, str], EndpointTable | None] | None = None) -> None:
        self.edits: dict[tuple[str, str], EndpointTable | None] = dict(edits or {})

    def __bool__(self) -> bool:
        return bool(self.edits)

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
        for key, value in changes.items():
            if value is None:
                table.pop(key, None)
            else:
                table[key] = value
        return self._with(engine, name, table)

    def remove(self, config: Config, name: str) -> EndpointEdits:
        engine = endpoint_engine(config, name)
        if engine is None:
            raise EditRefused(f"no endpoint {name!r}", 404)
        return self._with(engine, name, None)

    def _with(self, engine: str, name: str, table: EndpointTable | None) -> EndpointEdits:
        return EndpointEdits({**self.edits, (engine, name): table})
