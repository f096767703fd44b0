"""Limits learned from a provider's headers (``Limiter.learn_limits``), on fakeredis and
on redis-server: they lower the limit in force for every replica, never raise it, and
lapse or clear."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import redis.asyncio as aioredis

from chatbot.fakes.openai_server import FakeOpenAIConfig
from limiter import AcquireTimeout, APILimits, ConfigError, Limiter, Rate
from limiter.testing import RedisServer
from tests._sdk import SDKFleet, offline, serve_fakes
from tests._sdk_workers import KEY, limits_of
from tests.conftest import LimiterFactory, wait_for_waiters

TEN_PER_MINUTE = {"a": APILimits(rates=(Rate(10, 60.0),), lease_ttl=60)}


async def test_a_lower_reported_limit_holds_for_every_replica(
    make_limiter: LimiterFactory,
) -> None:
    """The provider says 3 per minute where 10 are configured: a replica that never saw
    the header admits 3, refuses the 4th for the minute window, and stats() says why."""
    learner, other = make_limiter(TEN_PER_MINUTE), make_limiter(TEN_PER_MINUTE)
    learned = await learner.learn_limits("a", requests_per_minute=3, ttl=600)
    assert set(learned) == {"rate:60s", "expires_in", "source"}
    assert (learned["rate:60s"], learned["source"]) == (3, "provider")
    assert 599 < learned["expires_in"] <= 600
    slots = [await other.acquire("a", timeout=0) for _ in range(3)]
    with pytest.raises(AcquireTimeout) as refused:
        await other.acquire("a", timeout=0)
    assert refused.value.reason == "rate:60s"
    st = await other.stats("a")
    assert st["windows"]["rate:60s"] == {"used": 3, "limit": 3}
    assert st["learned"]["rate:60s"] == 3
    assert st["overrides"] == {}
    for s in slots:
        await s.release()


async def test_a_reported_limit_never_raises_the_configured_one(
    make_limiter: LimiterFactory,
) -> None:
    """20 reported where 10 are configured: nothing is learned, 10 pass, the 11th not."""
    lim = make_limiter(TEN_PER_MINUTE)
    assert await lim.learn_limits("a", requests_per_minute=20) == {}
    slots = [await lim.acquire("a", timeout=0) for _ in range(10)]
    with pytest.raises(AcquireTimeout):
        await lim.acquire("a", timeout=0)
    assert (await lim.stats("a"))["learned"] == {}
    for s in slots:
        await s.release()


async def test_the_configured_limit_reported_again_clears_it_and_lets_waiters_in(
    make_limiter: LimiterFactory,
) -> None:
    """Learned 1, one admitted, one waiting for the minute window: the provider reports
    the configured 10 again, and the waiter is admitted at once (not after the minute)."""
    lim = make_limiter(TEN_PER_MINUTE)
    await lim.learn_limits("a", requests_per_minute=1)
    first = await lim.acquire("a", timeout=0)
    waiter = asyncio.create_task(lim.acquire("a", timeout=10))
    await wait_for_waiters(lim, "a", 1)
    assert await lim.learn_limits("a", requests_per_minute=10) == {}
    second = await asyncio.wait_for(waiter, 5)  # the window alone would hold it 60 s
    assert (await lim.stats("a"))["windows"]["rate:60s"] == {"used": 2, "limit": 10}
    await first.release()
    await second.release()


async def test_learned_limits_lapse_after_their_ttl(make_limiter: LimiterFactory) -> None:
    """A report not renewed stands for its ttl, then the configured limit is back."""
    lim = make_limiter(TEN_PER_MINUTE)
    await lim.learn_limits("a", requests_per_minute=1, ttl=0.3)
    first = await lim.acquire("a", timeout=0)
    with pytest.raises(AcquireTimeout):
        await lim.acquire("a", timeout=0)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 5
    while (await lim.stats("a"))["learned"]:
        assert loop.time() < deadline, "the learned limit did not lapse"
        await asyncio.sleep(0.05)  # the ttl runs in Redis time: poll the state
    second = await lim.acquire("a", timeout=0)
    assert await lim.learn_limits("a") == {}  # nothing left, nothing reported
    await first.release()
    await second.release()


async def test_with_an_override_the_least_of_both_holds(make_limiter: LimiterFactory) -> None:
    """Override 5 and learned 3: 3 in force; learned 8 (still below the configured 10)
    and override 5: 5 in force; stats() shows both."""
    lim = make_limiter(TEN_PER_MINUTE)
    await lim.set_limits("a", requests_per_minute=5)
    await lim.learn_limits("a", requests_per_minute=3)
    assert (await lim.stats("a"))["windows"]["rate:60s"]["limit"] == 3
    await lim.learn_limits("a", requests_per_minute=8)
    st = await lim.stats("a")
    assert st["windows"]["rate:60s"]["limit"] == 5
    assert (st["overrides"]["rate:60s"], st["learned"]["rate:60s"]) == (5, 8)
    slots = [await lim.acquire("a", timeout=0) for _ in range(5)]
    with pytest.raises(AcquireTimeout):
        await lim.acquire("a", timeout=0)
    for s in slots:
        await s.release()


async def test_learned_tokens_lower_the_token_budget(make_limiter: LimiterFactory) -> None:
    """100 tokens a minute reported where 1,000 are configured: 60 + 60 do not fit."""
    lim = make_limiter({"t": APILimits(tokens_per_minute=1000, lease_ttl=60)})
    learned = await lim.learn_limits("t", tokens_per_minute=100, requests_per_minute=5)
    assert learned["tokens"] == 100
    assert "rate:60s" not in learned  # the API has no request window to lower
    first = await lim.acquire("t", timeout=0, tokens=60)
    with pytest.raises(AcquireTimeout) as refused:
        await lim.acquire("t", timeout=0, tokens=60)
    assert refused.value.reason == "tokens"
    await first.release()


async def test_an_api_without_those_windows_learns_nothing(make_limiter: LimiterFactory) -> None:
    """Only windows the API has are learned: a concurrency-only API is left as it is."""
    lim = make_limiter({"c": APILimits(max_concurrent=2)})
    assert await lim.learn_limits("c", requests_per_minute=1, tokens_per_minute=1) == {}
    slots = [await lim.acquire("c", timeout=0) for _ in range(2)]
    assert (await lim.stats("c"))["learned"] == {}
    for s in slots:
        await s.release()


async def test_less_left_at_the_provider_fills_the_window_to_match(
    make_limiter: LimiterFactory,
) -> None:
    """Another client on the same key: the provider says 4 of its 10 are left while our
    window holds 1. The difference (5) is recorded now, so 4 more pass and the 5th is
    refused; the same report again adds nothing, and more left takes nothing back."""
    lim = make_limiter(TEN_PER_MINUTE)
    first = await lim.acquire("a", timeout=0)
    assert await lim.learn_limits("a", requests_per_minute=10, requests_remaining=4) == {}
    assert (await lim.stats("a"))["windows"]["rate:60s"] == {"used": 6, "limit": 10}
    await lim.learn_limits("a", requests_per_minute=10, requests_remaining=4)  # no more
    assert (await lim.stats("a"))["windows"]["rate:60s"]["used"] == 6
    slots = [await lim.acquire("a", timeout=0) for _ in range(4)]
    with pytest.raises(AcquireTimeout) as refused:
        await lim.acquire("a", timeout=0)
    assert refused.value.reason == "rate:60s"
    await lim.learn_limits("a", requests_per_minute=10, requests_remaining=9)  # more left:
    assert (await lim.stats("a"))["windows"]["rate:60s"]["used"] == 10  # nothing taken back
    for s in (first, *slots):
        await s.release()


async def test_what_is_left_counts_against_the_limit_in_force(
    make_limiter: LimiterFactory,
) -> None:
    """The room is taken with the limit in force: reported 30 (learned now) with 20 left,
    an empty window holds 10 after the report, not 120 - 20; configured 5 below the
    provider's 1,000 with 998 left: our own 5 stay whole."""
    lim = make_limiter({"a": APILimits(requests_per_minute=120, lease_ttl=60)})
    await lim.learn_limits("a", requests_per_minute=30, requests_remaining=20)
    assert (await lim.stats("a"))["windows"]["rate:60s"] == {"used": 10, "limit": 30}
    own = make_limiter({"b": APILimits(requests_per_minute=5, lease_ttl=60)})
    await own.learn_limits("b", requests_per_minute=1000, requests_remaining=998)
    assert (await own.stats("b"))["windows"]["rate:60s"] == {"used": 0, "limit": 5}


