"""``on_redis_error="fail_open"``: Redis unreachable, each replica admits only its share.

Redis is made unreachable with a proxy the test cuts (``tests/_proxy.py``): every
connection to it is closed at once, as with a dead or partitioned server. Replicas are
separate :class:`Limiter` objects (each one heartbeats as its own process would).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack

import pytest

from limiter import AcquireTimeout, APILimits, Limiter, LimiterUnavailable, Rate
from limiter.testing import RedisServer
from tests._fleet import max_overlap
from tests._proxy import Proxy

pytestmark = [pytest.mark.redis]

API = "fo"
TRIP = "Redis is unreachable"


@pytest.fixture
async def proxy(redis_server: RedisServer, real_redis: object) -> AsyncIterator[Proxy]:
    """A proxy to the session's (flushed) redis-server."""
    async with Proxy(redis_server.port) as p:
        yield p


def fail_open_limiter(proxy: Proxy, limits: APILimits) -> Limiter:
    return Limiter.from_url(proxy.url, {API: limits}, on_redis_error="fail_open")


async def three_replicas(stack: AsyncExitStack, proxy: Proxy, limits: APILimits) -> list[Limiter]:
    """Three fail_open limiters through ``proxy``, each having seen all three by heartbeat."""
    replicas = [await stack.enter_async_context(fail_open_limiter(proxy, limits)) for _ in range(3)]
    for _ in range(2):  # the first round registers them all, the second reads the count
        counts = [await lim.heartbeat() for lim in replicas]
    assert counts == [3, 3, 3]
    return replicas


def warnings_with(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if text in r.getMessage()]


async def test_each_replica_admits_at_most_its_share(
    proxy: Proxy, caplog: pytest.LogCaptureFixture
) -> None:
    """3 replicas, Redis cut: each holds <= 6 // 3 = 2 slots and takes <= 9 // 3 = 3 per 0.5 s.

    Summed, the fleet stays within max_concurrent=6 and Rate(9, 0.5). Each replica warns
    once, however many requests it admits locally.
    """
    limits = APILimits(max_concurrent=6, rates=[Rate(9, 0.5)])
    async with AsyncExitStack() as stack:
        replicas = await three_replicas(stack, proxy, limits)
        for lim in replicas:
            async with lim.slot(API) as slot:
                assert not slot.local
        caplog.set_level(logging.WARNING, logger="limiter")
        proxy.cut()

        deadline = time.monotonic() + 1.2
        records: list[list[tuple[int, int]]] = [[] for _ in replicas]
        admit_times: list[list[float]] = [[] for _ in replicas]

        async def worker(i: int, lim: Limiter) -> None:
            while (left := deadline - time.monotonic()) > 0:
                try:
                    slot = await lim.acquire(API, timeout=left)
                except AcquireTimeout:
                    return
                assert slot.local
                start = time.monotonic_ns()
                # The admission's own time (this host's clock, read with the local
                # window's): a time read after acquire returned carries the scheduling
                # delays of a loaded machine, which can bring 4 admissions within 0.5 s.
                admit_times[i].append(slot.acquired_at / 1_000_000)
                await asyncio.sleep(0.02)
                end = time.monotonic_ns()
                await slot.release()
                records[i].append((start, end))

        await asyncio.gather(*(worker(i, lim) for i, lim in enumerate(replicas) for _ in range(8)))

    for i in range(3):
        peak = max_overlap(records[i])
        assert peak == 2, f"replica {i}: {peak} slots at once, its share is 2"
        assert most_in_window(admit_times[i], 0.5) == 3, f"replica {i}: share of the window"
    everyone = [t for times in admit_times for t in times]
    assert most_in_window(everyone, 0.5) <= 9
    assert max_overlap([r for rs in records for r in rs]) <= 6
    assert len(warnings_with(caplog, TRIP)) == 3  # once per replica


async def test_the_breaker_stops_hammering_and_probes_until_redis_answers(
    proxy: Proxy, caplog: pytest.LogCaptureFixture
) -> None:
    """While Redis is cut, 300 admissions cost a handful of connection attempts (probes with
    backoff 0.25, 0.5, 1 s...), not one or two per request; once it answers, admission goes
    back to Redis within the probe backoff."""
    async with fail_open_limiter(proxy, APILimits(max_concurrent=30)) as lim:
        async with lim.slot(API):
            pass
        proxy.cut()
        caplog.set_level(logging.WARNING, logger="limiter")
        cut_at = time.monotonic()
        local = 0
        while time.monotonic() - cut_at < 1.6:
            slots = [await lim.acquire(API, timeout=1) for _ in range(10)]
            local += sum(s.local for s in slots)
            for s in slots:
                await s.release()
            await asyncio.sleep(0.05)
        assert local >= 300
        # The request that found Redis gone and the withdrawal of its ticket, each tried
        # twice (again on a fresh connection), then probes 0.25 and 0.75 s after the cut
        # (the next is at 1.75 s), each tried twice: at most 4 + 2 * 2. Without the
        # breaker it would be two attempts per request, 600 or more.
        assert proxy.cut_attempts <= 8, f"{proxy.cut_attempts} connection attempts"
        proxy.heal()
        healed = time.monotonic()
        while True:
            async with lim.slot(API, timeout=1) as slot:
                if not slot.local:
                    break
            assert time.monotonic() - healed < 5.5, "still local 5.5 s after Redis came back"
            await asyncio.sleep(0.05)
        assert (await lim.stats(API))["successful_requests"] >= 1
    assert len(warnings_with(caplog, TRIP)) == 1
    assert len(warnings_with(caplog, "Redis answers again")) == 1


