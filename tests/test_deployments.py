"""Deployments (several keys of one provider) and per-model limits, decided in one script.

Each test runs on fakeredis and on a real redis-server. What a user relies on: an
admission passes the API's limits, its model's, and one deployment's (with that
deployment's own model limits); the deployment chosen is the one with the most headroom;
a pause of one deployment leaves the others serving.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import pytest

from limiter import AcquireTimeout, APILimits, ConfigError, Slot
from tests.conftest import LimiterFactory, wait_for_waiters


def two_keys(**each: Any) -> APILimits:
    """An API with deployments "key-a" and "key-b", each with the limits ``each``."""
    return APILimits(deployments={"key-a": APILimits(**each), "key-b": APILimits(**each)})


async def release_all(slots: list[Slot]) -> None:
    for s in slots:
        await s.release()


async def test_each_deployment_has_its_own_concurrency(make_limiter: LimiterFactory) -> None:
    """Two keys of 2 in flight each: 4 admitted, 2 on each key, the 5th refused; a freed
    key-a slot is the one the next admission takes."""
    lim = make_limiter({"ai": two_keys(max_concurrent=2)})
    slots = [await lim.acquire("ai", timeout=0) for _ in range(4)]
    assert Counter(s.deployment for s in slots) == {"key-a": 2, "key-b": 2}
    with pytest.raises(AcquireTimeout) as info:
        await lim.acquire("ai", timeout=0)
    assert info.value.reason == "concurrency"
    freed = next(s for s in slots if s.deployment == "key-a")
    await freed.release()
    again = await lim.acquire("ai", timeout=0)
    assert again.deployment == "key-a"
    await release_all([s for s in slots if s is not freed] + [again])


async def test_the_least_used_deployment_is_chosen(make_limiter: LimiterFactory) -> None:
    """key-a allows 30 requests a minute, key-b 10: 40 admissions take exactly 30 and 10
    (each goes to the key with the lower used fraction), the 41st is refused."""
    lim = make_limiter(
        {
            "ai": APILimits(
                deployments={
                    "key-a": APILimits(requests_per_minute=30),
                    "key-b": APILimits(requests_per_minute=10),
                }
            )
        }
    )
    slots = [await lim.acquire("ai", timeout=0) for _ in range(40)]
    assert Counter(s.deployment for s in slots) == {"key-a": 30, "key-b": 10}
    # At every step the two keys stayed within one request of their shares.
    a = b = 0
    for s in slots:
        a, b = a + (s.deployment == "key-a"), b + (s.deployment == "key-b")
        assert abs(a / 30 - b / 10) <= 1 / 10 + 1e-9, (a, b)
    with pytest.raises(AcquireTimeout) as info:
        await lim.acquire("ai", timeout=0)
    assert info.value.reason == "rate:60s"
    await release_all(slots)


async def test_the_api_limit_binds_above_its_deployments(make_limiter: LimiterFactory) -> None:
    """max_concurrent=3 for the API over two keys of 2: at most 3 in flight in all."""
    lim = make_limiter(
        {
            "ai": APILimits(
                max_concurrent=3,
                deployments={
                    "key-a": APILimits(max_concurrent=2),
                    "key-b": APILimits(max_concurrent=2),
                },
            )
        }
    )
    slots = [await lim.acquire("ai", timeout=0) for _ in range(3)]
    with pytest.raises(AcquireTimeout):
        await lim.acquire("ai", timeout=0)
    assert sorted(Counter(s.deployment for s in slots).values()) == [1, 2]
    await release_all(slots)


async def test_a_model_has_its_own_limit(make_limiter: LimiterFactory) -> None:
    """gpt-4o allows 2 requests a minute: the third gpt-4o request is refused while
    another model (and a request naming none) is still admitted."""
    lim = make_limiter(
        {"ai": APILimits(max_concurrent=10, models={"gpt-4o": APILimits(requests_per_minute=2)})}
    )
    big = [await lim.acquire("ai", timeout=0, model="gpt-4o") for _ in range(2)]
    assert [s.model for s in big] == ["gpt-4o", "gpt-4o"]
    with pytest.raises(AcquireTimeout) as info:
        await lim.acquire("ai", timeout=0, model="gpt-4o")
    assert info.value.reason == "rate:60s"
    mini = await lim.acquire("ai", timeout=0, model="gpt-4o-mini")
    none = await lim.acquire("ai", timeout=0)
    assert (mini.model, none.model, none.deployment) == ("gpt-4o-mini", None, None)
    await release_all([*big, mini, none])


async def test_a_deployments_models_apply_within_it(make_limiter: LimiterFactory) -> None:
    """Each key allows 1 gpt-4o request a minute: two are admitted, one per key; the third
    is refused; gpt-4o-mini still goes through on either key."""
    each = {"models": {"gpt-4o": APILimits(requests_per_minute=1)}}
    lim = make_limiter({"ai": two_keys(**each)})
    first = [await lim.acquire("ai", timeout=0, model="gpt-4o") for _ in range(2)]
    assert {s.deployment for s in first} == {"key-a", "key-b"}
    with pytest.raises(AcquireTimeout):
        await lim.acquire("ai", timeout=0, model="gpt-4o")
    mini = await lim.acquire("ai", timeout=0, model="gpt-4o-mini")
    assert mini.deployment in ("key-a", "key-b")
    await release_all([*first, mini])


async def test_a_cooldown_of_one_deployment_leaves_the_other_serving(
    make_limiter: LimiterFactory,
) -> None:
    """A provider's pause for key-a sends every admission to key-b until key-b is full;
    the API as a whole is not paused."""
    lim = make_limiter({"ai": two_keys(max_concurrent=3)})
    assert await lim.cooldown("ai", 60, deployment="key-a") == pytest.approx(60, abs=0.01)
    slots = [await lim.acquire("ai", timeout=0) for _ in range(3)]
    assert [s.deployment for s in slots] == ["key-b"] * 3
    with pytest.raises(AcquireTimeout) as info:
        await lim.acquire("ai", timeout=0)
    # key-b is full, key-a paused for 60 s: the refusal that ends first is key-b's
    # (a lease of 30 s at most).
    assert info.value.reason == "concurrency"
    assert (await lim.stats("ai"))["cooldown_remaining"] == 0
    await release_all(slots)
    with pytest.raises(ConfigError, match="deployment='key-c'"):
        await lim.cooldown("ai", 1, deployment="key-c")


async def test_a_cooldown_of_a_model_in_a_deployment(make_limiter: LimiterFactory) -> None:
    """A 429 for gpt-4o on key-a pauses gpt-4o on key-a only: gpt-4o goes to key-b, and
    other models still use key-a."""
    each = {"max_concurrent": 5, "models": {"gpt-4o": APILimits(requests_per_minute=100)}}
    lim = make_limiter({"ai": two_keys(**each)})
    await lim.cooldown("ai", 30, deployment="key-a", model="gpt-4o")
    big = [await lim.acquire("ai", timeout=0, model="gpt-4o") for _ in range(3)]
    assert {s.deployment for s in big} == {"key-b"}
    mini = [await lim.acquire("ai", timeout=0, model="gpt-4o-mini") for _ in range(2)]
    assert {s.deployment for s in mini} == {"key-a"}  # key-b is fuller
    await release_all(big + mini)


async def test_a_waiter_takes_the_first_deployment_that_frees_room(
    make_limiter: LimiterFactory,
) -> None:
    """Both keys full: a waiter queues in the API's one queue and is handed the slot a
    key-b release frees, with key-b as its deployment."""
    lim = make_limiter({"ai": two_keys(max_concurrent=1)})
    slots = [await lim.acquire("ai", timeout=0) for _ in range(2)]
    waiter = asyncio.create_task(lim.acquire("ai", timeout=10))
    await wait_for_waiters(lim, "ai", 1)
    freed = next(s for s in slots if s.deployment == "key-b")
    await freed.release()
    got = await asyncio.wait_for(waiter, 10)
    assert got.deployment == "key-b"
    await release_all([got, *[s for s in slots if s is not freed]])
    assert (await lim.stats("ai"))["concurrent_requests"] == 0


async def test_tokens_are_reconciled_in_the_deployment(make_limiter: LimiterFactory) -> None:
    """key-a's 1,000 tokens a minute: 800 reserved, 100 used; after the release another
    800 fit on key-a (key-b has no room for them: 500)."""
    lim = make_limiter(
        {
            "ai": APILimits(
                deployments={
                    "key-a": APILimits(tokens_per_minute=1000),
                    "key-b": APILimits(tokens_per_minute=500),
                }
            )
        }
    )
    slot = await lim.acquire("ai", timeout=0, tokens=800)
    assert slot.deployment == "key-a"
    slot.report_tokens(100)
    await slot.release()
    again = await lim.acquire("ai", timeout=0, tokens=800)
    assert again.deployment == "key-a"
    with pytest.raises(AcquireTimeout) as info:
        await lim.acquire("ai", timeout=0, tokens=800)  # 900 on key-a, 500 is key-b's all
    assert info.value.reason == "tokens"
    await again.release()


async def test_a_request_too_heavy_for_every_deployment_is_refused_at_once(
    make_limiter: LimiterFactory,
) -> None:
    """600 tokens pass key-a's 1,000 but not key-b's 500: admitted on key-a. 2,000 tokens
    fit no key: a ConfigError naming tokens, and nothing queued."""
    lim = make_limiter(
        {
            "ai": APILimits(
                deployments={
                    "key-a": APILimits(tokens_per_minute=1000),
                    "key-b": APILimits(tokens_per_minute=500),
                },
                models={"gpt-4o": APILimits(tokens_per_minute=700)},
            )
        }
    )
    slot = await lim.acquire("ai", timeout=0, tokens=600)
    assert slot.deployment == "key-a"
    await slot.release()
    with pytest.raises(ConfigError) as info:
        await lim.acquire("ai", tokens=2000)
    assert info.value.field == "tokens"
    with pytest.raises(ConfigError, match="tokens=800"):
        await lim.acquire("ai", tokens=800, model="gpt-4o")
    with pytest.raises(ConfigError, match="model="):
        await lim.acquire("ai", model="bad model")
    assert (await lim.stats("ai"))["waiting"] == 0


async def test_a_withdrawn_waiter_leaves_every_deployment_as_it_was(
    make_limiter: LimiterFactory,
) -> None:
    """Waiters that time out leave nothing behind: after the holders release, all of both
    keys' room is there again."""
    lim = make_limiter({"ai": two_keys(max_concurrent=1, requests_per_minute=5)})
    slots = [await lim.acquire("ai", timeout=0) for _ in range(2)]
    for _ in range(3):
        with pytest.raises(AcquireTimeout):
            await lim.acquire("ai", timeout=0.05)
    await release_all(slots)
    again = [await lim.acquire("ai", timeout=0) for _ in range(2)]
    assert {s.deployment for s in again} == {"key-a", "key-b"}
    await release_all(again)
    # 2 + 2 of 10 requests used: 6 more are admitted, one key at a time.
    rest = []
    for _ in range(6):
        s = await lim.acquire("ai", timeout=0)
        rest.append(s.deployment)
        await s.release()
    assert Counter(rest) == {"key-a": 3, "key-b": 3}
    with pytest.raises(AcquireTimeout) as info:
        await lim.acquire("ai", timeout=0)
    assert info.value.reason == "rate:60s"


