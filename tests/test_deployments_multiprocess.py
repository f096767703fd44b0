"""Deployments across processes: 3 worker processes share one redis-server and one fake
OpenAI that limits each of two keys on its own (``scope="key"``), and each process sends
through its own ``openai_client(deployments={"key-a": ..., "key-b": ...})``.

The fake is the referee: its record (``GET /admin/record``) says, for each key and each
(key, model), the most requests it saw in any rolling window, the most in flight, and
every request it refused. The workers (``tests._deployment_workers``) start on one go
signal and stop on the test's stop signal, both through Redis; the fake runs in the
test's event loop on 127.0.0.1, so its clock (``time.monotonic``) is the test's. Every
bound below is exact.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from chatbot.fakes.openai_server import FakeOpenAIConfig, mask_key
from limiter import Limiter
from limiter.testing import RedisServer
from tests._deployment_workers import API, KEY_A, KEY_B, limits_of
from tests._fleet import Fleet
from tests._sdk import offline
from tests._servers import Running, serve_fake_openai

pytestmark = [pytest.mark.redis, pytest.mark.multiprocess]

#: The keys as the fake's record names them (masked).
A, B = mask_key(KEY_A), mask_key(KEY_B)
BIG, SMALL = "gpt-4o", "gpt-4o-mini"
PROCESSES = 3
#: In flight at once per key, in the limiter's deployments and at the fake.
CONCURRENT = 4
#: The short rolling window of the fake (``window_seconds``) and of the limiter's rates.
WINDOW = 3.0
#: The limiter's ``window_margin``: more than the delay from admission to arrival at the
#: fake varies (README, "Arrival jitter") with 3 workers, the fake and redis-server on one
#: 2-core machine. It costs WINDOW / (WINDOW + MARGIN) of the throughput in the long run.
MARGIN = 0.3
#: Each key's requests per WINDOW, at the fake and in the limiter.
PER_KEY = 20
#: gpt-4o's requests per WINDOW on each key, at the fake (model_limits, per key and model
#: with scope "key") and in the limiter (each deployment's ``models``).
BIG_PER_KEY = 6
#: Loops per worker, half gpt-4o and half gpt-4o-mini: 18 callers for 8 slots.
MIXED = [BIG, SMALL] * 3


class DeploymentFleet(Fleet):
    """A :class:`~tests._fleet.Fleet` whose workers run ``tests._deployment_workers``."""

    module = "tests._deployment_workers"
    defaults: dict[str, Any] = {}  # noqa: RUF012 - read-only, overridden whole


@pytest.fixture
def fleet(
    redis_server: RedisServer,
    client: aioredis.Redis,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[DeploymentFleet]:
    """Start workers through this; each one is killed (if alive) and reaped afterwards."""
    offline(monkeypatch)  # the workers inherit an environment with no key or base URL
    f = DeploymentFleet(redis_server.url, client, tmp_path)
    try:
        yield f
    finally:
        f.close()


# -- helpers ----------------------------------------------------------------------------


async def start(
    fleet: DeploymentFleet, fake: Running, spec: dict[str, Any], models: list[str]
) -> list[str]:
    """PROCESSES workers, each with one loop of calls per entry of ``models``, started by
    one go signal once all are ready; returns their names."""
    names = [f"p{i}" for i in range(PROCESSES)]
    for name in names:
        fleet.start("chat", name, limits=spec, openai_url=f"{fake.url}/v1", models=models)
    await fleet.ready(len(names))
    await fleet.go(*names)
    return names


async def stop(fleet: DeploymentFleet, names: list[str]) -> list[dict[str, Any]]:
    """Tell every worker to stop; their reports once they have exited."""
    for name in names:
        await fleet.push(f"stop:{name}")
    return [await fleet.result(name) for name in names]


async def until(
    fleet: DeploymentFleet,
    fake: Running,
    done: Callable[[dict[str, Any]], bool],
    what: str,
    within: float = 20.0,
) -> dict[str, Any]:
    """The fake's record (with the per-request lists) once ``done`` says so. Polls the
    fake's state in this process: there is no event to await."""
    deadline = time.monotonic() + within
    while not done(record := fake.fake.snapshot()):
        fleet.check_alive()
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {within}s\n{fleet.logs()}")
        await asyncio.sleep(0.02)
    return record


