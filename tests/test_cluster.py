"""The limiter on a real Redis Cluster: 3 masters + 3 replicas, 6 ``redis-server`` processes.

APIs are chosen so that their keys (one hash tag per API) land on three different
shards; the multi-process bounds of ``tests/test_multiprocess.py`` are shown again on
them, all at once. A script whose keys span two slots fails loudly (``LimiterUnavailable``),
never reads as "allowed".
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import math
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.crc import key_slot

from limiter import AcquireTimeout, APILimits, ConfigError, Limiter, LimiterUnavailable
from limiter._admin import is_registry_key
from limiter.cli import run
from limiter.testing import RedisServer
from tests._cluster import RedisClusterNodes
from tests._fleet import Fleet, max_overlap, most_admissions, window_violations
from tests.conftest import wait_for_waiters

pytestmark = [pytest.mark.redis]

#: Three API names whose hash tags land on the three masters (slot ranges 0-5460,
#: 5461-10921, 10922-16383): checked by test_the_apis_live_on_three_shards.
CONC, WIN, BOTH = "b", "c", "a"
SPECS: dict[str, dict[str, Any]] = {
    CONC: {"max_concurrent": 4},
    WIN: {"rates": [[10, 0.5]]},
    BOTH: {"max_concurrent": 3, "rates": [[6, 0.25], [16, 1.0]]},
}


def shard_of(api: str) -> int:
    return key_slot(f"{{{api}}}".encode()) * 3 // 16384


@pytest.fixture(scope="module")
def cluster() -> Iterator[RedisClusterNodes]:
    with RedisClusterNodes() as nodes:
        yield nodes


@pytest.fixture
def fresh(cluster: RedisClusterNodes) -> RedisClusterNodes:
    cluster.flush()
    return cluster


@pytest.fixture
async def lim(fresh: RedisClusterNodes) -> AsyncIterator[Limiter]:
    limits = {
        CONC: APILimits(max_concurrent=1, lease_ttl=0.5),
        WIN: APILimits(max_concurrent=1, lease_ttl=0.5),
        BOTH: APILimits(max_concurrent=1, lease_ttl=0.5),
    }
    async with Limiter.from_url(fresh.url, limits) as limiter:
        yield limiter


class ClusterFleet(Fleet):
    module = "tests._cluster_workers"
    defaults: dict[str, Any] = {}  # noqa: RUF012


async def test_the_apis_live_on_three_shards(lim: Limiter, fresh: RedisClusterNodes) -> None:
    """Each API's keys are on its own master, and only there."""
    assert sorted(shard_of(api) for api in (CONC, WIN, BOTH)) == [0, 1, 2]
    for api in (CONC, WIN, BOTH):
        async with lim.slot(api):
            pass
    for i, master in enumerate(fresh.masters):
        with fresh.client(master) as c:
            keys = [k.decode() for k in c.keys("limiter:*") if not is_registry_key(k)]
        tags = {k.split("{")[1].split("}")[0] for k in keys}
        assert tags == {api for api in (CONC, WIN, BOTH) if shard_of(api) == i}, keys


