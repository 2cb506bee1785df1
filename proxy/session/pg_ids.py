"""The process ids in the BackendKeyData the proxy hands PostgreSQL clients: which worker (and, in a fleet, which
proxy) owns the client, so a CancelRequest reaching any of them finds the owner.

Every id is above 2**22 (Linux's highest pid), so never equal to a server's pid in a NotificationResponse. The
single proxy's layout: (worker << 24) + 2**22 + a per-worker counter (1 .. 2**22 - 1). The fleet's ([fleet] port
set): bit 30, the proxy id (7 bits, from bit 23), the worker (6 bits, from bit 17), a counter (1 .. 2**17 - 1).
Counters wrap, skipping ids still held by a connected client.
"""

from __future__ import annotations

import itertools
from collections.abc import Container

from proxy.errors import TooManyClients

LOCAL_WORKER_SHIFT = 24
LOCAL_BASE = 1 << 22
LOCAL_COUNTER_MASK = (1 << 22) - 1
FLEET_BASE = 1 << 30
FLEET_PROXY_SHIFT = 23
FLEET_WORKER_SHIFT = 17
FLEET_COUNTER_MASK = (1 << FLEET_WORKER_SHIFT) - 1


def make_process_id(worker: int, serial: int, fleet_proxy: int | None = None) -> int:
    """The process id of a worker's `serial`-th client; with `fleet_proxy`, in the fleet's layout."""
    if fleet_proxy is not None:
        return (FLEET_BASE + (fleet_proxy << FLEET_PROXY_SHIFT) + (worker << FLEET_WORKER_SHIFT)
                + ((serial - 1) % FLEET_COUNTER_MASK) + 1)
    return (worker << LOCAL_WORKER_SHIFT) + LOCAL_BASE + ((serial - 1) % LOCAL_COUNTER_MASK) + 1


def next_process_id(worker: int, counter: itertools.count[int], in_use: Container[int],
                    fleet_proxy: int | None = None) -> int:
    """A new process id for a client of `worker`, not held by a connected client."""
    for _ in range(FLEET_COUNTER_MASK if fleet_proxy is not None else LOCAL_COUNTER_MASK):
        candidate = make_process_id(worker, next(counter), fleet_proxy)
        if candidate not in in_use:
            return candidate
    raise TooManyClients("too many clients in this worker process: every client id is taken")


def worker_of(process_id: int) -> int:
    if process_id & FLEET_BASE:
        return (process_id >> FLEET_WORKER_SHIFT) & 0x3F
    return (process_id >> LOCAL_WORKER_SHIFT) & 0x3F


def fleet_proxy_of(process_id: int) -> int | None:
    """The fleet proxy a process id names (None: an id of the single-proxy layout)."""
    if process_id & FLEET_BASE:
        return (process_id >> FLEET_PROXY_SHIFT) & 0x7F
    return None
