"""The scripts' contract, written once: which KEYS and ARGV each Lua operation takes, by name.

Owns: the key layout of an API (:data:`API_KEYS`), its configuration as the scripts read
it (:data:`CONFIG`), the operations and their own arguments (:data:`OPERATIONS`). Both
sides are built from these tuples: :meth:`KeyPlan.argv` lays out a call's ARGV, and
``_lua`` opens every script with generated lines that bind ``KEYS[1]`` and ``ARGV[i]``
to named Lua variables, so no index is written twice. Pure: no I/O (``_runner`` runs the
scripts).

A field spelled ``"name:n"`` is a number, ``"name"`` a string; ``"name=default"`` may be
left out at the end of ARGV when it has that default (:class:`Operation`).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from ._checks import check_key
from ._config import MAX_COUNT, APILimits, check_api_name
from ._errors import ConfigError

__all__ = [
    "API_KEYS",
    "CONFIG",
    "OPERATIONS",
    "KeyPlan",
    "LimitSet",
    "Operation",
    "Planner",
    "field_default",
    "field_name",
    "full_reply",
    "safe_key",
    "text",
]

#: The keys of one API (or one key of a keyed API); all share the hash tag ``{api}``. What
#: each holds: ``lua/_common.lua``. A per-API script is given one of them, the state hash
#: (:data:`DECLARED_KEY`), as its only KEYS entry, and names the others from its prefix
#: ``"<namespace>:{api}:"``: one slot, so Redis Cluster routes the call by that key.
API_KEYS: Final = ("holders", "queue", "qexp", "state", "handed", "requests", "tokens")
#: The one key a per-API script declares (KEYS[1]).
DECLARED_KEY: Final = "state"

#: The API's configuration, ARGV[1] of every per-API call (its own fields follow): these words,
#: separated by spaces, then three words per window (its id, its limit, its period in
#: microseconds with the window margin): the request windows shortest first, then the
#: token windows; then each limit set of the API (deployments, models, a deployment's
#: models) as ``@ <set id> <max_concurrent> <request windows>`` and its windows the same
#: way (:class:`LimitSet`; ``lua/_common.lua``, "Limit sets"). ``life_us`` is how long
#: the state hash lives after the API's last use: the longest of the lease, every
#: window (the limit sets' too) and ``stats_ttl``. ``aging_us`` is
#: ``priority_aging`` (0: strict priority). Under Redis Functions
#: the library parses each distinct configuration once and keeps it.
CONFIG: Final = (
    "namespace",
    "max_concurrent:n",
    "lease_us:n",
    "ticket_us:n",
    "life_us:n",
    "request_windows:n",
    "token_windows:n",
    "aging_us:n",
)


@dataclass(frozen=True, slots=True)
class Operation:
    """One Lua script: its own ARGV, and whether it works on one API's keys.

    A per-API operation takes KEYS = the API's :data:`DECLARED_KEY` and ARGV = the
    configuration (:data:`CONFIG`), then its ``args``, then an optional variadic tail
    (``ARGS[TAIL_AT]`` on). A field ``"name:n=default"`` may be left out at the end of
    ARGV when it has its default (an operation with a tail sends every field): the Lua
    binding gives it that default, or, when the default names an earlier field, that
    field's value. Its file ``lua/<name>.lua`` defines ``OPS.<name>``, which uses the
    shared functions of ``lua/_common.lua``.
    """

    name: str
    args: tuple[str, ...] = ()
    #: KEYS of an operation that is not per-API (then no configuration follows).
    keys: tuple[str, ...] | None = None
    #: Keys a per-API operation uses besides :data:`API_KEYS` (in the API's hash tag,
    #: named from its prefix like them).
    extra_keys: tuple[str, ...] = ()

    @property
    def per_api(self) -> bool:
        return self.keys is None


#: Every script, by name. The comment at the top of each ``lua/<name>.lua`` says what
#: each field means and what the script returns.
OPERATIONS: Final = {
    op.name: op
    for op in (
        Operation(
            "acquire",
            (
                "slot",
                "cost:n=1",
                "tokens:n=0",
                "mode=wait",
                "first:n=1",
                "priority=0",
                "weight=1.0",
                "tenant=",
                "model=",
                "in_tokens:n=tokens",
                "out_tokens:n=tokens",
            ),
        ),
        Operation(
            "release",
            (
                "slot",
                "outcome:n",
                "admitted_at:n",
                "reserved:n=0",
                "actual:n=-1",
                "handed:n=0",
                "fair=",
                "deployment=",
                "model=",
                "reserved_in:n=reserved",
                "actual_in:n=actual",
                "reserved_out:n=reserved",
                "actual_out:n=actual",
            ),
        ),
        Operation("withdraw", ("slot", "ticket")),
        Operation("renew", ("slots:n",)),
        Operation("move"),
        Operation("cooldown", ("ms:n", "scope")),
        Operation("override", ("ttl_ms:n",)),
        Operation("stats", extra_keys=("config",)),
        Operation("reset"),
        Operation("weight", ("tenant", "weight", "ttl_ms:n")),
        Operation("learn", ("ttl_ms:n", "scope")),
        Operation("heartbeat", ("process", "ttl_ms:n"), keys=("replicas",)),
    )
}


def text(value: object) -> str:
    """A Redis reply (bytes or str) as str."""
    return value.decode() if isinstance(value, bytes) else str(value)


def full_reply(op: str, reply: Any) -> Any:
    """``reply`` of script ``op`` in its full form: acquire's bare admission time (its
    common reply) as ``[1, time]``, release's bare ``held`` as ``[held, 0]``."""
    if type(reply) is not int:
        return reply
    return [1, reply] if op == "acquire" else [reply, 0]


