"""Auth passthrough, engine-neutral part: the verifier cache, the credentials kept for backend logins, the lookup."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from proxy.errors import BackendUnavailable

log = logging.getLogger(__name__)

T = TypeVar("T")
Address = tuple[str, int]

CACHE_LIMIT = 10_000  # users whose verifier (or backend credential) one endpoint keeps, oldest dropped first


@dataclass(frozen=True)
class LookupSettings:
    """What one lookup needs of the endpoint's settings: who asks, what, where, within how long."""

    auth_user: str
    auth_query: str
    cache_ttl: float
    timeout: float
    address: Address


class VerifierCache(Generic[T]):
    """Found verifiers by user, each kept `ttl` seconds; refused users are never put here."""

    def __init__(self) -> None:
        self._entries: OrderedDict[str, tuple[float, T]] = OrderedDict()

    def get(self, user: str) -> T | None:
        entry = self._entries.get(user)
        if entry is None:
            return None
        if entry[0] <= time.monotonic():
            del self._entries[user]
            return None
        return entry[1]

    def put(self, user: str, verifier: T, ttl: float) -> None:
        if ttl <= 0:
            return
        self._entries[user] = (time.monotonic() + ttl, verifier)
        self._entries.move_to_end(user)
        while len(self._entries) > CACHE_LIMIT:
            self._entries.popitem(last=False)

    def forget(self, user: str) -> None:
        self._entries.pop(user, None)

    def __repr__(self) -> str:
        return f"VerifierCache(users={len(self._entries)})"


class BackendCredentials(Generic[T]):
    """What client logins left for backend logins of users without a stored secret: per user, a few credentials
    by the verifier they were recovered for (a SCRAM salt, a stored hash), newest last."""

    PER_USER = 4

    def __init__(self) -> None:
        self._users: OrderedDict[str, OrderedDict[bytes, T]] = OrderedDict()

    def put(self, user: str, key: bytes, credential: T) -> None:
        found = self._users.setdefault(user, OrderedDict())
        found[key] = credential
        found.move_to_end(key)
        while len(found) > self.PER_USER:
            found.popitem(last=False)
        self._users.move_to_end(user)
        while len(self._users) > CACHE_LIMIT:
            self._users.popitem(last=False)

    def get(self, user: str, key: bytes) -> T | None:
        found = self._users.get(user)
        return found.get(key) if found is not None else None

    def newest(self, user: str) -> T | None:
        found = self._users.get(user)
        return next(reversed(found.values())) if found else None

    def __repr__(self) -> str:
        return f"BackendCredentials(users={len(self._users)})"


def scrubbed(exc: BaseException, secret: str) -> str:
    """A short reason from a failed lookup, with the auth user's password (should a driver echo it) masked."""
    if isinstance(exc, TimeoutError):
        return "the database did not answer in time"
    text = str(exc).splitlines()[0] if str(exc) else ""
    if secret:
        text = text.replace(secret, "***")
    return (f"{type(exc).__name__}: {text}" if text else type(exc).__name__)[:200]


class AdminLookup(Generic[T]):
    """A kept administrative connection to one server (reopened when lost or when the server moves) that runs
    the auth query, one at a time; concurrent lookups of one user share a round trip; a found verifier is cached.

    Engines give `_connect` (open a connection), `_query` (run the query for a user: the verifier or None) and
    `_close`."""

    def __init__(self, engine: str) -> None:
        self.engine = engine
        self.cache: VerifierCache[T] = VerifierCache()
        self._lock = asyncio.Lock()
        self._flights: dict[str, asyncio.Future[T | None]] = {}
        self._address: Address | None = None
        self._auth_user = ""

    async def verifier(self, user: str, settings: LookupSettings, password: str | None) -> T | None:
        """The user's verifier (cached, else looked up); None for a user the database does not know."""
        found = self.cache.get(user)
        if found is not None:
            return found
        flight = self._flights.get(user)
        if flight is None:
            flight = self._flights[user] = asyncio.ensure_future(self._lookup(user, settings, password))
            flight.add_done_callback(lambda done: self._landed(user, done))
        return await asyncio.shield(flight)

    def _landed(self, user: str, flight: asyncio.Future[T | None]) -> None:
        if self._flights.get(user) is flight:
            del self._flights[user]
        if not flight.cancelled():
            flight.exception()  # retrieved, should every login that waited for it have gone

    async def _lookup(self, user: str, settings: LookupSettings, password: str | None) -> T | None:
        if not settings.auth_user or password is None:
            raise BackendUnavailable(f"auth passthrough: no secret is stored for auth_user {settings.auth_user!r}",
                                     transient=False)
        try:  # the wait for the connection (another user's lookup) counts too
            return await asyncio.wait_for(self._locked(user, settings, password), settings.timeout)
        except Exception as exc:
            reason = scrubbed(exc, password)
            log.warning("auth passthrough: looking up user %r at %s:%d as %r failed: %s", user,
                        *settings.address, settings.auth_user, reason)
            raise BackendUnavailable(f"auth passthrough: the database could not check user {user!r} "
                                     f"({reason})") from None

    async def _locked(self, user: str, settings: LookupSettings, password: str) -> T | None:
        async with self._lock:
            try:
                return await self._ask(user, settings, password)
            except BaseException:  # (a timeout too: the connection is left mid-query)
                await self.close()
                raise

    async def _ask(self, user: str, settings: LookupSettings, password: str) -> T | None:
        if (self._address, self._auth_user) == (settings.address, settings.auth_user):
            try:
                return await self._query(user, settings)
            except Exception as exc:  # the kept connection was lost (the server restarted, an idle timeout)
                log.info("auth passthrough: the lookup connection to %s:%d failed (%s); opening another",
                         *settings.address, scrubbed(exc, password))
        await self.close()
        await self._connect(settings, password)
        self._address, self._auth_user = settings.address, settings.auth_user
        log.info("auth passthrough: lookup connection to %s:%d as %r open", *settings.address, settings.auth_user)
        return await self._query(user, settings)

    async def close(self) -> None:
        self._address = None
        await self._close()

    async def _connect(self, settings: LookupSettings, password: str) -> None:
        raise NotImplementedError

    async def _query(self, user: str, settings: LookupSettings) -> T | None:
        raise NotImplementedError

    async def _close(self) -> None:
        raise NotImplementedError


_LOOKUPS: dict[tuple[str, str], AdminLookup[object]] = {}


def lookup_for(engine: str, endpoint: str, make: Callable[[], AdminLookup[T]]) -> AdminLookup[T]:
    """The process's lookup for an endpoint (one kept connection each, to the instance the endpoint serves)."""
    key = (engine, endpoint)
    found = _LOOKUPS.get(key)
    if found is None:
        found = _LOOKUPS[key] = make()  # type: ignore[assignment]
    return found  # type: ignore[return-value]

