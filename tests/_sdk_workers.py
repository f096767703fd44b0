"""Worker processes for ``tests/test_agents_sdk.py`` and ``tests/test_langchain.py``.

Run as ``python -m tests._sdk_workers ROLE CONFIG_JSON`` from the repository root, with the
protocol of :mod:`tests._workers` (whose ``main`` and ``barrier`` this module reuses): each
worker builds its own :class:`~limiter.Limiter` on the real redis-server at
``config["url"]``, the real SDK client on top of ``limiter.http``, says ready, waits for
the test's go, then runs its calls against the fakes at ``openai_url`` / ``zapier_url``
(127.0.0.1) and writes what it got back as one JSON object to ``config["out"]``.

Roles: ``agents`` (an OpenAI Agents SDK ``Agent`` with Zapier's MCP tools through
``MCPServerStreamableHttp`` + ``mcp_http_client_factory``), ``langchain``
(``langchain_openai.ChatOpenAI`` on ``limiter.http.openai_client``) and ``chat_for``
(chat completions on ``openai_client`` in loops for a while: tests/test_learned_limits.py).
The secrets the fakes accept are :data:`KEY` and :data:`TOKEN`, constants here so that
they never travel on a command line.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import redis.asyncio as aioredis

from limiter import APILimits, Limiter, Rate
from limiter.http import mcp_http_client_factory, openai_client
from tests._workers import barrier, describe
from tests._workers import main as worker_main

__all__ = ["KEY", "MODEL", "TOKEN", "limits_of"]

#: The only key the tests' fake OpenAI accepts.
KEY = "sk-sdktest-SECRET-0b7e51c2d94a"
#: The only token the tests' fake Zapier accepts.
TOKEN = "zap-sdktest-SECRET-6c1f0a93"
MODEL = "gpt-4o-mini"
INSTRUCTIONS = "Answer briefly. Use a tool when the user asks for an action."

Config = dict[str, Any]
Result = dict[str, Any]


def limits_of(spec: dict[str, dict[str, Any]]) -> dict[str, APILimits]:
    """``{api: APILimits}`` from a JSON spec; ``rates`` is ``[[limit, period], ...]``."""
    limits = {}
    for api, kwargs in spec.items():
        fields = dict(kwargs)
        fields["rates"] = [Rate(n, p) for n, p in fields.get("rates", [])]
        limits[api] = APILimits(**fields)
    return limits


async def role_agents(cfg: Config, r: aioredis.Redis) -> Result:
    """``runs`` concurrent ``Runner.run`` of one ``Agent``, each asking for an email.

    The model is ``OpenAIChatCompletionsModel``, or ``OpenAIResponsesModel`` when ``model``
    is ``"responses"``. Each run opens its own ``MCPServerStreamableHttp`` (the SDK sends
    one request of a server at a time: shared, the runs' tool calls would queue behind each
    other in this process), with ``client_session_timeout_seconds=session_timeout``. Each
    run's answer, tool calls (name and arguments) and tool outputs are reported.
    """
    from agents import (
        Agent,
        OpenAIChatCompletionsModel,
        OpenAIResponsesModel,
        Runner,
        set_tracing_disabled,
    )
    from agents.items import ToolCallItem, ToolCallOutputItem
    from agents.mcp import MCPServerStreamableHttp

    set_tracing_disabled(True)  # else the SDK uploads traces to api.openai.com
    lim = Limiter.from_url(cfg["url"], limits_of(cfg["limits"]))
    client = openai_client(lim, base_url=cfg["openai_url"], api_key=KEY)
    kind = OpenAIResponsesModel if cfg["model"] == "responses" else OpenAIChatCompletionsModel
    model = kind(model=MODEL, openai_client=client)
    factory = mcp_http_client_factory(lim, "zapier")

    async def run(i: int) -> dict[str, Any]:
        address = f"{cfg['name']}-{i}@example.com"
        async with MCPServerStreamableHttp(
            params={
                "url": cfg["zapier_url"],
                "headers": {"Authorization": f"Bearer {TOKEN}"},
                "httpx_client_factory": factory,
            },
            name="zapier",
            client_session_timeout_seconds=cfg["session_timeout"],
        ) as zapier:
            agent = Agent(
                name="assistant", instructions=INSTRUCTIONS, model=model, mcp_servers=[zapier]
            )
            result = await Runner.run(agent, f"Send an email to {address} saying hi.")
        calls = [
            [getattr(item.raw_item, "name", None), getattr(item.raw_item, "arguments", None)]
            for item in result.new_items
            if isinstance(item, ToolCallItem)
        ]
        outputs = [
            str(item.output) for item in result.new_items if isinstance(item, ToolCallOutputItem)
        ]
        return {
            "address": address,
            "final": result.final_output,
            "calls": calls,
            "outputs": outputs,
        }

    try:
        await lim.stats("zapier")  # connected, scripts loaded before the barrier
        await barrier(r, cfg)
        outcomes = await asyncio.gather(
            *(run(i) for i in range(cfg["runs"])), return_exceptions=True
        )
    finally:
        await client.close()
        await lim.aclose()
    return {
        "runs": [o for o in outcomes if not isinstance(o, BaseException)],
        "errors": [describe(o) for o in outcomes if isinstance(o, BaseException)],
    }


async def role_langchain(cfg: Config, r: aioredis.Redis) -> Result:
    """``calls`` concurrent calls of one ``ChatOpenAI`` built on ``openai_client``.

    Call ``i`` is, by ``i % 3``: ``ainvoke`` (chat completions), ``astream`` (chat
    completions, ``stream_usage=True``), ``ainvoke`` through the Responses API. Each
    call's prompt, kind, text and ``usage_metadata["total_tokens"]`` are reported.
    """
    from langchain_openai import ChatOpenAI

    lim = Limiter.from_url(cfg["url"], limits_of(cfg["limits"]))
    client = openai_client(lim, base_url=cfg["openai_url"], api_key=KEY)
    chat = ChatOpenAI(
        model=MODEL,
        root_async_client=client,
        async_client=client.chat.completions,
        stream_usage=True,
    )
    responses = ChatOpenAI(
        model=MODEL,
        root_async_client=client,
        async_client=client.chat.completions,
        use_responses_api=True,
    )

    async def call(i: int) -> dict[str, Any]:
        prompt = f"hello from {cfg['name']} call {i}"
        kind = ("invoke", "stream", "responses")[i % 3]
        if kind == "stream":
            chunks = [chunk async for chunk in chat.astream(prompt)]
            text = "".join(str(c.content) for c in chunks)
            usage = [c.usage_metadata for c in chunks if c.usage_metadata]
            tokens = sum(u["total_tokens"] for u in usage)
        else:
            reply = await (responses if kind == "responses" else chat).ainvoke(prompt)
            text = reply.text
            tokens = reply.usage_metadata["total_tokens"] if reply.usage_metadata else None
        return {"prompt": prompt, "kind": kind, "text": text, "tokens": tokens}

    try:
        await lim.stats("openai")  # connected, scripts loaded before the barrier
        await barrier(r, cfg)
        outcomes = await asyncio.gather(
            *(call(i) for i in range(cfg["calls"])), return_exceptions=True
        )
    finally:
        await client.close()
        await lim.aclose()
    return {
        "calls": [o for o in outcomes if not isinstance(o, BaseException)],
        "errors": [describe(o) for o in outcomes if isinstance(o, BaseException)],
    }


async def role_chat_for(cfg: Config, r: aioredis.Redis) -> Result:
    """``tasks`` loops of ``chat.completions.create`` on ``openai_client`` for ``seconds``
    after the go, then cancel what is still waiting. Reports ``ok`` (answers) and the
    errors by type (a 429 the retries could not get past is ``RateLimitError``)."""
    lim = Limiter.from_url(cfg["url"], limits_of(cfg["limits"]))
    client = openai_client(lim, base_url=cfg["openai_url"], api_key=KEY)
    ok, errors = 0, []

    async def loop(i: int) -> None:
        nonlocal ok
        while True:
            try:
                await client.chat.completions.create(
                    model=MODEL, messages=[{"role": "user", "content": f"{cfg['name']} {i}"}]
                )
                ok += 1
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # reported, and the loop goes on like a caller's
                errors.append(describe(exc))

    try:
        await lim.stats("openai")  # connected, scripts loaded before the barrier
        await barrier(r, cfg)
        tasks = [asyncio.create_task(loop(i)) for i in range(cfg["tasks"])]
        await asyncio.sleep(cfg["seconds"])  # the run's length, not a synchronisation
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        await client.close()
        await lim.aclose()
    return {"ok": ok, "errors": errors}


ROLES: dict[str, Callable[[Config, aioredis.Redis], Awaitable[Result]]] = {
    "chat_for": role_chat_for,
    "agents": role_agents,
    "langchain": role_langchain,
}


if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1:], ROLES))
