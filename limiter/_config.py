"""Limits as plain, validated values: no I/O here."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Final

from ._errors import ConfigError

__all__ = [
    "DEFAULT_LIMITS",
    "MAX_COUNT",
    "MAX_SECONDS",
    "MAX_TENANT_BYTES",
    "APILimits",
    "Rate",
    "check_api_name",
    "check_model",
    "check_tenant",
    "check_weight",
    "finite",
    "format_period",
    "positive_int",
    "show",
    "uses_tokens",
]

_API_NAME = re.compile(r"[A-Za-z0-9_.:\-]{1,100}")  # fullmatch: "$" would let "a\n" in

#: The longest window period, lease or window margin, seconds (366 days). The scripts keep
#: times as integer microseconds in Lua doubles and key TTLs as integer milliseconds: far
#: longer durations lose precision or make Redis refuse the TTL at the first admission.
MAX_SECONDS: Final = 366 * 86_400.0
#: The largest limit or attempt count: the scripts add weights up in Lua doubles, exact
#: only up to 2**53.
MAX_COUNT: Final = 2**53 - 1


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def show(value: object) -> str:
    """``repr(value)`` for a message, shortened; safe for ints too long to print."""
    try:
        text = repr(value)
    except ValueError:  # an int beyond sys.get_int_max_str_digits()
        return f"<an int of {value.bit_length()} bits>" if isinstance(value, int) else "<?>"
    return text if len(text) <= 200 else text[:200] + "..."


def positive_int(name: str, value: object, *, optional: bool = False) -> None:
    if value is None and optional:
        return
    if not _is_int(value) or not 0 < value <= MAX_COUNT:  # type: ignore[operator]
        kind = "a positive integer or None" if optional else "a positive integer"
        raise ConfigError(
            f"{name}={show(value)}: must be {kind} (at most 2**53 - 1)", field=name, value=value
        )


def finite(value: object) -> float | None:
    """``value`` as a finite float, or None when it is no number, a bool, NaN, inf or too big."""
    if not isinstance(value, int | float) or isinstance(value, bool):
        return None
    try:
        number = float(value)
    except OverflowError:  # an int beyond a float's range
        return None
    return number if math.isfinite(number) else None


def _positive_float(name: str, value: object, *, optional: bool = False) -> None:
    if value is None and optional:
        return
    number = finite(value)
    if number is None or number <= 0:
        kind = "a finite number of seconds > 0 or None" if optional else "a finite number > 0"
        raise ConfigError(f"{name}={show(value)}: must be {kind}", field=name, value=value)


def _at_most_max_seconds(name: str, value: float) -> None:
    if value > MAX_SECONDS:
        raise ConfigError(
            f"{name}={show(value)}: must be at most {MAX_SECONDS:.0f} seconds (366 days)",
            field=name,
            value=value,
        )


def format_period(period: float) -> str:
    """``60.0`` -> ``"60s"``, ``1.5`` -> ``"1.5s"``: the period as it appears in reasons."""
    return f"{period:g}s"


def check_api_name(api: object) -> str:
    """Return ``api`` if it can name an API (it becomes a Redis hash tag), else raise."""
    if not isinstance(api, str) or not _API_NAME.fullmatch(api):
        raise ConfigError(
            f"API name {show(api)}: must be 1-100 characters of letters, digits, "
            "'_', '.', ':' or '-'",
            field="api",
            value=api,
        )
    return api


@dataclass(frozen=True, slots=True)
class Rate:
    """At most ``limit`` admissions in any rolling ``period`` seconds (an exact sliding log)."""

    #: Admissions allowed in any window of ``period`` seconds.
    limit: int
    #: The window's length, seconds (at least a millisecond).
    period: float

    def __post_init__(self) -> None:
        positive_int("Rate.limit", self.limit)
        _positive_float("Rate.period", self.period)
        if self.period < 0.001:
            raise ConfigError(
                f"Rate.period={show(self.period)}: must be at least 0.001 seconds",
                field="Rate.period",
                value=self.period,
            )
        _at_most_max_seconds("Rate.period", self.period)

    @property
    def reason(self) -> str:
        """The refusal reason this window reports: ``"rate:<period>s"``."""
        return f"rate:{format_period(self.period)}"


@dataclass(frozen=True, slots=True)
class APILimits:
    """The limits of one API, shared by every replica that uses the same namespace.

    Every replica must use the same limits for an API: the Lua scripts take them from
    the caller, and a replica with larger limits would admit more.
    """

    #: Slots in flight across the whole cluster (``None``: unlimited).
    max_concurrent: int | None = None
    #: Sugar for ``Rate(n, 60)``.
    requests_per_minute: int | None = None
    #: Sugar for ``Rate(n, 3600)``.
    requests_per_hour: int | None = None
    #: Any further rolling windows, e.g. ``(Rate(5, 1.0),)``.
    rates: Sequence[Rate] = ()
    #: Weighted budget of LLM tokens per rolling minute, reserved then reconciled.
    tokens_per_minute: int | None = None
    #: Budgets of input and of output tokens per rolling minute, where a provider limits
    #: them apart (Anthropic). A request gives its tokens as ``tokens=(input, output)``;
    #: one given as a single number counts that number against each of them.
    input_tokens_per_minute: int | None = None
    output_tokens_per_minute: int | None = None
    #: Attempts in ``Limiter.call``, the first one included.
    retry_attempts: int = 3
    #: Exponential backoff with jitter between attempts: lower bound, seconds.
    backoff_min: float = 1.0
    #: Upper bound of one backoff sleep, seconds.
    backoff_max: float = 60.0
    #: A crashed holder's slot comes back after this many seconds.
    lease_ttl: float = 30.0
    #: Default bound of a wait in ``slot()``/``acquire()``/``call()``; ``None``: no bound.
    acquire_timeout: float | None = 60.0
    #: Seconds added to every window when deciding (default 0: exact windows). Admission is
    #: exact in Redis time, but a request reaches the provider a little later, by a delay
    #: that varies (scheduling, connection set-up, network). With a margin ``m``, the
    #: provider sees at most ``limit`` in any ``period`` as long as that delay varies by at
    #: most ``m``; the price is a throughput of ``period / (period + m)`` of the limit.
    window_margin: float = 0.0
    #: Weights of tenants in the fair queue, ``{tenant: weight}``; a tenant absent here
    #: weighs 1.0. Within one priority, backlogged tenants are served in proportion to
    #: their weights.
    tenant_weights: Mapping[str, float] = field(default_factory=lambda: MappingProxyType({}))
    #: Seconds after which a waiter counts as the highest priority (bounded starvation);
    #: ``None``: strict priority.
    priority_aging: float | None = None
    #: Lower the one-minute request window and the token budget, for every replica, to
    #: what the provider's rate-limit headers report when that is less than configured
    #: (``limiter.http.LimitedTransport`` reads them; see ``Limiter.learn_limits``).
    #: Off by default: one API name sending to models with different provider limits
    #: would learn one model's limit for all of them.
    learn_from_headers: bool = False
    #: Several keys (or base URLs) of one provider, each with limits of its own:
    #: ``{name: APILimits(...)}``. Each admission also passes the limits of one of
    #: them, the one with the most headroom that admits it (``slot.deployment``). Of a
    #: deployment's APILimits only the limits count (``max_concurrent``, the request
    #: windows, ``tokens_per_minute``, ``models``).
    deployments: Mapping[str, APILimits] = field(default_factory=lambda: MappingProxyType({}))
    #: Limits of one model, ``{model: APILimits(...)}``, for admissions that name it
    #: (``acquire(..., model=)``); in a deployment's APILimits, within that deployment.
    models: Mapping[str, APILimits] = field(default_factory=lambda: MappingProxyType({}))
    #: The windows in force, requests_per_minute/hour included (derived).
    windows: tuple[Rate, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        positive_int("APILimits.max_concurrent", self.max_concurrent, optional=True)
        positive_int("APILimits.requests_per_minute", self.requests_per_minute, optional=True)
        positive_int("APILimits.requests_per_hour", self.requests_per_hour, optional=True)
        positive_int("APILimits.tokens_per_minute", self.tokens_per_minute, optional=True)
        for name in ("input_tokens_per_minute", "output_tokens_per_minute"):
            positive_int(f"APILimits.{name}", getattr(self, name), optional=True)
        positive_int("APILimits.retry_attempts", self.retry_attempts)
        if not isinstance(self.learn_from_headers, bool):
            raise ConfigError(
                f"APILimits.learn_from_headers={show(self.learn_from_headers)}: must be True "
                "or False",
                field="APILimits.learn_from_headers",
                value=self.learn_from_headers,
            )
        _positive_float("APILimits.backoff_min", self.backoff_min)
        _positive_float("APILimits.backoff_max", self.backoff_max)
        _positive_float("APILimits.lease_ttl", self.lease_ttl)
        _positive_float("APILimits.acquire_timeout", self.acquire_timeout, optional=True)
        margin = finite(self.window_margin)
        if margin is None or margin < 0:
            raise ConfigError(
                f"APILimits.window_margin={show(self.window_margin)}: must be a finite number >= 0",
                field="APILimits.window_margin",
                value=self.window_margin,
            )
        if self.backoff_min > self.backoff_max:
            raise ConfigError(
                f"APILimits.backoff_min={show(self.backoff_min)} is greater than "
                f"backoff_max={show(self.backoff_max)}",
                field="APILimits.backoff_min",
                value=self.backoff_min,
            )
        if self.lease_ttl < 0.1:
            raise ConfigError(
                f"APILimits.lease_ttl={show(self.lease_ttl)}: must be at least 0.1 seconds",
                field="APILimits.lease_ttl",
                value=self.lease_ttl,
            )
        _at_most_max_seconds("APILimits.lease_ttl", self.lease_ttl)
        _at_most_max_seconds("APILimits.window_margin", self.window_margin)
        if isinstance(self.rates, str | bytes) or not isinstance(self.rates, Sequence):
            raise ConfigError(
                f"APILimits.rates={show(self.rates)}: must be a sequence of Rate",
                field="APILimits.rates",
                value=self.rates,
            )
        windows: list[Rate] = []
        if self.requests_per_minute is not None:
            windows.append(Rate(self.requests_per_minute, 60.0))
        if self.requests_per_hour is not None:
            windows.append(Rate(self.requests_per_hour, 3600.0))
        for i, rate in enumerate(self.rates):
            if not isinstance(rate, Rate):
                raise ConfigError(
                    f"APILimits.rates[{i}]={show(rate)}: must be a Rate(limit, period)",
                    field=f"APILimits.rates[{i}]",
                    value=rate,
                )
            windows.append(rate)
        seen: dict[int, Rate] = {}
        for rate in windows:
            key = round(rate.period * 1_000_000)
            if key in seen:
                raise ConfigError(
                    f"APILimits.rates: two windows of {format_period(rate.period)} "
                    f"({show(seen[key])} and {show(rate)}); keep one",
                    field="APILimits.rates",
                    value=rate,
                )
            seen[key] = rate
        _positive_float("APILimits.priority_aging", self.priority_aging, optional=True)
        if self.priority_aging is not None:
            _at_most_max_seconds("APILimits.priority_aging", self.priority_aging)
        object.__setattr__(self, "tenant_weights", _tenant_weights(self.tenant_weights))
        object.__setattr__(self, "deployments", _limit_sets("deployments", self.deployments))
        object.__setattr__(self, "models", _limit_sets("models", self.models))
        object.__setattr__(self, "rates", tuple(self.rates))
        object.__setattr__(self, "windows", tuple(windows))


def uses_tokens(limits: APILimits) -> bool:
    """True when some token budget applies to ``limits``' requests: the API's (total,
    input or output), a deployment's or a model's."""
    own = (limits.tokens_per_minute, limits.input_tokens_per_minute)
    if any(v is not None for v in (*own, limits.output_tokens_per_minute)):
        return True
    return any(uses_tokens(s) for s in (*limits.deployments.values(), *limits.models.values()))


_DEPLOYMENT_NAME = re.compile(r"[A-Za-z0-9_.\-+@=/]{1,64}")
_MODEL_NAME = re.compile(r"[A-Za-z0-9_.:\-+@=/]{1,128}")


def check_model(model: object, name: str = "model") -> str:
    """A model name: 1-128 characters of letters, digits and ``_ . : - + @ = /``."""
    if not isinstance(model, str) or not _MODEL_NAME.fullmatch(model):
        raise ConfigError(
            f"{name}={show(model)}: must be 1-128 characters of letters, digits, "
            "'_', '.', ':', '-', '+', '@', '=' or '/'",
            field=name,
            value=model,
        )
    return model


def _limit_sets(kind: str, sets: object) -> Mapping[str, APILimits]:
    """``APILimits.deployments`` or ``.models`` checked: names, and APILimits values that
    nest no further than a deployment's models."""
    field_name = f"APILimits.{kind}"
    if not isinstance(sets, Mapping):
        raise ConfigError(
            f"{field_name}={show(sets)}: must be a mapping of name to APILimits",
            field=field_name,
            value=sets,
        )
    out: dict[str, APILimits] = {}
    for name, lim in sets.items():
        where = f"{field_name}[{show(name)}]"
        if kind == "models":
            check_model(name, field_name)
        elif not isinstance(name, str) or not _DEPLOYMENT_NAME.fullmatch(name):
            raise ConfigError(
                f"{field_name}: name {show(name)} must be 1-64 characters of letters, "
                "digits, '_', '.', '-', '+', '@', '=' or '/'",
                field=field_name,
                value=name,
            )
        if not isinstance(lim, APILimits):
            raise ConfigError(f"{where}={show(lim)}: must be an APILimits", field=where, value=lim)
        if lim.deployments or (kind == "models" and lim.models):
            raise ConfigError(
                f"{where}: a {kind[:-1]}'s limits cannot have "
                f"{'deployments' if lim.deployments else 'models'} of their own",
                field=where,
                value=lim,
            )
        out[name] = lim
    return MappingProxyType(out)


