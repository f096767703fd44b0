"""The OpenAI Agents SDK through the limiter: Zapier's MCP tools via ``mcp_http_client_factory``.

The real ``openai-agents`` package (``Agent``, ``Runner``, ``MCPServerStreamableHttp``)
with the real ``openai`` and ``mcp`` clients inside, against the fake OpenAI and the fake
Zapier on 127.0.0.1 and a real redis-server (the session's, flushed by the ``client`` /
``real_redis`` fixtures). The fakes' own records are the referee: what they saw in flight
and in their rolling windows, which requests they charged, which 429s they answered.
The multi-process test runs its agents in worker processes (``tests._sdk_workers``).
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx2
import pytest
import redis.asyncio as aioredis
from agents import Agent, OpenAIChatCompletionsModel, Runner, RunResult, set_tracing_disabled
from agents.items import ToolCallOutputItem
from agents.mcp import MCPServerStreamableHttp
from mcp import ClientSession
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError

from chatbot.fakes.openai_server import FakeOpenAIConfig
from chatbot.fakes.zapier_server import FakeZapierConfig
from limiter import AcquireTimeout, APILimits, ConfigError, Limiter, LimiterUnavailable
from limiter.http import mcp_http_client_factory, openai_client, zapier_mcp
from limiter.http._transport import JSONRPC_REFUSED, _jsonrpc_refusal
from limiter.testing import RedisServer
from tests._fleet import ROOT
from tests._sdk import Fakes, SDKFleet, offline, serve_fakes
from tests._sdk_workers import KEY, MODEL, TOKEN, limits_of
from tests.conftest import wait_for_waiters

pytestmark = [pytest.mark.redis]

EMAIL = {"to": "ana@example.com", "subject": "hi", "body": "hello"}
#: What the Agents SDK tells the model when an MCP tool call failed (its default).
TOOL_FAILED = "An error occurred while running the tool"


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    offline(monkeypatch)
    set_tracing_disabled(True)


@pytest.fixture
async def fakes() -> AsyncIterator[Fakes]:
    async with serve_fakes() as served:
        yield served


def limits(**zapier: Any) -> dict[str, APILimits]:
    return {
        "openai": APILimits(max_concurrent=4),
        "zapier": APILimits(**{"max_concurrent": 1, "acquire_timeout": 10.0, **zapier}),
    }


@pytest.fixture
async def lim(real_redis: aioredis.Redis) -> AsyncIterator[Limiter]:
    async with Limiter(real_redis, limits()) as limiter:
        yield limiter


def zapier_server(fakes: Fakes, factory: Any, **kwargs: Any) -> MCPServerStreamableHttp:
    params: Any = {
        "url": fakes.zapier_url,
        "headers": {"Authorization": f"Bearer {TOKEN}"},
        "httpx_client_factory": factory,
    }
    params.update(kwargs.pop("params", {}))
    return MCPServerStreamableHttp(params=params, name="zapier", **kwargs)


async def run_agent(
    lim: Limiter, fakes: Fakes, server: MCPServerStreamableHttp, message: str
) -> RunResult:
    """One ``Runner.run`` of an agent on ``openai_client`` with ``server``'s tools."""
    client = openai_client(lim, base_url=fakes.openai_url, api_key=KEY)
    model = OpenAIChatCompletionsModel(model=MODEL, openai_client=client)
    agent = Agent(name="assistant", instructions="Be brief.", model=model, mcp_servers=[server])
    try:
        return await Runner.run(agent, message)
    finally:
        await client.close()


async def until(predicate: Any, what: str, within: float = 5.0) -> None:
    """Return once ``await predicate()`` is true (polls state no event announces)."""
    deadline = time.monotonic() + within
    while not await predicate():
        assert time.monotonic() < deadline, f"not within {within}s: {what}"
        await asyncio.sleep(0.005)


class _Bearer(httpx2.Auth):
    """An ``httpx2.Auth`` that sets the bearer token (what an OAuth flow would)."""

    def __init__(self, token: str) -> None:
        self._token = token

    def auth_flow(self, request: httpx2.Request) -> Iterator[httpx2.Request]:
        request.headers["Authorization"] = f"Bearer {self._token}"
        yield request


# -- the factory ------------------------------------------------------------------------


