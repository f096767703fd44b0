"""``on_redis_error="fail_open"``: admit locally, within this replica's share, while Redis is out.

Owns: the heartbeat task (which also probes Redis while the breaker is open), the replica
count it reads, the circuit breaker, each API's local share (``_local.LocalGate``), the
cooldowns remembered for those shares, and the slots admitted locally that Redis does not
count yet. When Redis answers again it has Redis count those slots (adopting them into
the admission part). Calls the script runner and the admission part, never the Limiter.
The local shares admit first come, first served: tenants and priorities are decided in
Redis only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Iterable
from typing import Any

from ._admission import Admission
from ._config import APILimits
from ._contract import KeyPlan, full_reply, text
from ._errors import AcquireTimeout, LimiterUnavailable
from ._events import Events
from ._local import LocalGate
from ._runner import ScriptRunner, is_outage
from ._scope import DEFAULT_FAIR, Fair
from ._slot import OUTCOME_SUCCESS, Slot, SlotState
from ._waiting import Waiting

__all__ = ["FailOpen", "beat"]

log = logging.getLogger("limiter")

#: Heartbeat period, how long a silent limiter still counts as a replica, and the
#: circuit breaker's probe backoff while Redis is unreachable (seconds).
HEARTBEAT_EVERY = 2.0
HEARTBEAT_TTL = 6.0
_PROBE_FIRST, _PROBE_MAX = 0.25, 5.0


async def beat(runner: ScriptRunner, namespace: str, process_id: str) -> int:
    """One heartbeat of limiter ``process_id``: the number of live limiters in ``namespace``."""
    await runner.ready()
    n = await runner.call(
        "heartbeat",
        [f"{namespace}:replicas".encode()],
        [process_id, round(HEARTBEAT_TTL * 1000)],
        None,
        "heartbeat",
    )
    return int(n)


class FailOpen:
    """The breaker and the local shares of one limiter."""

    def __init__(
        self,
        runner: ScriptRunner,
        admission: Admission,
        waiting: Waiting,
        events: Events,
        *,
        namespace: str,
        process_id: str,
        apis: Iterable[str],
    ) -> None:
        self._runner = runner
        self._admission = admission
        self._waiting = waiting
        self._events = events
        self._process_id = process_id
        self._apis = tuple(apis)
        self._namespace = namespace
        #: Live limiters sharing the namespace, as the last heartbeat read.
        self.replicas: int | None = None
        #: True while Redis is unreachable: admission is local.
        self.open = False
        self._tripped = asyncio.Event()
        self._heartbeat_task: asyncio.Task[None] | None = None
        self._gates: dict[str, LocalGate] = {}
        self._pauses: dict[str, float] = {}
        #: Slots admitted locally and not yet released or counted in Redis.
        self._local_held: dict[str, SlotState] = {}
        self._closed = False
        admission.on_outage = self.absorb
        admission.on_cooldown = self.remember_pause

    # -- heartbeat and breaker ----------------------------------------------------------

    async def heartbeat(self) -> int:
        """Tell Redis this limiter is alive and read how many are; returns that count."""
        self.replicas = await beat(self._runner, self._namespace, self._process_id)
        return self.replicas

    def start(self) -> None:
        if self._heartbeat_task is None or self._heartbeat_task.done():
            self._heartbeat_task = asyncio.create_task(
                self._heartbeat_loop(), name="limiter-heartbeat"
            )

    async def _heartbeat_loop(self) -> None:
        """Beat every few seconds; while the breaker is open, probe Redis with backoff.

        The probe is the heartbeat itself: the first one a short while after the outage
        was seen, then at doubling intervals (at most ``_PROBE_MAX`` apart).
        """
        probe = _PROBE_FIRST
        while not self._closed:
            if self.open:
                await asyncio.sleep(probe)
                probe = min(probe * 2, _PROBE_MAX)
            try:
                await self.heartbeat()
            except LimiterUnavailable as exc:
                if is_outage(exc):
                    self.trip(exc)
                    continue
                log.warning("heartbeat failed: %s", exc)
            else:
                if self.open:
                    self._recover()
                probe = _PROBE_FIRST
            self._tripped.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._tripped.wait(), HEARTBEAT_EVERY)

    def absorb(self, exc: LimiterUnavailable) -> bool:
        """An error met in Redis: True when it is an outage (the breaker opens)."""
        if not is_outage(exc):
            return False
        self.trip(exc)
        return True

    def trip(self, exc: LimiterUnavailable) -> None:
        """Redis is unreachable: open the breaker (admit locally) and say so, once."""
        if self.open:
            return
        self.open = True
        self._tripped.set()  # the heartbeat loop starts probing
        self._gates.clear()
        shares = (
            f"at most 1/{self.replicas} of each limit (replicas seen by the last heartbeat)"
            if self.replicas
            else "nothing (no heartbeat reached Redis yet, so the replica count is unknown)"
        )
        log.warning(
            "Redis is unreachable (%s); on_redis_error='fail_open': admitting %s in this "
            "process, probing Redis until it answers",
            exc,
            shares,
        )
        if self._events.active:
            for api in self._apis:
                self._events.emit("fail_open", api, replicas=self.replicas)
        self.start()

    def _recover(self) -> None:
        self.open = False
        self._gates.clear()
        log.warning("Redis answers again: admission is decided in Redis again")
        if self._local_held:
            self._admission.keep(asyncio.ensure_future(self._adopt_local()))
        if self._events.active:
            for api in self._apis:
                self._events.emit("recovered", api)

    async def _adopt_local(self) -> None:
        """Redis answers again: have it count the calls admitted locally that still run.

        Each asks as ``acquire(timeout=0)`` would, under its own slot id: where there is
        room, the slot becomes an ordinary lease (renewed, released in Redis) and the other
        replicas see it; where there is none, it stays counted here only, as before.
        """
        for state in list(self._local_held.values()):
            if self.open or self._closed:
                return
            if state.released:
                continue
            res = full_reply(
                "acquire",
                await self._runner.run(
                    "acquire",
                    state.plan,
                    state.id,
                    state.cost,
                    state.tokens,
                    b"try",
                    1,
                    0,
                    "1.0",
                    "",
                    "",
                    state.tokens_in,
                    state.tokens_out,
                    label="adopt",
                ),
            )
            if int(res[0]) != 1:
                continue
            # (an API with deployments: the one the scripts counted it in)
            state.deployment = text(res[3]) if len(res) > 3 else None
            self._local_held.pop(state.id, None)
            if state.released:  # released while Redis was asked: give it back there too
                state.local = False
                dep = state.deployment or ""
                give_back = (state.id, 0, int(res[1]), state.tokens, -1, 0, "", dep, "")
                give_back += (state.tokens_in, -1, state.tokens_out, -1)
                await self._runner.run("release", state.plan, *give_back)
                continue
            self._admission.take_over(state)

    # -- cooldowns ----------------------------------------------------------------------

    def remember_pause(self, tag: str, until: float) -> None:
        """Keep a cooldown seen in Redis for the local shares; forget old ones."""
        if len(self._pauses) >= 10_000:
            now = asyncio.get_running_loop().time()
            self._pauses = {t: u for t, u in self._pauses.items() if u > now}
        self._pauses[tag] = max(self._pauses.get(tag, 0.0), until)

    def pause(self, plan: KeyPlan, seconds: float) -> None:
        """A cooldown asked of this limiter: the local shares honour it too."""
        until = asyncio.get_running_loop().time() + seconds
        self.remember_pause(plan.tag, until)
        gate = self._gates.get(plan.tag)
        if gate is not None:
            gate.paused_until = max(gate.paused_until, until)

    # -- admission ----------------------------------------------------------------------

    async def acquire(
        self,
        plan: KeyPlan,
        limits: APILimits,
        timeout: float | None,
        cost: int,
        tokens: int,
        fair: Fair = DEFAULT_FAIR,
    ) -> Slot:
        """Through Redis while it answers; within this replica's share while it does not."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        if not self.open:
            try:
                if self.replicas is None:
                    await self.heartbeat()
                self.start()
                await self._runner.ready()
                return await self._admission.acquire(plan, timeout, cost, tokens, fair)
            except LimiterUnavailable as exc:
                if not is_outage(exc):
                    raise
                self.trip(exc)
        if timeout is not None:
            timeout = max(0.0, timeout - (loop.time() - start))
        return await self._acquire_local(plan, limits, timeout, cost, tokens, start, fair)

    def _gate(self, plan: KeyPlan, limits: APILimits, replicas: int) -> LocalGate:
        gate = self._gates.get(plan.tag)
        if gate is None:
            gate = LocalGate(plan, limits, replicas)
            gate.paused_until = self._pauses.get(plan.tag, 0.0)
            # Slots this process holds through Redis count in its share.
            for held in self._waiting.held.values():
                if held.plan.tag == plan.tag and held.gate is None:
                    held.gate = gate
                    gate.in_flight += 1
            self._gates[plan.tag] = gate
        return gate

    async def _acquire_local(
        self,
        plan: KeyPlan,
        limits: APILimits,
        timeout: float | None,
        cost: int,
        tokens: int,
        start: float,
        fair: Fair = DEFAULT_FAIR,
    ) -> Slot:
        """Admission within this replica's share while the breaker is open."""
        api = plan.api
        if self.replicas is None:
            raise LimiterUnavailable(
                api,
                "acquire",
                "Redis is unreachable and no heartbeat has reached it yet, so fail_open "
                "cannot know this replica's share of the limits; refusing rather than guessing",
            )
        gate = self._gate(plan, limits, self.replicas)
        why = gate.impossible(cost, tokens)
        if why is not None:
            raise LimiterUnavailable(
                api,
                "acquire",
                f"Redis is unreachable and this replica's share of the {why} limit "
                f"(limit // {self.replicas} replicas) cannot admit cost={cost} tokens={tokens}",
            )
        loop = asyncio.get_running_loop()
        deadline = math.inf if timeout is None else loop.time() + timeout
        first: str | None = None
        events = self._events
        while True:
            now, wall_us = loop.time(), time.time_ns() // 1000  # (read together)
            reason, wait = gate.check(now, cost, tokens)
            if reason is None:
                gate.take(now, cost, tokens)
                slot_id = self._admission.new_slot_id()
                state = SlotState(self, plan, slot_id, wall_us, cost, tokens, local=True)
                state.gate = gate
                state.tokens_in = state.tokens_out = tokens  # (not given apart here)
                self._local_held[slot_id] = state
                if events.active:
                    events.emit(
                        "admitted",
                        api,
                        waited=now - start,
                        reason=first,
                        local=True,
                        priority=fair.priority,
                    )
                return Slot(state)
            if first is None:
                first = reason
                if events.active:
                    events.emit("refused", api, reason=reason)
            remaining = deadline - now
            if remaining <= 0:
                if events.active:
                    events.emit("timeout", api, reason=reason)
                raise AcquireTimeout(api, reason, now - start)
            delay = min(remaining, wait)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(gate.changed.wait(), None if math.isinf(delay) else delay)

    async def release_slot(self, state: SlotState, outcome: int) -> None:
        """Give back a slot admitted locally (Redis never counted it)."""
        if state.gate is not None:
            state.gate.give_back()
            state.gate = None
        self._local_held.pop(state.id, None)
        if self._events.active:
            self._events.emit(
                "released", state.plan.api, success=outcome == OUTCOME_SUCCESS, lost=False
            )

    def keep(self, task: asyncio.Future[Any]) -> None:
        self._admission.keep(task)

    async def aclose(self) -> None:
        self._closed = True
        task = self._heartbeat_task
        if task is not None:
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