async def test_fewer_tokens_left_fill_the_token_budget(make_limiter: LimiterFactory) -> None:
    """Tokens the same way: 300 left of 1,000 at the provider, 100 used here: 600 are
    recorded, and a request reserving 400 waits while one of 300 passes."""
    lim = make_limiter({"t": APILimits(tokens_per_minute=1000, lease_ttl=60)})
    first = await lim.acquire("t", timeout=0, tokens=100)
    await lim.learn_limits("t", tokens_per_minute=1000, tokens_remaining=300)
    assert (await lim.stats("t"))["windows"]["tokens"]["used"] == 700
    with pytest.raises(AcquireTimeout):
        await lim.acquire("t", timeout=0, tokens=400)
    second = await lim.acquire("t", timeout=0, tokens=300)
    for s in (first, second):
        await s.release()


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("requests_per_minute", 0),
        ("requests_per_minute", -3),
        ("requests_per_minute", 2.5),
        ("requests_per_minute", True),
        ("tokens_per_minute", "100"),
        ("ttl", 0),
        ("ttl", float("nan")),
        ("requests_remaining", -1),
        ("tokens_remaining", 2.0),
    ],
)
async def test_bad_reports_change_nothing(
    make_limiter: LimiterFactory, field: str, value: Any
) -> None:
    """A bad value raises ConfigError naming the field and the value; nothing is learned."""
    lim = make_limiter(TEN_PER_MINUTE)
    kwargs: dict[str, Any] = {"requests_per_minute": 3, field: value}
    with pytest.raises(ConfigError) as info:
        await lim.learn_limits("a", **kwargs)
    assert info.value.field == field
    assert repr(value) in str(info.value) or str(value) in str(info.value)
    assert (await lim.stats("a"))["learned"] == {}


