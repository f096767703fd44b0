"""Item 11: a response-cache hit through ``openai_client``, next to a ``PING`` round trip.

The fake OpenAI runs in this event loop (uvicorn on a free 127.0.0.1 port) and answers
one temperature-0 chat completion, which fills the cache. Then, in one loop, rotating
the order each iteration so that all see the same machine state:

- ``PING`` through ``redis.asyncio``: the round-trip floor;
- 11b: the cache's lookup script alone (``EVALSHA``, a hit): what a hit asks of Redis;
- a hit through ``openai_client(..., cache=ResponseCache())``:
  ``await client.chat.completions.create(...)``, i.e. the SDK building the request,
  the limited transport's lookup, the SDK parsing the answer into its model;
- 11c: the same hit through ``with_raw_response`` (the body's bytes, nothing parsed).

A verification pass before the timing counts, per hit, client writes (round trips),
commands sent and commands Redis ran; and the fake's own record says how many requests
reached it (only the filling one may).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import redis.asyncio as aioredis
import uvicorn

from chatbot.fakes.openai_server import FakeOpenAI, FakeOpenAIConfig, create_app
from limiter import APILimits, Limiter
from limiter.http import ResponseCache, openai_client
from limiter.http._cache import _LOOKUP

from ._util import (
    CLIENT_TIMEOUTS,
    Check,
    CountingConnection,
    Report,
    Row,
    command_counts,
    interleaved,
    summarize,
)

__all__ = ["run_cache"]

API = "openai"
KEY = "sk-bench-cache"
MODEL = "gpt-4o-mini"
MESSAGES = [{"role": "user", "content": "a question asked again and again"}]
NAMESPACE = "bench-cache"

Op = Callable[[], Awaitable[Any]]


@contextlib.asynccontextmanager
async def _fake_openai() -> AsyncIterator[tuple[str, FakeOpenAI]]:
    """The fake OpenAI in this event loop on a free 127.0.0.1 port: its base URL, state."""
    app = create_app(FakeOpenAIConfig(api_keys=(KEY,)))
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        app, log_config=None, log_level="warning", access_log=False, lifespan="off", ws="none"
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        async with asyncio.timeout(10):
            while not server.started:
                if task.done():
                    await task
                await asyncio.sleep(0.005)
        yield f"http://127.0.0.1:{port}/v1", app.state.fake
    finally:
        server.should_exit = True
        await task
        sock.close()


class _Subject:
    """A client, a limiter and an openai_client with a cache, all on one connection class."""

    def __init__(self, url: str, base_url: str, *, counting: bool) -> None:
        extra: dict[str, Any] = {"connection_class": CountingConnection} if counting else {}
        self.redis = aioredis.from_url(url, **extra, **CLIENT_TIMEOUTS)
        self.lim = Limiter(self.redis, {API: APILimits(max_concurrent=100)}, namespace=NAMESPACE)
        self.sdk = openai_client(self.lim, base_url=base_url, api_key=KEY, cache=ResponseCache())

    async def aclose(self) -> None:
        await self.sdk.close()
        await self.lim.aclose()
        await self.redis.aclose()

    async def entry(self) -> str:
        """The one entry in the cache (the filling call's)."""
        found = [
            k.decode()
            async for k in self.redis.scan_iter(match=f"{NAMESPACE}:cache:*")
            if not k.endswith(b":stats")
        ]
        assert len(found) == 1, found
        return found[0]

    def ops(self, entry: str) -> dict[str, Op]:
        create = self.sdk.chat.completions.create
        raw = self.sdk.chat.completions.with_raw_response.create
        keys = [entry, f"{NAMESPACE}:cache:{{{API}}}:stats"]

        async def ping() -> None:
            await self.redis.ping()

        async def lookup() -> None:
            assert await _LOOKUP(self.redis, keys, [86_400_000]) is not None

        async def hit() -> None:
            await create(model=MODEL, messages=MESSAGES, temperature=0)

        async def hit_raw() -> None:
            await raw(model=MODEL, messages=MESSAGES, temperature=0)

        return {"ping": ping, "lookup": lookup, "hit": hit, "hit_raw": hit_raw}


LABELS = {
    "ping": "PING round trip (redis.asyncio)",
    "lookup": "11b. the cache's lookup script alone (EVALSHA, a hit)",
    "hit": "cache hit through openai_client: chat.completions.create",
    "hit_raw": "11c. cache hit through openai_client, with_raw_response (not parsed)",
}


async def run_cache(url: str, n: int, n_verify: int, report: Report) -> None:
    """Item 11, appended to ``report``."""
    probe = aioredis.from_url(url, **CLIENT_TIMEOUTS)
    async with _fake_openai() as (base_url, fake):
        counted = _Subject(url, base_url, counting=True)
        try:
            answer = await counted.sdk.chat.completions.create(
                model=MODEL, messages=MESSAGES, temperature=0
            )  # the miss that fills the cache
            assert answer.choices[0].message.content
            entry = await counted.entry()
            ops = counted.ops(entry)
            counts = {}
            for name in ("ping", "lookup", "hit"):
                for _ in range(20):
                    await ops[name]()
                counts[name] = await command_counts(probe, ops[name], n_verify)
        finally:
            await counted.aclose()
        s = _Subject(url, base_url, counting=False)
        try:
            ops = s.ops(entry)
            names = list(ops)
            samples, cpu_us = await interleaved(ops, n)
            stats = await s.lim.stats(API)
        finally:
            await s.aclose()
        reached = int(fake.snapshot(detail=False)["requests_total"])
    await probe.aclose()

    sums = {name: summarize(values) for name, values in samples.items()}
    for name in names:
        report.rows.append(
            Row(
                item="11",
                label=LABELS[name],
                summary=sums[name],
                counts=counts.get(name),
                cpu_us=cpu_us[name],
            )
        )
    hit, ping = counts["hit"], sums["ping"]
    report.checks.append(
        Check(
            "11. cache hit: Redis round trips / commands sent, per hit; requests that reached "
            "the fake OpenAI",
            f"{hit.round_trips:g} / {hit.sent:g} (over {n_verify} hits); {reached} (the one "
            f"that filled the cache); cluster-wide stats: {stats['cache']}",
            "exactly 1 / 1; 1",
            hit.round_trips == 1 and hit.sent == 1 and reached == 1,
        )
    )
    report.checks.append(
        Check(
            "11. cache hit through openai_client vs PING round trip",
            f"p50 {sums['hit'].p50_us:.0f} vs {ping.p50_us:.0f} µs "
            f"({sums['hit'].p50_us / ping.p50_us:.1f}x), p99 {sums['hit'].p99_us:.0f} vs "
            f"{ping.p99_us:.0f} µs; unparsed: p50 {sums['hit_raw'].p50_us:.0f} µs",
            "reported (the SDK's own work is most of it)",
            None,
        )
    )
