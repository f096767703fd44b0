"""Item 10: does the fair queue cost more with 1,000 tenants waiting than with one?

Two namespaces of one API (``max_concurrent=1``) each hold a queue of ``waiting``
tickets: in ``one`` they all belong to one tenant, in ``many`` to ``waiting`` different
tenants over three priorities. The tickets are made by script calls of this process
under slot ids of a process that listens to nothing (no wake-up is read: only the
scripts' work is measured), with a ticket life longer than the run.

Each iteration, in both namespaces in turn (rotating which goes first), times:

- ``join``: a newcomer's first acquire call, refused and queued (mode "wait"): the
  fair queue's enqueue (and the drain it tries);
- ``hand-off``: the release of the slot's holder, which admits the next waiter in
  serving order (choose the class, the least-served tenant, its oldest ticket; count its
  service), tells its process and leaves the rest queued; the admitted waiter then holds
  the slot for the next iteration. The queue stays at ``waiting`` tickets.

Redis time per operation comes from ``INFO commandstats`` (``cmdstat_fcall`` or
``cmdstat_evalsha``) around each namespace's own calls. Target: ``many`` within 1.5x of
``one`` at p50 and in Redis time, for both operations.
"""

from __future__ import annotations

import time
from typing import Any

import redis.asyncio as aioredis

from limiter import APILimits, Limiter
from limiter._contract import full_reply

from ._util import CLIENT_TIMEOUTS, Check, Report, Row, Summary, summarize

__all__ = ["run_fairness"]

API = "fair"
LIMITS = {API: APILimits(max_concurrent=1, lease_ttl=600.0)}
#: The process id of the tickets: nobody listens on its channel.
GHOST = "ghost00000000000"


async def _redis_us(client: aioredis.Redis) -> tuple[int, int]:
    """Calls and microseconds of script commands Redis ran so far."""
    stats = await client.info("commandstats")
    calls = usec = 0
    for name in ("cmdstat_fcall", "cmdstat_evalsha"):
        got = stats.get(name)
        if got:
            calls += int(got["calls"])
            usec += int(got["usec"])
    return calls, usec


class _Queue:
    """One namespace's queue of ghost tickets, and the slot its holder has."""

    def __init__(self, client: aioredis.Redis, name: str, tenants: int) -> None:
        self.name = name
        self.tenants = tenants
        self.lim = Limiter(client, LIMITS, namespace=f"bench-fair-{name}", ticket_ttl=600.0)
        self.plan = self.lim._plans[API]
        self.run = self.lim._runner.run
        self.n = 0
        self.holder = ""
        self.samples: dict[str, list[int]] = {"join": [], "hand-off": []}
        self.redis_us: dict[str, int] = {"join": 0, "hand-off": 0}

    def _args(self, first: int) -> tuple[Any, ...]:
        self.n += 1
        tenant = f"user-{self.n % self.tenants}" if self.tenants > 1 else "user"
        priority = (0, 5, 10)[self.n % 3] if self.tenants > 1 else 0
        return (f"{GHOST}.{self.n}", 1, 0, b"wait", first, priority, "1.0", tenant, "", 0, 0)

    async def fill(self, waiting: int) -> None:
        await self.lim._runner.ready()  # the Functions library where the server has them
        res = full_reply("acquire", await self.run("acquire", self.plan, *self._args(1)))
        assert int(res[0]) == 1, res
        self.holder = f"{GHOST}.{self.n}"
        for _ in range(waiting):
            res = await self.run("acquire", self.plan, *self._args(1))
            assert int(res[0]) == 0, res

    async def step(self, probe: aioredis.Redis, clock: Any) -> None:
        c0, u0 = await _redis_us(probe)
        t0 = clock()
        res = await self.run("acquire", self.plan, *self._args(1))
        self.samples["join"].append(clock() - t0)
        c1, u1 = await _redis_us(probe)
        assert int(res[0]) == 0, res
        t0 = clock()
        res = await self.run(
            "release", self.plan, self.holder, 1, 0, 0, -1, 1, "", "", "", 0, -1, 0, -1
        )
        self.samples["hand-off"].append(clock() - t0)
        c2, u2 = await _redis_us(probe)
        res = full_reply("release", res)
        assert [int(v) for v in res] == [1, 1], f"{self.name}: release did not hand off: {res}"
        # INFO itself is not a script call; each window holds exactly one script call.
        assert (c1 - c0, c2 - c1) == (1, 1), (c1 - c0, c2 - c1)
        self.redis_us["join"] += u1 - u0
        self.redis_us["hand-off"] += u2 - u1
        # The admitted waiter is the new holder: the one the scripts chose.
        holders = await probe.zrange(self.plan.key("holders"), 0, -1)
        assert len(holders) == 1, holders
        self.holder = holders[0].decode()


async def run_fairness(url: str, waiting: int, n: int, report: Report) -> None:
    """Item 10, appended to ``report``."""
    client = aioredis.from_url(url, **CLIENT_TIMEOUTS)
    probe = aioredis.from_url(url, **CLIENT_TIMEOUTS)
    queues = [_Queue(client, "one", 1), _Queue(client, "many", waiting)]
    try:
        for q in queues:
            await q.fill(waiting)
        clock = time.perf_counter_ns
        warm = max(20, n // 20)
        for i in range(warm + n):
            order = queues if i % 2 == 0 else queues[::-1]
            for q in order:
                await q.step(probe, clock)
            if i + 1 == warm:
                for q in queues:
                    q.samples = {k: [] for k in q.samples}
                    q.redis_us = dict.fromkeys(q.redis_us, 0)
        sums: dict[tuple[str, str], Summary] = {}
        for q in queues:
            for op, values in q.samples.items():
                sums[(q.name, op)] = summarize(values)
                who = "1 tenant" if q.tenants == 1 else f"{q.tenants:,} tenants, 3 priorities"
                report.rows.append(
                    Row(
                        item="10",
                        label=f"fair queue, {waiting:,} waiting ({who}): {op}",
                        summary=sums[(q.name, op)],
                        note=f"Redis time {q.redis_us[op] / len(values):.1f} µs/op",
                    )
                )
        one, many = queues
        for op in ("join", "hand-off"):
            p50 = sums[("many", op)].p50_us / sums[("one", op)].p50_us
            redis_ratio = many.redis_us[op] / max(1, one.redis_us[op])
            report.checks.append(
                Check(
                    f"10. fair queue {op}: {waiting:,} tenants vs 1 tenant, {waiting:,} waiting",
                    f"p50 {p50:.2f}x, Redis time {redis_ratio:.2f}x "
                    f"({many.redis_us[op] / n:.1f} vs {one.redis_us[op] / n:.1f} µs)",
                    "within 1.5x",
                    p50 <= 1.5 and redis_ratio <= 1.5,
                )
            )
    finally:
        for q in queues:
            await q.lim.aclose()
        await client.aclose()
        await probe.aclose()
