"""Soak: many processes x many tasks on one Redis for a minute, judged by a referee.

Usage::

    make soak                                   # = python -m benchmarks.soak (16 x 64 x 60 s)
    python -m benchmarks.soak --processes 2 --tasks 8 --seconds 3 --skip-expiry

The run starts its own ``redis-server`` on a free 127.0.0.1 port
(:class:`limiter.testing.RedisServer`), spawns ``--processes`` worker processes, each with
one ``Limiter.from_url(...)`` and ``--tasks`` asyncio tasks, and lets them loop
``acquire`` -> hold a short random time -> ``release`` for ``--seconds``. Task ``i`` of
process ``p`` works on API ``MIX[(p * tasks + i) % 4]``, a mix that exercises every kind
of limit (see :data:`LIMITS`):

- ``conc``: ``max_concurrent=32``, holds of 20-80 ms: the concurrency bound;
- ``window``: ``Rate(2000, 10 s)`` (the binding one) and ``Rate(300, 1 s)``, a 50 ms
  ``window_margin``, cost 2 for one request in ten;
- ``tokens``: ``tokens_per_minute=600_000``, ``Rate(30, 1 s)``, ``max_concurrent=16``;
  each request reserves 200-2000 tokens and reports 20-100 % of them (``report_tokens``);
- ``keyed``: ``max_concurrent=4`` and ``Rate(40, 1 s)`` for each of four keys (``key=``).

Before the start, every process opens its pool's connections (``min(tasks, 50)``, all
processes at once; connect timeouts there are retried and reported, ``--cold`` skips
this), then all start together. One acquire in twenty has a short timeout (0, 5 or
20 ms: most time out, so the withdraw path runs), and one in twenty is started as a task
of its own that is cancelled if it has not been admitted after 1-20 ms (a task cancelled
while waiting). Other waits are bounded by 10 s and by the end of the run.

The referee. Every holder records its own timestamps: ``time.time_ns()`` just before
``acquire`` was called and just after it returned, ``time.time_ns()`` just before
``release`` was called, and ``slot.acquired_at`` (Redis ``TIME`` of the admission, µs;
the same machine, so the same clock). After the run the parent merges every record and
checks, per API and per key:

- in flight at any instant <= ``max_concurrent``: the holds are the intervals
  [``acquired_at``, before ``release``] (each lies inside the lease Redis kept, so the
  count can only be lower than the truth) and, as a second view, [``acquire`` returned,
  before ``release``];
- for every configured window, with its period *without* the margin, and every admission
  as a window start ``t``: the admissions in [``t``, ``t + period``) weigh <= ``limit``;
- tokens as charged after reconciliation (the reported usage, never above the
  reservation) in any 60 s window starting at an admission <= ``tokens_per_minute``;
- every ``acquired_at`` lies between the call and the return of its ``acquire`` (1 ms of
  slack for clock resolution): the referee's timestamps are the admission times;
- after the run, ``stats()`` counts exactly the releases the holders made, with nothing
  in flight or waiting; every key the limiter left has a TTL, and (unless
  ``--skip-expiry``) no key is left once the longest TTL has passed. The soak's limiters
  use ``stats_ttl=60`` s instead of a day, so that this takes one minute.

The report (``benchmarks/results/soak.md``, printed too) has the verdict, admissions/s and
the use of the binding limits per API, p50/p99/max of the ``acquire`` wait, outcome counts
(timeouts, cancellations, ``LimiterUnavailable``, ``LeaseLost``), Redis memory and CPU
(``INFO``), client RSS and CPU per process, and the machine. The exit status is 1 when
the referee found any excess or any check failed, 0 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import os
import random
import signal
import statistics
import sys
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis

from limiter import AcquireTimeout, APILimits, LeaseLost, Limiter, LimiterUnavailable, Rate, Slot
from limiter.testing import RedisServer

from ._util import collect, machine_info, percentile, spawn_context, spawned

__all__ = [
    "LIMITS",
    "MIX",
    "Check",
    "Verdict",
    "main",
    "overlap",
    "referee",
    "window_use",
]

RESULTS = Path(__file__).resolve().parent / "results"
NAMESPACE = "soak"
#: ``stats_ttl`` of the soak's limiters (default: a day): every key expires within a minute.
STATS_TTL = 60.0

LIMITS: dict[str, APILimits] = {
    "conc": APILimits(max_concurrent=32),
    "window": APILimits(rates=[Rate(2000, 10.0), Rate(300, 1.0)], window_margin=0.05),
    "tokens": APILimits(max_concurrent=16, rates=[Rate(30, 1.0)], tokens_per_minute=600_000),
    "keyed": APILimits(max_concurrent=4, rates=[Rate(40, 1.0)]),
}
#: The API of task i of process p is MIX[(p * tasks + i) % len(MIX)].
MIX: tuple[str, ...] = ("conc", "window", "tokens", "keyed")
#: The keys of the per-key API (``key=``), picked at random for each request.
KEYS: tuple[str, ...] = ("user-0", "user-1", "user-2", "user-3")
#: Hold times in seconds, uniform between the two bounds, per API.
HOLD: dict[str, tuple[float, float]] = {
    "conc": (0.020, 0.080),
    "window": (0.001, 0.020),
    "tokens": (0.020, 0.200),
    "keyed": (0.005, 0.030),
}
#: Share of requests with a short timeout, and of requests cancelled while waiting.
SHORT_SHARE, CANCEL_SHARE = 0.05, 0.05
SHORT_TIMEOUTS = (0.0, 0.005, 0.020)
#: How each kind of request is named in the outcome counts.
KINDS = {
    "normal": "wait (up to 10 s)",
    "short": "short timeout (0, 5 or 20 ms)",
    "cancel": "cancelled unless admitted within 1-20 ms",
}
#: Bound of an ordinary wait (and never past the end of the run).
WAIT_BOUND = 10.0
#: Period of the event-loop lag monitor in each worker, seconds.
LAG_TICK = 0.05
#: ``Limiter.from_url``'s socket timeouts (its defaults): a longer stall is LimiterUnavailable.
SOCKET_TIMEOUT = 0.5
#: Redis's latency monitor records events (a command, a fork, ...) longer than this, ms.
LATENCY_MS = 100
#: Connections of each Limiter.from_url pool (its default max_connections).
POOL_SIZE = 50
#: Slack of the bracket check (``acquired_at`` between call and return), microseconds.
BRACKET_SLACK_US = 1000

# One admission as its holder saw it (a tuple: tens of thousands of them cross processes).
API, KEY, T_CALL, T_ACQ, T_REL, AT, COST, TOKENS, ACTUAL, RELEASE = range(10)
RELEASED, LOST, UNAVAILABLE = 0, 1, 2

# -- the worker processes ------------------------------------------------------------------


class _QuietWaits(logging.Filter):
    """Count, and drop, the limiter's expected "Rate limit reached ... waiting" lines."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: Counter[str] = Counter()

    def filter(self, record: logging.LogRecord) -> bool:
        text = str(record.msg)
        self.seen[text.split(" %s", 1)[0].split(":", 1)[0]] += 1
        return not text.startswith("Rate limit reached")


