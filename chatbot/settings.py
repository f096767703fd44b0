"""A replica's configuration, from the environment. Secrets never appear in reprs.

Several OpenAI keys (``OPENAI_API_KEYS``, see :func:`api_keys_from_env`) are the
limiter's deployments of ``openai``: LIMITS_JSON gives each its limits
(``"deployments": {"key-a": {"max_concurrent": 5, "requests_per_minute": 300}}``), and
every request goes out with the key of the deployment its slot was admitted to. A message
containing ``OPENAI_LARGE_MODEL_KEYWORD`` is answered with ``OPENAI_LARGE_MODEL`` (see
:meth:`Settings.model_for`).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from limiter import DEFAULT_LIMITS, APILimits, ConfigError, Rate
from limiter.http import ResponseCache

__all__ = ["Settings", "api_keys_from_env", "limits_from_json"]

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
    "learn_from_headers",
}
#: The fields of a deployment's or a model's limits (of their APILimits only the limits
#: count); a deployment's may also have ``models``.
_SET_FIELDS = {
    "max_concurrent",
    "requests_per_minute",
    "requests_per_hour",
    "tokens_per_minute",
}


def _rate(where: str, i: int, pair: Any) -> Rate:
    """``[limit, period]`` from LIMITS_JSON as a Rate (Rate checks the numbers themselves)."""
    if not isinstance(pair, list) or len(pair) != 2:
        raise ConfigError(
            f"{where}.rates[{i}] must be a [limit, period] pair",
            field="LIMITS_JSON",
        )
    return Rate(pair[0], pair[1])


def _rates(where: str, spec: Mapping[str, Any]) -> list[Rate]:
    rates = spec.get("rates", [])
    if not isinstance(rates, list):
        raise ConfigError(
            f"{where}.rates must be a list of [limit, period] pairs", field="LIMITS_JSON"
        )
    return [_rate(where, i, pair) for i, pair in enumerate(rates)]


def _limit_sets(where: str, raw: Any, *, models: bool) -> dict[str, APILimits]:
    """LIMITS_JSON's ``deployments`` (``models=True``: each may have ``models``) or
    ``models`` of an API or a deployment: ``{name: {limits}}`` as ``{name: APILimits}``
    (APILimits checks the names)."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where} must be an object of name -> limits", field="LIMITS_JSON")
    out: dict[str, APILimits] = {}
    for name, spec in raw.items():
        here = f"{where}[{name!r}]"
        if not isinstance(spec, Mapping):
            raise ConfigError(f"{here} must be an object", field="LIMITS_JSON")
        allowed = _SET_FIELDS | {"rates"} | ({"models"} if models else set())
        unknown = set(spec) - allowed
        if unknown:
            raise ConfigError(
                f"{here}: unknown fields {sorted(unknown)} (allowed: {sorted(allowed)})",
                field="LIMITS_JSON",
            )
        kwargs: dict[str, Any] = {k: v for k, v in spec.items() if k in _SET_FIELDS}
        kwargs["rates"] = _rates(here, spec)
        if "models" in spec:
            kwargs["models"] = _limit_sets(f"{here}.models", spec["models"], models=False)
        out[name] = APILimits(**kwargs)
    return out


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

    An API's object takes APILimits' fields (``learn_from_headers`` too), ``rates`` as
    ``[limit, period]`` pairs, ``deployments`` (one per key of ``OPENAI_API_KEYS``:
    ``{"key-a": {"max_concurrent": 5, "requests_per_minute": 300, "models": {...}}}``)
    and ``models`` (``{"gpt-4o": {"requests_per_minute": 60}}``); a deployment's or a
    model's object takes only limits (``max_concurrent``, ``requests_per_minute``,
    ``requests_per_hour``, ``tokens_per_minute``, ``rates``; a deployment's ``models``).
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
        where = f"LIMITS_JSON[{api!r}]"
        if not isinstance(spec, Mapping):
            raise ConfigError(f"{where} must be an object", field="LIMITS_JSON")
        unknown = set(spec) - _FIELDS - {"rates", "deployments", "models"}
        if unknown:
            raise ConfigError(f"{where}: unknown fields {sorted(unknown)}", field="LIMITS_JSON")
        kwargs: dict[str, Any] = {k: v for k, v in spec.items() if k in _FIELDS}
        kwargs["rates"] = _rates(where, spec)
        if "deployments" in spec:
            kwargs["deployments"] = _limit_sets(
                f"{where}.deployments", spec["deployments"], models=True
            )
        if "models" in spec:
            kwargs["models"] = _limit_sets(f"{where}.models", spec["models"], models=False)
        out[api] = APILimits(**kwargs)
    return out


