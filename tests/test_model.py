"""Model-based tests: the real Lua scripts on a real redis-server against a Python model."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from limiter import APILimits, Rate
from limiter._contract import KeyPlan, lua_source
from limiter._retry import MAX_HINT, classify_response, parse_duration, parse_retry_after
from limiter.testing import RedisServer

#: Lease length and ticket length given to the scripts (seconds).
LEASE = 0.3
LEASE_US = round(LEASE * 1_000_000)
#: Safety margin (microseconds) around every time comparison the model makes: the
#: model only asserts an outcome when it holds even if every instant it knows were
#: off by 50 ms, so scheduling jitter and clock-boundary ties never make it flaky.
MARGIN = 50_000

#: The synchronous client of the module's redis-server (set by the ``redis_url`` fixture).
_CLIENT: dict[str, redis.Redis] = {}


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    """One real redis-server for this module, with a synchronous client, stopped at the end."""
    with RedisServer() as server:
        client = redis.Redis.from_url(server.url)
        _CLIENT["client"] = client
        try:
            yield server.url
        finally:
            _CLIENT.pop("client", None)
            client.close()


def _now(client: redis.Redis) -> int:
    """Redis TIME in microseconds."""
    sec, usec = client.time()
    return int(sec) * 1_000_000 + int(usec)


class LimiterModel(RuleBasedStateMachine):
    """acquire ("try"), release and renew run directly, checked against a model."""

    def __init__(self) -> None:
        super().__init__()
        self.client = _CLIENT["client"]
        self.client.flushall()
        self.scripts = {
            op: self.client.register_script(lua_source(op))
            for op in ("acquire", "release", "renew")
        }
        self.counter = 0
        #: slot id -> (admission time, lower bound of lease expiry, upper bound), microseconds.
        self.holders: dict[str, tuple[int, int, int]] = {}
        #: Admission times (microseconds) of every admitted request: all stay in the window.
        self.admissions: list[int] = []
        self.plan: KeyPlan | None = None

    @initialize(
        max_concurrent=st.integers(1, 3),
        limit=st.integers(2, 4),
        period=st.sampled_from([0.3, 0.4, 0.5, 0.6]),
    )
    def setup(self, max_concurrent: int, limit: int, period: float) -> None:
        """Choose the API's limits and build its keys and configuration as the client does."""
        self.max_c, self.limit, self.period_us = max_concurrent, limit, round(period * 1_000_000)
        limits = APILimits(
            max_concurrent=max_concurrent, rates=[Rate(limit, period)], lease_ttl=LEASE
        )
        self.plan = KeyPlan.build("mdl", "api", limits, ticket_ttl=LEASE, stats_ttl=60.0)
        self.window_key = self.plan.key("requests")
        self.window_id = self.plan.windows[0].id.encode()

    def _call(self, op: str, *extra: Any, tail: tuple[Any, ...] = ()) -> tuple[int, Any, int]:
        """Run script ``op`` with the plan's KEYS and ARGV: (TIME before, reply, TIME after)."""
        assert self.plan is not None
        t0 = _now(self.client)
        args = list(self.plan.argv(op, *extra, tail=tail))
        res = self.scripts[op](keys=list(self.plan.keys), args=args)
        t1 = _now(self.client)
        return t0, res, t1

    @rule()
    def try_acquire(self) -> None:
        """Acquire in "try" mode: refused when surely full, admitted when surely free."""
        self.counter += 1
        slot = f"p1.{self.counter}"
        t0, res, t1 = self._call("acquire", slot, 1, 0, b"try", 1, 0, "1.0", "")
        # The script's NOW lies in [t0, t1]. A lease is alive at NOW iff expiry > NOW;
        # an admission is in the window at NOW iff its time > NOW - period.
        # "Surely" = true for every NOW in [t0 - MARGIN, t1 + MARGIN].
        alive_sure = sum(lo > t1 + MARGIN for _, lo, _ in self.holders.values())
        alive_maybe = sum(hi > t0 - MARGIN for _, _, hi in self.holders.values())
        win_sure = sum(at > t1 - self.period_us + MARGIN for at in self.admissions)
        win_maybe = sum(at > t0 - self.period_us - MARGIN for at in self.admissions)
        admitted = int(res[0]) == 1
        if alive_sure >= self.max_c or win_sure >= self.limit:
            assert not admitted, f"admitted while surely full: {res} {alive_sure=} {win_sure=}"
        if alive_maybe < self.max_c and win_maybe < self.limit:
            assert admitted, f"refused while surely free: {res} {alive_maybe=} {win_maybe=}"
        if admitted:
            at = int(res[1])
            assert t0 <= at <= t1
            self.holders[slot] = (at, at + LEASE_US, at + LEASE_US)
            self.admissions.append(at)
        else:
            assert res[1] in (b"concurrency", self.window_id), res
            assert int(res[3]) == 1  # nobody queues in "try" mode: the caller is the head

    @precondition(lambda self: bool(self.holders))
    @rule(index=st.integers(0, 9))
    def release_one(self, index: int) -> None:
        """Release a held slot: held=1 when its lease is surely alive, 0 when surely expired."""
        slot = sorted(self.holders)[index % len(self.holders)]
        at, lo, hi = self.holders.pop(slot)
        t0, res, t1 = self._call("release", slot, 1, at, 0, -1, 0, "")
        held = int(res[0])
        if lo > t1 + MARGIN:
            assert held == 1, f"surely alive lease of {slot} reported lost"
        if hi <= t0 - MARGIN:
            assert held == 0, f"surely expired lease of {slot} reported held"
        assert int(res[1]) == 0  # nobody waits

    @precondition(lambda self: bool(self.holders))
    @rule()
    def renew_all(self) -> None:
        """Renew every held slot: surely-alive ones are extended, surely-expired ones are lost."""
        slots = sorted(self.holders)
        t0, res, t1 = self._call("renew", len(slots), tail=tuple(slots))
        lost = {s.decode() for s in res[0]}
        assert res[1] == []
        assert res[2] == []
        assert lost <= set(slots)
        for slot in slots:
            at, lo, hi = self.holders[slot]
            if lo > t1 + MARGIN:
                assert slot not in lost, f"surely alive lease of {slot} reported lost"
            if hi <= t0 - MARGIN:
                assert slot in lost, f"surely expired lease of {slot} renewed"
            if slot in lost:
                del self.holders[slot]
            else:
                # Extended to NOW + lease, with NOW somewhere in [t0, t1].
                self.holders[slot] = (at, t0 + LEASE_US, t1 + LEASE_US)

    @rule(seconds=st.sampled_from([0.05, 0.1, 0.2, 0.35]))
    def let_time_pass(self, seconds: float) -> None:
        """Let Redis time move on by sleeping."""
        time.sleep(seconds)

    @invariant()
    def limits_hold(self) -> None:
        """Live holders and window admissions stay within the limits, and every key has a TTL."""
        if self.plan is None:
            return
        now = _now(self.client)
        holders = self.client.zcount(self.plan.keys[0], f"({now}", "+inf")
        assert holders <= self.max_c, f"{holders} live holders > {self.max_c}"
        in_window = self.client.zcount(self.window_key, f"({now - self.period_us}", "+inf")
        assert in_window <= self.limit, f"{in_window} admissions in window > {self.limit}"
        for key in self.client.keys("mdl:*"):
            # -1 = no TTL (a leak); -2 = the key expired between KEYS and PTTL (fine).
            ttl = self.client.pttl(key)
            assert ttl > 0 or ttl == -2, f"{key!r} has no TTL ({ttl})"


