"""Runtime limits (set_limits / clear_limits / reset) and the registry of configurations.

Each test runs on fakeredis and on a real redis-server (``redis_client``).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

from limiter import AcquireTimeout, APILimits, ConfigError, LeaseLost, Limiter, Rate
from limiter._admin import registered
from tests.conftest import LimiterFactory, wait_for_waiters

pytestmark = pytest.mark.redis


async def _admit_all(lim: Limiter, api: str, n: int) -> list[Any]:
    return [await lim.acquire(api, timeout=0) for _ in range(n)]


async def test_an_override_binds_every_replica_and_clearing_restores(
    make_limiter: LimiterFactory,
) -> None:
    """max_concurrent 3 lowered to 1 by one limiter: the other admits one, not three."""
    limits = {"a": APILimits(max_concurrent=3)}
    ops, replica = make_limiter(limits), make_limiter(limits)
    held = await replica.acquire("a", timeout=0)
    shown = await ops.set_limits("a", max_concurrent=1)
    assert shown == {"max_concurrent": 1, "expires_in": None}
    with pytest.raises(AcquireTimeout) as refused:
        await replica.acquire("a", timeout=0)
    assert refused.value.reason == "concurrency"
    assert (await replica.stats("a"))["max_concurrent"] == 1
    await held.release()
    again = await replica.acquire("a", timeout=0)  # one in flight: the override's bound
    with pytest.raises(AcquireTimeout):
        await replica.acquire("a", timeout=0)
    await ops.clear_limits("a")
    more = await _admit_all(replica, "a", 2)  # 3 in flight again
    with pytest.raises(AcquireTimeout):
        await replica.acquire("a", timeout=0)
    st = await replica.stats("a")
    assert (st["max_concurrent"], st["overrides"]) == (3, {})
    for slot in [again, *more]:
        await slot.release()


async def test_an_override_can_raise_a_limit(make_limiter: LimiterFactory) -> None:
    """A higher tier from the provider: 2 per minute raised to 4 admits exactly 4."""
    lim = make_limiter({"a": APILimits(requests_per_minute=2)})
    await lim.set_limits("a", requests_per_minute=4)
    slots = await _admit_all(lim, "a", 4)
    with pytest.raises(AcquireTimeout) as refused:
        await lim.acquire("a", timeout=0)
    assert refused.value.reason == "rate:60s"
    window = (await lim.stats("a"))["windows"]["rate:60s"]
    assert window == {"used": 4, "limit": 4}
    for slot in slots:
        await slot.release()


async def test_window_and_token_overrides_apply_to_their_own_window(
    make_limiter: LimiterFactory,
) -> None:
    """Per-hour, a Rate window and the token budget are overridden each on its own, and the
    scripts enforce each (refusal reasons), not just report it."""
    lim = make_limiter(
        {
            "a": APILimits(
                requests_per_minute=100,
                requests_per_hour=100,
                rates=[Rate(100, 10.0)],
                tokens_per_minute=1000,
            )
        }
    )
    shown = await lim.set_limits(
        "a", requests_per_hour=5, rates=[Rate(2, 10.0)], tokens_per_minute=20
    )
    assert shown == {"rate:3600s": 5, "rate:10s": 2, "tokens": 20, "expires_in": None}
    slots = [await lim.acquire("a", timeout=0, tokens=15)]
    with pytest.raises(AcquireTimeout) as refused:
        await lim.acquire("a", timeout=0, tokens=10)  # 25 > 20 tokens
    assert refused.value.reason == "tokens"
    slots.append(await lim.acquire("a", timeout=0))
    with pytest.raises(AcquireTimeout) as refused:
        await lim.acquire("a", timeout=0)  # 3 > 2 in 10 s
    assert refused.value.reason == "rate:10s"
    await lim.set_limits("a", rates=[Rate(100, 10.0)])  # the 10 s window back up
    slots += [await lim.acquire("a", timeout=0) for _ in range(3)]
    with pytest.raises(AcquireTimeout) as refused:
        await lim.acquire("a", timeout=0)  # 6 > 5 in an hour
    assert refused.value.reason == "rate:3600s"
    windows = (await lim.stats("a"))["windows"]
    assert windows["rate:60s"] == {"used": 5, "limit": 100}  # not overridden
    assert windows["rate:3600s"] == {"used": 5, "limit": 5}
    for slot in slots:
        await slot.release()


async def test_a_request_heavier_than_a_lowered_limit_never_blocks_the_queue(
    make_limiter: LimiterFactory,
) -> None:
    """Tokens 1000 lowered to 20: a new 50-token request is refused at once (ConfigError,
    nothing queued); one queued before the override is dropped when the queue moves and
    told why, and the small request behind it is admitted."""
    lim = make_limiter({"a": APILimits(max_concurrent=1, tokens_per_minute=1000)})
    held = await lim.acquire("a", timeout=0, tokens=5)
    heavy = asyncio.create_task(lim.acquire("a", timeout=10, tokens=50))
    await wait_for_waiters(lim, "a", 1)
    light = asyncio.create_task(lim.acquire("a", timeout=10, tokens=1))
    await wait_for_waiters(lim, "a", 2)
    await lim.set_limits("a", tokens_per_minute=20)
    with pytest.raises(ConfigError) as never:
        await lim.acquire("a", timeout=None, tokens=50)
    assert (never.value.field, never.value.value) == ("tokens", 50)
    assert "the tokens limit in force is 20" in str(never.value)
    await held.release()  # the queue moves: the heavy head is dropped, the light admitted
    with pytest.raises(ConfigError):
        await asyncio.wait_for(heavy, 5)
    slot = await asyncio.wait_for(light, 5)
    st = await lim.stats("a")
    assert (st["concurrent_requests"], st["waiting"]) == (1, 0)
    await slot.release()


async def test_one_lifetime_covers_the_whole_override(make_limiter: LimiterFactory) -> None:
    lim = make_limiter({"a": APILimits(max_concurrent=5, requests_per_minute=50)})
    await lim.set_limits("a", max_concurrent=1, ttl=600)
    with pytest.raises(ConfigError) as info:
        await lim.set_limits("a", requests_per_minute=10)  # would make max 1 permanent
    assert info.value.field == "ttl"
    assert "ends in 600s" in str(info.value)
    both = await lim.set_limits("a", requests_per_minute=10, ttl=60)
    assert both["max_concurrent"] == 1
    assert 0 < both["expires_in"] <= 60
    await lim.clear_limits("a")
    await lim.set_limits("a", max_concurrent=2)
    with pytest.raises(ConfigError) as info:
        await lim.set_limits("a", requests_per_minute=10, ttl=60)  # would end max 2
    assert "has no end" in str(info.value)
    assert (await lim.stats("a"))["overrides"] == {"max_concurrent": 2, "expires_in": None}


async def test_a_lowered_limit_holds_queued_waiters_until_use_falls_below_it(
    make_limiter: LimiterFactory,
) -> None:
    """Waiters queued at max 2 wait when it drops to 1: a release hands over only below it."""
    lim = make_limiter({"a": APILimits(max_concurrent=2)})
    a, b = await _admit_all(lim, "a", 2)
    waiter = asyncio.create_task(lim.acquire("a", timeout=5))
    await wait_for_waiters(lim, "a", 1)
    await lim.set_limits("a", max_concurrent=1)
    await a.release()  # 1 in flight, the override's max: nothing is handed over
    st = await lim.stats("a")  # a hand-over is decided inside the release script
    assert (st["concurrent_requests"], st["waiting"]) == (1, 1)
    await b.release()
    slot = await asyncio.wait_for(waiter, 5)
    assert (await lim.stats("a"))["concurrent_requests"] == 1
    await slot.release()


async def test_an_override_with_a_ttl_ends_by_itself(make_limiter: LimiterFactory) -> None:
    # A short ticket_ttl: queued waiters ask again every ticket_ttl / 3 (0.2 s here).
    lim = make_limiter({"a": APILimits(max_concurrent=2)}, ticket_ttl=0.6)
    shown = await lim.set_limits("a", max_concurrent=1, ttl=0.3)
    assert 0 < shown["expires_in"] <= 0.3
    held = await lim.acquire("a", timeout=0)
    with pytest.raises(AcquireTimeout):
        await lim.acquire("a", timeout=0)
    second = await lim.acquire("a", timeout=5)  # admitted once the override is gone
    assert (await lim.stats("a"))["overrides"] == {}
    await held.release()
    await second.release()


@pytest.mark.parametrize(
    ("kwargs", "field", "says"),
    [
        ({"rates": [Rate(3, 1.0)]}, "rates[0]", "no rate:1s window"),
        ({"requests_per_hour": 5}, "requests_per_hour", "no rate:3600s window"),
        ({"tokens_per_minute": 5}, "tokens_per_minute", "no token budget"),
        ({"max_concurrent": 0}, "max_concurrent", "max_concurrent=0"),
        ({"max_concurrent": True}, "max_concurrent", "max_concurrent=True"),
        ({"requests_per_minute": 2**53}, "requests_per_minute", "2**53 - 1"),
        ({"rates": "3/1"}, "rates", "sequence of Rate"),
        ({}, "limits", "no limit to set"),
        ({"max_concurrent": 1, "ttl": float("nan")}, "ttl", "ttl=nan"),
        ({"max_concurrent": 1, "ttl": 0}, "ttl", "ttl=0"),
    ],
)
async def test_bad_overrides_name_the_field_and_change_nothing(
    make_limiter: LimiterFactory, kwargs: dict[str, Any], field: str, says: str
) -> None:
    lim = make_limiter({"a": APILimits(max_concurrent=2, requests_per_minute=10)})
    with pytest.raises(ConfigError) as info:
        await lim.set_limits("a", **kwargs)
    assert info.value.field == field
    assert says in str(info.value)
    assert (await lim.stats("a"))["overrides"] == {}
    with pytest.raises(ConfigError) as unknown:
        await lim.set_limits("nope", max_concurrent=1)
    assert unknown.value.field == "api"


async def test_reset_forgets_state_and_holders_learn_it(make_limiter: LimiterFactory) -> None:
    """After reset the windows are empty, totals zero, and a holder's release is LeaseLost."""
    lim = make_limiter({"a": APILimits(max_concurrent=1, requests_per_minute=1)})
    held = await lim.acquire("a", timeout=0)
    await lim.set_limits("a", max_concurrent=1)
    await lim.cooldown("a", 30)
    await lim.reset("a")
    st = await lim.stats("a")
    assert st["concurrent_requests"] == 0
    assert st["total_requests"] == 0
    assert st["cooldown_remaining"] == 0
    assert st["windows"]["rate:60s"]["used"] == 0
    assert st["overrides"] == {"max_concurrent": 1, "expires_in": None}  # kept
    fresh = await lim.acquire("a", timeout=0)
    with pytest.raises(LeaseLost):
        await held.release()
    await fresh.release()


