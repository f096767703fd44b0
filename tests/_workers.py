"""Worker processes for ``tests/test_multiprocess.py``: one role per scenario.

Run as ``python -m tests._workers ROLE CONFIG_JSON`` from the repository root. Every
worker builds its own :class:`~limiter.Limiter` on the real redis-server at
``config["url"]``, synchronises with the test through Redis lists under
``config["sync"]`` (never through sleeps), and writes what it observed as one JSON
object to ``config["out"]``; an exception is written there as ``"error"`` and the exit
status is 1. Every blocking wait has a bound, so an orphaned worker ends by itself.

Barrier protocol: a worker pushes its name to ``<sync>:ready`` once it is connected,
then blocks on ``<sync>:go:<name>``; the test pushes one JSON payload there to start it.

Times: ``*_us`` are ``time.time_ns() // 1000`` (the machine's real-time clock, the clock
Redis ``TIME`` reads too); ``*_ns`` are ``time.monotonic_ns()`` (CLOCK_MONOTONIC, one
clock for every process on Linux); ``acquired_at`` is the slot's Redis time.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import sys
import time
import traceback
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis

from limiter import AcquireTimeout, APILimits, LeaseLost, Limiter, Rate
from limiter._lua import lua_source

#: Longest any worker blocks on a signal from the test before giving up, seconds.
SIGNAL_TIMEOUT = 30

Config = dict[str, Any]
Result = dict[str, Any]


def now_us() -> int:
    return time.time_ns() // 1000


def limits_of(api: str, spec: dict[str, Any]) -> dict[str, APILimits]:
    """``{api: APILimits}`` from a JSON spec: max_concurrent, rates [[n, period]], lease_ttl,
    tenant_weights, priority_aging."""
    limits = APILimits(
        max_concurrent=spec.get("max_concurrent"),
        rates=[Rate(n, p) for n, p in spec.get("rates", [])],
        lease_ttl=spec.get("lease_ttl", 30.0),
        tenant_weights=spec.get("tenant_weights", {}),
        priority_aging=spec.get("priority_aging"),
    )
    return {api: limits}


def make_limiter(cfg: Config, redis: Any = None) -> Limiter:
    limits = limits_of(cfg["api"], cfg["limits"])
    kwargs = {"ticket_ttl": cfg["ticket_ttl"]} if "ticket_ttl" in cfg else {}
    if redis is not None:
        return Limiter(redis, limits, **kwargs)
    return Limiter.from_url(cfg["url"], limits, **kwargs)


def queue_key(cfg: Config) -> str:
    return f"limiter:{{{cfg['api']}}}:queue"


def holders_key(cfg: Config) -> str:
    return f"limiter:{{{cfg['api']}}}:holders"


async def barrier(r: aioredis.Redis, cfg: Config) -> dict[str, Any]:
    """Say ready, then block until the test says go; returns the go payload."""
    await tell(r, cfg, "ready", cfg["name"])
    return await signal(r, cfg, f"go:{cfg['name']}")


async def signal(r: aioredis.Redis, cfg: Config, what: str) -> Any:
    got = await r.blpop([f"{cfg['sync']}:{what}"], timeout=SIGNAL_TIMEOUT)
    if got is None:
        raise RuntimeError(f"no {what!r} signal from the test within {SIGNAL_TIMEOUT}s")
    return json.loads(got[1])


async def tell(r: aioredis.Redis, cfg: Config, what: str, payload: Any) -> None:
    await r.rpush(f"{cfg['sync']}:{what}", json.dumps(payload))


async def until_queued(r: aioredis.Redis, cfg: Config, n: int, within: float = 10.0) -> None:
    """Return once the API's queue holds ``n`` tickets (a read of the cluster's state)."""
    deadline = time.monotonic() + within
    while await r.zcard(queue_key(cfg)) != n:
        if time.monotonic() > deadline:
            raise RuntimeError(f"queue never held {n} tickets within {within}s")
        await asyncio.sleep(0.002)


def describe(exc: BaseException) -> str:
    return "".join(traceback.format_exception(exc)).strip()


def outcome(task: asyncio.Task[Any]) -> str:
    """How a task ended: "CancelledError", another exception's name, "returned" or "pending"."""
    if not task.done():
        return "pending"
    if task.cancelled():
        return "CancelledError"
    exc = task.exception()
    return "returned" if exc is None else type(exc).__name__


