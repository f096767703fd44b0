"""The providers' rate-limit headers, parsed: what the provider says is left, and until when.

Owns :class:`ProviderLimit` and :class:`RateLimitHeaders` (frozen, no state) and the pure
parsers behind :func:`parse_rate_limit_headers`. No I/O, no HTTP library: headers are
anything with ``multi_items()`` (``httpx``/``httpx2`` ``Headers``), a mapping, or pairs.
Called by :mod:`limiter.http._transport` (the pause on ``remaining: 0``); the engine's
learned limits will read the same object.

Read, per limit kind (``requests``, ``tokens``, ``input_tokens``, ``output_tokens``):

- OpenAI: ``x-ratelimit-{limit,remaining}-{requests,tokens}`` (integers; limits are per
  minute) and ``x-ratelimit-reset-{requests,tokens}`` (Go durations: ``1s``, ``6m0s``,
  ``12ms``, ``1h2m3.5s``, ``0s``; a bare non-negative number is taken as seconds);
- Anthropic: ``anthropic-ratelimit-{requests,tokens,input-tokens,output-tokens}-{limit,
  remaining,reset}`` (integers, remaining tokens rounded to thousands by the provider;
  resets are RFC 3339 timestamps, turned into seconds from now);
- both: ``retry-after-ms`` then ``retry-after`` (seconds, or an HTTP date).

Every field is ``None`` ("unknown") unless its header is present exactly once and well
formed: garbage, negative, NaN, infinite or huge values, durations or timestamps that do
not parse, a header given twice, or the same field given by both providers' headers are
unknown, never an exception and never a guessed number. A reset more than a day ahead (or
a timestamp more than a day in the past) is unknown; one just past is 0.
"""

from __future__ import annotations

import email.utils
import math
import re
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import date
from fractions import Fraction
from typing import Any

__all__ = [
    "KINDS",
    "MAX_COUNT",
    "MAX_SECONDS",
    "ProviderLimit",
    "RateLimitHeaders",
    "parse_go_duration",
    "parse_rate_limit_headers",
    "parse_rfc3339",
]

#: Larger limits or remaining counts are not believed (unknown).
MAX_COUNT = 10**12
#: Longer resets and retry hints are not believed (unknown): a day, in seconds.
MAX_SECONDS = 86_400.0
#: The limit kinds, as the attribute names of :class:`RateLimitHeaders`.
KINDS = ("requests", "tokens", "input_tokens", "output_tokens")


@dataclass(frozen=True, slots=True)
class ProviderLimit:
    """One limit as the provider reported it; ``None`` is unknown."""

    #: The limit (per minute for OpenAI's and Anthropic's).
    limit: int | None = None
    #: What is left of it now.
    remaining: int | None = None
    #: Seconds from now until it is whole again (OpenAI: until it resets; Anthropic:
    #: until fully replenished), ``>= 0``.
    reset: float | None = None


_UNKNOWN = ProviderLimit()


@dataclass(frozen=True, slots=True)
class RateLimitHeaders:
    """A response's rate-limit headers, parsed (see the module docstring for the sources)."""

    requests: ProviderLimit = _UNKNOWN
    #: OpenAI's token limit; Anthropic's most restrictive token limit in force.
    tokens: ProviderLimit = _UNKNOWN
    #: Anthropic's input tokens per minute.
    input_tokens: ProviderLimit = _UNKNOWN
    #: Anthropic's output tokens per minute.
    output_tokens: ProviderLimit = _UNKNOWN
    #: Seconds the provider asked us to wait (``retry-after-ms``, else ``retry-after``).
    retry_after: float | None = None

    def kinds(self) -> tuple[tuple[str, ProviderLimit], ...]:
        """``(kind, limit)`` for each of :data:`KINDS`, in that order."""
        return (
            ("requests", self.requests),
            ("tokens", self.tokens),
            ("input_tokens", self.input_tokens),
            ("output_tokens", self.output_tokens),
        )


# --------------------------------------------------------------------------- scalars

_COUNT = re.compile(r"[0-9]{1,13}")
_SECONDS = re.compile(r"[0-9]{1,12}(?:\.[0-9]{1,12})?")
# One Go duration part: a decimal number and its unit. Units must come in this order, each
# at most once (what Go's Duration.String prints; Go itself also parses other orders).
_GO_PART = re.compile(r"([0-9]{1,12}(?:\.[0-9]{1,12})?)(h|ms|m|s|us|\u00b5s|\u03bcs|ns)")
_GO_ORDER = {"h": 0, "m": 1, "s": 2, "ms": 3, "us": 4, "\u00b5s": 4, "\u03bcs": 4, "ns": 5}
_GO_UNIT = {
    "h": Fraction(3600),
    "m": Fraction(60),
    "s": Fraction(1),
    "ms": Fraction(1, 10**3),
    "us": Fraction(1, 10**6),
    "\u00b5s": Fraction(1, 10**6),
    "\u03bcs": Fraction(1, 10**6),
    "ns": Fraction(1, 10**9),
}
_RFC3339 = re.compile(
    r"([0-9]{4})-([0-9]{2})-([0-9]{2})[Tt]([0-9]{2}):([0-9]{2}):([0-9]{2})(\.[0-9]{1,9})?"
    r"(?:([Zz])|([+-])([0-9]{2}):([0-9]{2}))"
)
_EPOCH_ORDINAL = date(1970, 1, 1).toordinal()


