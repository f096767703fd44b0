"""Limiter.from_url on a real redis-server: bursts, unreachable servers, no secrets in errors."""

from __future__ import annotations

import asyncio
import time

import pytest

from limiter import APILimits, Limiter, LimiterUnavailable
from limiter.testing import RedisServer, free_port

pytestmark = pytest.mark.redis


async def test_burst_larger_than_the_pool(redis_server: RedisServer) -> None:
    """300 concurrent slot() calls in one process all succeed through a 50-connection pool."""
    async with Limiter.from_url(redis_server.url, {"a": APILimits(max_concurrent=10)}) as lim:
        await lim.redis.flushall()
        in_flight = peak = 0

        async def one() -> None:
            nonlocal in_flight, peak
            async with lim.slot("a", timeout=30):
                in_flight += 1
                peak = max(peak, in_flight)
                await asyncio.sleep(0.005)
                in_flight -= 1

        await asyncio.gather(*(one() for _ in range(300)))
        stats = await lim.stats("a")
    assert stats["successful_requests"] == 300
    assert peak == 10


async def test_unreachable_redis_fails_fast_without_secrets() -> None:
    """A refused port raises LimiterUnavailable within a second; the password never shows."""
    url = f"redis://:hunter2-secret@127.0.0.1:{free_port()}/0"
    lim = Limiter.from_url(url, {"a": APILimits(max_concurrent=1)})
    assert "hunter2" not in repr(lim)
    start = time.monotonic()
    with pytest.raises(LimiterUnavailable) as info:
        await lim.acquire("a", timeout=5)
    assert time.monotonic() - start < 1.0
    assert info.value.__cause__ is not None
    assert "hunter2" not in str(info.value)
    assert "hunter2" not in repr(info.value)
    await lim.aclose()


async def test_hung_redis_fails_fast() -> None:
    """A server that accepts the connection and never answers raises within a second."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        port = listener.getsockname()[1]
        lim = Limiter.from_url(f"redis://127.0.0.1:{port}/0", {"a": APILimits(max_concurrent=1)})
        start = time.monotonic()
        with pytest.raises(LimiterUnavailable):
            await lim.acquire("a", timeout=5)
        assert time.monotonic() - start < 1.0
        await lim.aclose()
