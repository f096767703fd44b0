"""The Limiter: the façade users hold. It checks arguments and composes the parts.

Owns: the configured limits and each API's (and each key's) KeyPlan. Everything else
belongs to a part it builds and closes (see the README's "Architecture"):

- ``_runner.ScriptRunner``: the Redis client as the scripts use it;
- ``_waiting.Waiting``: tickets, held leases, the wake-up listener and the renewer;
- ``_admission.Admission``: acquire, release, withdraw, in Redis;
- ``_failopen.FailOpen`` (``on_redis_error="fail_open"`` only): breaker, heartbeat,
  local shares;
- ``_registry.Registry``: the configurations operators read;
- ``_operators.Operators``: cooldowns, stats, overrides, learned limits, reset, weights;
- ``_events.Events``: the listeners.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from types import TracebackType
from typing import Any, Literal, Self, TypeVar

from ._admission import Admission
from ._call import call_with_retries
from ._checks import (
    check_choice,
    check_namespace,
    check_request,
    check_seconds,
    check_timeout,
)
from ._config import APILimits, Rate, validate_limits
from ._connect import client_from_url
from ._contract import KeyPlan, Planner
from ._errors import LimiterUnavailable
from ._events import Events, Listener
from ._failopen import FailOpen, beat
from ._operators import Operators
from ._registry import Registry
from ._runner import ScriptRunner
from ._scope import fair_for
from ._slot import Slot, SlotContext, to_the_end
from ._waiting import Waiting

__all__ = ["Limiter", "Slot"]

log = logging.getLogger("limiter")
T = TypeVar("T")


class Limiter:
    """Admission for outbound API calls, decided in Redis for every replica at once.

    ``redis`` is a ``redis.asyncio`` client (``Redis``, ``RedisCluster``, a Sentinel
    master, or fakeredis). ``limits`` maps API names to :class:`APILimits`. All
    replicas sharing a ``namespace`` share the limits; they must configure them alike.
    """

    def __init__(
        self,
        redis: Any,
        limits: Mapping[str, APILimits],
        *,
        namespace: str = "limiter",
        on_redis_error: Literal["fail_closed", "fail_open"] = "fail_closed",
        ticket_ttl: float = 5.0,
        stats_ttl: float = 86_400.0,
        register: bool = True,
    ) -> None:
        self._limits = validate_limits(limits)
        self.namespace = check_namespace(namespace)
        check_choice("on_redis_error", on_redis_error, ("fail_closed", "fail_open"))
        self.on_redis_error = on_redis_error
        self._ticket_ttl = check_seconds("ticket_ttl", ticket_ttl, 0.1)
        self._stats_ttl = check_seconds("stats_ttl", stats_ttl, 0.1)
        self._planner = Planner(
            self.namespace, self._limits, ticket_ttl=self._ticket_ttl, stats_ttl=self._stats_ttl
        )
        #: Each API's KeyPlan (the planner's own dict).
        self._plans = self._planner.plans
        self._owns_client = False
        self._closed = False
        self._process_id = process_id = uuid.uuid4().hex[:16]
        self._events = Events()
        #: Write each API's limits to the registry on first contact (the CLI's own
        #: limiters, which read the registry, do not).
        self._runner = ScriptRunner(redis)
        self._registry = Registry(
            self._runner, namespace, self._limits, self._stats_ttl, enabled=bool(register)
        )
        self._runner.on_reload = self._registry.lost
        self._waiting = Waiting(
            self._runner, namespace, process_id, self._ticket_ttl, paused=self._paused
        )
        self._admission = Admission(self._runner, self._waiting, self._events, process_id)
        self._fail_open: FailOpen | None = None
        if on_redis_error == "fail_open":
            self._fail_open = FailOpen(
                self._runner, self._admission, self._waiting, self._events,
                namespace=namespace, process_id=process_id, apis=self._limits,
            )  # fmt: skip
        self._operators = Operators(self._runner, self._registry, namespace, self._fail_open)

    def _paused(self) -> bool:
        return self._fail_open is not None and self._fail_open.open

    # -- construction -------------------------------------------------------------------

    @classmethod
    def from_url(
        cls,
        url: str,
        limits: Mapping[str, APILimits],
        *,
        socket_timeout: float = 0.5,
        socket_connect_timeout: float = 0.5,
        max_connections: int = 50,
        pool_timeout: float = 10.0,
        **kwargs: Any,
    ) -> Limiter:
        """A Limiter on a new ``redis.asyncio`` client for ``url``, closed by :meth:`aclose`.

        The client uses a blocking pool of ``max_connections``: a burst of more concurrent
        calls queues for a connection (up to ``pool_timeout`` seconds) instead of failing.
        Short socket timeouts make a Redis that is down or hung fail fast
        (:class:`LimiterUnavailable` within a second) instead of hanging a caller.
        """
        waits = {"socket_timeout": socket_timeout, "pool_timeout": pool_timeout}
        waits["socket_connect_timeout"] = socket_connect_timeout
        client = client_from_url(url, max_connections=max_connections, **waits)
        lim = cls(client, limits, **kwargs)
        lim._owns_client = True
        return lim

    def __repr__(self) -> str:
        return f"<Limiter namespace={self.namespace!r} apis={sorted(self._limits)}>"

    @property
    def redis(self) -> Any:
        """The Redis client the limiter uses (shared with the caller's own keys if wished)."""
        return self._runner.redis

    @property
    def limits(self) -> Mapping[str, APILimits]:
        """The configured limits, by API."""
        return dict(self._limits)

    def api_limits(self, api: str) -> APILimits:
        """The configured limits of ``api``; ConfigError naming it when it is unknown."""
        return self._lookup(api)[1]

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    # -- admission ----------------------------------------------------------------------

    def slot(
        self,
        api: str,
        timeout: float | None = None,
        cost: int = 1,
        tokens: int | tuple[int, int] = 0,
        *,
        key: str | None = None,
        tenant: str | None = None,
        priority: int | None = None,
        model: str | None = None,
    ) -> SlotContext:
        """``async with lim.slot("openai") as slot:`` one admission, released on exit."""
        return SlotContext(
            lambda: self.acquire(
                api, timeout, cost, tokens, key=key, tenant=tenant, priority=priority, model=model
            )
        )

    async def acquire(
        self,
        api: str,
        timeout: float | None = None,
        cost: int = 1,
        tokens: int | tuple[int, int] = 0,
        *,
        key: str | None = None,
        tenant: str | None = None,
        priority: int | None = None,
        model: str | None = None,
    ) -> Slot:
        """Wait fairly (in the API's one queue across the cluster) for one admission and
        return its slot.

        ``timeout`` bounds the wait (``None``: the API's ``acquire_timeout``; ``0``: try
        once, never queue). Raises :class:`AcquireTimeout` when it runs out. With ``key``
        (a user id, a tenant), the API's limits apply to each key separately.

        Waiters are served by ``priority`` (-1000 to 1000, higher first; one that waited
        ``priority_aging`` seconds counts as the highest), then, within one priority, in
        proportion to their ``tenant``'s weight by the service each received, FIFO within
        one tenant. ``None`` takes them from the enclosing :func:`limiter.scope`, else
        tenant ``""`` (weight 1) and priority 0. ``model`` adds that model's limits
        (``APILimits.models``); an API with ``deployments`` admits to the one with the most
        headroom (``slot.deployment``). ``tokens=(input, output)`` gives them apart, for
        ``input_tokens_per_minute`` and ``output_tokens_per_minute``.
        """
        plan, limits = self._lookup(api, key)
        name, total, *split = check_request(plan, cost, tokens, model)
        fair = fair_for(limits, tenant, priority)
        wait = check_timeout(limits.acquire_timeout if timeout is None else timeout)
        if self._fail_open is not None:
            return await self._fail_open.acquire(plan, limits, wait, cost, total, fair)
        if not self._runner.is_ready:
            await self._runner.ready()
        self._registry.maybe_write()
        return await self._admission.acquire(plan, wait, cost, total, fair, name, split)

    async def call(
        self,
        api: str,
        operation: Callable[[], Awaitable[T]],
        name: str | None = None,
        timeout: float | None = None,
        tokens: int | tuple[int, int] = 0,
        *,
        idempotent: bool = True,
        key: str | None = None,
        tenant: str | None = None,
        priority: int | None = None,
        model: str | None = None,
    ) -> T:
        """Run ``operation()`` under a slot of ``api``, retrying what is worth retrying.

        Each attempt holds its own slot, released before any backoff sleep. Retryable
        failures (429 ``rate_limit_exceeded``, 408, 409, 5xx, timeouts, connection errors)
        are retried up to ``retry_attempts`` with exponential backoff and jitter between
        ``backoff_min`` and ``backoff_max``, waiting at least the provider's Retry-After.
        A 429 pauses the API for every replica. ``timeout`` bounds the whole call, waits
        and backoff included (``None``: the API's ``acquire_timeout``); a wait that would
        end past it fails at once with the provider's error. ``idempotent=False`` (calls
        with side effects) retries only failures that prove the call never ran. If the
        result has ``usage.total_tokens``, it is reported for the token budget.
        ``tenant`` and ``priority`` place every attempt in the fair queue (see
        :meth:`acquire`).
        """
        _, limits = self._lookup(api, key)
        fair_for(limits, tenant, priority)  # bad input fails before anything is queued
        return await call_with_retries(
            self, api, operation, name=name, timeout=timeout, tokens=tokens,
            idempotent=idempotent, key=key, tenant=tenant, priority=priority, model=model,
        )  # fmt: skip

    async def release(self, slot: Slot, *, success: bool = True) -> None:
        """Release ``slot``, like ``await slot.release()``, but sure to finish.

        A caller cancelled meanwhile (an SDK cancelling a request's scope) still gets
        the slot back to the cluster: the release completes in the background and
        :meth:`aclose` waits for it. Idempotent.
        """
        if slot.released:
            return
        await to_the_end(slot.release(success=success), self._admission.keep)

    async def cooldown(
        self, api: str, seconds: float, *, deployment: str | None = None, model: str | None = None
    ) -> float:
        """Pause ``api`` for every replica for ``seconds``; returns the pause now in force.

        A cooldown only grows: a shorter one never cuts a longer one short. With
        ``deployment`` and/or ``model``, only the most specific of the API's limit sets
        they name pauses (the others keep serving).
        """
        plan = self._lookup(api)[0]
        return await self._operators.cooldown(plan, seconds, plan.scope(deployment, model))

    # -- operators ----------------------------------------------------------------------

    async def stats(self, api: str | None = None, *, key: str | None = None) -> dict[str, Any]:
        """Cluster-wide counters of ``api`` (of one ``key`` of it), or of every API."""
        if api is None:
            return {name: await self.stats(name) for name in self._plans}
        plan, limits = self._lookup(api, key)
        return await self._operators.stats(plan, limits, keyed=key is not None)

    async def set_limits(
        self,
        api: str,
        *,
        max_concurrent: int | None = None,
        requests_per_minute: int | None = None,
        requests_per_hour: int | None = None,
        rates: Sequence[Rate] = (),
        tokens_per_minute: int | None = None,
        ttl: float | None = None,
    ) -> dict[str, Any]:
        """Change limits of ``api`` for every replica at once (a runtime override).

        Each given limit replaces the configured one in every admission from the next
        script call on, in every process sharing the namespace, until
        :meth:`clear_limits` (or for ``ttl`` seconds). Limits not given keep their
        override or configured value. One lifetime covers the whole override: adding to
        one that ends needs a ``ttl`` (the new one, for all of it), adding to one that
        does not end needs none (ConfigError otherwise). Only limits the API has can be
        changed: a window it lacks raises ConfigError. Lowering a limit admits nothing new
        until use falls below it; calls in flight are not interrupted; a waiter heavier
        than a lowered limit gets ConfigError; waiters that fit under a raised limit are
        admitted at once (but not when a ``ttl`` ends: they notice that at their next
        check, within ``ticket_ttl / 3``). Returns the override in force.
        """
        plan, per = self._lookup(api)[0], (requests_per_minute, requests_per_hour)
        new = (max_concurrent, *per, rates, tokens_per_minute)
        return await self._operators.set_limits(plan, ttl, *new)

    async def learn_limits(
        self, api: str, *, requests_per_minute: int | None = None,
        tokens_per_minute: int | None = None, requests_remaining: int | None = None,
        tokens_remaining: int | None = None, input_tokens_per_minute: int | None = None,
        output_tokens_per_minute: int | None = None, input_tokens_remaining: int | None = None,
        output_tokens_remaining: int | None = None, ttl: float = 600.0,
        key: str | None = None, deployment: str | None = None, model: str | None = None,
    ) -> dict[str, Any]:  # fmt: skip
        """Apply limits the provider reported (its headers) for every replica: one below
        the configured limit lowers the limit in force (with an override: the least of
        both) for ``ttl`` seconds, renewed by each such report; one at or above it clears
        what was learned. ``requests_per_minute`` applies to the API's one-minute request
        window, ``tokens_per_minute`` to its token budget, ``input_``/``output_tokens_*``
        to its input and output budgets, if it has them; a ``*_remaining`` below that
        window's room fills the difference in now. Called by ``LimitedTransport`` for
        ``learn_from_headers=True``; with ``deployment`` and/or ``model``, to the most
        specific limit set they name. Returns what stands learned there.
        """
        reported = (requests_per_minute, tokens_per_minute, requests_remaining, tokens_remaining)
        io = [input_tokens_per_minute, input_tokens_remaining]
        io += [output_tokens_per_minute, output_tokens_remaining]
        plan = self._lookup(api, key)[0]
        where = (deployment, model)
        return await self._operators.learn_limits(plan, reported, ttl, where, io)

    async def clear_limits(self, api: str) -> None:
        """Drop the runtime override of ``api``: its configured limits apply again."""
        await self._operators.clear_limits(self._lookup(api)[0])

    async def reset(self, api: str) -> int:
        """Forget the state of ``api`` in Redis: leases, waiters, windows, cooldown, totals.

        For operators (``limiter reset API``): holders get :class:`LeaseLost` on release,
        waiters queue again, the windows start empty (the provider may see up to twice a
        window's limit across it). The override and the registry entry stay. Keys left in
        the 0.1.0 layout (``w:<period>``, ``cooldown``, ``stats``, ``extra``,
        ``override``) are found with ``SCAN`` and deleted; returns how many.
        """
        return await self._operators.reset(self._lookup(api)[0])

    async def set_tenant_weight(
        self,
        api: str,
        tenant: str | None,
        weight: float | None,
        ttl: float | None = None,
        *,
        key: str | None = None,
    ) -> dict[str, float]:
        """Give ``tenant`` the weight ``weight`` in the fair queue of ``api``, for every
        replica at once (above ``APILimits.tenant_weights``), for ``ttl`` seconds or until
        changed. ``weight=None`` clears it (the configured weight applies again);
        ``tenant=None`` is the tenant of requests that name none. It counts from the next
        admission the queue makes. Returns the weights set at run time, by tenant. An API
        limited per ``key`` has one queue per key: give the ``key`` whose queue it is.
        """
        plan, _ = self._lookup(api, key)
        return await self._operators.set_tenant_weight(plan, tenant, weight, ttl)

    def add_listener(self, listener: Listener) -> None:
        """Call ``listener(event, api, fields)`` on each event, for metrics and tracing.

        Events: ``"admitted"`` (``waited`` seconds, ``reason`` that held it back first or
        None), ``"refused"`` (``reason``, once per request), ``"timeout"`` (``reason``),
        ``"released"`` (``success``, ``lost``), ``"retry"`` (``kind``, ``wait``),
        ``"provider_pause"`` (``kind``: rate_limited or quota, ``seconds``), ``"cache"``
        (``hit``: a lookup of ``limiter.http.ResponseCache``, True when it answered the
        request, False when the request went to the provider). Listeners run
        inline and must be quick; an exception in one is logged and ignored.
        """
        self._events.add(listener)

    @property
    def has_listeners(self) -> bool:
        """True when a listener was added (callers skip building fields otherwise)."""
        return self._events.active

    def emit(self, event: str, api: str, **fields: Any) -> None:
        """Tell the listeners of an event (the retry loop and the HTTP transport report
        retries and provider pauses through it)."""
        self._events.emit(event, api, **fields)

    # -- fail_open and background work --------------------------------------------------

    @property
    def replicas(self) -> int | None:
        """Live limiters sharing this namespace, as the last heartbeat read (fail_open);
        ``None`` before one reached Redis, and always under fail_closed (no heartbeat)."""
        return None if self._fail_open is None else self._fail_open.replicas

    async def heartbeat(self) -> int:
        """Tell Redis this limiter is alive and return how many are (runs by itself every
        few seconds under ``fail_open``; public for tests and tools)."""
        if self._fail_open is None:
            return await beat(self._runner, self.namespace, self._process_id)
        return await self._fail_open.heartbeat()

    async def renew(self) -> None:
        """Renew every lease and ticket this process holds, one round trip for all APIs
        (runs by itself in the background; public for tests and tools)."""
        await self._waiting.renew()

    async def aclose(self) -> None:
        """Stop the background tasks, give back held slots, close an owned client."""
        if self._closed:
            return
        self._closed = True
        self._waiting.fail_waiters()
        await self._admission.aclose()
        await self._waiting.aclose()
        if self._fail_open is not None:
            await self._fail_open.aclose()
        await self._registry.aclose()
        if self._owns_client:
            with contextlib.suppress(Exception):
                await self._runner.redis.aclose()

    # -- internals ----------------------------------------------------------------------

    @property
    def _background(self) -> set[asyncio.Future[Any]]:
        """Background work: registry writes, releases finishing after a cancel (for tests)."""
        return self._registry.tasks | self._admission.tasks

    def _lookup(self, api: str, key: str | None = None) -> tuple[KeyPlan, APILimits]:
        plan = self._planner.plan(api, key)
        if self._closed:
            raise LimiterUnavailable(api, "acquire", "the limiter was closed")
        return plan, self._limits[api]