async def _keys(redis: Any) -> set[str]:
    return {k.decode() for k in await redis.keys("*")}


async def test_reset_clears_the_windows_of_an_earlier_configuration(
    make_limiter: LimiterFactory, redis_client: Any
) -> None:
    """A reset by a limiter configured otherwise (the windows of 1 s and a minute and the
    token budget dropped for an hour) forgets them all: this layout keeps every request
    window in one log. The keys the 0.1.0 layout left (a ``w:<period>`` key per window,
    ``cooldown``, ``stats``, ``extra``, ``override``) go too, found by SCAN; the keys of
    other APIs, of per-key limits, of other namespaces, the registry and the tenant
    weights stay."""
    before = {
        "a": APILimits(
            max_concurrent=5, rates=[Rate(5, 1)], requests_per_minute=10, tokens_per_minute=900
        )
    }
    old = make_limiter(before)
    for slot in [await old.acquire("a", timeout=0, tokens=100) for _ in range(3)]:
        await slot.release()
    await old.set_tenant_weight("a", "acme", 2)
    await asyncio.gather(*list(old._background))  # the registry is written
    st = await old.stats("a")
    assert [w["used"] for w in st["windows"].values()] == [3, 3, 300]
    left = {  # what 0.1.0 wrote for API "a" (and what it wrote elsewhere)
        "limiter:{a}:w:1000000": "zset",
        "limiter:{a}:w:60000000": "zset",
        "limiter:{a}:w:3600000000": "zset",
        "limiter:{a}:cooldown": "string",
        "limiter:{a}:stats": "hash",
        "limiter:{a}:extra": "hash",
        "limiter:{a}:override": "hash",
        "limiter:{a/u1}:w:60000000": "zset",
        "limiter:{b}:w:60000000": "zset",
        "other:{a}:stats": "hash",
    }
    for key, kind in left.items():
        if kind == "zset":
            await redis_client.zadd(key, {"x.1|1": 1})
        elif kind == "hash":
            await redis_client.hset(key, "max_concurrent", 1)
        else:
            await redis_client.set(key, 1)
    now = make_limiter({"a": APILimits(requests_per_hour=100)}, register=False)
    assert await now.reset("a") == 7
    assert await _keys(redis_client) == {
        "limiter:apis",
        "limiter:{a}:config",
        "limiter:{a}:weights",
        "limiter:{a/u1}:w:60000000",
        "limiter:{b}:w:60000000",
        "other:{a}:stats",
    }
    st = await old.stats("a")
    assert [w["used"] for w in st["windows"].values()] == [0, 0, 0]
    assert (st["total_requests"], st["tenant_weights"]["acme"]["weight"]) == (0, 2.0)
    assert await now.reset("a") == 0  # nothing of 0.1.0 left