def stack_of(task: asyncio.Task[Any]) -> str:
    """The task's whole await chain, outermost first (print_stack shows one frame)."""
    lines = [repr(task)]
    awaited: Any = task.get_coro()
    while awaited is not None:
        frame = getattr(awaited, "cr_frame", None) or getattr(awaited, "gi_frame", None)
        if frame is None:
            lines.append(f"  awaiting {awaited!r}")
            break
        lines.append(f"  {frame.f_code.co_filename}:{frame.f_lineno} in {frame.f_code.co_name}")
        awaited = getattr(awaited, "cr_await", None) or getattr(awaited, "gi_yieldfrom", None)
    return "\n".join(lines)


# -- roles ----------------------------------------------------------------------------


async def role_load(cfg: Config, r: aioredis.Redis) -> Result:
    """``tasks`` tasks acquire (as ``tenant`` at ``priority`` when given), hold ``hold``
    seconds, release; record every admission.

    Each task stops after ``iterations`` admissions, at the go payload's ``deadline``
    (real-time seconds; the acquire timeout runs to it), or once the test pushes to
    ``<sync>:stop:<name>`` (when ``stoppable``).
    """
    lim = make_limiter(cfg)
    api, hold = cfg["api"], cfg["hold"]
    tenant, priority = cfg.get("tenant"), cfg.get("priority")  # the fair queue's
    iterations: int | None = cfg.get("iterations")
    records: list[list[int]] = []
    stop = asyncio.Event()
    try:
        go = await barrier(r, cfg)
        deadline: float | None = go.get("deadline")

        async def watch_stop() -> None:
            await signal(r, cfg, f"stop:{cfg['name']}")
            stop.set()

        async def worker() -> None:
            done = 0
            while not stop.is_set() and (iterations is None or done < iterations):
                timeout = cfg.get("acquire_timeout", 10.0)
                if deadline is not None:
                    timeout = deadline - time.time()
                    if timeout <= 0:
                        return
                send = now_us()
                try:
                    slot = await lim.acquire(api, timeout=timeout, tenant=tenant, priority=priority)
                except AcquireTimeout:
                    if deadline is not None:
                        return  # the run is over
                    raise
                start = time.monotonic_ns()
                recv = now_us()
                if hold:
                    await asyncio.sleep(hold)
                end = time.monotonic_ns()
                await slot.release()
                records.append([send, recv, slot.acquired_at, start, end])
                done += 1

        watcher = asyncio.create_task(watch_stop()) if cfg.get("stoppable") else None
        outcomes = await asyncio.gather(
            *(worker() for _ in range(cfg["tasks"])), return_exceptions=True
        )
        if watcher is not None:
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)
    finally:
        await lim.aclose()
    errors = [describe(o) for o in outcomes if isinstance(o, BaseException)]
    return {"admissions": records, "errors": errors}


async def role_hold(cfg: Config, r: aioredis.Redis) -> Result:
    """Acquire one slot, push its Redis admission time to ``<sync>:held``, then hold it.

    ``until`` = ``"killed"``: await forever (the test SIGKILLs this process);
    ``"released"``: hold until the test pushes to ``<sync>:release``, then release.
    """
    lim = make_limiter(cfg)
    try:
        slot = await lim.acquire(cfg["api"], timeout=10)
        start = time.monotonic()
        await tell(r, cfg, "held", {"acquired_at": slot.acquired_at, "pid": os.getpid()})
        if cfg["until"] == "killed":
            await asyncio.sleep(SIGNAL_TIMEOUT)
            raise RuntimeError(f"not killed within {SIGNAL_TIMEOUT}s")
        await signal(r, cfg, "release")
        held_for = time.monotonic() - start
        still_held = slot.held
        try:
            await slot.release()
            lease_lost = False
        except LeaseLost:
            lease_lost = True
    finally:
        await lim.aclose()
    return {"held_for": held_for, "held_before_release": still_held, "lease_lost": lease_lost}


async def role_probe(cfg: Config, r: aioredis.Redis) -> Result:
    """After go, try ``acquire(timeout=0)`` ``probes`` times, ``every`` seconds apart."""
    lim = make_limiter(cfg)
    probes: list[list[Any]] = []
    try:
        await barrier(r, cfg)
        for _ in range(cfg["probes"]):
            send = now_us()
            try:
                slot = await lim.acquire(cfg["api"], timeout=0)
            except AcquireTimeout as exc:
                probes.append([send, now_us(), f"refused:{exc.reason}"])
            else:
                probes.append([send, now_us(), "admitted"])
                await slot.release()
            await asyncio.sleep(cfg["every"])  # pacing of the probes, not synchronisation
    finally:
        await lim.aclose()
    return {"probes": probes}


