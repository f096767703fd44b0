"""Shared fixtures: a real redis-server per test session, fakeredis, limiter factories.

Every admission test runs twice through ``redis_client``: once on fakeredis (with lupa
for Lua) and once on a real ``redis-server`` this session started on a free port. The
chatbot tests get both fakes from ``providers`` (built by ``tests._replica``).
"""

from __future__ import annotations

import asyncio
import gc
import os
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import fakeredis
import pytest
import redis.asyncio as aioredis
from hypothesis import settings

from limiter import APILimits, Limiter
from limiter.testing import RedisServer

if TYPE_CHECKING:
    from tests._replica import Providers

# Helpers that used to live in test modules keep pytest's detailed assertion messages.
pytest.register_assert_rewrite("tests._fleet", "tests._replica", "tests._servers")

# The default suite draws the same examples every run (a CI run passes or fails for the
# code, not for the draw); `make fuzz` draws new ones each time (HYPOTHESIS_PROFILE=fuzz).
settings.register_profile("default", derandomize=True)
settings.register_profile("fuzz", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


@pytest.fixture(autouse=True)
def _collect_garbage() -> Iterator[None]:
    """Collect garbage after each test, so that a leaked socket fails the test that leaked it.

    filterwarnings = error makes a ResourceWarning an error; without this collection it
    surfaces whenever the collector happens to run, often at the end of the session with
    no test named. (Set up first, torn down last: after the test's event loop is closed.)
    """
    yield
    gc.collect()


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One real redis-server for the whole session, stopped at the end."""
    with RedisServer() as server:
        yield server


@pytest.fixture
async def real_redis(redis_server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    """A client of the session's real redis-server, flushed before the test."""
    client = aioredis.from_url(redis_server.url)
    await client.flushall()
    await client.script_flush()
    yield client
    await client.aclose()


@pytest.fixture
def client(real_redis: aioredis.Redis) -> aioredis.Redis:
    """The multi-process tests' name for ``real_redis`` (no socket timeout: BLPOP waits)."""
    return real_redis


@pytest.fixture(params=["fakeredis", "redis-server"])
async def redis_client(request: pytest.FixtureRequest) -> AsyncIterator[Any]:
    """fakeredis, then a real redis-server: each test using this runs on both."""
    if request.param == "fakeredis":
        client: Any = fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer())
        yield client
        await client.aclose()
    else:
        server: RedisServer = request.getfixturevalue("redis_server")
        client = aioredis.from_url(server.url)
        await client.flushall()
        await client.script_flush()
        yield client
        await client.aclose()


LimiterFactory = Callable[..., Limiter]


@pytest.fixture
async def make_limiter(redis_client: Any) -> AsyncIterator[LimiterFactory]:
    """Build Limiters on ``redis_client``; all are closed after the test."""
    made: list[Limiter] = []

    def factory(limits: Mapping[str, APILimits], **kwargs: Any) -> Limiter:
        lim = Limiter(redis_client, limits, **kwargs)
        made.append(lim)
        return lim

    yield factory
    for lim in made:
        await lim.aclose()


@pytest.fixture
async def providers(
    redis_server: RedisServer, real_redis: aioredis.Redis
) -> AsyncIterator[Providers]:
    """Fake OpenAI (accepting only KEY) and fake Zapier (only TOKEN), on a flushed Redis.

    See ``tests._replica``; imported here, so that only the tests using the fakes load them.
    """
    from tests._replica import serve_providers

    async with serve_providers(redis_server, real_redis) as served:
        yield served


async def wait_for_waiters(lim: Limiter, api: str, n: int, within: float = 5.0) -> None:
    """Return once ``n`` waiters are queued for ``api`` (polls the cluster's state)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while (await lim.stats(api))["waiting"] < n:
        if loop.time() > deadline:
            raise AssertionError(f"{n} waiters for {api!r} not queued within {within}s")
        await asyncio.sleep(0.002)  # polls Redis state: there is no local event to await