async def test_limiters_register_their_limits_with_a_ttl(
    make_limiter: LimiterFactory, redis_client: Any
) -> None:
    limits = {
        "a": APILimits(max_concurrent=2, requests_per_minute=10, rates=[Rate(3, 1.5)]),
        "b": APILimits(tokens_per_minute=500, lease_ttl=5),
    }
    lim = make_limiter(limits, stats_ttl=3600)
    await (await lim.acquire("a", timeout=0)).release()
    await asyncio.gather(*list(lim._background))  # the registry is written in the background
    found, broken = await registered(redis_client, "limiter")
    assert broken == {}
    assert set(found) == {"a", "b"}
    assert found["a"].max_concurrent == 2
    assert [(r.limit, r.period) for r in found["a"].windows] == [(10, 60.0), (3, 1.5)]
    assert (found["b"].tokens_per_minute, found["b"].lease_ttl) == (500, 5.0)
    for key in (b"limiter:apis", b"limiter:{a}:config", b"limiter:{b}:config"):
        assert 0 < await redis_client.pttl(key) <= 3_600_000
    # The registered limits plan the same keys as the application's.
    cli = make_limiter(found, register=False)
    assert cli._plans["a"].keys == lim._plans["a"].keys
    assert cli._plans["b"].keys == lim._plans["b"].keys