def _memory_kib() -> tuple[int, int]:
    """(VmRSS, VmHWM) of this process in KiB, from /proc (0, 0 elsewhere)."""
    rss = hwm = 0
    with contextlib.suppress(OSError), open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
            elif line.startswith("VmHWM:"):
                hwm = int(line.split()[1])
    return rss, hwm


async def _open_pool(lim: Limiter, n: int) -> int:
    """Open ``n`` connections of the limiter's pool at once; return the failed attempts.

    All processes do this at the same time before the start: a storm of connects that, on
    a loaded machine, can outlast ``from_url``'s 0.5 s connect timeout. Failures are
    retried here, counted and reported, and kept out of the measured run.
    """
    failures = 0
    for _ in range(20):
        res = await asyncio.gather(*(lim.redis.ping() for _ in range(n)), return_exceptions=True)
        failed = sum(1 for r in res if isinstance(r, Exception))
        if not failed:
            return failures
        failures += failed
    raise RuntimeError(f"could not open {n} connections in 20 attempts ({failures} failed)")


async def _work(
    url: str,
    proc: int,
    tasks: int,
    seconds: float,
    seed: int,
    cold: bool,
    ready: Any,
    go: Any,
) -> dict[str, Any]:
    quiet = _QuietWaits()
    logging.getLogger("limiter").addFilter(quiet)
    lim = Limiter.from_url(url, LIMITS, namespace=NAMESPACE, stats_ttl=STATS_TTL)
    records: list[tuple[int, ...]] = []
    outcomes: Counter[str] = Counter()
    errors: list[str] = []  # unexpected: a task or the worker crashed
    unavailable: list[str] = []  # the first LimiterUnavailable errors, with their time
    lags: list[tuple[float, float]] = []  # (time since start, lag) of the event loop
    loop = asyncio.get_running_loop()
    warm_failures = 0
    try:
        await lim.stats("conc")  # connected, a script loaded
        if not cold:
            warm_failures = await _open_pool(lim, min(tasks, POOL_SIZE))
        ready.put(os.getpid())
        if not await asyncio.to_thread(go.wait, 120):
            raise TimeoutError("never told to start")
        cpu0 = time.process_time()
        start = loop.time()
        deadline = start + seconds

        async def one(index: int) -> None:
            api_i = (proc * tasks + index) % len(MIX)
            api = MIX[api_i]
            rng = random.Random(seed * 1_000_003 + proc * 1009 + index)
            lo, hi = HOLD[api]
            while (left := deadline - loop.time()) > 0:
                key_i = rng.randrange(len(KEYS)) if api == "keyed" else -1
                key = KEYS[key_i] if key_i >= 0 else None
                cost = 2 if api == "window" and rng.random() < 0.1 else 1
                tokens = rng.randint(200, 2000) if api == "tokens" else 0
                draw = rng.random()
                mode = "short" if draw < SHORT_SHARE else "normal"
                if draw > 1 - CANCEL_SHARE:
                    mode = "cancel"
                kind = f"{api}: {KINDS[mode]}"
                timeout = rng.choice(SHORT_TIMEOUTS) if mode == "short" else min(WAIT_BOUND, left)
                t_call = time.time_ns()
                try:
                    if mode == "cancel":
                        fut = asyncio.ensure_future(
                            lim.acquire(api, timeout=timeout, cost=cost, tokens=tokens, key=key)
                        )
                        done, _ = await asyncio.wait({fut}, timeout=rng.uniform(0.001, 0.020))
                        if not done:
                            fut.cancel()
                            await asyncio.wait({fut})
                        if fut.cancelled():
                            outcomes[f"{kind} -> cancelled while waiting"] += 1
                            continue
                        slot: Slot = fut.result()  # admitted before the cancel landed
                    else:
                        slot = await lim.acquire(
                            api, timeout=timeout, cost=cost, tokens=tokens, key=key
                        )
                except AcquireTimeout as exc:
                    cut = mode != "short" and timeout < WAIT_BOUND
                    what = "cut by the end of the run" if cut else "AcquireTimeout"
                    outcomes[f"{kind} -> {what} ({exc.reason})"] += 1
                    continue
                except LimiterUnavailable as exc:
                    outcomes[f"{kind} -> LimiterUnavailable"] += 1
                    if len(unavailable) < 5:
                        at = loop.time() - start
                        unavailable.append(f"acquire {api} at {at:.2f} s: {exc!r}")
                    continue
                t_acq = time.time_ns()
                outcomes[f"{kind} -> admitted"] += 1
                actual = -1
                status = RELEASED
                try:
                    await asyncio.sleep(rng.uniform(lo, hi))
                    if tokens:
                        actual = rng.randint(tokens // 5, tokens)
                        slot.report_tokens(actual)
                finally:
                    t_rel = time.time_ns()
                    try:
                        await slot.release()
                    except LeaseLost:
                        status = LOST
                        outcomes[f"{api}: release -> LeaseLost"] += 1
                    except LimiterUnavailable as exc:
                        status = UNAVAILABLE
                        outcomes[f"{api}: release -> LimiterUnavailable"] += 1
                        if len(unavailable) < 5:
                            unavailable.append(
                                f"release {api} at {loop.time() - start:.2f} s: {exc!r}"
                            )
                    records.append(
                        (
                            api_i,
                            key_i,
                            t_call,
                            t_acq,
                            t_rel,
                            slot.acquired_at,
                            cost,
                            tokens,
                            actual,
                            status,
                        )
                    )

        async def lag_monitor() -> None:
            while (t := loop.time()) < deadline:
                await asyncio.sleep(LAG_TICK)
                lags.append((t - start, loop.time() - t - LAG_TICK))

        monitor = asyncio.create_task(lag_monitor())
        results = await asyncio.gather(*(one(i) for i in range(tasks)), return_exceptions=True)
        await monitor
        for res in results:
            if isinstance(res, BaseException):
                outcomes["task crashed"] += 1
                if len(errors) < 5:
                    errors.append(f"task: {res!r}")
        cpu = time.process_time() - cpu0
    except Exception as exc:
        errors.append(f"worker: {exc!r}")
        cpu = math.nan
    finally:
        await lim.aclose()
    rss, hwm = _memory_kib()
    return {
        "pid": os.getpid(),
        "proc": proc,
        "records": records,
        "outcomes": dict(outcomes),
        "errors": errors,
        "log_lines": dict(quiet.seen),
        "cpu_s": cpu,
        "rss_kib": rss,
        "hwm_kib": hwm,
        "warm_failures": warm_failures,
        "unavailable": unavailable,
        "max_lag": max((lag for _, lag in lags), default=0.0),
        "long_lags": [(round(at, 2), round(lag, 3)) for at, lag in lags if lag >= SOCKET_TIMEOUT],
    }


def worker(
    url: str,
    proc: int,
    tasks: int,
    seconds: float,
    seed: int,
    cold: bool,
    ready: Any,
    go: Any,
    out: Any,
) -> None:
    """Entry point of one spawned process: run the tasks, put the records on ``out``."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops us; Ctrl-C is its
    out.put(asyncio.run(_work(url, proc, tasks, seconds, seed, cold, ready, go)))


# -- the referee (pure functions of the records) --------------------------------------------


@dataclass(frozen=True, slots=True)
class Overlap:
    """Holds in flight at once, over a set of intervals."""

    #: Most intervals sharing one instant (an end and a start at the same time don't).
    peak: int
    #: Starts at which more than ``limit`` intervals were in flight, as (time, count).
    excess: list[tuple[int, int]]
    #: Time-weighted mean in flight between the first start and the last end.
    mean: float


def overlap(intervals: Iterable[tuple[int, int]], limit: int) -> Overlap:
    """Peak and excess in flight of closed-open intervals ``(start, end)``."""
    events = sorted(e for s, t in intervals for e in ((s, 1), (t, -1)))
    peak = current = 0
    excess: list[tuple[int, int]] = []
    area = 0
    last = events[0][0] if events else 0
    for t, step in events:
        area += current * (t - last)
        last = t
        current += step
        if step > 0 and current > limit:
            excess.append((t, current))
        peak = max(peak, current)
    span = events[-1][0] - events[0][0] if events else 0
    return Overlap(peak, excess, area / span if span > 0 else math.nan)


@dataclass(frozen=True, slots=True)
class WindowUse:
    """Admissions in rolling windows that start at each admission."""

    #: Largest weight in any window [t, t + period) starting at an admission.
    most: int
    #: Window starts whose window weighs more than the limit, as (start, weight).
    excess: list[tuple[int, int]]
    #: Mean weight / limit over the windows that end before ``end`` (nan: none does).
    mean_fill: float
    #: Windows that count in ``mean_fill``.
    full_windows: int


def window_use(points: Sequence[tuple[int, int]], limit: int, period: int, end: int) -> WindowUse:
    """Check every admission ``(time, weight)`` as the start of a window of ``period``."""
    pts = sorted(points)
    most = 0
    excess: list[tuple[int, int]] = []
    fills: list[float] = []
    j = 0
    inside = 0  # weight of pts[i:j]
    for i, (start, weight) in enumerate(pts):
        if j < i:
            j, inside = i, 0
        while j < len(pts) and pts[j][0] < start + period:
            inside += pts[j][1]
            j += 1
        most = max(most, inside)
        if inside > limit:
            excess.append((start, inside))
        if start + period <= end:
            fills.append(inside / limit)
        inside -= weight
    return WindowUse(most, excess, statistics.fmean(fills) if fills else math.nan, len(fills))


@dataclass(frozen=True, slots=True)
class Check:
    """One thing the referee checked."""

    name: str
    value: str
    bound: str
    ok: bool
    #: False: reported (expected to hold), but the run does not fail on it.
    required: bool = True


@dataclass(slots=True)
class Verdict:
    """The referee's findings on the merged records."""

    checks: list[Check] = field(default_factory=list)
    #: Rows of the per-API table (label -> figures as text).
    apis: list[dict[str, str]] = field(default_factory=list)

    @property
    def excess(self) -> int:
        """Checks of a limit (in flight, windows, tokens) that found any excess."""
        return sum(1 for c in self.checks if c.name.startswith("limit") and not c.ok)

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks if c.required)


