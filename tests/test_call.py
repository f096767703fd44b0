"""Limiter.call and ConcurrencyManager: retries, cooldowns and token reports, on both backends."""

from __future__ import annotations

import asyncio
import logging
import time
from types import SimpleNamespace
from typing import Any

import httpx2
import openai
import pytest

from limiter import AcquireTimeout, APILimits, ConcurrencyManager, ConfigError
from tests._provider import QUOTA, RATE_LIMITED, URL, _sdk_error
from tests.conftest import LimiterFactory

FAST = {"retry_attempts": 4, "backoff_min": 0.01, "backoff_max": 0.05}


class Flaky:
    """An operation that raises the given errors in turn, then returns "ok"."""

    def __init__(self, *errors: BaseException) -> None:
        self.errors = list(errors)
        self.calls = 0
        self.times: list[float] = []
        self.started = asyncio.Event()

    async def __call__(self) -> str:
        self.calls += 1
        self.started.set()
        self.times.append(time.monotonic())
        if self.errors:
            raise self.errors.pop(0)
        return "ok"


async def test_retryable_failures_are_retried_until_success(make_limiter: LimiterFactory) -> None:
    """Two connection errors then success: three attempts, result returned, 1 success counted."""
    lim = make_limiter({"a": APILimits(max_concurrent=1, **FAST)})
    op = Flaky(ConnectionResetError(), TimeoutError())
    assert await lim.call("a", op) == "ok"
    assert op.calls == 3
    stats = await lim.stats("a")
    assert (stats["successful_requests"], stats["failed_requests"]) == (1, 2)


async def test_attempts_are_bounded(make_limiter: LimiterFactory) -> None:
    """A failure that never ends is tried exactly retry_attempts times, then raised."""
    lim = make_limiter({"a": APILimits(**FAST)})
    op = Flaky(*[ConnectionResetError(str(i)) for i in range(10)])
    with pytest.raises(ConnectionResetError, match="3"):
        await lim.call("a", op)
    assert op.calls == 4


async def test_non_retryable_failures_are_raised_at_once(make_limiter: LimiterFactory) -> None:
    """A 400 or a bug in the operation is raised after one attempt."""
    lim = make_limiter({"a": APILimits(**FAST)})
    op = Flaky(_sdk_error(400, {}, {"error": {"message": "bad", "code": None}}))
    with pytest.raises(openai.BadRequestError):
        await lim.call("a", op)
    assert op.calls == 1
    bug = Flaky(KeyError("oops"))
    with pytest.raises(KeyError):
        await lim.call("a", bug)
    assert bug.calls == 1


async def test_slot_is_released_before_the_backoff_sleep(make_limiter: LimiterFactory) -> None:
    """While an attempt waits to retry, its slot is free for others."""
    lim = make_limiter({"a": APILimits(max_concurrent=1, retry_attempts=2, backoff_min=0.01)})
    op = Flaky(_sdk_error(503, {"retry-after": "0.4"}))
    task = asyncio.create_task(lim.call("a", op))
    await op.started.wait()
    await asyncio.sleep(0.1)  # the first attempt failed; the call now sleeps 0.4 s
    other = await lim.acquire("a", timeout=0)
    await other.release()
    assert await task == "ok"
    assert op.times[1] - op.times[0] >= 0.4, "the provider's Retry-After is honoured"


async def test_429_pauses_the_api_for_every_replica(make_limiter: LimiterFactory) -> None:
    """A 429 with Retry-After sets a cooldown another Limiter on the same Redis honours."""
    lim = make_limiter({"a": APILimits(**FAST)})
    other = make_limiter({"a": APILimits(**FAST)})
    op = Flaky(_sdk_error(429, {"retry-after": "0.5"}, RATE_LIMITED))
    task = asyncio.create_task(lim.call("a", op))
    await op.started.wait()
    await asyncio.sleep(0.02)
    with pytest.raises(AcquireTimeout) as info:
        await other.acquire("a", timeout=0)
    assert info.value.reason == "cooldown"
    assert await task == "ok"
    assert op.times[1] - op.times[0] >= 0.5


async def test_hint_beyond_the_budget_fails_fast(make_limiter: LimiterFactory) -> None:
    """A Retry-After longer than the time left raises the provider's error at once."""
    lim = make_limiter({"a": APILimits(**FAST)})
    op = Flaky(_sdk_error(429, {"retry-after": "30"}, RATE_LIMITED))
    start = time.monotonic()
    with pytest.raises(openai.RateLimitError):
        await lim.call("a", op, timeout=2)
    assert time.monotonic() - start < 1.0
    assert op.calls == 1