@pytest.mark.parametrize("value", [1, "yes", None])
def test_learn_from_headers_is_a_bool(value: Any) -> None:
    """APILimits(learn_from_headers=...) takes True or False only, named in the error."""
    with pytest.raises(ConfigError) as info:
        APILimits(max_concurrent=1, learn_from_headers=value)
    assert info.value.field == "APILimits.learn_from_headers"
    assert repr(value) in str(info.value)


# -- learned from the fake OpenAI's headers, across processes ---------------------------


@pytest.fixture
def fleet(redis_server: RedisServer, client: aioredis.Redis, tmp_path: Path) -> Iterator[SDKFleet]:
    f = SDKFleet(redis_server.url, client, tmp_path)
    try:
        yield f
    finally:
        f.close()


async def chat_loops(
    fleet: SDKFleet, openai_url: str, spec: dict[str, Any], seconds: float
) -> list[dict[str, Any]]:
    """2 worker processes x 4 loops of chat completions for ``seconds``; their reports."""
    names = ["p0", "p1"]
    for name in names:
        fleet.start("chat_for", name, limits=spec, openai_url=openai_url, tasks=4, seconds=seconds)
    await fleet.ready(len(names))
    await fleet.go(*names)
    return [await fleet.result(name) for name in names]


@pytest.mark.redis
@pytest.mark.multiprocess
async def test_a_provider_allowing_30_a_minute_is_learned_by_every_process(
    fleet: SDKFleet, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Configured 120 a minute, the provider allows 30 (its x-ratelimit-limit-requests
    says so): 2 processes x 4 loops for 5 s get at most max_concurrent (4) 429s, the
    first burst's, then none, and at least 27 answers (90 % of the 30)."""
    offline(monkeypatch)
    spec = {"openai": {"max_concurrent": 4, "requests_per_minute": 120,
                       "learn_from_headers": True, "retry_attempts": 1}}  # fmt: skip
    config = FakeOpenAIConfig(api_keys=(KEY,), rpm=30, window_seconds=60.0, latency=0.02)
    async with serve_fakes(openai=config) as fakes:
        reports = await chat_loops(fleet, fakes.openai_url, spec, seconds=5)
        record = fakes.openai_record()
    answered = sum(r["ok"] for r in reports)
    refused = record["rejected"]["requests"]
    assert refused <= 4, record["rejected"]
    assert record["rejected_total"] == refused  # nothing else was refused
    assert answered == record["admitted"] == record["max_requests_in_window"]
    assert 27 <= answered <= 30
    # Every 429 came before the limit was learned: none after the first admission's answer.
    first_done = min(a["done"] for a in record["admissions"])
    assert [r for r in record["rejections"] if r["t"] > first_done] == []
    async with Limiter.from_url(fleet.url, limits_of(spec)) as lim:
        st = await lim.stats("openai")
    assert (st["learned"]["rate:60s"], st["learned"]["source"]) == (30, "provider")
    assert st["windows"]["rate:60s"]["limit"] == 30
    assert KEY not in fleet.logs()


@pytest.mark.redis
@pytest.mark.multiprocess
async def test_another_client_on_the_key_leaves_room_the_processes_respect(
    fleet: SDKFleet, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client outside the limiter spent 12 of the key's 20 a minute: 2 processes x 4
    loops configured for the same 20 read what is left from the answers and take exactly
    the 8 left, without a 429. (One slot for the cluster: each answer's report lands
    before its slot is released, so no admission races a report; with more slots, the
    requests in flight when a report is read can still meet a 429.)"""
    offline(monkeypatch)
    spec = {"openai": {"max_concurrent": 1, "requests_per_minute": 20,
                       "learn_from_headers": True, "retry_attempts": 1}}  # fmt: skip
    config = FakeOpenAIConfig(api_keys=(KEY,), rpm=20, window_seconds=60.0, latency=0.02)
    async with serve_fakes(openai=config) as fakes:
        rogue = openai.AsyncOpenAI(base_url=fakes.openai_url, api_key=KEY, max_retries=0)
        for i in range(12):
            await rogue.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": f"rogue {i}"}]
            )
        await rogue.close()
        reports = await chat_loops(fleet, fakes.openai_url, spec, seconds=4)
        record = fakes.openai_record()
    assert record["rejected_total"] == 0, record["rejected"]
    assert [r["errors"] for r in reports] == [[], []]
    assert sum(r["ok"] for r in reports) == 8  # the 8 the other client left, not 20
    assert record["admitted"] == record["max_requests_in_window"] == 20
    assert KEY not in fleet.logs()