async def test_a_replica_configured_differently_is_warned_about(
    make_limiter: LimiterFactory, caplog: pytest.LogCaptureFixture
) -> None:
    first = make_limiter({"a": APILimits(max_concurrent=5)})
    await first.stats("a")
    await asyncio.gather(*list(first._background))
    odd = make_limiter({"a": APILimits(max_concurrent=8)})
    with caplog.at_level(logging.WARNING, logger="limiter"):
        await odd.stats("a")
        await asyncio.gather(*list(odd._background))
    said = [r.getMessage() for r in caplog.records if "differ" in r.getMessage()]
    assert len(said) == 1
    assert "max_concurrent 8 here, 5 in Redis" in said[0]
    alike = make_limiter({"a": APILimits(max_concurrent=8)})
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="limiter"):
        await alike.stats("a")
        await asyncio.gather(*list(alike._background))
    assert not [r for r in caplog.records if "differ" in r.getMessage()]


async def test_the_registry_is_written_again_after_a_flush(
    make_limiter: LimiterFactory, redis_client: Any
) -> None:
    """A flush (or a restart) takes the registry too: the next script reload rewrites it."""
    lim = make_limiter({"a": APILimits(max_concurrent=2)})
    await lim.stats("a")
    await asyncio.gather(*list(lim._background))
    await redis_client.flushall()
    await redis_client.script_flush()
    await lim.stats("a")  # NOSCRIPT: the script is loaded again
    await lim.stats("a")  # the next call writes the registry again
    await asyncio.gather(*list(lim._background))
    found, _ = await registered(redis_client, "limiter")
    assert list(found) == ["a"]


async def test_raising_or_clearing_a_limit_admits_the_waiters_that_now_fit(
    make_limiter: LimiterFactory,
) -> None:
    """Waiters queued behind max 1 are admitted by set_limits itself (max 3), and by
    clear_limits (back to the configured 3), not at their next periodic check."""
    lim = make_limiter({"a": APILimits(max_concurrent=3)})
    await lim.set_limits("a", max_concurrent=1)
    held = await lim.acquire("a", timeout=0)
    waiters = [asyncio.create_task(lim.acquire("a", timeout=10)) for _ in range(2)]
    await wait_for_waiters(lim, "a", 2)
    await lim.set_limits("a", max_concurrent=3)
    st = await lim.stats("a")  # decided inside set_limits' own script call
    assert (st["concurrent_requests"], st["waiting"]) == (3, 0)
    slots = [await asyncio.wait_for(w, 5) for w in waiters]
    for slot in slots:
        await slot.release()
    await lim.set_limits("a", max_concurrent=1)
    waiters = [asyncio.create_task(lim.acquire("a", timeout=10)) for _ in range(2)]
    await wait_for_waiters(lim, "a", 2)
    await lim.clear_limits("a")
    st = await lim.stats("a")
    assert (st["concurrent_requests"], st["waiting"]) == (3, 0)
    for slot in [held, *[await asyncio.wait_for(w, 5) for w in waiters]]:
        await slot.release()