async def test_quota_exhausted_is_loud_and_pauses(
    make_limiter: LimiterFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """insufficient_quota is not retried, pauses the API for all, and logs an error."""
    lim = make_limiter({"a": APILimits(retry_attempts=5, backoff_min=0.01, backoff_max=30)})
    op = Flaky(_sdk_error(429, {}, QUOTA))
    with caplog.at_level(logging.ERROR, logger="limiter"), pytest.raises(openai.RateLimitError):
        await lim.call("a", op)
    assert op.calls == 1
    assert any("QUOTA EXHAUSTED" in r.getMessage() for r in caplog.records)
    stats = await lim.stats("a")
    assert 29.0 < stats["cooldown_remaining"] <= 30.0


async def test_side_effect_calls_are_not_retried_after_a_read_timeout(
    make_limiter: LimiterFactory,
) -> None:
    """idempotent=False: a read timeout is raised at once; a refused connection is retried."""
    lim = make_limiter({"a": APILimits(**FAST)})
    request = httpx2.Request("POST", URL)
    op = Flaky(httpx2.ReadTimeout("slow", request=request))
    with pytest.raises(httpx2.ReadTimeout):
        await lim.call("a", op, idempotent=False)
    assert op.calls == 1
    refused = Flaky(httpx2.ConnectError("refused", request=request))
    assert await lim.call("a", refused, idempotent=False) == "ok"
    assert refused.calls == 2


async def test_usage_tokens_are_reported(make_limiter: LimiterFactory) -> None:
    """A result with usage.total_tokens corrects the token reservation."""
    lim = make_limiter({"a": APILimits(tokens_per_minute=1000)})

    async def op() -> Any:
        return SimpleNamespace(usage=SimpleNamespace(total_tokens=42))

    await lim.call("a", op, tokens=500)
    assert (await lim.stats("a"))["windows"]["tokens"]["used"] == 42


async def test_call_logs_like_the_original(
    make_limiter: LimiterFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """A success logs 'OpenAI call completed successfully in N.NNs' with the call's name."""
    lim = make_limiter({"openai": APILimits()})
    with caplog.at_level(logging.INFO, logger="limiter"):
        await lim.call("openai", Flaky(), name="Agent processing for user 42")
    messages = [r.getMessage() for r in caplog.records]
    assert any(
        m.startswith("OpenAI call (Agent processing for user 42) completed successfully in ")
        for m in messages
    ), messages


async def test_unknown_api_in_call(make_limiter: LimiterFactory) -> None:
    """call() on an unknown API raises ConfigError before running anything."""
    lim = make_limiter({"a": APILimits()})
    op = Flaky()
    with pytest.raises(ConfigError, match="unknown API 'b'"):
        await lim.call("b", op)
    assert op.calls == 0


async def test_concurrency_manager_keeps_the_original_api(redis_client: Any) -> None:
    """execute_with_concurrency_control, get_stats and get_cluster_stats behave as before."""
    cm = ConcurrencyManager(redis=redis_client)
    assert cm.api_configs["openai"].max_concurrent == 8
    assert cm.api_configs["zapier"].requests_per_hour == 75

    async def op() -> int:
        await asyncio.sleep(0.01)
        return 7

    assert await cm.execute_with_concurrency_control("openai", op, "Agent for user 1") == 7
    with pytest.raises(KeyError):
        await cm.execute_with_concurrency_control("zapier", Flaky(KeyError("x")), "Zap")
    local = cm.get_stats()
    assert local["openai"]["total_requests"] == 1
    assert local["openai"]["successful_requests"] == 1
    assert local["openai"]["average_response_time"] >= 0.01
    assert local["zapier"]["failed_requests"] == 1
    assert local["zapier"]["success_rate"] == 0.0
    assert set(local["openai"]) == {
        "total_requests",
        "successful_requests",
        "failed_requests",
        "success_rate",
        "average_response_time",
        "concurrent_requests",
    }
    cluster = await cm.get_cluster_stats()
    assert cluster["openai"]["successful_requests"] == 1
    assert cluster["zapier"]["failed_requests"] == 1
    with pytest.raises(ConfigError):
        await cm.execute_with_concurrency_control("nope", op, "x")
    await cm.aclose()
