"""``Limiter.call``, ``cooldown``, ``ConcurrencyManager`` and token budgets across processes.

Worker processes (``python -m tests._call_workers``, see that module) share one real
redis-server; the worker/barrier protocol is that of ``tests/test_multiprocess.py``, the
``Fleet`` of processes and the overlap measure come from ``tests/_fleet.py``.
Synchronisation goes through Redis lists, or reads the limiter's state through its public
``stats()``, never sleeps. Every process started is reaped by the ``fleet`` fixture, also
when a test fails.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from limiter import APILimits, Limiter
from limiter.testing import RedisServer
from tests._fleet import Fleet, max_overlap
from tests._workers import until_waiting

pytestmark = [pytest.mark.redis, pytest.mark.multiprocess]

#: Keys of ``get_stats()`` that count calls (compared between processes and the cluster).
COUNTS = ("total_requests", "successful_requests", "failed_requests", "concurrent_requests")
#: Redis expiries (the cooldown's PX) have millisecond resolution.
MS = 1000
#: The token window of API "a" (README, "Architecture"); read only to explain a failure.
TOKENS_KEY = "limiter:{a}:tokens"
#: Tickets of waiters live this long without a renewal (the Limiter's default).
TICKET_TTL = 5.0


class CallFleet(Fleet):
    """A :class:`Fleet` whose workers run ``tests._call_workers``."""

    module = "tests._call_workers"
    defaults: dict[str, Any] = {}  # noqa: RUF012


@pytest.fixture
def fleet(redis_server: RedisServer, client: aioredis.Redis, tmp_path: Path) -> Iterator[CallFleet]:
    """Start workers through this; each one is killed (if alive) and reaped afterwards."""
    f = CallFleet(redis_server.url, client, tmp_path)
    try:
        yield f
    finally:
        f.close()


async def run_managers(
    fleet: CallFleet, split: list[list[list[Any]]], **cfg: Any
) -> tuple[int, list[dict[str, Any]]]:
    """One ``manager`` worker per entry of ``split`` (its ``calls``), all released at once.

    Returns the monotonic time (ns) just before the go signals, and the workers' reports,
    whose ``cluster`` stats were read once every worker had finished its calls.
    """
    names = [f"p{i}" for i in range(len(split))]
    for name, calls in zip(names, split, strict=True):
        fleet.start("manager", name, calls=calls, **cfg)
    await fleet.ready(len(names))
    go_ns = time.monotonic_ns()
    await fleet.go(*names)
    for _ in names:
        await fleet.pop("done")
    for name in names:
        await fleet.push(f"report:{name}")
    reports = [await fleet.result(name) for name in names]
    errors = [e for r in reports for e in r["errors"]]
    assert errors == [], "\n\n".join(errors)
    return go_ns, reports


def intervals(reports: list[dict[str, Any]], api: str) -> list[tuple[int, int]]:
    """[start_ns, end_ns] of every attempt of ``api``'s operations, in every process."""
    return [
        (a[0], a[1]) for r in reports for c in r["calls"] if c["api"] == api for a in c["attempts"]
    ]


def check_counts(reports: list[dict[str, Any]], expected: dict[str, int]) -> None:
    """Each process counted its own calls; every replica's cluster view is their sum."""
    for api, n in expected.items():
        for r in reports:
            assert r["cluster_before"][api]["total_requests"] == 0
        local = [r["local"][api] for r in reports]
        assert sum(s["successful_requests"] for s in local) == n
        for s in local:
            assert s["failed_requests"] == s["concurrent_requests"] == 0
            assert s["total_requests"] == s["successful_requests"]
            assert s["success_rate"] == (100.0 if s["total_requests"] else 0.0)
        summed = {k: sum(s[k] for s in local) for k in COUNTS}
        for r in reports:
            cluster = r["cluster"][api]
            assert {k: cluster[k] for k in COUNTS} == summed, f"{api}: {cluster} vs {summed}"


def seconds_since(go_ns: int, t_ns: int) -> float:
    return (t_ns - go_ns) / 1e9


# -- 1. ConcurrencyManager: the original chatbot's expectations, over two processes --------


