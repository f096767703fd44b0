"""The Lua scripts and the keys and arguments they take: the only place admission is decided.

Scripts ship inside the package (``limiter/lua``), are read once with
``importlib.resources``, and registered once per Redis client with redis-py's
``register_script`` (EVALSHA, reloaded on NOSCRIPT).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from functools import cache
from importlib.resources import files
from typing import Any

from ._config import APILimits

__all__ = ["KeyPlan", "Scripts", "lua_source", "safe_key"]

_OPERATIONS = ("acquire", "release", "renew")
_STANDALONE = ("cooldown", "heartbeat", "override", "stats")


_SAFE_KEY = re.compile(r"^[A-Za-z0-9_.:+@=\-]{1,64}$")


def safe_key(key: str) -> str:
    """A per-key limit's key as it goes into a hash tag: as is when safe, else hashed."""
    if _SAFE_KEY.match(key):
        return key
    return "~" + hashlib.sha1(key.encode(), usedforsecurity=False).hexdigest()[:24]


@cache
def lua_source(name: str) -> str:
    """The full text of script ``name`` (the shared prelude prepended for the admission ones)."""
    base = files("limiter").joinpath("lua")
    text = base.joinpath(f"{name}.lua").read_text(encoding="utf-8")
    if name in _OPERATIONS:
        text = base.joinpath("_common.lua").read_text(encoding="utf-8") + "\n" + text
    return text


class Scripts:
    """The scripts registered on one Redis client."""

    __slots__ = ("acquire", "cooldown", "heartbeat", "override", "release", "renew", "stats")

    def __init__(self, redis: Any) -> None:
        self.acquire = redis.register_script(lua_source("acquire"))
        self.release = redis.register_script(lua_source("release"))
        self.renew = redis.register_script(lua_source("renew"))
        self.cooldown = redis.register_script(lua_source("cooldown"))
        self.heartbeat = redis.register_script(lua_source("heartbeat"))
        self.override = redis.register_script(lua_source("override"))
        self.stats = redis.register_script(lua_source("stats"))


@dataclass(frozen=True, slots=True)
class KeyPlan:
    """The keys of one API and the arguments every admission script takes for it."""

    api: str
    #: The hash tag: the API name, or "<api>/<key>" for a keyed limit.
    tag: str
    #: holders, queue, qexp, cooldown, stats, extra, handed, one key per window, then
    #: override (encoded once: redis-py sends bytes as they are).
    keys: tuple[bytes, ...]
    #: ARGV[1] of the admission scripts: the API's configuration as one string.
    config: bytes
    #: Script reason code -> public reason ("w1" -> "rate:60s").
    reasons: dict[str, str]
    #: Window periods as enforced (microseconds, margin included) and names, in ARGV order.
    window_periods: tuple[int, ...]
    window_names: tuple[str, ...]
    #: Largest weight each window can ever admit (a request above it can never pass).
    window_limits: tuple[int, ...]
    window_kinds: tuple[str, ...]

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
        parts = ("holders", "queue", "qexp", "cooldown", "stats", "extra", "handed")
        keys = [prefix + k for k in parts]
        periods: list[int] = []
        names: list[str] = []
        wlimits: list[int] = []
        kinds: list[str] = []
        margin = round(limits.window_margin * 1_000_000)
        for rate in limits.windows:
            us = round(rate.period * 1_000_000)
            keys.append(f"{prefix}w:{us}")
            periods.append(us + margin)
            names.append(rate.reason)
            wlimits.append(rate.limit)
            kinds.append("r")
        if limits.tokens_per_minute is not None:
            keys.append(prefix + "tokens")
            periods.append(60_000_000 + margin)
            names.append("tokens")
            wlimits.append(limits.tokens_per_minute)
            kinds.append("t")
        conf = [
            namespace,
            str(limits.max_concurrent or 0),
            str(round(limits.lease_ttl * 1_000_000)),
            str(round(ticket_ttl * 1_000_000)),
            str(round(stats_ttl * 1000)),
            str(len(periods)),
        ]
        keys.append(prefix + "override")
        for limit, us, kind in zip(wlimits, periods, kinds, strict=True):
            conf += [str(limit), str(us), kind]
        reasons = {"cooldown": "cooldown", "concurrency": "concurrency"}
        for i, name in enumerate(names, start=1):
            reasons[f"w{i}"] = name
        return cls(
            api=api,
            tag=tag,
            keys=tuple(k.encode() for k in keys),
            config=" ".join(conf).encode(),
            reasons=reasons,
            window_periods=tuple(periods),
            window_names=tuple(names),
            window_limits=tuple(wlimits),
            window_kinds=tuple(kinds),
        )

    @property
    def cooldown_key(self) -> bytes:
        return self.keys[3]

    @property
    def stats_keys(self) -> list[bytes]:
        """KEYS of stats.lua: holders, qexp, cooldown, stats, the windows, override."""
        return [self.keys[0], self.keys[2], self.keys[3], self.keys[4], *self.keys[7:]]

    @property
    def override_key(self) -> bytes:
        return self.keys[-1]

    @property
    def override_fields(self) -> tuple[str, ...]:
        """The override hash's field of each window, in window order ("w:<us>", "tokens")."""
        return tuple(k.decode().rpartition("}:")[2] for k in self.keys[7:-1])
