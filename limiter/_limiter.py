"""The Limiter: cluster-wide admission through the Lua scripts, fair waiting, lease renewal."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from types import TracebackType
from typing import Any, Literal, Self, TypeVar

from redis.exceptions import (
    AuthenticationError,
    AuthorizationError,
    ClusterDownError,
    NoScriptError,
    ReadOnlyError,
    RedisClusterException,
    RedisError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from . import _admin
from ._admin import _text
from ._call import call_with_retries
from ._config import (
    MAX_COUNT,
    MAX_SECONDS,
    APILimits,
    Rate,
    _finite,
    _show,
    check_api_name,
    validate_limits,
)
from ._connect import client_from_url
from ._errors import AcquireTimeout, ConfigError, LeaseLost, LimiterUnavailable
from ._local import LocalGate
from ._scripts import KeyPlan, Scripts

__all__ = ["Limiter", "Slot"]

log = logging.getLogger("limiter")
T = TypeVar("T")
#: ``listener(event, api, fields)``: see :meth:`Limiter.add_listener`.
Listener = Callable[[str, str, dict[str, Any]], None]

#: What a Redis client raises when Redis fails: redis-py's cluster client raises
#: RedisClusterException (not a RedisError) for a slot it cannot route, e.g. CROSSSLOT.
_REDIS_ERRORS = (RedisError, RedisClusterException)

#: fail_open: heartbeat period, how long a silent limiter still counts as a replica, and
#: the circuit breaker's probe backoff while Redis is unreachable (seconds).
_HEARTBEAT_EVERY = 2.0
_HEARTBEAT_TTL = 6.0
_PROBE_FIRST, _PROBE_MAX = 0.25, 5.0
#: After a failed registry write, the next script call this many seconds on tries again.
_REGISTRY_RETRY = 5.0
#: Redis errors that mean "unreachable for now" (fail_open admits locally); every other
#: error (a wrong password, a denied command, CROSSSLOT) is raised under both policies.
_OUTAGES = (RedisConnectionError, RedisTimeoutError, ClusterDownError, ReadOnlyError)
_NOT_OUTAGES = (AuthenticationError, AuthorizationError)


#: The connection cap of a client that needs none (standalone, Sentinel): does nothing.
_NO_CAP: contextlib.nullcontext[None] = contextlib.nullcontext()


def _utf8(text: str) -> bool:
    """False for text that cannot be sent to Redis (a lone surrogate)."""
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def _is_outage(exc: LimiterUnavailable) -> bool:
    cause = exc.__cause__
    return isinstance(cause, _OUTAGES) and not isinstance(cause, _NOT_OUTAGES)


_OUTCOME_NONE, _OUTCOME_SUCCESS, _OUTCOME_FAILURE = 0, 1, 2
_WINDOW_WORDS = {"rate:60s": "minute", "rate:3600s": "hour", "rate:1s": "second"}


def _redact(exc: BaseException) -> str:
    """A Redis error as text for our messages (redis-py never puts passwords in them)."""
    return f"{type(exc).__name__}: {exc}"


class Slot:
    """One admission: a concurrency slot (a lease in Redis) plus one hit in every window.

    Release it exactly once, with ``await slot.release()`` or by leaving ``async with``.
    """

    __slots__ = (
        "_actual_tokens",
        "_gate",
        "_handed",
        "_limiter",
        "_local",
        "_lost",
        "_plan",
        "_released",
        "_short_lease",
        "acquired_at",
        "api",
        "cost",
        "id",
        "tokens",
    )

    def __init__(
        self,
        limiter: Limiter,
        plan: KeyPlan,
        slot_id: str,
        acquired_at: int,
        cost: int,
        tokens: int,
        handed: bool = False,
    ) -> None:
        self._limiter = limiter
        self._plan = plan
        api = plan.api
        self._handed = handed
        # A slot handed over by another process's release starts with a ticket's length
        # of lease; the renewer makes it a full lease at its next run.
        self._short_lease = handed
        #: The API this slot admits a call to.
        self.api = api
        #: Unique id of the slot ("<process id>.<n>").
        self.id = slot_id
        #: Admission time, microseconds of Redis TIME (the cluster's one clock).
        self.acquired_at = acquired_at
        #: Weight of this admission in the request windows.
        self.cost = cost
        #: Tokens reserved at admission.
        self.tokens = tokens
        self._actual_tokens = -1
        self._released = False
        self._lost = False
        #: Admitted by this process alone while Redis was unreachable (fail_open).
        self._local = False
        #: The local share this slot counts in (fail_open), if any.
        self._gate: LocalGate | None = None

    def __repr__(self) -> str:
        state = "released" if self._released else ("lost" if self._lost else "held")
        where = " local" if self._local else ""
        return f"<Slot {self.api} {self.id} {state}{where}>"

    @property
    def local(self) -> bool:
        """True when this process admitted it alone, Redis being unreachable (fail_open)."""
        return self._local

    @property
    def released(self) -> bool:
        """True once :meth:`release` (or leaving ``async with``) has begun."""
        return self._released

    @property
    def held(self) -> bool:
        """True until released, and while no renewal has found the lease gone."""
        return not self._released and not self._lost

    def report_tokens(self, n: int) -> None:
        """Report the tokens really used; the reservation is corrected on release."""
        if not isinstance(n, int) or isinstance(n, bool) or not 0 <= n <= MAX_COUNT:
            raise ConfigError(
                f"report_tokens(n={_show(n)}): must be an integer from 0 to 2**53 - 1",
                field="tokens",
                value=n,
            )
        self._actual_tokens = n

    async def release(self, *, success: bool = True) -> None:
        """Free the slot for the next waiter; counts a success or failure in ``stats()``.

        Idempotent. Raises :class:`LeaseLost` if the lease was found gone.
        """
        if self._released:
            return
        self._released = True
        await self._limiter._release(self, _OUTCOME_SUCCESS if success else _OUTCOME_FAILURE)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._released:
            return
        self._released = True
        outcome = _OUTCOME_SUCCESS if exc is None else _OUTCOME_FAILURE
        task = asyncio.ensure_future(self._limiter._release(self, outcome))
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            # Cancelled while releasing: the release still completes in the background.
            self._limiter._keep(task)
            raise
        except LeaseLost as lost:
            if exc is None:
                raise
            exc.add_note(str(lost))


class _SlotContext:
    """``async with lim.slot(...) as slot``: acquire on enter, release on exit."""

    __slots__ = ("_args", "_limiter", "_slot")

    def __init__(
        self, limiter: Limiter, args: tuple[str, float | None, int, int, str | None]
    ) -> None:
        self._limiter = limiter
        self._args = args
        self._slot: Slot | None = None

    async def __aenter__(self) -> Slot:
        api, timeout, cost, tokens, key = self._args
        self._slot = await self._limiter.acquire(
            api, timeout=timeout, cost=cost, tokens=tokens, key=key
        )
        return self._slot

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._slot is not None:
            await self._slot.__aexit__(exc_type, exc, tb)


class _Waiter:
    __slots__ = ("api", "future", "plan", "ticket")

    def __init__(self, plan: KeyPlan, ticket: str) -> None:
        self.plan = plan
        self.api = plan.api
        self.ticket = ticket
        #: Resolved with ("admitted", time), ("hint", wait us) or ("retry", 0).
        self.future: asyncio.Future[tuple[str, int]] = asyncio.get_running_loop().create_future()


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
        if (
            not isinstance(namespace, str)
            or not 0 < len(namespace) <= 100
            or any(c in "{} \t\n\r\x0b\x0c" for c in namespace)  # the scripts split on these
            or not _utf8(namespace)
        ):
            raise ConfigError(
                f"namespace={_show(namespace)}: must be 1-100 characters of UTF-8 text "
                "without braces or whitespace",
                field="namespace",
                value=namespace,
            )
        if on_redis_error not in ("fail_closed", "fail_open"):
            raise ConfigError(
                f"on_redis_error={_show(on_redis_error)}: must be 'fail_closed' or 'fail_open'",
                field="on_redis_error",
                value=on_redis_error,
            )
        for name, value in (("ticket_ttl", ticket_ttl), ("stats_ttl", stats_ttl)):
            number = _finite(value)
            if number is None or not 0.1 <= number <= MAX_SECONDS:
                raise ConfigError(
                    f"{name}={_show(value)}: must be a number of seconds from 0.1 to "
                    f"{MAX_SECONDS:.0f} (366 days)",
                    field=name,
                    value=value,
                )
        self._redis = redis
        self._owns_client = False
        self.namespace = namespace
        self.on_redis_error = on_redis_error
        self._ticket_ttl = float(ticket_ttl)
        self._stats_ttl = float(stats_ttl)
        self._keyed: dict[tuple[str, str], KeyPlan] = {}
        self._plans = {
            api: KeyPlan.build(namespace, api, lim, ticket_ttl=ticket_ttl, stats_ttl=stats_ttl)
            for api, lim in self._limits.items()
        }
        self._scripts = Scripts(redis)
        self._process_id = uuid.uuid4().hex[:16]
        self._channel = f"{namespace}:wake:{self._process_id}"
        self._ids = itertools.count(1)
        self._held: dict[str, Slot] = {}
        self._waiting: dict[str, _Waiter] = {}
        self._background: set[asyncio.Future[Any]] = set()
        self._work = asyncio.Event()
        self._renew_every = math.inf
        self._renewer: asyncio.Task[None] | None = None
        self._listener: asyncio.Task[None] | None = None
        self._pubsub: Any = None
        self._listen_lock = asyncio.Lock()
        self._ready = False
        #: Write each API's limits to the registry on first contact (the CLI's own
        #: limiters, which read the registry, do not).
        self._register = bool(register)
        self._register_due = math.inf
        self._warned: set[str] = set()
        #: A redis-py cluster client: no script pipelines, initialize() before use.
        self._cluster = type(redis).__name__ == "RedisCluster"
        # redis-py's cluster client fails a command (MaxConnectionsError) when a node's
        # connections are all busy, where the standalone blocking pool would queue it:
        # queue script calls here instead, leaving two connections for pub/sub.
        self._connection_cap: asyncio.Semaphore | None = None
        if self._cluster:
            per_node = getattr(redis, "nodes_manager", None)
            kwargs = getattr(per_node, "connection_kwargs", {}) or {}
            cap = max(1, int(kwargs.get("max_connections", 100)) - 2)
            self._connection_cap = asyncio.Semaphore(cap)
        self._closed = False
        self._last_wait_log: dict[str, float] = {}
        self._listeners: list[Listener] = []
        # fail_open: the replica count from the heartbeat, the circuit breaker, and each
        # API's local share while Redis is unreachable.
        self._fail_open = on_redis_error == "fail_open"
        self._replicas: int | None = None
        self._replicas_key = f"{namespace}:replicas".encode()
        self._heartbeat_task: asyncio.Task[None] | None = None
        self._breaker_open = False
        self._tripped = asyncio.Event()
        self._gates: dict[str, LocalGate] = {}
        self._pauses: dict[str, float] = {}
        #: Slots admitted locally (fail_open) and not yet released or counted in Redis.
        self._local_held: dict[str, Slot] = {}

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
        client = client_from_url(
            url,
            socket_timeout=socket_timeout,
            socket_connect_timeout=socket_connect_timeout,
            max_connections=max_connections,
            pool_timeout=pool_timeout,
        )
        lim = cls(client, limits, **kwargs)
        lim._owns_client = True
        return lim

    def __repr__(self) -> str:
        return f"<Limiter namespace={self.namespace!r} apis={sorted(self._limits)}>"

    @property
    def redis(self) -> Any:
        """The Redis client the limiter uses (shared with the caller's own keys if wished)."""
        return self._redis

    @property
    def limits(self) -> Mapping[str, APILimits]:
        """The configured limits, by API."""
        return dict(self._limits)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    # -- public operations --------------------------------------------------------------

    def slot(
        self,
        api: str,
        timeout: float | None = None,
        cost: int = 1,
        tokens: int = 0,
        *,
        key: str | None = None,
    ) -> _SlotContext:
        """``async with lim.slot("openai") as slot:`` one admission, released on exit."""
        return _SlotContext(self, (api, timeout, cost, tokens, key))

    async def acquire(
        self,
        api: str,
        timeout: float | None = None,
        cost: int = 1,
        tokens: int = 0,
        *,
        key: str | None = None,
    ) -> Slot:
        """Wait fairly (FIFO across the cluster) for one admission and return its slot.

        ``timeout`` bounds the wait (``None``: the API's ``acquire_timeout``; ``0``: try
        once, never queue). Raises :class:`AcquireTimeout` when it runs out. With ``key``
        (a user id, a tenant), the API's limits apply to each key separately.
        """
        plan, limits = self._lookup(api, key)
        self._check_request(plan, cost, tokens)
        if timeout is None:
            timeout = limits.acquire_timeout
        if timeout is not None:
            number = _finite(timeout)
            if number is None and timeout == math.inf and not isinstance(timeout, bool):
                number = math.inf  # wait without bound, as None with no acquire_timeout
            if number is None or number < 0:
                raise ConfigError(
                    f"timeout={_show(timeout)}: must be a number of seconds >= 0 or None",
                    field="timeout",
                    value=timeout,
                )
            timeout = number
        if self._fail_open:
            return await self._acquire_fail_open(plan, limits, timeout, cost, tokens)
        await self._ensure_ready()
        return await self._acquire(plan, timeout, cost, tokens)

    async def _acquire(self, plan: KeyPlan, timeout: float | None, cost: int, tokens: int) -> Slot:
        """Admission through Redis: the scripts decide, FIFO across the cluster."""
        api = plan.api
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        cancels = task.cancelling() if task is not None else 0
        start = loop.time()
        deadline = math.inf if timeout is None else start + timeout
        slot_id = f"{self._process_id}.{next(self._ids)}"
        ticket = f"{slot_id}|{cost}|{tokens}"
        mode = b"try" if timeout == 0 else b"wait"
        extra: tuple[Any, ...] = (slot_id, cost, tokens, mode, b"1")
        waiter: _Waiter | None = None
        reason = "concurrency"
        first: str | None = None  # the first limit that held this request back
        queued = True  # a ticket or slot of ours may exist in Redis
        try:
            while True:
                again = (slot_id, cost, tokens, mode, b"0")
                res = await self._run(self._scripts.acquire, plan, extra, "acquire", again)
                extra = again
                if int(res[0]) == 1:
                    handed = waiter is not None
                    slot = self._admitted(plan, slot_id, int(res[1]), cost, tokens, handed)
                    if self._listeners:
                        self._emit("admitted", api, waited=loop.time() - start, reason=first)
                    return slot
                reason = plan.reasons[_text(res[1])]
                if first is None:
                    first = reason
                    if self._listeners:
                        self._emit("refused", api, reason=reason)
                wait_us = int(res[2])
                if wait_us == -2:
                    queued = False  # the script dropped the ticket
                    kind = plan.window_kinds[int(_text(res[1])[1:]) - 1]
                    what, weight = ("tokens", tokens) if kind == "t" else ("cost", cost)
                    raise ConfigError(
                        f"{what}={weight} for API {api!r} can never pass: the {reason} "
                        f"limit in force is {int(res[3])} (a runtime override)",
                        field=what,
                        value=weight,
                    )
                if reason == "cooldown" and self._fail_open:
                    self._remember_pause(plan.tag, loop.time() + wait_us / 1_000_000)
                remaining = deadline - loop.time()
                if mode == b"try" or remaining <= 0:
                    if mode == b"try":
                        queued = False  # refused and never queued: nothing to withdraw
                    if self._listeners:
                        self._emit("timeout", api, reason=reason)
                    raise AcquireTimeout(api, reason, loop.time() - start)
                if waiter is None:
                    # Listen before waiting, then ask again at once: a hand-off that
                    # happened before the subscription is then seen by the script.
                    waiter = _Waiter(plan, ticket)
                    self._waiting[slot_id] = waiter
                    self._start_renewer(self._ticket_ttl)
                    await self._ensure_listener()
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
                while True:
                    if not waiter.future.done():
                        await asyncio.wait({waiter.future}, timeout=delay)
                    if not waiter.future.done():
                        break  # the wait is over: ask the script again
                    kind, value = waiter.future.result()
                    waiter.future = loop.create_future()
                    if kind == "admitted":
                        slot = self._admitted(plan, slot_id, value, cost, tokens, True)
                        if self._listeners:
                            self._emit("admitted", api, waited=loop.time() - start, reason=first)
                        return slot
                    if kind == "retry":
                        break  # our ticket expired (this process stalled): queue again
                    # "hint": we are at the head; the limit that holds us ends in `value` us.
                    delay = min(deadline - loop.time(), value / 1_000_000)
                    if delay <= 0:
                        break
        except BaseException as exc:
            # Even the first call may have run in Redis before we gave up on its answer
            # (cancelled, timed out): withdraw whatever it left, ticket or slot. When Redis
            # itself failed, do it in the background: the caller hears of it at once.
            if queued:
                if isinstance(exc, LimiterUnavailable):
                    self._keep(asyncio.ensure_future(self._withdraw(plan, slot_id, ticket)))
                else:
                    await self._withdraw(plan, slot_id, ticket)
            raise
        finally:
            self._waiting.pop(slot_id, None)

    async def call(
        self,
        api: str,
        operation: Callable[[], Awaitable[T]],
        name: str | None = None,
        timeout: float | None = None,
        tokens: int = 0,
        *,
        idempotent: bool = True,
        key: str | None = None,
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
        """
        self._lookup(api, key)
        return await call_with_retries(
            self,
            api,
            operation,
            name=name,
            timeout=timeout,
            tokens=tokens,
            idempotent=idempotent,
            key=key,
        )

    async def release(self, slot: Slot, *, success: bool = True) -> None:
        """Release ``slot``, like ``await slot.release()``, but sure to finish.

        A caller cancelled meanwhile (an SDK cancelling a request's scope) still gets
        the slot back to the cluster: the release completes in the background and
        :meth:`aclose` waits for it. Idempotent.
        """
        if slot._released:
            return
        task = asyncio.ensure_future(slot.release(success=success))
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            self._keep(task)
            raise

    async def cooldown(self, api: str, seconds: float) -> float:
        """Pause ``api`` for every replica for ``seconds``; returns the pause now in force.

        A cooldown only grows: a shorter one never cuts a longer one short.
        """
        plan, _ = self._lookup(api)
        number = _finite(seconds)
        if number is None or not 0 < number <= MAX_SECONDS:
            raise ConfigError(
                f"cooldown seconds={_show(seconds)}: must be a number > 0 and at most "
                f"{MAX_SECONDS:.0f} (366 days)",
                field="seconds",
                value=seconds,
            )
        seconds = number
        ms = max(1, math.ceil(seconds * 1000))
        if self._fail_open:
            # Remembered here too: while Redis is unreachable the local shares honour it.
            until = asyncio.get_running_loop().time() + seconds
            self._remember_pause(plan.tag, until)
            gate = self._gates.get(plan.tag)
            if gate is not None:
                gate.paused_until = max(gate.paused_until, until)
            if self._breaker_open:
                return seconds
        try:
            await self._ensure_ready()
            left = await self._call(
                self._scripts.cooldown, [plan.cooldown_key], [ms], api, "cooldown"
            )
        except LimiterUnavailable as exc:
            if not (self._fail_open and _is_outage(exc)):
                raise
            self._trip(exc)
            return seconds
        return int(left) / 1000

    async def stats(self, api: str | None = None, *, key: str | None = None) -> dict[str, Any]:
        """Cluster-wide counters of ``api`` (of one ``key`` of it), or of every API."""
        if api is None:
            return {name: await self.stats(name) for name in self._plans}
        plan, limits = self._lookup(api, key)
        await self._ensure_ready()
        res = await self._call(
            self._scripts.stats,
            plan.stats_keys,
            plan.window_periods,
            api,
            "stats",
        )
        in_flight, waiting, cooldown_ms, flat, used, override, override_ms = res
        overrides = _admin.override_view(plan, override, int(override_ms))
        counters = {_text(flat[i]): int(flat[i + 1]) for i in range(0, len(flat), 2)}
        ok = counters.get("successful_requests", 0)
        failed = counters.get("failed_requests", 0)
        done = ok + failed
        refusals: dict[str, int] = {}
        for field, n in counters.items():
            if field.startswith("refused:"):
                code = field.removeprefix("refused:")
                name = plan.reasons.get(code, code)
                refusals[name] = refusals.get(name, 0) + n
        windows = {
            name: {"used": int(u), "limit": overrides.get(name, lim)}
            for name, u, lim in zip(plan.window_names, used, plan.window_limits, strict=True)
        }
        return {
            "total_requests": done + int(in_flight),
            "successful_requests": ok,
            "failed_requests": failed,
            "success_rate": (100.0 * ok / done) if done else 0.0,
            "average_response_time": (counters.get("response_time_us", 0) / 1e6 / done)
            if done
            else 0.0,
            "concurrent_requests": int(in_flight),
            "max_concurrent": overrides.get("max_concurrent", limits.max_concurrent),
            "waiting": int(waiting),
            "refusals": refusals,
            "cooldown_remaining": int(cooldown_ms) / 1000,
            "windows": windows,
            "overrides": overrides,
        }

    # -- runtime limits -----------------------------------------------------------------

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
        plan, _ = self._lookup(api)
        fields = _admin.override_fields(
            plan,
            max_concurrent=max_concurrent,
            requests_per_minute=requests_per_minute,
            requests_per_hour=requests_per_hour,
            rates=rates,
            tokens_per_minute=tokens_per_minute,
        )
        args: list[Any] = [_admin.check_ttl(ttl)]
        for name, value in fields.items():
            args += [name, value]
        await self._ensure_ready()
        flat, pttl = await self._call(
            self._scripts.override, [plan.override_key], args, api, "set_limits"
        )
        if isinstance(flat, bytes | str):  # {"ttl", PTTL}: refused, nothing changed
            ends = "ends in %.0fs" % (int(pttl) / 1000) if int(pttl) > 0 else "has no end"
            raise ConfigError(
                f"ttl={_show(ttl)}: the override in force for API {api!r} {ends}, and one "
                "lifetime covers all of it; clear it first, or give the same kind of ttl",
                field="ttl",
                value=ttl,
            )
        view = _admin.override_view(plan, flat, int(pttl))
        log.info("API %r: limits overridden: %s", api, view)
        await self._move_queue(plan, "set_limits")
        return view

    async def clear_limits(self, api: str) -> None:
        """Drop the runtime override of ``api``: its configured limits apply again."""
        plan, _ = self._lookup(api)
        await self._ensure_ready()
        await self._call(self._scripts.override, [plan.override_key], [0], api, "clear_limits")
        log.info("API %r: limits override cleared", api)
        await self._move_queue(plan, "clear_limits")

    async def _move_queue(self, plan: KeyPlan, op: str) -> None:
        """Let waiters already queued meet the new limits now: admit those that fit (their
        processes are woken) and drop those a lowered limit makes too heavy. (The renew
        script with nothing to renew does just that.)"""
        await self._call(self._scripts.renew, plan.keys, [plan.config, 0], plan.api, op)

    async def reset(self, api: str) -> None:
        """Forget the state of ``api`` in Redis: leases, waiters, windows, cooldown, totals.

        For operators (``limiter reset API``), not for normal running: holders of slots
        get :class:`LeaseLost` on release, waiters queue again, and the windows start
        empty, so the provider may see up to twice a window's limit across the reset.
        The runtime override and the registry entry are kept.
        """
        plan, _ = self._lookup(api)
        await self._ensure_ready()
        try:
            await self._redis.delete(*plan.keys[:-1])
        except _REDIS_ERRORS as exc:
            raise LimiterUnavailable(api, "reset", _redact(exc)) from exc
        log.info("API %r: state reset in namespace %r", api, self.namespace)

    async def aclose(self) -> None:
        """Stop the background tasks, give back held slots, close an owned client."""
        if self._closed:
            return
        self._closed = True
        for waiter in list(self._waiting.values()):
            if not waiter.future.done():
                waiter.future.set_exception(
                    LimiterUnavailable(waiter.api, "acquire", "the limiter was closed")
                )
                # Marked as seen: a waiter already on its way out (cancelled) never reads
                # it, and asyncio would log "Future exception was never retrieved".
                waiter.future.exception()
        for slot in list(self._held.values()):
            with contextlib.suppress(Exception):
                await slot.release(success=True)
        tasks = [t for t in (self._renewer, self._listener, self._heartbeat_task) if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(BaseException):
                await task
        if self._pubsub is not None:
            with contextlib.suppress(Exception):
                await self._pubsub.aclose()
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        if self._owns_client:
            with contextlib.suppress(Exception):
                await self._redis.aclose()

    # -- internals ----------------------------------------------------------------------

    def _lookup(self, api: str, key: str | None = None) -> tuple[KeyPlan, APILimits]:
        if not isinstance(api, str):
            check_api_name(api)  # raises a ConfigError naming the field
        plan = self._plans.get(api)
        if plan is not None and key is not None:
            plan = self._keyed_plan(api, key)
        if plan is None:
            check_api_name(api)
            known = ", ".join(repr(a) for a in sorted(self._plans)) or "none"
            raise ConfigError(
                f"unknown API {api!r}: configured APIs are {known}", field="api", value=api
            )
        if self._closed:
            raise LimiterUnavailable(api, "acquire", "the limiter was closed")
        return plan, self._limits[api]

    def api_limits(self, api: str) -> APILimits:
        """The configured limits of ``api``; ConfigError naming it when it is unknown."""
        return self._lookup(api)[1]

    def add_listener(self, listener: Listener) -> None:
        """Call ``listener(event, api, fields)`` on each event, for metrics and tracing.

        Events: ``"admitted"`` (``waited`` seconds, ``reason`` that held it back first or
        None), ``"refused"`` (``reason``, once per request), ``"timeout"`` (``reason``),
        ``"released"`` (``success``, ``lost``), ``"retry"`` (``kind``, ``wait``),
        ``"provider_pause"`` (``kind``: rate_limited or quota, ``seconds``). Listeners run
        inline and must be quick; an exception in one is logged and ignored.
        """
        self._listeners.append(listener)

    def _emit(self, event: str, api: str, **fields: Any) -> None:
        for listener in self._listeners:
            try:
                listener(event, api, fields)
            except Exception:
                log.exception("limiter listener failed on %s", event)

    def _keyed_plan(self, api: str, key: str) -> KeyPlan:
        if not isinstance(key, str) or not key or not _utf8(key):
            raise ConfigError(
                f"key={_show(key)}: must be a non-empty string of UTF-8 text",
                field="key",
                value=key,
            )
        plan = self._keyed.get((api, key))
        if plan is None:
            if len(self._keyed) >= 10_000:
                self._keyed.pop(next(iter(self._keyed)))
            plan = KeyPlan.build(
                self.namespace,
                api,
                self._limits[api],
                ticket_ttl=self._ticket_ttl,
                stats_ttl=self._stats_ttl,
                key=key,
            )
            self._keyed[(api, key)] = plan
        return plan

    def _log_wait(self, api: str) -> bool:
        """At most one "Rate limit reached" line per API per second, per process."""
        now = time.monotonic()
        if now - self._last_wait_log.get(api, -math.inf) < 1.0:
            return False
        self._last_wait_log[api] = now
        return True

    @staticmethod
    def _check_request(plan: KeyPlan, cost: int, tokens: int) -> None:
        if not isinstance(cost, int) or isinstance(cost, bool) or not 1 <= cost <= MAX_COUNT:
            raise ConfigError(
                f"cost={_show(cost)}: must be an integer from 1 to 2**53 - 1",
                field="cost",
                value=cost,
            )
        if not isinstance(tokens, int) or isinstance(tokens, bool) or not 0 <= tokens <= MAX_COUNT:
            raise ConfigError(
                f"tokens={_show(tokens)}: must be an integer from 0 to 2**53 - 1",
                field="tokens",
                value=tokens,
            )
        for name, limit, kind in zip(
            plan.window_names, plan.window_limits, plan.window_kinds, strict=True
        ):
            weight, what = (tokens, "tokens") if kind == "t" else (cost, "cost")
            if weight > limit:
                raise ConfigError(
                    f"{what}={weight} for API {plan.api!r} can never pass: "
                    f"the {name} limit is {limit}",
                    field=what,
                    value=weight,
                )

    async def _ensure_ready(self) -> None:
        if self._ready:
            if self._register and time.monotonic() > self._register_due:
                self._start_registry()
            return
        # redis-py's asyncio RedisCluster must be initialized before concurrent use.
        init = getattr(self._redis, "initialize", None)
        if init is not None and self._cluster:
            try:
                await init()
            except _REDIS_ERRORS as exc:
                raise LimiterUnavailable(None, "connect", _redact(exc)) from exc
        self._ready = True
        if self._register:
            self._start_registry()

    def _start_registry(self) -> None:
        # The entries live stats_ttl (like the totals) and are written again every half of
        # it while this limiter is used, so that an API nobody runs any more fades away.
        self._register_due = time.monotonic() + self._stats_ttl / 2
        if self._limits:
            self._keep(asyncio.ensure_future(self._write_registry()))

    async def _write_registry(self) -> None:
        """Put each API's limits in the registry; warn when another replica's differ."""
        ttl_ms = round(self._stats_ttl * 1000)
        apis = _admin.apis_key(self.namespace)
        try:
            for api, limits in self._limits.items():
                ours = _admin.config_json(limits)
                key = _admin.config_key(self.namespace, api)
                async with self._connection_cap or _NO_CAP:
                    theirs = await self._redis.set(key, ours, px=ttl_ms, get=True)
                    await self._redis.sadd(apis, api)
                    await self._redis.pexpire(apis, ttl_ms)
                if theirs is not None and _text(theirs) != ours and api not in self._warned:
                    self._warned.add(api)
                    try:
                        differ = _admin.describe_difference(ours, _text(theirs))
                    except ValueError:
                        differ = "what Redis holds is not a limiter configuration"
                    log.warning(
                        "API %r: this limiter's limits differ from those another limiter "
                        "registered in namespace %r (%s). Every replica must configure an "
                        "API alike: the scripts admit by the caller's limits.",
                        api,
                        self.namespace,
                        differ,
                    )
        except _REDIS_ERRORS as exc:  # the registry is for operators: admission goes on
            self._register_due = time.monotonic() + _REGISTRY_RETRY
            log.debug(
                "could not write the limits registry (again in %gs): %s",
                _REGISTRY_RETRY,
                _redact(exc),
            )

    async def _call(
        self,
        script: Any,
        keys: Sequence[bytes],
        args: Sequence[Any],
        api: str | None,
        op: str,
        retry_args: Sequence[Any] | None = None,
    ) -> Any:
        """EVALSHA ``script``; on NOSCRIPT (a flush, a restart) load it and run it again.

        A connection found closed (a Redis restart, a dropped pooled connection) is tried
        once more on a fresh one, with ``retry_args`` when given: every script is written
        so that running it again after an unseen first run does no harm (acquire asks
        again as a waiter would, and finds its slot if the first run admitted it).
        """
        task = asyncio.current_task()
        cancels = task.cancelling() if task is not None else 0
        try:
            try:
                result = await self._eval(script, keys, args)
            except RedisConnectionError:
                result = await self._eval(script, keys, retry_args or args)
        except _REDIS_ERRORS as exc:
            raise LimiterUnavailable(api, op, _redact(exc)) from exc
        if task is not None and task.cancelling() > cancels:
            # redis-py (8.1, on Python 3.11) can swallow a cancellation that arrives while
            # a command is being sent; honour it here, so that the caller's cleanup runs.
            raise asyncio.CancelledError
        return result

    async def _eval(self, script: Any, keys: Sequence[bytes], args: Sequence[Any]) -> Any:
        # No extra coroutine on the standalone hot path: the cap is a no-op context there.
        async with self._connection_cap or _NO_CAP:
            try:
                return await self._redis.evalsha(script.sha, len(keys), *keys, *args)
            except NoScriptError:
                # Scripts gone: a restart or a flush, which took the registry too.
                self._register_due = 0.0
                script.sha = await self._redis.script_load(script.script)
                return await self._redis.evalsha(script.sha, len(keys), *keys, *args)

    async def _run(
        self,
        script: Any,
        plan: KeyPlan,
        extra: Sequence[Any],
        op: str,
        retry_extra: Sequence[Any] | None = None,
    ) -> Any:
        args = (plan.config, *extra)
        retry_args = None if retry_extra is None else (plan.config, *retry_extra)
        return await self._call(script, plan.keys, args, plan.api, op, retry_args)

    def _admitted(
        self, plan: KeyPlan, slot_id: str, at: int, cost: int, tokens: int, handed: bool
    ) -> Slot:
        slot = Slot(self, plan, slot_id, at, cost, tokens, handed)
        self._held[slot_id] = slot
        self._start_renewer(self._ticket_ttl if handed else self._limits[plan.api].lease_ttl)
        return slot

    async def _release(self, slot: Slot, outcome: int) -> None:
        plan = slot._plan
        self._held.pop(slot.id, None)
        if slot._gate is not None:
            slot._gate.give_back()
            slot._gate = None
        if slot._local:
            self._local_held.pop(slot.id, None)
            if self._listeners:
                self._emit("released", slot.api, success=outcome == _OUTCOME_SUCCESS, lost=False)
            return
        extra = (
            slot.id,
            b"",
            outcome,
            slot.acquired_at,
            slot.tokens,
            slot._actual_tokens,
            b"1" if slot._handed else b"0",
        )
        try:
            res = await self._run(self._scripts.release, plan, extra, "release")
        except LimiterUnavailable as exc:
            if not (self._fail_open and _is_outage(exc)):
                raise
            # fail_open: the lease ends by itself within lease_ttl.
            self._trip(exc)
            return
        lost = int(res[0]) == 0 or slot._lost
        if self._listeners:
            self._emit("released", slot.api, success=outcome == _OUTCOME_SUCCESS, lost=lost)
        if lost:
            slot._lost = True
            log.warning("lease of slot %s for %s was lost before release", slot.id, slot.api)
            raise LeaseLost(slot.api, slot.id)

    async def _withdraw(self, plan: KeyPlan, slot_id: str, ticket: str) -> None:
        """Take a waiter's ticket out of the queue (and free a slot handed to it meanwhile)."""
        extra = (slot_id, ticket, _OUTCOME_NONE, 0, 0, -1, b"1")
        task = asyncio.ensure_future(self._run(self._scripts.release, plan, extra, "withdraw"))
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            self._keep(task)
            raise
        except LimiterUnavailable as exc:
            # The ticket expires by itself within ticket_ttl.
            log.warning("could not withdraw ticket %s: %s", slot_id, exc)

    def _keep(self, task: asyncio.Future[Any]) -> None:
        self._background.add(task)
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Future[Any]) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("background task failed: %s", task.exception())

    # -- fail_open ----------------------------------------------------------------------

    @property
    def replicas(self) -> int | None:
        """Live limiters sharing this namespace, as the last heartbeat read (fail_open).

        ``None`` until a heartbeat has reached Redis (and always under fail_closed,
        which keeps no heartbeat).
        """
        return self._replicas

    async def heartbeat(self) -> int:
        """Tell Redis this limiter is alive and read how many are; returns that count.

        Runs by itself every few seconds under ``fail_open``; public for tests and tools.
        """
        await self._ensure_ready()
        ttl_ms = round(_HEARTBEAT_TTL * 1000)
        n = await self._call(
            self._scripts.heartbeat,
            [self._replicas_key],
            [self._process_id, ttl_ms],
            None,
            "heartbeat",
        )
        self._replicas = int(n)
        return self._replicas

    async def _heartbeat_loop(self) -> None:
        """Beat every few seconds; while the breaker is open, probe Redis with backoff.

        The probe is the heartbeat itself: the first one a short while after the outage
        was seen, then at doubling intervals (at most ``_PROBE_MAX`` apart).
        """
        probe = _PROBE_FIRST
        while not self._closed:
            if self._breaker_open:
                await asyncio.sleep(probe)
                probe = min(probe * 2, _PROBE_MAX)
            try:
                await self.heartbeat()
            except LimiterUnavailable as exc:
                if _is_outage(exc):
                    self._trip(exc)
                    continue
                log.warning("heartbeat failed: %s", exc)
            else:
                if self._breaker_open:
                    self._recover()
                probe = _PROBE_FIRST
            self._tripped.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._tripped.wait(), _HEARTBEAT_EVERY)

    def _trip(self, exc: LimiterUnavailable) -> None:
        """Redis is unreachable: open the breaker (admit locally) and say so, once."""
        if self._breaker_open:
            return
        self._breaker_open = True
        self._tripped.set()  # the heartbeat loop starts probing
        self._gates.clear()
        shares = (
            f"at most 1/{self._replicas} of each limit (replicas seen by the last heartbeat)"
            if self._replicas
            else "nothing (no heartbeat reached Redis yet, so the replica count is unknown)"
        )
        log.warning(
            "Redis is unreachable (%s); on_redis_error='fail_open': admitting %s in this "
            "process, probing Redis until it answers",
            exc,
            shares,
        )
        if self._listeners:
            for api in self._limits:
                self._emit("fail_open", api, replicas=self._replicas)
        self._start_heartbeat()

    def _recover(self) -> None:
        self._breaker_open = False
        self._gates.clear()
        log.warning("Redis answers again: admission is decided in Redis again")
        if self._local_held:
            self._keep(asyncio.ensure_future(self._adopt_local()))
        if self._listeners:
            for api in self._limits:
                self._emit("recovered", api)

    async def _adopt_local(self) -> None:
        """Redis answers again: have it count the calls admitted locally that still run.

        Each asks as ``acquire(timeout=0)`` would, under its own slot id: where there is
        room, the slot becomes an ordinary lease (renewed, released in Redis) and the other
        replicas see it; where there is none, it stays counted here only, as before.
        """
        for slot in list(self._local_held.values()):
            if self._breaker_open or self._closed:
                return
            if slot._released:
                continue
            plan = slot._plan
            extra = (slot.id, slot.cost, slot.tokens, b"try", b"1")
            res = await self._run(self._scripts.acquire, plan, extra, "adopt")
            if int(res[0]) != 1:
                continue
            self._local_held.pop(slot.id, None)
            slot._local = False
            if slot._released:  # released while Redis was asked: give it back there too
                give_back = (slot.id, b"", _OUTCOME_NONE, int(res[1]), slot.tokens, -1, b"0")
                await self._run(self._scripts.release, plan, give_back, "release")
                continue
            self._held[slot.id] = slot
            self._start_renewer(self._limits[plan.api].lease_ttl)

    def _start_heartbeat(self) -> None:
        if self._heartbeat_task is None or self._heartbeat_task.done():
            self._heartbeat_task = asyncio.create_task(
                self._heartbeat_loop(), name="limiter-heartbeat"
            )

    async def _acquire_fail_open(
        self, plan: KeyPlan, limits: APILimits, timeout: float | None, cost: int, tokens: int
    ) -> Slot:
        loop = asyncio.get_running_loop()
        start = loop.time()
        if not self._breaker_open:
            try:
                if self._replicas is None:
                    await self.heartbeat()
                self._start_heartbeat()
                await self._ensure_ready()
                return await self._acquire(plan, timeout, cost, tokens)
            except LimiterUnavailable as exc:
                if not _is_outage(exc):
                    raise
                self._trip(exc)
        if timeout is not None:
            timeout = max(0.0, timeout - (loop.time() - start))
        return await self._acquire_local(plan, limits, timeout, cost, tokens, start)

    def _remember_pause(self, tag: str, until: float) -> None:
        """Keep a cooldown seen in Redis for the local shares (fail_open); forget old ones."""
        if len(self._pauses) >= 10_000:
            now = asyncio.get_running_loop().time()
            self._pauses = {t: u for t, u in self._pauses.items() if u > now}
        self._pauses[tag] = max(self._pauses.get(tag, 0.0), until)

    def _local_gate(self, plan: KeyPlan, limits: APILimits) -> LocalGate:
        gate = self._gates.get(plan.tag)
        if gate is None:
            assert self._replicas is not None
            gate = LocalGate(plan, limits, self._replicas)
            gate.paused_until = self._pauses.get(plan.tag, 0.0)
            # Slots this process holds through Redis count in its share.
            for held in self._held.values():
                if held._plan.tag == plan.tag and held._gate is None:
                    held._gate = gate
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
    ) -> Slot:
        """Admission within this replica's share while the breaker is open."""
        api = plan.api
        if self._replicas is None:
            raise LimiterUnavailable(
                api,
                "acquire",
                "Redis is unreachable and no heartbeat has reached it yet, so fail_open "
                "cannot know this replica's share of the limits; refusing rather than guessing",
            )
        gate = self._local_gate(plan, limits)
        why = gate.impossible(cost, tokens)
        if why is not None:
            raise LimiterUnavailable(
                api,
                "acquire",
                f"Redis is unreachable and this replica's share of the {why} limit "
                f"(limit // {self._replicas} replicas) cannot admit cost={cost} tokens={tokens}",
            )
        loop = asyncio.get_running_loop()
        deadline = math.inf if timeout is None else loop.time() + timeout
        first: str | None = None
        while True:
            now = loop.time()
            reason, wait = gate.check(now, cost, tokens)
            if reason is None:
                gate.take(now, cost, tokens)
                slot = Slot(self, plan, f"{self._process_id}.{next(self._ids)}", 0, cost, tokens)
                slot.acquired_at = time.time_ns() // 1000
                slot._local = True
                slot._gate = gate
                self._local_held[slot.id] = slot
                if self._listeners:
                    self._emit("admitted", api, waited=now - start, reason=first, local=True)
                return slot
            if first is None:
                first = reason
                if self._listeners:
                    self._emit("refused", api, reason=reason)
            remaining = deadline - now
            if remaining <= 0:
                if self._listeners:
                    self._emit("timeout", api, reason=reason)
                raise AcquireTimeout(api, reason, now - start)
            delay = min(remaining, wait)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(gate.changed.wait(), None if math.isinf(delay) else delay)

    # -- wake-ups -----------------------------------------------------------------------

    async def _ensure_listener(self) -> None:
        if self._listener is not None and not self._listener.done():
            return
        async with self._listen_lock:
            if self._listener is not None and not self._listener.done():
                return
            pubsub = self._redis.pubsub()
            try:
                await pubsub.subscribe(self._channel)
            except _REDIS_ERRORS as exc:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()
                raise LimiterUnavailable(None, "subscribe", _redact(exc)) from exc
            self._pubsub = pubsub
            self._listener = asyncio.create_task(self._listen(pubsub), name="limiter-listener")

    async def _listen(self, pubsub: Any) -> None:
        try:
            while True:
                msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=None)
                if msg is None or msg.get("type") != "message":
                    continue
                kind, slot_id, value = _text(msg["data"]).split(" ")
                waiter = self._waiting.get(slot_id)
                if waiter is None:
                    continue
                if waiter.future.done():
                    # An unread admission stays; an unread hint gives way to a newer one.
                    if (
                        waiter.future.exception() is None
                        and waiter.future.result()[0] == "admitted"
                    ):
                        continue
                    waiter.future = asyncio.get_running_loop().create_future()
                waiter.future.set_result(("admitted" if kind == "A" else "hint", int(value)))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # connection lost: the renewer covers missed wake-ups
            log.warning("wake-up listener stopped (%s); falling back to renewals", _redact(exc))
            with contextlib.suppress(Exception):
                await pubsub.aclose()
            # _ensure_listener starts a new one on the next wait.

    # -- lease renewal ------------------------------------------------------------------

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
            if not self._held and not self._waiting:
                self._renew_every = math.inf
                self._work.clear()
                await self._work.wait()
                last = loop.time()
                continue
            # Leases are renewed three times per lease; tickets (and slots just handed
            # over, whose first lease is a ticket's length) three times per ticket_ttl.
            periods = [self._limits[s.api].lease_ttl for s in self._held.values()]
            if self._waiting or any(s._short_lease for s in self._held.values()):
                periods.append(self._ticket_ttl)
            self._renew_every = min(periods) / 3
            delay = last + self._renew_every - loop.time()
            if delay > 0:
                self._work.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._work.wait(), delay)
                continue
            last = loop.time()
            if self._breaker_open:
                continue  # Redis is unreachable: the heartbeat probes it, not the renewer
            try:
                await self.renew()
                if self._waiting and (self._listener is None or self._listener.done()):
                    # The wake-up listener died with its connection (a restart, a
                    # failover): waiters already queued need it back, not only new ones.
                    await self._ensure_listener()
            except LimiterUnavailable as exc:
                log.warning("lease renewal failed: %s", exc)

    async def renew(self) -> None:
        """Renew every lease and ticket this process holds, one round trip for all APIs.

        Runs by itself in the background; public for tests and tools.
        """
        by_tag: dict[str, tuple[KeyPlan, list[str], list[str]]] = {}
        for slot in self._held.values():
            by_tag.setdefault(slot._plan.tag, (slot._plan, [], []))[1].append(slot.id)
        for waiter in self._waiting.values():
            by_tag.setdefault(waiter.plan.tag, (waiter.plan, [], []))[2].append(waiter.ticket)
        if not by_tag:
            return
        tags = list(by_tag)
        results: list[Any] = []
        if self._cluster:
            # A cluster client cannot pipeline scripts (each tag may live on another
            # shard): one call per tag, all at once.
            calls = []
            for tag in tags:
                plan, slots, tickets = by_tag[tag]
                args = [plan.config, len(slots), *slots, *tickets]
                calls.append(self._eval(self._scripts.renew, plan.keys, args))
            results = list(await asyncio.gather(*calls, return_exceptions=True))
            if all(isinstance(r, _REDIS_ERRORS) for r in results):
                raise LimiterUnavailable(None, "renew", _redact(results[0]))
        sha = self._scripts.renew.sha
        for _attempt in range(0 if self._cluster else 2):
            pipe = self._redis.pipeline(transaction=False)
            for tag in tags:
                plan, slots, tickets = by_tag[tag]
                args = [plan.config, len(slots), *slots, *tickets]
                pipe.evalsha(sha, len(plan.keys), *plan.keys, *args)
            try:
                results = await pipe.execute(raise_on_error=False)
            except _REDIS_ERRORS as exc:
                raise LimiterUnavailable(None, "renew", _redact(exc)) from exc
            if not any(isinstance(r, NoScriptError) for r in results):
                break
            try:
                sha = await self._redis.script_load(self._scripts.renew.script)
            except _REDIS_ERRORS as exc:
                raise LimiterUnavailable(None, "renew", _redact(exc)) from exc
        for tag, res in zip(tags, results, strict=True):
            api = by_tag[tag][0].api
            if isinstance(res, BaseException):
                log.warning("lease renewal for %s failed: %s", tag, _redact(res))
                continue
            lost, admitted, gone = res
            lost_ids = {_text(sid) for sid in lost}
            for sid in by_tag[tag][1]:
                held = self._held.get(sid)
                if held is None:
                    continue
                if sid not in lost_ids:
                    held._short_lease = False
                elif not held._lost:
                    held._lost = True
                    log.warning("lease of slot %s for %s was lost", sid, api)
            for i in range(0, len(admitted), 2):
                handed = self._waiting.get(_text(admitted[i]))
                if handed is not None:
                    if handed.future.done():
                        handed.future = asyncio.get_running_loop().create_future()
                    handed.future.set_result(("admitted", int(admitted[i + 1])))
            for ticket in map(_text, gone):
                expired = self._waiting.get(ticket.partition("|")[0])
                if expired is not None and not expired.future.done():
                    expired.future.set_result(("retry", 0))