async def finish(
    fleet: DeploymentFleet, fake: Running, names: list[str]
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The fake's record of the run, then the workers' reports once stopped. The record
    comes first: stopping cancels calls in flight, whose slots come back at once while
    the fake may still be answering them (a cancel cannot reach a provider), so what
    follows the stop is not the limiter's to answer for."""
    record = await fake.record()
    return record, await stop(fleet, names)


async def run_windows(
    fleet: DeploymentFleet, fake: Running, spec: dict[str, Any], models: list[str], n: float
) -> tuple[dict[str, Any], list[dict[str, Any]], float]:
    """Workers calling from the go until ``n`` windows have passed since the fake's first
    admission; the fake's record, the workers' reports and that first arrival."""
    names = await start(fleet, fake, spec, models)
    first = await until(fleet, fake, lambda r: r["admitted"] > 0, "a first answer")
    t0 = float(first["arrivals"][0])
    await until(fleet, fake, lambda r: r["now"] >= t0 + n * WINDOW, f"{n} windows")
    record, reports = await finish(fleet, fake, names)
    return record, reports, t0


def admitted(record: dict[str, Any], key: str) -> int:
    stats = record["by_key"].get(key)
    return 0 if stats is None else int(stats["admitted"])


def used_in(record: dict[str, Any], start: float, end: float) -> Counter[str]:
    """Requests the fake admitted in [start, end), by key."""
    return Counter(a["key"] for a in record["admissions"] if start <= a["t"] < end)


def answers(reports: list[dict[str, Any]]) -> int:
    return sum(n for r in reports for n in r["ok"].values())


def assert_no_errors(fleet: DeploymentFleet, reports: list[dict[str, Any]]) -> None:
    errors = [e for r in reports for e in r["errors"]]
    assert errors == [], "\n\n".join(errors)
    logs = fleet.logs()
    assert KEY_A not in logs
    assert KEY_B not in logs


def short_windows(**deployment: Any) -> dict[str, Any]:
    """The workers' limits: two deployments of CONCURRENT in flight and PER_KEY per
    WINDOW each, plus ``deployment`` (their ``models``)."""
    each = {"max_concurrent": CONCURRENT, "rates": [[PER_KEY, WINDOW]], **deployment}
    return {API: {"window_margin": MARGIN, "deployments": {"key-a": each, "key-b": each}}}


def short_window_fake(**changes: Any) -> FakeOpenAIConfig:
    """The fake with the same limits per key (and ``changes``)."""
    fields: dict[str, Any] = {
        "api_keys": (KEY_A, KEY_B),
        "scope": "key",
        "rpm": PER_KEY,
        "max_in_flight": CONCURRENT,
        "window_seconds": WINDOW,
        "latency": 0.05,
        **changes,
    }
    return FakeOpenAIConfig(**fields)


def mixed_models() -> tuple[dict[str, Any], FakeOpenAIConfig]:
    """gpt-4o limited to BIG_PER_KEY per WINDOW on each key, in the limiter and at the fake."""
    spec = short_windows(models={BIG: {"rates": [[BIG_PER_KEY, WINDOW]]}})
    return spec, short_window_fake(model_limits={BIG: {"rpm": BIG_PER_KEY}})


def tier_change_spec(concurrent: int) -> dict[str, Any]:
    """Two keys of 60 a minute and ``concurrent`` in flight; quick retries."""
    each = {"max_concurrent": concurrent, "requests_per_minute": 60}
    deployments = {"key-a": each, "key-b": each}
    return {API: {"backoff_min": 0.05, "backoff_max": 0.2, "deployments": deployments}}


async def tier_change(
    fleet: DeploymentFleet, fake: Running, spec: dict[str, Any], lim: Limiter
) -> tuple[dict[str, Any], list[dict[str, Any]], float, dict[str, Any]]:
    """3 processes x 4 loops on two keys of 60 a minute at the fake. Once key-a has
    served 10, its limit drops to 5 a minute (POST /admin/config); the run goes on until
    key-a's pause is in Redis (at ``paused``, the fake's clock) and key-b has served 20
    more after the last 429. Returns the record, the reports, ``paused`` and the cluster's
    stats."""
    names = await start(fleet, fake, spec, [SMALL] * 4)
    await until(fleet, fake, lambda r: admitted(r, A) >= 10, "10 answers on key-a")
    status, body = await fake.admin("POST", "/admin/config", {"key_limits": {KEY_A: {"rpm": 5}}})
    assert status == 200, body
    deadline = time.monotonic() + 20
    while (await lim.stats(API))["deployments"]["key-a"]["cooldown_remaining"] == 0:
        fleet.check_alive()
        assert time.monotonic() < deadline, f"key-a never paused\n{fleet.logs()}"
        await asyncio.sleep(0.005)  # polls the cluster's state: no event to await
    paused = time.monotonic()

    def b_after_last_429(record: dict[str, Any]) -> int:
        # (a 429 may still come after the pause: a key-a request admitted before it)
        last = max((r["t"] for r in record["rejections"]), default=paused)
        return sum(1 for a in record["admissions"] if a["key"] == B and a["t"] > last)

    await until(fleet, fake, lambda r: b_after_last_429(r) >= 20, "20 on key-b after the 429s")
    record, reports = await finish(fleet, fake, names)
    return record, reports, paused, await lim.stats(API)


# -- the tests ------------------------------------------------------------------------


async def test_no_key_or_model_gets_more_than_its_limit(fleet: DeploymentFleet) -> None:
    """3 processes x 6 loops (half gpt-4o, half gpt-4o-mini) on two keys of 4 in flight and
    20 requests per 3 s, of which 6 gpt-4o, for a window and a half (the windows roll
    over once): the fake saw no key with more than 4 in flight or 20 requests in a
    rolling window, no key with more than 6 gpt-4o in one, and refused nothing; no call
    failed. gpt-4o's 6 and the 4 in flight were reached on each key, so they are what
    held the calls back: one budget per key and per key's model for all the processes.
    (Full key windows: ``test_both_keys_are_used_to_their_limits``.)"""
    spec, config = mixed_models()
    async with serve_fake_openai(config) as fake:
        record, reports, _ = await run_windows(fleet, fake, spec, MIXED, 1.5)
    assert_no_errors(fleet, reports)
    assert (record["rejected_total"], record["unauthorized"]) == (0, 0), record["rejections"]
    for key in (A, B):
        assert record["by_key"][key]["max_requests_in_window"] <= PER_KEY
        assert record["by_key"][key]["max_in_flight"] == CONCURRENT
        assert record["by_key_model"][f"{key}|{BIG}"]["max_requests_in_window"] == BIG_PER_KEY
        assert record["by_key_model"][f"{key}|{SMALL}"]["max_requests_in_window"] <= PER_KEY
    assert answers(reports) > 0


async def test_both_keys_are_used_to_their_limits(fleet: DeploymentFleet) -> None:
    """3 processes x 6 loops of gpt-4o-mini on two keys of 4 in flight and 20 requests per
    3 s: in the two windows from the first request (at most 2 x 20 per key) the fake
    admitted at least 85 % of that on each key, never more than 20 per rolling window,
    and refused nothing. The limiter spreads the load over both keys and leaves neither
    idle while calls wait."""
    async with serve_fake_openai(short_window_fake()) as fake:
        record, reports, t0 = await run_windows(fleet, fake, short_windows(), [SMALL] * 6, 2)
    assert_no_errors(fleet, reports)
    assert record["rejected_total"] == 0, record["rejections"]
    used, most = used_in(record, t0, t0 + 2 * WINDOW), 2 * PER_KEY
    for key in (A, B):
        assert record["by_key"][key]["max_requests_in_window"] == PER_KEY
        assert math.ceil(0.85 * most) <= used[key] <= most, used


async def test_a_model_at_its_limit_holds_back_no_other_model(fleet: DeploymentFleet) -> None:
    """The load of ``test_no_key_or_model_gets_more_than_its_limit`` (half the calls
    gpt-4o, limited to 6 of each key's 20 per 3 s): the gpt-4o-mini calls, which fit
    either key, still use both keys to at least 85 % of their 20 in the window from the
    first request, while the gpt-4o calls wait for their model's window."""
    spec, config = mixed_models()
    async with serve_fake_openai(config) as fake:
        record, reports, t0 = await run_windows(fleet, fake, spec, MIXED, 1)
    assert_no_errors(fleet, reports)
    assert record["rejected_total"] == 0, record["rejections"]
    used = used_in(record, t0, t0 + WINDOW)
    for key in (A, B):
        assert math.ceil(0.85 * PER_KEY) <= used[key] <= PER_KEY, used


async def test_a_429_on_one_key_leaves_the_other_serving(fleet: DeploymentFleet) -> None:
    """Two keys of 60 requests a minute and 4 in flight, 3 processes x 4 loops. Once key-a
    has served 10, its tier drops to 5 a minute at the provider (the limiter still
    believes 60): key-a's next requests get 429s, and the first pauses key-a for every
    process until the provider has room (about a minute) while the API as a whole goes
    on. Once that pause is in Redis, at most 4 key-a requests still reach the provider
    (those already admitted: each holds one of key-a's 4 slots), then none, while key-b
    serves every call (the 429-ed ones retried on it) and no call fails."""
    spec = tier_change_spec(CONCURRENT)
    config = FakeOpenAIConfig(
        api_keys=(KEY_A, KEY_B), scope="key", rpm=60, max_in_flight=CONCURRENT, latency=0.05
    )
    async with (
        serve_fake_openai(config) as fake,
        Limiter.from_url(fleet.url, limits_of(spec)) as lim,
    ):
        record, reports, paused, stats = await tier_change(fleet, fake, spec, lim)
    assert_no_errors(fleet, reports)
    rejections = record["rejections"]
    assert rejections != []
    assert {(r["key"], r["reason"]) for r in rejections} == {(A, "requests")}
    late = [a for a in record["admissions"] if a["key"] == A and a["t"] > paused]
    assert late == []  # the provider refuses key-a for the minute: no answer after
    assert len([r for r in rejections if r["t"] > paused]) <= CONCURRENT, rejections
    last_429 = max(r["t"] for r in rejections)
    served_after = [a for a in record["admissions"] if a["key"] == B and a["t"] > last_429]
    assert len(served_after) >= 20, record["by_key"]
    assert stats["deployments"]["key-a"]["cooldown_remaining"] > 50
    assert stats["deployments"]["key-b"]["cooldown_remaining"] == 0
    assert stats["cooldown_remaining"] == 0  # the API as a whole never paused


async def test_a_429_costs_at_most_the_slots_in_flight_on_that_key(
    fleet: DeploymentFleet,
) -> None:
    """The tier change of ``test_a_429_on_one_key_leaves_the_other_serving`` on keys of 1
    in flight: the first 429s on key-a are at most key-a's max_concurrent (1: the request
    in flight when the provider's limit dropped), then none; key-b serves every call."""
    spec = tier_change_spec(1)
    config = FakeOpenAIConfig(
        api_keys=(KEY_A, KEY_B), scope="key", rpm=60, max_in_flight=1, latency=0.05
    )
    async with (
        serve_fake_openai(config) as fake,
        Limiter.from_url(fleet.url, limits_of(spec)) as lim,
    ):
        record, reports, _, stats = await tier_change(fleet, fake, spec, lim)
    assert_no_errors(fleet, reports)
    assert stats["deployments"]["key-b"]["cooldown_remaining"] == 0
    assert {(r["key"], r["reason"]) for r in record["rejections"]} == {(A, "requests")}
    assert len(record["rejections"]) <= 1, record["rejections"]


async def test_a_key_allowing_30_a_minute_is_learned_by_every_process(
    fleet: DeploymentFleet,
) -> None:
    """key-a configured 120 a minute where the provider allows 30 (its
    x-ratelimit-limit-requests says so), key-b configured and allowed 60;
    learn_from_headers on, one attempt per call, 4 in flight per key, 3 processes x 4
    loops for at most 5 s: at most 4 calls (key-a's first burst) meet a 429, none after
    key-a's first answer, and key-a served at least 27 of its 30 (never more); key-b is
    untouched: all 60 of its minute served, no 429, nothing learned."""
    spec = {
        API: {
            "learn_from_headers": True,
            "retry_attempts": 1,
            "deployments": {
                "key-a": {"max_concurrent": CONCURRENT, "requests_per_minute": 120},
                "key-b": {"max_concurrent": CONCURRENT, "requests_per_minute": 60},
            },
        }
    }
    config = FakeOpenAIConfig(
        api_keys=(KEY_A, KEY_B), scope="key", rpm=60, latency=0.02, key_limits={KEY_A: {"rpm": 30}}
    )
    async with serve_fake_openai(config) as fake:
        names = await start(fleet, fake, spec, [SMALL] * 4)
        go = time.monotonic()

        def spent(r: dict[str, Any]) -> bool:
            a = r["by_key"].get(A, {"admitted": 0, "rejected": {}})
            tried = a["admitted"] + sum(a["rejected"].values())  # all count in our window
            return (tried >= 30 and admitted(r, B) >= 60) or r["now"] > go + 5

        await until(fleet, fake, spent, "both keys' minutes used")
        reports = await stop(fleet, names)
        record = await fake.record()
        async with Limiter.from_url(fleet.url, limits_of(spec)) as lim:
            stats = await lim.stats(API)
    a, b = record["by_key"][A], record["by_key"][B]
    refused = a["rejected"]["requests"]
    assert refused <= CONCURRENT, record["rejections"]
    assert sum(a["rejected"].values()) == refused  # nothing else was refused
    assert sum(b["rejected"].values()) == 0
    assert 27 <= a["admitted"] == a["max_requests_in_window"] <= 30
    assert b["admitted"] == b["max_requests_in_window"] == 60
    # Every 429 came before key-a's limit was learned: none after its first answer.
    first_done = min(x["done"] for x in record["admissions"] if x["key"] == A and x["done"])
    assert [r for r in record["rejections"] if r["t"] > first_done] == []
    errors = [e for r in reports for e in r["errors"]]
    assert len(errors) == refused  # one attempt per call: each 429 reached its caller
    assert all("RateLimitError" in e for e in errors), errors
    dep_a, dep_b = stats["deployments"]["key-a"], stats["deployments"]["key-b"]
    assert (dep_a["learned"]["rate:60s"], dep_a["learned"]["source"]) == (30, "provider")
    assert dep_a["windows"]["rate:60s"]["limit"] == 30
    assert dep_b["learned"] == {}
    assert dep_b["windows"]["rate:60s"]["limit"] == 60
    assert stats["learned"] == {}
    assert KEY_A not in fleet.logs()
    assert KEY_B not in fleet.logs()
