"""End to end: chatbot replicas as processes, the real openai SDK and mcp client inside them,
refereed by the fake providers' own records (``GET /admin/record``).

``chatbot.cluster.Cluster`` starts Redis, both fakes and the replicas on 127.0.0.1 and free
ports, and stops them all on exit; ``chatbot.load.run_load`` plays the users.
"""

from __future__ import annotations

import asyncio
import json
import sys
import tempfile
from dataclasses import dataclass, replace
from io import StringIO
from typing import Any

import httpx2
import openai
import pytest
import redis.asyncio as aioredis
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console

from chatbot.cluster import (
    OPENAI_KEY,
    Cluster,
    ClusterConfig,
    _Proc,
    print_noisy_report,
    run_noisy,
)
from chatbot.load import LoadResult, run_load
from limiter import APILimits, Limiter
from limiter.http import openai_client
from limiter.testing import RedisServer

pytestmark = [pytest.mark.redis, pytest.mark.multiprocess, pytest.mark.slow]

USERS = 20
MESSAGES = 4
TOOL_EVERY = 2  # every other message asks for a Zapier action: 40 tool calls, 120 OpenAI calls
OPENAI_HOLDERS = b"limiter:{openai}:holders"  # the limiter's key layout (lua/_common.lua)


@dataclass(frozen=True)
class FastConfig(ClusterConfig):
    """The cluster's limits, scaled down to seconds, with a lease and margin of our choice.

    ``window_margin`` is 0.3 s rather than the demo's 0.05 s: a replica's event loop stalls
    for up to ~0.12 s (gen-2 garbage collections measured at 70-120 ms under this load), and
    a slot handed over by Redis meanwhile reaches the provider that much later than it was
    counted; with 0.05 s, 17 of 36 runs of this load got 1-3 429s (OpenAI or Zapier).
    """

    lease_ttl: float = 5.0
    window_margin: float = 0.3

    def limits_json(self) -> str:
        limits = json.loads(super().limits_json())
        for spec in limits.values():
            spec["lease_ttl"] = self.lease_ttl
            spec["window_margin"] = self.window_margin
        return json.dumps(limits)


FAST = FastConfig(
    replicas=3,
    users=USERS,
    messages=MESSAGES,
    tool_every=TOOL_EVERY,
    openai_concurrent=4,
    openai_per_window=24,
    openai_window=2.0,
    openai_latency=0.2,
    zapier_concurrent=2,
    zapier_per_minute=8,
    zapier_minute=1.5,
    zapier_per_hour=24,
    zapier_hour=6.0,
    zapier_latency=0.2,
)


def _load(cluster: Cluster) -> Any:
    c = cluster.config
    return run_load(cluster.urls, c.users, c.messages, tool_every=c.tool_every, timeout=60)


def _assert_everyone_answered_in_order(result: LoadResult, config: ClusterConfig) -> None:
    total = config.users * config.messages
    assert (result.sent, result.answered, result.errors) == (total, total, {})
    assert result.tool_calls == total // config.tool_every
    assert len(result.order) == config.users
    for user, order in result.order.items():
        assert order == list(range(config.messages)), user


def _assert_never_exceeded(
    openai_record: dict[str, Any], zapier_record: dict[str, Any], config: ClusterConfig
) -> None:
    assert openai_record["max_in_flight"] <= config.openai_concurrent
    assert openai_record["max_requests_in_window"] <= config.openai_per_window
    assert openai_record["rejected_total"] == 0, openai_record["rejections"]
    assert zapier_record["max_concurrent"] <= config.zapier_concurrent
    assert zapier_record["max_starts_in_minute_window"] <= config.zapier_per_minute
    assert zapier_record["max_starts_in_hour_window"] <= config.zapier_per_hour
    assert zapier_record["rejected_429"] == 0, zapier_record["rejected_429_by_reason"]
    assert zapier_record["ungated"] == 0