@pytest.mark.parametrize(
    ("api", "limit", "per_process"),
    [("openai", 8, 5), ("zapier", 3, 3)],
    ids=["openai-10-calls", "zapier-6-calls"],
)
async def test_manager_two_batches_across_processes(
    fleet: CallFleet, api: str, limit: int, per_process: int
) -> None:
    """2 x per_process calls of 1 s hold at most `limit` at once, reach it, and end in 2 batches."""
    n = 2 * per_process
    go_ns, reports = await run_managers(fleet, [[[api, per_process]]] * 2, hold=1.0)
    spans = intervals(reports, api)
    assert len(spans) == n
    peak = max_overlap(spans)
    assert peak <= limit, f"{peak} {api} calls in flight at once, limit {limit}"
    assert peak == limit, f"the limit {limit} was never reached: at most {peak} at once"
    first_end = min(end for _, end in spans)
    assert sum(start < first_end for start, _ in spans) == limit, "first batch is not the limit"
    total = seconds_since(go_ns, max(end for _, end in spans))
    assert 2.0 <= total <= 3.5, f"{n} calls took {total:.3f}s: not 2 batches of 1 s"
    check_counts(reports, {api: n, "zapier" if api == "openai" else "openai": 0})
    for r in reports:
        assert 1.0 <= r["local"][api]["average_response_time"] <= 3.5
        assert r["warnings"] == []


async def test_manager_mixed_fits_in_one_batch(fleet: CallFleet) -> None:
    """8 OpenAI + 3 Zapier calls of 1 s over 2 processes run all at once: done within 1.0-1.5 s."""
    split = [[["openai", 4], ["zapier", 2]], [["openai", 4], ["zapier", 1]]]
    go_ns, reports = await run_managers(fleet, split, hold=1.0)
    openai_spans, zapier_spans = intervals(reports, "openai"), intervals(reports, "zapier")
    assert (len(openai_spans), len(zapier_spans)) == (8, 3)
    assert (max_overlap(openai_spans), max_overlap(zapier_spans)) == (8, 3)
    total = seconds_since(go_ns, max(end for _, end in openai_spans + zapier_spans))
    assert 1.0 <= total <= 1.5, f"11 calls that fit at once took {total:.3f}s"
    check_counts(reports, {"openai": 8, "zapier": 3})
    assert [r["warnings"] for r in reports] == [[], []]


async def test_manager_retries_with_backoff_then_succeeds(fleet: CallFleet) -> None:
    """In each process a call failing twice succeeds on attempt 3, each gap >= backoff_min."""
    backoff_min, backoff_max = 0.05, 0.2
    configs = {
        "openai": {
            "max_concurrent": 8,
            "retry_attempts": 5,
            "backoff_min": backoff_min,
            "backoff_max": backoff_max,
        }
    }
    _, reports = await run_managers(
        fleet, [[["openai", 1]], [["openai", 1]]], hold=0.0, failures=2, api_configs=configs
    )
    for r in reports:
        (call,) = r["calls"]
        assert call["result"] == "done after 3 attempts"
        attempts = call["attempts"]
        assert [a[2] for a in attempts] == ["raised", "raised", "returned"]
        gaps = [(nxt[0] - prev[1]) / 1e9 for prev, nxt in itertools.pairwise(attempts)]
        # Lower bound exact (the backoff sleeps at least backoff_min); the upper one allows
        # 0.3 s of scheduling and round trips on top of backoff_max.
        assert all(backoff_min <= g <= backoff_max + 0.3 for g in gaps), f"gaps {gaps}"
        retried = [w for w in r["warnings"] if "retrying in" in w]
        assert len(retried) == 2, r["warnings"]
        local = r["local"]["openai"]
        assert {k: local[k] for k in COUNTS} == {
            "total_requests": 1,
            "successful_requests": 1,
            "failed_requests": 0,
            "concurrent_requests": 0,
        }
    for r in reports:
        cluster = r["cluster"]["openai"]
        # The cluster counts successes like the processes do (one per call) ...
        assert cluster["successful_requests"] == sum(
            x["local"]["openai"]["successful_requests"] for x in reports
        )
        # ... but counts every failed attempt (each held a slot): 2 per process.
        assert (cluster["failed_requests"], cluster["concurrent_requests"]) == (4, 0)


# -- 2. Cooldowns: set by one process, honoured by another ----------------------------------


async def test_cooldown_set_by_one_process_holds_another(fleet: CallFleet) -> None:
    """B, signalled right after A's cooldown(1.0), is refused at once and admitted after its end."""
    fleet.start("probe_cooldown", "B", api="a", signal="cooled")
    fleet.start("set_cooldown", "A", api="a", seconds=1.0)
    await fleet.ready(2)
    await fleet.go("A")
    a, b = await fleet.result("A"), await fleet.result("B")
    assert a["in_force"] == 1.0
    assert b["probe"] == "refused:cooldown"
    # The cooldown began between A's two TIME reads and lasts 1 s (to the millisecond).
    assert b["acquired_at"] >= a["before"] + 1_000_000 - MS, "admitted during the cooldown"
    assert b["acquired_at"] <= a["after"] + 1_000_000 + 250_000, "admitted long after its end"
    assert a["warnings"] == []
    assert all(w.startswith("Rate limit reached for a (cooldown)") for w in b["warnings"])


