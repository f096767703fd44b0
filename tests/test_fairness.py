"""The fair queue in one process: priorities, tenants' shares, weights, aging, scope.

Each test runs on fakeredis and on a real redis-server. With ``max_concurrent=1`` the
order in which waiters are admitted is the serving order the scripts chose; each waiter
is queued only after the one before it (``wait_for_waiters``), so arrival order is known.
The multi-process properties (shares while both wait, bounds) are in
``test_fairness_cluster.py``.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

import limiter
from limiter import APILimits, ConfigError, Limiter
from tests.conftest import LimiterFactory, wait_for_waiters


async def served_order(
    lim: Limiter, api: str, requests: list[tuple[str, dict[str, Any]]]
) -> list[str]:
    """Hold the API's one slot, queue ``requests`` (label, acquire kwargs) in order, then
    let go: returns the labels in the order they were admitted."""
    order: list[str] = []
    holder = await lim.acquire(api)
    base = (await lim.stats(api))["waiting"]

    async def one(label: str, kwargs: dict[str, Any]) -> None:
        slot = await lim.acquire(api, timeout=30, **kwargs)
        order.append(label)
        await slot.release()

    tasks = []
    for i, (label, kwargs) in enumerate(requests, start=1):
        tasks.append(asyncio.create_task(one(label, kwargs)))
        await wait_for_waiters(lim, api, base + i)
    await holder.release()
    await asyncio.gather(*tasks)
    return order


async def test_one_tenant_is_served_first_come_first_served(make_limiter: LimiterFactory) -> None:
    lim = make_limiter({"a": APILimits(max_concurrent=1)})
    order = await served_order(lim, "a", [(f"r{i}", {"tenant": "t"}) for i in range(6)])
    assert order == [f"r{i}" for i in range(6)]


async def test_the_highest_priority_is_served_first(make_limiter: LimiterFactory) -> None:
    """Waiters of priority 10 that came last pass every waiter of priority 0 and -5;
    within one priority the order is FIFO."""
    lim = make_limiter({"a": APILimits(max_concurrent=1)})
    reqs = [
        ("low1", {"priority": -5}),
        ("mid1", {}),
        ("mid2", {"priority": 0}),
        ("high1", {"priority": 10}),
        ("low2", {"priority": -5}),
        ("high2", {"priority": 10}),
    ]
    assert await served_order(lim, "a", reqs) == ["high1", "high2", "mid1", "mid2", "low1", "low2"]


async def test_a_tenant_behind_a_backlog_is_served_every_other_turn(
    make_limiter: LimiterFactory,
) -> None:
    """One tenant queues 6 before another queues 3: once both wait, they alternate (the
    newcomer starts at the backlogged tenant's service, ties go by name), then the rest of
    the backlog follows."""
    lim = make_limiter({"a": APILimits(max_concurrent=1)})
    reqs = [(f"heavy{i}", {"tenant": "heavy"}) for i in range(6)]
    reqs += [(f"light{i}", {"tenant": "light"}) for i in range(3)]
    order = await served_order(lim, "a", reqs)
    assert order == [
        "heavy0", "light0", "heavy1", "light1", "heavy2", "light2", "heavy3", "heavy4", "heavy5"
    ]  # fmt: skip


async def test_tenants_level_on_service_are_served_in_the_order_they_began_waiting(
    make_limiter: LimiterFactory,
) -> None:
    """Tenants with one waiter each are all level (each starts at the least service of
    those waiting): they are served first come, first served, not by name."""
    lim = make_limiter({"a": APILimits(max_concurrent=1)})
    names = ["user-029", "user-015", "user-000", "zed", "alpha", "user-100"]
    order = await served_order(lim, "a", [(n, {"tenant": n}) for n in names])
    assert order == names


async def test_weights_give_shares_in_proportion(make_limiter: LimiterFactory) -> None:
    """Weights 3:1: while both tenants wait, the heavier one gets 3 of every 4 admissions."""
    lim = make_limiter({"a": APILimits(max_concurrent=1, tenant_weights={"gold": 3.0})})
    reqs = [(f"gold{i}", {"tenant": "gold"}) for i in range(9)]
    reqs += [(f"free{i}", {"tenant": "free"}) for i in range(3)]
    order = await served_order(lim, "a", reqs)
    for n in (4, 8, 12):
        first = order[:n]
        assert sum(x.startswith("gold") for x in first) == 3 * n // 4, order
    # FIFO within each tenant
    assert [x for x in order if x.startswith("gold")] == [f"gold{i}" for i in range(9)]


async def test_service_is_counted_in_tokens_when_the_api_has_a_token_budget(
    make_limiter: LimiterFactory,
) -> None:
    """A tenant asking 1,000 tokens a request is served once for every ten requests of a
    tenant asking 100: equal tokens, not equal requests."""
    lim = make_limiter({"a": APILimits(max_concurrent=1, tokens_per_minute=1_000_000)})
    reqs = [(f"big{i}", {"tenant": "big", "tokens": 1000}) for i in range(3)]
    reqs += [(f"small{i}", {"tenant": "small", "tokens": 100}) for i in range(12)]
    order = await served_order(lim, "a", reqs)
    assert order[:12] == ["big0"] + [f"small{i}" for i in range(10)] + ["big1"]


async def test_a_tenant_back_from_idle_banks_no_credit(make_limiter: LimiterFactory) -> None:
    """A tenant served alone from the queue, then joined by another: the newcomer starts
    at the other's service, so it is served every other turn, not until it catches up."""
    lim = make_limiter({"a": APILimits(max_concurrent=1)})
    order: list[str] = []
    holder = await lim.acquire("a")

    fourth = asyncio.Event()

    async def one(label: str, tenant: str, hold: asyncio.Event | None = None) -> None:
        slot = await lim.acquire("a", timeout=30, tenant=tenant)
        order.append(label)
        if len(order) == 4:
            fourth.set()
        if hold is not None:
            await hold.wait()
        await slot.release()

    gate = asyncio.Event()
    tasks = []
    for i in range(8):
        # "b" is served 4 times alone; the 4th holds the slot until "a" has queued.
        hold = gate if i == 3 else None
        tasks.append(asyncio.create_task(one(f"b{i}", "b", hold)))
        await wait_for_waiters(lim, "a", i + 1)
    await holder.release()
    await fourth.wait()
    for i in range(3):
        tasks.append(asyncio.create_task(one(f"a{i}", "a")))
        await wait_for_waiters(lim, "a", 4 + i + 1)
    gate.set()
    await asyncio.gather(*tasks)
    # "a" starts level with "b" (not at 0); on a tie the tenant backlogged first goes first.
    assert order == ["b0", "b1", "b2", "b3", "b4", "a0", "b5", "a1", "b6", "a2", "b7"]


async def test_a_waiter_that_waited_priority_aging_passes_higher_priorities(
    make_limiter: LimiterFactory,
) -> None:
    """With priority_aging=0.3 s, a priority -5 waiter queued 0.3 s before the slot frees
    is served before priority 10 waiters that came later; without aging it is served last."""
    for aging, expected in ((0.3, ["old", "new0", "new1"]), (None, ["new0", "new1", "old"])):
        lim = make_limiter({"a": APILimits(max_concurrent=1, priority_aging=aging)})
        order: list[str] = []
        holder = await lim.acquire("a")

        async def one(
            label: str, priority: int, lim: Limiter = lim, order: list[str] = order
        ) -> None:
            slot = await lim.acquire("a", timeout=30, priority=priority)
            order.append(label)
            await slot.release()

        tasks = [asyncio.create_task(one("old", -5))]
        await wait_for_waiters(lim, "a", 1)
        await asyncio.sleep(0.4)  # the "old" waiter ages (Redis time decides, not ours)
        for i in range(2):
            tasks.append(asyncio.create_task(one(f"new{i}", 10)))
            await wait_for_waiters(lim, "a", 2 + i)
        await holder.release()
        await asyncio.gather(*tasks)
        assert order == expected, (aging, order)
        await lim.reset("a")


async def test_scope_gives_the_tenant_and_priority_of_calls_inside_it(
    make_limiter: LimiterFactory,
) -> None:
    """limiter.scope sets tenant and priority for acquire/slot/call made inside it (and
    in tasks it starts); explicit arguments win; an inner scope changes what it names."""
    lim = make_limiter({"a": APILimits(max_concurrent=1)})
    holder = await lim.acquire("a")
    with limiter.scope(tenant="user-42", priority=10):
        t1 = asyncio.create_task(lim.acquire("a", timeout=30))
        await wait_for_waiters(lim, "a", 1)
        with limiter.scope(priority=-3):
            t2 = asyncio.create_task(lim.acquire("a", timeout=30))
            await wait_for_waiters(lim, "a", 2)
        async with limiter.scope(tenant="other"):
            t3 = asyncio.create_task(lim.acquire("a", timeout=30, priority=7))
            await wait_for_waiters(lim, "a", 3)
    t4 = asyncio.create_task(lim.acquire("a", timeout=30))
    await wait_for_waiters(lim, "a", 4)
    stats = await lim.stats("a")
    assert stats["waiting_by_priority"] == {10: 1, -3: 1, 7: 1, 0: 1}
    assert {t: v["waiting"] for t, v in stats["tenants"].items()} == {
        "user-42": 2,
        "other": 1,
        "": 1,
    }
    await holder.release()
    for t in (t1, t3, t4, t2):  # serving order: 10, 7, 0, -3
        slot = await t
        await slot.release()


async def test_set_tenant_weight_changes_shares_for_every_replica(
    make_limiter: LimiterFactory,
) -> None:
    """A weight set at run time through one limiter applies to admissions another makes."""
    a = make_limiter({"a": APILimits(max_concurrent=1)})
    b = make_limiter({"a": APILimits(max_concurrent=1)})
    weights = await a.set_tenant_weight("a", "gold", 3.0)
    assert weights == {"gold": 3.0}
    reqs = [(f"gold{i}", {"tenant": "gold"}) for i in range(6)]
    reqs += [(f"free{i}", {"tenant": "free"}) for i in range(2)]
    order = await served_order(b, "a", reqs)
    assert sum(x.startswith("gold") for x in order[:4]) == 3, order
    stats = await b.stats("a")
    assert stats["tenant_weights"]["gold"] == {"weight": 3.0, "source": "runtime", "ttl": None}
    assert await a.set_tenant_weight("a", "gold", None) == {}
    assert "gold" not in (await b.stats("a"))["tenant_weights"]
    short = await a.set_tenant_weight("a", "x", 0.5, ttl=60)
    assert short == {"x": 0.5}
    ttl = (await b.stats("a"))["tenant_weights"]["x"]["ttl"]
    assert 59.0 <= ttl <= 60.0


async def test_fair_queue_state_goes_with_the_last_waiter(
    make_limiter: LimiterFactory, redis_client: Any
) -> None:
    """Once every waiter is served, no key of the fair queue is left for any tenant: state
    grows with the tenants waiting now, not with every tenant ever seen."""
    lim = make_limiter({"a": APILimits(max_concurrent=1)})
    reqs = [(f"r{i}", {"tenant": f"user-{i % 5}", "priority": i % 3}) for i in range(15)]
    await served_order(lim, "a", reqs)
    keys = sorted(k.decode() for k in await redis_client.keys("limiter:{a}:*"))
    assert not [k for k in keys if k.split(":", 2)[2].startswith(("q:", "t:", "a:", "classes"))]
    assert (await lim.stats("a"))["tenants"] == {}


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"tenant": ""}, "tenant"),
        ({"tenant": 5}, "tenant"),
        ({"tenant": "x" * 257}, "tenant"),
        ({"tenant": "\ud800"}, "tenant"),
        ({"priority": 1001}, "priority"),
        ({"priority": -1001}, "priority"),
        ({"priority": 1.5}, "priority"),
        ({"priority": True}, "priority"),
        ({"priority": "10"}, "priority"),
    ],
)
async def test_bad_tenant_or_priority_is_a_config_error_and_queues_nothing(
    make_limiter: LimiterFactory, kwargs: dict[str, Any], field: str
) -> None:
    lim = make_limiter({"a": APILimits(max_concurrent=1)})
    holder = await lim.acquire("a")
    for attempt in (
        lambda: lim.acquire("a", timeout=1, **kwargs),
        lambda: lim.call("a", asyncio.sleep, timeout=1, **kwargs),
    ):
        with pytest.raises(ConfigError) as info:
            await attempt()
        assert info.value.field == field
        assert repr(kwargs[field])[:40] in str(info.value)
    stats = await lim.stats("a")
    assert stats["waiting"] == 0
    assert stats["concurrent_requests"] == 1
    await holder.release()