#: The longest tenant name, bytes of UTF-8.
MAX_TENANT_BYTES: Final = 256


def check_tenant(tenant: object, name: str = "tenant") -> str:
    """A tenant name: a non-empty string of UTF-8 text of at most 256 bytes."""
    ok = False
    if isinstance(tenant, str) and tenant:
        try:
            ok = len(tenant.encode()) <= MAX_TENANT_BYTES
        except UnicodeEncodeError:
            ok = False
    if not ok:
        raise ConfigError(
            f"{name}={show(tenant)}: must be a non-empty string of UTF-8 text of at most "
            f"{MAX_TENANT_BYTES} bytes",
            field=name,
            value=tenant,
        )
    return tenant  # type: ignore[return-value]  # checked above


def check_weight(weight: object, name: str = "weight") -> float:
    """A tenant's weight: a positive finite number (at most 1e9, at least 1e-9)."""
    number = finite(weight)
    if number is None or not 1e-9 <= number <= 1e9:
        raise ConfigError(
            f"{name}={show(weight)}: must be a finite number from 1e-9 to 1e9",
            field=name,
            value=weight,
        )
    return number


def _tenant_weights(weights: object) -> Mapping[str, float]:
    if not isinstance(weights, Mapping):
        raise ConfigError(
            f"APILimits.tenant_weights={show(weights)}: must be a mapping of tenant to weight",
            field="APILimits.tenant_weights",
            value=weights,
        )
    out: dict[str, float] = {}
    for tenant, weight in weights.items():
        check_tenant(tenant, "APILimits.tenant_weights")
        out[tenant] = check_weight(weight, f"APILimits.tenant_weights[{show(tenant)}]")
    return MappingProxyType(out)


