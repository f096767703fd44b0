"""Item 8: demand far above a window, from several processes at once.

``procs`` spawned processes run ``tasks`` asyncio tasks each; every task loops
``acquire`` then ``release`` on an API limited only by ``Rate(50, 1.0)`` until the run's
deadline. The run lasts a whole number of periods plus a half (4.5 s, quick 1.5 s), so
the last burst the window allows is not cut by the deadline. Then:

- efficiency: admitted / what the window allows between the first and the last
  admission (``T``), counting the first window: ``limit * (T / period) + limit``; the exact
  bound of a sliding log, ``limit * (floor(T / period) + 1)``, is shown too;
- correctness: no rolling window ``(t - period, t]`` holds more than ``limit`` admissions,
  checked on ``slot.acquired_at`` (Redis microseconds) and, independently, on the
  window's own log in Redis (its sorted set, read every 100 ms while the run lasts:
  entries live a whole period, so none is missed), which also shows whether
  ``acquired_at`` is the admission time Redis recorded.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import time
from typing import Any, cast

import redis.asyncio as aioredis

from limiter import AcquireTimeout, APILimits, Limiter, Rate

from ._util import Check, Report, Row, collect, spawn_context, spawned, summarize

__all__ = ["max_in_window", "run_saturation"]

API = "saturated"
LIMIT, PERIOD = 50, 1.0
LIMITS = APILimits(rates=[Rate(LIMIT, PERIOD)])
#: Upper bound of admissions per task (the run is bounded by time first).
MAX_PER_TASK = 10_000


def max_in_window(times_us: list[int], period_us: int) -> int:
    """Largest number of sorted times inside any window ``(t - period, t]``."""
    best, start = 0, 0
    for end, t in enumerate(times_us):
        while times_us[start] <= t - period_us:
            start += 1
        best = max(best, end - start + 1)
    return best


class _QuietWaits(logging.Filter):
    """Drop the limiter's expected "Rate limit reached ... waiting" warnings."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Rate limit reached")


async def _hammer(
    url: str, namespace: str, tasks: int, duration: float, ready: Any, go: Any
) -> dict[str, Any]:
    logging.getLogger("limiter").addFilter(_QuietWaits())
    lim = Limiter.from_url(url, {API: LIMITS}, namespace=namespace)
    admitted: list[tuple[str, int]] = []
    waits: list[int] = []
    try:
        await lim.stats(API)  # connected, scripts loaded
        ready.put(os.getpid())
        if not await asyncio.to_thread(go.wait, 60):
            raise TimeoutError("never told to start")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + duration

        async def one() -> None:
            for _ in range(MAX_PER_TASK):
                left = deadline - loop.time()
                if left <= 0:
                    return
                t0 = time.perf_counter_ns()
                try:
                    slot = await lim.acquire(API, timeout=left)
                except AcquireTimeout:
                    return
                waits.append(time.perf_counter_ns() - t0)
                admitted.append((slot.id, slot.acquired_at))
                await slot.release()

        await asyncio.gather(*(one() for _ in range(tasks)))
        return {"pid": os.getpid(), "at": admitted, "waits": waits, "error": None}
    except Exception as exc:
        return {"pid": os.getpid(), "at": admitted, "waits": waits, "error": repr(exc)}
    finally:
        await lim.aclose()


def worker(
    url: str, namespace: str, tasks: int, duration: float, ready: Any, go: Any, out: Any
) -> None:
    """Entry point of one spawned process."""
    out.put(asyncio.run(_hammer(url, namespace, tasks, duration, ready, go)))


async def _read_window_log(url: str, namespace: str, stop: asyncio.Event) -> dict[str, int]:
    """Every entry of the request log seen while the run lasts: slot id -> time."""
    seen: dict[str, int] = {}
    client = aioredis.from_url(url)
    pattern = f"{namespace}:{{{API}}}:requests"
    key: bytes | None = None
    try:
        while True:
            if key is None:
                key = next(iter([k async for k in client.scan_iter(match=pattern)]), None)
            if key is not None:
                entries = cast(
                    "list[tuple[bytes, float]]", await client.zrange(key, 0, -1, withscores=True)
                )
                for member, score in entries:
                    seen[member.decode().rpartition("|")[0]] = int(score)
            if stop.is_set():
                return seen
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.1)
    finally:
        await client.aclose()