async def role_wait_once(cfg: Config, r: aioredis.Redis) -> Result:
    """After go, wait (FIFO) for one slot, hold it ``hold`` seconds, release it."""
    lim = make_limiter(cfg)
    try:
        await barrier(r, cfg)
        send = now_us()
        start = time.monotonic()
        try:
            slot = await lim.acquire(cfg["api"], timeout=cfg["timeout"])
        except AcquireTimeout as exc:
            return {"send": send, "timeout": str(exc), "waited": time.monotonic() - start}
        recv = now_us()
        await asyncio.sleep(cfg["hold"])
        await slot.release()
    finally:
        await lim.aclose()
    return {"send": send, "recv": recv, "acquired_at": slot.acquired_at}


async def until_waiting(r: aioredis.Redis, cfg: Config, n: int, within: float = 10.0) -> None:
    """Return once ``n`` tickets are queued and each waiter's first acquire call returned.

    The first call sets a ticket's expiry to arrival + ticket_ttl; only a later call
    (the waiter's second one, or a renewal) moves it beyond, and the waiter makes
    those only once the first call's answer reached it.
    """
    ttl_us = round(cfg["ticket_ttl"] * 1_000_000)
    qexp = f"limiter:{{{cfg['api']}}}:qexp"
    deadline = time.monotonic() + within
    while True:
        arrivals = dict(await r.zrange(queue_key(cfg), 0, -1, withscores=True))
        expiries = dict(await r.zrange(qexp, 0, -1, withscores=True))
        past_first = [t for t, at in arrivals.items() if expiries.get(t, 0) > at + ttl_us]
        if len(arrivals) == n and len(past_first) == n:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{len(past_first)} of {n} waiters past their first call")
        await asyncio.sleep(0.002)


async def role_cancel(cfg: Config, r: aioredis.Redis) -> Result:
    """Holders cancelled mid-hold and waiters cancelled mid-wait, all at once.

    ``holders`` tasks take every slot and hold it; ``waiters`` tasks queue behind them;
    once every waiter is waiting (past its first acquire call), all tasks are cancelled
    together. Then this worker pushes its report to ``<sync>:done`` and stays alive
    (limiter open) until the test pushes to ``<sync>:exit``.

    The limiter's client has no socket timeout: with one, redis-py writes through
    ``asyncio.wait_for``, which on Python 3.11 loses a cancel that arrives as a write
    completes (the task is then admitted instead); that is a separate issue, and this
    role checks what the limiter does with cancellations it does receive.
    """
    client = aioredis.from_url(cfg["url"], socket_timeout=None)  # (redis-py 8's default: 5 s)
    lim = make_limiter(cfg, client)
    api = cfg["api"]
    forever, all_held = asyncio.Event(), asyncio.Event()
    entered: list[str] = []
    try:
        warm = await lim.acquire(api, timeout=0)  # scripts loaded, connection open
        await warm.release()

        async def body() -> None:
            async with lim.slot(api, timeout=10) as slot:
                entered.append(slot.id)
                if len(entered) == cfg["holders"]:
                    all_held.set()
                await forever.wait()

        holders = [asyncio.create_task(body()) for _ in range(cfg["holders"])]
        await asyncio.wait_for(all_held.wait(), 10)
        waiters = [asyncio.create_task(body()) for _ in range(cfg["waiters"])]
        await until_waiting(r, cfg, cfg["waiters"])
        tasks = holders + waiters
        for task in tasks:
            task.cancel()
        _, pending = await asyncio.wait(tasks, timeout=5)
        report = {
            "outcomes": [outcome(t) for t in tasks],
            "entered": len(entered),
            "pending": [stack_of(t) for t in pending],
            "holders_after_cancel": [m.decode() for m in await r.zrange(holders_key(cfg), 0, -1)],
            "queue_after_cancel": [m.decode() for m in await r.zrange(queue_key(cfg), 0, -1)],
        }
        await tell(r, cfg, "done", report)
        await signal(r, cfg, "exit")
    finally:
        await lim.aclose()
        await client.aclose()
    return report