def test_three_replicas_saturate_the_providers_without_exceeding_them() -> None:
    """20 users x 4 messages over 3 replicas: every message answered in order per user, and
    the fakes saw exactly their limits (in flight 4 and 2, 24 per 2 s, 8 per 1.5 s, 24 per
    6 s) and never more, with no 429."""
    config = FAST
    with Cluster(config) as cluster:
        result = asyncio.run(_load(cluster))
        openai_record, zapier_record = cluster.records()
    _assert_everyone_answered_in_order(result, config)
    assert result.resent == 0
    _assert_never_exceeded(openai_record, zapier_record, config)
    # The load saturated every limit: each maximum is the limit itself.
    assert openai_record["admitted"] == 120
    assert openai_record["max_in_flight"] == config.openai_concurrent
    assert openai_record["max_requests_in_window"] == config.openai_per_window
    assert zapier_record["executed"] == 40
    assert zapier_record["max_concurrent"] == config.zapier_concurrent
    assert zapier_record["max_starts_in_minute_window"] == config.zapier_per_minute
    assert zapier_record["max_starts_in_hour_window"] == config.zapier_per_hour


# --------------------------------------------------------------------------- noisy user


def test_noisy_user_and_batch_job_leave_the_others_answered_and_the_limits_kept() -> None:
    """``cluster --noisy-user``, small: 12 users x 4 messages on a fresh cluster, then
    again with a user meaning to send 20x as many (4 at a time) and a batch job keeping 8
    items in flight at POST /batch (priority 0). In both runs every ordinary message is
    answered in order and the fakes saw no excess (no 429); the noisy user and the batch
    job got answers without errors; the batch items' median wait in the limiter is longer
    than the messages' (priority 0 goes after every waiting message); the report has the
    ordinary users' with and without rows with their p50/p99 waits.

    The ratio of the others' p99 waits (with / without) is printed, not asserted: over
    eleven runs on this machine it went from 0.97 to 1.39, and the p99 itself comes from
    how the fair queue breaks ties between tenants with one waiter each (by tenant name,
    in the scripts as they are: the users whose names sort last wait longest), not from
    the noisy user; a bound on it would test that tie-break.
    """
    config = replace(FAST, users=12, messages=4)
    out = StringIO()
    console = Console(file=out, width=200)
    report = run_noisy(config, console=console, noisy=20)
    print_noisy_report(report, console)
    text = out.getvalue()
    for run in (report.quiet, report.noisy):
        _assert_everyone_answered_in_order(run.load, config)
        _assert_never_exceeded(run.openai, run.zapier, config)
        assert set(run.excess.values()) == {0}, run.excess
    loud = report.noisy.load
    assert report.quiet.load.noisy is None
    assert report.quiet.load.batch is None
    noisy, batch = loud.noisy, loud.batch
    assert noisy is not None
    assert batch is not None
    assert noisy.planned == 20 * config.messages
    assert noisy.errors == {}
    assert noisy.answered == noisy.sent >= 4
    assert batch.errors == {}
    assert batch.answered >= 2 * config.openai_concurrent
    assert batch.wait_percentile(0.5) > loud.wait_percentile(0.5), (batch.waits, loud.waits)
    rows = {
        name: next(
            line
            for line in text.splitlines()
            if line.lstrip("│┃ ").startswith(f"{name} the noisy user")
        )
        for name in ("without", "with")
    }
    for name, run in (("without", report.quiet), ("with", report.noisy)):
        for q in (0.5, 0.99):
            assert f"{run.load.wait_percentile(q):.2f}s" in rows[name], (rows[name], text)
            assert f"{run.load.percentile(q):.2f}s" in rows[name], (rows[name], text)
        assert rows[name].rstrip(" │").endswith(" 0"), rows[name]  # the excess column
    assert "0 excess at the providers in both runs" in text
    print(
        f"others' wait p50/p99 without {report.quiet.load.wait_percentile(0.5):.2f}/"
        f"{report.quiet.load.wait_percentile(0.99):.2f}s, with "
        f"{loud.wait_percentile(0.5):.2f}/{loud.wait_percentile(0.99):.2f}s "
        f"(p99 x{report.p99_ratio:.2f}); noisy {noisy.answered}, batch {batch.answered}"
    )


# --------------------------------------------------------------------------- SIGKILL


async def _local_in_flight(http: httpx2.AsyncClient, url: str, api: str = "openai") -> int:
    """A replica's own ``limiter_in_flight{api}`` gauge, from its /metrics."""
    text = (await http.get(f"{url}/metrics")).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "limiter_in_flight" and sample.labels.get("api") == api:
                return int(sample.value)
    return 0


