"""The client sessions of an endpoint with a query cache, as its listener makes them (imported only when the
process has a cache: sqlglot and redis load with it)."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from proxy.cache.cache import QueryCache
from proxy.cache.mysql_session import CachedMySQLClient
from proxy.cache.pg_session import CachedPostgresClient
from proxy.endpoints import Endpoint
from proxy.session.mysql_service import MySQLService
from proxy.session.pg_service import PostgresService
from proxy.stats import StatsRegistry

CachedClient = CachedPostgresClient | CachedMySQLClient


def cached_clients(cache: QueryCache, endpoint: Endpoint, service: PostgresService | MySQLService,
                   registry: StatsRegistry) -> Callable[[], CachedClient] | None:
    """What makes the endpoint's client sessions; None when it caches nothing (its clients are the plain ones)."""
    endpoint_cache = cache.endpoint(endpoint.engine, endpoint.name, endpoint.cluster, registry)
    if endpoint_cache is None:
        return None
    if isinstance(service, PostgresService):
        return partial(CachedPostgresClient, service, endpoint_cache)
    return partial(CachedMySQLClient, service, endpoint_cache)
