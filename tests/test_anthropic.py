"""anthropic_client: the real anthropic SDK against the fake Anthropic API, refereed by its record.

The fake (``chatbot.fakes.anthropic_server``) is served by uvicorn in the test's event loop
on 127.0.0.1; the limiters use the session's real redis-server. The multi-process test runs
``tests._anthropic_workers`` processes against the same fake and Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anthropic
import httpx2
import pytest
import redis.asyncio as aioredis

from chatbot.fakes.anthropic_server import (
    FakeAnthropic,
    FakeAnthropicConfig,
    create_app,
    input_tokens,
    rfc3339,
)
from limiter import AcquireTimeout, APILimits, Limiter, LimiterError, Rate
from limiter._retry import classify_exception
from limiter.http import (
    ProviderAuthError,
    anthropic_client,
    anthropic_token_estimate,
)
from limiter.http._anthropic import anthropic_messages_only
from limiter.http._headers import parse_rate_limit_headers
from limiter.http._usage import UsageReader
from limiter.testing import RedisServer
from tests._anthropic_workers import limits_of
from tests._fleet import Fleet, max_overlap
from tests._servers import serve_app

pytestmark = [pytest.mark.redis]

API = "anthropic"
KEY = "sk-ant-test-SECRET-7d1e0c5b9a2f4863"
WRONG = "sk-ant-test-WRONG-00aa11bb22cc33dd"
MODEL = "claude-sonnet-4-5"
FAST = {"backoff_min": 0.01, "backoff_max": 0.05}
HELLO = [{"role": "user", "content": "hello there, fake model"}]

LimiterMaker = Callable[..., Limiter]


@pytest.fixture
async def limiters(real_redis: aioredis.Redis) -> AsyncIterator[LimiterMaker]:
    """``make(**APILimits fields)``: a Limiter of API "anthropic" on the flushed real Redis."""
    made: list[Limiter] = []

    def make(**limits: Any) -> Limiter:
        lim = Limiter(real_redis, {API: APILimits(**limits)})
        made.append(lim)
        return lim

    yield make
    for lim in made:
        await lim.aclose()


@contextlib.asynccontextmanager
async def fake_anthropic(**config: Any) -> AsyncIterator[tuple[str, FakeAnthropic]]:
    """The fake, accepting only KEY, on a free 127.0.0.1 port: its URL and state."""
    app = create_app(FakeAnthropicConfig(api_keys=(KEY,), **config))
    async with serve_app(app, lifespan="off") as served:
        yield served.url, app.state.fake


async def until(lim: Limiter, check: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
    """The API's stats once ``check`` holds (polls Redis: no local event to await); 10 s bound."""
    deadline = time.monotonic() + 10
    while True:
        stats = await lim.stats(API)
        if check(stats):
            return stats
        assert time.monotonic() < deadline, f"never reached: {stats}"
        await asyncio.sleep(0.005)


def statuses(fake: FakeAnthropic) -> list[int | None]:
    return [entry["status"] for entry in fake.snapshot()["requests"]]


# --------------------------------------------------------------------------- calls


async def test_a_call_reserves_then_is_charged_its_usage(limiters: LimiterMaker) -> None:
    """A Messages call reserves max_tokens + the input estimate while in flight; afterwards
    the token window holds exactly its usage (input + output), as the fake counted it."""
    lim = limiters(max_concurrent=2, tokens_per_minute=10_000)
    system = "Be terse."
    sent = json.dumps([system, HELLO], separators=(",", ":"))
    reserve = 300 + len(sent.encode()) // 4 + 1
    async with (
        fake_anthropic(latency=0.3) as (url, fake),
        anthropic_client(lim, base_url=url, api_key=KEY) as client,
    ):
        call = asyncio.create_task(
            client.messages.create(model=MODEL, max_tokens=300, system=system, messages=HELLO)
        )
        held = await until(lim, lambda s: s["concurrent_requests"] == 1)
        message = await call
    assert held["windows"]["tokens"]["used"] == reserve
    assert message.content[0].type == "text"
    assert message.content[0].text == "You said: hello there, fake model"
    usage = message.usage
    record = fake.snapshot()
    (entry,) = record["requests"]
    assert (entry["input_tokens"], entry["output_tokens"]) == (
        usage.input_tokens,
        usage.output_tokens,
    )
    assert usage.input_tokens == input_tokens({"system": system, "messages": HELLO})
    stats = await lim.stats(API)
    assert stats["windows"]["tokens"]["used"] == usage.input_tokens + usage.output_tokens
    assert (stats["successful_requests"], stats["concurrent_requests"]) == (1, 0)


