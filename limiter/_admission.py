"""Admission through Redis: acquire (fair waiting included), release and withdraw.

Owns: the slot ids of this process and the background releases it had to finish after a
cancel. Every decision is one script call through the runner (``acquire``, ``release``,
``withdraw``); the waits between calls are spent on the waiting part's wake-ups. Holds no
limits of its own: what a request weighs and what the API allows travel in the KeyPlan.
Used by the Limiter façade and by the fail-open part (which adopts local slots here).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import time
from collections.abc import Callable
from typing import Any

from ._contract import KeyPlan, full_reply, text
from ._errors import AcquireTimeout, ConfigError, LeaseLost, LimiterUnavailable
from ._events import Events
from ._runner import ScriptRunner
from ._scope import DEFAULT_FAIR, Fair
from ._slot import OUTCOME_SUCCESS, Slot, SlotState, to_the_end
from ._waiting import Waiter, Waiting

__all__ = ["Admission"]

log = logging.getLogger("limiter")

_WINDOW_WORDS = {"rate:60s": "minute", "rate:3600s": "hour", "rate:1s": "second"}


def _ticket(args: tuple[Any, ...]) -> str:
    """The ticket acquire.lua makes of acquire's ``args`` (its format: lua/_common.lua)."""
    slot_id, cost, tokens, _mode, _first, priority, weight, tenant, model, inp, outp = args
    held = f"{tokens}" if inp == outp == tokens else f"{tokens}/{inp}/{outp}"
    return f"{slot_id}|{cost}|{held}|{priority}|{weight}|{model}|{tenant}"


