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
    "Operation",
    "Planner",
    "lua_source",
    "safe_key",
    "text",
]

#: The keys of one API (or one key of a keyed API), in KEYS order; all share the hash
#: tag ``{api}``. What each holds: ``lua/_common.lua``.
API_KEYS: Final = ("holders", "queue", "qexp", "state", "handed", "requests", "tokens")

#: The API's configuration, after each per-API call's own ARGV; then two numbers per
#: window (limit, configured period in microseconds): the request windows shortest
#: first, then the token windows.
CONFIG: Final = (
    "namespace",
    "max_concurrent:n",
    "lease_us:n",
    "ticket_us:n",
    "stats_ttl_ms:n",
    "margin_us:n",
    "request_windows:n",
    "token_windows:n",
)


@dataclass(frozen=True, slots=True)
class Operation:
    """One Lua script: its own ARGV, and whether it works on one API's keys.

    A per-API operation takes :data:`API_KEYS` and ARGV = its ``args``, then
    :data:`CONFIG` and the windows, then an optional variadic tail (``TAIL_AT``).
    Its text is ``lua/_common.lua`` (the shared functions) followed by its own file.
    """

    name: str
    args: tuple[str, ...] = ()
    #: KEYS of an operation that is not per-API (then no configuration follows).
    keys: tuple[str, ...] | None = None

    @property
    def per_api(self) -> bool:
        return self.keys is None


#: Every script, by name. The comment at the top of each ``lua/<name>.lua`` says what
#: each field means and what the script returns.
OPERATIONS: Final = {
    op.name: op
    for op in (
        Operation("acquire", ("slot", "cost:n", "tokens:n", "mode", "first:n")),
        Operation(
            "release",
            ("slot", "outcome:n", "admitted_at:n", "reserved:n", "actual:n", "handed:n"),
        ),
        Operation("withdraw", ("slot", "ticket")),
        Operation("renew", ("slots:n",)),
        Operation("move"),
        Operation("cooldown", ("ms:n",)),
        Operation("override", ("ttl_ms:n",)),
        Operation("stats"),
        Operation("reset"),
        Operation("heartbeat", ("process", "ttl_ms:n"), keys=("replicas",)),
    )
}


def text(value: object) -> str:
    """A Redis reply (bytes or str) as str."""
    return value.decode() if isinstance(value, bytes) else str(value)


def _bind(names: tuple[str, ...], source: str, first: int, prefix: str = "") -> list[str]:
    lines = []
    for i, field in enumerate(names, start=first):
        name, _, kind = field.partition(":")
        value = f"tonumber({source}[{i}])" if kind == "n" else f"{source}[{i}]"
        lines.append(f"local {prefix}{name.upper()} = {value}")
    return lines


def bindings(op: Operation) -> str:
    """The Lua lines that bind ``op``'s KEYS and ARGV to their names."""
    keys = API_KEYS if op.keys is None else op.keys
    lines = [f"-- Bound from limiter/_contract.py, operation {op.name!r}."]
    lines += _bind(keys, "KEYS", 1, "K_")
    lines += _bind(op.args, "ARGV", 1)
    if op.per_api:
        lines += _bind(CONFIG, "ARGV", len(op.args) + 1)
        windows_at = len(op.args) + len(CONFIG) + 1
        lines.append(f"local WINDOWS_AT = {windows_at}")
        lines.append(f"local TAIL_AT = {windows_at} + 2 * (REQUEST_WINDOWS + TOKEN_WINDOWS)")
    return "\n".join(lines) + "\n"


@cache
def lua_source(name: str) -> str:
    """The full text of script ``name``: bindings, shared functions, its own file."""
    op = OPERATIONS[name]
    base = files("limiter").joinpath("lua")
    parts = [bindings(op)]
    if op.per_api:
        parts.append(base.joinpath("_common.lua").read_text(encoding="utf-8"))
    parts.append(base.joinpath(f"{name}.lua").read_text(encoding="utf-8"))
    return "\n".join(parts)


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
class KeyPlan:
    """The keys of one API (or one key of it) and the configuration its scripts take."""

    api: str
    #: The hash tag: the API name, or "<api>/<key>" for a keyed limit.
    tag: str
    #: :data:`API_KEYS`, encoded once (redis-py sends bytes as they are).
    keys: tuple[bytes, ...]
    #: :data:`CONFIG` and the windows, encoded once.
    config: tuple[bytes, ...]
    #: Request windows shortest first, then the token window: the scripts' order.
    windows: tuple[Window, ...]
    #: Script reason -> public reason ("w:60000000" -> "rate:60s").
    reasons: dict[str, str]
    #: Seconds a lease lasts without renewal.
    lease_ttl: float

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
        requests = sorted(limits.windows, key=lambda rate: rate.period)
        windows = []
        for rate in requests:
            us = round(rate.period * 1_000_000)
            windows.append(Window(f"w:{us}", rate.reason, rate.limit, us + margin, "r"))
        if limits.tokens_per_minute is not None:
            per_minute = limits.tokens_per_minute
            windows.append(Window("tokens", "tokens", per_minute, 60_000_000 + margin, "t"))
        config: list[object] = [
            namespace,
            limits.max_concurrent or 0,
            round(limits.lease_ttl * 1_000_000),
            round(ticket_ttl * 1_000_000),
            round(stats_ttl * 1000),
            margin,
            len(requests),
            len(windows) - len(requests),
        ]
        for w in windows:
            config += [w.limit, w.period_us - margin]
        reasons = {"cooldown": "cooldown", "concurrency": "concurrency"}
        reasons.update((w.id, w.name) for w in windows)
        return cls(
            api=api,
            tag=tag,
            keys=tuple(f"{prefix}{name}".encode() for name in API_KEYS),
            config=tuple(str(v).encode() for v in config),
            windows=tuple(windows),
            reasons=reasons,
            lease_ttl=limits.lease_ttl,
        )

    def key(self, name: str) -> bytes:
        """The key named ``name`` in :data:`API_KEYS`."""
        return self.keys[API_KEYS.index(name)]

    def argv(self, op: str, *args: object, tail: tuple[object, ...] = ()) -> tuple[object, ...]:
        """ARGV of per-API operation ``op``: its own fields, the configuration, a tail."""
        if len(args) != len(OPERATIONS[op].args):
            raise TypeError(f"{op}: takes {OPERATIONS[op].args}, got {len(args)} arguments")
        return (*args, *self.config, *tail)

    @property
    def override_fields(self) -> tuple[str, ...]:
        """The override's field of each window, in the scripts' order."""
        return tuple(w.id for w in self.windows)

    def window(self, id_: str) -> Window:
        """The window the scripts call ``id_``."""
        for w in self.windows:
            if w.id == id_:
                return w
        raise KeyError(id_)


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
