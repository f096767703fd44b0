"""The fair queue across separate OS processes on one real redis-server.

Each tenant's requests come from its own worker process (``load`` in
``tests/_workers.py``); the referee is the holders' own records: each admission's Redis
time (``acquired_at``) and the real time its request was sent. Synchronisation goes
through Redis (the barrier, the queue's size), never through sleeps.

Bounds stated here, each with why it is the bound:
- a tenant arriving behind another's backlog of 60 gets >= 40% of the admissions made
  while both wait (the rule gives every other admission: 50%), and its first request is
  admitted within 3 admissions of being sent (the one in flight when it reaches Redis,
  the other tenant winning the tie on name, then it; FIFO would make it wait for the
  whole backlog);
- weights 3:1 give 3:1 +-15% of the admissions while both are backlogged;
- a priority-10 request sent while ~28 priority-0 waiters queue is admitted by the next
  release after its ticket reaches Redis: at most 1 other admission between its sending
  and its admission (the one a release in flight may make);
- with priority_aging=0.5 s, a priority-0 request under a continuous priority-10 flood
  waits at most 0.5 s + 0.3 s (the slot that frees next, and scheduling on a loaded
  machine); with strict priority it waits for the flood to end.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from limiter import Limiter
from limiter.testing import RedisServer
from tests._fleet import API, Fleet
from tests._workers import limits_of

pytestmark = [pytest.mark.redis, pytest.mark.multiprocess]


@pytest.fixture
def fleet(redis_server: RedisServer, client: aioredis.Redis, tmp_path: Path) -> Iterator[Fleet]:
    f = Fleet(redis_server.url, client, tmp_path)
    try:
        yield f
    finally:
        f.close()


async def until(lim: Limiter, what: str, n: int, within: float = 20.0) -> None:
    """Return once stats()[what] reaches ``n`` (polls the cluster's state: no event)."""
    deadline = time.monotonic() + within
    while (await lim.stats(API))[what] < n:
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not reach {n} within {within}s")
        await asyncio.sleep(0.005)


async def results(fleet: Fleet, *names: str, within: float = 60.0) -> dict[str, list[Any]]:
    out = {}
    for name in names:
        r = await fleet.result(name, within=within)
        assert r["errors"] == [], "\n\n".join(r["errors"])
        out[name] = r["admissions"]
    return out


def tagged(admissions: dict[str, list[Any]]) -> list[tuple[int, str, int]]:
    """Every admission as (Redis time, worker, send time), in Redis-time order."""
    return sorted((a[2], name, a[0]) for name, rows in admissions.items() for a in rows)


async def test_a_tenant_behind_a_backlog_of_60_gets_its_share(fleet: Fleet) -> None:
    spec = {"max_concurrent": 2}
    fleet.start(
        "load",
        "heavy",
        limits=spec,
        tenant="heavy",
        tasks=60,
        hold=0.02,
        iterations=1,
        acquire_timeout=30,
    )
    fleet.start(
        "load",
        "light",
        limits=spec,
        tenant="light",
        tasks=20,
        hold=0.02,
        iterations=1,
        acquire_timeout=30,
    )
    await fleet.ready(2)
    async with Limiter.from_url(fleet.url, limits_of(API, spec)) as lim:
        held = [await lim.acquire(API, timeout=0) for _ in range(2)]
        await fleet.go("heavy")
        await until(lim, "waiting", 60)
        for slot in held:
            await slot.release()
        await until(lim, "successful_requests", 2 + 6)  # heavy's backlog is being served
        await fleet.go("light")
        got = await results(fleet, "heavy", "light")
    order = tagged(got)
    light = [t for t in order if t[1] == "light"]
    first_sent = min(t[2] for t in light)
    both = [t for t in order if first_sent <= t[0] <= light[-1][0]]
    share = sum(t[1] == "light" for t in both) / len(both)
    assert share >= 0.40, f"light got {share:.0%} of {len(both)} admissions while both waited"
    heavy_left = [t for t in order if t[1] == "heavy" and t[0] > light[-1][0]]
    assert heavy_left, "heavy's backlog ran out while light waited: the test proves nothing"
    before_first = [t for t in order if first_sent <= t[0] < light[0][0]]
    assert len(before_first) <= 3, f"{len(before_first)} admissions before light's first"


async def test_weights_three_to_one_give_three_to_one(fleet: Fleet, client: Any) -> None:
    spec = {"max_concurrent": 2, "tenant_weights": {"gold": 3.0}}
    fleet.start(
        "load",
        "gold",
        limits=spec,
        tenant="gold",
        tasks=60,
        hold=0.01,
        iterations=1,
        acquire_timeout=30,
    )
    fleet.start(
        "load",
        "free",
        limits=spec,
        tenant="free",
        tasks=60,
        hold=0.01,
        iterations=1,
        acquire_timeout=30,
    )
    await fleet.ready(2)
    async with Limiter.from_url(fleet.url, limits_of(API, spec)) as lim:
        held = [await lim.acquire(API, timeout=0) for _ in range(2)]
        await fleet.go("gold", "free")
        await until(lim, "waiting", 120)
        for slot in held:
            await slot.release()
        got = await results(fleet, "gold", "free")
    order = tagged(got)
    # Both are backlogged until gold's 60 are served (after 80 admissions at 3:1).
    first = order[:72]
    gold = sum(t[1] == "gold" for t in first)
    ratio = gold / (len(first) - gold)
    assert 3 * 0.85 <= ratio <= 3 * 1.15, f"gold:free = {gold}:{len(first) - gold}"


async def test_a_high_priority_request_takes_the_next_free_slot(fleet: Fleet) -> None:
    spec = {"max_concurrent": 2}
    fleet.start(
        "load",
        "low",
        limits=spec,
        tenant="batch",
        priority=0,
        tasks=32,
        hold=0.05,
        iterations=1,
        acquire_timeout=30,
    )
    fleet.start(
        "load",
        "high",
        limits=spec,
        tenant="user",
        priority=10,
        tasks=1,
        hold=0,
        iterations=1,
        acquire_timeout=30,
    )
    await fleet.ready(2)
    async with Limiter.from_url(fleet.url, limits_of(API, spec)) as lim:
        held = [await lim.acquire(API, timeout=0) for _ in range(2)]
        await fleet.go("low")
        await until(lim, "waiting", 32)
        for slot in held:
            await slot.release()
        await until(lim, "successful_requests", 6)  # the low backlog is being served
        await fleet.go("high")
        got = await results(fleet, "low", "high")
    ((sent, _, at, _, _),) = got["high"]
    between = [a for a in got["low"] if sent <= a[2] < at]
    assert len(between) <= 1, f"{len(between)} low-priority admissions passed it"
    waiting_low = [a for a in got["low"] if a[2] > at]
    assert len(waiting_low) >= 20, "the low-priority backlog was gone: the test proves nothing"


@pytest.mark.parametrize("aging", [0.5, None])
async def test_aging_bounds_a_low_priority_wait_under_a_flood(
    fleet: Fleet, aging: float | None
) -> None:
    spec: dict[str, Any] = {"max_concurrent": 2, "priority_aging": aging}
    fleet.start(
        "load",
        "flood",
        limits=spec,
        tenant="users",
        priority=10,
        tasks=8,
        hold=0.02,
    )
    fleet.start(
        "load",
        "low",
        limits=spec,
        tenant="batch",
        priority=0,
        tasks=1,
        hold=0,
        iterations=1,
        acquire_timeout=30,
    )
    await fleet.ready(2)
    async with Limiter.from_url(fleet.url, limits_of(API, spec)) as lim:
        flood_ends = time.time() + 2.5
        await fleet.go("flood", deadline=flood_ends)
        await until(lim, "successful_requests", 20)
        await fleet.go("low")
        got = await results(fleet, "flood", "low")
    ((sent, _, at, _, _),) = got["low"]
    waited = (at - sent) / 1e6
    flood_after = [a for a in got["flood"] if a[2] > at]
    if aging is not None:
        assert waited <= aging + 0.3, f"waited {waited:.3f}s with priority_aging={aging}"
        assert flood_after, "the flood had ended: the test proves nothing"
    else:
        # Strict priority: admitted only once the flood's own acquires stopped.
        last_sent = max(a[0] for a in got["flood"])
        assert at > last_sent, f"admitted {(last_sent - at) / 1e6:.3f}s before the flood ended"
