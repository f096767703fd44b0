"""Checks of what a caller passes to the Limiter: a ConfigError naming the field and value.

Pure: no I/O, no state. Called by the Limiter façade before anything reaches Redis, so a
bad argument queues nothing and consumes nothing.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from ._config import MAX_COUNT, MAX_SECONDS, check_model, finite, show
from ._errors import ConfigError

if TYPE_CHECKING:
    from ._contract import KeyPlan

__all__ = [
    "check_choice",
    "check_cooldown",
    "check_key",
    "check_namespace",
    "check_request",
    "check_seconds",
    "check_timeout",
]


def utf8(value: str) -> bool:
    """False for text that cannot be sent to Redis (a lone surrogate)."""
    try:
        value.encode()
    except UnicodeEncodeError:
        return False
    return True


def check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    """``value`` is one of ``choices`` (``on_redis_error``), else ConfigError."""
    if value not in choices:
        allowed = " or ".join(repr(c) for c in choices)
        raise ConfigError(f"{name}={show(value)}: must be {allowed}", field=name, value=value)


def check_namespace(namespace: object) -> str:
    if (
        not isinstance(namespace, str)
        or not 0 < len(namespace) <= 100
        or any(c in "{} \t\n\r\x0b\x0c" for c in namespace)  # hash tags, channel words
        or not utf8(namespace)
    ):
        raise ConfigError(
            f"namespace={show(namespace)}: must be 1-100 characters of UTF-8 text "
            "without braces or whitespace",
            field="namespace",
            value=namespace,
        )
    return namespace


def check_seconds(name: str, value: object, low: float) -> float:
    """A duration setting from ``low`` seconds to 366 days."""
    number = finite(value)
    if number is None or not low <= number <= MAX_SECONDS:
        raise ConfigError(
            f"{name}={show(value)}: must be a number of seconds from {low:g} to "
            f"{MAX_SECONDS:.0f} (366 days)",
            field=name,
            value=value,
        )
    return number


def check_cooldown(seconds: object) -> float:
    number = finite(seconds)
    if number is None or not 0 < number <= MAX_SECONDS:
        raise ConfigError(
            f"cooldown seconds={show(seconds)}: must be a number > 0 and at most "
            f"{MAX_SECONDS:.0f} (366 days)",
            field="seconds",
            value=seconds,
        )
    return number


def check_key(key: object) -> str:
    if not isinstance(key, str) or not key or not utf8(key):
        raise ConfigError(
            f"key={show(key)}: must be a non-empty string of UTF-8 text", field="key", value=key
        )
    return key


def check_timeout(timeout: object) -> float | None:
    """``timeout`` of acquire/slot as seconds (inf: no bound), or None."""
    if timeout is None:
        return None
    number = finite(timeout)
    if number is None and timeout == math.inf and not isinstance(timeout, bool):
        number = math.inf  # wait without bound, as None with no acquire_timeout
    if number is None or number < 0:
        raise ConfigError(
            f"timeout={show(timeout)}: must be a number of seconds >= 0 or None",
            field="timeout",
            value=timeout,
        )
    return number


def check_request(
    plan: KeyPlan, cost: object, tokens: object, model: object = None
) -> tuple[str, int, int, int]:
    """``cost`` is a whole number in range, ``tokens`` one or an ``(input, output)`` pair
    of them, ``model`` None or a model name, and no configured limit the request must pass
    is below it (such a request could never pass: the API's, its model's, and those of at
    least one deployment). Returns the model as the scripts take it (``""``: none), the
    tokens, and the input and output tokens (both the tokens when not given apart)."""
    if not isinstance(cost, int) or isinstance(cost, bool) or not 1 <= cost <= MAX_COUNT:
        raise ConfigError(
            f"cost={show(cost)}: must be an integer from 1 to 2**53 - 1", field="cost", value=cost
        )
    parts = tokens if isinstance(tokens, tuple) else (tokens,)
    if not 1 <= len(parts) <= 2 or not all(
        isinstance(n, int) and not isinstance(n, bool) and 0 <= n <= MAX_COUNT for n in parts
    ):
        raise ConfigError(
            f"tokens={show(tokens)}: must be an integer from 0 to 2**53 - 1, or a pair "
            "(input, output) of them",
            field="tokens",
            value=tokens,
        )
    name = "" if model is None else check_model(model)
    inp, outp = (parts[0], parts[-1]) if len(parts) == 2 else (parts[0], parts[0])
    total = inp + outp if len(parts) == 2 else inp
    if total > MAX_COUNT:
        raise ConfigError(
            f"tokens={show(tokens)}: more than 2**53 - 1 in all", field="tokens", value=tokens
        )
    if cost <= plan.light[0] and total <= plan.light[1]:
        return name, total, inp, outp  # below every limit: nothing more to check
    weights = {"r": cost, "t": total, "in": inp, "out": outp}
    must = [(w, weights["r" if w.kind == "r" else "t"]) for w in plan.windows]
    must += _group(plan, "", weights)
    if name:
        must += _group(plan, f"m:{name}", weights)
    heavy = [_too_heavy(must)]
    if plan.deployments:
        each = []
        for dep in plan.deployments:
            group = _group(plan, f"d:{dep}", weights)
            if name:
                group += _group(plan, f"d:{dep}:m:{name}", weights)
            each.append(_too_heavy(group))
        if all(each):
            heavy.append(each[0])
    for found in heavy:
        if found is not None:
            w, weight = found
            what = "cost" if w.kind == "r" else "tokens"
            raise ConfigError(
                f"{what}={weight} for API {plan.api!r} can never pass: "
                f"the {w.name} limit is {w.limit}",
                field=what,
                value=weight,
            )
    return name, total, inp, outp


def _group(plan: KeyPlan, base: str, weights: dict[str, int]) -> list[tuple[Any, int]]:
    """The windows of limit set ``base`` (none for ``""``, the API's own) and of its input
    and output budgets, each with what the request weighs there."""
    out = []
    for id_, tokens in ((base, "t"), (f"{base}#in", "in"), (f"{base}#out", "out")):
        for w in (plan.set_windows(id_) or ()) if id_ else ():
            out.append((w, weights["r" if w.kind == "r" else tokens]))
    return out


def _too_heavy(windows: list[tuple[Any, int]]) -> tuple[Any, int] | None:
    """The first window whose limit is below what the request weighs there, else None."""
    for w, weight in windows:
        if weight > w.limit:
            return w, weight
    return None