def _ms(ns: float) -> str:
    return "-" if math.isnan(ns) else f"{ns / 1e6:,.1f}"


def _group_label(api: str, key_i: int) -> str:
    return api if key_i < 0 else f"{api} key={KEYS[key_i]}"


def referee(records: Sequence[Sequence[int]], duration_s: float) -> Verdict:
    """Judge the merged records of every holder; see the module docstring for what."""
    verdict = Verdict()
    groups: dict[tuple[int, int], list[Sequence[int]]] = {}
    for r in records:
        groups.setdefault((r[API], r[KEY]), []).append(r)
    for (api_i, key_i), recs in sorted(groups.items()):
        api = MIX[api_i]
        lim = LIMITS[api]
        label = _group_label(api, key_i)
        end_us = max(r[T_REL] for r in recs) // 1000
        row = {"API": label, "admissions": f"{len(recs):,}"}
        row["per s"] = f"{len(recs) / duration_s:,.1f}"
        uses: list[str] = []
        if lim.max_concurrent is not None:
            n = lim.max_concurrent
            # Redis view: from the admission (Redis time) to just before release (floored
            # to the µs, as Redis's own time is): inside the real lease.
            redis_view = overlap(((r[AT] * 1000, r[T_REL] // 1000 * 1000) for r in recs), n)
            client_view = overlap(((r[T_ACQ], r[T_REL]) for r in recs), n)
            verdict.checks.append(
                Check(
                    f"limit: {label}: most in flight at one instant",
                    f"{redis_view.peak} from acquired_at → release "
                    f"({len(redis_view.excess)} instants over); {client_view.peak} from "
                    f"acquire returned → release ({len(client_view.excess)} over)",
                    f"≤ {n}",
                    not redis_view.excess and not client_view.excess,
                )
            )
            uses.append(
                f"in flight: mean {redis_view.mean:.1f} of {n} "
                f"({redis_view.mean / n:.0%}), peak {redis_view.peak}"
            )
        for rate in lim.windows:
            period = round(rate.period * 1e6)
            use = window_use([(r[AT], r[COST]) for r in recs], rate.limit, period, end_us)
            worst = f"; first over: {use.excess[0]}" if use.excess else ""
            verdict.checks.append(
                Check(
                    f"limit: {label}: most admissions (cost-weighted) in any {rate.period:g} s "
                    "window starting at an admission",
                    f"{use.most} ({len(use.excess)} windows over{worst})",
                    f"≤ {rate.limit}",
                    not use.excess,
                )
            )
            fill = "-" if math.isnan(use.mean_fill) else f"{use.mean_fill:.0%}"
            uses.append(
                f"{rate.limit}/{rate.period:g} s: max {use.most / rate.limit:.0%}, "
                f"mean {fill} over {use.full_windows:,} full windows"
            )
        if lim.tokens_per_minute is not None:
            tpm = lim.tokens_per_minute
            charged = [(r[AT], r[ACTUAL] if r[ACTUAL] >= 0 else r[TOKENS]) for r in recs]
            over_reserved = sum(1 for r in recs if r[ACTUAL] > r[TOKENS])
            use = window_use(charged, tpm, 60_000_000, end_us)
            verdict.checks.append(
                Check(
                    f"limit: {label}: most tokens (as charged after reconciliation) in any "
                    "60 s window starting at an admission",
                    f"{use.most:,} ({len(use.excess)} windows over; "
                    f"{over_reserved} reports above their reservation)",
                    f"≤ {tpm:,}",
                    not use.excess and over_reserved == 0,
                )
            )
            total = sum(w for _, w in charged)
            uses.append(
                f"tokens: {total:,} charged ({sum(r[TOKENS] for r in recs):,} reserved), "
                f"max {use.most / tpm:.0%} of {tpm:,} per 60 s"
            )
        outside = [
            r
            for r in recs
            if not r[T_CALL] // 1000 - BRACKET_SLACK_US
            <= r[AT]
            <= r[T_ACQ] // 1000 + BRACKET_SLACK_US
        ]
        verdict.checks.append(
            Check(
                f"{label}: acquired_at outside [acquire called, acquire returned] ± 1 ms",
                str(len(outside)),
                "0",
                not outside,
            )
        )
        waits = sorted(r[T_ACQ] - r[T_CALL] for r in recs)
        row["wait p50 ms"] = _ms(percentile(waits, 0.5))
        row["wait p99 ms"] = _ms(percentile(waits, 0.99))
        row["wait max ms"] = _ms(waits[-1] if waits else math.nan)
        row["use of the limits"] = "; ".join(uses)
        verdict.apis.append(row)
    return verdict


# -- the parent -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Config:
    """Size of one run."""

    processes: int = 16
    tasks: int = 64
    seconds: float = 60.0
    seed: int = 1
    expiry: bool = True
    #: Skip opening the connection pools before the start.
    cold: bool = False


async def _sample(client: aioredis.Redis, stop: asyncio.Event, seen: dict[str, int]) -> None:
    """Largest connected_clients and used_memory seen, once a second while the run lasts."""
    while not stop.is_set():
        info = await client.info()
        for name in ("connected_clients", "used_memory", "instantaneous_ops_per_sec"):
            seen[name] = max(seen.get(name, 0), int(info[name]))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 1.0)


async def _keys_and_ttls(client: aioredis.Redis) -> dict[str, int]:
    """Every key in the database and its PTTL (ms; -1: no expiry)."""
    found: dict[str, int] = {}
    async for key in client.scan_iter(count=1000):
        found[key.decode()] = int(await client.pttl(key))
    return found


async def _stats_check(
    client: aioredis.Redis, records: Sequence[Sequence[int]], slack: int
) -> list[Check]:
    """stats() counts exactly the releases the holders made; nothing in flight or waiting.

    A release that raised LimiterUnavailable may or may not have run in Redis: it widens
    the count by one and may leave its lease in flight. ``slack`` (LimiterUnavailable and
    failed withdrawals in the run) bounds the tickets that may not have expired yet.
    """
    made: Counter[tuple[int, int]] = Counter()
    unsure: Counter[tuple[int, int]] = Counter()
    for r in records:
        (unsure if r[RELEASE] == UNAVAILABLE else made)[(r[API], r[KEY])] += 1
    lim = Limiter(client, LIMITS, namespace=NAMESPACE, stats_ttl=STATS_TTL)
    checks = []
    try:
        for api_i, api in enumerate(MIX):
            for key_i in [-1] if api != "keyed" else range(len(KEYS)):
                key = None if key_i < 0 else KEYS[key_i]
                s = await lim.stats(api, key=key)
                counted = s["successful_requests"] + s["failed_requests"]
                in_flight, waiting = s["concurrent_requests"], s["waiting"]
                n, maybe = made[(api_i, key_i)], unsure[(api_i, key_i)]
                bound = f"{n:,}" if not maybe else f"{n:,} to {n + maybe:,}"
                checks.append(
                    Check(
                        f"{_group_label(api, key_i)}: releases counted by stats() / made "
                        "by the holders; in flight, waiting after the run",
                        f"{counted:,} / {n + maybe:,}; {in_flight}, {waiting}",
                        f"{bound}; ≤ {maybe}, ≤ {slack}",
                        n <= counted <= n + maybe and in_flight <= maybe and waiting <= slack,
                    )
                )
    finally:
        await lim.aclose()
    return checks


def _cpu(info: dict[str, Any]) -> float:
    return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])