LimiterModel.TestCase.settings = settings(
    max_examples=15,
    stateful_step_count=25,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestLimiterModel = pytest.mark.redis(pytest.mark.usefixtures("redis_url")(LimiterModel.TestCase))


_header_text = st.one_of(
    st.text(max_size=40),
    st.from_regex(r"\A-?[0-9]{0,12}(\.[0-9]{0,6})?(e[+-]?[0-9]{1,4})?\Z"),
    st.from_regex(r"\A([0-9]{1,8}(\.[0-9]{1,4})?(ms|us|µs|ns|h|m|s)){1,4}\Z"),
    st.sampled_from(["inf", "-inf", "nan", "1e309", "Wed, 21 Oct 2015 07:28:00 GMT", "-1"]),
    st.datetimes().map(lambda d: d.strftime("%a, %d %b %Y %H:%M:%S GMT")),
)


def _ok_hint(value: float | None) -> bool:
    """None, or a finite float in [0, MAX_HINT]."""
    return value is None or (
        isinstance(value, float) and math.isfinite(value) and 0 <= value <= MAX_HINT
    )


@settings(max_examples=300, deadline=None, database=None)
@given(
    ms=st.none() | _header_text,
    secs=st.none() | _header_text,
    status=st.integers(-1000, 1000),
    body=st.none() | st.text(max_size=40),
)
def test_retry_hints_never_raise(
    ms: str | None, secs: str | None, status: int, body: str | None
) -> None:
    """Hint parsers and classify_response never raise; hints are None or in [0, MAX_HINT]."""
    headers = {}
    if ms is not None:
        headers["retry-after-ms"] = ms
    if secs is not None:
        headers["Retry-After"] = secs
    assert _ok_hint(parse_retry_after(headers))
    assert _ok_hint(parse_duration(secs))
    assert _ok_hint(parse_duration(ms))
    verdict = classify_response(status, headers, body)
    assert _ok_hint(verdict.retry_after)
