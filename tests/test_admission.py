"""Admission on one Redis, each test on fakeredis and on a real redis-server."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from limiter import (
    AcquireTimeout,
    APILimits,
    ConfigError,
    LeaseLost,
    Limiter,
    LimiterError,
    Rate,
)
from limiter._contract import full_reply
from tests.conftest import LimiterFactory, wait_for_waiters


async def test_concurrency_slots_cap_holders(make_limiter: LimiterFactory) -> None:
    """With max_concurrent=3, three slots are granted and a fourth try is refused."""
    lim = make_limiter({"a": APILimits(max_concurrent=3)})
    slots = [await lim.acquire("a", timeout=0) for _ in range(3)]
    with pytest.raises(AcquireTimeout) as info:
        await lim.acquire("a", timeout=0)
    assert info.value.reason == "concurrency"
    assert info.value.api == "a"
    assert (await lim.stats("a"))["concurrent_requests"] == 3
    await slots[0].release()
    again = await lim.acquire("a", timeout=0)
    assert (await lim.stats("a"))["concurrent_requests"] == 3
    for s in [*slots[1:], again]:
        await s.release()
    assert (await lim.stats("a"))["concurrent_requests"] == 0


async def test_acquire_timeout_is_a_timeout_error_with_context(
    make_limiter: LimiterFactory,
) -> None:
    """A wait that runs out raises AcquireTimeout (a TimeoutError) with reason and waited."""
    lim = make_limiter({"a": APILimits(max_concurrent=1)})
    held = await lim.acquire("a")
    start = time.monotonic()
    with pytest.raises(TimeoutError) as info:
        await lim.acquire("a", timeout=0.2)
    elapsed = time.monotonic() - start
    err = info.value
    assert isinstance(err, AcquireTimeout)
    assert err.reason == "concurrency"
    assert 0.2 <= err.waited <= elapsed
    stats = await lim.stats("a")
    assert stats["waiting"] == 0, "a timed-out waiter leaves no ticket behind"
    await held.release()


async def test_release_wakes_the_next_waiter(make_limiter: LimiterFactory) -> None:
    """A waiter blocked on concurrency is admitted as soon as the holder releases."""
    lim = make_limiter({"a": APILimits(max_concurrent=1)})
    held = await lim.acquire("a")
    waiter = asyncio.create_task(lim.acquire("a", timeout=5))
    await wait_for_waiters(lim, "a", 1)
    assert not waiter.done()
    await held.release()
    slot = await asyncio.wait_for(waiter, 1.0)
    assert slot.acquired_at >= held.acquired_at
    await slot.release()


async def test_window_refuses_then_admits_when_oldest_leaves(make_limiter: LimiterFactory) -> None:
    """Rate(3, 0.3): the fourth admission comes only once the first has left the window."""
    lim = make_limiter({"a": APILimits(rates=[Rate(3, 0.3)])})
    first = [await lim.acquire("a", timeout=0) for _ in range(3)]
    with pytest.raises(AcquireTimeout) as info:
        await lim.acquire("a", timeout=0)
    assert info.value.reason == "rate:0.3s"
    fourth = await lim.acquire("a", timeout=2)
    gap = fourth.acquired_at - first[0].acquired_at
    assert gap >= 300_000, "never 4 admissions within 0.3 s of Redis time"
    assert gap < 300_000 + 250_000, "the waiter sleeps until the window frees, not much longer"
    for s in [*first, fourth]:
        await s.release()


async def test_refusal_consumes_nothing(make_limiter: LimiterFactory) -> None:
    """A request refused by one limit leaves every other limit untouched (all or nothing)."""
    lim = make_limiter({"a": APILimits(max_concurrent=5, rates=[Rate(2, 60), Rate(100, 3600)])})
    slots = [await lim.acquire("a", timeout=0) for _ in range(2)]
    for _ in range(5):
        with pytest.raises(AcquireTimeout):
            await lim.acquire("a", timeout=0)
    stats = await lim.stats("a")
    assert stats["windows"]["rate:60s"]["used"] == 2
    assert stats["windows"]["rate:3600s"]["used"] == 2
    assert stats["concurrent_requests"] == 2
    assert stats["total_requests"] == 2
    assert stats["refusals"] == {"rate:60s": 5}
    for s in slots:
        await s.release()


async def test_cooldown_pauses_the_api(make_limiter: LimiterFactory) -> None:
    """cooldown() refuses every admission until it ends, and a shorter one never shortens it."""
    lim = make_limiter({"a": APILimits(max_concurrent=5)})
    assert await lim.cooldown("a", 0.4) == pytest.approx(0.4, abs=0.001)
    in_force = await lim.cooldown("a", 0.05)
    assert 0.3 < in_force <= 0.4
    with pytest.raises(AcquireTimeout) as info:
        await lim.acquire("a", timeout=0)
    assert info.value.reason == "cooldown"
    start = time.monotonic()
    slot = await lim.acquire("a", timeout=2)
    assert time.monotonic() - start >= 0.25
    assert (await lim.stats("a"))["cooldown_remaining"] == 0
    await slot.release()


async def test_fifo_within_a_process(make_limiter: LimiterFactory) -> None:
    """Waiters are admitted in the order they arrived."""
    lim = make_limiter({"a": APILimits(max_concurrent=1)})
    held = await lim.acquire("a")
    order: list[int] = []

    async def wait(i: int) -> None:
        async with lim.slot("a", timeout=5):
            order.append(i)
            await asyncio.sleep(0.005)

    tasks = []
    for i in range(6):
        tasks.append(asyncio.create_task(wait(i)))
        await wait_for_waiters(lim, "a", i + 1)
    await held.release()
    await asyncio.wait_for(asyncio.gather(*tasks), 5)
    assert order == list(range(6))


async def test_try_does_not_jump_the_queue(make_limiter: LimiterFactory) -> None:
    """timeout=0 is refused while others wait, even when a slot is momentarily free."""
    lim = make_limiter({"a": APILimits(rates=[Rate(1, 0.3)])})
    first = await lim.acquire("a", timeout=0)
    waiter = asyncio.create_task(lim.acquire("a", timeout=5))
    await wait_for_waiters(lim, "a", 1)
    with pytest.raises(AcquireTimeout):
        await lim.acquire("a", timeout=0)
    second = await asyncio.wait_for(waiter, 2)
    assert second.acquired_at - first.acquired_at >= 300_000
    await first.release()
    await second.release()


async def test_cancelled_waiter_leaks_nothing(make_limiter: LimiterFactory) -> None:
    """A waiter cancelled mid-wait leaves no ticket and does not hold up the next one."""
    lim = make_limiter({"a": APILimits(max_concurrent=1)})
    held = await lim.acquire("a")
    doomed = asyncio.create_task(lim.acquire("a", timeout=5))
    await wait_for_waiters(lim, "a", 1)
    doomed.cancel()
    with pytest.raises(asyncio.CancelledError):
        await doomed
    assert (await lim.stats("a"))["waiting"] == 0
    await held.release()
    slot = await lim.acquire("a", timeout=0)
    await slot.release()
    stats = await lim.stats("a")
    assert (stats["concurrent_requests"], stats["waiting"]) == (0, 0)


async def test_cancelled_holder_releases(make_limiter: LimiterFactory) -> None:
    """A task cancelled while holding a slot gives it back and counts a failure."""
    lim = make_limiter({"a": APILimits(max_concurrent=1)})
    entered = asyncio.Event()

    async def hold() -> None:
        async with lim.slot("a"):
            entered.set()
            await asyncio.sleep(30)

    task = asyncio.create_task(hold())
    await entered.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    slot = await lim.acquire("a", timeout=1)
    await slot.release()
    stats = await lim.stats("a")
    assert stats["failed_requests"] == 1
    assert stats["successful_requests"] == 1
    assert stats["concurrent_requests"] == 0


async def test_exception_in_body_counts_failure_and_propagates(
    make_limiter: LimiterFactory,
) -> None:
    """An exception inside `async with slot` propagates, the slot is freed, a failure counted."""
    lim = make_limiter({"a": APILimits(max_concurrent=1)})
    with pytest.raises(KeyError):
        async with lim.slot("a"):
            raise KeyError("boom")
    stats = await lim.stats("a")
    assert (stats["failed_requests"], stats["concurrent_requests"]) == (1, 0)
    assert stats["success_rate"] == 0.0


async def test_release_is_idempotent(make_limiter: LimiterFactory) -> None:
    """Releasing twice frees once and counts once."""
    lim = make_limiter({"a": APILimits(max_concurrent=2)})
    slot = await lim.acquire("a")
    await slot.release()
    await slot.release()
    stats = await lim.stats("a")
    assert stats["successful_requests"] == 1
    assert not slot.held


async def test_lost_lease_raises_on_release(
    make_limiter: LimiterFactory, redis_client: Any
) -> None:
    """A slot whose lease vanished (e.g. a failover) raises LeaseLost on release, not silence."""
    lim = make_limiter({"a": APILimits(max_concurrent=1)})
    slot = await lim.acquire("a")
    await redis_client.delete("limiter:{a}:holders")
    with pytest.raises(LeaseLost) as info:
        await slot.release()
    assert info.value.slot_id == slot.id
    assert isinstance(info.value, LimiterError)


async def test_lost_lease_found_by_renewal(make_limiter: LimiterFactory, redis_client: Any) -> None:
    """The renewer marks a slot whose lease is gone; its context exit raises LeaseLost."""
    lim = make_limiter({"a": APILimits(max_concurrent=1)})
    with pytest.raises(LeaseLost):
        async with lim.slot("a") as slot:
            await redis_client.delete("limiter:{a}:holders")
            await lim.renew()
            assert not slot.held


async def test_lost_lease_is_noted_on_a_body_exception(
    make_limiter: LimiterFactory, redis_client: Any
) -> None:
    """When the body raised, LeaseLost does not mask it: it is added as a note."""
    lim = make_limiter({"a": APILimits(max_concurrent=1)})
    with pytest.raises(RuntimeError) as info:
        async with lim.slot("a"):
            await redis_client.delete("limiter:{a}:holders")
            raise RuntimeError("body failed")
    assert any("lease" in note for note in info.value.__notes__)


async def test_renewal_keeps_a_slot_past_its_lease(make_limiter: LimiterFactory) -> None:
    """A live holder keeps its slot across several lease lengths."""
    lim = make_limiter({"a": APILimits(max_concurrent=1, lease_ttl=0.2)})
    async with lim.slot("a") as slot:
        await asyncio.sleep(0.9)
        assert slot.held
        with pytest.raises(AcquireTimeout):
            await lim.acquire("a", timeout=0)


async def test_expired_lease_frees_the_slot(make_limiter: LimiterFactory) -> None:
    """A holder that stops renewing (a crash) loses its slot once the lease ends."""
    crashed = make_limiter({"a": APILimits(max_concurrent=1, lease_ttl=0.3)})
    other = make_limiter({"a": APILimits(max_concurrent=1, lease_ttl=0.3)})
    slot = await crashed.acquire("a")
    assert crashed._waiting._renewer is not None
    crashed._waiting._renewer.cancel()  # the process is gone: nobody renews
    start = time.monotonic()
    mine = await other.acquire("a", timeout=3)
    waited = time.monotonic() - start
    assert 0.2 <= waited <= 0.3 + 1.0
    await mine.release()
    with pytest.raises(LeaseLost):
        await slot.release()


async def test_script_flush_is_survived(make_limiter: LimiterFactory, redis_client: Any) -> None:
    """After SCRIPT FLUSH the scripts are reloaded (NOSCRIPT) and admission goes on."""
    lim = make_limiter({"a": APILimits(max_concurrent=2)})
    slot = await lim.acquire("a")
    await redis_client.script_flush()
    await lim.renew()
    await slot.release()
    await redis_client.script_flush()
    async with lim.slot("a"):
        pass
    assert (await lim.stats("a"))["successful_requests"] == 2


async def test_every_key_has_a_ttl(make_limiter: LimiterFactory, redis_client: Any) -> None:
    """Every key the limiter writes has a TTL, while busy and while waiting."""
    lim = make_limiter(
        {"a": APILimits(max_concurrent=1, rates=[Rate(50, 1.0)], tokens_per_minute=1000)}
    )
    held = await lim.acquire("a", tokens=10)
    waiter = asyncio.create_task(lim.acquire("a", timeout=5, tokens=5))
    await wait_for_waiters(lim, "a", 1)
    await lim.cooldown("a", 0.01)
    keys = await redis_client.keys("*")
    assert len(keys) >= 7
    for key in keys:
        assert await redis_client.pttl(key) > 0, key
    await held.release()
    second = await asyncio.wait_for(waiter, 2)
    await second.release()
    for key in await redis_client.keys("*"):
        assert await redis_client.pttl(key) > 0, key


async def test_idle_api_leaves_nothing_behind(
    make_limiter: LimiterFactory, redis_client: Any
) -> None:
    """Once the longest window, lease and stats TTL have passed, no key of the API remains."""
    lim = make_limiter(
        {"a": APILimits(max_concurrent=1, rates=[Rate(5, 0.2)], lease_ttl=0.2)}, stats_ttl=0.2
    )
    async with lim.slot("a"):
        pass
    assert await redis_client.keys("*")
    await asyncio.sleep(1.4)  # TTLs are the longest period/lease + 1 s
    assert await redis_client.keys("*") == []


async def test_stats_counts_cluster_wide(make_limiter: LimiterFactory) -> None:
    """stats() counts the calls of every Limiter on the Redis, with the documented keys."""
    a = make_limiter({"x": APILimits(max_concurrent=4)})
    b = make_limiter({"x": APILimits(max_concurrent=4)})
    async with a.slot("x"):
        await asyncio.sleep(0.01)
    with pytest.raises(ValueError, match="x"):
        async with b.slot("x"):
            raise ValueError("x")
    held = await b.acquire("x")
    stats = await a.stats("x")
    assert stats["total_requests"] == 3
    assert stats["successful_requests"] == 1
    assert stats["failed_requests"] == 1
    assert stats["success_rate"] == 50.0
    assert stats["concurrent_requests"] == 1
    assert stats["average_response_time"] > 0.004
    assert set(await a.stats()) == {"x"}
    await held.release()


async def test_unknown_api_and_impossible_requests(make_limiter: LimiterFactory) -> None:
    """An unknown API, a cost above a window or tokens above the budget fail at once."""
    lim = make_limiter({"a": APILimits(rates=[Rate(3, 1.0)], tokens_per_minute=100)})
    with pytest.raises(ConfigError, match=r"unknown API 'b'.*'a'"):
        await lim.acquire("b")
    with pytest.raises(ConfigError, match="cost=4"):
        await lim.acquire("a", cost=4)
    with pytest.raises(ConfigError, match="tokens=101"):
        await lim.acquire("a", tokens=101)
    with pytest.raises(ConfigError, match="cost=0"):
        await lim.acquire("a", cost=0)
    with pytest.raises(ConfigError, match="timeout=-1"):
        await lim.acquire("a", timeout=-1)
    with pytest.raises(ConfigError, match="seconds=nan"):
        await lim.cooldown("a", float("nan"))


async def test_cost_weights_request_windows(make_limiter: LimiterFactory) -> None:
    """A request of cost 2 uses two units of every request window."""
    lim = make_limiter({"a": APILimits(rates=[Rate(5, 60)])})
    s1 = await lim.acquire("a", cost=2, timeout=0)
    s2 = await lim.acquire("a", cost=3, timeout=0)
    with pytest.raises(AcquireTimeout):
        await lim.acquire("a", timeout=0)
    assert (await lim.stats("a"))["windows"]["rate:60s"]["used"] == 5
    await s1.release()
    await s2.release()


async def test_tokens_are_reserved_and_reconciled(make_limiter: LimiterFactory) -> None:
    """Reserved tokens count at once; report_tokens() gives back an over-estimate."""
    lim = make_limiter({"a": APILimits(tokens_per_minute=100)})
    async with lim.slot("a", tokens=80) as slot:
        with pytest.raises(AcquireTimeout) as info:
            await lim.acquire("a", tokens=30, timeout=0)
        assert info.value.reason == "tokens"
        slot.report_tokens(20)
    assert (await lim.stats("a"))["windows"]["tokens"]["used"] == 20
    s2 = await lim.acquire("a", tokens=80, timeout=0)
    s2.report_tokens(95)
    await s2.release()
    assert (await lim.stats("a"))["windows"]["tokens"]["used"] == 115, (
        "an under-estimate is charged in full"
    )
    with pytest.raises(AcquireTimeout):
        await lim.acquire("a", tokens=1, timeout=0)


async def test_closed_limiter_refuses(make_limiter: LimiterFactory) -> None:
    """After aclose(), acquire fails loudly instead of hanging."""
    lim = make_limiter({"a": APILimits(max_concurrent=1)})
    await lim.aclose()
    with pytest.raises(LimiterError, match="closed"):
        await lim.acquire("a")


async def test_limiter_as_context_manager(redis_client: Any) -> None:
    """`async with Limiter(...)` closes it and gives back slots still held."""
    async with Limiter(redis_client, {"a": APILimits(max_concurrent=1)}) as lim:
        await lim.acquire("a")
        assert repr(lim) == "<Limiter namespace='limiter' apis=['a']>"
    async with Limiter(redis_client, {"a": APILimits(max_concurrent=1)}) as again:
        slot = await again.acquire("a", timeout=0)
        await slot.release()


async def test_window_margin_widens_every_window(make_limiter: LimiterFactory) -> None:
    """With window_margin m, limit+1 admissions are always at least period + m apart."""
    lim = make_limiter({"a": APILimits(rates=[Rate(2, 0.2)], window_margin=0.1)})
    slots = [await lim.acquire("a", timeout=2) for _ in range(3)]
    assert slots[2].acquired_at - slots[0].acquired_at >= 300_000
    for s in slots:
        await s.release()


async def test_waiting_ticket_is_kept_alive(make_limiter: LimiterFactory) -> None:
    """A waiter keeps its place in line for longer than ticket_ttl while its process lives."""
    limits = {"a": APILimits(max_concurrent=1)}
    holder = make_limiter(limits, ticket_ttl=0.3)
    first_lim = make_limiter(limits, ticket_ttl=0.3)
    second_lim = make_limiter(limits, ticket_ttl=0.3)
    held = await holder.acquire("a")
    first = asyncio.create_task(first_lim.acquire("a", timeout=5))
    await wait_for_waiters(holder, "a", 1)
    await asyncio.sleep(1.0)  # more than three ticket lengths
    second = asyncio.create_task(second_lim.acquire("a", timeout=5))
    await wait_for_waiters(holder, "a", 2)
    await held.release()
    got = await asyncio.wait_for(first, 1)
    assert not second.done()
    await got.release()
    await (await asyncio.wait_for(second, 1)).release()


async def test_keyed_limits_apply_per_key(make_limiter: LimiterFactory, redis_client: Any) -> None:
    """With key=, each key (a user, a tenant) gets the API's limits for itself, FIFO per key."""
    lim = make_limiter({"user": APILimits(max_concurrent=1)})
    alice = await lim.acquire("user", key="alice", timeout=0)
    bob = await lim.acquire("user", key="+55 11 9999-0000", timeout=0)
    with pytest.raises(AcquireTimeout):
        await lim.acquire("user", key="alice", timeout=0)
    waiter = asyncio.create_task(lim.acquire("user", key="alice", timeout=2))
    await asyncio.sleep(0.05)
    assert not waiter.done()
    assert (await lim.stats("user", key="alice"))["waiting"] == 1
    await alice.release()
    again = await asyncio.wait_for(waiter, 1)
    assert again.held
    await again.release()
    await bob.release()
    keys = {k.decode() for k in await redis_client.keys("*")}
    assert any(k.startswith("limiter:{user/alice}:") for k in keys)
    assert not any("+55" in k or " " in k for k in keys), "unsafe keys are hashed"
    assert (await lim.stats("user"))["total_requests"] == 0, "the API itself is untouched"


async def test_listeners_see_admissions_refusals_and_releases(
    make_limiter: LimiterFactory,
) -> None:
    """add_listener() reports admitted (with the wait and first reason), refused, released."""
    lim = make_limiter({"a": APILimits(max_concurrent=1)})
    events: list[tuple[str, str, dict[str, Any]]] = []
    lim.add_listener(lambda event, api, fields: events.append((event, api, fields)))
    held = await lim.acquire("a")
    waiter = asyncio.create_task(lim.acquire("a", timeout=2))
    await wait_for_waiters(lim, "a", 1)
    await held.release()
    await (await waiter).release()
    names = [e[0] for e in events]
    assert names == ["admitted", "refused", "released", "admitted", "released"]
    assert events[0][2]["reason"] is None
    assert events[3][2]["reason"] == "concurrency"
    assert events[3][2]["waited"] > 0
    assert events[2][2] == {"success": True, "lost": False}


async def test_trimming_a_log_keeps_its_windows_extra_weight_exact(
    make_limiter: LimiterFactory,
) -> None:
    """A request of cost 5 that left the window frees all 5 units even when the log is trimmed
    by a call that admits nothing (a cooldown, a renewal): 1 + 6 of 10 then passes."""
    lim = make_limiter({"a": APILimits(rates=(Rate(10, 2.0),), lease_ttl=60)})
    heavy = await lim.acquire("a", timeout=0, cost=5)
    await asyncio.sleep(1.0)
    light = await lim.acquire("a", timeout=0, cost=1)  # stays in the window until 3 s
    await asyncio.sleep(1.15)  # the heavy entry has left the 2 s window
    await lim.cooldown("a", 0.001)  # a call that refreshes the keys' TTLs and trims the log
    await asyncio.sleep(0.01)
    assert (await lim.stats("a"))["windows"]["rate:2s"]["used"] == 1
    slot = await lim.acquire("a", timeout=0, cost=6)  # refused before the fix: 1 + 4 + 6 > 10
    for s in (slot, heavy, light):
        await s.release()