def _count(text: str | None) -> int | None:
    """A non-negative integer of plain ASCII digits, at most :data:`MAX_COUNT`, or None."""
    if text is None:
        return None
    text = text.strip()
    if not _COUNT.fullmatch(text):
        return None
    value = int(text)
    return value if value <= MAX_COUNT else None


def _seconds(exact: Fraction) -> float | None:
    """``exact`` seconds as the nearest float, or None beyond :data:`MAX_SECONDS`."""
    if exact < 0 or exact > MAX_SECONDS:
        return None
    return float(exact)  # a Fraction converts correctly rounded


def parse_go_duration(text: str | None) -> float | None:
    """A Go duration (``"1s"``, ``"6m0s"``, ``"12ms"``, ``"1h2m3.5s"``, ``"0s"``) in seconds.

    Exact: the parts are added as fractions, then rounded once to the nearest float.
    Units ``h``, ``m``, ``s``, ``ms``, ``us``/``µs``, ``ns``, largest first, each at most
    once; ``"0"`` and a bare non-negative number are seconds. Signs, other orders,
    garbage and more than a day give ``None``.
    """
    if text is None:
        return None
    text = text.strip()
    if not text:
        return None
    if _SECONDS.fullmatch(text):
        return _seconds(Fraction(text))
    pos, total, last = 0, Fraction(0), -1
    for match in _GO_PART.finditer(text):
        rank = _GO_ORDER[match.group(2)]
        if match.start() != pos or rank <= last:
            return None
        total += Fraction(match.group(1)) * _GO_UNIT[match.group(2)]
        pos, last = match.end(), rank
    if pos == 0 or pos != len(text):
        return None
    return _seconds(total)


def _rfc3339_epoch(text: str) -> Fraction | None:
    """An RFC 3339 timestamp as exact seconds since the epoch, or None."""
    match = _RFC3339.fullmatch(text.strip())
    if match is None:
        return None
    year, month, day, hour, minute, second = (int(match.group(i)) for i in range(1, 7))
    if hour > 23 or minute > 59 or second > 59:  # no leap seconds: unknown, not a guess
        return None
    try:
        days = date(year, month, day).toordinal() - _EPOCH_ORDINAL
    except ValueError:  # 2026-02-30, month 13, year 0
        return None
    seconds = Fraction(days * 86_400 + hour * 3600 + minute * 60 + second)
    if match.group(7):
        seconds += Fraction(match.group(7)[1:]) / 10 ** (len(match.group(7)) - 1)
    if match.group(8) is None:  # a numeric offset: local time = UTC + offset
        off_hours, off_minutes = int(match.group(10)), int(match.group(11))
        if off_hours > 23 or off_minutes > 59:
            return None
        offset = off_hours * 3600 + off_minutes * 60
        seconds -= offset if match.group(9) == "+" else -offset
    return seconds


def parse_rfc3339(text: str | None, now: float) -> float | None:
    """Seconds from ``now`` (epoch seconds) until the RFC 3339 timestamp ``text``.

    Exact (one rounding, at the end). A time already past but within a day is 0 (the
    limit is whole again; clocks differ a little); further in the past or more than a day
    ahead, or not a valid RFC 3339 date-time, gives ``None``.
    """
    if text is None or not math.isfinite(now):
        return None
    when = _rfc3339_epoch(text)
    if when is None:
        return None
    delta = when - Fraction(now)
    if delta < 0:
        return 0.0 if -delta <= MAX_SECONDS else None
    return _seconds(delta)


def _http_date(text: str, now: float) -> float | None:
    """Seconds from ``now`` until an HTTP date (past: 0, as for RFC 3339), or None."""
    if not text or text[0].isdigit() or not math.isfinite(now):
        return None  # a number that is not plain seconds ("1e3"), or no clock
    try:
        when = email.utils.parsedate_to_datetime(text)
        if when is None or when.tzinfo is None:
            return None
        delta = Fraction(when.timestamp()) - Fraction(now)
    except (TypeError, ValueError, IndexError, OverflowError, OSError):
        return None
    if delta < 0:
        return 0.0 if -delta <= MAX_SECONDS else None
    return _seconds(delta)