async def test_factory_defaults_and_unknown_api(lim: Limiter) -> None:
    """No timeout given: 30 s / 300 s read (mcp's defaults) or the factory's; bad API: at once."""
    async with mcp_http_client_factory(lim)() as client:
        assert isinstance(client, httpx2.AsyncClient)
        assert client.timeout == httpx2.Timeout(30.0, read=300.0)
        assert client.follow_redirects is False
    async with mcp_http_client_factory(lim, timeout=5, read_timeout=9)(timeout=None) as client:
        assert client.timeout == httpx2.Timeout(5.0, read=9.0)
    with pytest.raises(ConfigError, match="zapeir"):
        mcp_http_client_factory(lim, "zapeir")


async def test_factory_honours_the_headers_timeout_and_auth_the_sdk_passes(
    lim: Limiter, fakes: Fakes
) -> None:
    """The SDK's headers, timeout (its ``timeout`` / ``sse_read_timeout``) and auth reach
    the client and the server; the secret shows in no repr."""
    factory = mcp_http_client_factory(lim, "zapier")
    made: list[tuple[dict[str, Any], httpx2.AsyncClient]] = []

    def recording(**kwargs: Any) -> httpx2.AsyncClient:
        client = factory(**kwargs)
        made.append((kwargs, client))
        return client

    headers = {"Authorization": f"Bearer {TOKEN}", "X-Caller": "tests"}
    params = {"headers": headers, "timeout": 7, "sse_read_timeout": 11}
    async with zapier_server(fakes, recording, params=params) as server:
        result = await server.call_tool("send_email", EMAIL)
        ((kwargs, client),) = made
        assert kwargs == {"headers": headers, "timeout": httpx2.Timeout(7, read=11), "auth": None}
        assert client.headers["x-caller"] == "tests"
        assert client.timeout == httpx2.Timeout(7, read=11)
        for text in (repr(client), repr(client.headers), repr(factory), repr(server)):
            assert TOKEN not in text
    assert not result.is_error

    auth = _Bearer(TOKEN)  # no Authorization header: only the auth can get us in
    made.clear()
    params = {"headers": {}, "auth": auth}
    async with zapier_server(fakes, recording, params=params) as server:
        result = await server.call_tool("send_email", EMAIL)
        ((kwargs, client),) = made
        assert kwargs["auth"] is auth
        assert client.auth is auth
    assert not result.is_error
    record = fakes.zapier_record()
    assert (record["executed"], record["unauthorized_401"]) == (2, 0)
    assert (await lim.stats("zapier"))["total_requests"] == 2


async def test_only_tools_call_takes_a_slot(lim: Limiter, fakes: Fakes) -> None:
    """With the only Zapier slot held, the handshakes (the SDK's and mcp's ``initialize``)
    and ``tools/list`` complete; ``tools/call`` waits for the slot, then runs."""
    factory = mcp_http_client_factory(lim, "zapier")
    holder = await lim.acquire("zapier", timeout=0)
    # A limited request would wait up to acquire_timeout (10 s): the bound fails it first.
    async with asyncio.timeout(5), zapier_server(fakes, factory) as server:
        listed = await server.list_tools()
        async with (
            factory(headers={"Authorization": f"Bearer {TOKEN}"}) as http,
            streamable_http_client(fakes.zapier_url, http_client=http) as streams,
            ClientSession(streams[0], streams[1]) as session,
        ):
            await session.initialize()
            assert len((await session.list_tools()).tools) == len(listed) == 3
        stats = await lim.stats("zapier")
        assert (stats["total_requests"], stats["waiting"]) == (1, 0)  # the holder alone
        call = asyncio.create_task(server.call_tool("send_email", EMAIL))
        await wait_for_waiters(lim, "zapier", 1)
        assert fakes.zapier_record()["executed"] == 0
        await holder.release()
        assert not (await call).is_error
    record = fakes.zapier_record()
    assert (record["admitted"], record["executed"], record["rejected_429"]) == (1, 1, 0)
    free = record["free_requests"]
    assert free.get("server/discover", 0) + free.get("initialize", 0) == 2, free
    assert free["initialize"] >= 1, free
    assert free["tools/list"] >= 2, free
    stats = await lim.stats("zapier")
    assert (stats["total_requests"], stats["successful_requests"]) == (2, 2)


# -- the SDK's MCP timeout counts the wait in the limiter's queue ------------------------