async def run_saturation(url: str, procs: int, tasks: int, duration: float, report: Report) -> None:
    """Item 8, appended to ``report``."""
    ctx = spawn_context()
    ready, go, out = ctx.Queue(), ctx.Event(), ctx.Queue()
    namespace = "bench-saturation"
    args = [(url, namespace, tasks, duration, ready, go, out) for _ in range(procs)]
    stop = asyncio.Event()
    with spawned(worker, args):
        started = await collect(ready, procs, 60)
        if len(started) < procs:
            report.errors.append(f"8. saturation: only {len(started)}/{procs} workers started")
        reader = asyncio.create_task(_read_window_log(url, namespace, stop))
        go.set()
        try:
            results = await collect(out, len(started), duration + 60)
        finally:
            stop.set()
            logged = await reader
    admitted: dict[str, int] = {}
    waits: list[int] = []
    per_proc: list[int] = []
    for res in results:
        admitted.update(res["at"])
        waits += res["waits"]
        per_proc.append(len(res["at"]))
        if res["error"]:
            report.errors.append(f"8. saturation worker {res['pid']}: {res['error']}")
    if not admitted:
        report.errors.append("8. saturation: no admissions")
        return
    times = sorted(admitted.values())
    span = (times[-1] - times[0]) / 1e6
    exact = LIMIT * (math.floor(span / PERIOD) + 1)
    allowed = LIMIT * (span / PERIOD) + LIMIT
    period_us = round(PERIOD * 1e6)
    worst = max_in_window(times, period_us)
    truth = sorted(logged.values())
    worst_logged = max_in_window(truth, period_us) if truth else -1
    off = [admitted[sid] - at for sid, at in logged.items() if sid in admitted]
    moved = [d for d in off if d != 0]
    report.rows.append(
        Row(
            item="8",
            label=(
                f"saturation: {len(results)} processes x {tasks} tasks on Rate({LIMIT}, "
                f"{PERIOD:g} s): `acquire` wait until admitted"
            ),
            summary=summarize(waits),
            ops_per_s=len(times) / span if span > 0 else math.nan,
            note=f"ops/s = admissions / {span:.2f} s (first → last); per process {per_proc}",
        )
    )
    report.checks.append(
        Check(
            "8. admitted / what the window allows (limit * T/period + limit)",
            f"{len(times)} / {allowed:.1f} = {len(times) / allowed:.1%} (T = first → last "
            f"admission = {span:.3f} s; exact sliding-log bound {exact}: "
            f"{len(times) / exact:.1%})",
            "≥ 95%",
            len(times) / allowed >= 0.95,
        )
    )
    report.checks.append(
        Check(
            f"8. most admissions in any rolling {PERIOD:g} s, from slot.acquired_at",
            str(worst),
            f"≤ {LIMIT}",
            worst <= LIMIT,
        )
    )
    report.checks.append(
        Check(
            f"8. most admissions in any rolling {PERIOD:g} s, from the window's log in Redis",
            f"{worst_logged} ({len(truth)} entries seen, {len(off)} matched to slots)",
            f"≤ {LIMIT}",
            worst_logged <= LIMIT and len(off) == len(admitted),
        )
    )
    if moved:
        report.notes.append(
            f"8. {len(moved)} of {len(off)} slots have an `acquired_at` other than the admission "
            f"time Redis recorded in the window (off by {min(moved)} to {max(moved)} µs): a "
            "waiter handed the slot by another process's release while it was asking again "
            "(acquire.lua's already-admitted branch), or whose wake-up was missed (renew.lua), "
            "gets the time of that later script call, so a window check on `acquired_at` can "
            "see more admissions in a second than Redis really made."
        )
