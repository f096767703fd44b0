"""Redis Sentinel: ``redis+sentinel://`` URLs, and a master killed under load from 3 processes."""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.exceptions

from limiter import AcquireTimeout, APILimits, ConfigError, LeaseLost, Limiter, Rate
from limiter._connect import parse_sentinel_url
from limiter.testing import _die_with_parent
from tests._sentinel import SentinelRig, load_limits, now_us, run_load

ROOT = Path(__file__).resolve().parents[1]

# -- URLs ------------------------------------------------------------------------------


def test_sentinel_url_parts() -> None:
    """Every part of a redis+sentinel:// URL is read, passwords percent-decoded and unshown."""
    url = (
        "redis+sentinel://app:p%40ss%2Fw0rd@10.0.0.1:26380,[::1]:26381,sentinel-c/cache/3"
        "?sentinel_password=s3cret&sentinel_username=watcher"
    )
    parsed = parse_sentinel_url(url)
    assert parsed.sentinels == (("10.0.0.1", 26380), ("::1", 26381), ("sentinel-c", 26379))
    assert (parsed.service_name, parsed.db) == ("cache", 3)
    assert (parsed.username, parsed.password) == ("app", "p@ss/w0rd")
    assert (parsed.sentinel_username, parsed.sentinel_password) == ("watcher", "s3cret")
    assert "p@ss" not in repr(parsed)
    assert "s3cret" not in repr(parsed)
    bare = parse_sentinel_url("redis+sentinel://127.0.0.1:26379/mymaster/")
    assert (bare.service_name, bare.db, bare.password) == ("mymaster", 0, None)


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("redis+sentinel://:hunter2@/svc", "no sentinel host"),
        ("redis+sentinel://:hunter2@h:notaport/svc", "port 'notaport'"),
        ("redis+sentinel://:hunter2@h:70000/svc", "port '70000'"),
        ("redis+sentinel://:hunter2@h:1,:2/svc", "sentinel 2: no host"),
        ("redis+sentinel://:hunter2@::1:26379/svc", "IPv6"),
        ("redis+sentinel://:hunter2@h:1", "no service name"),
        ("redis+sentinel://:hunter2@h:1/", "no service name"),
        ("redis+sentinel://:hunter2@h:1/svc/x", "database 'x'"),
        ("redis+sentinel://:hunter2@h:1/svc/0/extra", "/<service_name>[/<db>]"),
        ("redis+sentinel://:hunter2@h:1/svc?password=hunter2", "unknown query argument"),
        ("redis+sentinel://:hunter2@h:1/svc?sentinel_password", "malformed"),
        ("redis+sentinel://h:1/svc?sentinel_password=hunter2&sentinel_password=x", "twice"),
        ("redis+sentinel://:p@ss:hunter2@h:bad/svc", "port 'bad'"),
        ("rediss+sentinel://:hunter2@h:1/svc", "not supported"),
    ],
)
def test_bad_sentinel_urls(url: str, says: str) -> None:
    """A bad URL raises ConfigError naming the url field and the fault, never the password."""
    with pytest.raises(ConfigError) as info:
        Limiter.from_url(url, {"a": APILimits(max_concurrent=1)})
    err = info.value
    assert err.field == "url"
    assert says in str(err)
    for text in (str(err), repr(err), str(err.value)):
        assert "hunter2" not in text


class _StubSentinel:
    """A sentinel client whose answers the test releases one by one."""

    def __init__(self, name: str, answers: bool) -> None:
        self.name, self.answers, self.closed = name, answers, False
        self.gates: list[asyncio.Event] = []
        self.two_waiting = asyncio.Event()

    async def sentinel_masters(self) -> dict[str, Any]:
        if not self.answers:
            raise redis.exceptions.ConnectionError(f"{self.name} down")
        gate = asyncio.Event()
        self.gates.append(gate)
        if len(self.gates) == 2:
            self.two_waiting.set()
        await gate.wait()
        state = {"ip": "127.0.0.1", "port": 7000, "is_master": True, "is_sdown": False}
        return {"svc": {**state, "is_odown": False, "num-other-sentinels": 2}}

    async def aclose(self) -> None:
        self.closed = True

    def __repr__(self) -> str:
        return self.name