async def test_session_timeout_counts_the_wait_in_the_queue(lim: Limiter, fakes: Fakes) -> None:
    """A tool call queued 1 s behind a held slot: with ``client_session_timeout_seconds``
    0.5 the model is told the tool failed (and the call leaves the queue, never to run);
    with 5 it waits and succeeds."""
    factory = mcp_http_client_factory(lim, "zapier")
    holder = await lim.acquire("zapier", timeout=0)
    async with zapier_server(fakes, factory, client_session_timeout_seconds=0.5) as server:
        result = await run_agent(lim, fakes, server, "send an email to ana@example.com")
    outputs = [str(i.output) for i in result.new_items if isinstance(i, ToolCallOutputItem)]
    assert len(outputs) == 1, outputs
    assert TOOL_FAILED in outputs[0], outputs

    async def queue_empty() -> bool:
        return (await lim.stats("zapier"))["waiting"] == 0

    await until(queue_empty, "the timed-out tool call left the queue")
    await holder.release()
    assert (await lim.stats("zapier"))["total_requests"] == 1  # the holder alone
    assert fakes.zapier_record()["executed"] == 0

    second_holder = await lim.acquire("zapier", timeout=0)

    async def release_after_a_second() -> None:
        await wait_for_waiters(lim, "zapier", 1)
        await asyncio.sleep(1.0)  # the hold under test, not a synchronisation
        await second_holder.release()

    releasing = asyncio.create_task(release_after_a_second())
    async with zapier_server(fakes, factory, client_session_timeout_seconds=5) as server:
        result = await run_agent(lim, fakes, server, "send an email to bob@example.com")
    await releasing
    assert result.final_output.startswith("The send_email tool returned: {"), result.final_output
    assert "bob@example.com" in result.final_output
    assert fakes.zapier_record()["executed"] == 1


async def test_acquire_timeout_first_means_the_call_never_runs(
    real_redis: aioredis.Redis, fakes: Fakes
) -> None:
    """Session timeout above the API's ``acquire_timeout`` (0.5 s): a call that gets no slot
    is answered with a JSON-RPC error (the model is told the tool failed), never runs at
    Zapier even once room frees, and the session stays open: the next run on it sends its
    call."""
    async with Limiter(real_redis, limits(acquire_timeout=0.5)) as lim:
        factory = mcp_http_client_factory(lim, "zapier")
        holder = await lim.acquire("zapier", timeout=0)
        async with zapier_server(fakes, factory, client_session_timeout_seconds=5) as server:
            result = await run_agent(lim, fakes, server, "send an email to ana@example.com")
            outputs = [str(i.output) for i in result.new_items if isinstance(i, ToolCallOutputItem)]
            assert len(outputs) == 1, outputs
            assert TOOL_FAILED in outputs[0], outputs  # the SDK hides the error's words
            stats = await lim.stats("zapier")
            assert (stats["waiting"], stats["refusals"]) == (0, {"concurrency": 1})
            await holder.release()
            assert (await lim.stats("zapier"))["total_requests"] == 1  # the holder alone
            assert fakes.zapier_record()["executed"] == 0
            result = await run_agent(lim, fakes, server, "send an email to bob@example.com")
            assert "bob@example.com" in result.final_output  # the same session, alive
    assert fakes.zapier_record()["executed"] == 1


async def test_zapier_mcp_refused_call_fails_alone_and_the_session_lives(
    real_redis: aioredis.Redis, fakes: Fakes
) -> None:
    """``zapier_mcp``: a tool call the limiter refuses (no slot within ``acquire_timeout``)
    raises MCPError with the limiter's words and data, never runs, and the same session
    sends the next call once room is back (an exception would have closed it)."""
    async with Limiter(real_redis, limits(acquire_timeout=0.3)) as lim:
        holder = await lim.acquire("zapier", timeout=0)
        async with zapier_mcp(lim, fakes.zapier_url, TOKEN) as session:
            with pytest.raises(MCPError) as refused:
                await session.call_tool("send_email", EMAIL)
            error = refused.value.error
            assert error.code == JSONRPC_REFUSED
            assert error.message.startswith("limiter: no admission for API 'zapier' after")
            assert error.data["limiter_error"] == "AcquireTimeout"
            assert (error.data["api"], error.data["reason"]) == ("zapier", "concurrency")
            assert error.data["waited"] >= 0.3
            assert fakes.zapier_record()["executed"] == 0
            await holder.release()
            assert not (await session.call_tool("send_email", EMAIL)).is_error
        assert TOKEN not in repr(error)
    assert fakes.zapier_record()["executed"] == 1


