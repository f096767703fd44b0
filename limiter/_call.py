"""``Limiter.call``: one slot per attempt, retries with tenacity's own objects."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    stop_before_delay,
    wait_random_exponential,
)
from tenacity.stop import stop_base
from tenacity.wait import wait_base

from ._retry import Verdict, classify_exception

if TYPE_CHECKING:
    from ._limiter import Limiter

__all__ = ["Budget", "call_with_retries", "display_name", "pause_if_asked", "retrying"]

log = logging.getLogger("limiter")
T = TypeVar("T")

_DISPLAY = {"openai": "OpenAI", "zapier": "Zapier", "anthropic": "Anthropic"}


def display_name(api: str) -> str:
    """``"openai"`` -> ``"OpenAI"``: how the logs name an API."""
    return _DISPLAY.get(api, api)


def _verdict(retry_state: RetryCallState, idempotent: bool) -> Verdict | None:
    outcome = retry_state.outcome
    if outcome is None or not outcome.failed:
        return None
    exc = outcome.exception()
    return None if exc is None else classify_exception(exc, idempotent=idempotent)


class wait_provider_hint(wait_base):  # lower case like tenacity's own strategies
    """The larger of the provider's Retry-After hint and a fallback wait (our backoff).

    With ``deployments`` (the API has several), a 429's hint is not waited here: the
    pause it asked for holds the deployment that answered (a cooldown in Redis), and the
    next attempt may go to another one after the backoff alone.
    """

    def __init__(
        self, fallback: wait_base, *, idempotent: bool = True, deployments: bool = False
    ) -> None:
        self.fallback = fallback
        self.idempotent = idempotent
        self.deployments = deployments

    def __call__(self, retry_state: RetryCallState) -> float:
        ours = self.fallback(retry_state)
        verdict = _verdict(retry_state, self.idempotent)
        hint = verdict.retry_after if verdict is not None else None
        if self.deployments and verdict is not None and verdict.kind == "rate_limited":
            hint = None
        return max(ours, hint or 0.0)


class Budget:
    """The time a call may spend, waits and backoff included (``None``: no bound)."""

    __slots__ = ("seconds", "start")

    def __init__(self, seconds: float | None) -> None:
        self.seconds = seconds
        self.start = time.monotonic()

    def remaining(self) -> float:
        """Seconds left (``inf`` without a bound), never negative."""
        if self.seconds is None:
            return math.inf
        return max(0.0, self.seconds - (time.monotonic() - self.start))


def retrying(
    limiter: Limiter, api: str, budget: Budget, *, idempotent: bool, label: str
) -> AsyncRetrying:
    """tenacity's AsyncRetrying for one call: attempts, jittered backoff, provider hints.

    Shared by :meth:`Limiter.call` and the HTTP transport, so both retry alike.
    """
    limits = limiter.limits[api]
    stop: stop_base = stop_after_attempt(limits.retry_attempts)
    if budget.seconds is not None and math.isfinite(budget.seconds):
        # The wait is computed before the stop check: a hint or backoff that would end
        # past the budget stops at once, with the provider's error.
        stop = stop | stop_before_delay(budget.seconds)

    def before_sleep(rs: RetryCallState) -> None:
        verdict = _verdict(rs, idempotent)
        if limiter.has_listeners:
            kind = verdict.kind if verdict else "error"
            limiter.emit("retry", api, kind=kind, wait=rs.upcoming_sleep)
        log.warning(
            "%s failed (attempt %d/%d, %s): retrying in %.2fs",
            label,
            rs.attempt_number,
            limits.retry_attempts,
            verdict.kind if verdict else "error",
            rs.upcoming_sleep,
        )

    return AsyncRetrying(
        stop=stop,
        wait=wait_provider_hint(
            wait_random_exponential(
                multiplier=limits.backoff_min, min=limits.backoff_min, max=limits.backoff_max
            ),
            idempotent=idempotent,
            deployments=bool(limits.deployments),
        ),
        retry=retry_if_exception(lambda exc: classify_exception(exc, idempotent=idempotent).retry),
        before_sleep=before_sleep,
        reraise=True,
    )


async def call_with_retries(
    limiter: Limiter,
    api: str,
    operation: Callable[[], Awaitable[T]],
    *,
    name: str | None,
    timeout: float | None,
    tokens: int | tuple[int, int],
    idempotent: bool,
    key: str | None = None,
    tenant: str | None = None,
    priority: int | None = None,
    model: str | None = None,
) -> T:
    """Run ``operation`` under a slot of ``api``, retrying retryable failures."""
    limits = limiter.limits[api]
    budget = Budget(limits.acquire_timeout if timeout is None else timeout)
    label = f"{display_name(api)} call" + (f" ({name})" if name else "")
    async for attempt in retrying(limiter, api, budget, idempotent=idempotent, label=label):
        with attempt:
            return await _one_attempt(
                limiter,
                api,
                operation,
                budget.remaining(),
                tokens,
                label,
                idempotent,
                key,
                tenant,
                priority,
                model,
            )
    raise AssertionError("unreachable: tenacity returns or re-raises")  # pragma: no cover


async def _one_attempt(
    limiter: Limiter,
    api: str,
    operation: Callable[[], Awaitable[T]],
    timeout: float,
    tokens: int | tuple[int, int],
    label: str,
    idempotent: bool,
    key: str | None,
    tenant: str | None,
    priority: int | None,
    model: str | None,
) -> T:
    async with limiter.slot(
        api, timeout=timeout, tokens=tokens, key=key, tenant=tenant, priority=priority, model=model
    ) as slot:
        began = time.monotonic()
        try:
            result = await operation()
        except Exception as exc:
            verdict = classify_exception(exc, idempotent=idempotent)
            await pause_if_asked(limiter, api, verdict, slot.deployment, model)
            raise
        report: Any = getattr(result, "usage", None)
        total = getattr(report, "total_tokens", None)
        if isinstance(total, int) and not isinstance(total, bool) and total >= 0:
            slot.report_tokens(total)
    log.info("%s completed successfully in %.2fs", label, time.monotonic() - began)
    return result


async def pause_if_asked(
    limiter: Limiter,
    api: str,
    verdict: Verdict,
    deployment: str | None = None,
    model: str | None = None,
) -> None:
    """A 429 pauses the API for every replica; a spent quota pauses it loudly. With a
    ``deployment`` or ``model``, only the most specific limit set they name pauses."""
    where = {"deployment": deployment, "model": model}
    who = display_name(api) + ("" if deployment is None else f" (deployment {deployment!r})")
    limits = limiter.limits[api]
    if verdict.kind == "quota":
        seconds = max(verdict.retry_after or 0.0, limits.backoff_max)
        log.error(
            "QUOTA EXHAUSTED for %s (%s): pausing it for every replica for %.0fs; "
            "requests will fail until the quota is raised",
            who,
            verdict.code or "quota",
            seconds,
        )
        await limiter.cooldown(api, seconds, **where)
        limiter.emit("provider_pause", api, kind="quota", seconds=seconds)
    elif verdict.kind == "rate_limited":
        seconds = verdict.retry_after or limits.backoff_min
        log.warning("%s answered 429: pausing it for every replica for %.2fs", who, seconds)
        await limiter.cooldown(api, seconds, **where)
        limiter.emit("provider_pause", api, kind="rate_limited", seconds=seconds)