async def test_a_handed_slot_keeps_its_admission_time_for_every_reader(
    make_limiter: LimiterFactory,
) -> None:
    """A slot handed to a waiter reports the hand-off's Redis time both to a renewal and to
    the waiter's own next call, whichever reads it first (the second was told a later
    time before, which put admissions out of place in the holders' own records)."""
    lim = make_limiter({"a": APILimits(max_concurrent=1)})
    plan, run = lim._plans["a"], lim._runner.run
    holder = await lim.acquire("a")
    assert (
        int((await run("acquire", plan, "w.1", 1, 0, b"wait", 1, 0, "1.0", "", "", 0, 0))[0]) == 0
    )  # queued
    await holder.release()  # hands the slot to w.1
    lost, admitted, gone = await run("renew", plan, 0, tail=("w.1|1|0|0|1.0||",))
    assert (lost, gone) == ([], [])
    assert admitted[0] == b"w.1"
    handed_at = int(admitted[1])
    await asyncio.sleep(0.02)
    again = await run(
        "acquire", plan, "w.1", 1, 0, b"wait", 0, 0, "1.0", "", "", 0, 0
    )  # the waiter asks again
    assert [int(v) for v in full_reply("acquire", again)] == [1, handed_at]
    await run("release", plan, "w.1", 1, handed_at, 0, -1, 1, "", "", "", 0, -1, 0, -1)