def field_name(field: str) -> str:
    """The Lua name of an ARGV or KEYS field: ``"in_tokens:n=tokens"`` -> ``IN_TOKENS``."""
    return field.partition("=")[0].partition(":")[0].upper()


def field_default(field: str) -> str | None:
    """The default of ``"name[:n]=default"`` (None: the field has none)."""
    _, eq, default = field.partition("=")
    return default if eq else None


def _trailing(fields: tuple[str, ...]) -> tuple[tuple[int, frozenset[object], int], ...]:
    """The fields that may be left out at the end, last first: (index, the values that
    are its default as a caller passes them, index of the field whose value is its
    default or -1)."""
    names = [field_name(f) for f in fields]
    out: list[tuple[int, frozenset[object], int]] = []
    for i in range(len(fields) - 1, -1, -1):
        default = field_default(fields[i])
        if default is None:
            break
        if default.upper() in names[:i]:
            out.append((i, frozenset(), names.index(default.upper())))
            continue
        same: set[object] = {default, default.encode()}
        if default.lstrip("-").isdigit():  # a number, or a string a caller may give as one
            same.add(int(default))
        out.append((i, frozenset(same), -1))
    return tuple(out)


#: Each operation's :func:`_trailing` (made once: ARGV is laid out at every call).
_TRAILING: Final = {name: _trailing(op.args) for name, op in OPERATIONS.items()}


#: Each operation's first field that has a default (len(args): none).
_FIRST_DEFAULT: Final = {
    name: trailing[-1][0] if trailing else len(op.args)
    for (name, op), trailing in zip(OPERATIONS.items(), _TRAILING.values(), strict=True)
}
for _name, _first in _FIRST_DEFAULT.items():  # a tail's values decide alone what is sent
    if any(0 <= ref < _first for _i, _same, ref in _TRAILING[_name]):
        raise AssertionError(f"{_name}: a default names a field that has none")
#: How many of an operation's fields to send, by the values of those that have a
#: default (a few distinct tails recur: made once each, at most 1,024 kept).
_KEEP: dict[tuple[object, ...], int] = {}


