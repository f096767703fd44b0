"""Model-based tests: the real Lua scripts on a real redis-server against a Python model."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from limiter import APILimits, Rate
from limiter._contract import KeyPlan, full_reply
from limiter._lua import lua_source
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
        res = full_reply(op, self.scripts[op](keys=list(self.plan.keys), args=args))
        t1 = _now(self.client)
        return t0, res, t1

    @rule()
    def try_acquire(self) -> None:
        """Acquire in "try" mode: refused when surely full, admitted when surely free."""
        self.counter += 1
        slot = f"p1.{self.counter}"
        t0, res, t1 = self._call("acquire", slot, 1, 0, b"try", 1, 0, "1.0", "", "", 0, 0)
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
        t0, res, t1 = self._call("release", slot, 1, at, 0, -1, 0, "", "", "", 0, -1, 0, -1)
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
        holders = self.client.zcount(self.plan.key("holders"), f"({now}", "+inf")
        assert holders <= self.max_c, f"{holders} live holders > {self.max_c}"
        in_window = self.client.zcount(self.window_key, f"({now - self.period_us}", "+inf")
        assert in_window <= self.limit, f"{in_window} admissions in window > {self.limit}"
        for key in self.client.keys("mdl:*"):
            # -1 = no TTL (a leak); 0 = a TTL that ends within this millisecond; -2 = the
            # key expired between KEYS and PTTL (both fine).
            ttl = self.client.pttl(key)
            assert ttl >= 0 or ttl == -2, f"{key!r} has no TTL ({ttl})"


LimiterModel.TestCase.settings = settings(
    max_examples=15,
    stateful_step_count=25,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestLimiterModel = pytest.mark.redis(pytest.mark.usefixtures("redis_url")(LimiterModel.TestCase))


#: The fair-queue model's tenants ("" is the default tenant), priorities, configured
#: weights and runtime weight values ("" clears). Weights are powers of two: every
#: service counter is a sum of powers of two, exact in floating point, so the model
#: and Redis agree on every tie.
FQ_TENANTS = ("", "a", "b", "c")
FQ_PRIORITIES = (-1, 0, 5)
FQ_WEIGHTS = ("1.0", "2.0", "0.5")
#: Lease and ticket length (seconds): nothing expires during a run.
FQ_TTL = 60.0
FQ_TTL_US = round(FQ_TTL * 1_000_000)
#: A read-only script: every key matching ARGV[1] with its type, its contents as one
#: text (a sorted set's members and scores in order, a hash's fields and values, each
#: followed by a newline) and its PTTL. One call and a few replies per check keep a
#: step cheap, so that shrinking a failure takes less time.
FQ_DUMP = """
local out = {}
for _, k in ipairs(redis.call('KEYS', ARGV[1])) do
  local kind = redis.call('TYPE', k).ok
  local v = {}
  if kind == 'zset' then
    v = redis.call('ZRANGE', k, 0, -1, 'WITHSCORES')
  elseif kind == 'hash' then
    v = redis.call('HGETALL', k)
  end
  v[#v + 1] = ''
  out[#out + 1] = {k, kind, table.concat(v, '\\n'), redis.call('PTTL', k)}
end
return out
"""


@dataclass
class _Waiter:
    """One request of the fair-queue model, as the scripts see its ticket."""

    slot: str
    priority: int
    tenant: str
    weight: str
    #: Redis time of its arrival in the queue (microseconds).
    arrival: int = 0

    @property
    def ticket(self) -> str:
        return f"{self.slot}|1|0|{self.priority}|{self.weight}||{self.tenant}"


class FairQueueModel(RuleBasedStateMachine):
    """The fair queue's serving order: acquire ("wait"), release, withdraw, weight.

    The model keeps the holders, one FIFO per (class, tenant) and the classes' weighted
    service counters (VTC), and predicts every admission: the highest priority first;
    within it the tenant with the least service (ties: the one backlogged first); FIFO
    within a tenant. An admission from the queue adds cost / weight to its tenant's
    counter (the runtime weight when set, else the ticket's). A tenant whose last waiter
    in a class leaves (served or withdrawn) leaves the class; while others still wait
    there, it keeps what it leaves with (its counter, plus that admission's service) as a
    debt. A tenant joining a class starts at the least counter of those backlogged (0 when
    none) or at its debt when larger; debts at or below the least are dropped, and all of
    them when the class empties. The API has only a concurrency limit and leases and
    tickets outlive the run, so nothing depends on time and the order is checked exactly
    after every step. Aging (``priority_aging``) depends on time: it is covered by
    tests/test_fairness.py instead.
    """

    def __init__(self) -> None:
        super().__init__()
        self.client = _CLIENT["client"]
        self.client.flushall()
        self.scripts = {
            op: self.client.register_script(lua_source(op))
            for op in ("acquire", "release", "withdraw", "weight")
        }
        self.dump = self.client.register_script(FQ_DUMP)
        self.counter = 0
        self.plan: KeyPlan | None = None
        self.prefix = b""
        self.max_c = 1
        #: The latest Redis time the model saw (an arrival), microseconds.
        self.clock = 0
        #: Configured weight of each tenant, fixed for the run.
        self.weights: dict[str, str] = {}
        #: Weights set at run time (weight op), as the text given.
        self.runtime: dict[str, str] = {}
        #: slot id -> the request holding it.
        self.holders: dict[str, _Waiter] = {}
        #: Holders admitted by their own acquire -> the admission time it returned: their
        #: lease ends a lease length after it.
        self.admitted_at: dict[str, int] = {}
        #: Slots a drain handed to their waiter (a release, withdraw or acquire of another).
        self.handed: set[str] = set()
        #: slot id -> waiting request.
        self.waiters: dict[str, _Waiter] = {}
        #: (priority, tenant) -> its waiters, in FIFO order (arrival, then ticket).
        self.queues: dict[tuple[int, str], list[_Waiter]] = {}
        #: priority -> tenant -> weighted service counter, for backlogged tenants.
        self.service: dict[int, dict[str, float]] = {}
        #: priority -> tenant -> when its backlog in the class began (Redis time, us).
        self.joined: dict[int, dict[str, int]] = {}
        #: priority -> tenant -> admissions from the queue since its backlog began.
        self.admitted: dict[int, dict[str, int]] = {}
        #: priority -> tenant -> the counter it left the class with while others waited.
        self.debts: dict[int, dict[str, float]] = {}

    @initialize(
        max_concurrent=st.integers(1, 2),
        weights=st.tuples(*(st.sampled_from(FQ_WEIGHTS) for _ in FQ_TENANTS)),
    )
    def setup(self, max_concurrent: int, weights: tuple[str, ...]) -> None:
        """Choose the concurrency limit and each tenant's configured weight."""
        self.max_c = max_concurrent
        self.weights = dict(zip(FQ_TENANTS, weights, strict=True))
        limits = APILimits(max_concurrent=max_concurrent, lease_ttl=FQ_TTL)
        self.plan = KeyPlan.build("fq", "api", limits, ticket_ttl=FQ_TTL, stats_ttl=FQ_TTL)
        self.prefix = self._key("queue")[: -len(b"queue")]

    # The model ---------------------------------------------------------------

    def _call(self, op: str, *extra: Any) -> Any:
        """Run script ``op`` with the plan's KEYS and ARGV."""
        assert self.plan is not None
        res = self.scripts[op](keys=list(self.plan.keys), args=list(self.plan.argv(op, *extra)))
        return full_reply(op, res)

    def _key(self, name: str) -> bytes:
        """The API's key ``name`` (one of API_KEYS)."""
        assert self.plan is not None
        return self.plan.key(name)

    def _fair(self, kind: str, priority: int, tenant: str | None = None) -> bytes:
        """The key of ``kind`` ("q", "t", "m", "a", "v") of a class (and tenant)."""
        key = self.prefix + f"{kind}:{priority}".encode()
        return key if tenant is None else key + b":" + tenant.encode()

    def _member(self, priority: int, tenant: str) -> bytes:
        """The tenant's member in t:<class>: "<joined at, 16 digits>|<tenant>"; equal
        counters are served in this order (the tenant backlogged first)."""
        return f"{self.joined[priority][tenant]:016d}|{tenant}".encode()

    def _next(self) -> _Waiter | None:
        """The waiter the model serves next, or None."""
        if not self.service:
            return None
        priority = max(self.service)
        counters = self.service[priority]
        tenant = min(counters, key=lambda t: (counters[t], self._member(priority, t)))
        return self.queues[(priority, tenant)][0]

    def _join(self, w: _Waiter) -> None:
        counters = self.service.setdefault(w.priority, {})
        if w.tenant not in counters:
            start = 0.0
            if counters:
                least = min(counters.values())
                debts = self.debts.pop(w.priority, {})
                start = max(least, debts.pop(w.tenant, least))
                debts = {t: d for t, d in debts.items() if d > least}
                if debts:
                    self.debts[w.priority] = debts
            counters[w.tenant] = start
            # Joined in the call that queued the ticket: at the same Redis time.
            self.joined.setdefault(w.priority, {})[w.tenant] = w.arrival
        queue = self.queues.setdefault((w.priority, w.tenant), [])
        queue.append(w)
        queue.sort(key=lambda x: (x.arrival, x.ticket.encode()))
        self.waiters[w.slot] = w

    def _leave(self, w: _Waiter, charge: float = 0.0) -> bool:
        """Take ``w`` out of the queue; True when its tenant left the class with it
        (owing its counter plus ``charge`` while others wait there)."""
        del self.waiters[w.slot]
        queue = self.queues[(w.priority, w.tenant)]
        queue.remove(w)
        if queue:
            return False
        del self.queues[(w.priority, w.tenant)]
        counter = self.service[w.priority].pop(w.tenant)
        del self.joined[w.priority][w.tenant]
        self.admitted.get(w.priority, {}).pop(w.tenant, None)
        if self.service[w.priority]:
            self.debts.setdefault(w.priority, {})[w.tenant] = counter + charge
        else:
            del self.service[w.priority]
            del self.joined[w.priority]
            self.admitted.pop(w.priority, None)
            self.debts.pop(w.priority, None)
        return True

    def _drain(self, own: str | None = None) -> tuple[bool, int]:
        """Admit waiters in serving order while there is room: (own admitted, others woken)."""
        own_admitted, woken = False, 0
        while len(self.holders) < self.max_c:
            w = self._next()
            if w is None:
                break
            charge = 1 / float(self.runtime.get(w.tenant) or w.weight)
            if not self._leave(w, charge):
                self.service[w.priority][w.tenant] += charge
                counts = self.admitted.setdefault(w.priority, {})
                counts[w.tenant] = counts.get(w.tenant, 0) + 1
            self.holders[w.slot] = w
            if w.slot == own:
                own_admitted = True
            else:
                self.handed.add(w.slot)
                woken += 1
        return own_admitted, woken

    def _check_admission(self, w: _Waiter, res: Any, admitted: bool) -> None:
        """An acquire's reply: {1, at} when the model admits ``w``; else "concurrency",
        at_head 1 with a wait when it is the model's next, at_head 0 and wait -1 when not."""
        if admitted:
            assert int(res[0]) == 1, f"{w.ticket} refused, the model admits it: {res}"
            self.admitted_at[w.slot] = int(res[1])
            return
        assert int(res[0]) == 0, f"{w.ticket} admitted, the model queues it: {res}"
        head = self._next()
        at_head = head is not None and head.slot == w.slot
        assert res[1] == b"concurrency", res
        assert int(res[3]) == int(at_head), (res, head)
        if at_head:
            assert 0 < int(res[2]) <= FQ_TTL_US, res
        else:
            assert int(res[2]) == -1, res

    # Rules -------------------------------------------------------------------

    @rule(
        requests=st.lists(
            st.tuples(
                st.sampled_from(FQ_TENANTS), st.sampled_from(FQ_PRIORITIES), st.integers(1, 3)
            ),
            min_size=1,
            max_size=3,
        )
    )
    def arrive(self, requests: list[tuple[str, int, int]]) -> None:
        """New requests (tenant, priority, how many) acquire in "wait" mode, one after the
        other: each is admitted at once when nobody waits and there is room, else queued
        (and admitted only if the drain serves it). Several per step: queues get long."""
        for tenant, priority, n in requests:
            for _ in range(n):
                self._arrive(tenant, priority)

    def _arrive(self, tenant: str, priority: int) -> None:
        self.counter += 1
        w = _Waiter(f"p1.{self.counter:05d}", priority, tenant, self.weights[tenant])
        anyone_waits = bool(self.waiters)
        res = self._call("acquire", w.slot, 1, 0, b"wait", 1, priority, w.weight, tenant, "", 0, 0)
        if not anyone_waits and len(self.holders) < self.max_c:
            self.holders[w.slot] = w
            self._check_admission(w, res, admitted=True)
            return
        # Queued at the call's Redis time: its ticket's expiry less the ticket length
        # (a ticket admitted in the same call arrived after every other: clock + 1).
        expiry = self.client.zscore(self._key("qexp"), w.ticket)
        w.arrival = self.clock + 1 if expiry is None else int(expiry) - FQ_TTL_US
        self.clock = max(self.clock, w.arrival)
        self._join(w)
        admitted = self._drain(w.slot)[0] if anyone_waits else False
        self._check_admission(w, res, admitted)

    @precondition(lambda self: bool(self.waiters) or bool(self.handed))
    @rule(index=st.integers(0, 99))
    def ask_again(self, index: int) -> None:
        """A waiter asks again (FIRST=0): a slot handed to it is confirmed with the time
        it was handed, else it is refused again and keeps its place in the queue."""
        slots = sorted(self.waiters) + sorted(self.handed)
        slot = slots[index % len(slots)]
        w = self.waiters.get(slot) or self.holders[slot]
        handed_at = self.client.hget(self._key("handed"), slot)
        res = self._call(
            "acquire", slot, 1, 0, b"wait", 0, w.priority, w.weight, w.tenant, "", 0, 0
        )
        if slot in self.handed:
            assert handed_at is not None
            assert [int(x) for x in res] == [1, int(handed_at)], res
            return
        self._check_admission(w, res, self._drain(slot)[0])

    @precondition(lambda self: bool(self.holders))
    @rule(indices=st.lists(st.integers(0, 99), min_size=1, max_size=4))
    def release(self, indices: list[int]) -> None:
        """Holders release their slots one after the other: each freed slot goes to the
        waiters in serving order. Several per step: the queue is served far down."""
        for index in indices:
            if not self.holders:
                return
            slot = sorted(self.holders)[index % len(self.holders)]
            del self.holders[slot]
            self.admitted_at.pop(slot, None)
            handed = slot in self.handed
            self.handed.discard(slot)
            res = self._call(
                "release",
                slot,
                1,
                0,
                0,
                -1,
                int(handed),
                "1" if handed else "",
                "",
                "",
                0,
                -1,
                0,
                -1,
            )
            assert [int(x) for x in res] == [1, self._drain()[1]], res

    @precondition(lambda self: bool(self.waiters))
    @rule(index=st.integers(0, 99))
    def withdraw(self, index: int) -> None:
        """A waiter gives up: its ticket leaves the queue (its tenant with it when last)."""
        w = self.waiters[sorted(self.waiters)[index % len(self.waiters)]]
        res = self._call("withdraw", w.slot, w.ticket)
        self._leave(w)
        assert [int(x) for x in res] == [0, self._drain()[1]], res

    @precondition(lambda self: bool(self.handed))
    @rule(index=st.integers(0, 99))
    def withdraw_handed(self, index: int) -> None:
        """A waiter gives up after a drain handed it a slot: the slot goes to the next."""
        slot = sorted(self.handed)[index % len(self.handed)]
        w = self.holders.pop(slot)
        self.handed.discard(slot)
        res = self._call("withdraw", slot, w.ticket)
        assert [int(x) for x in res] == [1, self._drain()[1]], res

    @rule(tenant=st.sampled_from(FQ_TENANTS), weight=st.sampled_from((*FQ_WEIGHTS, "")))
    def set_weight(self, tenant: str, weight: str) -> None:
        """Set (or clear) a tenant's weight at run time: it counts from the next admission."""
        res = self._call("weight", tenant, weight, 0)
        if weight:
            self.runtime[tenant] = weight
        else:
            self.runtime.pop(tenant, None)
        got = {
            res[i].decode(): (res[i + 1].decode(), int(res[i + 2])) for i in range(0, len(res), 3)
        }
        assert got == {t: (v, -1) for t, v in self.runtime.items()}

    # The check after every step ------------------------------------------------

    def _snapshot(self) -> dict[bytes, tuple[Any, int]]:
        """Every key of the namespace: key -> (contents, PTTL), where a sorted set's
        contents are its (member, score) pairs in order and a hash's a dict."""
        snap: dict[bytes, tuple[Any, int]] = {}
        for key, kind, text, ttl in self.dump(args=[b"fq:*"]):
            raw = text.split(b"\n")[:-1]  # no member here holds a newline
            pairs = list(zip(raw[::2], raw[1::2], strict=True))
            if kind == b"zset":
                snap[key] = ([(m, float(score)) for m, score in pairs], ttl)
            else:
                snap[key] = (dict(pairs), ttl)
        return snap

    @invariant()
    def serving_order(self) -> None:
        """Redis holds what the model holds: holders (their leases), tickets, handed
        slots, runtime weights, classes, the VTC counters (exactly), the tenants' FIFOs,
        and nothing else of the fair queue; the ticket the scripts would serve next
        (first class, least tenant, oldest ticket) is the model's next; every key
        expires (but a weight set without end)."""
        if self.plan is None:
            return
        snap = self._snapshot()

        def zset(key: bytes) -> list[tuple[bytes, float]]:
            pairs: list[tuple[bytes, float]] = snap.get(key, ([], 0))[0]
            return pairs

        def hash_(key: bytes) -> dict[bytes, bytes]:
            fields: dict[bytes, bytes] = snap.get(key, ({}, 0))[0]
            return fields

        holders = dict(zset(self._key("holders")))
        assert {s.decode() for s in holders} == set(self.holders)
        for slot, at in self.admitted_at.items():
            assert holders[slot.encode()] == at + FQ_TTL_US, slot  # the reply's time
        tickets = {w.ticket.encode() for w in self.waiters.values()}
        assert {t for t, _ in zset(self._key("qexp"))} == tickets
        assert {t for t, _ in zset(self._key("queue"))} == tickets
        assert set(hash_(self._key("handed"))) == {s.encode() for s in self.handed}
        assert hash_(self.prefix + b"weights") == {
            t.encode(): f"{v} 0".encode() for t, v in self.runtime.items()
        }

        classes = sorted(self.service, reverse=True)
        assert zset(self.prefix + b"classes") == [(str(p).encode(), float(-p)) for p in classes]
        expected_keys = {self.prefix + b"classes"} if classes else set()
        served_next = None  # the scripts' next_ticket(), read from their keys
        for p in classes:
            counters = self.service[p]
            names = {t: self._member(p, t) for t in counters}
            order = sorted(counters, key=lambda t: (counters[t], names[t]))
            got = zset(self._fair("t", p))
            assert got == [(names[t], counters[t]) for t in order], (p, got, counters)
            assert hash_(self._fair("m", p)) == {t.encode(): m for t, m in names.items()}, p
            expected_keys.update((self._fair("t", p), self._fair("m", p)))
            counts = self.admitted.get(p, {})
            got_counts = dict(zset(self._fair("a", p)))
            assert got_counts == {t.encode(): float(n) for t, n in counts.items()}, p
            if counts:
                expected_keys.add(self._fair("a", p))
            debts = self.debts.get(p, {})
            assert dict(zset(self._fair("v", p))) == {t.encode(): d for t, d in debts.items()}
            if debts:
                expected_keys.add(self._fair("v", p))
            for t in counters:
                queue = [(w.ticket.encode(), float(w.arrival)) for w in self.queues[(p, t)]]
                got_queue = zset(self._fair("q", p, t))
                assert got_queue == queue, (p, t, got_queue)
                expected_keys.add(self._fair("q", p, t))
                if p == classes[0] and names[t] == got[0][0]:
                    served_next = got_queue[0][0].decode()
        fair = (b"q:", b"t:", b"m:", b"a:", b"v:", b"classes", b"charged")
        assert {k for k in snap if k[len(self.prefix) :].startswith(fair)} == expected_keys
        head = self._next()
        assert served_next == (head.ticket if head else None)

        for key, (_, ttl) in snap.items():
            # A weight set with ttl 0 has no end.
            if key != self.prefix + b"weights":
                assert ttl > 0, f"{key!r} has no TTL ({ttl})"


FairQueueModel.TestCase.settings = settings(
    # A run is cheap (about 40 ms); rarer paths (a tenant back while it still owes)
    # need a few hundred runs to be met for sure.
    max_examples=300,
    stateful_step_count=30,
    deadline=None,
    database=None,
    # One failure shrunk, not each distinct one: a broken script fails in minutes, not more.
    report_multiple_bugs=False,
    suppress_health_check=[HealthCheck.too_slow],
)
TestFairQueueModel = pytest.mark.redis(
    pytest.mark.usefixtures("redis_url")(FairQueueModel.TestCase)
)


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