async def test_bounds_hold_on_every_shard_across_processes(
    fresh: RedisClusterNodes, redis_server: RedisServer, client: aioredis.Redis, tmp_path: Path
) -> None:
    """3 processes x 3 APIs on 3 shards: every concurrency and window bound holds and is used."""
    fleet = ClusterFleet(redis_server.url, client, tmp_path)
    names = ["p0", "p1", "p2"]
    try:
        for name in names:
            fleet.start("multi_load", name, limiter_url=fresh.url, apis=SPECS, tasks=6, hold=0.02)
        await fleet.ready(len(names))
        deadline = time.time() + 2.5
        await fleet.go(*names, deadline=deadline)
        results = [await fleet.result(name) for name in names]
    finally:
        fleet.close()
    errors = [e for r in results for e in r["errors"]]
    assert errors == [], "\n\n".join(errors)
    by_api: dict[str, list[list[Any]]] = {api: [] for api in SPECS}
    for r in results:
        for a in r["admissions"]:
            by_api[a[0]].append(a)
    span_us = 2_000_000
    deadline_us = int(deadline * 1e6)
    for api, spec in SPECS.items():
        adm = by_api[api]
        assert all(a[1] - 1000 <= a[3] <= a[2] + 1000 for a in adm), f"{api}: Redis time"
        if "max_concurrent" in spec:
            peak = max_overlap((a[4], a[5]) for a in adm)
            assert peak <= spec["max_concurrent"], f"{api}: {peak} holders at once"
            assert peak == spec["max_concurrent"], f"{api}: the limit was never reached"
        times = [a[3] for a in adm]
        for n, period in spec.get("rates", []):
            assert window_violations(times, n, round(period * 1e6)) == [], f"{api}: {n}/{period}s"
        if spec.get("rates"):
            first = min(times)
            assert first + span_us <= deadline_us
            used = sum(1 for t in times if t < first + span_us)
            possible = most_admissions(spec["rates"], span_us)
            assert used >= math.ceil(0.9 * possible), f"{api}: {used} of {possible} in 2 s"


async def test_hand_off_reaches_a_waiter_through_cluster_pub_sub(fresh: RedisClusterNodes) -> None:
    """A waiter in another limiter is admitted on release at once, not at its next renewal.

    ticket_ttl=30 puts the renewal fallback 10 s away: a hand-off within 1 s came by the
    wake-up message, published by the script on the API's shard.
    """
    limits = {BOTH: APILimits(max_concurrent=1)}
    async with (
        Limiter.from_url(fresh.url, limits, ticket_ttl=30) as first,
        Limiter.from_url(fresh.url, limits, ticket_ttl=30) as second,
    ):
        held = await first.acquire(BOTH)
        waiting = asyncio.create_task(second.acquire(BOTH, timeout=20))
        await wait_for_waiters(first, BOTH, 1)
        released = time.monotonic()
        await held.release()
        slot = await asyncio.wait_for(waiting, 20)
        assert time.monotonic() - released < 1.0
        await slot.release()


async def test_leases_on_three_shards_are_renewed(lim: Limiter) -> None:
    """Slots held on three shards outlive three 0.5 s leases: renewals reach every shard."""
    slots = [await lim.acquire(api) for api in (CONC, WIN, BOTH)]
    await asyncio.sleep(1.6)  # three lease lengths: without renewal every lease is gone
    for api in (CONC, WIN, BOTH):
        with pytest.raises(AcquireTimeout):
            await lim.acquire(api, timeout=0)
    for slot in slots:
        await slot.release()  # raises LeaseLost if a lease had lapsed


async def test_script_flush_on_every_node_mid_run(lim: Limiter, fresh: RedisClusterNodes) -> None:
    """Scripts gone from every node (a flush, a failover): the limiter reloads them and goes on."""
    held = [await lim.acquire(api) for api in (CONC, WIN)]
    for node in fresh.nodes:
        with fresh.client(node) as c:
            c.script_flush()
    await lim.renew()
    for slot in held:
        await slot.release()
    for api in (CONC, WIN, BOTH):
        async with lim.slot(api):
            assert (await lim.stats(api))["concurrent_requests"] == 1


async def test_keys_of_two_slots_fail_loudly(lim: Limiter, fresh: RedisClusterNodes) -> None:
    """A script given keys of two slots raises LimiterUnavailable and admits nothing.

    Through the cluster client (which refuses to route it) and straight to a master
    (which answers CROSSSLOT): either way the caller hears of it, never "allowed".
    """
    plan = lim._plans[CONC]
    other = f"limiter:{{{WIN}}}:queue".encode()
    assert key_slot(other) != key_slot(plan.keys[0])
    lim._plans[CONC] = dataclasses.replace(plan, keys=(plan.keys[0], other, *plan.keys[2:]))
    with pytest.raises(LimiterUnavailable, match="same key slot"):
        await lim.acquire(CONC, timeout=0)

    master = fresh.masters[shard_of(CONC)]
    direct = aioredis.Redis(port=master.port)
    bad = Limiter(direct, {CONC: APILimits(max_concurrent=1)})
    same_node = next(
        f"limiter:{{x{i}}}:queue".encode()
        for i in range(10_000)
        if shard_of(f"x{i}") == shard_of(CONC)
        and key_slot(f"{{x{i}}}".encode()) != key_slot(plan.keys[0])
    )
    bad._plans[CONC] = dataclasses.replace(plan, keys=(plan.keys[0], same_node, *plan.keys[2:]))
    try:
        with pytest.raises(LimiterUnavailable, match="hash to the same slot"):
            await bad.acquire(CONC, timeout=0)
    finally:
        await bad.aclose()
        await direct.aclose()
    with fresh.client(master) as c:
        left = [k for k in c.keys("limiter:*") if not is_registry_key(k)]
        assert left == []  # nothing was admitted or queued


