"""A replica's configuration, from the environment. Secrets never appear in reprs."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from limiter import DEFAULT_LIMITS, APILimits, ConfigError, Rate
from limiter.http import ResponseCache

__all__ = ["Settings", "limits_from_json"]

#: The chatbot's defaults: the original's limits, with 250 ms of window margin for the
#: delay between admission and arrival at the provider (0.4% of a minute's throughput).
CHATBOT_LIMITS: dict[str, APILimits] = {
    api: replace(limits, window_margin=0.25) for api, limits in DEFAULT_LIMITS.items()
}

_FIELDS = {
    "max_concurrent",
    "requests_per_minute",
    "requests_per_hour",
    "tokens_per_minute",
    "retry_attempts",
    "backoff_min",
    "backoff_max",
    "lease_ttl",
    "acquire_timeout",
    "window_margin",
    "tenant_weights",
    "priority_aging",
}


def _rate(api: str, i: int, pair: Any) -> Rate:
    """``[limit, period]`` from LIMITS_JSON as a Rate (Rate checks the numbers themselves)."""
    if not isinstance(pair, list) or len(pair) != 2:
        raise ConfigError(
            f"LIMITS_JSON[{api!r}].rates[{i}] must be a [limit, period] pair",
            field="LIMITS_JSON",
        )
    return Rate(pair[0], pair[1])


def _seconds(env: Mapping[str, str], name: str, default: float) -> float:
    """A duration from the environment: a finite number of seconds > 0, else a ConfigError."""
    raw = env.get(name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{name}={raw!r}: must be a number of seconds > 0", field=name, value=raw)
    return value


def _cache_ttl(env: Mapping[str, str], name: str) -> float | None:
    """The response cache's lifetime from the environment: unset or empty (blanks only) is
    no cache; else what ``ResponseCache(ttl=...)`` takes (0.001 s to 366 days), else a
    ConfigError naming the variable and the value."""
    raw = env.get(name)
    if raw is None or not raw.strip():
        return None
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    return _checked_cache_ttl(name, value, raw, "unset or empty")


def _checked_cache_ttl(name: str, value: object, shown: object, off: str) -> float:
    """``value`` when ``ResponseCache`` takes it as its ``ttl``, else a ConfigError naming
    ``name`` and ``shown`` (the text it came from) and saying how to have no cache."""
    try:
        return ResponseCache(ttl=value).ttl  # type: ignore[arg-type]  # checked there
    except ConfigError:
        raise ConfigError(
            f"{name}={shown!r}: must be a number of seconds from 0.001 to 366 days "
            f"({off}: no response cache)",
            field=name,
            value=shown,
        ) from None


def _priority(env: Mapping[str, str], name: str, default: int) -> int:
    """A priority from the environment: an integer from -1000 to 1000, else a ConfigError."""
    raw = env.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = None
    if value is None or not -1000 <= value <= 1000:
        raise ConfigError(
            f"{name}={raw!r}: must be an integer from -1000 to 1000", field=name, value=raw
        )
    return value


def limits_from_json(text: str) -> dict[str, APILimits]:
    """``{"openai": {"max_concurrent": 4, "rates": [[10, 1.0]]}, ...}`` -> limits.

    APIs not named keep the chatbot's defaults. Unknown fields raise ConfigError.
    """
    try:
        raw = json.loads(text)
    except (ValueError, RecursionError) as exc:
        why = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        raise ConfigError(f"LIMITS_JSON is not JSON: {why}", field="LIMITS_JSON") from None
    if not isinstance(raw, Mapping):
        raise ConfigError("LIMITS_JSON must be an object of API -> limits", field="LIMITS_JSON")
    out = dict(CHATBOT_LIMITS)
    for api, spec in raw.items():
        if not isinstance(spec, Mapping):
            raise ConfigError(f"LIMITS_JSON[{api!r}] must be an object", field="LIMITS_JSON")
        unknown = set(spec) - _FIELDS - {"rates"}
        if unknown:
            raise ConfigError(
                f"LIMITS_JSON[{api!r}]: unknown fields {sorted(unknown)}", field="LIMITS_JSON"
            )
        kwargs: dict[str, Any] = {k: v for k, v in spec.items() if k in _FIELDS}
        rates = spec.get("rates", [])
        if not isinstance(rates, list):
            raise ConfigError(
                f"LIMITS_JSON[{api!r}].rates must be a list of [limit, period] pairs",
                field="LIMITS_JSON",
            )
        kwargs["rates"] = [_rate(api, i, pair) for i, pair in enumerate(rates)]
        out[api] = APILimits(**kwargs)
    return out


@dataclass(frozen=True)
class Settings:
    """Where a replica finds Redis and the providers, and the limits it applies."""

    redis_url: str = field(default="redis://127.0.0.1:6379/0", repr=False)  # may hold a password
    openai_base_url: str = "http://127.0.0.1:8001/v1"
    openai_api_key: str = field(default="sk-fake-openai-key", repr=False)
    openai_model: str = "gpt-4o-mini"
    zapier_mcp_url: str = "http://127.0.0.1:8002/mcp"
    zapier_token: str = field(default="fake-zapier-token", repr=False)
    namespace: str = "limiter"
    limits: Mapping[str, APILimits] = field(default_factory=lambda: dict(CHATBOT_LIMITS))
    #: How long one message may wait for its turn and its providers, seconds.
    message_timeout: float = 120.0
    #: Messages of history kept per user.
    history: int = 20
    #: A replica that dies while answering a user holds that user's turn this long, seconds.
    turn_lease: float = 10.0
    #: A replica that dies while waiting holds what it was handed at most this long.
    ticket_ttl: float = 5.0
    #: The fair queue's priority of a user's message (``POST /messages``): higher is
    #: served first by the limiter when OpenAI or Zapier has no room.
    interactive_priority: int = 10
    #: The priority of batch work (``POST /batch``): served when no message waits.
    batch_priority: int = 0
    #: Seconds an OpenAI answer stays in the response cache (``CACHE_TTL``); ``None``: no
    #: cache. With a cache, the agent asks at temperature 0 (see ``chatbot.agent``).
    cache_ttl: float | None = None
    replica: str = field(default_factory=lambda: os.environ.get("HOSTNAME", str(os.getpid())))

    def __post_init__(self) -> None:
        for name in ("interactive_priority", "batch_priority"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or abs(value) > 1000:
                raise ConfigError(
                    f"{name}={value!r}: must be an integer from -1000 to 1000",
                    field=name,
                    value=value,
                )
        if self.cache_ttl is not None:
            _checked_cache_ttl("cache_ttl", self.cache_ttl, self.cache_ttl, "None")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Settings from ``REDIS_URL``, ``OPENAI_BASE_URL``, ``OPENAI_API_KEY``, ...."""
        env = os.environ if env is None else env
        base = cls()
        limits = base.limits
        if env.get("LIMITS_JSON"):
            limits = limits_from_json(env["LIMITS_JSON"])
        return cls(
            redis_url=env.get("REDIS_URL", base.redis_url),
            openai_base_url=env.get("OPENAI_BASE_URL", base.openai_base_url),
            openai_api_key=env.get("OPENAI_API_KEY", base.openai_api_key),
            openai_model=env.get("OPENAI_MODEL", base.openai_model),
            zapier_mcp_url=env.get("ZAPIER_MCP_URL", base.zapier_mcp_url),
            zapier_token=env.get("ZAPIER_MCP_TOKEN", base.zapier_token),
            namespace=env.get("LIMITER_NAMESPACE", base.namespace),
            limits=limits,
            message_timeout=_seconds(env, "MESSAGE_TIMEOUT", base.message_timeout),
            turn_lease=_seconds(env, "TURN_LEASE", base.turn_lease),
            ticket_ttl=_seconds(env, "TICKET_TTL", base.ticket_ttl),
            interactive_priority=_priority(env, "INTERACTIVE_PRIORITY", base.interactive_priority),
            batch_priority=_priority(env, "BATCH_PRIORITY", base.batch_priority),
            cache_ttl=_cache_ttl(env, "CACHE_TTL"),
            replica=env.get("REPLICA_NAME", base.replica),
        )