def _mib(kib: float) -> str:
    return f"{kib / 1024:,.1f}"


async def _run(server: RedisServer, cfg: Config) -> tuple[str, dict[str, Any], bool]:
    url = server.url
    probe = aioredis.from_url(url)
    try:
        info = await probe.info("server")
        machine = machine_info(str(info.get("redis_version", server.version())))
        for name in ("limits", "redis-rate-limiters"):
            machine.pop(name, None)
        cpu_before = _cpu(await probe.info("cpu"))
        ctx = spawn_context()
        ready, go, out = ctx.Queue(), ctx.Event(), ctx.Queue()
        args = [
            (url, p, cfg.tasks, cfg.seconds, cfg.seed, cfg.cold, ready, go, out)
            for p in range(cfg.processes)
        ]
        seen: dict[str, int] = {}
        stop = asyncio.Event()
        load_before = os.getloadavg()[0]
        with spawned(worker, args, grace=30.0):
            started = await collect(ready, cfg.processes, 120)
            sampler = asyncio.create_task(_sample(probe, stop, seen))
            t0 = time.monotonic()
            go.set()
            try:
                results = await collect(out, len(started), cfg.seconds + 120)
            finally:
                stop.set()
                await sampler
            wall = time.monotonic() - t0
        load_after = os.getloadavg()[0]
        cpu_redis = _cpu(await probe.info("cpu")) - cpu_before
        memory = await probe.info("memory")
        stats = await probe.info("stats")
        cmdstats = await probe.info("commandstats")
        calls = [cmdstats.get(name, {}) for name in ("cmdstat_fcall", "cmdstat_evalsha")]
        script_calls = sum(int(c.get("calls", 0)) for c in calls)
        script_usec = sum(float(c.get("usec", 0)) for c in calls)
        records = [tuple(r) for res in results for r in res["records"]]
        verdict = referee(records, cfg.seconds)
        verdict.checks.append(
            Check(
                "worker processes that started and reported",
                f"{len(started)} started, {len(results)} reported",
                f"{cfg.processes}, {cfg.processes}",
                len(started) == len(results) == cfg.processes,
            )
        )
        outcomes: Counter[str] = Counter()
        log_lines: Counter[str] = Counter()
        errors: list[str] = []
        unavailable: list[str] = []
        for res in results:
            outcomes.update(res["outcomes"])
            log_lines.update(res["log_lines"])
            errors += res["errors"]
            unavailable += res["unavailable"]
        n_unavailable = sum(v for k, v in outcomes.items() if "Unavailable" in k)
        withdraw_failed = sum(v for k, v in log_lines.items() if k.startswith("could not withdraw"))
        verdict.checks += await _stats_check(probe, records, n_unavailable + withdraw_failed)
        lost = sum(v for k, v in outcomes.items() if "LeaseLost" in k)
        crashed = outcomes.get("task crashed", 0)
        verdict.checks.append(
            Check(
                "LeaseLost, crashed tasks, worker errors",
                f"{lost}, {crashed}, {len(errors)}",
                "0, 0, 0",
                not lost and not crashed and not errors,
            )
        )
        long_lags = sorted(
            (at, lag, res["proc"]) for res in results for at, lag in res["long_lags"]
        )
        verdict.checks.append(
            Check(
                "LimiterUnavailable (Redis did not answer within the 0.5 s socket timeout); "
                "event-loop stalls of a worker ≥ 0.5 s",
                f"{n_unavailable}; {len(long_lags)}",
                "expected 0; 0",
                n_unavailable == 0,
                required=False,
            )
        )
        latency = await probe.execute_command("LATENCY", "LATEST")
        slowlog = await probe.slowlog_get(128)
        for api in MIX:
            if not any(r[API] == MIX.index(api) for r in records):
                verdict.checks.append(Check(f"{api}: admissions", "0", "> 0", False))
        ttls = await _keys_and_ttls(probe)
        no_ttl = sorted(k for k, ms in ttls.items() if ms <= 0)
        longest = max(ttls.values(), default=0)
        verdict.checks.append(
            Check(
                "keys left after the run without a TTL",
                f"{len(no_ttl)} of {len(ttls)}"
                + (f": {no_ttl[:5]}" if no_ttl else "")
                + f" (longest PTTL {longest / 1000:.1f} s)",
                "0",
                not no_ttl and all(k.startswith(f"{NAMESPACE}:") for k in ttls),
            )
        )
        if cfg.expiry and ttls and not no_ttl:
            waited = time.monotonic()
            deadline = waited + longest / 1000 + 5
            # Polls: Redis tells no one when a key expires (keyspace events are off).
            while (left := await probe.dbsize()) and time.monotonic() < deadline:  # noqa: ASYNC110
                await asyncio.sleep(0.5)
            verdict.checks.append(
                Check(
                    "keys left once the longest TTL has passed",
                    f"{left} (polled for {time.monotonic() - waited:.1f} s)",
                    "0",
                    left == 0,
                )
            )
    finally:
        await probe.aclose()

    cpus = [res["cpu_s"] for res in results]
    rss = sorted(res["rss_kib"] for res in results)
    hwm = sorted(res["hwm_kib"] for res in results)
    settings = {
        "processes x tasks": f"{cfg.processes} x {cfg.tasks} = {cfg.processes * cfg.tasks} tasks",
        "run": f"{cfg.seconds:g} s of load (wall time from go to the last report {wall:.1f} s)",
        "seed": str(cfg.seed),
        "limits": "; ".join(f"`{api}`: {_describe(LIMITS[api])}" for api in MIX),
        "holds": ", ".join(
            f"{api} {lo * 1000:g}-{hi * 1000:g} ms" for api, (lo, hi) in HOLD.items()
        ),
        "redis-server": f"{server.binary} on 127.0.0.1:{server.port}",
    }
    redis_rows = {
        "used_memory after the run": memory["used_memory_human"],
        "used_memory_peak": memory["used_memory_peak_human"],
        "largest used_memory / connected_clients sampled each second": (
            f"{_mib(seen.get('used_memory', 0) / 1024)} MiB / {seen.get('connected_clients', 0)}"
        ),
        "CPU (INFO cpu, user + sys) during the run": (
            f"{cpu_redis:.1f} s = {cpu_redis / wall:.0%} of one core"
        ),
        "script calls (FCALL + EVALSHA), µs per call inside Redis": (
            f"{script_calls:,}, {script_usec / max(1, script_calls):.1f}"
        ),
        "commands processed (scripts' own commands included)": (
            f"{int(stats['total_commands_processed']):,}"
        ),
        "largest instantaneous_ops_per_sec sampled": (
            f"{seen.get('instantaneous_ops_per_sec', 0):,}"
        ),
        f"latency monitor: events ≥ {LATENCY_MS} ms (LATENCY LATEST: event, latest, max)": (
            ", ".join(f"{_text(e[0])} {e[2]} ms, max {e[3]} ms" for e in latency) or "none"
        ),
        "SLOWLOG: commands over 10 ms inside Redis (count, longest)": (
            f"{len(slowlog)}, {max((e['duration'] for e in slowlog), default=0) / 1000:.1f} ms"
        ),
    }
    lag_max = sorted(res["max_lag"] for res in results)
    good_cpu = [c for c in cpus if not math.isnan(c)]
    client_rows = {
        "RSS at the end, MiB (min / median / max over processes)": (
            f"{_mib(rss[0])} / {_mib(rss[len(rss) // 2])} / {_mib(rss[-1])}" if rss else "-"
        ),
        "peak RSS (VmHWM), MiB (min / median / max)": (
            f"{_mib(hwm[0])} / {_mib(hwm[len(hwm) // 2])} / {_mib(hwm[-1])}" if hwm else "-"
        ),
        "CPU per process during the run, s (min / median / max)": (
            f"{min(good_cpu):.1f} / {statistics.median(good_cpu):.1f} / {max(good_cpu):.1f}"
            if good_cpu
            else "-"
        ),
        "connections opened per process before the start; failed attempts (retried)": (
            "none (--cold)"
            if cfg.cold
            else f"{min(cfg.tasks, POOL_SIZE)}; {sum(r['warm_failures'] for r in results)}"
        ),
        f"largest event-loop lag per process, s (min / median / max; a {LAG_TICK:g} s ticker)": (
            f"{lag_max[0]:.3f} / {lag_max[len(lag_max) // 2]:.3f} / {lag_max[-1]:.3f}"
            if lag_max
            else "-"
        ),
        f"event-loop stalls ≥ {SOCKET_TIMEOUT:g} s (first few: s since start, lag s, process)": (
            f"{len(long_lags)}"
            + (": " + ", ".join(f"{a:.1f}/{g:.2f}/p{q}" for a, g, q in long_lags[:8]))
            if long_lags
            else "0"
        ),
        "all processes' CPU + Redis CPU, share of the machine's cores": (
            f"{(sum(good_cpu) + cpu_redis) / (wall * (os.cpu_count() or 1)):.0%} of "
            f"{os.cpu_count()} cores"
        ),
    }
    machine["Load average (1 min)"] = (
        f"{load_before:.2f} before the run, {load_after:.2f} after (other work on the machine "
        "competes with the soak)"
    )
    text = _render(
        cfg,
        verdict,
        outcomes,
        log_lines,
        errors + unavailable,
        settings,
        redis_rows,
        client_rows,
        machine,
    )
    summary = {
        "ok": verdict.ok,
        "excess": verdict.excess,
        "checks": [
            {"name": c.name, "value": c.value, "bound": c.bound, "ok": c.ok, "required": c.required}
            for c in verdict.checks
        ],
        "admissions": {api: sum(1 for r in records if r[API] == i) for i, api in enumerate(MIX)},
        "outcomes": dict(outcomes),
        "keys_after_run": len(ttls),
        "limiter_unavailable": n_unavailable,
        "loop_stalls": len(long_lags),
    }
    return text, summary, verdict.ok


