"""What operators change at runtime: overrides of the limits, the registry of configurations.

Registry: every limiter writes each API's admission settings to ``<ns>:{api}:config``
(JSON) and the API's name to the set ``<ns>:apis`` when it first reaches Redis, so that
the ``limiter`` command line can show and change limits without the application's code,
and so that a replica configured differently from the others is noticed (a warning:
the scripts take the limits from the caller, so that replica would admit by its own).

Overrides: the ``o:*`` fields of the API's state hash ``<ns>:{api}:state`` hold runtime
limits (``o:max_concurrent``, ``o:w:<period us>``, ``o:tokens``, their end ``o:until``)
that every admission script applies in place of the configured ones while in force.
Learned limits (``p:*``, ``p:until``: the provider's headers) only ever lower them. Both
change a limit the API has; neither can add a window (the scripts plan the windows from
the configuration).
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from redis.exceptions import NoPermissionError

from ._config import (
    MAX_SECONDS,
    APILimits,
    Rate,
    check_api_name,
    finite,
    positive_int,
    show,
)
from ._contract import KeyPlan, text
from ._errors import ConfigError, LimiterUnavailable
from ._runner import REDIS_ERRORS, redact

if TYPE_CHECKING:
    from ._runner import ScriptRunner

__all__ = [
    "cache_counts",
    "cache_key",
    "check_ttl",
    "config_json",
    "learned_fields",
    "learned_view",
    "limits_from_config",
    "override_fields",
    "override_view",
    "registered",
    "remove_old_layout",
    "set_override",
    "stats_view",
]

log = logging.getLogger("limiter")

#: Fields of the registry's JSON (what admission in Redis depends on).
_CONFIG_FIELDS = (
    "max_concurrent",
    "rates",
    "tokens_per_minute",
    "lease_ttl",
    "window_margin",
    "priority_aging",
    "tenant_weights",
    "deployments",
    "models",
    "input_tokens_per_minute",
    "output_tokens_per_minute",
)
#: Fields of a limit set's JSON (a deployment's, a model's).
_SET_FIELDS = (
    "max_concurrent",
    "rates",
    "tokens_per_minute",
    "input_tokens_per_minute",
    "output_tokens_per_minute",
    "models",
)
_IO_FIELDS = ("input_tokens_per_minute", "output_tokens_per_minute")


def _set_json(limits: APILimits) -> dict[str, Any]:
    """A deployment's or model's limits as the registry stores them."""
    out: dict[str, Any] = {
        "max_concurrent": limits.max_concurrent,
        "rates": [[r.limit, r.period] for r in limits.windows],
        "tokens_per_minute": limits.tokens_per_minute,
    }
    for name in _IO_FIELDS:
        if getattr(limits, name) is not None:
            out[name] = getattr(limits, name)
    if limits.models:
        out["models"] = {m: _set_json(lim) for m, lim in limits.models.items()}
    return out


def _set_from(
    raw: object, fields: tuple[str, ...] = _SET_FIELDS, what: str = "a limit set's", **more: Any
) -> APILimits:
    """The limits of a deployment or model from the registry's JSON; with ``fields`` and
    ``more`` (the API's own settings), an API's."""
    if not isinstance(raw, dict) or set(raw) - set(fields):
        raise ValueError(f"not {what} configuration")
    return APILimits(
        max_concurrent=raw.get("max_concurrent"),
        rates=[Rate(int(limit), float(period)) for limit, period in raw.get("rates", [])],
        tokens_per_minute=raw.get("tokens_per_minute"),
        input_tokens_per_minute=raw.get("input_tokens_per_minute"),
        output_tokens_per_minute=raw.get("output_tokens_per_minute"),
        models={m: _set_from(v) for m, v in dict(raw.get("models", {})).items()},
        **more,
    )


def config_json(limits: APILimits) -> str:
    """The admission settings of ``limits`` as the registry stores them (stable JSON): a
    limit set's (``_set_json``) and the API's own.

    The fair queue's settings appear only when set, so that a configuration without
    them is stored as it was before they existed."""
    fields = _set_json(limits)
    fields["lease_ttl"] = limits.lease_ttl
    fields["window_margin"] = limits.window_margin
    if limits.priority_aging is not None:
        fields["priority_aging"] = limits.priority_aging
    if limits.tenant_weights:
        fields["tenant_weights"] = dict(limits.tenant_weights)
    if limits.deployments:
        fields["deployments"] = {d: _set_json(lim) for d, lim in limits.deployments.items()}
    return json.dumps(fields, sort_keys=True, separators=(",", ":"))


def limits_from_config(api: str, text: str | bytes) -> APILimits:
    """An :class:`APILimits` from the registry's JSON (ConfigError if it is not that)."""
    try:
        raw = json.loads(text)
        if not isinstance(raw, dict):
            raise ValueError("not a limiter configuration")
        return _set_from(
            raw,
            _CONFIG_FIELDS,
            "a limiter",
            lease_ttl=float(raw.get("lease_ttl", 30.0)),
            window_margin=float(raw.get("window_margin", 0.0)),
            priority_aging=raw.get("priority_aging"),
            tenant_weights=raw.get("tenant_weights", {}),
            deployments={d: _set_from(v) for d, v in dict(raw.get("deployments", {})).items()},
        )
    except (ValueError, TypeError, OverflowError, RecursionError) as exc:
        raise ConfigError(
            f"the configuration of API {api!r} stored in Redis is not readable: {exc}",
            field="config",
            value=api,
        ) from None


def describe_difference(ours: str, theirs: str) -> str:
    """``"max_concurrent 8 here, 5 in Redis"``: the fields two registry JSONs disagree on."""
    a, b = json.loads(ours), json.loads(theirs)
    if not isinstance(b, dict):
        raise ValueError("not a limiter configuration")
    parts = [
        f"{k} {a.get(k)!r} here, {b.get(k)!r} in Redis"
        for k in _CONFIG_FIELDS
        if a.get(k) != b.get(k)
    ]
    return "; ".join(parts) or "the same settings"


def override_fields(
    plan: KeyPlan,
    *,
    max_concurrent: int | None = None,
    requests_per_minute: int | None = None,
    requests_per_hour: int | None = None,
    rates: Sequence[Rate] = (),
    tokens_per_minute: int | None = None,
) -> dict[str, int]:
    """The override hash's fields for these limits; ConfigError for a window the API lacks."""
    fields: dict[str, int] = {}
    if max_concurrent is not None:
        positive_int("max_concurrent", max_concurrent)
        fields["max_concurrent"] = max_concurrent
    windows: list[tuple[str, int, float]] = []
    if requests_per_minute is not None:
        windows.append(("requests_per_minute", requests_per_minute, 60.0))
    if requests_per_hour is not None:
        windows.append(("requests_per_hour", requests_per_hour, 3600.0))
    if isinstance(rates, str | bytes) or not isinstance(rates, Sequence):
        raise ConfigError(
            f"rates={show(rates)}: must be a sequence of Rate", field="rates", value=rates
        )
    for i, rate in enumerate(rates):
        if not isinstance(rate, Rate):
            raise ConfigError(
                f"rates[{i}]={show(rate)}: must be a Rate(limit, period)",
                field=f"rates[{i}]",
                value=rate,
            )
        windows.append((f"rates[{i}]", rate.limit, rate.period))
    known = {w.id: w.name for w in plan.windows}
    for name, limit, period in windows:
        positive_int(name, limit)
        field = f"w:{round(period * 1_000_000)}"
        if field not in known:
            have = ", ".join(n for f, n in known.items() if f != "tokens") or "none"
            raise ConfigError(
                f"{name}: API {plan.api!r} has no rate:{period:g}s window to override "
                f"(its windows: {have}); configure the window in the application first",
                field=name,
                value=limit,
            )
        fields[field] = limit
    if tokens_per_minute is not None:
        positive_int("tokens_per_minute", tokens_per_minute)
        if "tokens" not in known:
            raise ConfigError(
                f"tokens_per_minute: API {plan.api!r} has no token budget to override; "
                "configure tokens_per_minute in the application first",
                field="tokens_per_minute",
                value=tokens_per_minute,
            )
        fields["tokens"] = tokens_per_minute
    if not fields:
        raise ConfigError(
            "no limit to set: give max_concurrent, requests_per_minute, requests_per_hour, "
            "rates or tokens_per_minute",
            field="limits",
            value=None,
        )
    return fields


def check_ttl(ttl: object) -> int:
    """``ttl`` seconds as PEXPIRE milliseconds (0: none); ConfigError naming it if invalid."""
    if ttl is None:
        return 0
    number = finite(ttl)
    if number is None or not 0.001 <= number <= MAX_SECONDS:
        raise ConfigError(
            f"ttl={show(ttl)}: must be a number of seconds from 0.001 to "
            f"{MAX_SECONDS:.0f} (366 days), or None",
            field="ttl",
            value=ttl,
        )
    return max(1, math.ceil(number * 1000))


async def set_override(
    runner: ScriptRunner, plan: KeyPlan, fields: dict[str, int], ttl: object, ttl_ms: int
) -> dict[str, Any]:
    """Write an override (``fields``, ``ttl_ms``; 0: no end) and move the queue to meet it.

    Returns the override in force; ConfigError when the lifetimes disagree (nothing
    changed).
    """
    pairs = tuple(x for item in fields.items() for x in item)
    flat, left = await runner.run("override", plan, ttl_ms, tail=pairs, label="set_limits")
    if isinstance(flat, bytes | str):  # {"ttl", ms left}: refused, nothing changed
        ends = "ends in %.0fs" % (int(left) / 1000) if int(left) > 0 else "has no end"
        raise ConfigError(
            f"ttl={show(ttl)}: the override in force for API {plan.api!r} {ends}, and one "
            "lifetime covers all of it; clear it first, or give the same kind of ttl",
            field="ttl",
            value=ttl,
        )
    view = override_view(plan, flat, int(left))
    log.info("API %r: limits overridden: %s", plan.api, view)
    await runner.run("move", plan, label="set_limits")
    return view


def learned_fields(
    plan: KeyPlan, reported: Sequence[int | None], scope: str = ""
) -> tuple[str, ...]:
    """``learn.lua``'s tail from ``(requests_per_minute, tokens_per_minute,
    requests_remaining, tokens_remaining)``: for the windows the API has (its one-minute
    request window, its token budget), the limit (``id, n``) and what is left
    (``remaining:id, n``); the rest is dropped. ``scope``: one of the API's limit sets
    (its windows). ConfigError names a bad value."""
    ids = {w.id for w in (plan.set_windows(scope) or () if scope else plan.windows)}
    names = ("requests_per_minute", "tokens_per_minute", "requests_remaining", "tokens_remaining")
    pairs: list[str] = []
    for i, (field, value) in enumerate(zip(names, reported, strict=True)):
        if value is None:
            continue
        if i < 2:
            positive_int(field, value)
        else:
            _check_remaining(field, value)
        id_ = ("w:60000000", "tokens")[i % 2]
        if id_ in ids:
            pairs += [id_ if i < 2 else f"remaining:{id_}", str(value)]
    return tuple(pairs)


def learned_io_fields(end: str, limit: object, left: object) -> tuple[str, ...]:
    """``learn.lua``'s tail for an input (``end`` "in") or output ("out") budget."""
    name = f"{'input' if end == 'in' else 'output'}_tokens"
    pairs: list[str] = []
    if limit is not None:
        positive_int(f"{name}_per_minute", limit)
        pairs += [f"tokens:{end}", str(limit)]
    if left is not None:
        _check_remaining(f"{name}_remaining", left)
        pairs += [f"remaining:tokens:{end}", str(left)]
    return tuple(pairs)


def _check_remaining(field: str, value: object) -> None:
    """What a provider says is left (``field``): an integer >= 0, else a ConfigError."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(
            f"{field}={show(value)}: must be an integer >= 0", field=field, value=value
        )


def learned_view(plan: KeyPlan, flat: Sequence[Any], ttl_ms: int) -> dict[str, Any]:
    """The limits learned from the provider as ``override_view`` shows an override, with
    ``"source": "provider"`` (``{}`` when none stands): ``stats()["learned"]``."""
    view = override_view(plan, flat, ttl_ms)
    if view:
        view["source"] = "provider"
    return view


def override_view(plan: KeyPlan, flat: Sequence[Any], ttl_ms: int) -> dict[str, Any]:
    """The override as ``{"max_concurrent": 2, "rate:60s": 100, ..., "expires_in": s|None}``.

    Fields the API does not have (written by hand, or left from an older configuration)
    are shown under their raw names: the scripts ignore them.
    """
    names = dict(plan.reasons)  # every window's, the limit sets' too
    names["max_concurrent"] = "max_concurrent"
    out: dict[str, Any] = {}
    for i in range(0, len(flat), 2):
        field, value = text(flat[i]), text(flat[i + 1])
        try:
            out[names.get(field, field)] = int(value)
        except ValueError:
            out[names.get(field, field)] = value
    if out:
        out["expires_in"] = ttl_ms / 1000 if ttl_ms >= 0 else None
    return out


def is_registry_key(key: str | bytes) -> bool:
    """Whether ``key`` is one of the registry's (``<ns>:apis``, ``<ns>:{api}:config``)."""
    return text(key).endswith((":apis", "}:config"))


def apis_key(namespace: str) -> str:
    return f"{namespace}:apis"


def config_key(namespace: str, api: str) -> str:
    return f"{namespace}:{{{check_api_name(api)}}}:config"


def cache_key(namespace: str, api: str, name: str) -> str:
    """A key of the response cache of ``api`` (``limiter.http.ResponseCache``):
    ``<ns>:cache:{<api>}:<name>``, ``name`` being an entry's SHA-256 hex or ``stats`` (the
    hash of ``hits`` and ``misses``). The API's hash tag keeps them in one cluster slot."""
    return f"{namespace}:cache:{{{api}}}:{name}"


async def cache_counts(runner: ScriptRunner, namespace: str, api: str) -> dict[str, int]:
    """The response cache's hits and misses of ``api``, every replica's (one ``HMGET``)."""
    key = cache_key(namespace, api, "stats")
    hits, misses = await runner.command(api, "stats", "HMGET", key, "hits", "misses")
    return {"hits": int(hits or 0), "misses": int(misses or 0)}


async def registered(
    redis: Any, namespace: str, apis: Sequence[str] = ()
) -> tuple[dict[str, APILimits], dict[str, str]]:
    """The APIs limiters registered in ``namespace`` (only ``apis`` when given).

    Returns ``({api: APILimits}, {api: why it is unreadable})``: one corrupt entry does
    not hide the others.
    """
    names = sorted(text(n) for n in await redis.smembers(apis_key(namespace)))
    if apis:
        names = [api for api in names if api in apis]
    found: dict[str, APILimits] = {}
    broken: dict[str, str] = {}
    for api in names:
        try:
            key = config_key(namespace, api)
        except ConfigError as exc:  # a name no limiter could have written
            broken[api] = str(exc)
            continue
        stored = await redis.get(key)
        if stored is None:
            continue  # expired: that API has not been used for stats_ttl
        try:
            found[api] = limits_from_config(api, stored)
        except ConfigError as exc:
            broken[api] = str(exc)
    return found, broken


def stats_view(plan: KeyPlan, limits: APILimits, reply: Sequence[Any]) -> dict[str, Any]:
    """``Limiter.stats()``'s dict for one API from stats.lua's reply."""
    in_flight, waiting, cooldown_ms, flat, used, override, override_ms, _registered = reply[:8]
    by_priority, tenant_rows, weight_rows, learned_flat, learned_ms = reply[8:13]
    overrides = override_view(plan, override, int(override_ms))
    learned = learned_view(plan, learned_flat, int(learned_ms))
    counters = {text(flat[i]): int(flat[i + 1]) for i in range(0, len(flat), 2)}
    ok = counters.get("successful_requests", 0)
    failed = counters.get("failed_requests", 0)
    done = ok + failed
    refusals: dict[str, int] = {}
    for field, n in counters.items():
        if field.startswith("refused:"):
            code = field.removeprefix("refused:")
            name = plan.reasons.get(code, code)
            refusals[name] = refusals.get(name, 0) + n
    windows = {
        w.name: {
            "used": int(u),
            "limit": min(overrides.get(w.name, w.limit), learned.get(w.name, math.inf)),
        }
        for w, u in zip(plan.windows, used, strict=True)
    }
    return {
        "total_requests": done + int(in_flight),
        "successful_requests": ok,
        "failed_requests": failed,
        "success_rate": (100.0 * ok / done) if done else 0.0,
        "average_response_time": (counters.get("response_time_us", 0) / 1e6 / done)
        if done
        else 0.0,
        "concurrent_requests": int(in_flight),
        "max_concurrent": overrides.get("max_concurrent", limits.max_concurrent),
        "waiting": int(waiting),
        "refusals": refusals,
        "cooldown_remaining": int(cooldown_ms) / 1000,
        "windows": windows,
        "overrides": overrides,
        "learned": learned,
        "waiting_by_priority": {
            int(text(by_priority[i])): int(by_priority[i + 1])
            for i in range(0, len(by_priority), 2)
        },
        "tenants": tenants_view(tenant_rows),
        "tenant_weights": weights_view(limits, weight_rows),
        **sets_view(plan, reply[13] if len(reply) > 13 else (), windows, learned),
    }


def sets_view(
    plan: KeyPlan, flat: Sequence[Any], windows: dict[str, Any], learned: dict[str, Any]
) -> dict[str, dict[str, Any]]:
    """``stats()["deployments"]`` and ``["models"]`` from stats.lua's limit sets: each
    set's slots in flight, cooldown, windows (used, limit in force) and learned limits; a
    deployment's models under its ``"models"``. In configuration order. The input and
    output budgets (``<id>#in``, ``#out``) join the windows and learned limits of what
    they belong to (the API's: ``windows`` and ``learned``)."""
    read: dict[str, dict[str, Any]] = {}
    for i in range(0, len(flat), 6):
        id_, busy, pause_ms, used, learned_flat, learned_ms = flat[i : i + 6]
        limit_set = next(s for s in plan.sets if s.id == text(id_))
        its = learned_view(plan, learned_flat, int(learned_ms))
        read[limit_set.id] = {
            # (a set without max_concurrent keeps no leases: nothing to count)
            "concurrent_requests": int(busy) if limit_set.max_concurrent else None,
            "max_concurrent": limit_set.max_concurrent or None,
            "cooldown_remaining": int(pause_ms) / 1000,
            "windows": {
                w.name: {"used": int(u), "limit": min(w.limit, its.get(w.name, math.inf))}
                for w, u in zip(limit_set.windows, used, strict=True)
            },
            "learned": its,
        }
    for id_, view in read.items():
        base, io, _ = id_.partition("#")
        owner = {"windows": windows, "learned": learned} if not base else read.get(base)
        if io and owner is not None:
            owner["windows"].update(view["windows"])
            owner["learned"].update(view["learned"])
    deployments: dict[str, Any] = {}
    models: dict[str, Any] = {}
    for limit_set in plan.sets:
        found = read.get(limit_set.id)
        if found is None or "#" in limit_set.id:
            continue
        view = found
        kind, _, rest = limit_set.id.partition(":")
        if kind == "m":
            models[rest] = view
        elif ":m:" in rest:
            dep, _, model = rest.partition(":m:")
            deployments[dep].setdefault("models", {})[model] = view
        else:
            deployments[rest] = view
    return {"deployments": deployments, "models": models}


#: stats() shows this many tenants: the busiest.
TENANTS_SHOWN = 20


def tenants_view(rows: Sequence[Any]) -> dict[str, dict[str, Any]]:
    """The busiest tenants of the fair queue (most waiting, then most admitted from the
    queue), from stats.lua's flat tenant, waiting, admitted, service list."""
    tenants = []
    for i in range(0, len(rows), 4):
        name = text(rows[i])
        tenants.append(
            (
                name,
                {
                    "waiting": int(rows[i + 1]),
                    "admitted": int(rows[i + 2]),
                    "service": float(text(rows[i + 3])),
                },
            )
        )
    tenants.sort(key=lambda t: (-t[1]["waiting"], -t[1]["admitted"], t[0]))
    return dict(tenants[:TENANTS_SHOWN])


def weights_view(limits: APILimits, rows: Sequence[Any]) -> dict[str, dict[str, Any]]:
    """Each tenant's weight in force: configured, or set at run time (with its seconds
    left, None when it does not end)."""
    out: dict[str, dict[str, Any]] = {
        tenant: {"weight": w, "source": "config", "ttl": None}
        for tenant, w in limits.tenant_weights.items()
    }
    for i in range(0, len(rows), 3):
        ms = int(rows[i + 2])
        out[text(rows[i])] = {
            "weight": float(text(rows[i + 1])),
            "source": "runtime",
            "ttl": None if ms < 0 else ms / 1000,
        }
    return out


#: Keys of an API in the 0.1.0 layout that this version neither reads nor writes (each
#: request window had its own ``w:<period us>`` key, so a window that a configuration
#: dropped stayed behind). The names ``holders``, ``queue``, ``qexp``, ``handed``,
#: ``tokens`` and ``config`` are this version's too (``reset.lua`` handles them).
_OLD_LAYOUT = re.compile(rb"(cooldown|stats|extra|override|w:[0-9]+)")
#: Redis glob metacharacters (an API name may hold none but ``:``; a keyed tag may hold
#: any character).
_GLOB = re.compile(rb"([*?\[\]\\])")


async def remove_old_layout(runner: ScriptRunner, plan: KeyPlan) -> int:
    """Delete the keys of ``plan``'s API (or key) left in the 0.1.0 layout; their count.

    Found with ``SCAN MATCH <prefix>*`` (scripts cannot scan). A user whom Redis refuses
    ``SCAN`` (the limiter's own ACL user needs none) gets a warning and 0.
    """
    prefix = plan.prefix
    pattern = _GLOB.sub(rb"\\\1", prefix) + b"*"
    redis = runner.redis
    try:
        async with runner.connection_cap:
            old = [
                key
                async for key in redis.scan_iter(match=pattern, count=1000)
                if _OLD_LAYOUT.fullmatch(_encoded(key)[len(prefix) :])
            ]
            removed = int(await redis.delete(*old)) if old else 0
    except NoPermissionError as exc:
        log.warning(
            "API %r: keys of the 0.1.0 layout were not looked for: Redis refused SCAN (%s)",
            plan.api,
            exc,
        )
        return 0
    except REDIS_ERRORS as exc:
        raise LimiterUnavailable(plan.api, "reset", redact(exc)) from exc
    if removed:
        log.info("API %r: removed %d keys of the 0.1.0 layout", plan.api, removed)
    return removed


def _encoded(key: str | bytes) -> bytes:
    """A key as Redis holds it (a client with ``decode_responses=True`` gives str)."""
    return key if isinstance(key, bytes) else key.encode()
