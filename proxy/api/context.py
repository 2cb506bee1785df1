"""What the control API needs of the running proxy, whether it is one process or a supervisor of workers."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from proxy import channel
from proxy.commands import Commands, Fanout
from proxy.config import Config
from proxy.endpoint_edits import EndpointEdits
from proxy.stats import Snapshot

# Reload the configuration file with these endpoint edits over it (None: the edits kept so far); answers
# {"ok": True, "message", "ports"} or {"error", "message"}. Edits that reloaded are kept by the proxy.
Reload = Callable[[EndpointEdits | None], Awaitable[channel.Message]]


@dataclass
class ApiContext:
    """`config` is the running configuration; `fanout` asks every worker (or the process itself); `stats` is the
    merged snapshot of every worker; `edits` the endpoint edits kept so far."""

    config: Callable[[], Config]
    commands: Commands
    fanout: Fanout
    stats: Callable[[], Awaitable[Snapshot]]
    reload: Reload
    edits: Callable[[], EndpointEdits]
    workers: int = 1
    ports: dict[str, int] = field(default_factory=dict)  # the API's own ports once listening ("api", "health")
