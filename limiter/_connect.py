"""Redis clients made from a URL, with the limiter's fail-fast connection settings."""

from __future__ import annotations

from typing import Any

__all__ = ["client_from_url"]


def client_from_url(
    url: str,
    *,
    socket_timeout: float,
    socket_connect_timeout: float,
    max_connections: int,
    pool_timeout: float,
) -> Any:
    """A ``redis.asyncio`` client for ``url`` (``redis://``, ``rediss://``, ``unix://``).

    The client uses a blocking pool of ``max_connections``: a burst of more concurrent
    calls queues for a connection (up to ``pool_timeout`` seconds) instead of failing.
    """
    import redis.asyncio as aioredis

    pool = aioredis.BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=pool_timeout,
        socket_timeout=socket_timeout,
        socket_connect_timeout=socket_connect_timeout,
    )
    return aioredis.Redis.from_pool(pool)
