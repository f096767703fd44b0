"""Worker processes for ``tests/test_multiprocess_calls.py``: one role per scenario.

Run as ``python -m tests._call_workers ROLE CONFIG_JSON`` from the repository root. The
protocol is the one of :mod:`tests._workers` (whose helpers this module reuses): every
worker builds its own limiter on the real redis-server at ``config["url"]``, synchronises
through Redis lists under ``config["sync"]`` (never through sleeps), and writes what it
observed as one JSON object to ``config["out"]``; an exception is written there as
``"error"`` and the exit status is 1. Every blocking wait has a bound (``SIGNAL_TIMEOUT``),
so an orphaned worker ends by itself.

Times: ``*_ns`` are ``time.monotonic_ns()`` (CLOCK_MONOTONIC, one clock for every process
on Linux); ``*_redis`` and ``acquired_at`` are microseconds of Redis ``TIME``.
"""

from __future__ import annotations

import asyncio
import random
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import redis.asyncio as aioredis

from limiter import AcquireTimeout, APILimits, ConcurrencyManager, ConfigError, Limiter
from tests._workers import SIGNAL_TIMEOUT, barrier, describe, outcome, signal, tell, until_waiting
from tests._workers import main as worker_main

Config = dict[str, Any]
Result = dict[str, Any]


def limits_of(spec: dict[str, dict[str, Any]] | None) -> dict[str, APILimits] | None:
    """``{api: APILimits(**kwargs)}`` from a JSON spec; ``None`` stays ``None`` (the defaults)."""
    if spec is None:
        return None
    return {api: APILimits(**kwargs) for api, kwargs in spec.items()}


async def redis_time_us(r: aioredis.Redis) -> int:
    """Redis TIME as integer microseconds (the clock the limiter's scripts use)."""
    seconds, micros = await r.time()
    return int(seconds) * 1_000_000 + int(micros)


class Operation:
    """A call's operation: hold ``hold`` seconds, raising ``failures`` errors first.

    Every attempt is recorded as ``[start_ns, end_ns, "raised" | "returned"]``.
    """

    def __init__(
        self, hold: float, failures: int = 0, make_error: Callable[[], BaseException] | None = None
    ) -> None:
        self.hold = hold
        self.failures = failures
        self.make_error = make_error or (lambda: ConnectionResetError("reset by peer (test)"))
        self.attempts: list[list[Any]] = []

    async def __call__(self) -> str:
        start = time.monotonic_ns()
        await asyncio.sleep(self.hold)
        end = time.monotonic_ns()
        if len(self.attempts) < self.failures:
            self.attempts.append([start, end, "raised"])
            raise self.make_error()
        self.attempts.append([start, end, "returned"])
        return f"done after {len(self.attempts)} attempts"


# -- roles ----------------------------------------------------------------------------


async def role_manager(cfg: Config, r: aioredis.Redis) -> Result:
    """``ConcurrencyManager`` calls, all started at once after the go signal.

    ``calls`` is ``[[api, n], ...]``: ``n`` concurrent calls of ``api``, each holding
    ``hold`` seconds and failing ``failures`` times (``ConnectionResetError``) before it
    returns. Once they are all done this worker pushes ``{"name", "local"}`` to
    ``<sync>:done`` and reads the cluster-wide stats when the test pushes
    ``<sync>:report:<name>``.
    """
    cm = ConcurrencyManager(redis_url=cfg["url"], api_configs=limits_of(cfg.get("api_configs")))
    try:
        before = await cm.get_cluster_stats()  # connected before the barrier
        ops: list[tuple[str, Operation]] = [
            (api, Operation(cfg["hold"], cfg.get("failures", 0)))
            for api, n in cfg["calls"]
            for _ in range(n)
        ]
        await barrier(r, cfg)
        results = await asyncio.gather(
            *(
                cm.execute_with_concurrency_control(
                    api_name=api, operation=op, operation_name=f"{cfg['name']} call {i}"
                )
                for i, (api, op) in enumerate(ops)
            ),
            return_exceptions=True,
        )
        local = cm.get_stats()
        await tell(r, cfg, "done", {"name": cfg["name"], "local": local})
        await signal(r, cfg, f"report:{cfg['name']}")
        cluster = await cm.get_cluster_stats()
    finally:
        await cm.aclose()
    errors = [describe(x) for x in results if isinstance(x, BaseException)]
    return {
        "calls": [
            {"api": api, "attempts": op.attempts, "result": res}
            for (api, op), res in zip(ops, results, strict=True)
            if not isinstance(res, BaseException)
        ],
        "errors": errors,
        "local": local,
        "cluster": cluster,
        "cluster_before": before,
    }