async def test_concurrent_master_lookups_keep_every_sentinel() -> None:
    """Two tasks that look for the master at once leave each sentinel in the list once.

    redis-py 8.1 swaps the answering sentinel to the front by an index read before its
    await: the later of two concurrent look-ups wrote one client twice and dropped
    another, which was then never asked again nor closed (leaked connections).
    """
    lim = Limiter.from_url("redis+sentinel://127.0.0.1:1,127.0.0.1:2,127.0.0.1:3/svc", {})
    sentinel = lim.redis._limiter_sentinel
    real = list(sentinel.sentinels)
    stubs = [_StubSentinel("s0", False), _StubSentinel("s1", False), _StubSentinel("s2", True)]
    sentinel.sentinels[:] = stubs
    sentinel._all_sentinels = tuple(stubs)
    first = asyncio.create_task(sentinel.discover_master("svc"))
    second = asyncio.create_task(sentinel.discover_master("svc"))
    await asyncio.wait_for(stubs[2].two_waiting.wait(), 5)  # both on s2, the one that answers
    stubs[2].gates[1].set()
    assert await second == ("127.0.0.1", 7000)
    stubs[2].gates[0].set()
    assert await first == ("127.0.0.1", 7000)
    assert sentinel.sentinels[0] is stubs[2]
    assert sorted(map(id, sentinel.sentinels)) == sorted(map(id, stubs))
    await lim.aclose()
    assert all(s.closed for s in stubs)
    for client in real:
        await client.aclose()


# -- a live rig ------------------------------------------------------------------------


@pytest.fixture
def rig() -> Iterator[SentinelRig]:
    """A master, a replica and 3 sentinels (down after 1 s, failover timeout 2 s)."""
    with SentinelRig(down_after_ms=1000, failover_timeout_ms=2000) as started:
        yield started


async def _sentinel_clients(rig: SentinelRig) -> list[int]:
    counts = []
    for node in rig.sentinels:
        with rig.sentinel_client(node) as s:
            counts.append(int(s.info("clients")["connected_clients"]))
    return counts


@pytest.mark.redis
async def test_from_url_admits_through_the_master() -> None:
    """Through redis+sentinel:// (passwords on master and sentinels) slots live on the master.

    aclose closes the sentinel connections as well as the master's.
    """
    with SentinelRig(password="data-pw", sentinel_password="watch-pw") as rig:
        before = await _sentinel_clients(rig)
        lim = Limiter.from_url(rig.url, {"a": APILimits(max_concurrent=1)})
        slot = await lim.acquire("a", timeout=2)
        with rig.data_client(rig.master.port) as master:
            assert master.zscore("limiter:{a}:holders", slot.id) is not None
        with pytest.raises(AcquireTimeout):
            await lim.acquire("a", timeout=0)
        await slot.release()
        assert (await lim.stats("a"))["successful_requests"] == 1
        during = await _sentinel_clients(rig)
        assert sum(during) > sum(before)  # the client asked at least one sentinel
        await lim.aclose()
        deadline = time.monotonic() + 2
        while await _sentinel_clients(rig) != before:
            assert time.monotonic() < deadline, "sentinel connections left open after aclose"
            await asyncio.sleep(0.01)  # the sentinels see the close a moment later


# -- failover under load ---------------------------------------------------------------