async def test_a_held_slot_keeps_its_deployment_lease(make_limiter: LimiterFactory) -> None:
    """Leases of 0.3 s: a slot held for 1 s stays counted in its deployment (the renewer
    extends it there too), so the key's one slot is not given twice."""
    lim = make_limiter(
        {"ai": APILimits(lease_ttl=0.3, deployments={"key-a": APILimits(max_concurrent=1)})}
    )
    held = await lim.acquire("ai", timeout=0)
    assert held.deployment == "key-a"
    for _ in range(10):
        await asyncio.sleep(0.1)
        with pytest.raises(AcquireTimeout):
            await lim.acquire("ai", timeout=0)
    await held.release()
    again = await lim.acquire("ai", timeout=0)
    await again.release()


async def test_bad_deployment_and_model_configuration_is_named() -> None:
    """Bad names and nesting fail with a ConfigError naming the field."""
    with pytest.raises(ConfigError, match=r"APILimits\.deployments") as info:
        APILimits(deployments={"a b": APILimits()})
    assert info.value.field == "APILimits.deployments"
    with pytest.raises(ConfigError, match="must be an APILimits"):
        APILimits(models={"gpt-4o": {"requests_per_minute": 3}})  # type: ignore[dict-item]
    with pytest.raises(ConfigError, match="cannot have deployments"):
        APILimits(deployments={"a": APILimits(deployments={"b": APILimits()})})
    with pytest.raises(ConfigError, match="cannot have models"):
        APILimits(models={"m": APILimits(models={"n": APILimits()})})
    with pytest.raises(ConfigError, match=r"APILimits\.models"):
        APILimits(models="gpt-4o")  # type: ignore[arg-type]


