"""``openai_client(deployments=)``: the real openai SDK through LimitedTransport, each
request sent with the key and base URL of the deployment its slot was admitted to.

The fake OpenAI servers (real HTTP on 127.0.0.1) are the referees: their records say which
key each request came with, and how many they refused. Each test runs on fakeredis and on
a real redis-server.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from chatbot.fakes.openai_server import FakeOpenAIConfig
from limiter import APILimits, ConfigError
from limiter.http import openai_client
from tests._servers import Running, serve_fake_openai
from tests.conftest import LimiterFactory

KA, KB = "sk-fake-key-a-0001", "sk-fake-key-b-0002"


async def ask(client: Any, model: str = "gpt-4o-mini") -> str:
    reply = await client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "hi"}]
    )
    return str(reply.choices[0].message.content)


def two_servers(lim: Any, a: Running, b: Running) -> Any:
    """``openai_client`` of API "ai" with key-a (KA) on server ``a`` and key-b (KB) on
    server ``b``, each its own base URL."""
    return openai_client(
        lim,
        "ai",
        deployments={
            "key-a": {"api_key": KA, "base_url": f"{a.url}/v1"},
            "key-b": {"api_key": KB, "base_url": f"{b.url}/v1"},
        },
    )


def admitted_by_key(record: dict[str, Any]) -> dict[str, int]:
    return {key: stats["admitted"] for key, stats in record["by_key"].items() if stats["admitted"]}


async def test_each_request_goes_out_with_its_deployments_key(
    make_limiter: LimiterFactory,
) -> None:
    """Two keys of 5 requests a minute each at the provider, and in the limiter: 10 calls
    at once all succeed, 5 sent with each key, and the provider refuses none."""
    config = FakeOpenAIConfig(api_keys=(KA, KB), scope="key", rpm=5)
    each = APILimits(requests_per_minute=5)
    lim = make_limiter({"ai": APILimits(deployments={"key-a": each, "key-b": each})})
    async with serve_fake_openai(config) as fake:
        client = openai_client(
            lim,
            "ai",
            base_url=f"{fake.url}/v1",
            deployments={"key-a": {"api_key": KA}, "key-b": {"api_key": KB}},
        )
        async with client:
            await asyncio.gather(*(ask(client) for _ in range(10)))
        record = await fake.record()
    assert sorted(admitted_by_key(record).values()) == [5, 5]
    assert record["rejected_total"] == 0
    assert record["unauthorized"] == 0


async def test_a_deployment_may_have_its_own_base_url(make_limiter: LimiterFactory) -> None:
    """key-b lives on another server (an Azure-style deployment): 6 calls, one at a time,
    split 3 and 3 between the two servers, each with its own key."""
    each = APILimits(requests_per_minute=3)
    lim = make_limiter({"ai": APILimits(deployments={"key-a": each, "key-b": each})})
    async with (
        serve_fake_openai(FakeOpenAIConfig(api_keys=(KA,))) as a,
        serve_fake_openai(FakeOpenAIConfig(api_keys=(KB,))) as b,
    ):
        client = two_servers(lim, a, b)
        async with client:
            for _ in range(6):
                await ask(client)
        ra, rb = await a.record(), await b.record()
    assert (ra["admitted"], rb["admitted"]) == (3, 3)
    assert ra["unauthorized"] == rb["unauthorized"] == 0


async def test_a_429_on_one_key_leaves_the_other_serving(make_limiter: LimiterFactory) -> None:
    """key-a's provider limit drops to 1 request a minute after one call on each key (we
    configured 50): its next request gets a 429, which pauses key-a only; that call is
    retried on key-b at once (the API is not paused) and all 6 calls succeed, with
    exactly one 429."""
    each = APILimits(requests_per_minute=50)
    deployments = {"key-a": each, "key-b": each}
    limits = APILimits(backoff_min=0.01, backoff_max=0.05, deployments=deployments)
    lim = make_limiter({"ai": limits})
    async with (
        serve_fake_openai(FakeOpenAIConfig(api_keys=(KA,), rpm=100)) as a,
        serve_fake_openai(FakeOpenAIConfig(api_keys=(KB,), rpm=100)) as b,
    ):
        client = two_servers(lim, a, b)
        async with client:
            for _ in range(2):  # the least used key each time: one call on each
                await ask(client)
            assert (await a.admin("POST", "/admin/config", {"rpm": 1}))[0] == 200
            for _ in range(4):
                await ask(client)
        ra, rb = await a.record(), await b.record()
        stats = await lim.stats("ai")
    # key-a is the least used (1 of 50) at the latest at the 4th call: one 429, paused.
    assert (ra["admitted"], ra["rejected_total"]) == (1, 1)
    assert (rb["admitted"], rb["rejected_total"]) == (5, 0)
    assert stats["cooldown_remaining"] == 0  # the API as a whole never paused


async def test_a_key_whose_headers_say_none_left_is_paused_alone(
    make_limiter: LimiterFactory,
) -> None:
    """key-a's provider allows 1 request a minute: its answer says none are left, which
    pauses key-a only (no 429 at all); the other 5 calls go to key-b."""
    each = APILimits(requests_per_minute=50)
    lim = make_limiter({"ai": APILimits(deployments={"key-a": each, "key-b": each})})
    async with (
        serve_fake_openai(FakeOpenAIConfig(api_keys=(KA,), rpm=1)) as a,
        serve_fake_openai(FakeOpenAIConfig(api_keys=(KB,), rpm=100)) as b,
    ):
        client = two_servers(lim, a, b)
        async with client:
            for _ in range(6):
                await ask(client)
        ra, rb = await a.record(), await b.record()
        stats = await lim.stats("ai")
    assert (ra["admitted"], ra["rejected_total"]) == (1, 0)
    assert (rb["admitted"], rb["rejected_total"]) == (5, 0)
    assert stats["cooldown_remaining"] == 0


async def test_bad_deployment_credentials_are_named_without_the_key(
    make_limiter: LimiterFactory,
) -> None:
    """A deployment missing from the mapping, or a field of the wrong type, is a
    ConfigError naming the field; no key's value appears in it."""
    each = APILimits(max_concurrent=1)
    lim = make_limiter({"ai": APILimits(deployments={"key-a": each, "key-b": each})})
    with pytest.raises(ConfigError, match="key-b") as info:
        openai_client(lim, "ai", deployments={"key-a": {"api_key": KA}})
    assert KA not in str(info.value)
    with pytest.raises(ConfigError, match="api_key") as info:
        openai_client(lim, "ai", deployments={"key-a": {"api_key": KA}, "key-b": {"api_key": 42}})
    assert KA not in str(info.value)
    with pytest.raises(ConfigError, match="'key'") as info:
        openai_client(lim, "ai", deployments={"key-a": {"key": KA}, "key-b": {}})
    assert KA not in str(info.value)


