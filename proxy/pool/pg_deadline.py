"""Deadlines on the proxy's own waits on a PostgreSQL backend, and the CancelRequest sent when one passes."""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable, Coroutine
from typing import Any, Concatenate, ParamSpec, Protocol, TypeVar

from proxy.errors import BackendUnavailable
from proxy.pool.pool import Pool
from proxy.protocol.pg import messages as pg

log = logging.getLogger(__name__)



class Cancellable(Protocol):
    """A backend connection as far as its deadlines and cancel requests need it."""

    @property
    def pool(self) -> Pool: ...
    @property
    def host(self) -> str: ...
    @property
    def port(self) -> int: ...
    @property
    def process_id(self) -> int: ...
    @property
    def secret_key(self) -> int: ...
    @property
    def closed(self) -> bool: ...
    def abort(self) -> None: ...


P = ParamSpec("P")
R = TypeVar("R")
B = TypeVar("B", bound=Cancellable)
CANCEL_TIMEOUT = 5.0  # seconds for the whole CancelRequest exchange
_background: set[asyncio.Task[None]] = set()  # cancel requests in flight (a task needs a reference)


async def send_cancel_request(host: str, port: int, process_id: int, secret_key: int,
                              timeout: float = CANCEL_TIMEOUT) -> None:
    """Ask the server at host:port to cancel what backend `process_id` runs; every step has a deadline."""
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(pg.cancel_request(process_id, secret_key))
            await writer.drain()
            await reader.read()  # the server closes the connection once it has read the request
            writer.close()
    except (OSError, TimeoutError) as exc:
        log.warning("cancel for backend pid %d: cannot reach the database: %s", process_id, exc or "timed out")


def cancel_in_background(backend: Cancellable) -> None:
    """Send a CancelRequest for `backend` without waiting for it."""
    task = asyncio.get_running_loop().create_task(  # to the server it was opened to (see Target.repoint)
        send_cancel_request(backend.host, backend.port, backend.process_id, backend.secret_key)
    )
    _background.add(task)
    task.add_done_callback(_background.discard)


def internal_deadline(
    method: Callable[Concatenate[B, P], Coroutine[Any, Any, R]],
) -> Callable[Concatenate[B, P], Coroutine[Any, Any, R]]:
    """Bound a backend coroutine by the pool's internal_query_timeout: past it the backend is closed
    (and what it runs cancelled), and BackendUnavailable is raised, so its slot comes free."""

    @functools.wraps(method)
    async def bounded(backend: B, *args: P.args, **kwargs: P.kwargs) -> R:
        timeout = backend.pool.settings.internal_query_timeout
        try:
            async with asyncio.timeout(timeout):
                return await method(backend, *args, **kwargs)
        except TimeoutError:
            expire(backend, timeout)
            raise BackendUnavailable(f"the database did not answer within {timeout:g} s") from None

    return bounded


def expire(backend: Cancellable, timeout: float) -> None:
    """A wait on `backend` passed its deadline: close it for good and cancel whatever it still runs."""
    log.warning("backend %s did not answer within %g s; closing it", backend, timeout)
    if not backend.closed:
        cancel_in_background(backend)
        backend.abort()