async def test_input_and_output_budgets_are_reserved_and_charged_apart(
    limiters: LimiterMaker,
) -> None:
    """With input and output budgets, a Messages call reserves its input estimate against
    the input budget and max_tokens against the output budget; afterwards each holds
    exactly the usage the fake counted (input_tokens, output_tokens)."""
    lim = limiters(max_concurrent=2, input_tokens_per_minute=5_000, output_tokens_per_minute=900)
    system = "Be terse."
    sent = json.dumps([system, HELLO], separators=(",", ":"))
    estimate = len(sent.encode()) // 4 + 1
    async with (
        fake_anthropic(latency=0.3) as (url, _fake),
        anthropic_client(lim, base_url=url, api_key=KEY) as client,
    ):
        call = asyncio.create_task(
            client.messages.create(model=MODEL, max_tokens=300, system=system, messages=HELLO)
        )
        held = await until(lim, lambda s: s["concurrent_requests"] == 1)
        message = await call
    assert held["windows"]["input_tokens"]["used"] == estimate
    assert held["windows"]["output_tokens"]["used"] == 300
    windows = (await lim.stats(API))["windows"]
    assert windows["input_tokens"] == {"used": message.usage.input_tokens, "limit": 5_000}
    assert windows["output_tokens"] == {"used": message.usage.output_tokens, "limit": 900}


async def test_input_and_output_limits_in_the_headers_lower_those_budgets(
    limiters: LimiterMaker,
) -> None:
    """learn_from_headers: Anthropic's input-tokens and output-tokens limits, below the
    configured budgets, become those budgets' limits in force (source "provider")."""
    lim = limiters(
        input_tokens_per_minute=80_000, output_tokens_per_minute=20_000, learn_from_headers=True
    )
    async with (
        fake_anthropic(itpm=40_000, otpm=8_000) as (url, _fake),
        anthropic_client(lim, base_url=url, api_key=KEY) as client,
    ):
        await client.messages.create(model=MODEL, max_tokens=50, messages=HELLO)
    stats = await lim.stats(API)
    assert stats["windows"]["input_tokens"]["limit"] == 40_000
    assert stats["windows"]["output_tokens"]["limit"] == 8_000
    learned = stats["learned"]
    assert (learned["input_tokens"], learned["output_tokens"]) == (40_000, 8_000)
    assert learned["source"] == "provider"


async def test_streams_hold_their_slot_and_are_charged_their_usage(
    limiters: LimiterMaker,
) -> None:
    """A streamed call holds its slot until its last event and is charged input (from
    message_start) + output (from message_delta); the SDK's stream helper alike."""
    lim = limiters(max_concurrent=1, tokens_per_minute=10_000)
    async with (
        fake_anthropic(chunk_latency=0.01, stream_chunk_chars=4) as (url, fake),
        anthropic_client(lim, base_url=url, api_key=KEY) as client,
    ):
        stream = await client.messages.create(
            model=MODEL, max_tokens=100, messages=HELLO, stream=True
        )
        kinds: list[str] = []
        used_in = used_out = -1
        async for event in stream:
            kinds.append(event.type)
            assert (await lim.stats(API))["concurrent_requests"] == 1
            if event.type == "message_start":
                used_in = event.message.usage.input_tokens
            elif event.type == "message_delta":
                used_out = event.usage.output_tokens
        first = await until(lim, lambda s: s["concurrent_requests"] == 0)
        async with client.messages.stream(model=MODEL, max_tokens=3, messages=HELLO) as helper:
            text = "".join([piece async for piece in helper.text_stream])
            final = await helper.get_final_message()
        second = await until(lim, lambda s: s["concurrent_requests"] == 0)
    deltas = ["content_block_delta"] * math.ceil(len("You said: hello there, fake model") / 4)
    # (the SDK swallows the ping that follows content_block_start)
    assert kinds == [
        "message_start",
        "content_block_start",
        *deltas,
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    assert first["windows"]["tokens"]["used"] == used_in + used_out
    assert (text, final.stop_reason, final.usage.output_tokens) == ("You said: he", "max_tokens", 3)
    charged = final.usage.input_tokens + final.usage.output_tokens
    assert second["windows"]["tokens"]["used"] == used_in + used_out + charged
    record = fake.snapshot()
    assert [e["stream"] for e in record["requests"]] == [True, True]
    assert record["input_tokens"] + record["output_tokens"] == used_in + used_out + charged
    assert record["max_in_flight"] == 1


async def test_a_429_is_retried_after_retry_after_and_pauses_every_replica(
    limiters: LimiterMaker,
) -> None:
    """The fake's 429 (retry-after: 1; its 1 per second used by another application on the
    same key) pauses the API for every replica (another limiter is refused with reason
    "cooldown"), and the call is retried no sooner than 1 s later."""
    lim = limiters(retry_attempts=3, **FAST)
    other = limiters()
    paused = asyncio.Event()
    events: list[tuple[str, dict[str, Any]]] = []

    def listen(event: str, api: str, fields: dict[str, Any]) -> None:
        events.append((event, fields))
        if event == "provider_pause":
            paused.set()

    lim.add_listener(listen)
    async with (
        fake_anthropic(rpm=1, window_seconds=1.0) as (url, fake),
        anthropic_client(lim, base_url=url, api_key=KEY) as client,
        anthropic.AsyncAnthropic(base_url=url, api_key=KEY, max_retries=0) as elsewhere,
    ):
        await elsewhere.messages.create(model=MODEL, max_tokens=20, messages=HELLO)
        call = asyncio.create_task(
            client.messages.create(model=MODEL, max_tokens=20, messages=HELLO)
        )
        await asyncio.wait_for(paused.wait(), 10)
        with pytest.raises(AcquireTimeout) as refused:
            await other.acquire(API, timeout=0)
        message = await call
    assert refused.value.reason == "cooldown"
    assert message.content[0].text == "You said: hello there, fake model"
    record = fake.snapshot()
    first, limited, retried = record["requests"]
    assert [first["status"], limited["status"], retried["status"]] == [200, 429, 200]
    assert limited["reason"] == "requests"
    assert retried["arrival"] - limited["end"] >= 1.0, "retried before retry-after: 1"
    pauses = [f for e, f in events if e == "provider_pause"]
    assert pauses == [{"kind": "rate_limited", "seconds": 1.0}]
    stats = await lim.stats(API)
    assert (stats["successful_requests"], stats["failed_requests"]) == (1, 1)


async def test_a_529_is_retried_after_its_hint_without_pausing(limiters: LimiterMaker) -> None:
    """An injected 529 overloaded_error (retry-after: 1) is retried 1 s later; it pauses no
    replica (another limiter is admitted meanwhile)."""
    lim = limiters(retry_attempts=3, **FAST)
    other = limiters()
    retrying = asyncio.Event()
    kinds: list[str] = []

    def listen(event: str, api: str, fields: dict[str, Any]) -> None:
        if event in ("retry", "provider_pause"):
            kinds.append(f"{event}:{fields['kind']}")
            retrying.set()

    lim.add_listener(listen)
    async with (
        fake_anthropic() as (url, fake),
        anthropic_client(lim, base_url=url, api_key=KEY) as client,
    ):
        fake.overload(1, retry_after=1.0)
        call = asyncio.create_task(
            client.messages.create(model=MODEL, max_tokens=20, messages=HELLO)
        )
        await asyncio.wait_for(retrying.wait(), 10)
        slot = await other.acquire(API, timeout=0)  # no cooldown: admitted at once
        await slot.release()
        message = await call
    assert message.stop_reason == "end_turn"
    overloaded, answered = fake.snapshot()["requests"]
    assert (overloaded["status"], answered["status"]) == (529, 200)
    assert answered["arrival"] - overloaded["end"] >= 1.0, "retried before retry-after: 1"
    assert kinds == ["retry:overloaded"]
    stats = await lim.stats(API)  # cluster-wide: the other limiter's slot counts too
    assert (stats["successful_requests"], stats["failed_requests"]) == (2, 1)
    assert stats["cooldown_remaining"] == 0


async def test_529s_until_the_attempts_run_out_reach_the_sdk(limiters: LimiterMaker) -> None:
    """After retry_attempts 529s the SDK raises its own OverloadedError, slots all returned."""
    lim = limiters(retry_attempts=2, tokens_per_minute=5000, **FAST)
    async with (
        fake_anthropic() as (url, fake),
        anthropic_client(lim, base_url=url, api_key=KEY) as client,
    ):
        fake.overload(2)
        with pytest.raises(anthropic.OverloadedError) as info:
            await client.messages.create(model=MODEL, max_tokens=20, messages=HELLO)
    assert info.value.status_code == 529
    assert statuses(fake) == [529, 529]
    stats = await lim.stats(API)
    assert (stats["failed_requests"], stats["concurrent_requests"]) == (2, 0)
    assert stats["windows"]["tokens"]["used"] == 0  # refused attempts give their tokens back


async def test_a_refused_key_raises_provider_auth_error(
    limiters: LimiterMaker, caplog: pytest.LogCaptureFixture
) -> None:
    """A wrong key is sent once and raises ProviderAuthError (401); neither key is in the
    error, a repr, the fake's record or any DEBUG log line (the SDK's included)."""
    caplog.set_level(logging.DEBUG)
    lim = limiters(retry_attempts=3, **FAST)
    async with (
        fake_anthropic() as (url, fake),
        anthropic_client(lim, base_url=url, api_key=KEY) as good,
        anthropic_client(lim, base_url=url, api_key=WRONG) as bad,
    ):
        await good.messages.create(model=MODEL, max_tokens=20, messages=HELLO)
        with pytest.raises(ProviderAuthError) as info:
            await bad.messages.create(model=MODEL, max_tokens=20, messages=HELLO)
        record = fake.snapshot()
        texts = [str(info.value), repr(info.value), repr(good), repr(bad), json.dumps(record)]
    assert (info.value.api, info.value.status) == (API, 401)
    assert str(info.value) == "Anthropic answered HTTP 401: the API key or token was refused"
    assert info.value.__cause__ is None
    assert (record["requests_total"], record["unauthorized"]) == (2, 1)
    stats = await lim.stats(API)
    assert (stats["successful_requests"], stats["failed_requests"]) == (1, 1)
    assert stats["concurrent_requests"] == 0
    logs = "\n".join(r.getMessage() for r in caplog.records)
    assert "Sending HTTP Request" in logs  # the capture saw the SDK's DEBUG lines
    assert "refused the credentials (HTTP 401)" in logs  # and ours
    assert [t for t in [*texts, logs] if KEY in t or WRONG in t] == []


# --------------------------------------------------------------------------- headers


async def test_requests_remaining_zero_pauses_the_api(
    limiters: LimiterMaker, caplog: pytest.LogCaptureFixture
) -> None:
    """anthropic-ratelimit-requests-remaining: 0 (the fake's 2 per 1 s used up) pauses every
    replica for one request's room: reset / limit, at most 1.001 s / 2."""
    lim = limiters()
    async with (
        fake_anthropic(rpm=2, window_seconds=1.0) as (url, _),
        anthropic_client(lim, base_url=url, api_key=KEY) as client,
    ):
        first = await client.messages.with_raw_response.create(
            model=MODEL, max_tokens=20, messages=HELLO
        )
        assert (await lim.stats(API))["cooldown_remaining"] == 0
        second = await client.messages.with_raw_response.create(
            model=MODEL, max_tokens=20, messages=HELLO
        )
        cooldown = (await lim.stats(API))["cooldown_remaining"]
    assert first.headers["anthropic-ratelimit-requests-remaining"] == "1"
    assert second.headers["anthropic-ratelimit-requests-remaining"] == "0"
    assert 0 < cooldown <= 0.501
    assert any("says no requests are left" in r.getMessage() for r in caplog.records)


async def test_requests_remaining_zero_agreeing_with_our_window_does_not_pause(
    limiters: LimiterMaker,
) -> None:
    """When our own window (2 per 1 s, the fake's) is full too, remaining: 0 adds no pause."""
    lim = limiters(rates=[Rate(2, 1.0)])
    async with (
        fake_anthropic(rpm=2, window_seconds=1.0) as (url, _),
        anthropic_client(lim, base_url=url, api_key=KEY) as client,
    ):
        for _ in range(2):
            await client.messages.create(model=MODEL, max_tokens=20, messages=HELLO)
    assert (await lim.stats(API))["cooldown_remaining"] == 0


def _message(usage: tuple[int, int] = (5, 2)) -> dict[str, Any]:
    return {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "model": MODEL,
        "content": [{"type": "text", "text": "hi"}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": {"input_tokens": usage[0], "output_tokens": usage[1]},
    }


@pytest.mark.parametrize(
    ("kind", "limit", "most"),
    [
        ("requests", None, 1.001),
        ("requests", "4", 0.251),
        ("tokens", None, 1.001),
        ("input-tokens", None, 1.001),
        ("output-tokens", "2", 0.501),
    ],
)
async def test_each_kind_of_remaining_zero_pauses_until_about_its_reset(
    limiters: LimiterMaker, kind: str, limit: str | None, most: float
) -> None:
    """anthropic-ratelimit-<kind>-remaining: 0 with a reset 1 s ahead pauses reset / limit."""
    lim = limiters()
    sent = time.time()
    headers = {
        f"anthropic-ratelimit-{kind}-remaining": "0",
        f"anthropic-ratelimit-{kind}-reset": rfc3339(sent + 1.0),  # ms, rounded up
    }
    if limit is not None:
        headers[f"anthropic-ratelimit-{kind}-limit"] = limit
    inner = httpx2.MockTransport(lambda r: httpx2.Response(200, json=_message(), headers=headers))
    async with anthropic_client(lim, base_url="http://127.0.0.1:9", api_key=KEY, inner=inner) as c:
        await c.messages.create(model=MODEL, max_tokens=20, messages=HELLO)
    cooldown = (await lim.stats(API))["cooldown_remaining"]
    elapsed = time.time() - sent  # the reset was read, and the pause has run, at most this
    assert (1.0 - elapsed) / int(limit or 1) - elapsed - 0.001 <= cooldown <= most


# --------------------------------------------------------------------------- pieces


async def test_without_the_sdk_the_factory_names_its_extra(
    limiters: LimiterMaker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without anthropic installed (simulated), anthropic_client names fleetlimit[anthropic]."""
    lim = limiters()
    monkeypatch.setitem(sys.modules, "anthropic", None)
    with pytest.raises(ImportError) as info:
        anthropic_client(lim, api_key=KEY)
    assert str(info.value) == (
        "anthropic_client needs the 'anthropic' extra (anthropic is not installed): "
        "pip install 'fleetlimit[anthropic]'"
    )
    assert info.value.name == "anthropic"


async def test_sdk_retries_must_stay_off(limiters: LimiterMaker) -> None:
    """max_retries other than 0 is refused: every attempt must pass the limiter."""
    lim = limiters()
    with pytest.raises(LimiterError, match="max_retries must stay 0"):
        anthropic_client(lim, api_key=KEY, max_retries=2)


def _request(method: str, path: str, body: Any = None) -> httpx2.Request:
    content = b"" if body is None else json.dumps(body).encode()
    return httpx2.Request(method, f"http://127.0.0.1:9{path}", content=content)


def test_token_estimate_and_which_requests_count() -> None:
    """The reservation is max_tokens + (system, messages, tools as JSON) / 4 + 1; only
    POST .../v1/messages takes a slot."""
    tools = [{"name": "get_weather", "input_schema": {"type": "object"}}]
    body = {"model": MODEL, "max_tokens": 500, "system": "s", "messages": HELLO, "tools": tools}
    text = json.dumps(["s", HELLO, tools], separators=(",", ":"))
    assert anthropic_token_estimate(_request("POST", "/v1/messages", body)) == (
        500 + len(text) // 4 + 1
    )
    no_cap = {"messages": HELLO, "max_tokens": True}
    text = json.dumps([HELLO], separators=(",", ":"))
    assert anthropic_token_estimate(_request("POST", "/v1/messages", no_cap)) == len(text) // 4 + 1
    assert anthropic_token_estimate(_request("GET", "/v1/models")) == 0
    assert anthropic_messages_only(_request("POST", "/v1/messages", body))
    assert anthropic_messages_only(_request("POST", "/proxy/v1/messages/", body))
    assert not anthropic_messages_only(_request("POST", "/v1/messages/count_tokens", body))
    assert not anthropic_messages_only(_request("POST", "/v1/messages/batches", body))
    assert not anthropic_messages_only(_request("GET", "/v1/models"))


async def test_counting_tokens_takes_no_slot(limiters: LimiterMaker) -> None:
    """messages.count_tokens passes unlimited (the fake has no such route: a 404)."""
    lim = limiters(max_concurrent=1)
    async with (
        fake_anthropic() as (url, _),
        anthropic_client(lim, base_url=url, api_key=KEY) as client,
    ):
        with pytest.raises(anthropic.NotFoundError):
            await client.messages.count_tokens(model=MODEL, messages=HELLO)
    assert (await lim.stats(API))["total_requests"] == 0


def _sse(events: list[dict[str, Any]]) -> bytes:
    return b"".join(f"event: {e['type']}\ndata: {json.dumps(e)}\n\n".encode() for e in events)


def test_usage_reader_reads_anthropic_bodies_and_streams_in_any_chunks() -> None:
    """Anthropic usage counts input (+ cache writes) + output, from JSON or a stream split
    anywhere; a stream cut before message_delta stays unknown."""
    usage = {
        "input_tokens": 7,
        "output_tokens": 3,
        "cache_creation_input_tokens": 2,
        "cache_read_input_tokens": 50,  # not counted by Anthropic's input budget
    }
    body = json.dumps(_message() | {"usage": usage}).encode()
    start = {"type": "message_start", "message": _message((25, 1))}
    delta = {"type": "message_delta", "delta": {}, "usage": {"output_tokens": 15}}
    stream = _sse([start, {"type": "ping"}, delta, {"type": "message_stop"}])
    for size in range(1, 40):
        json_reader = UsageReader("application/json")
        sse_reader = UsageReader("text/event-stream")
        for i in range(0, max(len(body), len(stream)), size):
            json_reader.feed(body[i : i + size])
            sse_reader.feed(stream[i : i + size])
        assert (json_reader.finish(), sse_reader.finish()) == (12, 40), size
    cut = UsageReader("text/event-stream")
    cut.feed(_sse([start]))
    assert cut.finish() is None


def _sdk_error(status: int, body: Any, headers: dict[str, str] | None = None) -> Exception:
    """The exception the anthropic SDK itself raises for this response."""
    client = anthropic.Anthropic(api_key="sk-ant-not-a-secret", base_url="http://127.0.0.1:9")
    request = httpx2.Request("POST", "http://127.0.0.1:9/v1/messages")
    response = httpx2.Response(status, json=body, headers=headers, request=request)
    error = client._make_status_error_from_response(response)
    client.close()
    return error


def test_anthropic_errors_are_classified() -> None:
    """529 overloaded_error: retried, kind "overloaded", no pause (not with side effects);
    429 rate_limit_error: retried with its retry-after, and pauses the API."""
    overloaded = _sdk_error(529, {"type": "error", "error": {"type": "overloaded_error"}})
    assert isinstance(overloaded, anthropic.OverloadedError)
    verdict = classify_exception(overloaded)
    assert (verdict.retry, verdict.kind, verdict.pauses_api) == (True, "overloaded", False)
    assert not classify_exception(overloaded, idempotent=False).retry
    body = {"type": "error", "error": {"type": "rate_limit_error", "message": "slow down"}}
    limited = classify_exception(_sdk_error(429, body, {"retry-after": "7"}))
    assert (limited.retry, limited.kind, limited.retry_after) == (True, "rate_limited", 7.0)
    assert (limited.pauses_api, limited.code) == (True, "rate_limit_error")


# --------------------------------------------------------------------------- the fake


async def test_the_fake_speaks_x_api_key_and_sends_exact_headers() -> None:
    """x-api-key is accepted, anthropic-version required; every answer carries the limits
    in force, remaining tokens rounded to thousands, resets as RFC 3339."""
    config = {"rpm": 3, "itpm": 10_000, "otpm": 2_000, "window_seconds": 2.0}
    async with fake_anthropic(**config) as (url, fake), httpx2.AsyncClient() as http:
        body = {"model": MODEL, "max_tokens": 1200, "messages": HELLO}
        headers = {"x-api-key": KEY, "anthropic-version": "2023-06-01"}
        before = time.time()
        ok = await http.post(f"{url}/v1/messages", json=body, headers=headers)
        after = time.time()
        no_version = await http.post(f"{url}/v1/messages", json=body, headers={"x-api-key": KEY})
        bad = await http.post(f"{url}/v1/messages", json=body, headers={"x-api-key": WRONG})
    assert ok.status_code == 200
    assert ok.headers["request-id"].startswith("req_")
    charged_in = input_tokens(body)
    expected = {
        "anthropic-ratelimit-requests-limit": "3",
        "anthropic-ratelimit-requests-remaining": "2",
        "anthropic-ratelimit-input-tokens-limit": "10000",
        "anthropic-ratelimit-input-tokens-remaining": "10000",  # 9990 and more: 10000
        "anthropic-ratelimit-output-tokens-limit": "2000",
        "anthropic-ratelimit-output-tokens-remaining": "1000",  # 800 rounds to 1000
        "anthropic-ratelimit-tokens-limit": "2000",  # the output limit is the tighter one
        "anthropic-ratelimit-tokens-remaining": "1000",
    }
    assert {k: ok.headers[k] for k in expected} == expected
    assert charged_in < 500
    parsed = parse_rate_limit_headers(ok.headers, now=lambda: before)
    for reset, window in ((parsed.requests.reset, 2.0), (parsed.input_tokens.reset, 60.0)):
        assert reset is not None
        assert window <= reset <= window + 0.001 + (after - before)
    assert no_version.status_code == 400
    assert no_version.json()["error"]["type"] == "invalid_request_error"
    assert bad.status_code == 401
    assert bad.json()["error"] == {"type": "authentication_error", "message": "invalid x-api-key"}
    record = fake.snapshot()
    first = record["requests"][0]
    assert first["arrival"] <= first["start"] <= first["end"]
    assert (first["input_tokens"], first["max_tokens"], first["status"]) == (
        charged_in,
        1200,
        200,
    )
    assert (record["bad_requests"], record["unauthorized"], record["admitted"]) == (1, 1, 1)


# --------------------------------------------------------------------------- processes


class AnthropicFleet(Fleet):
    """A :class:`Fleet` whose workers run ``tests._anthropic_workers``."""

    module = "tests._anthropic_workers"
    defaults: dict[str, Any] = {"api": API}  # noqa: RUF012


@pytest.fixture
def fleet(
    redis_server: RedisServer, real_redis: aioredis.Redis, tmp_path: Path
) -> Iterator[AnthropicFleet]:
    """Start workers through this; each one is killed (if alive) and reaped afterwards."""
    f = AnthropicFleet(redis_server.url, real_redis, tmp_path)
    try:
        yield f
    finally:
        f.close()


@dataclass(frozen=True)
class Scenario:
    """Limits shared by the limiter and the fake, and the load of 2 processes x 4 tasks."""

    #: The limiter's max_concurrent and the fake's max_in_flight.
    in_flight: int
    #: Requests per rolling second, for both (None: no such limit).
    per_second: int | None
    #: The limiter's tokens_per_minute, the fake's input and its output tokens per minute.
    tokens: int
    #: Calls per task, and their max_tokens.
    calls: int
    max_tokens: int
    #: The most the fake must see in flight, exactly (the limit that binds it).
    most_in_flight: int


SCENARIOS = {
    # 32 calls reserving 313-325 tokens each and using 948 in all: concurrency and the
    # 1 s window bind (and are reached).
    "concurrency-and-rate": Scenario(3, 6, 1800, 4, 300, most_in_flight=3),
    # 24 calls reserving 613-625 each (using 684 in all) under 1400 tokens: at most 2 fit
    # at once, so the token budget, not concurrency (8), holds the fake at 2 in flight.
    "tokens": Scenario(8, None, 1400, 3, 600, most_in_flight=2),
}


@pytest.mark.multiprocess
@pytest.mark.parametrize("scenario", SCENARIOS.values(), ids=SCENARIOS.keys())
async def test_processes_sharing_the_limits_never_exceed_the_fake(
    fleet: AnthropicFleet, scenario: Scenario
) -> None:
    """2 processes x 4 tasks (every other call streamed), with the fake's own limits: the
    fake saw exactly the bound of the limit that binds in flight, at most its requests per
    rolling second (reached), at most its input and output tokens per rolling minute, and
    not one 429; the cluster's token window ends at the exact usage of every call."""
    s = scenario
    limits: dict[str, Any] = {
        "max_concurrent": s.in_flight,
        "rates": [[s.per_second, 1.0]] if s.per_second else [],
        "window_margin": 0.25,
        "tokens_per_minute": s.tokens,
        "retry_attempts": 3,
        "backoff_min": 0.05,
        "backoff_max": 0.2,
        "lease_ttl": 10.0,
        "acquire_timeout": 30.0,
    }
    config = {
        "max_in_flight": s.in_flight,
        "rpm": s.per_second,
        "window_seconds": 1.0,
        "itpm": s.tokens,
        "otpm": s.tokens,
        "latency": 0.05,
        "chunk_latency": 0.005,
    }
    names = ["p0", "p1"]
    n = len(names) * 4 * s.calls
    async with fake_anthropic(**config) as (url, fake):
        for name in names:
            fleet.start(
                "messages",
                name,
                base_url=url,
                key=KEY,
                model=MODEL,
                limits=limits,
                tasks=4,
                calls=s.calls,
                max_tokens=s.max_tokens,
            )
        await fleet.ready(len(names))
        await fleet.go(*names)
        reports = [await fleet.result(name, within=60) for name in names]
        record = fake.snapshot()
    errors = [e for r in reports for e in r["errors"]]
    assert errors == [], "\n\n".join(errors)
    calls = [c for r in reports for c in r["calls"]]
    assert len(calls) == n
    assert record["rejected_total"] == 0, record["rejections"]
    assert (record["overloaded"], record["unauthorized"], record["in_flight"]) == (0, 0, 0)
    assert record["admitted"] == record["completed"] == n
    spans = [(e["start"], e["end"]) for e in record["requests"]]
    assert record["max_in_flight"] == max_overlap(spans) == s.most_in_flight
    if s.per_second is not None:
        assert record["max_requests_in_window"] == s.per_second
    assert record["max_input_tokens_in_window"] <= s.tokens
    assert record["max_output_tokens_in_window"] <= s.tokens
    used = sum(c["input"] + c["output"] for c in calls)
    assert record["input_tokens"] + record["output_tokens"] == used
    async with Limiter(fleet.client, {API: limits_of(limits)}) as watcher:
        stats = await watcher.stats(API)
    assert stats["windows"]["tokens"] == {"used": used, "limit": s.tokens}
    assert (stats["successful_requests"], stats["failed_requests"]) == (n, 0)
    if s.most_in_flight < s.in_flight:
        assert stats["refusals"].get("tokens", 0) > 0, "the token budget held no call back"
    assert [w for r in reports for w in r["warnings"] if "429" in w] == []
