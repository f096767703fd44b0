"""LimitedTransport under the real openai SDK and plain httpx, with a scripted inner transport."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import httpx2
import openai
import pytest

from limiter import APILimits, ConfigError, Rate
from limiter.http import (
    LimitedTransport,
    mcp_tools_call_only,
    openai_client,
    openai_token_estimate,
)
from tests._provider import QUOTA, RATE_LIMITED
from tests.conftest import LimiterFactory

BASE = "http://127.0.0.1:9/v1"
FAST = {"backoff_min": 0.01, "backoff_max": 0.05}


def completion(total_tokens: int = 7) -> dict[str, Any]:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1,
        "model": "gpt-4o-mini",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "hi"},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": total_tokens},
    }


class Script:
    """An inner transport answering from a list of handlers, one per request."""

    def __init__(self, *answers: Callable[[httpx2.Request], httpx2.Response]) -> None:
        self.answers = list(answers)
        self.requests: list[httpx2.Request] = []
        self.mock = httpx2.MockTransport(self._handle)

    def _handle(self, request: httpx2.Request) -> httpx2.Response:
        self.requests.append(request)
        return self.answers.pop(0)(request)


def ok(total_tokens: int = 7) -> Callable[[httpx2.Request], httpx2.Response]:
    return lambda request: httpx2.Response(200, json=completion(total_tokens))


def status(
    code: int, body: Any = None, headers: dict[str, str] | None = None
) -> Callable[[httpx2.Request], httpx2.Response]:
    return lambda request: httpx2.Response(code, json=body or {}, headers=headers)


async def chat(client: openai.AsyncOpenAI, max_tokens: int = 50) -> Any:
    return await client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hello"}], max_tokens=max_tokens
    )


async def test_429_is_retried_and_pauses_the_api(make_limiter: LimiterFactory) -> None:
    """A 429 is retried after its Retry-After, and sets a cooldown for every replica."""
    lim = make_limiter({"openai": APILimits(max_concurrent=2, **FAST)})
    script = Script(status(429, RATE_LIMITED, {"retry-after-ms": "150"}), ok())
    client = openai_client(lim, base_url=BASE, api_key="sk-test", inner=script.mock)
    answer = await chat(client)
    assert answer.choices[0].message.content == "hi"
    assert len(script.requests) == 2
    stats = await lim.stats("openai")
    assert (stats["successful_requests"], stats["failed_requests"]) == (1, 1)
    assert stats["concurrent_requests"] == 0


async def test_attempts_run_out_and_the_sdk_sees_the_429(make_limiter: LimiterFactory) -> None:
    """After retry_attempts 429s the SDK raises its own RateLimitError with the headers."""
    lim = make_limiter({"openai": APILimits(retry_attempts=2, **FAST)})
    answers = [status(429, RATE_LIMITED, {"retry-after-ms": "10"}) for _ in range(2)]
    script = Script(*answers)
    client = openai_client(lim, base_url=BASE, api_key="sk-test", inner=script.mock)
    with pytest.raises(openai.RateLimitError) as info:
        await chat(client)
    assert info.value.response.headers["retry-after-ms"] == "10"
    assert len(script.requests) == 2


@pytest.mark.parametrize(
    ("code", "body", "error"),
    [
        (400, {"error": {"message": "bad", "code": None}}, openai.BadRequestError),
        (401, {"error": {"message": "no", "code": "invalid_api_key"}}, openai.AuthenticationError),
        (429, QUOTA, openai.RateLimitError),
    ],
)
async def test_never_retried_answers(
    make_limiter: LimiterFactory, code: int, body: Any, error: type[Exception]
) -> None:
    """400, 401 and insufficient_quota are sent once and raised by the SDK as they are."""
    lim = make_limiter({"openai": APILimits(retry_attempts=5, **FAST)})
    script = Script(status(code, body))
    client = openai_client(lim, base_url=BASE, api_key="sk-test", inner=script.mock)
    with pytest.raises(error):
        await chat(client)
    assert len(script.requests) == 1
    assert (await lim.stats("openai"))["concurrent_requests"] == 0


async def test_tokens_reserved_then_reconciled(make_limiter: LimiterFactory) -> None:
    """A chat request reserves its max_tokens and is charged its real usage afterwards."""
    lim = make_limiter({"openai": APILimits(tokens_per_minute=1000)})
    script = Script(ok(total_tokens=42))
    client = openai_client(lim, base_url=BASE, api_key="sk-test", inner=script.mock)
    await chat(client, max_tokens=300)
    assert (await lim.stats("openai"))["windows"]["tokens"]["used"] == 42


async def test_refused_attempt_gives_its_tokens_back(make_limiter: LimiterFactory) -> None:
    """A 429'd attempt is not charged: only the successful attempt's usage counts."""
    lim = make_limiter({"openai": APILimits(tokens_per_minute=1000, **FAST)})
    script = Script(status(429, RATE_LIMITED, {"retry-after-ms": "10"}), ok(total_tokens=9))
    client = openai_client(lim, base_url=BASE, api_key="sk-test", inner=script.mock)
    await chat(client, max_tokens=300)
    assert (await lim.stats("openai"))["windows"]["tokens"]["used"] == 9


async def test_remaining_zero_pauses_until_reset(make_limiter: LimiterFactory) -> None:
    """x-ratelimit-remaining-requests: 0 pauses the API for every replica until the reset."""
    lim = make_limiter({"openai": APILimits()})
    headers = {"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "1s"}
    script = Script(lambda r: httpx2.Response(200, json=completion(), headers=headers))
    client = openai_client(lim, base_url=BASE, api_key="sk-test", inner=script.mock)
    await chat(client)
    assert 0.9 < (await lim.stats("openai"))["cooldown_remaining"] <= 1.0


class SlowStream(httpx2.AsyncByteStream):
    """An SSE body that yields its events slowly; records whether it was closed."""

    def __init__(self, events: list[bytes], gap: float) -> None:
        self.events = events
        self.gap = gap
        self.closed = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for event in self.events:
            await asyncio.sleep(self.gap)
            yield event

    async def aclose(self) -> None:
        self.closed = True


class StreamingInner(httpx2.AsyncBaseTransport):
    def __init__(self, stream: SlowStream) -> None:
        self.stream = stream

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        headers = {"content-type": "text/event-stream"}
        return httpx2.Response(200, headers=headers, stream=self.stream)


def sse(chunks: list[dict[str, Any]]) -> list[bytes]:
    return [f"data: {json.dumps(c)}\n\n".encode() for c in chunks] + [b"data: [DONE]\n\n"]


def chunk(content: str | None, usage: int | None = None) -> dict[str, Any]:
    choices = [] if content is None else [{"index": 0, "delta": {"content": content}}]
    out: dict[str, Any] = {
        "id": "c",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "m",
        "choices": choices,
    }
    if usage is not None:
        out["usage"] = {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": usage}
    return out


async def test_stream_holds_the_slot_until_closed(make_limiter: LimiterFactory) -> None:
    """A streamed completion holds its slot until the stream ends, then is charged its usage."""
    lim = make_limiter({"openai": APILimits(max_concurrent=1, tokens_per_minute=1000)})
    body = SlowStream(sse([chunk("a"), chunk("b"), chunk(None, usage=33)]), gap=0.05)
    client = openai_client(lim, base_url=BASE, api_key="sk-test", inner=StreamingInner(body))
    stream = await client.chat.completions.create(
        model="m",
        messages=[{"role": "user", "content": "hi"}],
        stream=True,
        stream_options={"include_usage": True},
        max_tokens=200,
    )
    seen = []
    async for part in stream:
        seen.append(part)
        assert (await lim.stats("openai"))["concurrent_requests"] == 1
    assert body.closed
    stats = await lim.stats("openai")
    assert stats["concurrent_requests"] == 0
    assert stats["windows"]["tokens"]["used"] == 33
    assert len(seen) == 3


async def test_cancelled_stream_releases(make_limiter: LimiterFactory) -> None:
    """A consumer cancelled mid-stream gives the slot back."""
    lim = make_limiter({"openai": APILimits(max_concurrent=1)})
    body = SlowStream(sse([chunk("a")] * 50), gap=0.02)
    client = openai_client(lim, base_url=BASE, api_key="sk-test", inner=StreamingInner(body))
    started = asyncio.Event()

    async def consume() -> None:
        stream = await client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "hi"}], stream=True
        )
        async with stream:
            async for _ in stream:
                started.set()

    task = asyncio.create_task(consume())
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    slot = await lim.acquire("openai", timeout=1)
    await slot.release()


async def test_plain_httpx_client(make_limiter: LimiterFactory) -> None:
    """The same transport works under a plain httpx.AsyncClient."""
    lim = make_limiter({"svc": APILimits(max_concurrent=1)})
    inner = httpx.MockTransport(lambda request: httpx.Response(200, json={"ok": True}))
    async with httpx.AsyncClient(transport=LimitedTransport(lim, "svc", inner)) as client:
        response = await client.get("http://127.0.0.1:9/x")
    assert response.json() == {"ok": True}
    stats = await lim.stats("svc")
    assert (stats["successful_requests"], stats["concurrent_requests"]) == (1, 0)


async def test_side_effects_are_not_retried_after_a_read_timeout(
    make_limiter: LimiterFactory,
) -> None:
    """idempotent=False: a read timeout is raised at once, a refused connection retried."""
    lim = make_limiter({"zapier": APILimits(retry_attempts=3, **FAST)})
    calls: list[str] = []

    def handler(request: httpx2.Request) -> httpx2.Response:
        calls.append(request.url.path)
        if request.url.path == "/slow":
            raise httpx2.ReadTimeout("slow", request=request)
        if len(calls) == 2:
            raise httpx2.ConnectError("refused", request=request)
        return httpx2.Response(200, json={})

    transport = LimitedTransport(lim, "zapier", httpx2.MockTransport(handler), idempotent=False)
    async with httpx2.AsyncClient(transport=transport) as client:
        with pytest.raises(httpx2.ReadTimeout):
            await client.post("http://127.0.0.1:9/slow")
        assert calls == ["/slow"]
        response = await client.post("http://127.0.0.1:9/act")
    assert response.status_code == 200
    assert calls == ["/slow", "/act", "/act"]


def _request(method: str, body: Any = None) -> httpx2.Request:
    content = b"" if body is None else json.dumps(body).encode()
    return httpx2.Request(method, "http://127.0.0.1:9/mcp", content=content)


def test_only_mcp_tool_calls_are_limited() -> None:
    """tools/call costs a task; initialize, tools/list, notifications, GET and DELETE do not."""
    call = {"jsonrpc": "2.0", "id": 3, "method": "tools/call", "params": {"name": "x"}}
    assert mcp_tools_call_only(_request("POST", call))
    assert mcp_tools_call_only(_request("POST", [call]))
    for method in ("initialize", "tools/list", "notifications/initialized"):
        assert not mcp_tools_call_only(_request("POST", {"jsonrpc": "2.0", "method": method}))
    assert not mcp_tools_call_only(_request("GET"))
    assert not mcp_tools_call_only(_request("DELETE"))
    assert not mcp_tools_call_only(_request("POST", None))


def test_token_estimate() -> None:
    """Reservation is the larger of the output cap and the input estimate."""
    small = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 500}
    assert openai_token_estimate(_request("POST", small)) == 500
    big = {"model": "m", "messages": [{"role": "user", "content": "x" * 4000}], "max_tokens": 10}
    assert 1000 <= openai_token_estimate(_request("POST", big)) <= 1020
    assert openai_token_estimate(_request("GET")) == 0


async def test_unknown_api_is_refused_at_construction(make_limiter: LimiterFactory) -> None:
    """A transport for an API the limiter does not know fails at once."""
    lim = make_limiter({"openai": APILimits()})
    with pytest.raises(ConfigError, match="unknown API"):
        LimitedTransport(lim, "opneai")


async def test_remaining_zero_agreeing_with_our_window_does_not_pause(
    make_limiter: LimiterFactory,
) -> None:
    """When our own window is full too, remaining: 0 adds no pause (our window knows better)."""
    lim = make_limiter({"openai": APILimits(rates=[Rate(1, 5.0)])})
    headers = {"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "5s"}
    script = Script(lambda r: httpx2.Response(200, json=completion(), headers=headers))
    client = openai_client(lim, base_url=BASE, api_key="sk-test", inner=script.mock)
    await chat(client)
    assert (await lim.stats("openai"))["cooldown_remaining"] == 0