@pytest.mark.parametrize("weight", [0, -1.0, float("nan"), float("inf"), "2", True, None, 1e10])
async def test_bad_weight_is_a_config_error(make_limiter: LimiterFactory, weight: Any) -> None:
    if weight is not None:
        with pytest.raises(ConfigError) as info:
            APILimits(tenant_weights={"t": weight})
        assert info.value.field == "APILimits.tenant_weights['t']"
    lim = make_limiter({"a": APILimits()})
    if weight is None:
        assert await lim.set_tenant_weight("a", "t", None) == {}  # None clears
        return
    with pytest.raises(ConfigError) as info:
        await lim.set_tenant_weight("a", "t", weight)
    assert info.value.field == "weight"
    assert (await lim.stats("a"))["tenant_weights"] == {}


def test_bad_fair_settings_are_config_errors() -> None:
    for aging in (0, -1.0, float("nan"), "30"):
        with pytest.raises(ConfigError) as info:
            APILimits(priority_aging=aging)  # type: ignore[arg-type]
        assert info.value.field == "APILimits.priority_aging"
    for weights in ({"": 1.0}, {5: 1.0}, [("a", 1.0)]):
        with pytest.raises(ConfigError) as info:
            APILimits(tenant_weights=weights)  # type: ignore[arg-type]
        assert info.value.field == "APILimits.tenant_weights"
    with pytest.raises(ConfigError):
        limiter.scope(priority=2000)
    with pytest.raises(ConfigError):
        limiter.scope(tenant="")