#: The load: 4 slots, 16 admissions per rolling 3 s, 2 s leases; calls of 0.05-0.3 s,
#: one in four long (0.9-1.8 s, still shorter than the lease).
SPEC: dict[str, Any] = {
    "max_concurrent": 4,
    "rate": [16, 3.0],
    "lease_ttl": 2.0,
    "long_hold": 1.8,
    "acquire_timeout": 10.0,
}
DOWN_AFTER, FAILOVER_TIMEOUT = 1.0, 2.0
#: Kill -> first admission on the new master. Sentinel sees the master down after
#: DOWN_AFTER; a failover it starts either completes within FAILOVER_TIMEOUT or is aborted,
#: and a second attempt (after a split vote) starts 2 x FAILOVER_TIMEOUT after the first;
#: 1 s more covers the quorum exchange (peers asked every second), Sentinel's start-up
#: desynchronisation (< 1 s) and a caller's next attempt (50 ms back-off here).
STALL_BOUND = DOWN_AFTER + 2 * FAILOVER_TIMEOUT + 1.0
#: A LimiterUnavailable must come within a second of the call (from_url's promise).
FAIL_FAST = 1.0
#: Replication is cut this long at most before the kill: below DOWN_AFTER, so Sentinel never
#: sees the paused replica as down.
LAG = 0.8


class Worker:
    """A ``python -m tests._sentinel load`` process."""

    def __init__(self, proc: asyncio.subprocess.Process, out: Path, log: Path) -> None:
        self.proc, self.out, self.log = proc, out, log

    @classmethod
    async def start(cls, url: str, tmp: Path, name: str, seed: int) -> Worker:
        out, log = tmp / f"{name}.json", tmp / f"{name}.log"
        cfg = {
            "url": url,
            "limits": SPEC,
            "tasks": 2,
            "seed": seed,
            "until": time.time() + 60,
            "out": str(out),
        }
        with log.open("wb") as err:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "tests._sentinel",
                "load",
                json.dumps(cfg),
                cwd=ROOT,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=err,
                preexec_fn=_die_with_parent,
            )
        return cls(proc, out, log)

    async def ready(self, within: float) -> None:
        assert self.proc.stdout is not None
        try:
            line = await asyncio.wait_for(self.proc.stdout.readline(), within)
        except TimeoutError:
            line = b""
        assert line == b"ready\n", f"worker not ready in {within}s: {self.log.read_text()}"

    async def result(self, within: float) -> dict[str, list[list[int]]]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(b"stop\n")
        await self.proc.stdin.drain()
        self.proc.stdin.close()
        code = await asyncio.wait_for(self.proc.wait(), within)
        assert code == 0, f"worker exited {code}: {self.log.read_text()[-3000:]}"
        data: dict[str, list[list[int]]] = json.loads(self.out.read_text())
        return data

    def kill(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()


async def _poll(within: float, check: Any) -> bool:
    """Poll the async ``check()`` until true (True) or ``within`` seconds pass (False)."""
    deadline = time.monotonic() + within
    while not await check():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.01)  # polls Redis or Sentinel state: no event to await
    return True


async def _until(what: str, within: float, check: Any) -> float:
    """Poll the async ``check()`` until true; returns the seconds it took."""
    start = time.monotonic()
    assert await _poll(within, check), f"not {what} within {within}s"
    return time.monotonic() - start


def in_flight_peaks(admissions: list[list[int]], after_us: int) -> tuple[int, int]:
    """Most holders in flight at once (holder timestamps), overall and from ``after_us`` on.

    A holder is in flight from its admission (Redis time) until it starts its release,
    which is inside the span Redis counts its slot: a correct limiter never exceeds
    max_concurrent by this count.
    """
    events = sorted([(a[1], 1) for a in admissions] + [(a[2], -1) for a in admissions])
    peak = late_peak = current = 0
    for t, step in events:  # a release at the same microsecond counts first (-1 < 1)
        if t >= after_us:
            late_peak = max(late_peak, current)  # also the count standing at after_us
        current += step
        peak = max(peak, current)
        if t >= after_us:
            late_peak = max(late_peak, current)
    return peak, late_peak


def window_counts(times: list[int], period_us: int) -> list[tuple[int, int]]:
    """``(t, admissions in (t - period, t])`` at every admission time ``t`` (the Lua rule)."""
    times = sorted(times)
    return [(t, i + 1 - bisect.bisect_right(times, t - period_us)) for i, t in enumerate(times)]