async def test_slots_held_through_redis_count_in_the_share(proxy: Proxy) -> None:
    """A replica holding 2 Redis slots when Redis goes has used its share of 2 (6 // 3)."""
    limits = APILimits(max_concurrent=6)
    async with AsyncExitStack() as stack:
        lim = (await three_replicas(stack, proxy, limits))[0]
        held = [await lim.acquire(API), await lim.acquire(API)]
        proxy.cut()
        with pytest.raises(AcquireTimeout) as refused:
            await lim.acquire(API, timeout=0)
        assert refused.value.reason == "concurrency"
        await held[0].release()  # Redis is gone: no error, the lease ends by itself
        slot = await lim.acquire(API, timeout=0)
        assert slot.local
        await slot.release()
        await held[1].release()


async def test_calls_admitted_locally_are_counted_in_redis_once_it_answers(
    proxy: Proxy,
) -> None:
    """Redis comes back while 6 local calls (2 per replica) still run: each replica has Redis
    count its calls, so another limiter finds max_concurrent=6 taken, not 6 free slots."""
    limits = APILimits(max_concurrent=6)
    async with AsyncExitStack() as stack:
        replicas = await three_replicas(stack, proxy, limits)
        proxy.cut()
        local = [await lim.acquire(API, timeout=1) for lim in replicas for _ in range(2)]
        assert all(slot.local for slot in local)
        proxy.heal()
        newcomer = await stack.enter_async_context(Limiter.from_url(proxy.url, {API: limits}))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 8  # each replica's breaker probes within 0.25 + 0.5 s
        while (await newcomer.stats(API))["concurrent_requests"] < 6:
            assert loop.time() < deadline, "the local calls were never counted in Redis"
            await asyncio.sleep(0.05)  # polls Redis state: no local event to await
        assert not any(slot.local for slot in local)
        with pytest.raises(AcquireTimeout):
            await newcomer.acquire(API, timeout=0)
        for slot in local:
            await slot.release()
        assert (await newcomer.stats(API))["concurrent_requests"] == 0


async def test_a_cooldown_is_honoured_locally(proxy: Proxy) -> None:
    """A provider pause set before the outage still holds requests back while Redis is cut."""
    async with fail_open_limiter(proxy, APILimits(max_concurrent=4)) as lim:
        await lim.heartbeat()
        await lim.cooldown(API, 0.6)
        proxy.cut()
        with pytest.raises(AcquireTimeout) as refused:
            await lim.acquire(API, timeout=0)
        assert refused.value.reason == "cooldown"
        started = time.monotonic()
        async with lim.slot(API, timeout=2) as slot:
            assert slot.local
        assert time.monotonic() - started <= 0.6


async def test_no_known_replica_count_refuses_rather_than_guesses() -> None:
    """fail_open on a Redis never reached: LimiterUnavailable at once, no local admission."""
    with RedisServer() as gone:
        port = gone.port
    lim = Limiter.from_url(
        f"redis://127.0.0.1:{port}/0",
        {API: APILimits(max_concurrent=4)},
        on_redis_error="fail_open",
    )
    started = time.monotonic()
    try:
        with pytest.raises(LimiterUnavailable, match="replica"):
            await lim.acquire(API, timeout=5)
    finally:
        await lim.aclose()
    assert time.monotonic() - started < 1.5


async def test_a_share_of_zero_refuses(proxy: Proxy) -> None:
    """max_concurrent=2 over 3 replicas: a share of 0, so Redis down means no admission."""
    limits = APILimits(max_concurrent=2)
    async with AsyncExitStack() as stack:
        replicas = await three_replicas(stack, proxy, limits)
        proxy.cut()
        with pytest.raises(LimiterUnavailable, match="share of the concurrency limit"):
            await replicas[0].acquire(API, timeout=1)


async def test_errors_that_are_not_outages_are_raised() -> None:
    """A wrong password is a mistake to report, not an outage to admit through."""
    with RedisServer(password="right-one") as server:
        lim = Limiter.from_url(
            f"redis://:wrong-one@127.0.0.1:{server.port}/0",
            {API: APILimits(max_concurrent=4)},
            on_redis_error="fail_open",
        )
        try:
            with pytest.raises(LimiterUnavailable) as raised:
                await lim.acquire(API, timeout=1)
        finally:
            await lim.aclose()
    assert "wrong-one" not in str(raised.value)


def most_in_window(times: list[float], period: float) -> int:
    """Most admissions within any half-open window [t, t + period)."""
    window: deque[float] = deque()
    best = 0
    for t in sorted(times):
        window.append(t)
        while window[0] <= t - period:
            window.popleft()
        best = max(best, len(window))
    return best