async def test_429_in_one_process_pauses_another(fleet: CallFleet) -> None:
    """A 429 (Retry-After: 1) in A's Limiter.call refuses B at once, holds A's retry and B 1 s."""
    limits = {"a": {"retry_attempts": 2, "backoff_min": 0.05, "backoff_max": 0.2}}
    fleet.start("probe_cooldown", "B", api="a", signal="cooled")
    fleet.start("call_429", "A", api="a", limits=limits, retry_after="1")
    await fleet.ready(2)
    async with Limiter.from_url(fleet.url, {"a": APILimits()}) as watcher:
        await fleet.go("A")
        deadline = time.monotonic() + 30
        # Poll the cluster's state (there is no event to await) until A's 429 paused the API.
        while (await watcher.stats("a"))["cooldown_remaining"] <= 0:
            fleet.check_alive()
            assert time.monotonic() < deadline, f"no cooldown within 30 s\n{fleet.logs()}"
            await asyncio.sleep(0.002)
        await fleet.push("cooled")
    a, b = await fleet.result("A"), await fleet.result("B")
    assert a["result"] == "ok"
    (at_429, first), (at_retry, second) = a["attempts"]
    assert (first, second) == ("429", "ok")
    assert b["probe"] == "refused:cooldown"
    cooldown_end = at_429 + 1_000_000 - MS  # the cooldown began after A's 429, lasts 1 s
    assert at_retry >= cooldown_end, "A retried during its own cooldown"
    assert b["acquired_at"] >= cooldown_end, "B admitted during the cooldown"
    assert b["acquired_at"] <= at_429 + 1_000_000 + 250_000, "B admitted long after its end"
    assert any("answered 429" in w for w in a["warnings"]), a["warnings"]


# -- 3. Token budgets: reserve, then reconcile, across processes ----------------------------


async def run_tokens(
    fleet: CallFleet, n: int, watcher: Limiter, *, run_for: float | None = None, **cfg: Any
) -> tuple[list[list[Any]], list[int]]:
    """``n`` token workers from one go signal; polls the token window's use meanwhile.

    Returns every admission ``[acquired_at, reserved, used, slot id]`` and every polled
    ``windows.tokens.used``.
    """
    names = [f"t{i}" for i in range(n)]
    for name in names:
        fleet.start("tokens", name, api="a", **cfg)
    await fleet.ready(n)
    payload = {} if run_for is None else {"deadline": time.time() + run_for}
    await fleet.go(*names, **payload)
    results_task = asyncio.ensure_future(asyncio.gather(*(fleet.result(x) for x in names)))
    polled: list[int] = []
    try:
        while not results_task.done():
            polled.append((await watcher.stats("a"))["windows"]["tokens"]["used"])
            await asyncio.sleep(0.003)  # pacing of the polls, not synchronisation
        results = await results_task
    finally:
        results_task.cancel()
        await asyncio.gather(results_task, return_exceptions=True)
    errors = [e for r in results for e in r["errors"]]
    assert errors == [], "\n\n".join(errors)
    for r in results:
        too_many = r["too_many"]
        assert (too_many["outcome"], too_many["field"], too_many["value"]) == (
            "ConfigError",
            "tokens",
            cfg["too_many"],
        )
        assert too_many["elapsed"] < 0.1, "tokens over the budget did not fail at once"
    return [a for r in results for a in r["admissions"]], polled


async def charged_without_admission(
    client: aioredis.Redis, admissions: list[list[Any]]
) -> list[str]:
    """Entries of the token window whose slot no task was admitted to (for a failure message)."""
    ids = {a[3] for a in admissions}
    members = [m.decode() for m in await client.zrange(TOKENS_KEY, 0, -1)]
    return [m for m in members if m.split("|")[0].removesuffix("+") not in ids]


