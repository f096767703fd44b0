"""Items 1-6: one task, one event loop, one operation at a time, uncontended.

Every operation is timed in the same loop, in rotating order, so all of them see the
same machine state: a plain PING (1), two no-op EVALSHA calls (2), the limiter's
acquire+release (3), the ``limits`` library's two moving-window hits (4),
``redis-rate-limiters``' ``AsyncSemaphore`` (5) and the original chatbot's per-process
semaphore with in-memory counters (6). Two diagnostics split the limiter's cost: 2b sends
the limiter's recorded KEYS/ARGV to the no-op script, 3b replays the limiter's two EVALSHA
commands verbatim without the ``Limiter`` code. Each operation's client CPU time is
measured too. A verification pass before the timing counts round trips, commands sent,
commands Redis ran and Lua time inside Redis for each Redis-backed operation.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from limiters import AsyncSemaphore
from limits import parse
from limits.aio.storage import RedisStorage
from limits.aio.strategies import MovingWindowRateLimiter
from redis.asyncio.connection import Connection

from limiter import APILimits, Limiter

from ._util import (
    CLIENT_TIMEOUTS,
    Check,
    CountingConnection,
    Counts,
    Report,
    Row,
    command_counts,
    interleaved,
    summarize,
)

__all__ = ["LocalLimiter", "run_single"]

API = "api"
#: Item 3's limits: a concurrency limit and two windows that never refuse.
LIMITS = APILimits(max_concurrent=1000, requests_per_minute=10**9, requests_per_hour=10**9)
#: The same two windows for the ``limits`` library (item 4).
PER_MINUTE = parse("1000000000/minute")
PER_HOUR = parse("1000000000/hour")

Op = Callable[[], Awaitable[Any]]


class LocalLimiter:
    """The original chatbot's approach: an ``asyncio.Semaphore`` and in-memory windows.

    Fast, and wrong across replicas: every process admits the whole limit by itself.
    """

    def __init__(self, max_concurrent: int, per_minute: int, per_hour: int) -> None:
        self._semaphore = asyncio.Semaphore(max_concurrent)
        self._windows = ((60.0, per_minute, deque[float]()), (3600.0, per_hour, deque[float]()))

    async def __aenter__(self) -> None:
        await self._semaphore.acquire()
        try:
            while True:
                now = time.time()
                wait = 0.0
                for period, limit, log in self._windows:
                    while log and now - log[0] >= period:
                        log.popleft()
                    if len(log) >= limit:
                        wait = max(wait, log[0] + period - now)
                if wait <= 0:
                    break
                await asyncio.sleep(wait)
            for _, _, log in self._windows:
                log.append(now)
        except BaseException:
            self._semaphore.release()
            raise

    async def __aexit__(self, *exc_info: object) -> None:
        self._semaphore.release()


@dataclass(slots=True)
class _Subject:
    """The objects one benchmark pass uses, all on clients of one connection class."""

    client: aioredis.Redis
    lim: Limiter
    #: The same limiter running its operations as EVALSHA scripts, as it does on Redis 6.2,
    #: fakeredis, or for a user without the FUNCTION right.
    scripts: Limiter
    noop: Any
    storage: RedisStorage
    moving: MovingWindowRateLimiter
    semaphore: AsyncSemaphore
    local: LocalLimiter

    async def aclose(self) -> None:
        await self.lim.aclose()
        await self.scripts.aclose()
        with contextlib.suppress(Exception):
            await self.storage.bridge.storage.aclose()  # type: ignore[attr-defined]
        await self.client.aclose()


def _subject(url: str, port: int, namespace: str, *, counting: bool) -> _Subject:
    extra: dict[str, Any] = {"connection_class": CountingConnection} if counting else {}
    extra.update(CLIENT_TIMEOUTS)
    client = aioredis.from_url(url, **extra)
    # limits passes these options on to redis.asyncio.Redis.from_url.
    storage = RedisStorage(
        f"async+redis://127.0.0.1:{port}/0",
        implementation="redispy",
        key_prefix=f"{namespace}-limits",
        **extra,
    )
    return _Subject(
        client=client,
        lim=Limiter(client, {API: LIMITS}, namespace=namespace),
        scripts=Limiter(client, {API: LIMITS}, namespace=namespace + "-scripts"),
        noop=client.register_script("return 1"),
        storage=storage,
        moving=MovingWindowRateLimiter(storage),
        semaphore=AsyncSemaphore(
            connection=client, name=f"{namespace}-sem", capacity=1000, max_sleep=5.0
        ),
        local=LocalLimiter(1000, 10**9, 10**9),
    )


def _ops(s: _Subject) -> dict[str, Op]:
    async def ping() -> None:
        await s.client.ping()

    async def noop_pair() -> None:
        await s.noop()
        await s.noop()

    async def limiter_pair() -> None:
        slot = await s.lim.acquire(API)
        await slot.release()

    async def tenant_pair() -> None:
        slot = await s.lim.acquire(API, tenant="user-42", priority=10)
        await slot.release()

    async def scripts_pair() -> None:
        slot = await s.scripts.acquire(API)
        await slot.release()

    async def limits_hits() -> None:
        await s.moving.hit(PER_MINUTE, "bench")
        await s.moving.hit(PER_HOUR, "bench")

    async def semaphore() -> None:
        async with s.semaphore:
            pass

    async def local() -> None:
        async with s.local:
            pass

    return {
        "ping": ping,
        "noop": noop_pair,
        "limiter": limiter_pair,
        "tenant": tenant_pair,
        "scripts": scripts_pair,
        "limits": limits_hits,
        "semaphore": semaphore,
        "local": local,
    }


class _ArgRecorder(CountingConnection):
    """Also keeps the arguments of every EVALSHA it packs (to replay them to a no-op)."""

    evalsha: list[tuple[Any, ...]] = []  # noqa: RUF012 - class-level log on purpose

    def pack_command(self, *args: Any) -> list[bytes]:
        if args and str(args[0]).upper() in ("EVALSHA", "FCALL"):
            type(self).evalsha.append(args)
        return super().pack_command(*args)


async def _limiter_commands(url: str) -> list[tuple[Any, ...]]:
    """The two script commands (FCALL or EVALSHA, name, numkeys, KEYS..., ARGV...) of one
    limiter pair."""
    client = aioredis.from_url(url, connection_class=_ArgRecorder, **CLIENT_TIMEOUTS)
    lim = Limiter(client, {API: LIMITS}, namespace="bench-args")
    try:
        slot = await lim.acquire(API)
        await slot.release()
        _ArgRecorder.evalsha.clear()
        slot = await lim.acquire(API)
        await slot.release()
        calls = list(_ArgRecorder.evalsha)
    finally:
        await lim.aclose()
        await client.aclose()
    return calls


async def _as_scripts(lim: Limiter) -> None:
    """Make ``lim`` run its operations as EVALSHA scripts (a benchmark-only switch of the
    runner's mode, which Redis 6.2, fakeredis and users without FUNCTION get by themselves)."""
    runner = lim._runner
    await runner.ready()
    runner.functions = False


def _split(call: tuple[Any, ...]) -> tuple[list[Any], list[Any]]:
    numkeys = int(call[2])
    return list(call[3 : 3 + numkeys]), list(call[3 + numkeys :])


def _pack_us(calls: list[tuple[Any, ...]], rounds: int = 2000) -> float:
    """CPU time redis-py spends packing ``calls`` (no I/O), microseconds per set."""
    conn = Connection()
    t0 = time.perf_counter_ns()
    for _ in range(rounds):
        for call in calls:
            conn.pack_command(*call)
    return (time.perf_counter_ns() - t0) / rounds / 1000


async def run_single(url: str, port: int, n: int, n_verify: int, report: Report) -> None:
    """Items 1-6 (and the round-trip check of item 3), appended to ``report``."""
    probe = aioredis.from_url(url)
    try:
        counts = await _verify(url, port, probe, n_verify, report)
        await probe.flushall()
        samples, cpu_us, replay = await _timed(url, port, n)
        _rows(samples, cpu_us, replay, counts, report)
        await probe.flushall()
    finally:
        await probe.aclose()


async def _verify(
    url: str, port: int, probe: aioredis.Redis, n_verify: int, report: Report
) -> dict[str, Counts]:
    counts: dict[str, Counts] = {}
    s = _subject(url, port, "bench-verify", counting=True)
    try:
        ops = _ops(s)
        await _as_scripts(s.scripts)
        for name in ("ping", "noop", "limiter", "tenant", "scripts", "limits", "semaphore"):
            for _ in range(20):  # warm: scripts loaded, connections open, semaphore created
                await ops[name]()
            counts[name] = await command_counts(probe, ops[name], n_verify)
        counts["local"] = Counts(0, 0, 0, 0, 0)
    finally:
        await s.aclose()
    c, noop = counts["limiter"], counts["noop"]
    report.checks.append(
        Check(
            "3. limiter pair: round trips / commands sent / script calls run by Redis, per pair",
            f"{c.round_trips:g} / {c.sent:g} / {c.evalsha:g} (over {n_verify} pairs: client "
            "writes and packed commands; `INFO commandstats` cmdstat_fcall + cmdstat_evalsha "
            "delta)",
            "exactly 2 / 2 / 2",
            c.round_trips == 2 and c.sent == 2 and c.evalsha == 2,
        )
    )
    report.checks.append(
        Check(
            "3. limiter pair: commands Redis ran, per pair",
            f"{c.executed:g} (`total_commands_processed`: the 2 script calls and the commands the "
            f"scripts run); two no-op EVALSHA: {noop.executed:g}",
            "at most 18 (was 27)",
            c.executed <= 18,
        )
    )
    report.checks.append(
        Check(
            "3. limiter pair: Redis time, per pair",
            f"{c.lua_us:.1f} µs (`INFO commandstats` usec of cmdstat_fcall + cmdstat_evalsha, "
            f"over {n_verify} "
            f"pairs); two no-op EVALSHA: {noop.lua_us:.1f} µs",
            "at most 30 µs on an idle machine (was 44)",
            c.lua_us <= 30,
        )
    )
    return counts


async def _timed(
    url: str, port: int, n: int
) -> tuple[dict[str, list[int]], dict[str, float], list[Any]]:
    """Latency samples (ns) and mean client CPU (µs) per operation, and the replayed calls."""
    s = _subject(url, port, "bench", counting=False)
    try:
        ops = _ops(s)
        await _as_scripts(s.scripts)
        replay = await _limiter_commands(url)
        replay_args = [_split(call) for call in replay]

        async def noop_pair_args() -> None:
            for keys, args in replay_args:
                await s.noop(keys=keys, args=args)

        async def raw_scripts() -> None:
            for call in replay:
                await s.client.execute_command(*call)  # type: ignore[no-untyped-call]

        ops["noop_args"] = noop_pair_args
        ops["raw"] = raw_scripts
        samples, cpu_us = await interleaved(ops, n)
    finally:
        await s.aclose()
    return samples, cpu_us, replay


def _rows(
    samples: dict[str, list[int]],
    cpu_us: dict[str, float],
    replay: list[tuple[Any, ...]],
    counts: dict[str, Counts],
    report: Report,
) -> None:
    sums = {name: summarize(v) for name, v in samples.items()}
    argc = " + ".join(f"{len(k)} keys/{len(a)} args" for k, a in map(_split, replay))
    labels = {
        "ping": ("1", "PING round trip (redis.asyncio)"),
        "noop": ("2", "two no-op EVALSHA (`return 1`)"),
        "noop_args": ("2b", f"two no-op EVALSHA carrying the limiter's KEYS/ARGV ({argc})"),
        "raw": (
            "3b",
            "the limiter's two EVALSHA replayed as raw commands (no Limiter code; one slot id "
            "reused, so the window sets stay at one entry)",
        ),
        "limiter": ("3", "limiter: `acquire` + `release` (concurrency + 1 min + 1 h)"),
        "tenant": ("3t", 'the same with `tenant="user-42", priority=10` (fair queue)'),
        "scripts": (
            "3s",
            "the same, operations run as EVALSHA scripts (Redis 6.2, fakeredis, no FUNCTION right)",
        ),
        "limits": ("4", "`limits` 5: MovingWindow `hit` per minute + per hour"),
        "semaphore": ("5", "`redis-rate-limiters` AsyncSemaphore enter + exit"),
        "local": ("6", "per-process asyncio.Semaphore + deque windows (no Redis)"),
    }
    for name, (item, label) in labels.items():
        got = counts.get(name)
        note = ""
        if got is not None and got.lua_us > 0:
            note = f"Lua time in Redis {got.lua_us:.1f} µs/op"
        report.rows.append(
            Row(
                item=item,
                label=label,
                summary=sums[name],
                counts=got,
                cpu_us=cpu_us[name],
                note=note,
            )
        )
    lim, noop, ping = sums["limiter"], sums["noop"], sums["ping"]
    ratio50 = lim.p50_us / noop.p50_us
    ratio99 = lim.p99_us / noop.p99_us
    report.checks.append(
        Check(
            "2/3. limiter pair / no-op EVALSHA pair",
            f"p50 {ratio50:.2f}x, p99 {ratio99:.2f}x, mean {lim.mean_us / noop.mean_us:.2f}x",
            "at most 1.3x",
            ratio50 <= 1.3,
        )
    )
    fair, c_fair, c_lim = sums["tenant"], counts["tenant"], counts["limiter"]
    report.checks.append(
        Check(
            "3t/3. pair with tenant= and priority= / pair without (uncontended)",
            f"p50 {fair.p50_us / lim.p50_us:.2f}x; Redis commands {c_fair.executed:g} vs "
            f"{c_lim.executed:g}; Redis time {c_fair.lua_us:.1f} vs {c_lim.lua_us:.1f} µs",
            "the same commands (rounded); Redis time within 1.1x",
            # Executed commands are counted over many pairs: a TTL refresh (once a second)
            # falls in one run or the other and adds a few thousandths per pair.
            round(c_fair.executed) == round(c_lim.executed) and c_fair.lua_us <= 1.1 * c_lim.lua_us,
        )
    )
    report.checks.append(
        Check(
            "1/3. limiter pair / PING",
            f"p50 {lim.p50_us / ping.p50_us:.2f}x, p99 {lim.p99_us / ping.p99_us:.2f}x",
            "(2 round trips: 2x is the floor)",
            None,
        )
    )
    args, raw = sums["noop_args"], sums["raw"]
    noop_calls = [("EVALSHA", "0" * 40, 0)] * 2
    lua = counts["limiter"].lua_us - counts["noop"].lua_us
    cpu_lim, cpu_noop = cpu_us["limiter"], cpu_us["noop"]
    report.notes.append(
        f"Where the limiter pair's time goes. p50: no-op pair {noop.p50_us:.0f} µs (2); with the "
        f"limiter's KEYS/ARGV {args.p50_us - noop.p50_us:+.0f} µs (2b); running the real scripts"
        f" instead of `return 1` {raw.p50_us - args.p50_us:+.0f} µs (3b); through the Limiter "
        f"{lim.p50_us - raw.p50_us:+.0f} µs (3). Inside Redis (`INFO commandstats`): the "
        f"scripts take {counts['limiter'].lua_us:.0f} µs per pair, the no-ops "
        f"{counts['noop'].lua_us:.0f} µs ({lua:+.0f} µs). In the client (thread CPU, mean): "
        f"{cpu_lim:.0f} µs per limiter pair vs {cpu_noop:.0f} µs per no-op pair "
        f"({cpu_lim - cpu_noop:+.0f} µs), of which redis-py's pure-Python `pack_command` takes "
        f"{_pack_us(replay):.1f} µs for the limiter's two commands ({_pack_us(noop_calls):.1f}"
        " µs for the no-ops')."
    )