async def test_a_renewal_that_reports_a_hand_off_gives_the_waiter_a_full_lease(
    make_limiter: LimiterFactory, redis_client: Any
) -> None:
    """A slot handed to a ticket near its end (its renewals lost in a failover or a stall)
    is leased only until the ticket's end; the renewal that tells the waiter it holds the
    slot must lease it in full, else the lease runs out before the waiter's next renewal
    and a second request is admitted while the first still runs: 2 in flight of 1."""
    lim = make_limiter({"a": APILimits(max_concurrent=1, lease_ttl=60)})
    plan, run = lim._plans["a"], lim._runner.run
    ticket = "w.1|1|0|0|1.0||"
    holder = await lim.acquire("a")
    queued = await run("acquire", plan, "w.1", 1, 0, b"wait", 1, 0, "1.0", "", "", 0, 0)
    assert int(queued[0]) == 0
    sec, us = await redis_client.time()
    # The ticket's last renewal was lost: it ends 300 ms from now.
    await redis_client.zadd("limiter:{a}:qexp", {ticket: sec * 1_000_000 + us + 300_000})
    await holder.release()  # hands the slot to w.1, leased until its ticket's end
    lost, admitted, gone = await run("renew", plan, 0, tail=(ticket,))
    assert (lost, gone, admitted[0]) == ([], [], b"w.1")  # the waiter now holds the slot
    await asyncio.sleep(0.4)  # past the ticket's end, well before a lease's (60 s)
    with pytest.raises(AcquireTimeout):
        await lim.acquire("a", timeout=0)  # w.1 still holds the only slot
    lost, _, _ = await run("renew", plan, 1, tail=("w.1",))
    assert lost == []
