"""A Redis restarted mid-run (scripts and keys gone): the limiter carries on, loudly."""

from __future__ import annotations

import asyncio

import pytest

from limiter import AcquireTimeout, APILimits, LeaseLost, Limiter
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