async def test_token_reservations_reconcile_exactly(
    fleet: CallFleet, client: aioredis.Redis
) -> None:
    """4 x 8 tasks over-estimating never hold over 1000 tokens/min; the window ends at sum(used)."""
    budget = 1000
    limits = {"a": {"tokens_per_minute": budget}}
    async with Limiter.from_url(fleet.url, {"a": APILimits(tokens_per_minute=budget)}) as watcher:
        admissions, polled = await run_tokens(
            fleet,
            4,
            watcher,
            run_for=2.0,
            limits=limits,
            mode="over",
            tasks=8,
            hold=0.02,
            too_many=budget + 1,
        )
        stats = await watcher.stats("a")
        seconds, micros = await client.time()
    now_redis = seconds * 1_000_000 + micros
    first = min(a[0] for a in admissions)
    assert now_redis < first + 60_000_000, "admissions left the 60 s window before the check"
    reserved = sum(a[1] for a in admissions)
    used = sum(a[2] for a in admissions)
    assert all(0 <= u <= r for _, r, u, _ in admissions)
    assert len(polled) >= 100, f"only {len(polled)} polls of the token window"
    assert max(polled) <= budget, f"{max(polled)} tokens charged at once, budget {budget}"
    orphans = await charged_without_admission(client, admissions)
    assert stats["windows"]["tokens"] == {"used": used, "limit": budget}, (
        f"charged for slots no task was admitted to: {orphans}"
    )
    assert used <= budget
    # Waiters kept asking to the end: less than one largest reservation (200) was left.
    assert used > budget - 200, f"only {used} of {budget} tokens used"
    assert reserved > budget, f"no room came back: {reserved} tokens reserved in all"
    assert (stats["concurrent_requests"], stats["waiting"]) == (0, 0)
    assert stats["successful_requests"] == len(admissions)


async def test_token_underestimates_are_charged(fleet: CallFleet) -> None:
    """2 x 4 tasks x 3 under-estimated requests: the window charges exactly their real usage."""
    budget = 10_000
    limits = {"a": {"tokens_per_minute": budget}}
    async with Limiter.from_url(fleet.url, {"a": APILimits(tokens_per_minute=budget)}) as watcher:
        admissions, polled = await run_tokens(
            fleet,
            2,
            watcher,
            limits=limits,
            mode="under",
            tasks=4,
            iterations=3,
            hold=0.01,
            too_many=budget + 1,
        )
        stats = await watcher.stats("a")
    assert len(admissions) == 2 * 4 * 3
    assert all(u > r for _, r, u, _ in admissions)
    used = sum(a[2] for a in admissions)
    assert stats["windows"]["tokens"] == {"used": used, "limit": budget}
    assert used > sum(a[1] for a in admissions)
    assert max(polled) <= used


async def test_tokens_given_back_go_to_the_next_waiter_at_once(
    fleet: CallFleet, client: aioredis.Redis
) -> None:
    """A holder of 100/100 tokens reporting 0 admits another process's waiter (60) within 0.1 s."""
    spec = {"api": "a", "limits": {"a": {"tokens_per_minute": 100}}}
    fleet.start("hold_tokens", "holder", reserve=100, use=0, **spec)
    await fleet.pop("held")
    fleet.start("wait_tokens", "waiter", tokens=60, timeout=10, ticket_ttl=TICKET_TTL, **spec)
    await fleet.ready(1)
    await fleet.go("waiter")
    await until_waiting(client, {"api": "a", "ticket_ttl": TICKET_TTL}, 1)
    await fleet.push("release")
    holder, waiter = await fleet.result("holder"), await fleet.result("waiter")
    delay = waiter["acquired_at"] - holder["released_redis"]
    # The release gives the 100 tokens back and hands them on in the same script (a hand-off
    # takes about 2 ms at p99: README, "Benchmarks"); 0.1 s leaves room for a loaded machine.
    assert 0 <= delay <= 100_000, f"waiter admitted {delay / 1e6:.3f}s after the release"


async def test_cancelled_waiter_gives_back_a_handed_reservation(fleet: CallFleet) -> None:
    """A waiter cancelled after a release handed it a slot unseen leaves its 60 tokens uncharged."""
    spec = {"api": "a", "limits": {"a": {"max_concurrent": 1, "tokens_per_minute": 1000}}}
    fleet.start("hold_tokens", "holder", reserve=10, use=None, **spec)
    await fleet.pop("held")
    fleet.start("cancel_handed", "waiter", tokens=60, ticket_ttl=TICKET_TTL, **spec)
    await fleet.ready(1)
    await fleet.go("waiter")
    await fleet.pop("waiting")
    await fleet.push("release")
    await fleet.result("holder")
    waiter = await fleet.result("waiter")
    assert waiter["outcome"] == "CancelledError", "the waiter saw its hand-off before the cancel"
    async with Limiter.from_url(fleet.url, {"a": APILimits(tokens_per_minute=1000)}) as lim:
        stats = await lim.stats("a")
    assert (stats["concurrent_requests"], stats["waiting"]) == (0, 0)
    # The holder's 10 (never reconciled) stay; the cancelled waiter never ran its call.
    assert stats["windows"]["tokens"]["used"] == 10, stats["windows"]
