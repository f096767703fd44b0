"""Shared pieces: latency summaries, result rows, counting connections, worker processes."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import math
import multiprocessing
import os
import platform
import queue
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from multiprocessing.context import SpawnProcess
from typing import Any

import redis
import redis.asyncio as aioredis
from redis.asyncio.connection import Connection

__all__ = [
    "Check",
    "CountingConnection",
    "Counts",
    "Report",
    "Row",
    "Summary",
    "collect",
    "command_counts",
    "interleaved",
    "machine_info",
    "percentile",
    "spawn_context",
    "spawned",
    "summarize",
]

#: Socket timeouts of ``Limiter.from_url``: every Redis client of the benchmarks uses them,
#: so the floors run on the same client configuration as the limiter.
CLIENT_TIMEOUTS: dict[str, float] = {"socket_timeout": 2.0, "socket_connect_timeout": 1.0}


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..1) of already sorted values."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(q * len(sorted_values)))
    return sorted_values[rank - 1]


@dataclass(frozen=True, slots=True)
class Summary:
    """Latency of one kind of operation, from its samples."""

    n: int
    p50_us: float
    p99_us: float
    mean_us: float
    max_us: float

    @property
    def ops_per_s(self) -> float:
        """Operations per second of one task running them back to back (1 / mean)."""
        return 1e6 / self.mean_us if self.mean_us > 0 else math.nan


def summarize(samples_ns: Sequence[int]) -> Summary:
    """p50/p99/mean/max in microseconds of samples in nanoseconds."""
    if not samples_ns:
        return Summary(0, math.nan, math.nan, math.nan, math.nan)
    values = sorted(s / 1000 for s in samples_ns)
    return Summary(
        n=len(values),
        p50_us=percentile(values, 0.50),
        p99_us=percentile(values, 0.99),
        mean_us=sum(values) / len(values),
        max_us=values[-1],
    )


@dataclass(frozen=True, slots=True)
class Row:
    """One line of the results table."""

    #: Item number of the benchmark plan and a short label.
    item: str
    label: str
    summary: Summary
    #: Operations per second; defaults to one sequential task's rate (1 / mean latency).
    ops_per_s: float | None = None
    #: Round trips and commands per operation, when counted.
    counts: Counts | None = None
    #: Mean CPU time of the client thread per operation (Python, syscalls), when measured.
    cpu_us: float | None = None
    note: str = ""

    @property
    def rate(self) -> float:
        return self.summary.ops_per_s if self.ops_per_s is None else self.ops_per_s


@dataclass(frozen=True, slots=True)
class Check:
    """A measured figure held against its target."""

    name: str
    value: str
    target: str
    ok: bool | None


@dataclass(slots=True)
class Report:
    """Everything one run produced."""

    rows: list[Row] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    machine: dict[str, str] = field(default_factory=dict)
    settings: dict[str, str] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)


class CountingConnection(Connection):
    """A redis-py asyncio connection that counts its writes and the commands it packs.

    A single command is one write (one round trip); a pipeline is one write for all of its
    commands. Only used in the verification passes, never while timing.
    """

    writes = 0
    commands = 0

    def pack_command(self, *args: Any) -> list[bytes]:
        # Pipelines pack through ``pack_commands``, which calls this once per command.
        type(self).commands += 1
        return super().pack_command(*args)

    async def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        type(self).writes += 1
        await super().send_packed_command(command, check_health)


@dataclass(frozen=True, slots=True)
class Counts:
    """What one operation costs, averaged over a verification pass."""

    #: Client writes, i.e. round trips (a pipeline is one).
    round_trips: float
    #: Commands the client sent (each command of a pipeline counts).
    sent: float
    #: Commands Redis executed: ``total_commands_processed``, commands run by scripts included.
    executed: float
    #: Script calls (``cmdstat_evalsha`` + ``cmdstat_fcall``) and their time inside Redis,
    #: microseconds.
    evalsha: float
    lua_us: float


async def interleaved(
    ops: dict[str, Callable[[], Awaitable[Any]]], n: int
) -> tuple[dict[str, list[int]], dict[str, float]]:
    """Run each of ``ops`` ``n`` times after a warm-up (``max(50, n / 20)``), interleaved
    and rotating which goes first, so that a slow moment of the machine falls on all of
    them alike. Returns latency samples (ns) and mean client thread CPU (µs) per op."""
    names = list(ops)
    samples: dict[str, list[int]] = {name: [] for name in names}
    cpu_ns = dict.fromkeys(names, 0)
    warm = max(50, n // 20)
    clock, cpu = time.perf_counter_ns, time.thread_time_ns
    gc.collect()
    for i in range(warm + n):
        shift = i % len(names)
        for name in names[shift:] + names[:shift]:
            op = ops[name]
            c0 = cpu()
            t0 = clock()
            await op()
            dt = clock() - t0
            dc = cpu() - c0
            if i >= warm:
                samples[name].append(dt)
                cpu_ns[name] += dc
    return samples, {name: v / max(1, n) / 1000 for name, v in cpu_ns.items()}


async def _server_counts(client: aioredis.Redis) -> tuple[int, int, int]:
    """(total_commands_processed, EVALSHA + FCALL calls, their usec) of the server now."""
    stats = await client.info("stats")
    cmds = await client.info("commandstats")
    scripts = [cmds.get(name, {}) for name in ("cmdstat_evalsha", "cmdstat_fcall")]
    return (
        int(stats["total_commands_processed"]),
        sum(int(s.get("calls", 0)) for s in scripts),
        sum(int(s.get("usec", 0)) for s in scripts),
    )


async def command_counts(probe: aioredis.Redis, op: Callable[[], Awaitable[Any]], n: int) -> Counts:
    """Run ``op`` ``n`` times and return what one run costs, on the client and in Redis.

    ``op`` must use clients built on :class:`CountingConnection`. ``probe`` is a separate
    plain client; what its own INFO calls add is measured first and subtracted.
    """
    a = await _server_counts(probe)
    b = await _server_counts(probe)
    overhead = b[0] - a[0]
    before = await _server_counts(probe)
    writes0, sent0 = CountingConnection.writes, CountingConnection.commands
    for _ in range(n):
        await op()
    writes = CountingConnection.writes - writes0
    sent = CountingConnection.commands - sent0
    after = await _server_counts(probe)
    return Counts(
        round_trips=writes / n,
        sent=sent / n,
        executed=(after[0] - before[0] - overhead) / n,
        evalsha=(after[1] - before[1]) / n,
        lua_us=(after[2] - before[2]) / n,
    )


def spawn_context() -> multiprocessing.context.SpawnContext:
    """Fresh interpreters for workers (no inherited event loop or sockets)."""
    return multiprocessing.get_context("spawn")


@contextlib.contextmanager
def spawned(
    target: Callable[..., None], arg_tuples: Sequence[tuple[Any, ...]], *, grace: float = 10.0
) -> Iterator[list[SpawnProcess]]:
    """Start one worker process per argument tuple; on exit join them, killing stragglers."""
    ctx = spawn_context()
    procs = [ctx.Process(target=target, args=args, daemon=True) for args in arg_tuples]
    try:
        for proc in procs:
            proc.start()
        yield procs
    finally:
        deadline = time.monotonic() + grace
        for proc in procs:
            if proc.pid is not None:
                proc.join(timeout=max(0.0, deadline - time.monotonic()))
        for proc in procs:
            if proc.pid is not None and proc.is_alive():
                proc.terminate()
                proc.join(timeout=3)
            if proc.pid is not None and proc.is_alive():
                proc.kill()
                proc.join()


async def collect(q: Any, count: int, timeout: float) -> list[Any]:
    """Up to ``count`` items from a multiprocessing queue, waiting at most ``timeout`` s."""
    got: list[Any] = []
    deadline = time.monotonic() + timeout
    while len(got) < count and time.monotonic() < deadline:
        try:
            got.append(await asyncio.to_thread(q.get, True, 0.5))
        except queue.Empty:
            continue
    return got


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def machine_info(redis_server_version: str) -> dict[str, str]:
    """What the figures depend on: CPU, cores, Python, Redis server and client versions."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        usable = os.cpu_count() or 0
    return {
        "CPU": _cpu_model(),
        "Cores": f"{os.cpu_count()} (usable by this process: {usable})",
        "OS": platform.platform(),
        "Python": f"{platform.python_implementation()} {platform.python_version()}",
        "redis-server": redis_server_version,
        "redis-py": redis.__version__,
        "fleetlimit": _version("fleetlimit"),
        "limits": _version("limits"),
        "redis-rate-limiters": _version("redis-rate-limiters"),
        "Date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }
