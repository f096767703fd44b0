"""The response cache of ``openai_client``: the real openai SDK against the fake OpenAI on
127.0.0.1, the cache in fakeredis and in a real redis-server.

What reaches the provider is read twice: from the fake's own record (``requests_total``)
and from :class:`Recorder`, the inner transport that really sends (so the headers as sent
can be checked too).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import math
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import httpx2
import openai
import pytest
import redis.asyncio as aioredis
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

import limiter.http._cache as cache_module
from chatbot.fakes.openai_server import FakeOpenAIConfig
from chatbot.metrics import Metrics
from limiter import APILimits, ConfigError, Limiter
from limiter.http import ResponseCache, openai_client, zapier_mcp
from limiter.http._cache import cache_material, storable_answer
from limiter.testing import RedisServer
from tests._servers import Running, serve_app, serve_fake_openai
from tests.conftest import LimiterFactory
from tests.test_security import LIMITER_ACL, LIMITER_ACL_62

#: The only key the fake accepts; searched for in every Redis key and value.
KEY = "sk-cachetest-SECRET-7d41c9e02b5a"
MODEL = "gpt-4o-mini"
EMBEDDING_MODEL = "text-embedding-3-small"
MESSAGES = [{"role": "user", "content": "hello cache"}]
LIMITS = {
    "openai": APILimits(
        max_concurrent=4, retry_attempts=1, backoff_min=0.01, backoff_max=0.05, lease_ttl=5.0
    )
}
ENTRY = re.compile(r"limiter:cache:\{openai\}:[0-9a-f]{64}")
EMAIL_TOOL: Any = {
    "type": "function",
    "function": {
        "name": "send_email",
        "parameters": {"type": "object", "properties": {"to": {"type": "string"}}},
    },
}
#: The same tool as the Responses API spells it, and the choices that force a call to it.
RESPONSES_EMAIL_TOOL: Any = {"type": "function", **EMAIL_TOOL["function"]}
SEND_EMAIL_CHOICE: Any = {"type": "function", "function": {"name": "send_email"}}
RESPONSES_SEND_EMAIL_CHOICE: Any = {"type": "function", "name": "send_email"}
#: A message the fake answers with a call to ``send_email`` when offered it (its name's
#: keyword ``email``); ``MESSAGES`` it answers with text, tools offered or not.
EMAIL_MESSAGES = [{"role": "user", "content": "please email ana@example.com"}]


class Recorder(httpx2.AsyncBaseTransport):
    """httpx2's own transport, recording every request it really sends."""

    def __init__(self) -> None:
        self.sent: list[httpx2.Request] = []
        self._inner = httpx2.AsyncHTTPTransport()

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        self.sent.append(request)
        return await self._inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self._inner.aclose()


@dataclass
class Client:
    """An openai_client with a cache, the limiter under it and what it really sent."""

    lim: Limiter
    sdk: openai.AsyncOpenAI
    recorder: Recorder


@pytest.fixture
async def fake() -> AsyncIterator[Running]:
    async with serve_fake_openai(FakeOpenAIConfig(api_keys=(KEY,))) as run:
        yield run


ClientFactory = Callable[..., Client]


@pytest.fixture
async def make_client(make_limiter: LimiterFactory, fake: Running) -> AsyncIterator[ClientFactory]:
    """``make_client(cache=..., lim=None, base_url=None)``: closed after the test."""
    made: list[Client] = []

    def factory(
        cache: ResponseCache | None, lim: Limiter | None = None, base_url: str | None = None
    ) -> Client:
        lim = lim or make_limiter(LIMITS)
        recorder = Recorder()
        sdk = openai_client(
            lim,
            base_url=base_url or f"{fake.url}/v1",
            api_key=KEY,
            inner=recorder,
            cache=cache,
        )
        made.append(client := Client(lim, sdk, recorder))
        return client

    yield factory
    for client in made:
        await client.sdk.close()


def reached(fake: Running) -> int:
    """Requests the fake received."""
    return int(fake.fake.snapshot(detail=False)["requests_total"])


async def chat(client: Client | openai.AsyncOpenAI, **kwargs: Any) -> Any:
    """A raw chat completion (its ``content`` is the body's bytes)."""
    sdk = client.sdk if isinstance(client, Client) else client
    kwargs.setdefault("messages", MESSAGES)
    return await sdk.chat.completions.with_raw_response.create(model=MODEL, **kwargs)


async def entries(redis: Any) -> list[str]:
    """The cache entries in Redis (not the counters)."""
    keys = [k.decode() async for k in redis.scan_iter(match="limiter:cache:*")]
    return sorted(k for k in keys if ENTRY.fullmatch(k))


def totals(stats: dict[str, Any]) -> tuple[int, int, int, int]:
    return (
        stats["total_requests"],
        stats["successful_requests"],
        stats["failed_requests"],
        stats["concurrent_requests"],
    )


# -- hits ---------------------------------------------------------------------------------


async def test_a_repeat_is_answered_from_redis(
    make_client: ClientFactory, fake: Running, redis_client: Any
) -> None:
    """A repeated temperature-0 chat gets the first answer's exact bytes and content type,
    without reaching the provider or taking a slot; stats count one miss and one hit."""
    client = make_client(ResponseCache())
    first = await chat(client, temperature=0)
    before = await client.lim.stats("openai")
    second = await chat(client, temperature=0)
    after = await client.lim.stats("openai")

    assert second.content == first.content
    assert second.headers["content-type"] == first.headers["content-type"] == "application/json"
    assert second.headers["x-fleetlimit-cache"] == "hit"
    assert "x-fleetlimit-cache" not in first.headers
    assert second.parse().choices[0].message.content == "You said: hello cache"
    assert reached(fake) == 1
    assert len(client.recorder.sent) == 1
    assert totals(before) == totals(after) == (1, 1, 0, 0)
    assert before["cache"] == {"hits": 0, "misses": 1}
    assert after["cache"] == {"hits": 1, "misses": 1}
    assert len(await entries(redis_client)) == 1


async def test_embeddings_are_cached(make_client: ClientFactory, fake: Running) -> None:
    """Embeddings are deterministic: a repeat is a hit with the same bytes, no temperature
    needed."""
    client = make_client(ResponseCache())

    async def embed() -> Any:
        return await client.sdk.embeddings.with_raw_response.create(
            model=EMBEDDING_MODEL, input="cache me"
        )

    first, second = await embed(), await embed()
    assert second.content == first.content
    assert second.headers["x-fleetlimit-cache"] == "hit"
    assert reached(fake) == 1
    assert (await client.lim.stats("openai"))["cache"] == {"hits": 1, "misses": 1}


async def test_responses_without_store_are_cached(
    make_client: ClientFactory, fake: Running
) -> None:
    """A temperature-0 Responses request with ``store: false`` is a hit on its repeat."""
    client = make_client(ResponseCache())

    async def respond() -> Any:
        return await client.sdk.responses.with_raw_response.create(
            model=MODEL, input="hello responses", temperature=0, store=False
        )

    first, second = await respond(), await respond()
    assert second.content == first.content
    assert second.parse().output_text == "You said: hello responses"
    assert reached(fake) == 1


async def test_the_opt_in_header_caches_and_is_not_sent(
    make_client: ClientFactory, fake: Running
) -> None:
    """``x-fleetlimit-cache: 1`` caches a temperature-0.7 request, and never reaches the
    provider; the same request without it is not answered from the cache."""
    client = make_client(ResponseCache())
    opt_in = {"extra_headers": {"x-fleetlimit-cache": "1"}}
    first = await chat(client, temperature=0.7, **opt_in)
    second = await chat(client, temperature=0.7, **opt_in)
    assert second.content == first.content
    assert reached(fake) == 1
    without = await chat(client, temperature=0.7)
    assert without.content != first.content  # a new completion id: the provider's answer
    assert reached(fake) == 2
    assert [r.headers.get("x-fleetlimit-cache") for r in client.recorder.sent] == [None, None]
    assert (await client.lim.stats("openai"))["cache"] == {"hits": 1, "misses": 1}


async def test_replicas_share_entries_and_counts(
    make_limiter: LimiterFactory, make_client: ClientFactory, fake: Running
) -> None:
    """What one replica stored answers another; both replicas' stats show every lookup."""
    a = make_client(ResponseCache(), lim=make_limiter(LIMITS))
    b = make_client(ResponseCache(), lim=make_limiter(LIMITS))
    first = await chat(a, temperature=0)
    second = await chat(b, temperature=0)
    assert second.content == first.content
    assert reached(fake) == 1
    assert len(b.recorder.sent) == 0
    for client in (a, b):
        assert (await client.lim.stats("openai"))["cache"] == {"hits": 1, "misses": 1}


# -- never answered from the cache -----------------------------------------------------


async def _twice(client: Client, call: Callable[[Client], Awaitable[Any]]) -> None:
    for _ in range(2):
        await call(client)


async def _stream(client: Client) -> None:
    stream = await client.sdk.chat.completions.create(
        model=MODEL, messages=MESSAGES, temperature=0, stream=True
    )
    assert [c async for c in stream]


async def _respond(client: Client, **kwargs: Any) -> None:
    await client.sdk.responses.create(model=MODEL, input="hi", temperature=0, **kwargs)


NEVER_LOOKED_UP: dict[str, Callable[[Client], Awaitable[Any]]] = {
    "temperature above 0": lambda c: chat(c, temperature=0.7),
    "no temperature": chat,
    "stream": _stream,
    "tool_choice required": lambda c: chat(
        c, temperature=0, tools=[EMAIL_TOOL], tool_choice="required"
    ),
    "tool_choice any": lambda c: chat(c, temperature=0, tools=[EMAIL_TOOL], tool_choice="any"),
    "tool_choice a named function": lambda c: chat(
        c, temperature=0, tools=[EMAIL_TOOL], tool_choice=SEND_EMAIL_CHOICE
    ),
    "function_call a named function": lambda c: chat(
        c,
        temperature=0,
        functions=[EMAIL_TOOL["function"]],
        function_call={"name": "send_email"},
    ),
    "responses tool_choice a named function": lambda c: _respond(
        c, store=False, tools=[RESPONSES_EMAIL_TOOL], tool_choice=RESPONSES_SEND_EMAIL_CHOICE
    ),
    "responses tool_choice required": lambda c: _respond(
        c, store=False, tools=[RESPONSES_EMAIL_TOOL], tool_choice="required"
    ),
    "chat store": lambda c: chat(c, temperature=0, store=True),
    "query string": lambda c: chat(c, temperature=0, extra_query={"api-version": "1"}),
    "opted out": lambda c: chat(c, temperature=0, extra_headers={"x-fleetlimit-cache": "0"}),
    "previous_response_id": lambda c: _respond(c, store=False, previous_response_id="resp_1"),
    "responses store true": lambda c: _respond(c, store=True),
    "responses store absent": _respond,
}


@pytest.mark.parametrize("case", NEVER_LOOKED_UP)
async def test_requests_the_cache_never_answers(
    case: str, make_client: ClientFactory, fake: Running, redis_client: Any
) -> None:
    """Each of these requests reaches the provider every time: no lookup, no entry."""
    client = make_client(ResponseCache())
    await _twice(client, NEVER_LOOKED_UP[case])
    assert reached(fake) == 2
    assert len(client.recorder.sent) == 2
    assert (await client.lim.stats("openai"))["cache"] == {"hits": 0, "misses": 0}
    assert await entries(redis_client) == []
    assert all("x-fleetlimit-cache" not in r.headers for r in client.recorder.sent)


# -- tools: offered, answered, forced -------------------------------------------------


async def _respond_raw(client: Client, text: str, **kwargs: Any) -> Any:
    return await client.sdk.responses.with_raw_response.create(
        model=MODEL, input=text, temperature=0, store=False, **kwargs
    )


#: Requests that offer the model tools (not forcing a call) and that the fake answers with
#: text: looked up, stored, and their repeat is a hit.
TOOLS_OFFERED: dict[str, Callable[[Client], Awaitable[Any]]] = {
    "tools": lambda c: chat(c, temperature=0, tools=[EMAIL_TOOL]),
    "tools, tool_choice auto": lambda c: chat(
        c, temperature=0, tools=[EMAIL_TOOL], tool_choice="auto"
    ),
    "tools, tool_choice none, a message asking for the tool": lambda c: chat(
        c, temperature=0, tools=[EMAIL_TOOL], tool_choice="none", messages=EMAIL_MESSAGES
    ),
    "functions": lambda c: chat(c, temperature=0, functions=[EMAIL_TOOL["function"]]),
    "functions, function_call auto": lambda c: chat(
        c, temperature=0, functions=[EMAIL_TOOL["function"]], function_call="auto"
    ),
    "responses tools": lambda c: _respond_raw(c, "hello cache", tools=[RESPONSES_EMAIL_TOOL]),
}


@pytest.mark.parametrize("case", TOOLS_OFFERED)
async def test_tools_offered_and_a_text_answer_is_cached(
    case: str, make_client: ClientFactory, fake: Running, redis_client: Any
) -> None:
    """Tools offered, not forced, and a text answer: the repeat is a hit with the first
    answer's exact bytes (no tool call in it), without reaching the provider."""
    client = make_client(ResponseCache())
    first = await TOOLS_OFFERED[case](client)
    second = await TOOLS_OFFERED[case](client)

    assert second.content == first.content
    assert second.headers["x-fleetlimit-cache"] == "hit"
    assert "x-fleetlimit-cache" not in first.headers
    payload = json.loads(second.content)
    if "choices" in payload:
        [choice] = payload["choices"]
        assert choice["message"]["content"].startswith("You said: ")
        assert "tool_calls" not in choice["message"]
        assert "function_call" not in choice["message"]
    else:
        assert [item["type"] for item in payload["output"]] == ["message"]
    assert reached(fake) == 1
    assert len(client.recorder.sent) == 1
    assert (await client.lim.stats("openai"))["cache"] == {"hits": 1, "misses": 1}
    assert len(await entries(redis_client)) == 1


async def _email_chat(client: Client, **kwargs: Any) -> str:
    answer = (await chat(client, temperature=0, messages=EMAIL_MESSAGES, **kwargs)).parse()
    return str(answer.choices[0].message.tool_calls[0].function.name)


async def _email_respond(client: Client) -> str:
    text = EMAIL_MESSAGES[0]["content"]
    answer = (await _respond_raw(client, text, tools=[RESPONSES_EMAIL_TOOL])).parse()
    [item] = answer.output
    assert item.type == "function_call"
    return str(item.name)


#: Requests that offer tools and that the fake answers with a call to one.
TOOL_CALL_ANSWERS: dict[str, Callable[[Client], Awaitable[str]]] = {
    "chat tools": lambda c: _email_chat(c, tools=[EMAIL_TOOL]),
    "chat tools, tool_choice auto": lambda c: _email_chat(
        c, tools=[EMAIL_TOOL], tool_choice="auto"
    ),
    "responses tools": _email_respond,
}


@pytest.mark.parametrize("case", TOOL_CALL_ANSWERS)
async def test_tools_offered_and_a_tool_call_answer_is_never_stored(
    case: str, make_client: ClientFactory, fake: Running, redis_client: Any
) -> None:
    """Tools offered and an answer that calls one (``tool_calls``, a ``function_call``
    item): looked up (a miss) but never stored, so both requests reach the provider and
    the cache never asks anyone to run a tool."""
    client = make_client(ResponseCache())
    for _ in range(2):
        assert await TOOL_CALL_ANSWERS[case](client) == "send_email"
    assert reached(fake) == 2
    assert len(client.recorder.sent) == 2
    assert (await client.lim.stats("openai"))["cache"] == {"hits": 0, "misses": 2}
    assert await entries(redis_client) == []


async def test_functions_offered_and_a_function_call_answer_is_never_stored(
    make_client: ClientFactory, redis_client: Any
) -> None:
    """The older ``functions``: offered, and answered with a ``function_call`` message
    (by a provider that answers so: the fake speaks only ``tools``), never stored."""
    seen: list[str] = []
    async with serve_app(_tool_calling_provider(seen), lifespan="off") as provider:
        client = make_client(ResponseCache(), base_url=f"{provider.url}/v1")
        for _ in range(2):
            answer = (await chat(client, temperature=0, functions=[EMAIL_TOOL["function"]])).parse()
            assert answer.choices[0].message.function_call.name == "send_email"
    assert seen == ["chat", "chat"]
    assert (await client.lim.stats("openai"))["cache"] == {"hits": 0, "misses": 2}
    assert await entries(redis_client) == []


_EMAIL_FUNCTION = {"name": "send_email"}


@pytest.mark.parametrize(
    ("field", "choice", "looked_up"),
    [
        ("tool_choice", None, True),
        ("tool_choice", "none", True),
        ("tool_choice", "auto", True),
        ("tool_choice", {"type": "auto"}, True),
        ("tool_choice", {"type": "none"}, True),
        ("tool_choice", {"type": "allowed_tools", "mode": "auto", "tools": []}, True),
        ("tool_choice", "required", False),
        ("tool_choice", "any", False),
        ("tool_choice", "sometimes", False),
        ("tool_choice", {"type": "function", "function": _EMAIL_FUNCTION}, False),
        ("tool_choice", {"type": "function", "name": "send_email"}, False),
        ("tool_choice", {"type": "tool", "name": "send_email"}, False),
        ("tool_choice", {"type": "file_search"}, False),
        ("tool_choice", {"type": "allowed_tools", "mode": "required", "tools": []}, False),
        ("tool_choice", {"type": "any"}, False),
        ("tool_choice", ["auto"], False),
        ("function_call", "none", True),
        ("function_call", "auto", True),
        ("function_call", _EMAIL_FUNCTION, False),
    ],
)
def test_only_a_choice_that_leaves_the_model_free_is_looked_up(
    field: str, choice: Any, looked_up: bool
) -> None:
    """Offering tools keeps a request cacheable; a ``tool_choice`` / ``function_call``
    that forces a call (or is not known to leave the model free) does not."""
    tools = {"tools": [EMAIL_TOOL]} if field == "tool_choice" else {"functions": [_EMAIL_FUNCTION]}
    body = {"model": MODEL, "messages": MESSAGES, "temperature": 0, **tools, field: choice}
    request = httpx2.Request("POST", "http://p/v1/chat/completions", json=body)
    assert (cache_material(request) is not None) is looked_up
    opted_in = httpx2.Request("POST", "http://p/v1/chat/completions", json=body)
    assert (cache_material(opted_in, opted_in=True) is not None) is looked_up


@pytest.mark.parametrize(
    ("answer", "storable"),
    [
        ({"choices": [{"message": {"role": "assistant", "content": "hi"}}]}, True),
        ({"choices": [{"message": {"content": "hi", "tool_calls": []}}]}, True),
        ({"choices": [{"message": {"content": None, "tool_calls": [{"id": "c"}]}}]}, False),
        ({"choices": [{"message": {"content": None, "function_call": _EMAIL_FUNCTION}}]}, False),
        ({"choices": [{"message": {"content": "a"}}, {"message": {"tool_calls": [{}]}}]}, False),
        ({"object": "response", "status": "completed", "output": [{"type": "message"}]}, True),
        (
            {
                "object": "response",
                "status": "completed",
                "output": [{"type": "reasoning"}, {"type": "message"}],
            },
            True,
        ),
        (
            {"object": "response", "status": "completed", "output": [{"type": "function_call"}]},
            False,
        ),
        (
            {"object": "response", "status": "completed", "output": [{"type": "web_search_call"}]},
            False,
        ),
        (
            {"object": "response", "status": "completed", "output": [{"type": "mcp_list_tools"}]},
            False,
        ),
        (
            {"object": "response", "status": "completed", "output": [{"type": "custom_tool_call"}]},
            False,
        ),
    ],
)
def test_answers_that_call_a_tool_are_not_storable(answer: Any, storable: bool) -> None:
    """A chat choice's ``tool_calls`` / ``function_call``, any Responses output item other
    than a message or reasoning: not storable, in any choice or position."""
    assert storable_answer(json.dumps(answer).encode()) is storable


async def test_an_error_answer_is_not_stored(
    make_client: ClientFactory, fake: Running, redis_client: Any
) -> None:
    """A 400 is looked up (a miss) but never stored: its repeat reaches the provider."""
    client = make_client(ResponseCache())
    for _ in range(2):
        with pytest.raises(openai.BadRequestError):
            await chat(client, temperature=0, messages=[])
    assert fake.fake.snapshot(detail=False)["bad_requests"] == 2
    assert (await client.lim.stats("openai"))["cache"] == {"hits": 0, "misses": 2}
    assert await entries(redis_client) == []


async def test_answers_over_max_bytes_are_not_stored(
    make_client: ClientFactory, fake: Running, redis_client: Any
) -> None:
    """An answer one byte over ``max_bytes`` is not stored; one of exactly ``max_bytes`` is."""
    size = len((await chat(make_client(None), temperature=0)).content)
    over = make_client(ResponseCache(max_bytes=size - 1))
    await _twice(over, lambda c: chat(c, temperature=0))
    assert reached(fake) == 3
    assert await entries(redis_client) == []
    fits = make_client(ResponseCache(max_bytes=size))
    first = await chat(fits, temperature=0)
    second = await chat(fits, temperature=0)
    assert len(first.content) == size
    assert second.content == first.content
    assert reached(fake) == 4
    assert (await fits.lim.stats("openai"))["cache"] == {"hits": 1, "misses": 3}


def _tool_calling_provider(seen: list[str]) -> FastAPI:
    """A provider that answers every chat and Responses request with a tool call (chat
    requests that offer ``functions`` with a ``function_call``)."""
    app = FastAPI()
    chat_answer = {
        "id": "chatcmpl-tool",
        "object": "chat.completion",
        "created": 1,
        "model": MODEL,
        "choices": [
            {
                "index": 0,
                "finish_reason": "tool_calls",
                "message": {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "id": "call_1",
                            "type": "function",
                            "function": {"name": "send_email", "arguments": "{}"},
                        }
                    ],
                },
            }
        ],
    }
    response_answer = {
        "id": "resp_tool",
        "object": "response",
        "created_at": 1,
        "status": "completed",
        "model": MODEL,
        "output": [
            {
                "id": "fc_1",
                "type": "function_call",
                "status": "completed",
                "call_id": "call_1",
                "name": "send_email",
                "arguments": "{}",
            }
        ],
        "parallel_tool_calls": True,
        "tool_choice": "auto",
        "tools": [],
    }

    function_answer = {
        **chat_answer,
        "choices": [
            {
                "index": 0,
                "finish_reason": "function_call",
                "message": {
                    "role": "assistant",
                    "content": None,
                    "function_call": {"name": "send_email", "arguments": "{}"},
                },
            }
        ],
    }

    @app.post("/v1/chat/completions")
    async def completions(request: Request) -> JSONResponse:
        seen.append("chat")
        offered_functions = "functions" in await request.json()
        return JSONResponse(function_answer if offered_functions else chat_answer)

    @app.post("/v1/responses")
    async def responses() -> JSONResponse:
        seen.append("responses")
        return JSONResponse(response_answer)

    return app


async def test_answers_with_tool_calls_are_not_stored(
    make_client: ClientFactory, redis_client: Any
) -> None:
    """A chat answer with ``tool_calls`` and a Responses answer with a ``function_call``
    item (to requests that offered no tools) are looked up but never stored."""
    seen: list[str] = []
    async with serve_app(_tool_calling_provider(seen), lifespan="off") as provider:
        client = make_client(ResponseCache(), base_url=f"{provider.url}/v1")
        for _ in range(2):
            answer = (await chat(client, temperature=0)).parse()
            assert answer.choices[0].message.tool_calls[0].function.name == "send_email"
            await _respond(client, store=False)
    assert seen == ["chat", "responses"] * 2
    assert (await client.lim.stats("openai"))["cache"] == {"hits": 0, "misses": 4}
    assert await entries(redis_client) == []


def test_only_the_three_endpoints_are_cacheable() -> None:
    """Chat completions, responses and embeddings POSTs only: not MCP, not a GET, not a
    Responses sub-resource; the MCP factory has no cache at all."""
    body = {"model": MODEL, "input": "x", "temperature": 0, "store": False}

    def material(method: str, url: str) -> bytes | None:
        return cache_material(httpx2.Request(method, url, json=body))

    assert material("POST", "http://p/v1/responses") is not None
    assert material("POST", "http://p/v1/embeddings") is not None
    assert material("POST", "http://p/v1/chat/completions") is not None
    assert material("POST", "http://p/mcp") is None
    assert material("GET", "http://p/v1/responses") is None
    assert material("POST", "http://p/v1/responses/resp_1/cancel") is None
    assert material("POST", "http://p/v1/completions") is None
    assert "cache" not in inspect.signature(zapier_mcp).parameters


# -- keys, lifetime, outages ---------------------------------------------------------


async def test_keys_hold_no_secret_and_hash_the_request(
    make_client: ClientFactory, redis_client: Any
) -> None:
    """Redis holds the entry under the SHA-256 of method, path and canonical body, plus the
    counters; no key name and no value holds the API key or any part of it."""
    client = make_client(ResponseCache())
    await chat(client, temperature=0)
    await chat(client, temperature=0)
    await client.sdk.embeddings.create(model=EMBEDDING_MODEL, input="x")
    keys = sorted([k.decode() async for k in redis_client.scan_iter(match="limiter:cache:*")])
    sent = json.loads(client.recorder.sent[0].content)
    canonical = json.dumps(sent, sort_keys=True, separators=(",", ":"))
    digest = hashlib.sha256(f"POST\n/v1/chat/completions\n{canonical}".encode()).hexdigest()
    assert f"limiter:cache:{{openai}}:{digest}" in keys
    assert len(keys) == 3  # the chat, the embedding, the counters
    assert "limiter:cache:{openai}:stats" in keys
    dump = []
    async for key in redis_client.scan_iter():
        dump.append(key)
        kind = (await redis_client.type(key)).decode()
        if kind == "string":
            dump.append(await redis_client.get(key))
        elif kind == "hash":
            dump += [x for pair in (await redis_client.hgetall(key)).items() for x in pair]
        elif kind == "zset":
            dump += [m for m, _ in await redis_client.zrange(key, 0, -1, withscores=True)]
        elif kind == "set":
            dump += list(await redis_client.smembers(key))
    blob = b"\n".join(d if isinstance(d, bytes) else str(d).encode() for d in dump)
    for piece in (KEY, "7d41c9e02b5a", "Bearer"):
        assert piece.encode() not in blob


async def test_entries_live_ttl(make_client: ClientFactory, redis_client: Any) -> None:
    """An entry expires ``ttl`` after it was stored (PTTL at most 600,000 ms for 600 s, and
    not 10 s less); the counters live a day after the last lookup."""
    client = make_client(ResponseCache(ttl=600))
    await chat(client, temperature=0)
    [entry] = await entries(redis_client)
    assert 590_000 < await redis_client.pttl(entry) <= 600_000
    assert 0 < await redis_client.pttl("limiter:cache:{openai}:stats") <= 86_400_000
    assert await redis_client.hgetall(entry) == {
        b"s": b"200",
        b"t": b"application/json",
        b"b": (await chat(client, temperature=0)).content,
    }


async def test_an_entry_the_cache_cannot_read_is_a_miss(
    make_client: ClientFactory, fake: Running, redis_client: Any
) -> None:
    """An entry with a field missing is a miss and is written again; a key of the wrong
    type (Redis answers WRONGTYPE) is a failed lookup: the call goes to the provider."""
    client = make_client(ResponseCache())
    await chat(client, temperature=0)
    [entry] = await entries(redis_client)
    await redis_client.hdel(entry, "s")
    again = await chat(client, temperature=0)
    assert "x-fleetlimit-cache" not in again.headers
    assert await redis_client.hget(entry, "s") == b"200"  # stored again
    await redis_client.delete(entry)
    await redis_client.set(entry, "not a hash")
    answer = await chat(client, temperature=0)
    assert answer.parse().choices[0].message.content == "You said: hello cache"
    assert reached(fake) == 3
    assert (await client.lim.stats("openai"))["cache"] == {"hits": 0, "misses": 2}


async def test_redis_down_never_fails_a_call(
    fake: Running, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With Redis gone (``fail_open``), every lookup fails and is a miss, the calls reach the
    provider and succeed, and the outage is logged once."""
    monkeypatch.setattr(cache_module, "_REST", 0.0)  # every call asks Redis again
    events: list[tuple[str, dict[str, Any]]] = []
    with RedisServer() as server:
        lim = Limiter.from_url(server.url, LIMITS, on_redis_error="fail_open")
        lim.add_listener(lambda event, api, fields: events.append((event, fields)))
        sdk = openai_client(lim, base_url=f"{fake.url}/v1", api_key=KEY, cache=ResponseCache())
        try:
            stored = await chat(sdk, temperature=0)
            server.stop()
            caplog.set_level(logging.INFO, logger="limiter")
            for _ in range(3):
                answer = await chat(sdk, temperature=0)
                assert answer.parse().choices[0].message.content == "You said: hello cache"
                assert answer.content != stored.content
        finally:
            await sdk.close()
            await lim.aclose()
    assert reached(fake) == 4
    assert [f["hit"] for e, f in events if e == "cache"] == [False] * 4
    outage = [r for r in caplog.records if r.getMessage().startswith("response cache:")]
    assert len(outage) == 1
    assert outage[0].levelno == logging.WARNING
    assert "Redis failed a lookup" in outage[0].getMessage()


async def test_the_limiters_acl_user_needs_no_more_rights(
    fake: Running, caplog: pytest.LogCaptureFixture
) -> None:
    """As the README's minimal ACL user, a miss, a store, a hit and stats work and Redis
    denies nothing."""
    password = "cache-acl-pw-3e9a"
    functions = int(RedisServer().version().split(".")[0]) >= 7
    acl = [f"user fleet on >{password} {LIMITER_ACL if functions else LIMITER_ACL_62}"]
    with RedisServer(password="admin-pw-51c2", acl_lines=acl) as server:
        admin = aioredis.from_url(server.admin_url)
        lim = Limiter.from_url(server.client_url("fleet", password), LIMITS)
        sdk = openai_client(lim, base_url=f"{fake.url}/v1", api_key=KEY, cache=ResponseCache())
        try:
            await admin.acl_log_reset()
            first, second = await chat(sdk, temperature=0), await chat(sdk, temperature=0)
            stats = await lim.stats("openai")
            denied = [
                e for e in await admin.acl_log() if e["object"] not in ("client", "client|setinfo")
            ]
        finally:
            await sdk.close()
            await lim.aclose()
            await admin.aclose()
    assert second.content == first.content
    assert reached(fake) == 1
    assert stats["cache"] == {"hits": 1, "misses": 1}
    assert denied == []
    assert not [r for r in caplog.records if r.getMessage().startswith("response cache:")]


# -- events, metrics, arguments ------------------------------------------------------


async def test_events_and_the_prometheus_counter(
    make_limiter: LimiterFactory, make_client: ClientFactory
) -> None:
    """Each lookup is a ``cache`` event (``hit`` True or False) and counts in
    ``limiter_cache_requests_total{api,result}``."""
    lim = make_limiter(LIMITS)
    events: list[tuple[str, str, dict[str, Any]]] = []
    lim.add_listener(lambda event, api, fields: events.append((event, api, fields)))
    metrics = Metrics(lim)
    client = make_client(ResponseCache(), lim=lim)
    await chat(client, temperature=0)
    await chat(client, temperature=0)
    await chat(client, temperature=0)
    assert [(a, f) for e, a, f in events if e == "cache"] == [
        ("openai", {"hit": False}),
        ("openai", {"hit": True}),
        ("openai", {"hit": True}),
    ]
    text = (await metrics.render()).decode()
    assert 'limiter_cache_requests_total{api="openai",result="hit"} 2.0' in text
    assert 'limiter_cache_requests_total{api="openai",result="miss"} 1.0' in text


@pytest.mark.parametrize(
    ("kwargs", "field", "shown"),
    [
        ({"ttl": 0}, "ResponseCache.ttl", "ttl=0"),
        ({"ttl": -1.5}, "ResponseCache.ttl", "ttl=-1.5"),
        ({"ttl": math.nan}, "ResponseCache.ttl", "ttl=nan"),
        ({"ttl": math.inf}, "ResponseCache.ttl", "ttl=inf"),
        ({"ttl": True}, "ResponseCache.ttl", "ttl=True"),
        ({"ttl": "300"}, "ResponseCache.ttl", "ttl='300'"),
        ({"max_bytes": 0}, "ResponseCache.max_bytes", "max_bytes=0"),
        ({"max_bytes": -1}, "ResponseCache.max_bytes", "max_bytes=-1"),
        ({"max_bytes": 1.5}, "ResponseCache.max_bytes", "max_bytes=1.5"),
        ({"max_bytes": True}, "ResponseCache.max_bytes", "max_bytes=True"),
        ({"max_bytes": 2**40}, "ResponseCache.max_bytes", "max_bytes=1099511627776"),
    ],
)
def test_bad_arguments_name_the_field_and_value(
    kwargs: dict[str, Any], field: str, shown: str
) -> None:
    """A ttl that is not a positive finite number of seconds, or a max_bytes that is not a
    positive integer, raises ConfigError naming the field and the value."""
    with pytest.raises(ConfigError) as info:
        ResponseCache(**kwargs)
    assert info.value.field == field
    assert shown in str(info.value)
    value = info.value.value
    expected = kwargs[field.rpartition(".")[2]]
    assert value is expected or (isinstance(value, float) and math.isnan(value))


async def test_cache_must_be_a_response_cache(make_limiter: LimiterFactory) -> None:
    """``openai_client(cache=...)`` takes a ResponseCache or None, else ConfigError."""
    lim = make_limiter(LIMITS)
    with pytest.raises(ConfigError) as info:
        openai_client(lim, api_key=KEY, cache={"ttl": 5})  # type: ignore[arg-type]
    assert info.value.field == "cache"
    assert "cache={'ttl': 5}" in str(info.value)
    assert repr(ResponseCache(ttl=5, max_bytes=10)) == "<ResponseCache ttl=5 max_bytes=10>"