async def _wake_channels(r: aioredis.Redis) -> set[str]:
    """The limiters' wake-up channels (``limiter:wake:<process id>``), one per replica."""
    return {c.decode() for c in await r.pubsub_channels("limiter:wake:*")}


async def _leased_by(r: aioredis.Redis, process_id: str) -> set[bytes]:
    """OpenAI slots leased to ``process_id`` whose lease has not expired (in Redis time)."""
    seconds, micros = await r.time()
    live = await r.zrangebyscore(OPENAI_HOLDERS, f"({seconds * 1_000_000 + micros}", "+inf")
    return {m for m in live if m.decode().startswith(f"{process_id}.")}


async def _kill_mid_run(cluster: Cluster, config: FastConfig) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    assert cluster.redis is not None
    r = aioredis.from_url(cluster.redis.url)
    victim, victim_url = cluster.replicas[0]
    live_urls = cluster.urls[1:]
    load = asyncio.create_task(_load(cluster))
    out: dict[str, Any] = {}
    try:
        async with httpx2.AsyncClient(timeout=5) as http:
            # Mid-run: every replica has queued (subscribed) and the victim holds 2+ slots.
            deadline = loop.time() + 15
            while True:
                channels = await _wake_channels(r)
                held = await _local_in_flight(http, victim_url)
                if len(channels) == config.replicas and held >= 2:
                    break
                assert loop.time() < deadline, (channels, held)
                await asyncio.sleep(0.01)
            victim.kill()
            killed_at = loop.time()
            # Its connections die with it: the channel that goes is the victim's limiter.
            while (now := await _wake_channels(r)) == channels:
                assert loop.time() < killed_at + 2, "the victim's channel stayed"
                await asyncio.sleep(0.01)
            (gone,) = channels - now
            victim_id = gone.rsplit(":", 1)[1]
            held_at_kill = await _leased_by(r, victim_id)
            out["held_at_kill"] = len(held_at_kill)
            # Poll to the bound: when did the victim last lease a slot, and when, after that,
            # did /stats equal what the live replicas hold (their gauges read before and
            # after /stats, to rule out a race)?
            timeline: list[tuple[float, int, int, int, int]] = []
            while (elapsed := loop.time() - killed_at) < _recovery_bound(config.lease_ttl):
                before = sum(await asyncio.gather(*(_local_in_flight(http, u) for u in live_urls)))
                stats = (await http.get(f"{live_urls[0]}/stats")).json()["apis"]["openai"]
                after = sum(await asyncio.gather(*(_local_in_flight(http, u) for u in live_urls)))
                leased = await _leased_by(r, victim_id)
                in_flight = stats["concurrent_requests"]
                timeline.append((round(elapsed, 2), len(leased), in_flight, before, after))
                assert in_flight <= config.openai_concurrent, timeline
                if not leased & held_at_kill:
                    out.setdefault("held_back_after", elapsed)
                if leased:
                    out.pop("recovered_after", None)
                elif in_flight == before == after:
                    out.setdefault("recovered_after", elapsed)
                await asyncio.sleep(0.05)
            out["timeline"] = timeline
        out["result"] = await load
    finally:
        if not load.done():
            load.cancel()
        await r.aclose()
    return out


def _recovery_bound(lease_ttl: float) -> float:
    """How long after a SIGKILL its process may still lease slots, in seconds, plus 1 s.

    The slots it held end with their leases; slots handed to its queued tickets end when
    those tickets would have expired (ticket_ttl after its last refresh, before the kill).
    """
    return float(max(lease_ttl, FAST.ticket_ttl) + 1.0)