async def test_stats_show_each_deployment_and_model(make_limiter: LimiterFactory) -> None:
    """stats() shows each deployment's slots in flight, cooldown and windows, its models
    under it, and the API's models, with exact counts."""
    each = {"max_concurrent": 3, "models": {"gpt-4o": APILimits(requests_per_minute=10)}}
    lim = make_limiter(
        {
            "ai": APILimits(
                deployments={"key-a": APILimits(**each), "key-b": APILimits(**each)},
                models={"gpt-4o-mini": APILimits(tokens_per_minute=1000)},
            )
        }
    )
    await lim.cooldown("ai", 60, deployment="key-b")
    slots = [await lim.acquire("ai", timeout=0, model="gpt-4o") for _ in range(2)]
    mini = await lim.acquire("ai", timeout=0, tokens=300, model="gpt-4o-mini")
    stats = await lim.stats("ai")
    a, b = stats["deployments"]["key-a"], stats["deployments"]["key-b"]
    assert (a["concurrent_requests"], a["max_concurrent"]) == (3, 3)
    assert a["models"]["gpt-4o"]["windows"] == {"rate:60s": {"used": 2, "limit": 10}}
    assert b["concurrent_requests"] == 0
    assert b["cooldown_remaining"] == pytest.approx(60, abs=1)
    assert stats["models"]["gpt-4o-mini"]["windows"] == {"tokens": {"used": 300, "limit": 1000}}
    assert stats["cooldown_remaining"] == 0
    await release_all([*slots, mini])
    assert (await lim.stats("ai"))["deployments"]["key-a"]["concurrent_requests"] == 0