async def test_a_keywide_429_pauses_the_whole_key_not_only_the_model(
    make_limiter: LimiterFactory,
) -> None:
    """key-a's limit as a whole drops to 1 a minute while its gpt-4o budget still has room
    (the 429's headers say so): the 429 pauses all of key-a, so the gpt-4o-mini calls that
    follow go to key-b instead of meeting the same 429. Exactly one 429 in all."""
    each = APILimits(requests_per_minute=50, models={"gpt-4o": APILimits(requests_per_minute=50)})
    limits = APILimits(
        backoff_min=0.01, backoff_max=0.05, deployments={"key-a": each, "key-b": each}
    )
    lim = make_limiter({"ai": limits})
    model_limits = {"gpt-4o": {"rpm": 100}}
    async with (
        serve_fake_openai(
            FakeOpenAIConfig(api_keys=(KA,), rpm=100, model_limits=model_limits)
        ) as a,
        serve_fake_openai(FakeOpenAIConfig(api_keys=(KB,), rpm=100)) as b,
    ):
        client = two_servers(lim, a, b)
        async with client:
            for _ in range(2):  # one on each key
                await ask(client, "gpt-4o")
            assert (await a.admin("POST", "/admin/config", {"rpm": 1}))[0] == 200
            for _ in range(2):  # the second at the latest goes to key-a: its 429
                await ask(client, "gpt-4o")
            for _ in range(3):
                await ask(client, "gpt-4o-mini")
        ra, rb = await a.record(), await b.record()
    assert (ra["admitted"], ra["rejected_total"]) == (1, 1)
    assert (rb["admitted"], rb["rejected_total"]) == (6, 0)