def test_only_jsonrpc_requests_are_answered_for_the_limiter() -> None:
    """A refusal becomes a JSON-RPC error only for a JSON-RPC request (an id and a method):
    a notification or any other body gets the exception itself."""
    refusal = AcquireTimeout("zapier", "concurrency", 0.5)
    for body in (b"", b"not json", b"[1]", b'{"jsonrpc": "2.0", "method": "notifications/x"}'):
        request = httpx2.Request("POST", "http://127.0.0.1:9/mcp", content=body)
        assert _jsonrpc_refusal(httpx2, request, refusal) is None, body
    call = {"jsonrpc": "2.0", "id": 7, "method": "tools/call", "params": {}}
    request = httpx2.Request("POST", "http://127.0.0.1:9/mcp", json=call)
    answer = _jsonrpc_refusal(httpx2, request, refusal)
    assert answer.status_code == 429
    assert answer.headers["content-type"] == "application/json"
    assert json.loads(answer.content)["id"] == 7
    down = _jsonrpc_refusal(httpx2, request, LimiterUnavailable("zapier", "acquire", "down"))
    assert down.status_code == 503
    assert json.loads(down.content)["error"]["data"] == {
        "limiter_error": "LimiterUnavailable",
        "api": "zapier",
    }


async def test_initialize_handshake_timeout_leaves_the_call_queued(
    lim: Limiter, fakes: Fakes
) -> None:
    """Why the session timeout must cover the wait: over the protocol ``initialize``
    negotiates (2025-11-25, what servers speak before MCP's 2026 revision), a call timed out
    by the session stays in the queue and runs once admitted, its caller told it failed."""
    holder = await lim.acquire("zapier", timeout=0)
    factory = mcp_http_client_factory(lim, "zapier")
    async with (
        factory(headers={"Authorization": f"Bearer {TOKEN}"}) as http,
        streamable_http_client(fakes.zapier_url, http_client=http) as streams,
        ClientSession(streams[0], streams[1], read_timeout_seconds=0.5) as session,
    ):
        assert (await session.initialize()).protocol_version == "2025-11-25"
        with pytest.raises(MCPError, match="timed out"):
            await session.call_tool("send_email", EMAIL)
        assert (await lim.stats("zapier"))["waiting"] == 1
        await holder.release()

        async def ran() -> bool:
            return bool(fakes.zapier_record()["executed"] == 1)

        await until(ran, "the abandoned call ran at Zapier")


# -- across processes ---------------------------------------------------------------------

OPENAI_CONCURRENT, OPENAI_PER_SECOND = 3, 6
ZAPIER_CONCURRENT, ZAPIER_PER_SECOND = 2, 3
#: The limiter's ``window_margin``: it must exceed how much the delay from admission to
#: arrival at the fake varies (README, "Arrival jitter"). A worker's first calls wait up
#: to ~0.3 s for its event loop (measured: the SDKs' first-call work on a 2-core machine).
MARGIN = 0.6
PROCESSES, RUNS = 2, 3
MODELS = ("chat", "responses")  # p0: OpenAIChatCompletionsModel; p1: OpenAIResponsesModel


@pytest.fixture
def fleet(redis_server: RedisServer, client: aioredis.Redis, tmp_path: Path) -> Iterator[SDKFleet]:
    f = SDKFleet(redis_server.url, client, tmp_path)
    try:
        yield f
    finally:
        f.close()