def _strip_defaults(op: str, args: tuple[object, ...]) -> tuple[object, ...]:
    """``args`` of ``op`` without the trailing ones that have their field's default."""
    first = _FIRST_DEFAULT[op]
    tail = (op, *args[first:])
    keep = _KEEP.get(tail)
    if keep is None:
        keep = len(args)
        for i, same, ref in _TRAILING[op]:
            value = args[i]
            if ref >= 0:
                if value != args[ref]:
                    break
            elif isinstance(value, bool) or value not in same:
                break
            keep = i
        if len(_KEEP) >= 1024:
            _KEEP.clear()
        _KEEP[tail] = keep
    return args[:keep]


_SAFE_KEY = re.compile(r"^[A-Za-z0-9_.:+@=\-]{1,64}$")


def safe_key(key: str) -> str:
    """A per-key limit's key as it goes into a hash tag: as is when safe, else hashed."""
    if _SAFE_KEY.match(key):
        return key
    return "~" + hashlib.sha1(key.encode(), usedforsecurity=False).hexdigest()[:24]


@dataclass(frozen=True, slots=True)
class Window:
    """One window as the scripts see it."""

    #: The scripts' name for it: ``"w:<period us>"`` (requests) or ``"tokens"``; also its
    #: override field and its refusal reason in Redis.
    id: str
    #: The public reason (``"rate:60s"``, ``"tokens"``).
    name: str
    limit: int
    #: Period as enforced, microseconds (the window margin included).
    period_us: int
    #: ``"r"``: weighed by the request's cost; ``"t"``: by its tokens.
    kind: str


@dataclass(frozen=True, slots=True)
class LimitSet:
    """One limit set of an API besides its own: a deployment, a model, or a model
    within a deployment."""

    #: The scripts' id: ``"d:<deployment>"``, ``"m:<model>"``, ``"d:<deployment>:m:<model>"``.
    id: str
    max_concurrent: int
    windows: tuple[Window, ...]


def _windows(limits: APILimits, margin: int) -> list[Window]:
    """The windows of ``limits`` as the scripts see them: request windows shortest first,
    then the token window."""
    windows = []
    for rate in sorted(limits.windows, key=lambda rate: rate.period):
        us = round(rate.period * 1_000_000)
        windows.append(Window(f"w:{us}", rate.reason, rate.limit, us + margin, "r"))
    if limits.tokens_per_minute is not None:
        per_minute = limits.tokens_per_minute
        windows.append(Window("tokens", "tokens", per_minute, 60_000_000 + margin, "t"))
    return windows


def _limit_sets(limits: APILimits, margin: int) -> tuple[LimitSet, ...]:
    """The API's limit sets: a deployment's (``d:<name>``), a model's (``m:<model>``), a
    model's within a deployment (``d:<name>:m:<model>``), and for each of them and the
    API the input and output token budgets (``<id>#in``, ``<id>#out``)."""
    sets = []

    def add(id_: str, lim: APILimits) -> None:
        if id_:
            sets.append(LimitSet(id_, lim.max_concurrent or 0, tuple(_windows(lim, margin))))
        for end, n in (("in", lim.input_tokens_per_minute), ("out", lim.output_tokens_per_minute)):
            if n is not None:
                name = f"{'input' if end == 'in' else 'output'}_tokens"
                window = Window(f"tokens:{end}", name, n, 60_000_000 + margin, "t")
                sets.append(LimitSet(f"{id_}#{end}", 0, (window,)))

    add("", limits)
    for model, lim in limits.models.items():
        add(f"m:{model}", lim)
    for dep, lim in limits.deployments.items():
        add(f"d:{dep}", lim)
        for model, mlim in lim.models.items():
            add(f"d:{dep}:m:{model}", mlim)
    return tuple(sets)