async def test_input_and_output_budgets_apart(make_limiter: LimiterFactory) -> None:
    """Input 1,000 and output 500 tokens a minute: (800, 200) passes; (100, 400) is refused
    by the output budget and (300, 100) by the input one; reporting (100, 50) gives the
    rest back, so (800, 400) then passes. A single number counts against each budget."""
    lim = make_limiter(
        {"ai": APILimits(input_tokens_per_minute=1000, output_tokens_per_minute=500)}
    )
    first = await lim.acquire("ai", timeout=0, tokens=(800, 200))
    for tokens, reason in (((100, 400), "output_tokens"), ((300, 100), "input_tokens")):
        with pytest.raises(AcquireTimeout) as info:
            await lim.acquire("ai", timeout=0, tokens=tokens)
        assert info.value.reason == reason
    windows = (await lim.stats("ai"))["windows"]
    assert windows["input_tokens"] == {"used": 800, "limit": 1000}
    assert windows["output_tokens"] == {"used": 200, "limit": 500}
    first.report_tokens((100, 50))
    await first.release()
    second = await lim.acquire("ai", timeout=0, tokens=(800, 400))
    windows = (await lim.stats("ai"))["windows"]
    assert (windows["input_tokens"]["used"], windows["output_tokens"]["used"]) == (900, 450)
    await second.release()
    with pytest.raises(AcquireTimeout) as info:
        await lim.acquire("ai", timeout=0, tokens=60)  # 60 more output: 510 > 500
    assert info.value.reason == "output_tokens"
    with pytest.raises(ConfigError, match="output_tokens limit is 500"):
        await lim.acquire("ai", tokens=(0, 600))
    with pytest.raises(ConfigError, match="tokens="):
        await lim.acquire("ai", tokens=(1, 2, 3))  # type: ignore[arg-type]