@pytest.mark.multiprocess
async def test_agents_across_processes_never_exceed_the_providers(fleet: SDKFleet) -> None:
    """2 processes x 3 agent runs (chat completions in one, the Responses API in the other),
    each asking for an email: each email was sent once; the fakes saw at most the limits in
    flight and per window (and reached them), no 429; Zapier charged exactly the tool calls
    (handshakes and tools/list went free)."""
    spec = {
        "openai": {
            "max_concurrent": OPENAI_CONCURRENT,
            "rates": [[OPENAI_PER_SECOND, 1.0]],
            "window_margin": MARGIN,
        },
        "zapier": {
            "max_concurrent": ZAPIER_CONCURRENT,
            "rates": [[ZAPIER_PER_SECOND, 1.0]],
            "requests_per_hour": 75,
            "window_margin": MARGIN,
        },
    }
    openai_config = FakeOpenAIConfig(
        api_keys=(KEY,),
        max_in_flight=OPENAI_CONCURRENT,
        rpm=OPENAI_PER_SECOND,
        window_seconds=1.0,
        latency=0.1,
    )
    zapier_config = FakeZapierConfig(
        token=TOKEN,
        max_concurrent=ZAPIER_CONCURRENT,
        per_minute=ZAPIER_PER_SECOND,
        minute_seconds=1.0,
        per_hour=75,
        latency=0.3,
    )
    async with serve_fakes(openai_config, zapier_config) as fakes:
        names = [f"p{i}" for i in range(PROCESSES)]
        for name, model in zip(names, MODELS, strict=True):
            fleet.start(
                "agents",
                name,
                limits=spec,
                openai_url=fakes.openai_url,
                zapier_url=fakes.zapier_url,
                runs=RUNS,
                model=model,
                session_timeout=60.0,
            )
        await fleet.ready(PROCESSES)
        await fleet.go(*names)
        reports = [await fleet.result(name) for name in names]
        openai, zapier = fakes.openai_record(), fakes.zapier_record()
    errors = [e for r in reports for e in r["errors"]]
    assert errors == [], "\n\n".join(errors)
    runs = [run for r in reports for run in r["runs"]]
    addresses = {f"{name}-{i}@example.com" for name in names for i in range(RUNS)}
    assert {run["address"] for run in runs} == addresses
    for run in runs:
        ((tool, arguments),) = run["calls"]
        assert (tool, json.loads(arguments)["to"]) == ("send_email", run["address"])
        (output,) = run["outputs"]
        assert '"status": "sent"' in output, run
        assert run["final"].startswith("The send_email tool returned: {"), run
        assert run["address"] in run["final"]
    n = PROCESSES * RUNS

    # Zapier's record: each email sent exactly once, within its limits, no 429.
    sent = sorted(e["arguments"]["to"] for e in zapier["executions"])
    assert sent == sorted(addresses)
    assert (zapier["admitted"], zapier["ungated"], zapier["unauthorized_401"]) == (n, 0, 0)
    assert zapier["rejected_429"] == 0, zapier["rejected_429_by_reason"]
    assert zapier["max_in_flight"] <= ZAPIER_CONCURRENT
    assert zapier["max_concurrent"] <= ZAPIER_CONCURRENT
    assert zapier["max_in_minute_window"] <= ZAPIER_PER_SECOND
    assert zapier["max_in_hour_window"] <= 75
    # ... and the limits were reached, so they were what held the calls back.
    assert zapier["max_in_flight"] == ZAPIER_CONCURRENT
    assert zapier["max_in_minute_window"] == ZAPIER_PER_SECOND
    # Only tools/call was charged: one handshake per run and its tools/list went free.
    free = zapier["free_requests"]
    assert free.get("server/discover", 0) + free.get("initialize", 0) == n, free
    assert free["tools/list"] >= n, free

    # OpenAI's record: two model calls per run, within its limits, no 429.
    assert (openai["admitted"], openai["rejected_total"], openai["unauthorized"]) == (2 * n, 0, 0)
    assert openai["by_endpoint"]["/v1/chat/completions"] == 2 * RUNS
    assert openai["by_endpoint"]["/v1/responses"] == 2 * RUNS
    assert openai["max_in_flight"] <= OPENAI_CONCURRENT
    assert openai["max_requests_in_window"] <= OPENAI_PER_SECOND
    assert openai["max_in_flight"] == OPENAI_CONCURRENT
    assert openai["max_requests_in_window"] == OPENAI_PER_SECOND

    # The cluster's own count agrees: only the tool calls were admitted for Zapier.
    async with Limiter.from_url(fleet.url, limits_of(spec)) as lim:
        assert (await lim.stats("zapier"))["total_requests"] == n
        assert (await lim.stats("openai"))["total_requests"] == 2 * n
    logs = fleet.logs()
    assert KEY not in logs
    assert TOKEN not in logs


# -- the example ----------------------------------------------------------------------------


async def test_example_runs_against_the_fakes(redis_server: RedisServer, real_redis: Any) -> None:
    """``examples/agents_sdk.py`` answers through a Zapier tool call, given the fakes' URLs."""
    async with serve_fakes(FakeOpenAIConfig(), FakeZapierConfig(latency=0.01)) as fakes:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            str(ROOT / "examples" / "agents_sdk.py"),
            "--redis-url",
            redis_server.url,
            "--openai-url",
            fakes.openai_url,
            "--zapier-url",
            fakes.zapier_url,
            "Send an email to ana@example.com saying hi.",
            cwd=ROOT,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        try:
            async with asyncio.timeout(30):
                out, _ = await proc.communicate()
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        text = out.decode(errors="replace")
        assert proc.returncode == 0, text
        assert "answer: The send_email tool returned: {" in text, text
        assert 'tool call: send_email {"to": "ana@example.com"' in text, text
        assert "zapier: 1 admitted in the cluster" in text, text
        assert "openai: 2 admitted in the cluster" in text, text
        assert fakes.zapier_record()["executed"] == 1
