"""Worker processes for ``tests/test_cluster.py``: load on several APIs of a Redis Cluster.

Run as ``python -m tests._cluster_workers ROLE CONFIG_JSON`` from the repository root.
The protocol is the one of :mod:`tests._workers`: the worker synchronises with the test
through Redis lists on the standalone server at ``config["url"]`` (never through sleeps)
and writes what it observed to ``config["out"]``; its limiter runs on the cluster at
``config["limiter_url"]`` (a ``redis+cluster://`` URL).
"""

from __future__ import annotations

import asyncio
import sys
import time
from typing import Any

import redis.asyncio as aioredis

from limiter import AcquireTimeout, APILimits, Limiter, Rate
from tests._workers import barrier, describe
from tests._workers import main as worker_main

Config = dict[str, Any]
Result = dict[str, Any]


def limits_of(specs: dict[str, dict[str, Any]]) -> dict[str, APILimits]:
    """``{api: APILimits}`` from ``{api: {"max_concurrent": n, "rates": [[n, period]]}}``."""
    return {
        api: APILimits(
            max_concurrent=spec.get("max_concurrent"),
            rates=[Rate(n, p) for n, p in spec.get("rates", [])],
            lease_ttl=spec.get("lease_ttl", 30.0),
        )
        for api, spec in specs.items()
    }


async def role_multi_load(cfg: Config, r: aioredis.Redis) -> Result:
    """``tasks`` tasks per API acquire, hold ``hold`` s, release, until the go deadline.

    Every admission is recorded as ``[api, send_us, recv_us, acquired_at, start_ns, end_ns]``.
    """
    lim = Limiter.from_url(cfg["limiter_url"], limits_of(cfg["apis"]))
    hold = cfg["hold"]
    records: list[list[Any]] = []
    try:
        go = await barrier(r, cfg)
        deadline: float = go["deadline"]

        async def worker(api: str) -> None:
            while (timeout := deadline - time.time()) > 0:
                send = time.time_ns() // 1000
                try:
                    slot = await lim.acquire(api, timeout=timeout)
                except AcquireTimeout:
                    return  # the run is over
                start = time.monotonic_ns()
                recv = time.time_ns() // 1000
                if hold:
                    await asyncio.sleep(hold)
                end = time.monotonic_ns()
                await slot.release()
                records.append([api, send, recv, slot.acquired_at, start, end])

        outcomes = await asyncio.gather(
            *(worker(api) for api in cfg["apis"] for _ in range(cfg["tasks"])),
            return_exceptions=True,
        )
    finally:
        await lim.aclose()
    errors = [describe(o) for o in outcomes if isinstance(o, BaseException)]
    return {"admissions": records, "errors": errors}


ROLES = {"multi_load": role_multi_load}

if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1:], ROLES))
