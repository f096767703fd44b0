"""Item 9: does a long queue of waiters slow down admission?

The main process holds the only slot of API ``queued`` (``max_concurrent=1``);
``count`` waiters, spread over ``procs`` spawned processes, wait in
``lim.acquire("queued", timeout=...)`` until ``lim.stats("queued")["waiting"]`` shows all
of them queued. Then, in rotating order, the main process times:

- ``acquire("queued", timeout=0)``: one script call by a newcomer that is refused (it
  tries once and raises ``AcquireTimeout`` without queuing);
- an uncontended ``acquire`` + ``release`` on a second API, ``free``, same limiter;
- two no-op EVALSHA calls (control: the machine's state, not the queue).

Finally the holder releases and the queue drains through every waiter (each releases at
once); the drain time is reported too. Run for ``small`` and ``large`` queues; the ratio
large / small of the p50s is the figure of merit.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

import redis.asyncio as aioredis

from limiter import AcquireTimeout, APILimits, Limiter, Slot

from ._util import (
    CLIENT_TIMEOUTS,
    Check,
    Report,
    Row,
    Summary,
    collect,
    spawn_context,
    spawned,
    summarize,
)

__all__ = ["run_waiters"]

QUEUED, FREE = "queued", "free"
LIMITS = {
    QUEUED: APILimits(max_concurrent=1, requests_per_minute=10**9, requests_per_hour=10**9),
    FREE: APILimits(max_concurrent=1000, requests_per_minute=10**9, requests_per_hour=10**9),
}
#: Longest any waiter waits, seconds (the run releases them long before).
WAIT_TIMEOUT = 120.0


def _pooled_client(url: str) -> aioredis.Redis:
    """A client whose callers queue for one of 50 connections.

    ``Limiter.from_url``'s client has redis-py's default pool: at most 100 connections,
    and the 101st concurrent caller fails at once (``MaxConnectionsError``, raised as
    ``LimiterUnavailable``). Hundreds of waiters in one process need a blocking pool.
    """
    pool = aioredis.BlockingConnectionPool.from_url(
        url, max_connections=50, timeout=30, **CLIENT_TIMEOUTS
    )
    return aioredis.Redis(connection_pool=pool)


async def _wait_many(url: str, namespace: str, count: int, ready: Any) -> dict[str, Any]:
    client = _pooled_client(url)
    lim = Limiter(client, LIMITS, namespace=namespace)
    errors: list[str] = []
    last = 0.0

    async def one() -> None:
        nonlocal last
        slot = await lim.acquire(QUEUED, timeout=WAIT_TIMEOUT)
        await slot.release()
        last = max(last, time.time())

    try:
        await lim.stats(QUEUED)  # connected, scripts loaded
        tasks = [asyncio.create_task(one()) for _ in range(count)]
        ready.put(os.getpid())
        for res in await asyncio.gather(*tasks, return_exceptions=True):
            if isinstance(res, BaseException):
                errors.append(repr(res))
    except Exception as exc:
        errors.append(repr(exc))
    finally:
        await lim.aclose()
        await client.aclose()
    return {"pid": os.getpid(), "count": count, "last": last, "errors": errors[:3]}


def worker(url: str, namespace: str, count: int, ready: Any, out: Any) -> None:
    """Entry point of one spawned process."""
    out.put(asyncio.run(_wait_many(url, namespace, count, ready)))


async def _until_waiting(lim: Limiter, count: int, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    waiting = 0
    while time.monotonic() < deadline:
        waiting = int((await lim.stats(QUEUED))["waiting"])
        if waiting >= count:
            break
        await asyncio.sleep(0.02)
    return waiting


async def _scenario(
    url: str, count: int, procs: int, n_probe: int, report: Report
) -> dict[str, Summary] | None:
    namespace = f"bench-waiters-{count}"
    client = aioredis.from_url(url, **CLIENT_TIMEOUTS)
    lim = Limiter(client, LIMITS, namespace=namespace)
    noop = client.register_script("return 1")
    holder: Slot | None = await lim.acquire(QUEUED, timeout=5)
    shares = [count // procs + (1 if i < count % procs else 0) for i in range(procs)]
    shares = [s for s in shares if s > 0]
    ctx = spawn_context()
    ready, out = ctx.Queue(), ctx.Queue()
    samples: dict[str, list[int]] = {"try": [], "pair": [], "noop": []}
    try:
        with spawned(worker, [(url, namespace, s, ready, out) for s in shares]):
            started = await collect(ready, len(shares), 60)
            waiting = await _until_waiting(lim, count, 60)
            if len(started) < len(shares) or waiting < count:
                report.errors.append(
                    f"9. {count} waiters: only {waiting} queued ({len(started)} processes)"
                )
                return None

            async def refused() -> None:
                try:
                    slot = await lim.acquire(QUEUED, timeout=0)
                except AcquireTimeout:
                    return
                await slot.release()
                report.errors.append(f"9. {count} waiters: a try-acquire was admitted")

            async def pair() -> None:
                slot = await lim.acquire(FREE)
                await slot.release()

            async def noop_pair() -> None:
                await noop()
                await noop()

            ops = {"try": refused, "pair": pair, "noop": noop_pair}
            names = list(ops)
            warm = max(20, n_probe // 20)
            for i in range(warm + n_probe):
                shift = i % len(names)
                for name in names[shift:] + names[:shift]:
                    t0 = time.perf_counter_ns()
                    await ops[name]()
                    dt = time.perf_counter_ns() - t0
                    if i >= warm:
                        samples[name].append(dt)
            still = int((await lim.stats(QUEUED))["waiting"])
            t_release = time.time()
            held, holder = holder, None
            if held is not None:
                await held.release()
            results = await collect(out, len(shares), WAIT_TIMEOUT)
    finally:
        if holder is not None:
            await holder.release()
        await lim.aclose()
        await client.aclose()
    errors = [e for r in results for e in r["errors"]]
    if errors or len(results) < len(shares):
        report.errors.append(f"9. {count} waiters: {len(results)} processes reported, {errors}")
    drain = max((r["last"] for r in results), default=t_release) - t_release
    report.notes.append(
        f"9. {count} waiters ({len(shares)} processes; {still} still queued after the probes): "
        f"after the holder's release the queue drained, each waiter admitted and released "
        f"in turn, in {drain:.3f} s ({count / drain if drain > 0 else 0:,.0f} hand-offs/s)."
    )
    return {name: summarize(v) for name, v in samples.items()}


async def run_waiters(
    url: str, small: int, large: int, procs: int, n_probe: int, report: Report
) -> None:
    """Item 9 for a short and a long queue, appended to ``report``."""
    found: dict[int, dict[str, Summary]] = {}
    for count in (small, large):
        got = await _scenario(url, count, procs, n_probe, report)
        if got is not None:
            found[count] = got
    for count, sums in found.items():
        report.rows.append(
            Row(
                item="9",
                label=f"{count} waiters queued: refused `acquire(timeout=0)` (one script call)",
                summary=sums["try"],
            )
        )
        report.rows.append(
            Row(
                item="9",
                label=f"{count} waiters queued: `acquire` + `release` on another API",
                summary=sums["pair"],
                note=f"control, two no-op EVALSHA: p50 {sums['noop'].p50_us:.0f} µs",
            )
        )
    if small in found and large in found:
        control = found[large]["noop"].p50_us / found[small]["noop"].p50_us
        for key, what in (("try", "refused acquire"), ("pair", "pair on another API")):
            a, b = found[small][key], found[large][key]
            r50, r99 = b.p50_us / a.p50_us, b.p99_us / a.p99_us
            report.checks.append(
                Check(
                    f"9. {what}: {large} waiters / {small} waiters",
                    f"p50 {r50:.2f}x, p99 {r99:.2f}x (p50 over the no-op control's ratio "
                    f"{control:.2f}x: {r50 / control:.2f}x)",
                    "within 2x",
                    r50 <= 2.0,
                )
            )
