"""A Redis restarted mid-run (scripts and keys gone): the limiter carries on, loudly."""

from __future__ import annotations

import asyncio
import logging
import re

import pytest

from limiter import AcquireTimeout, APILimits, LeaseLost, Limiter, LimiterUnavailable
from limiter.testing import RedisServer
from tests.conftest import wait_for_waiters

pytestmark = pytest.mark.redis


async def test_restart_reloads_scripts_and_reports_lost_leases() -> None:
    """After a restart a held slot's release raises LeaseLost, and admission goes on."""
    with RedisServer() as server:
        lim = Limiter.from_url(server.url, {"a": APILimits(max_concurrent=1)})
        held = await lim.acquire("a")
        server.restart()
        with pytest.raises(LeaseLost):
            await held.release()
        again = await lim.acquire("a", timeout=2)
        assert again.held
        with pytest.raises(AcquireTimeout):
            await lim.acquire("a", timeout=0)
        await again.release()
        stats = await lim.stats("a")
        # The slot whose lease was lost still counts its (finished) call.
        assert (stats["concurrent_requests"], stats["successful_requests"]) == (0, 2)
        await lim.aclose()


async def test_waiter_survives_a_restart() -> None:
    """A waiter queued before a restart is admitted after it, once the slot is free."""
    with RedisServer() as server:
        limits = {"a": APILimits(max_concurrent=1)}
        holder = Limiter.from_url(server.url, limits, ticket_ttl=0.3)
        waiting = Limiter.from_url(server.url, limits, ticket_ttl=0.3)
        held = await holder.acquire("a")
        task = asyncio.create_task(waiting.acquire("a", timeout=5))
        await wait_for_waiters(holder, "a", 1)
        server.restart()
        with pytest.raises(LeaseLost):
            await held.release()
        slot = await asyncio.wait_for(task, 4)
        assert slot.held
        await slot.release()
        await holder.aclose()
        await waiting.aclose()


async def test_wake_ups_come_back_for_a_waiter_queued_before_the_restart() -> None:
    """The wake-up subscription dies with the restart; the waiter's next renewal brings it
    back, so a later release hands it the slot at once, not at its next renewal.

    ticket_ttl=6 puts renewals 2 s apart: an admission within 0.3 s of the release came by
    the wake-up message.
    """
    with RedisServer() as server:
        limits = {"a": APILimits(max_concurrent=1)}
        async with (
            Limiter.from_url(server.url, limits) as holder,
            Limiter.from_url(server.url, limits, ticket_ttl=6) as waiting,
        ):
            held = await holder.acquire("a")
            task = asyncio.create_task(waiting.acquire("a", timeout=20))
            await asked_again(holder)  # it listens, and asked again (restart blocks the loop)
            server.restart()
            with pytest.raises(LeaseLost):
                await held.release()
            held = await holder.acquire("a", timeout=0)  # before the waiter asks again
            # The waiter's renewal finds its ticket gone, queues again, and subscribes again.
            await asked_again(holder)
            released = asyncio.get_running_loop().time()
            await held.release()
            slot = await asyncio.wait_for(task, 10)
            assert asyncio.get_running_loop().time() - released < 0.3
            await slot.release()


async def asked_again(lim: Limiter, within: float = 10.0) -> None:
    """Return once the one waiter of "a" listens for wake-ups and has asked a second time.

    A waiter subscribes after its first call, then asks again; the second call moves its
    ticket's expiry. Polls Redis state: there is no local event to await.
    """
    r = lim.redis
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    first = None
    while True:
        assert loop.time() < deadline, f"the waiter did not ask again within {within}s"
        tickets = await r.zrange("limiter:{a}:queue", 0, -1)
        if len(tickets) == 1 and await r.pubsub_channels("limiter:wake:*"):
            expiry = await r.zscore("limiter:{a}:qexp", tickets[0])
            if first is None:
                first = expiry
            elif expiry != first:
                return
        await asyncio.sleep(0.01)


def _withdraw_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "limiter" and r.getMessage().startswith("could not withdraw ticket")
    ]


async def _fail(lim: Limiter, n: int) -> None:
    """``n`` acquires that fail at once (Redis is down), then their withdrawals finish."""
    for _ in range(n):
        with pytest.raises(LimiterUnavailable):
            await lim.acquire("a", timeout=5)
    await asyncio.gather(*list(lim._background))  # the withdrawals, in the background


async def test_one_withdraw_warning_per_outage(caplog: pytest.LogCaptureFixture) -> None:
    """While Redis is down every failed acquire fails to withdraw its ticket too: one
    warning says so (and that the rest are not logged), not one line per acquire. Once
    Redis answered again, the next outage gets its own warning."""
    caplog.set_level(logging.WARNING, logger="limiter")
    with RedisServer() as server:
        lim = Limiter.from_url(server.url, {"a": APILimits(max_concurrent=1)})
        await (await lim.acquire("a", timeout=1)).release()
        server.kill()
        await _fail(lim, 40)
        warnings = _withdraw_warnings(caplog)
        assert len(warnings) == 1
        assert re.fullmatch(
            r"could not withdraw ticket \w+\.\d+ \(it expires by itself within ticket_ttl; "
            r"later failures to withdraw are not logged until Redis is reachable again\): "
            r"limiter unavailable during withdraw for API 'a': ConnectionError: .+",
            warnings[0],
        ), warnings[0]
        await _fail(lim, 5)  # the same outage: still one
        assert len(_withdraw_warnings(caplog)) == 1
        server.restart()
        await (await lim.acquire("a", timeout=2)).release()  # Redis is reachable again
        server.kill()
        await _fail(lim, 40)
        assert len(_withdraw_warnings(caplog)) == 2
        await lim.aclose()


async def test_one_renewal_warning_per_outage(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A slot held through an outage: its renewals (every lease_ttl / 3) fail, and one
    warning says so, not one per renewal; the first renewal that works again says so once
    (INFO), and the next outage gets its own warning."""
    caplog.set_level(logging.INFO, logger="limiter")
    with RedisServer() as server:
        lim = Limiter.from_url(server.url, {"a": APILimits(max_concurrent=1, lease_ttl=0.3)})
        tries: list[bool] = []
        renew = lim._waiting.renew

        async def counted() -> None:
            try:
                await renew()
            except LimiterUnavailable:
                tries.append(False)
                raise
            tries.append(True)

        monkeypatch.setattr(lim._waiting, "renew", counted)

        def said(words: str) -> list[str]:
            return [r.getMessage() for r in caplog.records if words in r.getMessage()]

        async def until_tries(n: int, ok: bool) -> None:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 10
            while tries[-n:] != [ok] * n or len(tries) < n:
                assert loop.time() < deadline, f"no {n} renewals with ok={ok}: {tries}"
                await asyncio.sleep(0.02)  # renewals run by themselves: watch them

        held = await lim.acquire("a", timeout=1)
        server.kill()
        await until_tries(4, False)
        assert len(said("lease renewal failed")) == 1
        server.restart()
        await until_tries(2, True)  # the slot itself is lost (Redis forgot it), but the
        assert len(said("lease renewal works again")) == 1  # renewal call works
        server.kill()
        await until_tries(3, False)
        assert len(said("lease renewal failed")) == 2
        server.restart()
        with pytest.raises(LeaseLost):
            await held.release()
        await lim.aclose()
