"""Separate OS processes sharing one real redis-server: the limits hold for the whole fleet.

Each test starts worker processes (``python -m tests._workers``, see that module) and
synchronises with them through Redis lists or by reading the limiter's state in Redis,
never by sleeping and hoping. Workers report what they observed as JSON; the assertions
are exact bounds on those observations. Every process started is reaped by the ``fleet``
fixture, also when a test fails.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from limiter import AcquireTimeout, Limiter
from limiter.testing import RedisServer
from tests._fleet import API, Fleet, max_overlap, most_admissions, window_violations
from tests._workers import limits_of

pytestmark = [pytest.mark.redis, pytest.mark.multiprocess]

QUEUE_KEY = f"limiter:{{{API}}}:queue"


def now_us() -> int:
    return time.time_ns() // 1000


@pytest.fixture
def fleet(redis_server: RedisServer, client: aioredis.Redis, tmp_path: Path) -> Iterator[Fleet]:
    """Start workers through this; each one is killed (if alive) and reaped afterwards."""
    f = Fleet(redis_server.url, client, tmp_path)
    try:
        yield f
    finally:
        f.close()


# -- observations -> bounds -----------------------------------------------------------


def outside_bracket(admissions: Iterable[Sequence[int]]) -> list[Sequence[int]]:
    """Admissions whose Redis time is not within [send - 1 ms, receive + 1 ms]."""
    return [a for a in admissions if not a[0] - 1000 <= a[2] <= a[1] + 1000]


async def until_queued(client: aioredis.Redis, n: int, within: float = 10.0) -> None:
    """Return once ``n`` tickets are in the queue (polls Redis state: no event to await)."""
    deadline = time.monotonic() + within
    while (queued := await client.zcard(QUEUE_KEY)) != n:
        if time.monotonic() > deadline:
            raise AssertionError(f"queue holds {queued} tickets, not {n}, after {within}s")
        await asyncio.sleep(0.002)


async def until_released(lim: Limiter, n: int, within: float = 10.0) -> int:
    """Return the cluster's count of released slots once it reaches ``n`` (polls stats())."""
    deadline = time.monotonic() + within
    while (done := (await lim.stats(API))["successful_requests"]) < n:
        if time.monotonic() > deadline:
            raise AssertionError(f"only {done} slots released, not {n}, after {within}s")
        await asyncio.sleep(0.005)
    return done


async def run_load(
    fleet: Fleet, n: int, *, run_for: float | None = None, **cfg: Any
) -> tuple[list[list[int]], int]:
    """Run ``n`` load workers from one go signal, for ``run_for`` seconds if given.

    Returns every admission they recorded and the deadline (real time, microseconds)
    until which they kept asking.
    """
    names = [f"w{i}" for i in range(n)]
    for name in names:
        fleet.start("load", name, **cfg)
    await fleet.ready(n)
    deadline = math.inf if run_for is None else time.time() + run_for
    if run_for is None:
        await fleet.go(*names)
    else:
        await fleet.go(*names, deadline=deadline)
    results = [await fleet.result(name) for name in names]
    errors = [e for r in results for e in r["errors"]]
    assert errors == [], "\n\n".join(errors)
    admissions = [a for r in results for a in r["admissions"]]
    return admissions, (0 if run_for is None else int(deadline * 1e6))


# -- the tests ------------------------------------------------------------------------


async def test_concurrency_bound_across_processes(fleet: Fleet) -> None:
    """4 processes x 16 tasks never hold more than max_concurrent=5 slots at once, and use all 5."""
    admissions, _ = await run_load(
        fleet, 4, limits={"max_concurrent": 5}, tasks=16, iterations=3, hold=0.02
    )
    assert len(admissions) == 4 * 16 * 3
    peak = max_overlap((a[3], a[4]) for a in admissions)
    assert peak <= 5, f"{peak} holders at once with max_concurrent=5"
    assert peak == 5, f"the limit was never used: at most {peak} holders at once"


async def test_rolling_window_bound_across_processes(fleet: Fleet) -> None:
    """4 processes get at most 10 admissions per rolling 0.5 s, and at least 36 of 40 in 2 s."""
    rates = [[10, 0.5]]
    span_us = 2_000_000
    admissions, deadline_us = await run_load(
        fleet, 4, run_for=2.5, limits={"rates": rates}, tasks=16, hold=0
    )
    assert outside_bracket(admissions) == [], "Redis admission times outside the client bracket"
    times = [a[2] for a in admissions]
    assert window_violations(times, 10, 500_000) == []
    first = min(times)
    assert first + span_us <= deadline_us, "the workers stopped asking before 2 s were over"
    used = sum(1 for t in times if t < first + span_us)
    possible = most_admissions(rates, span_us)
    assert possible == 40
    assert used >= math.ceil(0.9 * possible), f"{used} of {possible} admissions in 2 s"


