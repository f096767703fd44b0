"""Worker processes for ``tests/test_anthropic.py``: ``anthropic_client`` calls, one limiter each.

Run as ``python -m tests._anthropic_workers ROLE CONFIG_JSON`` from the repository root, with
the protocol of :mod:`tests._workers` (whose ``main`` and helpers this module reuses): every
worker builds its own limiter on the real redis-server at ``config["url"]`` and its own
``anthropic_client`` on the fake Anthropic API at ``config["base_url"]`` (127.0.0.1), waits
for the go signal, and writes what it observed to ``config["out"]``.

Times: ``*_ns`` are ``time.monotonic_ns()`` (CLOCK_MONOTONIC, the fake's clock too).
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import redis.asyncio as aioredis

from limiter import APILimits, Limiter, Rate
from limiter.http import anthropic_client
from tests._workers import barrier, describe
from tests._workers import main as worker_main

Config = dict[str, Any]
Result = dict[str, Any]


def limits_of(spec: dict[str, Any]) -> APILimits:
    """``APILimits`` from a JSON spec; ``rates`` is ``[[limit, period], ...]``."""
    kwargs = dict(spec)
    kwargs["rates"] = [Rate(n, p) for n, p in kwargs.get("rates", [])]
    return APILimits(**kwargs)


def prompt(name: str, task: int, call: int) -> str:
    """A different message per call, of varying length (so tokens vary)."""
    return f"{name} task {task} call {call}: " + "lorem ipsum " * ((task * 3 + call) % 5)


async def role_messages(cfg: Config, r: aioredis.Redis) -> Result:
    """``tasks`` tasks each make ``calls`` Messages calls, streamed every other one.

    Each call is recorded as ``{"stream", "input", "output", "start_ns", "end_ns"}`` (the
    usage the SDK parsed: from the JSON, or from the stream's final message).
    """
    api = cfg["api"]
    lim = Limiter.from_url(cfg["url"], {api: limits_of(cfg["limits"])})
    client = anthropic_client(lim, api, base_url=cfg["base_url"], api_key=cfg["key"])
    calls: list[dict[str, Any]] = []

    async def task(i: int) -> None:
        for j in range(cfg["calls"]):
            stream = (i + j) % 2 == 1
            messages = [{"role": "user", "content": prompt(cfg["name"], i, j)}]
            start = time.monotonic_ns()
            if stream:
                async with client.messages.stream(
                    model=cfg["model"], max_tokens=cfg["max_tokens"], messages=messages
                ) as events:
                    async for _ in events.text_stream:
                        pass
                    message = await events.get_final_message()
            else:
                message = await client.messages.create(
                    model=cfg["model"], max_tokens=cfg["max_tokens"], messages=messages
                )
            usage = message.usage
            calls.append(
                {
                    "stream": stream,
                    "input": usage.input_tokens,
                    "output": usage.output_tokens,
                    "start_ns": start,
                    "end_ns": time.monotonic_ns(),
                }
            )

    try:
        await lim.stats(api)  # connected and scripts loaded before the barrier
        await barrier(r, cfg)
        outcomes = await asyncio.gather(
            *(task(i) for i in range(cfg["tasks"])), return_exceptions=True
        )
    finally:
        await client.close()
        await lim.aclose()
    errors = [describe(o) for o in outcomes if isinstance(o, BaseException)]
    return {"calls": calls, "errors": errors}


ROLES: dict[str, Callable[[Config, aioredis.Redis], Awaitable[Result]]] = {
    "messages": role_messages,
}


if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1:], ROLES))
