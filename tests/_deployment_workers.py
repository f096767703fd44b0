"""Worker processes for ``tests/test_deployments_multiprocess.py``.

Run as ``python -m tests._deployment_workers ROLE CONFIG_JSON`` from the repository root,
with the protocol of :mod:`tests._workers` (whose ``main`` and ``barrier`` this module
reuses): each worker builds its own :class:`~limiter.Limiter` on the real
redis-server at ``config["url"]`` and one ``limiter.http.openai_client(deployments=...)``
on top of it, says ready, waits for the test's go, calls the fake OpenAI at
``openai_url`` (127.0.0.1) until the test pushes ``<sync>:stop:<name>``, and writes what
it got back as one JSON object to ``config["out"]``.

Role: ``chat`` (chat completions in loops, one model per loop). The two keys the fake
accepts are :data:`KEY_A` and :data:`KEY_B`, constants here so that they never travel on a
command line; deployment ``"key-a"`` sends with the first, ``"key-b"`` with the second.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import httpx2
import openai
import redis.asyncio as aioredis

from limiter import APILimits, Limiter, Rate
from limiter.http import openai_client
from tests._workers import barrier, describe, outcome, stack_of
from tests._workers import main as worker_main

__all__ = ["API", "CREDENTIALS", "KEY_A", "KEY_B", "limits_of"]

#: The key of deployment "key-a" (the fake accepts it and KEY_B only).
KEY_A = "sk-deploytest-A-SECRET-3f9c2e71d4"
#: The key of deployment "key-b".
KEY_B = "sk-deploytest-B-SECRET-8a41d0b6e2"
#: Deployment name -> the key it sends with.
CREDENTIALS = {"key-a": KEY_A, "key-b": KEY_B}
#: The API every worker limits.
API = "openai"
#: Longest a worker runs after the go without the test's stop signal, seconds.
RUN_TIMEOUT = 60.0
#: Seconds the loops get to end once cancelled.
STOP_WITHIN = 10.0

Config = dict[str, Any]
Result = dict[str, Any]


def api_limits(fields: Mapping[str, Any]) -> APILimits:
    """An APILimits from JSON: ``rates`` is ``[[limit, period], ...]``; ``deployments`` and
    ``models`` map names to nested specs of the same shape."""
    kwargs = dict(fields)
    kwargs["rates"] = [Rate(n, p) for n, p in kwargs.get("rates", [])]
    for nested in ("deployments", "models"):
        if nested in kwargs:
            kwargs[nested] = {name: api_limits(sub) for name, sub in kwargs[nested].items()}
    return APILimits(**kwargs)


def limits_of(spec: Mapping[str, Mapping[str, Any]]) -> dict[str, APILimits]:
    """``{api: APILimits}`` from a JSON spec (see :func:`api_limits`)."""
    return {api: api_limits(fields) for api, fields in spec.items()}


_CANNED = {
    "id": "chatcmpl-warmup",
    "object": "chat.completion",
    "created": 0,
    "model": "gpt-4o-mini",
    "choices": [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "warm"},
            "logprobs": None,
            "finish_reason": "stop",
        }
    ],
    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
}


async def warm_up() -> None:
    """The SDK's first-call work (lazy imports, request and response models) done before
    the barrier, on a transport that answers in-process: neither the limiter nor the fake
    sees it. Otherwise the first requests after the go reach the fake late by that much,
    which the window margin would have to cover."""
    transport = httpx2.MockTransport(lambda request: httpx2.Response(200, json=_CANNED))
    async with (
        httpx2.AsyncClient(transport=transport) as http,
        openai.AsyncOpenAI(
            api_key="warm-up", base_url="http://127.0.0.1:9/v1", http_client=http, max_retries=0
        ) as sdk,
    ):
        await sdk.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "warm up"}]
        )


async def until_stopped(r: aioredis.Redis, cfg: Config) -> None:
    """Return once the test pushed ``<sync>:stop:<name>``. Short BLPOPs: redis-py's
    default socket timeout (5 s) would cut a longer one, and a run lasts longer."""
    key = f"{cfg['sync']}:stop:{cfg['name']}"
    deadline = time.monotonic() + RUN_TIMEOUT
    while await r.blpop([key], timeout=1) is None:
        if time.monotonic() > deadline:
            raise RuntimeError(f"no stop signal from the test within {RUN_TIMEOUT}s")


async def role_chat(cfg: Config, r: aioredis.Redis) -> Result:
    """One loop per entry of ``models``, each calling ``chat.completions.create`` with that
    model, one call after another, from the go until the test pushes
    ``<sync>:stop:<name>``; then the calls still running (waiting for a slot, or in
    flight) are cancelled, and a loop whose cancel was lost on the way ends after its
    call. Reports ``ok`` (answers, by model), ``errors`` (calls the limiter's retries
    could not get through, described), ``ended`` (how each loop ended: "CancelledError",
    or "returned" when its cancel was lost) and ``stuck`` (the stacks of loops still
    running STOP_WITHIN seconds after their cancel)."""
    lim = Limiter.from_url(cfg["url"], limits_of(cfg["limits"]))
    client = openai_client(
        lim,
        API,
        base_url=cfg["openai_url"],
        deployments={name: {"api_key": key} for name, key in CREDENTIALS.items()},
    )
    ok: Counter[str] = Counter()
    errors: list[str] = []
    stopping = False

    async def loop(i: int, model: str) -> None:
        while not stopping:
            try:
                await client.chat.completions.create(
                    model=model, messages=[{"role": "user", "content": f"{cfg['name']} {i}"}]
                )
                ok[model] += 1
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # reported, and the loop goes on like a caller's
                errors.append(describe(exc))
                await asyncio.sleep(0)  # an error raised before any I/O: let others run

    tasks: list[asyncio.Task[None]] = []
    stuck: list[str] = []
    try:
        await warm_up()
        await lim.stats(API)  # connected, scripts loaded before the barrier
        await barrier(r, cfg)
        tasks = [asyncio.create_task(loop(i, m)) for i, m in enumerate(cfg["models"])]
        await until_stopped(r, cfg)
    finally:
        stopping = True
        for task in tasks:
            task.cancel()
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=STOP_WITHIN)
            stuck = [stack_of(task) for task in pending]
        await client.close()
        await lim.aclose()
    # Each loop ends by its cancel; "returned" means a cancel was swallowed on the way.
    return {"ok": dict(ok), "errors": errors, "ended": [outcome(t) for t in tasks], "stuck": stuck}


ROLES: dict[str, Callable[[Config, aioredis.Redis], Awaitable[Result]]] = {"chat": role_chat}


if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1:], ROLES))