async def test_a_renewal_puts_back_a_waiter_whose_queue_keys_expired(
    make_limiter: LimiterFactory, redis_client: Any
) -> None:
    """The fair queue's keys live a ticket's life unless renewed: if they are gone while
    the waiter lives (an expiry, an operator's DEL), its next renewal queues it again in
    its tenant's place, and the next release admits it."""
    lim = make_limiter({"a": APILimits(max_concurrent=1)})
    holder = await lim.acquire("a")
    waiter = asyncio.create_task(lim.acquire("a", timeout=10, tenant="t", priority=3))
    await wait_for_waiters(lim, "a", 1)
    fair_keys = [
        k
        for k in await redis_client.keys("limiter:{a}:*")
        if k.decode().split(":", 2)[2].startswith(("q:", "t:", "m:", "classes"))
    ]
    assert len(fair_keys) == 4, fair_keys  # classes, t:3, m:3, q:3:t
    await redis_client.delete(*fair_keys)
    # The waiter's ticket is renewed once its process knows it waits (its first call's
    # answer has reached it): renew until the queue key is back, at most for 2 s.
    for _ in range(200):
        await lim.renew()
        if await redis_client.exists("limiter:{a}:q:3:t"):
            break
        await asyncio.sleep(0.01)
    assert await redis_client.exists("limiter:{a}:q:3:t") == 1
    await holder.release()
    slot = await asyncio.wait_for(waiter, 5)
    await slot.release()