def test_replica_sigkilled_mid_run_others_answer_everything_and_its_slots_come_back() -> None:
    """SIGKILL a replica holding 2+ OpenAI slots mid-run (lease_ttl 2 s): the slots it held
    are free within lease_ttl + 1 s (3 s); within 8 s it leases nothing more (its orphaned
    tickets' slots included) and /stats equals what the live replicas hold; every message
    is still answered (some resent), in order, and the fakes never saw more than their
    limits."""
    config = FastConfig(**{**FAST.__dict__, "lease_ttl": 2.0})
    with Cluster(config) as cluster:
        out = asyncio.run(asyncio.wait_for(_kill_mid_run(cluster, config), 80))
        openai_record, zapier_record = cluster.records()
    assert out["held_at_kill"] >= 1, out
    assert out["held_back_after"] <= config.lease_ttl + 1.0, out["timeline"]
    assert out.get("recovered_after") is not None, out["timeline"]
    assert out["recovered_after"] <= _recovery_bound(config.lease_ttl), out["timeline"]
    result: LoadResult = out["result"]
    _assert_everyone_answered_in_order(result, config)
    assert result.resent >= 1
    _assert_never_exceeded(openai_record, zapier_record, config)


# --------------------------------------------------------------------------- streaming


async def _six_streams(client: openai.AsyncOpenAI) -> list[tuple[str, int | None]]:
    async def one(i: int) -> tuple[str, int | None]:
        stream = await client.chat.completions.create(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": f"Stream {i}: tell me a long story, slowly"}],
            stream=True,
            stream_options={"include_usage": True},
        )
        parts: list[str] = []
        usage: int | None = None
        async for chunk in stream:
            if chunk.choices:
                parts.append(chunk.choices[0].delta.content or "")
            if chunk.usage is not None:
                usage = chunk.usage.total_tokens
        return "".join(parts), usage

    return list(await asyncio.gather(*(one(i) for i in range(6))))


async def _streams_with_and_without_limiter(redis_url: str, base_url: str) -> dict[str, Any]:
    async with httpx2.AsyncClient(base_url=base_url.removesuffix("/v1"), timeout=10) as admin:
        plain = openai.AsyncOpenAI(base_url=base_url, api_key=OPENAI_KEY, max_retries=0)
        try:
            unlimited = await _six_streams(plain)
        finally:
            await plain.close()
        control = (await admin.get("/admin/record")).json()
        assert (await admin.post("/admin/reset")).status_code == 200
        lim = Limiter.from_url(redis_url, {"openai": APILimits(max_concurrent=2)})
        limited_client = openai_client(lim, base_url=base_url, api_key=OPENAI_KEY)
        try:
            limited = await _six_streams(limited_client)
            stats = await lim.stats("openai")
        finally:
            await limited_client.close()
            await lim.aclose()
        record = (await admin.get("/admin/record")).json()
    return {
        "unlimited": unlimited,
        "control": control,
        "limited": limited,
        "record": record,
        "stats": stats,
    }


def test_streaming_completions_hold_their_slot_until_the_last_chunk() -> None:
    """6 concurrent streamed completions (usage included) through openai_client with
    max_concurrent=2: the fake, which counts a stream in flight until its last chunk, saw
    exactly 2 at once (6 without the limiter), all 6 complete, no 429."""
    with RedisServer() as redis, tempfile.TemporaryDirectory(prefix="fleetlimit-e2e-") as logs:
        fake = _Proc(
            "fake-openai",
            logs,
            [
                sys.executable, "-m", "chatbot.fakes.openai_server", "--port", "0",
                "--latency", "0.05", "--chunk-latency", "0.03", "--api-key", OPENAI_KEY,
            ],
        )  # fmt: skip
        try:
            port = fake.wait_for_line(r"listening on http://127\.0\.0\.1:(\d+)").group(1)
            url = f"http://127.0.0.1:{port}/v1"
            scenario = _streams_with_and_without_limiter(redis.url, url)
            out = asyncio.run(asyncio.wait_for(scenario, 30))
        finally:
            fake.stop()
    # Control: without the limiter all six streams are in flight at the fake at once.
    assert out["control"]["max_in_flight"] == 6
    record = out["record"]
    assert record["admitted"] == 6
    assert record["max_in_flight"] == 2
    assert record["in_flight"] == 0
    assert record["rejected_total"] == 0
    for i, (text, usage) in enumerate(out["limited"]):
        prompt = f"Stream {i}: tell me a long story, slowly"
        assert text == f"You said: {prompt}"
        # The fake's documented count: 3 + 4 + len/4 in, about len/4 (rounded up) out.
        assert usage == 3 + 4 + len(prompt) // 4 + (len(text) + 3) // 4
    assert out["stats"]["successful_requests"] == 6
    assert out["stats"]["concurrent_requests"] == 0