async def test_concurrency_and_two_windows_across_processes(fleet: Fleet) -> None:
    """4 processes respect max_concurrent=4, Rate(5, 0.2) and Rate(12, 1.0) at once and use them."""
    rates = [[5, 0.2], [12, 1.0]]
    span_us = 2_000_000
    admissions, deadline_us = await run_load(
        fleet,
        4,
        run_for=2.5,
        limits={"max_concurrent": 4, "rates": rates},
        tasks=8,
        hold=0.02,
    )
    assert outside_bracket(admissions) == [], "Redis admission times outside the client bracket"
    peak = max_overlap((a[3], a[4]) for a in admissions)
    assert peak <= 4, f"{peak} holders at once with max_concurrent=4"
    assert peak == 4, f"the concurrency limit was never used: at most {peak} at once"
    times = [a[2] for a in admissions]
    assert window_violations(times, 5, 200_000) == []
    assert window_violations(times, 12, 1_000_000) == []
    first = min(times)
    assert first + span_us <= deadline_us, "the workers stopped asking before 2 s were over"
    used = sum(1 for t in times if t < first + span_us)
    possible = most_admissions(rates, span_us)
    assert possible == 24
    assert used >= math.ceil(0.9 * possible), f"{used} of {possible} admissions in 2 s"


async def test_killed_holders_slot_returns_after_its_lease(
    fleet: Fleet, client: aioredis.Redis
) -> None:
    """A holder SIGKILLed mid-hold frees its slot for another process within lease_ttl + 1 s."""
    spec = {"max_concurrent": 1, "lease_ttl": 1.0}
    fleet.start("hold", "holder", limits=spec, until="killed")
    held = await fleet.pop("held")
    async with Limiter.from_url(fleet.url, limits_of(API, spec)) as lim:
        waiter = asyncio.create_task(lim.acquire(API, timeout=5))
        try:
            await until_queued(client, 1)
            assert not waiter.done(), "admitted while the holder was alive"
            killed_us, killed = now_us(), time.monotonic()
            fleet.kill("holder")
            slot = await waiter
            elapsed = time.monotonic() - killed
            await slot.release()
        finally:
            waiter.cancel()
            await asyncio.gather(waiter, return_exceptions=True)
    assert slot.acquired_at > killed_us > held["acquired_at"], "admitted before the kill"
    assert elapsed <= 2.0, f"slot came back {elapsed:.3f}s after the kill (lease_ttl=1.0)"


async def test_renewal_keeps_a_live_holders_slot(fleet: Fleet) -> None:
    """A holder that only awaits keeps its slot for 5 lease lengths against another process."""
    spec = {"max_concurrent": 1, "lease_ttl": 0.5}
    fleet.start("hold", "holder", limits=spec, until="released")
    fleet.start("probe", "prober", limits=spec, probes=26, every=0.1)
    await fleet.pop("held")
    await fleet.ready(1)
    await fleet.go("prober")
    probes = (await fleet.result("prober"))["probes"]
    await fleet.push("release")
    holder = await fleet.result("holder")
    assert [p[2] for p in probes] == ["refused:concurrency"] * 26
    assert probes[-1][0] - probes[0][0] >= 2_500_000, "probes spanned less than 2.5 s"
    assert holder["held_for"] >= 2.5
    assert holder["held_before_release"] is True, "a renewal found the lease gone"
    assert holder["lease_lost"] is False, "release raised LeaseLost"
    assert holder["warnings"] == []


async def test_fifo_order_across_processes(fleet: Fleet, client: aioredis.Redis) -> None:
    """Waiters of three processes, queued one after another, are admitted in exactly that order."""
    spec = {"max_concurrent": 1}
    names = ["first", "second", "third"]
    for name in names:
        fleet.start("wait_once", name, limits=spec, timeout=10, hold=0.01)
    await fleet.ready(3)
    async with Limiter.from_url(fleet.url, limits_of(API, spec)) as lim:
        held = await lim.acquire(API, timeout=0)
        for queued, name in enumerate(names, start=1):
            await fleet.go(name)
            await until_queued(client, queued)
        freed_us = now_us()
        await held.release()
        results = [await fleet.result(name) for name in names]
    times = [r["acquired_at"] for r in results]
    assert freed_us <= times[0] < times[1] < times[2], f"admission times {times}"