def validate_limits(limits: Mapping[str, APILimits]) -> dict[str, APILimits]:
    """Check a ``{api: APILimits}`` mapping and return a plain copy of it."""
    if not isinstance(limits, Mapping):
        raise ConfigError(
            f"limits={show(limits)}: must be a mapping of API name to APILimits",
            field="limits",
            value=limits,
        )
    out: dict[str, APILimits] = {}
    for api, lim in limits.items():
        check_api_name(api)
        if not isinstance(lim, APILimits):
            raise ConfigError(
                f"limits[{show(api)}]={show(lim)}: must be an APILimits",
                field=f"limits[{show(api)}]",
                value=lim,
            )
        out[api] = lim
    return out


#: The two APIs of the original chatbot, with its limits.
DEFAULT_LIMITS: Final[Mapping[str, APILimits]] = MappingProxyType(
    {
        "openai": APILimits(
            max_concurrent=8,
            requests_per_minute=500,
            requests_per_hour=10_000,
            retry_attempts=5,
            backoff_min=1.0,
            backoff_max=60.0,
        ),
        "zapier": APILimits(
            max_concurrent=3,
            requests_per_minute=60,
            requests_per_hour=75,
            retry_attempts=3,
            backoff_min=2.0,
            backoff_max=30.0,
        ),
    }
)
