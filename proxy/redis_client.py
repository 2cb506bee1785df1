"""The Redis client of a section that keeps state in Redis (the query cache, the failed-login throttle)."""

from __future__ import annotations

import ssl
from typing import Any

from redis.asyncio import Redis

from proxy.config import RedisClientSettings


def connect_redis(settings: RedisClientSettings) -> Redis:
    """A client for the section's Redis: rediss:// verifies the server (against redis_ca_file if given), the
    password is sent as AUTH and kept nowhere else; every call is bounded by redis_timeout. It connects on first
    use."""
    password = settings.redis_password.get_secret_value() if settings.redis_password is not None else None
    extra: dict[str, Any] = {}
    if settings.redis_url.startswith("rediss://"):
        extra["ssl_cert_reqs"] = ssl.CERT_REQUIRED
        if settings.redis_ca_file is not None:
            extra["ssl_ca_certs"] = str(settings.redis_ca_file)
    return Redis.from_url(settings.redis_url, username=settings.redis_username, password=password,
                          socket_timeout=settings.redis_timeout, socket_connect_timeout=settings.redis_timeout,
                          **extra)