async def test_dead_waiter_at_the_head_does_not_block_the_queue(
    fleet: Fleet, client: aioredis.Redis
) -> None:
    """A waiter SIGKILLed at the head delays the next by at most ticket_ttl + 1 s after a free."""
    spec = {"max_concurrent": 1}
    ticket_ttl = 0.5
    fleet.start("wait_once", "doomed", limits=spec, ticket_ttl=ticket_ttl, timeout=10, hold=0)
    fleet.start("wait_once", "next", limits=spec, ticket_ttl=ticket_ttl, timeout=3.0, hold=0)
    await fleet.ready(2)
    async with Limiter.from_url(fleet.url, limits_of(API, spec), ticket_ttl=ticket_ttl) as lim:
        held = await lim.acquire(API, timeout=0)
        await fleet.go("doomed")
        await until_queued(client, 1)
        await fleet.go("next")
        await until_queued(client, 2)
        fleet.kill("doomed")
        freed_us = now_us()
        await held.release()
        nxt = await fleet.result("next")
    assert "timeout" not in nxt, f"next waiter never admitted: {nxt['timeout']}"
    delay = nxt["acquired_at"] - freed_us
    assert delay <= (ticket_ttl + 1.0) * 1e6, f"admitted {delay / 1e6:.3f}s after the free"


async def test_script_flush_mid_run(fleet: Fleet, client: aioredis.Redis) -> None:
    """Two processes acquiring in a loop survive 5 SCRIPT FLUSHes with no error or excess holder."""
    names = ["w0", "w1"]
    spec = {"max_concurrent": 3, "lease_ttl": 0.6}
    for name in names:
        fleet.start("load", name, limits=spec, tasks=8, hold=0.005, stoppable=True)
    await fleet.ready(2)
    await fleet.go(*names)
    async with Limiter.from_url(fleet.url, limits_of(API, spec)) as lim:
        seen = 0
        for _ in range(5):
            seen = await until_released(lim, seen + 20)
            await client.script_flush()
        flushed_us = now_us()
        await until_released(lim, seen + 20)
    for name in names:
        await fleet.push(f"stop:{name}")
    results = [await fleet.result(name) for name in names]
    errors = [e for r in results for e in r["errors"]]
    assert errors == [], "\n\n".join(errors)
    assert [r["warnings"] for r in results] == [[], []]
    for r in results:
        assert any(a[0] > flushed_us for a in r["admissions"]), f"{r['name']} stalled"
    peak = max_overlap((a[3], a[4]) for r in results for a in r["admissions"])
    assert peak <= 3, f"{peak} holders at once with max_concurrent=3"


async def test_cancelled_holders_and_waiters_leak_nothing(fleet: Fleet) -> None:
    """Holders cancelled mid-hold and waiters cancelled mid-wait leave no slot or ticket behind."""
    spec = {"max_concurrent": 2}
    fleet.start("cancel", "canceller", limits=spec, ticket_ttl=2.0, holders=2, waiters=4)
    report = await fleet.pop("done")
    try:
        pending = "\n".join(report["pending"])
        assert not pending, f"still running 5 s after cancel():\n{pending}"
        assert report["outcomes"] == ["CancelledError"] * 6
        assert report["entered"] == 2, "a cancelled waiter was admitted into its body"
        async with Limiter.from_url(fleet.url, limits_of(API, spec)) as lim:
            stats = await lim.stats(API)
            leaked = (stats["concurrent_requests"], stats["waiting"])
            assert leaked == (0, 0), f"{stats}; worker's report: {report}"
            fresh = [await lim.acquire(API, timeout=0) for _ in range(2)]
            for slot in fresh:
                await slot.release()
    finally:
        await fleet.push("exit")
    await fleet.result("canceller")


@pytest.mark.parametrize("slot_free", [True, False], ids=["admitting", "queueing"])
async def test_acquire_cancelled_in_flight_leaks_nothing(fleet: Fleet, slot_free: bool) -> None:
    """An acquire cancelled while its first script call is in flight leaves no slot or ticket."""
    spec = {"max_concurrent": 1}
    fleet.start("cancel_in_flight", "canceller", limits=spec, slot_free=slot_free)
    report = await fleet.pop("done")
    try:
        assert report["outcome"] == "CancelledError"
        async with Limiter.from_url(fleet.url, limits_of(API, spec)) as lim:
            stats = await lim.stats(API)
            leaked = (stats["concurrent_requests"], stats["waiting"])
            assert leaked == (0, 0), f"{stats}; right after the cancel: {report}"
            try:
                fresh = await lim.acquire(API, timeout=0)
            except AcquireTimeout as exc:
                raise AssertionError(f"fresh acquire refused ({exc.reason}): {report}") from exc
            await fresh.release()
    finally:
        await fleet.push("exit")
    await fleet.result("canceller")
