"""The chatbot replica in-process: ``chatbot.app.create_app`` behind httpx2's ASGI transport.

The app's own lifespan runs (a real ``Limiter.from_url`` on the session's redis-server);
the fake OpenAI API and the fake Zapier MCP server run with uvicorn in the test's event
loop on free 127.0.0.1 ports and referee what reached them (``/admin/record``). Both come
from the ``providers`` fixture (``conftest``) and ``running`` (``tests._replica``).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import socket
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from chatbot.agent import tenant_for
from chatbot.metrics import Metrics
from chatbot.settings import Settings
from limiter import APILimits, ConfigError
from limiter._admin import is_registry_key
from tests._replica import KEY, NAMESPACE, TOKEN, Providers, running
from tests.conftest import LimiterFactory, wait_for_waiters

pytestmark = pytest.mark.redis

WRONG_KEY = "sk-apptest-WRONG-0b1c2d3e4f5a6978"
EMAIL_TEXT = "Please send an email to ana@example.com saying the order shipped"


def samples(exposition: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Prometheus exposition text -> {(sample name, sorted labels): value}."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(exposition)
        for s in family.samples
    }


@pytest.mark.parametrize(
    ("body", "loc", "error_type"),
    [
        pytest.param({"text": "hi"}, ["body", "user_id"], "missing", id="missing-user_id"),
        pytest.param(
            {"user_id": "ana", "text": ""}, ["body", "text"], "string_too_short", id="empty-text"
        ),
        pytest.param(
            {"user_id": "ana", "text": "hi", "images": ["not a url"]},
            ["body", "images", 0],
            "url_parsing",
            id="image-not-url",
        ),
        pytest.param(
            {"user_id": "ana", "text": "hi", "mood": "happy"},
            ["body", "mood"],
            "extra_forbidden",
            id="unknown-field",
        ),
    ],
)
async def test_malformed_body_gets_422_naming_the_field_and_changes_nothing(
    providers: Providers, body: dict[str, Any], loc: list[Any], error_type: str
) -> None:
    """A malformed POST /messages gets 422 whose only error names the field, and no key is
    written to Redis, no request reaches either fake, no message is counted."""
    async with running(providers.settings()) as (_, client):
        response = await client.post("/messages", json=body)
        metrics = (await client.get("/metrics")).text
    assert response.status_code == 422
    errors = response.json()["detail"]
    assert [(e["loc"], e["type"]) for e in errors] == [(loc, error_type)]
    # Nothing but the registry the limiter writes when it first reaches Redis.
    assert [k for k in await providers.redis.keys("*") if not is_registry_key(k)] == []
    openai_record = providers.openai_record()
    assert openai_record["requests_total"] == 0
    assert openai_record["unauthorized"] == 0
    zapier_record = providers.zapier_record()
    assert zapier_record["executed"] == 0
    assert zapier_record["free_requests"] == {}
    assert not any(name == "chatbot_messages_total" for name, _ in samples(metrics))


async def test_valid_message_gets_a_reply_and_history_is_stored_in_redis(
    providers: Providers,
) -> None:
    """Two messages of one user get the fake model's replies, exactly one OpenAI request
    each, and the four turns are stored, in order, under <namespace>:chat:{user}:history."""
    async with running(providers.settings()) as (_, client):
        first = await client.post("/messages", json={"user_id": "ana", "text": "Hello there"})
        second = await client.post("/messages", json={"user_id": "ana", "text": "And again"})
    assert first.status_code == 200, first.text
    assert second.status_code == 200, second.text
    body = first.json()
    assert body["user_id"] == "ana"
    assert body["reply"] == "You said: Hello there"
    assert body["tool_calls"] == []
    assert body["replica"] == "replica-test"
    assert second.json()["reply"] == "You said: And again"
    key = f"{NAMESPACE}:chat:{{ana}}:history"
    assert await providers.redis.keys(f"{NAMESPACE}:chat:*") == [key.encode()]
    history = [json.loads(item) for item in await providers.redis.lrange(key, 0, -1)]
    assert history == [
        {"role": "user", "content": "Hello there"},
        {"role": "assistant", "content": "You said: Hello there"},
        {"role": "user", "content": "And again"},
        {"role": "assistant", "content": "You said: And again"},
    ]
    assert 0 < await providers.redis.ttl(key) <= 86_400
    record = providers.openai_record()
    assert record["admitted"] == 2
    assert record["by_endpoint"]["/v1/chat/completions"] == 2
    assert providers.zapier_record()["executed"] == 0


async def test_message_asking_for_an_email_makes_one_zapier_tool_call(
    providers: Providers,
) -> None:
    """A "send an email to ..." message runs send_email once through the real MCP client
    (recorded by the fake Zapier with the address) between exactly two OpenAI requests."""
    async with running(providers.settings()) as (_, client):
        response = await client.post("/messages", json={"user_id": "bo", "text": EMAIL_TEXT})
    assert response.status_code == 200, response.text
    body = response.json()
    assert [(c["tool"], c["ok"]) for c in body["tool_calls"]] == [("send_email", True)]
    assert body["tool_calls"][0]["arguments"]["to"] == "ana@example.com"
    assert body["reply"].startswith("The send_email tool returned:")
    zapier = providers.zapier_record()
    assert zapier["executed"] == 1
    assert zapier["rejected_429"] == 0
    execution = zapier["executions"][0]
    assert execution["tool"] == "send_email"
    assert execution["arguments"]["to"] == "ana@example.com"
    assert execution["gated"] is True
    assert providers.openai_record()["admitted"] == 2


async def test_health_is_200_when_redis_and_both_providers_answer(providers: Providers) -> None:
    """/health is 200 with redis, openai and zapier all "ok"."""
    async with running(providers.settings()) as (_, client):
        response = await client.get("/health")
    assert response.status_code == 200
    assert response.json() == {
        "status": "ok",
        "replica": "replica-test",
        "redis": "ok",
        "openai": "ok",
        "zapier": "ok",
    }


async def test_health_is_503_naming_openai_when_the_fake_openai_is_stopped(
    providers: Providers,
) -> None:
    """With the fake OpenAI stopped, /health is 503 "degraded", openai "unreachable (...)",
    redis and zapier still "ok"."""
    async with running(providers.settings()) as (_, client):
        assert (await client.get("/health")).status_code == 200
        await providers.openai.stop()
        response = await client.get("/health")
    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "degraded"
    assert body["openai"].startswith("unreachable (")
    assert (body["redis"], body["zapier"]) == ("ok", "ok")


async def test_health_is_503_naming_openai_when_the_api_key_is_wrong(
    providers: Providers,
) -> None:
    """With a key the fake refuses, /health is 503 with openai "HTTP 401" (exactly one 401
    recorded), redis and zapier "ok"."""
    async with running(providers.settings(openai_api_key=WRONG_KEY)) as (_, client):
        response = await client.get("/health")
    assert response.status_code == 503
    body = response.json()
    assert body == {
        "status": "degraded",
        "replica": "replica-test",
        "redis": "ok",
        "openai": "HTTP 401",
        "zapier": "ok",
    }
    assert providers.openai_record()["unauthorized"] == 1


async def test_metrics_expose_limiter_and_chatbot_series(providers: Providers) -> None:
    """After one plain message, /metrics has limiter_admissions_total{openai} 1,
    limiter_in_flight{openai} 0, limiter_cluster_in_flight 0 for both APIs and
    chatbot_messages_total{ok} 1."""
    async with running(providers.settings()) as (_, client):
        response = await client.post("/messages", json={"user_id": "cy", "text": "Hi"})
        assert response.status_code == 200, response.text
        metrics = await client.get("/metrics")
    assert metrics.status_code == 200
    assert metrics.headers["content-type"].startswith("text/plain")
    values = samples(metrics.text)
    assert values[("limiter_admissions_total", (("api", "openai"),))] == 1.0
    assert values[("limiter_in_flight", (("api", "openai"),))] == 0.0
    assert values[("limiter_cluster_in_flight", (("api", "openai"),))] == 0.0
    assert values[("limiter_cluster_in_flight", (("api", "zapier"),))] == 0.0
    assert values[("chatbot_messages_total", (("status", "ok"),))] == 1.0
    assert values[("limiter_limit", (("api", "openai"), ("limit", "max_concurrent")))] == 4.0


async def test_wait_histogram_counts_admissions_by_priority_band(
    make_limiter: LimiterFactory,
) -> None:
    """limiter_wait_seconds{api, priority} counts each admission under its priority's
    band of powers of ten (9 values at most), and a queued wait lands in its band."""
    lim = make_limiter({"openai": APILimits(max_concurrent=1)})
    metrics = Metrics(lim)
    for priority in (None, 0, 7, 10, 99, -1, 1000, -1000):
        await (await lim.acquire("openai", timeout=0, priority=priority)).release()
    held = await lim.acquire("openai", timeout=0, priority=500)
    waiter = asyncio.create_task(lim.acquire("openai", timeout=10, priority=50))
    await wait_for_waiters(lim, "openai", 1)
    await asyncio.sleep(0.2)
    await held.release()
    await (await waiter).release()
    values = samples((await metrics.render()).decode())
    counts = {
        dict(labels)["priority"]: value
        for (name, labels), value in values.items()
        if name == "limiter_wait_seconds_count"
    }
    assert counts == {
        "-1000": 1.0,
        "-9..-1": 1.0,
        "0": 2.0,
        "1..9": 1.0,
        "10..99": 3.0,
        "100..999": 1.0,
        "1000": 1.0,
    }
    assert values[("limiter_admissions_total", (("api", "openai"),))] == 10.0
    band = (("api", "openai"), ("priority", "10..99"))
    le = (("api", "openai"), ("le", "0.1"), ("priority", "10..99"))
    assert values[("limiter_wait_seconds_bucket", le)] == 2.0  # 10 and 99 did not wait
    assert values[("limiter_wait_seconds_sum", band)] >= 0.2  # 50 waited for the release


async def test_stats_are_cluster_wide(providers: Providers) -> None:
    """A message answered by replica A shows in replica B's /stats: openai 1 request,
    1 successful, 0 in flight, max_concurrent 4; zapier 0 requests."""
    async with (
        running(providers.settings(replica="replica-a")) as (_, a),
        running(providers.settings(replica="replica-b")) as (_, b),
    ):
        response = await a.post("/messages", json={"user_id": "di", "text": "Hi"})
        assert response.status_code == 200, response.text
        stats = await b.get("/stats")
    assert stats.status_code == 200
    body = stats.json()
    assert body["replica"] == "replica-b"
    assert set(body["apis"]) == {"openai", "zapier"}
    openai_stats = body["apis"]["openai"]
    assert openai_stats["total_requests"] == 1
    assert openai_stats["successful_requests"] == 1
    assert openai_stats["failed_requests"] == 0
    assert openai_stats["concurrent_requests"] == 0
    assert openai_stats["max_concurrent"] == 4
    assert openai_stats["waiting"] == 0
    assert body["apis"]["zapier"]["total_requests"] == 0


async def test_the_openai_key_never_appears_in_responses_metrics_or_settings_repr(
    providers: Providers,
) -> None:
    """Neither the accepted key nor a refused one (nor the Zapier token) appears in any body
    of /messages (200, 422, 502), /health (200, 503), /stats, /metrics or repr(Settings)."""
    good, bad = providers.settings(), providers.settings(openai_api_key=WRONG_KEY)
    bodies: list[str] = []
    async with running(good) as (_, client):
        for method, path, payload in (
            ("POST", "/messages", {"user_id": "ed", "text": EMAIL_TEXT}),
            ("POST", "/messages", {"user_id": "ed", "text": "", "x": 1}),
            ("GET", "/health", None),
            ("GET", "/stats", None),
            ("GET", "/metrics", None),
        ):
            response = await client.request(method, path, json=payload)
            assert response.status_code in (200, 422), (path, response.text)
            bodies.append(response.text)
    async with running(bad) as (_, client):
        refused = await client.post("/messages", json={"user_id": "fi", "text": "Hi"})
        assert refused.status_code == 502
        assert "OpenAI" in refused.json()["detail"]
        health = await client.get("/health")
        assert health.status_code == 503
        metrics = await client.get("/metrics")
        bodies += [refused.text, health.text, metrics.text]
    assert len(bodies) == 8
    for text in [*bodies, repr(good), repr(bad), str(good)]:
        for secret in (KEY, WRONG_KEY, TOKEN):
            assert secret not in text
            assert secret[-16:] not in text


async def test_zapier_unreachable_answers_502_naming_it(providers: Providers) -> None:
    """A message that needs a tool while Zapier's MCP server is down gets a 502 that says
    so (not a 500), and leaves no slot or turn held."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]  # closed when the block ends: nothing listens there
    settings = providers.settings(zapier_mcp_url=f"http://127.0.0.1:{dead}/mcp")
    async with running(settings) as (app, client):
        response = await client.post("/messages", json={"user_id": "cy", "text": EMAIL_TEXT})
        assert response.status_code == 502, response.text
        assert "Zapier MCP unavailable" in response.json()["detail"]
        assert TOKEN not in response.text
        turn = await app.state.turns.stats("conversation", key="cy")
        zapier = await app.state.limiter.stats("zapier")
    assert (turn["concurrent_requests"], zapier["concurrent_requests"]) == (0, 0)