async def test_a_tenant_with_one_request_at_a_time_is_charged_for_each(
    make_limiter: LimiterFactory,
) -> None:
    """A client that sends its next request as soon as the last one is admitted has one
    waiter at a time: each admission still counts (its counter is kept when it leaves the
    queue, and taken up when it comes back), so weights 3:1 give it 1 in 4, not 1 in 2."""
    lim = make_limiter({"a": APILimits(max_concurrent=1, tenant_weights={"big": 3.0})})
    order: list[str] = []
    holder = await lim.acquire("a")

    async def big() -> None:
        slot = await lim.acquire("a", timeout=30, tenant="big")
        order.append("big")
        await slot.release()

    async def small() -> None:
        for _ in range(5):
            slot = await lim.acquire("a", timeout=30, tenant="small")
            order.append("small")
            nxt = asyncio.create_task(lim.acquire("a", timeout=30, tenant="small"))
            await wait_for_waiters(lim, "a", 1)  # its next request waits before this ends
            await slot.release()
            slot = await nxt
            order.append("small")
            await slot.release()
            if len(order) >= 16:
                return

    bigs = []
    for i in range(16):
        bigs.append(asyncio.create_task(big()))
        await wait_for_waiters(lim, "a", i + 1)
    runner = asyncio.create_task(small())
    await wait_for_waiters(lim, "a", 17)
    await holder.release()
    await runner
    await asyncio.gather(*bigs)
    first = order[:16]
    assert first.count("small") == 4, order


