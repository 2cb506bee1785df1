"""Parameter groups: the session parameters a user's backend sessions get by default, by name and kind."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TypeVar

from proxy.config import EngineSettings, ParameterGroup, ParameterValue

V = TypeVar("V")  # how an engine keeps a setting's value (PostgreSQL text, MySQL a SET body)


def group_of(settings: EngineSettings, user: str) -> tuple[str, ParameterGroup] | None:
    """The group of `user` on an endpoint with these (resolved) settings: the one listing the user, else the
    endpoint's (its own, its cluster's, else the engine section's)."""
    groups = settings.parameter_groups
    for name, group in groups.items():
        if user in group.users:
            return name, group
    name = settings.parameter_group
    if name and name in groups:
        return name, groups[name]
    return None


def text(value: ParameterValue) -> str:
    """A configured value as the server is given it (true/false as on/off)."""
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)


def spelled(name: str, reported: Mapping[str, str]) -> str:
    """A PostgreSQL parameter's name as the server spells it: a reported one's own spelling (TimeZone), else lower
    case (names are case-insensitive, pg_settings shows them so)."""
    lower = name.lower()
    return next((key for key in reported if key.lower() == lower), lower)


def dynamic_of(settings: EngineSettings, user: str, reported: Mapping[str, str]) -> dict[str, str]:
    """The dynamic parameters `user`'s sessions get by default, spelled as the server spells them."""
    found = group_of(settings, user)
    if found is None:
        return {}
    return {spelled(name, reported): text(value) for name, value in found[1].parameters.items()}


def static_of(settings: EngineSettings, user: str) -> dict[str, str]:
    """The static parameters `user`'s backend connections are opened with."""
    found = group_of(settings, user)
    if found is None:
        return {}
    return {name.lower(): text(value) for name, value in found[1].static_parameters.items()}


def rebased(wanted: dict[str, V], old: Mapping[str, V], new: Mapping[str, V], reported: Mapping[str, V]) -> None:
    """A client's settings `wanted` after its group's defaults went from `old` to `new`: each setting the client
    left at the default (the old group's value, else the server's) takes the new default; its own values stay."""
    for name in old.keys() | new.keys():
        if wanted.get(name) != old.get(name, reported.get(name)):
            continue  # the client's own value
        if name in new:
            wanted[name] = new[name]
        elif name in reported:
            wanted[name] = reported[name]
        else:
            wanted.pop(name, None)


def groups_changed(old: EngineSettings, new: EngineSettings) -> bool:
    """Whether a reload from `old` to `new` changes any user's parameter group or its values."""
    return (old.parameter_group, old.parameter_groups) != (new.parameter_group, new.parameter_groups)