@pytest.mark.redis
@pytest.mark.multiprocess
@pytest.mark.slow
async def test_failover_under_load(rig: SentinelRig, tmp_path: Path) -> None:
    """A master SIGKILLed under load from 3 processes: the limiter carries on within bounds.

    Scenario: 8 tasks in 3 processes (4 here, 2 in each of 2 workers) share one API (4 slots,
    16 per rolling 3 s, 2 s leases). The replica is paused and cut off for up to LAG before
    the kill, so the master's last writes (admissions, releases, renewals) never reach it:
    what asynchronous replication loses when a replica lags, made certain here.

    Bound on over-admission (a referee counts from the holders' own timestamps):
    - In flight: the new master lacks at most the leases the old one held (<= max_concurrent),
      so at most max_concurrent extra are in flight; the extra are calls admitted before
      the kill, which end within their length (< lease_ttl here), so after promotion +
      lease_ttl in-flight never exceeds max_concurrent.
    - Windows: the new master lacks at most the admissions of the old one's window
      (<= limit), so a window holds at most 2 x limit; a window that starts after the kill
      holds only the new master's admissions, so the excess ends one window length after it.
    Holders that asked after the cut and were admitted before the kill get LeaseLost on
    release, never a silent success. (A waiter whose ticket was queued before the cut may
    instead be handed a slot again by the new master, which then counts it: no excess.)
    """
    # "probe": the worst case, by hand: both slots and the whole window taken after the cut.
    probe_limits = APILimits(max_concurrent=2, rates=[Rate(2, 30.0)], lease_ttl=30)
    limits = {**load_limits(SPEC), "probe": probe_limits}
    api_limits = limits["api"]
    max_concurrent, (limit, period) = SPEC["max_concurrent"], SPEC["rate"]
    lim = Limiter.from_url(rig.url, limits)
    workers: list[Worker] = []
    stop = asyncio.Event()
    first = asyncio.Event()
    load = asyncio.create_task(run_load(lim, SPEC, 4, 0, stop, first))
    try:
        workers = [await Worker.start(rig.url, tmp_path, f"w{i}", i + 1) for i in range(2)]
        for w in workers:
            await w.ready(within=15)
        await asyncio.wait_for(first.wait(), 5)

        async def window_full() -> bool:
            return bool((await lim.stats("api"))["windows"][f"rate:{period:g}s"]["used"] >= limit)

        await _until("the window is full", 10, window_full)  # the load is at its limits
        total = (await lim.stats("api"))["total_requests"]

        async def admitted_one_more() -> bool:
            return bool((await lim.stats("api"))["total_requests"] > total)

        # Cut while admissions flow (as old entries leave the window), not in a lull.
        await _until("an admission into the full window", 5, admitted_one_more)

        # Cut replication, then let the master take writes the replica will never see.
        rig.pause_replica()
        rig.cut_replication()
        cut_us = now_us()
        total_at_cut = (await lim.stats("api"))["total_requests"]
        lost = [await lim.acquire("probe", timeout=2) for _ in range(2)]  # never replicated

        async def admitted_two_more() -> bool:
            return bool((await lim.stats("api"))["total_requests"] >= total_at_cut + 2)

        # Proceed after LAG even if the load was slower (the probes are lost in any case).
        await _poll(LAG, admitted_two_more)
    except BaseException:
        stop.set()
        for w in workers:
            w.kill()
        with contextlib.suppress(BaseException):
            await asyncio.wait_for(load, 15)
        await lim.aclose()
        raise
    kill_us = now_us()
    rig.kill_master()
    rig.resume_replica()
    try:
        promoted_in = await _until(
            "the replica promoted",
            STALL_BOUND,
            lambda: asyncio.to_thread(lambda: rig.master_ports() == [rig.replica.port] * 3),
        )
        promoted_us = now_us()
        # The new master lacks both lost admissions: it admits 2 more at once (2 x
        # max_concurrent in flight, 2 x limit in the window), and not one more.
        again = [await lim.acquire("probe", timeout=0) for _ in range(2)]
        with pytest.raises(AcquireTimeout):
            await lim.acquire("probe", timeout=0)
        for slot in lost:
            with pytest.raises(LeaseLost):  # its lease was written after the cut
                await slot.release()
        for slot in again:
            await slot.release()
        with pytest.raises(AcquireTimeout) as refused:
            await lim.acquire("probe", timeout=0)
        assert refused.value.reason == "rate:30s"  # the new master's window: full at 2
        # Run until every window holds only new admissions and every lease has run out.
        end = max(kill_us / 1e6 + period, promoted_us / 1e6 + api_limits.lease_ttl) + 1.0
        await asyncio.sleep(end - time.time())  # the load's run time, not a synchronisation
    finally:
        stop.set()
        results = [await w.result(within=15) for w in workers]
        results.append(await asyncio.wait_for(load, 15))
        await lim.aclose()

    # -- the referee -----------------------------------------------------------------
    admissions = [a for r in results for a in r["admissions"]]
    unavailable = [u for r in results for u in r["unavailable"]]
    timeouts = [t for r in results for t in r["timeouts"]]
    first_new = min((a[1] for a in admissions if a[1] > kill_us), default=None)
    assert first_new is not None, "no admission after the kill"
    stall = (first_new - kill_us) / 1e6
    stall_errors = [u for u in unavailable if kill_us <= u[0] < first_new]
    slowest_error = max((u[1] - u[0]) / 1e6 for u in stall_errors)
    # Waiters queued before the kill wait on (no wake-ups reach them until a renewal).
    rode_through = [a for a in admissions if a[0] < kill_us < a[1]]
    failed_through = [u for u in unavailable if u[0] < kill_us]
    peak, late_peak = in_flight_peaks(admissions, first_new + int(api_limits.lease_ttl * 1e6))
    before_kill = [a for a in admissions if a[2] < kill_us]
    peak_before, _ = in_flight_peaks(before_kill, 0)
    counts = window_counts([a[1] for a in admissions], int(period * 1e6))
    worst_window = max(n for _, n in counts)
    late_window = max(n for t, n in counts if t - period * 1e6 >= kill_us)
    early_window = max(n for t, n in counts if t < kill_us)
    cut_off = [a for a in admissions if cut_us < a[1] < kill_us]
    summary = {
        "redis": rig.version(),
        "stall_s": round(stall, 3),
        "promoted_seen_s": round(promoted_in, 3),
        "unavailable_during_stall": len(stall_errors),
        "slowest_unavailable_s": round(slowest_error, 3),
        "waiters_admitted_through": len(rode_through),
        "waiters_admitted_through_after_kill_s": round(
            max(((a[1] - kill_us) / 1e6 for a in rode_through), default=0), 3
        ),
        "waiters_failed_through": len(failed_through),
        "waiters_failed_through_after_kill_s": round(
            max(((u[1] - kill_us) / 1e6 for u in failed_through), default=0), 3
        ),
        "admissions": len(admissions),
        "after_cut_before_kill": len(cut_off),
        "lease_lost": sum(a[3] == 1 for a in admissions),
        "release_unavailable": sum(a[3] == 2 for a in admissions),
        "excess_in_flight": peak - max_concurrent,
        "excess_in_window": worst_window - limit,
    }
    print("\nsentinel failover:", json.dumps(summary))

    assert stall <= STALL_BOUND, summary
    assert stall_errors, "the stall raised no LimiterUnavailable"
    assert slowest_error <= FAIL_FAST, summary
    assert not timeouts, f"acquire timed out during the failover: {timeouts}"
    assert peak_before <= max_concurrent
    assert peak <= 2 * max_concurrent, summary
    assert late_peak <= max_concurrent, summary
    assert early_window <= limit
    assert worst_window <= 2 * limit, summary
    assert late_window <= limit, summary
    # Asked and admitted after the cut, released once the new master answered: LeaseLost.
    for a in (a for a in cut_off if a[0] > cut_us):
        assert a[3] != 0, f"silent success for a lease lost in the failover: {a}"
        if a[2] > promoted_us:
            assert a[3] == 1, a
    # Every process carried on through the new master, nothing restarted.
    assert all(any(a[1] > first_new for a in r["admissions"]) for r in results)
    assert rig.master_ports() == [rig.replica.port] * 3