async def test_a_burst_larger_than_the_connection_cap_queues(fresh: RedisClusterNodes) -> None:
    """300 concurrent acquires through a client capped at 20 connections per node all pass."""
    limits = {CONC: APILimits(max_concurrent=300)}
    async with Limiter.from_url(fresh.url, limits, max_connections=20) as limiter:
        slots = await asyncio.gather(*(limiter.acquire(CONC, timeout=10) for _ in range(300)))
        assert (await limiter.stats(CONC))["concurrent_requests"] == 300
        await asyncio.gather(*(s.release() for s in slots))


async def test_cluster_urls_are_checked_and_never_echo_the_password() -> None:
    for url, part in [
        ("redis+cluster://:s3cret@127.0.0.1:99999/0", "port '99999'"),
        ("redis+cluster://:s3cret@/0", "no startup node"),
        ("redis+cluster://:s3cret@127.0.0.1:7000/3", "database 0"),
        ("redis+cluster://:s3cret@127.0.0.1:7000/0?bogus=1", "bogus"),
    ]:
        with pytest.raises(ConfigError) as raised:
            Limiter.from_url(url, {CONC: APILimits(max_concurrent=1)})
        assert raised.value.field == "url"
        assert part in str(raised.value)
        assert "s3cret" not in str(raised.value)
        assert "s3cret" not in repr(raised.value.value)


async def test_an_unreachable_cluster_fails_fast() -> None:
    """No startup node answers: LimiterUnavailable within 2 s, not a hang."""
    with RedisServer() as gone:
        port = gone.port
    lim = Limiter.from_url(f"redis+cluster://127.0.0.1:{port}", {CONC: APILimits(max_concurrent=1)})
    started = time.monotonic()
    try:
        with pytest.raises(LimiterUnavailable):
            await lim.acquire(CONC, timeout=5)
    finally:
        await lim.aclose()
    assert time.monotonic() - started < 2.0


async def test_a_cluster_client_never_shows_its_password() -> None:
    lim = Limiter.from_url(
        "redis+cluster://user:s3cret@127.0.0.1:7000,127.0.0.1:7001",
        {CONC: APILimits(max_concurrent=1)},
    )
    try:
        assert "s3cret" not in repr(lim) + repr(lim.redis) + str(vars(lim.redis))
    finally:
        await lim.aclose()


async def test_the_command_line_on_a_cluster(lim: Limiter, fresh: RedisClusterNodes) -> None:
    """doctor, stats and limits set work through a redis+cluster:// URL; the override,
    set by the CLI on the API's own shard, binds the application's limiter (1 -> 2)."""
    await lim.stats()
    await asyncio.gather(*list(lim._background))  # the registry is written
    for argv in (["doctor"], ["stats", "--json"], ["limits", "set", CONC, "--max-concurrent", "2"]):
        out, err = io.StringIO(), io.StringIO()
        assert await run(["--url", fresh.url, *argv], out=out, err=err) == 0, out.getvalue()
        assert err.getvalue() == ""
    held = [await lim.acquire(CONC, timeout=0) for _ in range(2)]  # 2, configured 1
    with pytest.raises(AcquireTimeout):
        await lim.acquire(CONC, timeout=0)
    assert (await lim.stats(CONC))["overrides"]["max_concurrent"] == 2
    for slot in held:
        await slot.release()