# --------------------------------------------------------------------------- fair queue


async def _queued(
    lim: Any, api: str, tenant: str, priority: int, within: float = 5.0
) -> dict[str, Any]:
    """``lim.stats(api)`` once ``tenant`` has a waiter queued in it at ``priority``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        stats = await lim.stats(api)
        if (
            stats["tenants"].get(tenant, {}).get("waiting") == 1
            and stats["waiting_by_priority"].get(priority) == 1
        ):
            return stats
        assert loop.time() < deadline, stats
        await asyncio.sleep(0.005)


async def test_a_message_queues_as_its_user_at_priority_10_for_openai_and_zapier(
    providers: Providers,
) -> None:
    """With every OpenAI and Zapier slot held, an email message waits for OpenAI, then for
    its Zapier tool call (which the MCP session's own task sends), each time as tenant
    "bo" at priority 10 in stats(); every admission it gets carries priority 10; its
    limiter_wait (in the reply) counts both waits."""
    async with running(providers.settings()) as (app, client):
        lim = app.state.limiter
        openai_held = [await lim.acquire("openai", timeout=0) for _ in range(4)]
        zapier_held = [await lim.acquire("zapier", timeout=0) for _ in range(2)]
        admitted: list[tuple[str, int]] = []
        lim.add_listener(
            lambda event, api, fields: (
                admitted.append((api, fields["priority"])) if event == "admitted" else None
            )
        )
        message = asyncio.create_task(
            client.post("/messages", json={"user_id": "bo", "text": EMAIL_TEXT})
        )
        openai_stats = await _queued(lim, "openai", "bo", 10)
        await asyncio.sleep(0.2)  # held back at least this long
        for slot in openai_held:
            await slot.release()
        zapier_stats = await _queued(lim, "zapier", "bo", 10)
        await asyncio.sleep(0.2)
        for slot in zapier_held:
            await slot.release()
        response = await message
    assert openai_stats["waiting_by_priority"] == {10: 1}
    assert zapier_stats["waiting_by_priority"] == {10: 1}
    assert list(zapier_stats["tenants"]) == ["bo"]  # not the MCP session's task's ""
    assert response.status_code == 200, response.text
    body = response.json()
    assert [c["tool"] for c in body["tool_calls"]] == ["send_email"]
    assert sorted(admitted) == [("openai", 10), ("openai", 10), ("zapier", 10)]
    assert body["limiter_wait"] >= 0.4


async def test_a_waiting_message_goes_before_a_batch_item_queued_earlier(
    providers: Providers,
) -> None:
    """POST /batch queues as its job's tenant at priority 0: with OpenAI full, a batch item
    queued first and a message queued after it, the one slot freed goes to the message
    (priority 10); both are answered, the batch item without touching any history."""
    async with running(providers.settings()) as (app, client):
        lim = app.state.limiter
        held = [await lim.acquire("openai", timeout=0) for _ in range(4)]
        order: list[int] = []
        lim.add_listener(
            lambda event, api, fields: (
                order.append(fields["priority"]) if event == "admitted" else None
            )
        )
        batch = asyncio.create_task(
            client.post("/batch", json={"job": "nightly", "text": "Summarise day 1"})
        )
        await _queued(lim, "openai", "nightly", 0)
        message = asyncio.create_task(
            client.post("/messages", json={"user_id": "cy", "text": "Hello"})
        )
        stats = await _queued(lim, "openai", "cy", 10)
        await held[0].release()
        message_response = await message  # its slot, released, goes to the batch item
        for slot in held[1:]:
            await slot.release()
        batch_response = await batch
        malformed = await client.post("/batch", json={"text": "x", "user_id": "cy"})
    assert stats["waiting_by_priority"] == {0: 1, 10: 1}
    assert message_response.status_code == 200, message_response.text
    assert batch_response.status_code == 200, batch_response.text
    assert order == [10, 0]
    body = batch_response.json()
    assert body["job"] == "nightly"
    assert body["reply"] == "You said: Summarise day 1"
    assert body["limiter_wait"] > 0
    assert await providers.redis.keys(f"{NAMESPACE}:chat:*") == [
        f"{NAMESPACE}:chat:{{cy}}:history".encode()
    ]
    assert malformed.status_code == 422


async def test_a_user_id_longer_than_a_tenant_name_is_queued_under_its_digest(
    providers: Providers,
) -> None:
    """A 200-character user id of 2-byte characters (400 bytes, more than the 256 a tenant
    name may have) is answered, its calls queued under "user-sha256:<digest>"."""
    user = "é" * 200
    tenant = tenant_for(user)
    assert tenant == "user-sha256:" + hashlib.sha256(user.encode()).hexdigest()
    assert tenant_for("ana") == "ana"
    async with running(providers.settings()) as (app, client):
        lim = app.state.limiter
        held = [await lim.acquire("openai", timeout=0) for _ in range(4)]
        message = asyncio.create_task(
            client.post("/messages", json={"user_id": user, "text": "Hi"})
        )
        await _queued(lim, "openai", tenant, 10)
        for slot in held:
            await slot.release()
        response = await message
    assert response.status_code == 200, response.text


def test_priorities_and_fair_queue_limits_come_from_the_environment() -> None:
    """INTERACTIVE_PRIORITY and BATCH_PRIORITY set the two priorities (10 and 0 by
    default; an integer from -1000 to 1000, else ConfigError naming the variable);
    LIMITS_JSON accepts tenant_weights and priority_aging."""
    default = Settings.from_env({})
    assert (default.interactive_priority, default.batch_priority) == (10, 0)
    env = {
        "INTERACTIVE_PRIORITY": "50",
        "BATCH_PRIORITY": "-5",
        "LIMITS_JSON": json.dumps({"openai": {"tenant_weights": {"vip": 4}, "priority_aging": 30}}),
    }
    settings = Settings.from_env(env)
    assert (settings.interactive_priority, settings.batch_priority) == (50, -5)
    assert dict(settings.limits["openai"].tenant_weights) == {"vip": 4.0}
    assert settings.limits["openai"].priority_aging == 30
    for bad in ("high", "1001", "2.5"):
        with pytest.raises(ConfigError, match="INTERACTIVE_PRIORITY"):
            Settings.from_env({"INTERACTIVE_PRIORITY": bad})
    with pytest.raises(ConfigError, match="batch_priority"):
        Settings(batch_priority=5000)


def test_cache_ttl_comes_from_the_environment_and_bad_values_name_it() -> None:
    """CACHE_TTL: unset, empty or blank is no response cache (None); a number of seconds
    from 0.001 to 366 days is the cache's lifetime; anything else is a ConfigError naming
    the variable and the value as given. Settings(cache_ttl=...) is checked the same way."""
    assert Settings().cache_ttl is None
    for off in ({}, {"CACHE_TTL": ""}, {"CACHE_TTL": "  "}):
        assert Settings.from_env(off).cache_ttl is None
    for raw, seconds in (("300", 300.0), ("0.5", 0.5), ("0.001", 0.001), ("31622400", 31622400)):
        assert Settings.from_env({"CACHE_TTL": raw}).cache_ttl == seconds
    for bad in ("0", "-1", "0.0005", "31622401", "nan", "inf", "5m", "true"):
        with pytest.raises(ConfigError) as info:
            Settings.from_env({"CACHE_TTL": bad})
        assert (info.value.field, info.value.value) == ("CACHE_TTL", bad)
        assert str(info.value) == (
            f"CACHE_TTL={bad!r}: must be a number of seconds from 0.001 to 366 days "
            "(unset or empty: no response cache)"
        )
    assert Settings(cache_ttl=60).cache_ttl == 60
    for wrong in (0, -2.5, True, float("nan"), "300"):
        with pytest.raises(ConfigError) as info:
            Settings(cache_ttl=wrong)  # type: ignore[arg-type]
        assert info.value.field == "cache_ttl"
        assert str(info.value).startswith(f"cache_ttl={wrong!r}: must be a number of seconds")