def _retry_after(ms: str | None, value: str | None, now: float) -> float | None:
    """``retry-after-ms`` (milliseconds) if valid, else ``retry-after`` (seconds or HTTP date)."""
    if ms is not None and _SECONDS.fullmatch(ms.strip()):
        hint = _seconds(Fraction(ms.strip()) / 1000)
        if hint is not None:
            return hint
    if value is None:
        return None
    text = value.strip()
    if _SECONDS.fullmatch(text):
        return _seconds(Fraction(text))
    return _http_date(text, now)


# --------------------------------------------------------------------------- headers

_OPENAI = {"requests": "requests", "tokens": "tokens"}
_ANTHROPIC = {
    "requests": "requests",
    "tokens": "tokens",
    "input_tokens": "input-tokens",
    "output_tokens": "output-tokens",
}
#: Every header name read, lower case.
_NAMES = frozenset(
    [f"x-ratelimit-{part}-{kind}" for kind in _OPENAI.values() for part in ("limit", "remaining")]
    + [f"x-ratelimit-reset-{kind}" for kind in _OPENAI.values()]
    + [
        f"anthropic-ratelimit-{kind}-{part}"
        for kind in _ANTHROPIC.values()
        for part in ("limit", "remaining", "reset")
    ]
    + ["retry-after", "retry-after-ms"]
)
#: A header present but unusable (not text): it makes its field unknown.
_BAD = "\x00"


def _text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode("latin-1")
    return _BAD


def _pairs(headers: Any) -> Iterable[tuple[Any, Any]]:
    if headers is None:
        return ()
    multi = getattr(headers, "multi_items", None)
    if callable(multi):  # httpx / httpx2 Headers: every value, duplicates included
        return list(multi())
    if isinstance(headers, Mapping):
        return list(headers.items())
    return [(pair[0], pair[1]) for pair in headers]


def _collect(headers: Any) -> dict[str, list[str]]:
    """The headers this module reads, by lower-case name, every occurrence kept."""
    found: dict[str, list[str]] = {}
    try:
        pairs = _pairs(headers)
        for name, value in pairs:
            key = _text(name).strip().lower()
            if key in _NAMES:
                found.setdefault(key, []).append(_text(value))
    except Exception:  # not headers at all (a number, pairs of the wrong size): nothing known
        return {}
    return found


def _one(found: dict[str, list[str]], *names: str) -> str | None:
    """The single value of whichever of ``names`` is present; None when absent or ambiguous."""
    values = [v for name in names for v in found.get(name, ())]
    if len(values) != 1 or values[0] == _BAD:
        return None
    return values[0]


def parse_rate_limit_headers(
    headers: Any, *, now: Callable[[], float] = time.time
) -> RateLimitHeaders:
    """Parse a response's rate-limit headers (OpenAI's and Anthropic's); never raises.

    ``now`` (epoch seconds) turns Anthropic's reset timestamps and an HTTP-date
    ``retry-after`` into seconds from now; it is read once.
    """
    found = _collect(headers)
    if not found:
        return RateLimitHeaders()
    try:
        at = float(now())
    except Exception:  # an injected clock that fails: timestamps are unknown
        at = math.nan
    limits: dict[str, ProviderLimit] = {}
    for kind in KINDS:
        openai = _OPENAI.get(kind)
        anthropic = f"anthropic-ratelimit-{_ANTHROPIC[kind]}"
        # OpenAI has no input/output kinds: its names are then none that a header has.
        o_limit = f"x-ratelimit-limit-{openai}" if openai else ""
        o_remaining = f"x-ratelimit-remaining-{openai}" if openai else ""
        limit = _count(_one(found, o_limit, f"{anthropic}-limit"))
        remaining = _count(_one(found, o_remaining, f"{anthropic}-remaining"))
        o_reset = found.get(f"x-ratelimit-reset-{openai}", []) if openai else []
        a_reset = found.get(f"{anthropic}-reset", [])
        reset: float | None = None
        if len(o_reset) + len(a_reset) == 1:
            if o_reset and o_reset[0] != _BAD:
                reset = parse_go_duration(o_reset[0])
            elif a_reset and a_reset[0] != _BAD:
                reset = parse_rfc3339(a_reset[0], at)
        limits[kind] = ProviderLimit(limit, remaining, reset)
    ms = _one(found, "retry-after-ms")
    value = _one(found, "retry-after")
    ambiguous_ms = len(found.get("retry-after-ms", ())) > 1
    return RateLimitHeaders(
        requests=limits["requests"],
        tokens=limits["tokens"],
        input_tokens=limits["input_tokens"],
        output_tokens=limits["output_tokens"],
        retry_after=None if ambiguous_ms else _retry_after(ms, value, at),
    )