async def role_set_cooldown(cfg: Config, r: aioredis.Redis) -> Result:
    """After go, ``cooldown(api, seconds)``; then push the Redis times around it to ``cooled``."""
    lim = Limiter.from_url(cfg["url"], {cfg["api"]: APILimits()})
    try:
        await lim.stats(cfg["api"])  # connected and scripts loaded before the barrier
        await barrier(r, cfg)
        before = await redis_time_us(r)
        in_force = await lim.cooldown(cfg["api"], cfg["seconds"])
        after = await redis_time_us(r)
        await tell(r, cfg, "cooled", {"before": before, "after": after})
    finally:
        await lim.aclose()
    return {"before": before, "after": after, "in_force": in_force}


async def role_call_429(cfg: Config, r: aioredis.Redis) -> Result:
    """After go, ``Limiter.call`` an operation that answers one openai 429 (Retry-After), then ok.

    Records the Redis time read in each attempt (just before the 429 is raised; at the start
    of the attempt that succeeds).
    """
    from tests._provider import RATE_LIMITED, _sdk_error

    api = cfg["api"]
    lim = Limiter.from_url(cfg["url"], limits_of(cfg["limits"]) or {})
    attempts: list[list[Any]] = []

    async def operation() -> str:
        at = await redis_time_us(r)
        if not attempts:
            attempts.append([at, "429"])
            raise _sdk_error(429, {"retry-after": cfg["retry_after"]}, RATE_LIMITED)
        attempts.append([at, "ok"])
        return "ok"

    try:
        await lim.stats(api)
        await barrier(r, cfg)
        result = await lim.call(api, operation, name="429 then ok", timeout=10)
    finally:
        await lim.aclose()
    return {"attempts": attempts, "result": result}


async def role_probe_cooldown(cfg: Config, r: aioredis.Redis) -> Result:
    """On the signal ``signal``: ``acquire(timeout=0)`` at once, then ``acquire(timeout=3)``."""
    api = cfg["api"]
    lim = Limiter.from_url(cfg["url"], {api: APILimits()})
    try:
        await lim.stats(api)  # connected and scripts loaded before the signal
        await tell(r, cfg, "ready", cfg["name"])
        await signal(r, cfg, cfg["signal"])
        try:
            slot = await lim.acquire(api, timeout=0)
        except AcquireTimeout as exc:
            probe = f"refused:{exc.reason}"
        else:
            probe = "admitted"
            await slot.release()
        probed = await redis_time_us(r)
        slot = await lim.acquire(api, timeout=3)
        await slot.release()
    finally:
        await lim.aclose()
    return {"probe": probe, "probed_redis": probed, "acquired_at": slot.acquired_at}


async def role_tokens(cfg: Config, r: aioredis.Redis) -> Result:
    """``tasks`` tasks loop ``async with lim.slot(api, tokens=r) as s: ...; s.report_tokens(u)``.

    ``mode`` "over": r in [50, 200], u in [0, r], until the go payload's ``deadline`` (real
    time, seconds; the acquire timeout runs to it). ``mode`` "under": r in [20, 50],
    u in [r + 1, r + 50], ``iterations`` times per task. Each admission is recorded as
    ``[acquired_at, r, u, slot id]``. Afterwards one ``acquire(tokens=too_many)`` is tried (with a
    5 s timeout) and its outcome recorded.
    """
    api = cfg["api"]
    lim = Limiter.from_url(cfg["url"], limits_of(cfg["limits"]) or {})
    records: list[list[Any]] = []
    try:
        await lim.stats(api)
        go = await barrier(r, cfg)
        deadline: float | None = go.get("deadline")

        async def task(seed: str) -> None:
            rng = random.Random(seed)
            done = 0
            while cfg["mode"] == "over" or done < cfg["iterations"]:
                if cfg["mode"] == "over":
                    reserve = rng.randint(50, 200)
                    used = rng.randint(0, reserve)
                else:
                    reserve = rng.randint(20, 50)
                    used = reserve + rng.randint(1, 50)
                timeout = 10.0 if deadline is None else deadline - time.time()
                if timeout <= 0:
                    return
                try:
                    async with lim.slot(api, timeout=timeout, tokens=reserve) as slot:
                        records.append([slot.acquired_at, reserve, used, slot.id])
                        await asyncio.sleep(rng.uniform(0, cfg["hold"]))  # the "request"
                        slot.report_tokens(used)
                except AcquireTimeout:
                    if deadline is not None:
                        return  # the run is over
                    raise
                done += 1

        outcomes = await asyncio.gather(
            *(task(f"{cfg['name']}-{i}") for i in range(cfg["tasks"])), return_exceptions=True
        )
        start = time.monotonic()
        try:
            await lim.acquire(api, timeout=5, tokens=cfg["too_many"])
            too_many: dict[str, Any] = {"outcome": "admitted"}
        except ConfigError as exc:
            too_many = {"outcome": "ConfigError", "field": exc.field, "value": exc.value}
        except AcquireTimeout as exc:
            too_many = {"outcome": f"AcquireTimeout:{exc.reason}"}
        too_many["elapsed"] = time.monotonic() - start
    finally:
        await lim.aclose()
    errors = [describe(o) for o in outcomes if isinstance(o, BaseException)]
    return {"admissions": records, "errors": errors, "too_many": too_many}