async def test_a_lost_class_list_is_repaired_by_the_next_renewal(
    make_limiter: LimiterFactory, redis_client: Any
) -> None:
    """If the list of classes is lost (evicted, deleted) while tenants wait, the next
    renewal lists their class again and the queue moves: no waiter is stranded."""
    lim = make_limiter({"a": APILimits(max_concurrent=1)})
    holder = await lim.acquire("a")
    waiter = asyncio.create_task(lim.acquire("a", timeout=10, tenant="t"))
    await wait_for_waiters(lim, "a", 1)
    await redis_client.delete("limiter:{a}:classes")
    await holder.release()  # nothing listed: the slot stays free
    for _ in range(200):  # renew until the waiter's ticket is known to its process
        await lim.renew()
        if waiter.done():
            break
        await asyncio.sleep(0.01)
    slot = await asyncio.wait_for(waiter, 5)
    await slot.release()


async def test_one_scope_object_serves_several_tasks_at_once(
    make_limiter: LimiterFactory,
) -> None:
    """A scope made once (at module level, say) may be entered by concurrent tasks and
    again inside itself; each exit restores what its own entry replaced."""
    lim = make_limiter({"a": APILimits(max_concurrent=1)})
    batch = limiter.scope(tenant="batch", priority=-1)
    holder = await lim.acquire("a")
    gate = asyncio.Event()

    async def one() -> None:
        async with batch:
            task = asyncio.create_task(lim.acquire("a", timeout=30))
            await gate.wait()
        slot = await task
        await slot.release()

    tasks = [asyncio.create_task(one()) for _ in range(3)]
    await wait_for_waiters(lim, "a", 3)
    with batch, batch:
        inner = asyncio.create_task(lim.acquire("a", timeout=30, priority=1))
        await wait_for_waiters(lim, "a", 4)
    outside = asyncio.create_task(lim.acquire("a", timeout=30))
    await wait_for_waiters(lim, "a", 5)
    stats = await lim.stats("a")
    assert stats["waiting_by_priority"] == {-1: 3, 1: 1, 0: 1}
    assert stats["tenants"]["batch"]["waiting"] == 4
    gate.set()
    await holder.release()
    for t in (inner, outside):
        slot = await t
        await slot.release()
    await asyncio.gather(*tasks)


async def test_a_runtime_weight_for_a_keyed_api_names_its_key(
    make_limiter: LimiterFactory,
) -> None:
    """An API limited per key has one queue per key: set_tenant_weight(key=...) reaches it."""
    lim = make_limiter({"a": APILimits(max_concurrent=1)})
    assert await lim.set_tenant_weight("a", "gold", 3.0, key="k1") == {"gold": 3.0}
    assert (await lim.stats("a", key="k1"))["tenant_weights"]["gold"]["weight"] == 3.0
    assert "gold" not in (await lim.stats("a"))["tenant_weights"]