#: The acquire script's SHA1, as EVALSHA sends it (Redis without Functions).
_ACQUIRE_SHA = hashlib.sha1(lua_source("acquire").encode(), usedforsecurity=False)
_ACQUIRE_SHA_HEX = _ACQUIRE_SHA.hexdigest().encode()


class _SendSignal(aioredis.Connection):
    """A connection that cancels the task sending an armed ``acquire`` (FCALL or EVALSHA)
    right after writing it (its reply not yet read), then sets :attr:`sent`."""

    armed = False
    sent: asyncio.Event | None = None

    async def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        await super().send_packed_command(command, check_health)
        cls = type(self)
        if not cls.armed or cls.sent is None:
            return
        parts = [command] if isinstance(command, bytes | str) else list(command)
        packed = b"".join(p.encode() if isinstance(p, str) else bytes(p) for p in parts)
        # acquire: its Functions name (FCALL), or its script's SHA1 (EVALSHA).
        if b"_acquire\r\n" in packed or _ACQUIRE_SHA_HEX in packed:
            cls.armed = False
            # Cancel the sending task itself, now: the cancel lands on its next await, the
            # read of the reply. (Cancelling from another task raced the reply on a loaded
            # machine: the acquire could finish before that task ran.)
            task = asyncio.current_task()
            assert task is not None
            task.cancel()
            cls.sent.set()


async def role_cancel_in_flight(cfg: Config, r: aioredis.Redis) -> Result:
    """Cancel ``acquire`` while its first script call is in flight (sent, not answered).

    ``slot_free``: the call admits (nothing else holds the slot); otherwise a holder in
    this process holds the only slot, so the call queues a ticket, and the holder
    releases after the cancellation. Report, then stay alive until ``<sync>:exit``.
    """
    _SendSignal.sent = asyncio.Event()
    # No socket timeout, as in role_cancel: Python 3.11's wait_for could lose the cancel.
    pool = aioredis.ConnectionPool.from_url(
        cfg["url"], connection_class=_SendSignal, socket_timeout=None
    )
    client = aioredis.Redis(connection_pool=pool)
    lim = make_limiter(cfg, client)
    api = cfg["api"]
    try:
        warm = await lim.acquire(api, timeout=0)  # scripts loaded, connections open
        await warm.release()
        holder = None if cfg["slot_free"] else await lim.acquire(api, timeout=0)
        _SendSignal.armed = True
        task = asyncio.create_task(lim.acquire(api, timeout=10))
        async with asyncio.timeout(5):
            await _SendSignal.sent.wait()  # the task was cancelled right after its send
        outcome = await asyncio.gather(task, return_exceptions=True)
        state = {
            "holders": await r.zcard(holders_key(cfg)),
            "queue": await r.zcard(queue_key(cfg)),
        }
        if holder is not None:
            await holder.release()
        report = {"outcome": type(outcome[0]).__name__, "state_after_cancel": state}
        await tell(r, cfg, "done", report)
        await signal(r, cfg, "exit")
    finally:
        await lim.aclose()
        await client.aclose()
    return report


ROLES: dict[str, Callable[[Config, aioredis.Redis], Awaitable[Result]]] = {
    "cancel": role_cancel,
    "cancel_in_flight": role_cancel_in_flight,
    "hold": role_hold,
    "load": role_load,
    "probe": role_probe,
    "wait_once": role_wait_once,
}


Roles = dict[str, Callable[[Config, aioredis.Redis], Awaitable[Result]]]


async def run(role: str, cfg: Config, roles: Roles = ROLES) -> Result:
    # No socket timeout (redis-py 8 sets 5 s unless told None): BLPOP waits on it.
    r = aioredis.from_url(cfg["url"], socket_timeout=None)
    try:
        return await roles[role](cfg, r)
    finally:
        await r.aclose()


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def main(argv: list[str], roles: Roles = ROLES) -> int:
    """Run one role; shared with the other worker modules (tests/_call_workers.py)."""
    role, raw = argv
    cfg: Config = json.loads(raw)
    collect = _Collect()
    logging.getLogger("limiter").addHandler(collect)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    result: Result = {"role": role, "name": cfg["name"], "pid": os.getpid()}
    try:
        result.update(asyncio.run(run(role, cfg, roles)))
    except BaseException as exc:
        result["error"] = describe(exc)
    result["warnings"] = collect.messages
    out = Path(cfg["out"])
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result), encoding="utf-8")
    tmp.replace(out)
    return 1 if "error" in result else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
