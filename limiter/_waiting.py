"""Waiting and holding: this process's tickets and leases, the wake-up listener, the renewer.

Owns: the waiters of this process (one per queued ticket) and the slots it holds through
Redis; the pub/sub connection on its own channel ``<namespace>:wake:<process id>`` and the
task that reads it; the renewer task that extends every lease and ticket with one
pipelined ``renew`` call per round. :meth:`aclose` ends both tasks. Used by the admission
and fail-open parts; it calls only the script runner.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Callable
from typing import Any

from ._contract import text
from ._errors import LimiterUnavailable
from ._runner import REDIS_ERRORS, ScriptRunner, redact
from ._slot import SlotState

__all__ = ["Waiter", "Waiting"]

log = logging.getLogger("limiter")


class Waiter:
    """One queued ticket of this process."""

    __slots__ = ("api", "deployment", "future", "plan", "ticket")

    def __init__(self, plan: Any, ticket: str) -> None:
        self.plan = plan
        self.api: str = plan.api
        self.ticket = ticket
        #: The deployment a hand-over admitted it to ("": the API has none).
        self.deployment = ""
        #: Resolved with ("admitted", time), ("hint", wait us) or ("retry", 0).
        self.future: asyncio.Future[tuple[str, int]] = asyncio.get_running_loop().create_future()

    def tell(self, kind: str, value: int, deployment: str = "") -> None:
        """Resolve the future with news; an unread admission stays, an unread hint gives
        way to newer news."""
        if self.future.done():
            if self.future.exception() is None and self.future.result()[0] == "admitted":
                return
            self.future = asyncio.get_running_loop().create_future()
        if kind == "admitted":
            self.deployment = deployment
        self.future.set_result((kind, value))


class Waiting:
    """Tickets, held leases, wake-ups and renewals of one limiter (one process)."""

    def __init__(
        self,
        runner: ScriptRunner,
        namespace: str,
        process_id: str,
        ticket_ttl: float,
        *,
        paused: Callable[[], bool] = lambda: False,
    ) -> None:
        self._runner = runner
        self.channel = f"{namespace}:wake:{process_id}"
        self._ticket_ttl = ticket_ttl
        #: True while renewals must not reach Redis (fail_open's breaker is open).
        self._paused = paused
        #: Slots held through Redis, by slot id.
        self.held: dict[str, SlotState] = {}
        #: Waiters, by slot id.
        self.waiters: dict[str, Waiter] = {}
        self._work = asyncio.Event()
        self._renew_every = math.inf
        #: A renewal failed and no renewal has worked since (its warning is said once).
        self._renew_failing = False
        self._renewer: asyncio.Task[None] | None = None
        self._listener: asyncio.Task[None] | None = None
        self._pubsub: Any = None
        self._listen_lock = asyncio.Lock()
        self._closed = False

    # -- bookkeeping --------------------------------------------------------------------

    def hold(self, state: SlotState) -> None:
        """Keep ``state``'s lease renewed until :meth:`forget`."""
        self.held[state.id] = state
        self._start_renewer(self._ticket_ttl if state.short_lease else state.plan.lease_ttl)

    def forget(self, slot_id: str) -> None:
        self.held.pop(slot_id, None)

    def add_waiter(self, plan: Any, slot_id: str, ticket: str) -> Waiter:
        waiter = Waiter(plan, ticket)
        self.waiters[slot_id] = waiter
        self._start_renewer(self._ticket_ttl)
        return waiter

    def remove_waiter(self, slot_id: str) -> None:
        self.waiters.pop(slot_id, None)

    # -- wake-ups -----------------------------------------------------------------------

    async def ensure_listener(self) -> None:
        """Listen on this process's channel (again, if the listener died)."""
        if self._listener is not None and not self._listener.done():
            return
        async with self._listen_lock:
            if self._listener is not None and not self._listener.done():
                return
            pubsub = self._runner.redis.pubsub()
            try:
                await pubsub.subscribe(self.channel)
            except REDIS_ERRORS as exc:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()
                raise LimiterUnavailable(None, "subscribe", redact(exc)) from exc
            self._pubsub = pubsub
            self._listener = asyncio.create_task(self._listen(pubsub), name="limiter-listener")

    async def _listen(self, pubsub: Any) -> None:
        try:
            while True:
                msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=None)
                if msg is None or msg.get("type") != "message":
                    continue
                # "A <slot id> <admission time>[ <deployment>]" or "H <slot id> <wait>"
                kind, slot_id, value, *deployment = text(msg["data"]).split(" ", 3)
                waiter = self.waiters.get(slot_id)
                if waiter is not None:
                    news = "admitted" if kind == "A" else "hint"
                    waiter.tell(news, int(value), deployment[0] if deployment else "")
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # connection lost: the renewer covers missed wake-ups
            log.warning("wake-up listener stopped (%s); falling back to renewals", redact(exc))
            with contextlib.suppress(Exception):
                await pubsub.aclose()
            # ensure_listener starts a new one on the next wait.

    # -- renewal ------------------------------------------------------------------------

    def _start_renewer(self, period: float) -> None:
        """Make sure something renews within ``period / 3`` (a lease or a ticket length)."""
        if period / 3 < self._renew_every:
            self._work.set()  # idle, or sleeping too long for this one: re-plan now
        if self._renewer is None or self._renewer.done():
            self._renewer = asyncio.create_task(self._renew_loop(), name="limiter-renewer")

    async def _renew_loop(self) -> None:
        loop = asyncio.get_running_loop()
        last = loop.time()
        while not self._closed:
            if not self.held and not self.waiters:
                self._renew_every = math.inf
                self._work.clear()
                await self._work.wait()
                last = loop.time()
                continue
            # Leases are renewed three times per lease; tickets (and slots just handed
            # over, whose first lease is a ticket's length) three times per ticket_ttl.
            periods = [s.plan.lease_ttl for s in self.held.values()]
            if self.waiters or any(s.short_lease for s in self.held.values()):
                periods.append(self._ticket_ttl)
            self._renew_every = min(periods) / 3
            delay = last + self._renew_every - loop.time()
            if delay > 0:
                self._work.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._work.wait(), delay)
                continue
            last = loop.time()
            if self._paused():
                continue  # Redis is unreachable: the heartbeat probes it, not the renewer
            try:
                await self.renew()
                if self._renew_failing:
                    self._renew_failing = False
                    log.info("lease renewal works again")
                if self.waiters and (self._listener is None or self._listener.done()):
                    # The wake-up listener died with its connection (a restart, a
                    # failover): waiters already queued need it back, not only new ones.
                    await self.ensure_listener()
            except LimiterUnavailable as exc:
                if not self._renew_failing:  # once per outage, not every lease_ttl / 3
                    self._renew_failing = True
                    log.warning("lease renewal failed (said once until it works again): %s", exc)

    async def renew(self) -> None:
        """Renew every lease and ticket of this process, one round trip for all APIs."""
        by_tag: dict[str, tuple[Any, list[str], list[str]]] = {}
        for state in self.held.values():
            entry = state.id
            if state.plan.sets:  # renew.lua: "<slot id>|<deployment>|<model>"
                entry = f"{state.id}|{state.deployment or ''}|{state.model}"
            by_tag.setdefault(state.plan.tag, (state.plan, [], []))[1].append(entry)
        for waiter in self.waiters.values():
            by_tag.setdefault(waiter.plan.tag, (waiter.plan, [], []))[2].append(waiter.ticket)
        if not by_tag:
            return
        tags = list(by_tag)
        calls = []
        for tag in tags:
            plan, slots, tickets = by_tag[tag]
            calls.append((plan, (len(slots),), (*slots, *tickets)))
        results = await self._runner.run_each("renew", calls)
        for tag, res in zip(tags, results, strict=True):
            self._renewed(tag, by_tag[tag], res)

    def _renewed(self, tag: str, asked: tuple[Any, list[str], list[str]], res: Any) -> None:
        plan, entries, _ = asked
        slots = [entry.partition("|")[0] for entry in entries]
        if isinstance(res, BaseException):
            log.warning("lease renewal for %s failed: %s", tag, redact(res))
            return
        lost, admitted, gone = res
        lost_ids = {text(sid) for sid in lost}
        for sid in slots:
            held = self.held.get(sid)
            if held is None:
                continue
            if sid not in lost_ids:
                held.short_lease = False
            elif not held.lost:
                held.lost = True
                log.warning("lease of slot %s for %s was lost", sid, plan.api)
        for i in range(0, len(admitted), 3):  # slot id, admission time, deployment
            handed = self.waiters.get(text(admitted[i]))
            if handed is not None:
                handed.tell("admitted", int(admitted[i + 1]), text(admitted[i + 2]))
        for ticket in map(text, gone):
            expired = self.waiters.get(ticket.partition("|")[0])
            if expired is not None and not expired.future.done():
                expired.future.set_result(("retry", 0))

    # -- closing ------------------------------------------------------------------------

    def fail_waiters(self) -> None:
        """Wake every waiter with LimiterUnavailable ("the limiter was closed")."""
        self._closed = True
        for waiter in list(self.waiters.values()):
            if not waiter.future.done():
                waiter.future.set_exception(
                    LimiterUnavailable(waiter.api, "acquire", "the limiter was closed")
                )
                # Marked as seen: a waiter already on its way out (cancelled) never reads
                # it, and asyncio would log "Future exception was never retrieved".
                waiter.future.exception()

    async def aclose(self) -> None:
        """End the renewer and the listener, close the pub/sub connection."""
        self._closed = True
        tasks = [t for t in (self._renewer, self._listener) if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(BaseException):
                await task
        if self._pubsub is not None:
            with contextlib.suppress(Exception):
                await self._pubsub.aclose()