async def role_hold_tokens(cfg: Config, r: aioredis.Redis) -> Result:
    """Hold one slot reserving ``reserve`` tokens until ``<sync>:release``, then release it.

    Pushes ``<sync>:held`` once admitted; before releasing reports ``use`` tokens (unless
    ``None``) and reads Redis TIME; pushes ``<sync>:released`` once the release returned.
    """
    api = cfg["api"]
    lim = Limiter.from_url(cfg["url"], limits_of(cfg["limits"]) or {})
    try:
        slot = await lim.acquire(api, timeout=0, tokens=cfg["reserve"])
        await tell(r, cfg, "held", {"acquired_at": slot.acquired_at})
        await signal(r, cfg, "release")
        if cfg.get("use") is not None:
            slot.report_tokens(cfg["use"])
        released = await redis_time_us(r)
        await slot.release()
        await tell(r, cfg, "released", released)
    finally:
        await lim.aclose()
    return {"released_redis": released}


async def role_wait_tokens(cfg: Config, r: aioredis.Redis) -> Result:
    """After go, wait (FIFO) for one slot reserving ``tokens``; release it at once."""
    api = cfg["api"]
    lim = Limiter.from_url(cfg["url"], limits_of(cfg["limits"]) or {}, ticket_ttl=cfg["ticket_ttl"])
    try:
        await lim.stats(api)
        await barrier(r, cfg)
        slot = await lim.acquire(api, timeout=cfg["timeout"], tokens=cfg["tokens"])
        await slot.release()
    finally:
        await lim.aclose()
    return {"acquired_at": slot.acquired_at}


async def role_cancel_handed(cfg: Config, r: aioredis.Redis) -> Result:
    """A waiter (reserving ``tokens``) cancelled after a release handed it a slot unseen.

    After go, starts ``acquire(timeout=10, tokens=...)``; once it waits (past its first
    script call), pushes ``<sync>:waiting`` and then blocks this process's event loop in a
    synchronous BLPOP on ``<sync>:released`` (pushed by the holder after its release), so
    the hand-off lands in Redis without this process reading it; then cancels the waiter.
    """
    import redis as sync_redis

    api = cfg["api"]
    lim = Limiter.from_url(cfg["url"], limits_of(cfg["limits"]) or {}, ticket_ttl=cfg["ticket_ttl"])
    blocking = sync_redis.Redis.from_url(cfg["url"], socket_timeout=None)  # BLPOP waits
    try:
        await lim.stats(api)
        await barrier(r, cfg)
        waiter = asyncio.create_task(lim.acquire(api, timeout=10, tokens=cfg["tokens"]))
        await until_waiting(r, cfg, 1)
        await tell(r, cfg, "waiting", cfg["name"])
        if blocking.blpop([f"{cfg['sync']}:released"], timeout=SIGNAL_TIMEOUT) is None:
            raise RuntimeError(f"no 'released' signal within {SIGNAL_TIMEOUT}s")
        waiter.cancel()
        await asyncio.gather(waiter, return_exceptions=True)
        ended = outcome(waiter)
        if ended == "returned":
            await waiter.result().release()
    finally:
        blocking.close()
        await lim.aclose()
    return {"outcome": ended}


ROLES: dict[str, Callable[[Config, aioredis.Redis], Awaitable[Result]]] = {
    "call_429": role_call_429,
    "cancel_handed": role_cancel_handed,
    "hold_tokens": role_hold_tokens,
    "manager": role_manager,
    "probe_cooldown": role_probe_cooldown,
    "set_cooldown": role_set_cooldown,
    "tokens": role_tokens,
    "wait_tokens": role_wait_tokens,
}


if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1:], ROLES))