def _pack(windows: list[Window] | tuple[Window, ...]) -> list[object]:
    out: list[object] = []
    for w in windows:
        out += [w.id, w.limit, w.period_us]
    return out


@dataclass(frozen=True, slots=True)
class KeyPlan:
    """The keys of one API (or one key of it) and the configuration its scripts take."""

    api: str
    #: The hash tag: the API name, or "<api>/<key>" for a keyed limit.
    tag: str
    #: The KEYS a per-API script takes: the API's :data:`DECLARED_KEY`, encoded once
    #: (redis-py sends bytes as they are).
    keys: tuple[bytes, ...]
    #: :data:`CONFIG` and the windows as the one ARGV field the scripts take, encoded once.
    config: bytes
    #: Request windows shortest first, then the token window: the scripts' order.
    windows: tuple[Window, ...]
    #: Script reason -> public reason ("w:60000000" -> "rate:60s").
    reasons: dict[str, str]
    #: Seconds a lease lasts without renewal.
    lease_ttl: float
    #: The API's limit sets besides its own (deployments, models), in configuration order.
    sets: tuple[LimitSet, ...] = ()
    #: The deployments' names, in configuration order (empty: none).
    deployments: tuple[str, ...] = ()
    #: The heaviest cost and tokens every configured limit admits (an API without limit
    #: sets): a request within them needs no check of each window.
    light: tuple[int, int] = (0, 0)

    @classmethod
    def build(
        cls,
        namespace: str,
        api: str,
        limits: APILimits,
        *,
        ticket_ttl: float,
        stats_ttl: float,
        key: str | None = None,
    ) -> KeyPlan:
        tag = api if key is None else f"{api}/{safe_key(key)}"
        prefix = f"{namespace}:{{{tag}}}:"
        margin = round(limits.window_margin * 1_000_000)
        windows = _windows(limits, margin)
        requests = [w for w in windows if w.kind == "r"]
        sets = _limit_sets(limits, margin)
        every = windows + [w for s in sets for w in s.windows]
        lease_us = round(limits.lease_ttl * 1_000_000)
        life_us = max([lease_us, round(stats_ttl * 1_000_000)] + [w.period_us for w in every])
        config: list[object] = [
            namespace,
            limits.max_concurrent or 0,
            lease_us,
            round(ticket_ttl * 1_000_000),
            life_us,
            len(requests),
            len(windows) - len(requests),
            0 if limits.priority_aging is None else round(limits.priority_aging * 1_000_000),
        ]
        config += _pack(windows)
        for limit_set in sets:
            nreq = sum(1 for w in limit_set.windows if w.kind == "r")
            config += ["@", limit_set.id, limit_set.max_concurrent, nreq]
            config += _pack(limit_set.windows)
        packed = " ".join(str(v) for v in config).encode()
        reasons = {"cooldown": "cooldown", "concurrency": "concurrency"}
        reasons.update((w.id, w.name) for w in every)
        return cls(
            api=api,
            tag=tag,
            keys=(f"{prefix}{DECLARED_KEY}".encode(),),
            config=packed,
            windows=tuple(windows),
            reasons=reasons,
            lease_ttl=limits.lease_ttl,
            sets=sets,
            deployments=tuple(limits.deployments),
            light=(
                0 if sets else min([w.limit for w in requests] or [MAX_COUNT]),
                0 if sets else min([w.limit for w in windows if w.kind == "t"] or [MAX_COUNT]),
            ),
        )

    @property
    def prefix(self) -> bytes:
        """``"<namespace>:{<tag>}:"``, the start of every key of the API."""
        return self.keys[0][: -len(DECLARED_KEY)]

    def key(self, name: str) -> bytes:
        """The key named ``name`` (one of :data:`API_KEYS`, or an operation's extra key)."""
        return self.prefix + name.encode()

    def argv(self, op: str, *args: object, tail: tuple[object, ...] = ()) -> tuple[object, ...]:
        """ARGV of per-API operation ``op``: the configuration, its own fields (those
        at the end that have their default left out, when there is no tail), a tail."""
        fields = OPERATIONS[op].args
        if len(args) != len(fields):
            raise TypeError(f"{op}: takes {fields}, got {len(args)} arguments")
        if not tail:
            args = _strip_defaults(op, args)
        return (self.config, *args, *tail)

    def window(self, id_: str) -> Window:
        """The window the scripts call ``id_`` (the API's, else a limit set's)."""
        for w in self.windows + tuple(w for s in self.sets for w in s.windows):
            if w.id == id_:
                return w
        raise KeyError(id_)

    def scope(self, deployment: str | None, model: str | None) -> str:
        """The limit set a provider's pause for ``deployment`` and ``model`` applies to:
        the most specific one the API has (a deployment's model, the deployment, the
        model), ``""`` for the API as a whole. ConfigError for an unknown deployment."""
        ids = {s.id for s in self.sets}
        if deployment is not None and deployment not in self.deployments:
            known = ", ".join(map(repr, self.deployments)) or "none"
            raise ConfigError(
                f"deployment={deployment!r} for API {self.api!r}: its deployments are {known}",
                field="deployment",
                value=deployment,
            )
        candidates = []
        if deployment is not None:
            candidates += [f"d:{deployment}:m:{model}", f"d:{deployment}"]
        candidates.append(f"m:{model}")
        for id_ in candidates:
            if id_ in ids:
                return id_
        return ""

    def io_scope(self, deployment: str | None, model: str | None, end: str) -> str | None:
        """The input (``end`` "in") or output ("out") budget a report for ``deployment`` and
        ``model`` applies to: the most specific one the API has, None when it has none."""
        ids = {s.id for s in self.sets}
        bases = []
        if deployment is not None:
            bases += [f"d:{deployment}:m:{model}", f"d:{deployment}"]
        bases += [f"m:{model}", ""]
        for base in bases:
            if f"{base}#{end}" in ids:
                return f"{base}#{end}"
        return None

    def set_windows(self, id_: str) -> tuple[Window, ...] | None:
        """The windows of limit set ``id_``, None when the API has no such set."""
        for s in self.sets:
            if s.id == id_:
                return s.windows
        return None