def _describe(lim: APILimits) -> str:
    parts = []
    if lim.max_concurrent is not None:
        parts.append(f"max_concurrent={lim.max_concurrent}")
    parts += [f"Rate({r.limit}, {r.period:g} s)" for r in lim.windows]
    if lim.tokens_per_minute is not None:
        parts.append(f"tokens_per_minute={lim.tokens_per_minute:,}")
    if lim.window_margin:
        parts.append(f"window_margin={lim.window_margin:g} s")
    return ", ".join(parts)


def _ok(check: Check) -> str:
    if check.ok:
        return "yes"
    return "**NO**" if check.required else "no (reported; the run does not fail on it)"


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _table(rows: dict[str, str]) -> list[str]:
    return ["| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows.items()), ""]


def _render(
    cfg: Config,
    verdict: Verdict,
    outcomes: Counter[str],
    log_lines: Counter[str],
    errors: list[str],
    settings: dict[str, str],
    redis_rows: dict[str, str],
    client_rows: dict[str, str],
    machine: dict[str, str],
) -> str:
    status = "PASS" if verdict.ok else "FAIL"
    lines = [
        f"# Soak: {cfg.processes} processes x {cfg.tasks} tasks x {cfg.seconds:g} s on one Redis",
        "",
        "Generated by `make soak` (`python -m benchmarks.soak`). Every holder recorded its own",
        "timestamps (`time.time_ns()` around `acquire` and before `release`, and",
        "`slot.acquired_at`, Redis time of the admission); the referee below merged them after",
        "the run. Windows are checked with their period without the margin, from every",
        "admission as a window start.",
        "",
        f"**Verdict: {status}** — excess admissions: "
        f"{'0' if verdict.excess == 0 else f'{verdict.excess} limit checks failed'}.",
        "",
        *(
            f"Reported, not failing the run: {c.name}: {c.value} (expected {c.bound}).\n"
            for c in verdict.checks
            if not c.ok and not c.required
        ),
        "## Referee",
        "",
        "| check | measured | bound | ok |",
        "|---|---|---|---|",
        *(f"| {c.name} | {c.value} | {c.bound} | {_ok(c)} |" for c in verdict.checks),
        "",
        "## Per API",
        "",
        "Admissions/s over the run's length; waits from `acquire` called to returned, admitted",
        "requests only (every kind of request, the short-timeout and cancelled ones included).",
        "",
    ]
    if verdict.apis:
        cols = list(verdict.apis[0])
        lines += [
            "| " + " | ".join(cols) + " |",
            "|"
            + "|".join("---:" if c not in ("API", "use of the limits") else "---" for c in cols)
            + "|",
            *("| " + " | ".join(row[c] for c in cols) + " |" for row in verdict.apis),
            "",
        ]
    lines += ["## Outcomes of `acquire`", "", "| API: request -> outcome | count |", "|---|---:|"]
    lines += [f"| {k} | {v:,} |" for k, v in sorted(outcomes.items())]
    lines.append("")
    if log_lines:
        lines += ["Warnings the limiter logged (first words, counted):", ""]
        lines += [f"- {k}: {v:,}" for k, v in log_lines.most_common()]
        lines.append("")
    if errors:
        lines += ["Errors (first few per process):", "", *(f"- `{e}`" for e in errors[:12]), ""]
    lines += ["## Redis", "", *_table(redis_rows)]
    lines += ["## Clients", "", *_table(client_rows)]
    lines += ["## Settings", "", *_table(settings)]
    lines += ["## Machine", "", *_table(machine)]
    return "\n".join(lines)


def _stop_on_sigterm(signum: int, frame: object) -> None:
    """SIGTERM unwinds like Ctrl-C, so the server and the workers are stopped."""
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    """Run the soak; write and print the report. Exit 1 on any excess or failed check."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.soak", description=__doc__)
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--processes", type=int, default=16, help="worker processes (16)")
    parser.add_argument("--tasks", type=int, default=64, help="asyncio tasks per process (64)")
    parser.add_argument("--seconds", type=float, default=60.0, help="length of the load (60)")
    parser.add_argument("--seed", type=int, default=1, help="random seed (1)")
    parser.add_argument(
        "--skip-expiry",
        action="store_true",
        help="only check that every key has a TTL; do not wait for them to expire",
    )
    parser.add_argument(
        "--cold",
        action="store_true",
        help="do not open the connection pools before the start (the connect storm then "
        "falls inside the measured run)",
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "soak.md", help="report file")
    parser.add_argument("--json", type=Path, help="also write the referee's findings as JSON")
    args = parser.parse_args(argv)
    if args.processes < 1 or args.tasks < 1 or not args.seconds > 0:
        parser.error("--processes, --tasks and --seconds must be positive")
    cfg = Config(
        args.processes, args.tasks, args.seconds, args.seed, not args.skip_expiry, args.cold
    )
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    with RedisServer("--latency-monitor-threshold", str(LATENCY_MS)) as server:
        text, summary, ok = asyncio.run(_run(server, cfg))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text + "\n", encoding="utf-8")
    if args.json is not None:
        args.json.write_text(json.dumps(summary, indent=1), encoding="utf-8")
    print(text)
    print(f"[soak] {'PASS' if ok else 'FAIL'}; written to {args.out}", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    from benchmarks.soak import main as _main  # the spawned workers import this module by name

    sys.exit(_main())
