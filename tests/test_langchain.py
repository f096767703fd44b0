"""LangChain through the limiter: ``langchain_openai.ChatOpenAI`` on ``openai_client``.

The real ``langchain-openai`` ``ChatOpenAI`` given the client ``limiter.http.openai_client``
builds (``root_async_client=client, async_client=client.chat.completions``), against the
fake OpenAI on 127.0.0.1 and a real redis-server (the session's, flushed by the ``client``
/ ``real_redis`` fixtures). The fake's own record is the referee. The multi-process test
runs its calls in worker processes (``tests._sdk_workers``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from langchain_openai import ChatOpenAI

from chatbot.fakes.openai_server import FakeOpenAIConfig
from limiter import APILimits, Limiter
from limiter.http import openai_client
from limiter.testing import RedisServer
from tests._sdk import Fakes, SDKFleet, offline, serve_fakes
from tests._sdk_workers import KEY, MODEL, limits_of

pytestmark = [pytest.mark.redis]

CONCURRENT, PER_SECOND = 2, 3
#: The limiter's ``window_margin``: it must exceed how much the delay from admission to
#: arrival at the fake varies (README, "Arrival jitter"). A worker's first calls wait up
#: to ~0.3 s for its event loop (measured: the SDKs' first-call work on a 2-core machine).
MARGIN = 0.6
PROCESSES, CALLS = 2, 3


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    offline(monkeypatch)


@pytest.fixture
async def fakes() -> AsyncIterator[Fakes]:
    async with serve_fakes() as served:
        yield served


@pytest.fixture
def fleet(redis_server: RedisServer, client: aioredis.Redis, tmp_path: Path) -> Iterator[SDKFleet]:
    f = SDKFleet(redis_server.url, client, tmp_path)
    try:
        yield f
    finally:
        f.close()


async def test_sync_calls_fail_instead_of_going_around_the_limiter(
    real_redis: aioredis.Redis, fakes: Fakes
) -> None:
    """Without a key of its own, ChatOpenAI's sync ``invoke`` (no limited client behind it)
    raises and sends nothing; ``ainvoke`` goes through the limiter. Both client arguments
    are needed: given ``root_async_client`` alone, ChatOpenAI builds its own."""
    async with Limiter(real_redis, {"openai": APILimits(max_concurrent=1)}) as lim:
        client = openai_client(lim, base_url=fakes.openai_url, api_key=KEY)
        try:
            chat = ChatOpenAI(
                model=MODEL, root_async_client=client, async_client=client.chat.completions
            )
            with pytest.raises(ValueError, match="Sync client is not available"):
                chat.invoke("hello")
            assert fakes.openai_record()["requests_total"] == 0
            assert (await chat.ainvoke("hello")).text == "You said: hello"
            # Given root_async_client alone, ChatOpenAI replaces it with a client of its own.
            alone = ChatOpenAI(
                model=MODEL, root_async_client=client, api_key=KEY, base_url=fakes.openai_url
            )
            assert alone.root_async_client is not client
        finally:
            await client.close()
        assert (await lim.stats("openai"))["total_requests"] == 1
    assert fakes.openai_record()["admitted"] == 1


@pytest.mark.multiprocess
async def test_chatopenai_across_processes_never_exceeds_the_provider(fleet: SDKFleet) -> None:
    """2 processes x 3 concurrent calls (ainvoke, astream, Responses API): the fake saw at
    most 2 in flight and 3 per rolling second (and reached both), no 429; the cluster's
    token window holds exactly the tokens the fake counted."""
    spec = {
        "openai": {
            "max_concurrent": CONCURRENT,
            "rates": [[PER_SECOND, 1.0]],
            "tokens_per_minute": 1_000_000,
            "window_margin": MARGIN,
        }
    }
    config = FakeOpenAIConfig(
        api_keys=(KEY,), max_in_flight=CONCURRENT, rpm=PER_SECOND, window_seconds=1.0, latency=0.1
    )
    async with serve_fakes(openai=config) as fakes:
        names = [f"p{i}" for i in range(PROCESSES)]
        for name in names:
            fleet.start("langchain", name, limits=spec, openai_url=fakes.openai_url, calls=CALLS)
        await fleet.ready(PROCESSES)
        await fleet.go(*names)
        reports = [await fleet.result(name) for name in names]
        record = fakes.openai_record()
    errors = [e for r in reports for e in r["errors"]]
    assert errors == [], "\n\n".join(errors)
    calls = [c for r in reports for c in r["calls"]]
    n = PROCESSES * CALLS
    assert len(calls) == n
    for c in calls:
        assert c["text"] == f"You said: {c['prompt']}", c
        assert isinstance(c["tokens"], int), c
        assert c["tokens"] > 0, c

    assert (record["admitted"], record["rejected_total"], record["unauthorized"]) == (n, 0, 0)
    assert record["by_endpoint"]["/v1/chat/completions"] == 2 * n // 3
    assert record["by_endpoint"]["/v1/responses"] == n // 3
    assert record["max_in_flight"] <= CONCURRENT
    assert record["max_requests_in_window"] <= PER_SECOND
    # ... and the limits were reached, so they were what held the calls back.
    assert record["max_in_flight"] == CONCURRENT
    assert record["max_requests_in_window"] == PER_SECOND
    # The answers' usage (streams included: stream_usage=True) corrected every reservation.
    assert sum(c["tokens"] for c in calls) == record["tokens_used"]
    async with Limiter.from_url(fleet.url, limits_of(spec)) as lim:
        stats = await lim.stats("openai")
    assert stats["total_requests"] == n
    assert stats["windows"]["tokens"]["used"] == record["tokens_used"]
    assert KEY not in fleet.logs()
