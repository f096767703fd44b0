"""Four replicas, one provider limit: the per-process semaphore vs. the Redis limiter.

Starts its own redis-server on a free loopback port, then runs the same load twice
as 4 separate processes x 30 calls of 100 ms each against a "provider" allowing
5 calls in flight and 20 calls per rolling second:

1. the original chatbot's way: an ``asyncio.Semaphore(5)`` and an in-memory
   20-per-second counter in each process;
2. ``limiter.Limiter`` with ``APILimits(max_concurrent=5, rates=[Rate(20, 1.0)])``,
   decided in Redis for all processes at once.

A referee independent of the limiter (its own Redis keys: an INCR/DECR in-flight
counter and a list of start times) records what the provider would have seen.

Run: ``make demo`` (or ``.venv/bin/python examples/multiprocess_demo.py``).
"""

from __future__ import annotations

import asyncio
import collections
import json
import multiprocessing as mp
import sys
import time

import redis.asyncio as aioredis

from limiter import APILimits, Limiter, Rate
from limiter.testing import RedisServer

PROCESSES, CALLS, CALL_SECONDS = 4, 30, 0.1
MAX_CONCURRENT, PER_SECOND = 5, 20


async def _provider_call(r: aioredis.Redis) -> None:
    """What the provider sees: one more call in flight, one more start."""
    now = time.time()
    inflight = await r.incr("referee:inflight")
    await r.rpush("referee:starts", json.dumps([now, inflight]))
    try:
        await asyncio.sleep(CALL_SECONDS)
    finally:
        await r.decr("referee:inflight")


async def _old_worker(url: str) -> None:
    r = aioredis.from_url(url)
    sem = asyncio.Semaphore(MAX_CONCURRENT)
    starts: collections.deque[float] = collections.deque()

    async def call() -> None:
        async with sem:
            while True:  # the original in-memory per-second counter
                now = time.monotonic()
                while starts and now - starts[0] >= 1.0:
                    starts.popleft()
                if len(starts) < PER_SECOND:
                    starts.append(now)
                    break
                await asyncio.sleep(1.0 - (now - starts[0]))
            await _provider_call(r)

    await asyncio.gather(*(call() for _ in range(CALLS)))
    await r.aclose()


async def _new_worker(url: str) -> None:
    r = aioredis.from_url(url)
    # window_margin: a call reaches the provider a few ms after its admission, by a delay that
    # varies; 50 ms of margin keeps the provider's own count within the limit.
    limits = {
        "provider": APILimits(
            max_concurrent=MAX_CONCURRENT, rates=[Rate(PER_SECOND, 1.0)], window_margin=0.05
        )
    }
    async with Limiter.from_url(url, limits) as lim:

        async def call() -> None:
            async with lim.slot("provider", timeout=60):
                await _provider_call(r)

        await asyncio.gather(*(call() for _ in range(CALLS)))
    await r.aclose()


def _run_worker(kind: str, url: str) -> None:
    asyncio.run(_old_worker(url) if kind == "old" else _new_worker(url))


def _max_per_second(times: list[float]) -> int:
    times.sort()
    best, j = 0, 0
    for i, t in enumerate(times):
        while t - times[j] >= 1.0:
            j += 1
        best = max(best, i - j + 1)
    return best


async def _report(url: str) -> tuple[int, int, int]:
    r = aioredis.from_url(url)
    rows = [json.loads(x) for x in await r.lrange("referee:starts", 0, -1)]
    await r.flushall()
    await r.aclose()
    return len(rows), max(n for _, n in rows), _max_per_second([t for t, _ in rows])


def _scenario(kind: str, url: str) -> tuple[int, int, int, float]:
    ctx = mp.get_context("spawn")
    start = time.monotonic()
    procs = [ctx.Process(target=_run_worker, args=(kind, url)) for _ in range(PROCESSES)]
    for p in procs:
        p.start()
    try:
        for p in procs:
            p.join(timeout=120)
            if p.exitcode != 0:
                raise RuntimeError(f"a {kind} worker failed (exit code {p.exitcode})")
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
    elapsed = time.monotonic() - start
    calls, peak, per_second = asyncio.run(_report(url))
    return calls, peak, per_second, elapsed


def main() -> int:
    print(
        f"{PROCESSES} processes x {CALLS} calls of {CALL_SECONDS * 1000:.0f} ms; provider limits: "
        f"{MAX_CONCURRENT} in flight, {PER_SECOND} per rolling second\n"
    )
    with RedisServer() as server:
        print(f"redis-server {server.version()} on {server.url} (started for this demo)\n")
        results = {kind: _scenario(kind, server.url) for kind in ("old", "new")}
    header = f"{'':34} {'calls':>6} {'max in flight':>14} {'max per 1 s':>12} {'time':>7}"
    print(header)
    print("-" * len(header))
    names = {"old": "per-process semaphore (before)", "new": "fleetlimit Limiter (Redis)"}
    for kind, (calls, peak, per_second, elapsed) in results.items():
        print(f"{names[kind]:34} {calls:>6} {peak:>14} {per_second:>12} {elapsed:>6.1f}s")
    print(f"{'provider limit':34} {'':>6} {MAX_CONCURRENT:>14} {PER_SECOND:>12}")
    _, peak, per_second, _ = results["new"]
    ok = peak <= MAX_CONCURRENT and per_second <= PER_SECOND
    print("\nLimiter kept every limit." if ok else "\nLIMIT EXCEEDED with the limiter!")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