class Planner:
    """The KeyPlans of one limiter: one per configured API, one per key in use.

    Owns the plans; keyed ones are kept for the 10,000 keys most recently planned.
    """

    def __init__(
        self,
        namespace: str,
        limits: Mapping[str, APILimits],
        *,
        ticket_ttl: float,
        stats_ttl: float,
    ) -> None:
        self._namespace = namespace
        self._limits = limits
        self._ttls = {"ticket_ttl": ticket_ttl, "stats_ttl": stats_ttl}
        #: Each API's plan.
        self.plans = {api: self._build(api) for api in limits}
        self._keyed: dict[tuple[str, str], KeyPlan] = {}

    def _build(self, api: str, key: str | None = None) -> KeyPlan:
        return KeyPlan.build(self._namespace, api, self._limits[api], key=key, **self._ttls)

    def plan(self, api: str, key: str | None = None) -> KeyPlan:
        """The plan of ``api`` (of one ``key`` of it); ConfigError naming what is wrong."""
        if not isinstance(api, str):
            check_api_name(api)  # raises a ConfigError naming the field
        plan = self.plans.get(api)
        if plan is None:
            check_api_name(api)
            known = ", ".join(repr(a) for a in sorted(self.plans)) or "none"
            raise ConfigError(
                f"unknown API {api!r}: configured APIs are {known}", field="api", value=api
            )
        if key is None:
            return plan
        keyed = self._keyed.get((api, key))
        if keyed is None:
            check_key(key)
            if len(self._keyed) >= 10_000:
                self._keyed.pop(next(iter(self._keyed)))
            keyed = self._keyed[(api, key)] = self._build(api, key)
        return keyed