async def test_a_deployments_output_budget_steers_the_choice(make_limiter: LimiterFactory) -> None:
    """key-a has 500 output tokens a minute, key-b 1,000: 800 output tokens go to key-b;
    a waiter queued with (input, output) tokens is admitted with them when room frees."""
    lim = make_limiter(
        {
            "ai": APILimits(
                deployments={
                    "key-a": APILimits(output_tokens_per_minute=500, max_concurrent=1),
                    "key-b": APILimits(output_tokens_per_minute=1000, max_concurrent=1),
                }
            )
        }
    )
    big = await lim.acquire("ai", timeout=0, tokens=(10, 800))
    assert big.deployment == "key-b"
    small = await lim.acquire("ai", timeout=0, tokens=(10, 100))
    assert small.deployment == "key-a"
    waiter = asyncio.create_task(lim.acquire("ai", timeout=10, tokens=(5, 450)))
    await wait_for_waiters(lim, "ai", 1)
    small.report_tokens((10, 10))
    await small.release()  # key-a: 10 of 500 output used, the slot free
    got = await asyncio.wait_for(waiter, 10)
    assert got.deployment == "key-a"
    stats = await lim.stats("ai")
    assert stats["deployments"]["key-a"]["windows"]["output_tokens"]["used"] == 460
    assert stats["deployments"]["key-b"]["windows"]["output_tokens"]["used"] == 800
    await release_all([big, got])


async def test_a_model_at_its_limit_holds_back_no_other_model(
    make_limiter: LimiterFactory,
) -> None:
    """gpt-4o's one request a minute is used on both keys and a gpt-4o waiter heads the
    queue: a gpt-4o-mini request still passes it at once (it fits either key), and so
    does a queued one when room frees; the gpt-4o waiter keeps its place."""
    each = APILimits(max_concurrent=2, models={"gpt-4o": APILimits(requests_per_minute=1)})
    lim = make_limiter({"ai": APILimits(deployments={"key-a": each, "key-b": each})})
    big = [await lim.acquire("ai", timeout=0, model="gpt-4o") for _ in range(2)]
    waiter = asyncio.create_task(lim.acquire("ai", timeout=30, model="gpt-4o"))
    await wait_for_waiters(lim, "ai", 1)
    mini = await lim.acquire("ai", timeout=2, model="gpt-4o-mini")  # past the gpt-4o waiter
    more = await lim.acquire("ai", timeout=2, model="gpt-4o-mini")
    assert {mini.deployment, more.deployment} == {"key-a", "key-b"}  # both keys now full
    queued = asyncio.create_task(lim.acquire("ai", timeout=10, model="gpt-4o-mini"))
    await wait_for_waiters(lim, "ai", 2)
    await mini.release()  # a slot frees: the gpt-4o-mini waiter, not gpt-4o's, takes it
    got = await asyncio.wait_for(queued, 10)
    assert got.deployment == mini.deployment
    assert not waiter.done()
    assert (await lim.stats("ai"))["waiting"] == 1
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    await release_all([*big, more, got])


async def test_other_models_pass_a_blocked_head_by_priority(make_limiter: LimiterFactory) -> None:
    """Behind a gpt-4o waiter of priority 20 (the head) held by its model's limit, two
    gpt-4o-mini waiters (priority 0 first, then priority 10) wait for the key's one slot:
    when it frees, they pass the head, the priority 10 one first."""
    each = APILimits(max_concurrent=1, models={"gpt-4o": APILimits(requests_per_minute=1)})
    lim = make_limiter({"ai": APILimits(deployments={"key-a": each})})
    big = await lim.acquire("ai", timeout=0, model="gpt-4o")
    await big.release()  # gpt-4o's one request of the minute is used; the slot is free
    holder = await lim.acquire("ai", timeout=0, model="gpt-4o-mini")
    blocked = asyncio.create_task(lim.acquire("ai", timeout=30, model="gpt-4o", priority=20))
    await wait_for_waiters(lim, "ai", 1)
    low = asyncio.create_task(lim.acquire("ai", timeout=30, model="gpt-4o-mini", priority=0))
    await wait_for_waiters(lim, "ai", 2)
    high = asyncio.create_task(lim.acquire("ai", timeout=30, model="gpt-4o-mini", priority=10))
    await wait_for_waiters(lim, "ai", 3)
    await holder.release()
    got = await asyncio.wait_for(high, 10)
    assert not low.done()
    await got.release()
    await (await asyncio.wait_for(low, 10)).release()
    blocked.cancel()
    with pytest.raises(asyncio.CancelledError):
        await blocked
