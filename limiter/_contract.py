"""The scripts' contract, written once: which KEYS and ARGV each Lua operation takes, by name.

Owns: the key layout of an API (:data:`API_KEYS`), its configuration as the scripts read
it (:data:`CONFIG`), the operations and their own arguments (:data:`OPERATIONS`), and the
Lua text of each script. Both sides are built from these tuples: :meth:`KeyPlan.argv`
lays out a call's ARGV, and :func:`lua_source` opens every script with generated lines
that bind ``KEYS[i]`` to ``K_<NAME>`` and ``ARGV[i]`` to ``<NAME>`` (numbers through
``tonumber``), so no index is written twice. Pure: no I/O (``_runner`` runs the scripts).

A field spelled ``"name:n"`` is a number; ``"name"`` a string.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from importlib.resources import files
from typing import Final

from ._checks import check_key
from ._config import APILimits, check_api_name
from ._errors import ConfigError

__all__ = [
    "API_KEYS",
    "CONFIG",
    "OPERATIONS",
    "KeyPlan",
    "LimitSet",
    "Operation",
    "Planner",
    "library_source",
    "lua_source",
    "safe_key",
    "text",
]

#: The keys of one API (or one key of a keyed API), in KEYS order; all share the hash
#: tag ``{api}``. What each holds: ``lua/_common.lua``.
API_KEYS: Final = ("holders", "queue", "qexp", "state", "handed", "requests", "tokens")

#: The API's configuration, one ARGV field after each per-API call's own: these words,
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

    A per-API operation takes :data:`API_KEYS` and ARGV = its ``args``, then the
    configuration (:data:`CONFIG`), then an optional variadic tail (``ARGS[TAIL_AT]``
    on). Its file ``lua/<name>.lua`` defines ``OPS.<name>``, which uses the shared
    functions of ``lua/_common.lua``.
    """

    name: str
    args: tuple[str, ...] = ()
    #: KEYS of an operation that is not per-API (then no configuration follows).
    keys: tuple[str, ...] | None = None
    #: KEYS a per-API operation takes after :data:`API_KEYS` (in the API's hash tag).
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
                "cost:n",
                "tokens:n",
                "mode",
                "first:n",
                "priority",
                "weight",
                "tenant",
                "model",
                "in_tokens:n",
                "out_tokens:n",
            ),
        ),
        Operation(
            "release",
            (
                "slot",
                "outcome:n",
                "admitted_at:n",
                "reserved:n",
                "actual:n",
                "handed:n",
                "fair",
                "deployment",
                "model",
                "reserved_in:n",
                "actual_in:n",
                "reserved_out:n",
                "actual_out:n",
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


def _lua_name(field: str) -> str:
    return field.partition(":")[0].upper()


def _values(names: tuple[str, ...], source: str, first: int = 1) -> str:
    """``source[first], tonumber(source[first + 1]), ...`` for ``names`` in order."""
    out = []
    for i, field in enumerate(names, start=first):
        out.append(f"tonumber({source}[{i}])" if field.endswith(":n") else f"{source}[{i}]")
    return ", ".join(out)


def _assign(names: list[str], values: str) -> str:
    return f"  {', '.join(names)} = {values}"


def _head(ops: list[Operation]) -> str:
    """The generated start of a per-API script or of the library: the names every
    operation binds, the configuration's parser, and one binder per operation."""
    args: list[str] = []
    extra: list[str] = []
    for op in ops:
        args += [_lua_name(f) for f in op.args if _lua_name(f) not in args]
        extra += ["K_" + _lua_name(k) for k in op.extra_keys if "K_" + _lua_name(k) not in extra]
    config = [_lua_name(f) for f in CONFIG]
    lines = [
        "-- Generated by limiter/_contract.py from the one definition of the scripts'",
        "-- contract: every KEYS and ARGV field of an operation is bound to its name here.",
        "-- No global is read while the code loads (a Functions library may not).",
        "local function unpack_list(t, i, j)",
        "  if table.unpack then return table.unpack(t, i, j) end",
        "  return unpack(t, i, j)",
        "end",
        "local OPS = {}",
        "local " + ", ".join(["K_" + _lua_name(k) for k in API_KEYS] + extra),
    ]
    if args:
        lines.append("local " + ", ".join(args))
    lines += [
        "local " + ", ".join(config),
        "local WINDOWS, SETS, DEPS, ARGS, TAIL_AT",
        "",
        "-- The configuration, parsed once per distinct text while the code is loaded.",
        "local CONFIGS, CONFIG_COUNT = {}, 0",
        "local function bind_config(text)",
        "  local c = CONFIGS[text]",
        "  if not c then",
        "    local v = {}",
        "    for word in string.gmatch(text, '%S+') do v[#v + 1] = word end",
        f"    c = {{{_values(CONFIG, 'v')}}}",
        "    local windows, sets, deps, list = {}, nil, nil, nil",
        "    list = windows",
        f"    local i = {len(CONFIG) + 1}",
        "    while i <= #v do",
        "      if v[i] == '@' then -- a limit set: '@ <id> <max_concurrent> <request windows>'",
        "        local set = {id = v[i + 1], maxc = tonumber(v[i + 2]), nreq = tonumber(v[i + 3]),",
        "                     windows = {}}",
        "        sets = sets or {}",
        "        sets[set.id] = set",
        "        local dep = string.match(set.id, '^d:([^:#]+)$')",
        "        if dep then",
        "          deps = deps or {}",
        "          deps[#deps + 1] = dep",
        "        end",
        "        list, i = set.windows, i + 4",
        "      else",
        "        list[#list + 1] = {id = v[i], limit = tonumber(v[i + 1]),",
        "                           period = tonumber(v[i + 2])}",
        "        i = i + 3",
        "      end",
        "    end",
        "    c.windows, c.sets, c.deps = windows, sets or false, deps or false",
        "    if CONFIG_COUNT >= 1000 then CONFIGS, CONFIG_COUNT = {}, 0 end",
        "    CONFIGS[text], CONFIG_COUNT = c, CONFIG_COUNT + 1",
        "  end",
        _assign(config, ", ".join(f"c[{i}]" for i in range(1, len(config) + 1))),
        "  WINDOWS, SETS, DEPS = c.windows, c.sets, c.deps",
        "end",
        "",
        "local BIND = {}",
    ]
    for op in ops:
        lines.append(f"BIND.{op.name} = function(keys, args)")
        keys = API_KEYS + op.extra_keys
        lines.append(_assign(["K_" + _lua_name(k) for k in keys], _values(keys, "keys")))
        if op.args:
            lines.append(_assign([_lua_name(f) for f in op.args], _values(op.args, "args")))
        lines.append(f"  bind_config(args[{len(op.args) + 1}])")
        lines.append(f"  ARGS, TAIL_AT = args, {len(op.args) + 2}")
        lines.append("end")
    return "\n".join(lines) + "\n"


def _standalone(op: Operation) -> str:
    keys = op.keys or ()
    lines = [f"-- Bound from limiter/_contract.py, operation {op.name!r}."]
    lines += [f"local K_{_lua_name(k)} = KEYS[{i}]" for i, k in enumerate(keys, start=1)]
    for i, field in enumerate(op.args, start=1):
        value = f"tonumber(ARGV[{i}])" if field.endswith(":n") else f"ARGV[{i}]"
        lines.append(f"local {_lua_name(field)} = {value}")
    return "\n".join(lines) + "\n"


def _read(name: str) -> str:
    return files("limiter").joinpath("lua").joinpath(f"{name}.lua").read_text(encoding="utf-8")


@cache
def lua_source(name: str) -> str:
    """The EVAL text of script ``name``: bindings, shared functions, its own file, a call."""
    op = OPERATIONS[name]
    if not op.per_api:
        return _standalone(op) + "\n" + _read(name)
    entry = f"BIND.{name}(KEYS, ARGV)\nbegin()\nreturn OPS.{name}()\n"
    return "\n".join([_head([op]), _read("_common"), _read(name), entry])


@cache
def library_source() -> tuple[str, str]:
    """``(library name, code)`` of the Redis Functions library holding every per-API
    operation; each is registered as ``<library name>_<operation>``. The name carries a
    hash of the code, so that limiters of different versions never replace each other's."""
    ops = [op for op in OPERATIONS.values() if op.per_api]
    body = "\n".join([_head(ops), _read("_common"), *(_read(op.name) for op in ops)])
    name = "fleetlimit_" + hashlib.sha1(body.encode(), usedforsecurity=False).hexdigest()[:12]
    register = [
        f"redis.register_function('{name}_{op.name}', function(keys, args)\n"
        f"  BIND.{op.name}(keys, args)\n  begin()\n  return OPS.{op.name}()\nend)"
        for op in ops
    ]
    return name, f"#!lua name={name}\n" + body + "\n" + "\n".join(register) + "\n"


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
    #: :data:`API_KEYS`, encoded once (redis-py sends bytes as they are).
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
            keys=tuple(f"{prefix}{name}".encode() for name in API_KEYS),
            config=packed,
            windows=tuple(windows),
            reasons=reasons,
            lease_ttl=limits.lease_ttl,
            sets=sets,
            deployments=tuple(limits.deployments),
        )

    def key(self, name: str) -> bytes:
        """The key named ``name`` in :data:`API_KEYS`."""
        return self.keys[API_KEYS.index(name)]

    def keys_of(self, op: str) -> tuple[bytes, ...]:
        """KEYS of per-API operation ``op``: :data:`API_KEYS`, then its extra keys."""
        extra = OPERATIONS[op].extra_keys
        if not extra:
            return self.keys
        prefix = self.keys[0].rpartition(b":")[0] + b":"
        return self.keys + tuple(prefix + k.encode() for k in extra)

    def argv(self, op: str, *args: object, tail: tuple[object, ...] = ()) -> tuple[object, ...]:
        """ARGV of per-API operation ``op``: its own fields, the configuration, a tail."""
        if len(args) != len(OPERATIONS[op].args):
            raise TypeError(f"{op}: takes {OPERATIONS[op].args}, got {len(args)} arguments")
        return (*args, self.config, *tail)

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
