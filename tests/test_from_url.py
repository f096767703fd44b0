"""Limiter.from_url on a real redis-server: bursts, unreachable servers, no secrets in errors."""

from __future__ import annotations

import asyncio
import time

import pytest

from limiter import APILimits, ConfigError, Limiter, LimiterUnavailable
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


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        (
            "http://:hunter2@127.0.0.1:6379/0",
            "http:// is not a Redis URL (the limiter takes redis://, rediss://, unix://, "
            "redis+cluster://, rediss+cluster:// and redis+sentinel://)",
        ),
        (
            "127.0.0.1:6379",
            "no scheme: write redis://host:port/db (the limiter takes redis://, rediss://, "
            "unix://, redis+cluster://, rediss+cluster:// and redis+sentinel://)",
        ),
        (
            "redis://:hunter2@127.0.0.1:notaport/0",
            "Port could not be cast to integer value as 'notaport'",
        ),
    ],
)
def test_a_url_redis_py_cannot_take_is_a_config_error(url: str, problem: str) -> None:
    """Not redis-py's bare ValueError: a ConfigError naming the field, without the password."""
    with pytest.raises(ConfigError) as info:
        Limiter.from_url(url, {"a": APILimits(max_concurrent=1)})
    shown = url.replace(":hunter2@", ":***@").replace("//:***@", "//***@")
    assert str(info.value) == f"url: {problem} (in {shown})"
    assert (info.value.field, info.value.value) == ("url", shown)
    assert info.value.__cause__ is None
    assert "hunter2" not in repr(info.value.args)