class Admission:
    """One process's admissions in Redis, in the cluster's one fair queue per API."""

    def __init__(
        self, runner: ScriptRunner, waiting: Waiting, events: Events, process_id: str
    ) -> None:
        self._runner = runner
        self._waiting = waiting
        self._events = events
        self._process_id = process_id
        self._ids = itertools.count(1)
        #: Background work: releases and withdrawals finishing after a cancel.
        self.tasks: set[asyncio.Future[Any]] = set()
        self._last_wait_log: dict[str, float] = {}
        #: The runner's answer count when a failed withdrawal was last logged (None: never).
        #: Another failure with the same count is the same outage: not logged again.
        self._withdraw_logged_at: int | None = None
        #: fail_open: told of a Redis outage met by a release; True when it takes over
        #: (the lease then ends by itself within lease_ttl).
        self.on_outage: Callable[[LimiterUnavailable], bool] | None = None
        #: fail_open: told of a cooldown seen in Redis (tag, loop time it ends).
        self.on_cooldown: Callable[[str, float], None] | None = None

    def new_slot_id(self) -> str:
        return f"{self._process_id}.{next(self._ids)}"

    async def acquire(
        self,
        plan: KeyPlan,
        timeout: float | None,
        cost: int,
        tokens: int,
        fair: Fair = DEFAULT_FAIR,
        model: str = "",
        split: list[int] | None = None,
    ) -> Slot:
        """Wait (in the fair queue, across the cluster) until the scripts admit this request."""
        api = plan.api
        events = self._events
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        cancels = task.cancelling() if task is not None else 0
        start = loop.time()
        deadline = math.inf if timeout is None else start + timeout
        slot_id = self.new_slot_id()
        mode = b"try" if timeout == 0 else b"wait"
        weight = repr(fair.weight)
        inp, outp = split or (tokens, tokens)
        ask = (slot_id, cost, tokens, mode, 1, fair.priority, weight, fair.tenant, model)
        args: tuple[Any, ...] = (*ask, inp, outp)
        again = (*ask[:4], 0, *ask[5:], inp, outp)
        waiter: Waiter | None = None
        first: str | None = None  # the first limit that held this request back
        queued = True  # a ticket or slot of ours may exist in Redis
        try:
            while True:
                res = full_reply(
                    "acquire", await self._runner.run("acquire", plan, *args, retry_args=again)
                )
                args = again
                if int(res[0]) == 1:
                    charged = waiter is not None or (len(res) > 2 and int(res[2]) == 1)
                    dep = text(res[3]) if len(res) > 3 else ""
                    now, taken = int(res[1]), (dep or None, model, inp, outp)
                    slot = self._admitted(plan, slot_id, now, cost, tokens, waiter, charged, taken)
                    if events.active:
                        self._emit_admitted(api, loop.time() - start, first, fair)
                    return slot
                code = text(res[1])
                reason = plan.reasons.get(code, code)
                if first is None:
                    first = reason
                    if events.active:
                        events.emit("refused", api, reason=reason)
                wait_us = int(res[2])
                if wait_us == -2:
                    queued = False  # the script dropped the ticket
                    kind = plan.window(code).kind
                    what, heavy = ("tokens", tokens) if kind == "t" else ("cost", cost)
                    raise ConfigError(
                        f"{what}={heavy} for API {api!r} can never pass: the {reason} "
                        f"limit in force is {int(res[3])} (a runtime override)",
                        field=what,
                        value=heavy,
                    )
                if reason == "cooldown" and self.on_cooldown is not None:
                    self.on_cooldown(plan.tag, loop.time() + wait_us / 1_000_000)
                remaining = deadline - loop.time()
                if mode == b"try" or remaining <= 0:
                    if mode == b"try":
                        queued = False  # refused and never queued: nothing to withdraw
                    if events.active:
                        events.emit("timeout", api, reason=reason)
                    raise AcquireTimeout(api, reason, loop.time() - start)
                if waiter is None:
                    # Listen before waiting, then ask again at once: a hand-off that
                    # happened before the subscription is then seen by the script.
                    waiter = self._waiting.add_waiter(plan, slot_id, _ticket(args))
                    await self._waiting.ensure_listener()
                    if task is not None and task.cancelling() > cancels:
                        # A cancel redis-py swallowed while subscribing: honour it.
                        raise asyncio.CancelledError
                    continue
                delay = remaining if wait_us < 0 else min(remaining, wait_us / 1_000_000)
                if wait_us >= 0 and reason != "concurrency" and self._log_wait(api):
                    log.warning(
                        "Rate limit reached for %s (%s): waiting %.1fs",
                        api,
                        _WINDOW_WORDS.get(reason, reason),
                        wait_us / 1_000_000,
                    )
                at = await self._wait(waiter, delay, deadline)
                if at is not None:
                    taken = (waiter.deployment or None, model, inp, outp)
                    slot = self._admitted(plan, slot_id, at, cost, tokens, waiter, True, taken)
                    if events.active:
                        self._emit_admitted(api, loop.time() - start, first, fair)
                    return slot
        except BaseException as exc:
            # Even the first call may have run in Redis before we gave up on its answer
            # (cancelled, timed out): withdraw whatever it left, ticket or slot. When Redis
            # itself failed, do it in the background: the caller hears of it at once.
            if queued:
                if isinstance(exc, LimiterUnavailable):
                    withdraw = self._withdraw(plan, slot_id, _ticket(args))
                    self.keep(asyncio.ensure_future(withdraw))
                else:
                    await self._withdraw(plan, slot_id, _ticket(args))
            raise
        finally:
            self._waiting.remove_waiter(slot_id)

    def _emit_admitted(self, api: str, waited: float, first: str | None, fair: Fair) -> None:
        self._events.emit("admitted", api, waited=waited, reason=first, priority=fair.priority)

    async def _wait(self, waiter: Waiter, delay: float, deadline: float) -> int | None:
        """Wait for news of ``waiter`` for up to ``delay`` seconds.

        Returns the admission time when a release handed it the slot, None when it is
        time to ask the script again (the wait is over, a hint came due, or its ticket
        expired while this process stalled).
        """
        loop = asyncio.get_running_loop()
        while True:
            if not waiter.future.done():
                await asyncio.wait({waiter.future}, timeout=delay)
            if not waiter.future.done():
                return None
            kind, value = waiter.future.result()
            waiter.future = loop.create_future()
            if kind == "admitted":
                return value
            if kind == "retry":
                return None
            # "hint": we are at the head; the limit that holds us ends in `value` us.
            delay = min(deadline - loop.time(), value / 1_000_000)
            if delay <= 0:
                return None

    def _admitted(
        self,
        plan: KeyPlan,
        slot_id: str,
        at: int,
        cost: int,
        tokens: int,
        waiter: Any,
        charged: bool,
        taken: tuple[str | None, str, int, int],
    ) -> Slot:
        """The slot of an admission; ``taken`` is its deployment, model, input and output
        tokens."""
        handed = waiter is not None
        state = SlotState(self, plan, slot_id, at, cost, tokens, handed, handed)
        state.charged = charged
        state.deployment, state.model, state.tokens_in, state.tokens_out = taken
        self._waiting.hold(state)
        return Slot(state)

    def take_over(self, state: SlotState) -> None:
        """A slot admitted locally that Redis now counts (fail_open's recovery)."""
        state.owner = self
        state.local = False
        self._waiting.hold(state)

    async def release_slot(self, state: SlotState, outcome: int) -> None:
        self._waiting.forget(state.id)
        if state.gate is not None:
            state.gate.give_back()
            state.gate = None
        try:
            res = await self._runner.run(
                "release",
                state.plan,
                state.id,
                outcome,
                state.acquired_at,
                state.tokens,
                state.actual_tokens,
                1 if state.handed else 0,
                "1" if state.charged else "",
                state.deployment or "",
                state.model,
                *state.io_release(),
            )
        except LimiterUnavailable as exc:
            if self.on_outage is None or not self.on_outage(exc):
                raise
            return
        lost = int(full_reply("release", res)[0]) == 0 or state.lost
        if self._events.active:
            self._events.emit(
                "released", state.plan.api, success=outcome == OUTCOME_SUCCESS, lost=lost
            )
        if lost:
            state.lost = True
            log.warning("lease of slot %s for %s was lost before release", state.id, state.plan.api)
            raise LeaseLost(state.plan.api, state.id)

    async def _withdraw(self, plan: KeyPlan, slot_id: str, ticket: str) -> None:
        """Take a waiter's ticket out of the queue (and free a slot handed to it meanwhile)."""
        try:
            await to_the_end(self._runner.run("withdraw", plan, slot_id, ticket), self.keep)
        except LimiterUnavailable as exc:
            # The ticket expires by itself within ticket_ttl. While Redis is down every
            # failed acquire fails its withdrawal too: say so once, until Redis answers.
            answers = self._runner.answers
            if self._withdraw_logged_at == answers:
                return
            self._withdraw_logged_at = answers
            log.warning(
                "could not withdraw ticket %s (it expires by itself within ticket_ttl; "
                "later failures to withdraw are not logged until Redis is reachable again): %s",
                slot_id,
                exc,
            )

    def _log_wait(self, api: str) -> bool:
        """At most one "Rate limit reached" line per API per second, per process."""
        now = time.monotonic()
        if now - self._last_wait_log.get(api, -math.inf) < 1.0:
            return False
        self._last_wait_log[api] = now
        return True

    def keep(self, task: asyncio.Future[Any]) -> None:
        """Hold a background task (a release or withdrawal finishing after a cancel)."""
        self.tasks.add(task)
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Future[Any]) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("background task failed: %s", task.exception())

    async def aclose(self) -> None:
        """Give back every slot still held, then wait for the background tasks."""
        for state in list(self._waiting.held.values()):
            if not state.released:
                state.released = True
                try:
                    await self.release_slot(state, OUTCOME_SUCCESS)
                except Exception:
                    continue
        if self.tasks:
            await asyncio.gather(*self.tasks, return_exceptions=True)
