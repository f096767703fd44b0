"""Item 7: hand-off latency of the only slot between two OS processes.

Two spawned processes ping-pong the single slot of an API with ``max_concurrent=1``.
At hand-off ``i`` the holder waits until the other process is queued (it polls
``lim.stats(api)["waiting"]``, then lets the waiter settle for a millisecond so that it
is parked on its wake-up, not mid-request), records ``time.time()`` just before
``await slot.release()``; the waiter records ``time.time()`` right after its
``lim.acquire`` returns. Roles alternate, so each process is releaser and waiter in turn.
The latency is ``acquired - release_start`` for every hand-off.
"""

from __future__ import annotations

import asyncio
import math
import time
from typing import Any

from limiter import APILimits, Limiter, Slot

from ._util import Check, Report, Row, Summary, collect, spawn_context, spawned, summarize

__all__ = ["run_handoff"]

API = "handoff"
LIMITS = APILimits(max_concurrent=1, requests_per_minute=10**9, requests_per_hour=10**9)
#: Let a freshly queued waiter finish its second script call and park on its wake-up.
SETTLE = 0.001
#: Bound of every wait inside a worker, seconds.
STEP_TIMEOUT = 10.0


async def _wait_for_waiter(lim: Limiter) -> None:
    deadline = time.monotonic() + STEP_TIMEOUT
    while (await lim.stats(API))["waiting"] < 1:
        if time.monotonic() > deadline:
            raise TimeoutError("the other process never queued")
    await asyncio.sleep(SETTLE)


async def _ping_pong(url: str, namespace: str, role: int, n: int, ready: Any) -> dict[str, Any]:
    """Role 0 starts holding the slot and releases at even hand-offs; role 1 at odd ones."""
    released: dict[int, float] = {}
    acquired: dict[int, float] = {}
    lim = Limiter.from_url(url, {API: LIMITS}, namespace=namespace)
    slot: Slot | None = None
    try:
        if role == 0:
            slot = await lim.acquire(API, timeout=STEP_TIMEOUT)
            ready.set()
        elif not await asyncio.to_thread(ready.wait, STEP_TIMEOUT):
            raise TimeoutError("the first holder never started")
        for i in range(n):
            if i % 2 == role:
                if slot is None:
                    raise RuntimeError("releasing without a slot")
                await _wait_for_waiter(lim)
                t0 = time.time()
                await slot.release()
                released[i] = t0
                slot = None
            else:
                slot = await lim.acquire(API, timeout=STEP_TIMEOUT)
                acquired[i] = time.time()
        if slot is not None:
            await slot.release()
            slot = None
        return {"role": role, "released": released, "acquired": acquired, "error": None}
    except Exception as exc:
        return {"role": role, "released": released, "acquired": acquired, "error": repr(exc)}
    finally:
        await lim.aclose()


def worker(url: str, namespace: str, role: int, n: int, ready: Any, out: Any) -> None:
    """Entry point of one spawned process."""
    out.put(asyncio.run(_ping_pong(url, namespace, role, n, ready)))


async def run_handoff(url: str, n: int, report: Report) -> None:
    """Item 7, appended to ``report``."""
    ctx = spawn_context()
    ready = ctx.Event()
    out = ctx.Queue()
    namespace = "bench-handoff"
    with spawned(worker, [(url, namespace, role, n, ready, out) for role in (0, 1)]):
        results: list[dict[str, Any]] = await collect(out, 2, 60 + n * 0.05)
    if len(results) < 2:
        report.errors.append("7. hand-off: workers did not finish in time")
    released: dict[int, float] = {}
    acquired: dict[int, float] = {}
    for res in results:
        released.update(res["released"])
        acquired.update(res["acquired"])
        if res["error"]:
            report.errors.append(f"7. hand-off worker {res['role']}: {res['error']}")
    lat_ns = [round((acquired[i] - released[i]) * 1e9) for i in sorted(acquired) if i in released]
    summary: Summary = summarize(lat_ns)
    report.rows.append(
        Row(
            item="7",
            label="hand-off: A `release` starts → B's waiting `acquire` returns (2 processes)",
            summary=summary,
            ops_per_s=math.nan,
            note="max_concurrent=1; roles alternate; time.time() in both processes",
        )
    )
    p99_ms = summary.p99_us / 1000
    report.checks.append(
        Check(
            "7. hand-off latency between processes",
            f"p50 {summary.p50_us / 1000:.2f} ms, p99 {p99_ms:.2f} ms, "
            f"max {summary.max_us / 1000:.2f} ms (N={summary.n})",
            "p99 ≤ 2 ms",
            summary.n > 0 and p99_ms <= 2.0,
        )
    )