def api_keys_from_env(env: Mapping[str, str], name: str = "OPENAI_API_KEYS") -> dict[str, str]:
    """``OPENAI_API_KEYS=key-a=sk-...,key-b=sk-...``: deployment name -> its OpenAI key.

    Unset or blank: none (the one ``OPENAI_API_KEY``). Entries are ``NAME=KEY``, separated
    by commas (blanks around either part are dropped). A ConfigError names the entry by
    its position, never its text: the text holds a key.
    """
    raw = env.get(name)
    if raw is None or not raw.strip():
        return {}
    out: dict[str, str] = {}
    for i, part in enumerate(raw.split(","), start=1):
        deployment, sep, key = (x.strip() for x in part.partition("="))
        if not sep or not deployment or not key:
            raise ConfigError(
                f"{name}: entry {i} must be NAME=KEY (a deployment's name and its key)",
                field=name,
            )
        if deployment in out:
            raise ConfigError(f"{name}: entry {i} names a deployment given before", field=name)
        out[deployment] = key
    return out


@dataclass(frozen=True)
class Settings:
    """Where a replica finds Redis and the providers, and the limits it applies."""

    redis_url: str = field(default="redis://127.0.0.1:6379/0", repr=False)  # may hold a password
    openai_base_url: str = "http://127.0.0.1:8001/v1"
    openai_api_key: str = field(default="sk-fake-openai-key", repr=False)
    openai_model: str = "gpt-4o-mini"
    #: Deployment name -> OpenAI key (``OPENAI_API_KEYS``); the names are those of
    #: ``limits["openai"].deployments``. Empty: the one ``openai_api_key``.
    openai_api_keys: Mapping[str, str] = field(default_factory=dict, repr=False)
    #: The model of the messages that contain ``large_model_keyword``; None: every message
    #: is answered with ``openai_model``.
    openai_large_model: str | None = None
    #: Case-insensitive: a message whose text contains it is answered with
    #: ``openai_large_model`` (both of its completions when it uses a tool).
    large_model_keyword: str = "in detail"
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
        if self.openai_large_model is not None and not self.large_model_keyword.strip():
            raise ConfigError(
                "large_model_keyword must not be blank when openai_large_model is set",
                field="large_model_keyword",
            )
        self._check_deployments()

    def _check_deployments(self) -> None:
        """Every deployment of ``openai`` has a key and every key a deployment. Errors name
        the configured deployments only: an unknown name may be a key pasted in its place."""
        openai = self.limits.get("openai")
        configured = set(openai.deployments) if openai is not None else set()
        given = set(self.openai_api_keys)
        if given == configured:
            if any(not isinstance(k, str) or not k for k in self.openai_api_keys.values()):
                raise ConfigError(
                    "OPENAI_API_KEYS: every deployment's key must be a non-empty string",
                    field="OPENAI_API_KEYS",
                )
            return
        missing = sorted(configured - given)
        unknown = len(given - configured)
        problems = []
        if missing:
            problems.append(f"no key for the deployments {missing}")
        if unknown:
            problems.append(f"{unknown} name(s) that are not deployments of openai")
        raise ConfigError(
            f"OPENAI_API_KEYS and LIMITS_JSON disagree: {' and '.join(problems)} (LIMITS_JSON "
            f"gives openai the deployments {sorted(configured)}; OPENAI_API_KEYS must give "
            "each of them its key, and nothing else)",
            field="OPENAI_API_KEYS",
        )

    def model_for(self, text: str) -> str:
        """The model that answers a message: ``openai_large_model`` when the text contains
        ``large_model_keyword`` (any case), else ``openai_model``."""
        large = self.openai_large_model
        if large and self.large_model_keyword.lower() in text.lower():
            return large
        return self.openai_model

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Settings from ``REDIS_URL``, ``OPENAI_BASE_URL``, ``OPENAI_API_KEY``, ....

        ``OPENAI_API_KEYS`` (``key-a=sk-...,key-b=sk-...``) gives several keys, the
        deployments of LIMITS_JSON's ``openai``; ``OPENAI_API_KEY`` then defaults to the
        first. ``OPENAI_LARGE_MODEL`` (unset or empty: none) answers the messages that
        contain ``OPENAI_LARGE_MODEL_KEYWORD`` (default ``in detail``).
        """
        env = os.environ if env is None else env
        base = cls()
        limits = base.limits
        if env.get("LIMITS_JSON"):
            limits = limits_from_json(env["LIMITS_JSON"])
        keys = api_keys_from_env(env)
        default_key = next(iter(keys.values()), base.openai_api_key)
        return cls(
            redis_url=env.get("REDIS_URL", base.redis_url),
            openai_base_url=env.get("OPENAI_BASE_URL", base.openai_base_url),
            openai_api_key=env.get("OPENAI_API_KEY", default_key),
            openai_model=env.get("OPENAI_MODEL", base.openai_model),
            openai_api_keys=keys,
            openai_large_model=env.get("OPENAI_LARGE_MODEL", "").strip() or None,
            large_model_keyword=env.get("OPENAI_LARGE_MODEL_KEYWORD", base.large_model_keyword),
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
