"""The providers' rate-limit headers, parsed (limiter.http._headers): fuzzed and exact."""

from __future__ import annotations

import email.utils
import math
from datetime import UTC, datetime, timedelta
from fractions import Fraction
from typing import Any

import httpx
import httpx2
import pytest
from hypothesis import given
from hypothesis import strategies as st

from chatbot.fakes.anthropic_server import rfc3339
from chatbot.fakes.openai_server import go_duration
from limiter.http._headers import (
    MAX_COUNT,
    MAX_SECONDS,
    ProviderLimit,
    RateLimitHeaders,
    parse_go_duration,
    parse_rate_limit_headers,
    parse_rfc3339,
)

NOW = 1_767_225_600.0  # 2026-01-01T00:00:00Z, an exact float

OPENAI_NAMES = [
    f"x-ratelimit-{part}-{kind}"
    for kind in ("requests", "tokens")
    for part in ("limit", "remaining", "reset")
]
ANTHROPIC_NAMES = [
    f"anthropic-ratelimit-{kind}-{part}"
    for kind in ("requests", "tokens", "input-tokens", "output-tokens")
    for part in ("limit", "remaining", "reset")
]
NAMES = [*OPENAI_NAMES, *ANTHROPIC_NAMES, "retry-after", "retry-after-ms"]
GARBAGE = [
    "",
    " ",
    "nan",
    "NaN",
    "inf",
    "-inf",
    "-1",
    "-0.5",
    "1e3",
    "1e400",
    "0x10",
    "1_000",
    "\uff11\uff12",  # full-width digits
    "\u0661",  # Arabic-Indic one
    "9" * 5000,
    "99999999999999",
    "1s1s",
    "1m1h",
    "-1s",
    "+1s",
    "1h-1m",
    "1.s",
    ".5s",
    "1 s",
    "1sec",
    "12ms3",
    "25h",
    "1441m",
    "2026-13-01T00:00:00Z",
    "2026-02-30T00:00:00Z",
    "2026-01-01T24:00:00Z",
    "2026-01-01T00:00:60Z",
    "2026-01-01T00:00:00",
    "2026-01-01 00:00:00Z",
    "2026-01-01T00:00:00+24:00",
    "2026-01-01T00:00:00.1234567890Z",
    "0000-01-01T00:00:00Z",
    "9999-12-31T23:59:59Z",
    "Mon, 99 Foo 2026 99:99:99 GMT",
    "5, 5",
    "\x00",
]

header_values = st.one_of(
    st.sampled_from(GARBAGE),
    st.text(max_size=40),
    st.from_regex(r"[0-9]{1,16}", fullmatch=True),
    st.from_regex(r"([0-9]{1,3}(\.[0-9]{1,4})?(h|m|s|ms|us|ns)){1,4}", fullmatch=True),
    st.from_regex(
        r"20[0-9]{2}-[01][0-9]-[0-3][0-9]T[0-2][0-9]:[0-5][0-9]:[0-6][0-9](\.[0-9]{1,9})?Z",
        fullmatch=True,
    ),
)
header_names = st.one_of(
    st.sampled_from(NAMES),
    st.sampled_from(NAMES).map(str.upper),
    st.sampled_from(NAMES).map(str.title),
    st.text(max_size=30),
)


def check_sane(parsed: RateLimitHeaders) -> None:
    """Every field is unknown or a number in range: counts are ints, times finite >= 0."""
    for _, limit in parsed.kinds():
        for count in (limit.limit, limit.remaining):
            assert count is None or (type(count) is int and 0 <= count <= MAX_COUNT)
        reset = limit.reset
        assert reset is None or (type(reset) is float and 0 <= reset <= MAX_SECONDS)
    hint = parsed.retry_after
    assert hint is None or (type(hint) is float and 0 <= hint <= MAX_SECONDS)


@given(st.dictionaries(header_names, header_values, max_size=12))
def test_arbitrary_header_dicts_never_raise(headers: dict[str, str]) -> None:
    """Any dict of headers parses without an exception into known-or-unknown, sane fields."""
    check_sane(parse_rate_limit_headers(headers, now=lambda: NOW))


@given(st.lists(st.tuples(header_names, header_values), max_size=12))
def test_arbitrary_header_pairs_never_raise(pairs: list[tuple[str, str]]) -> None:
    """Lists of pairs (duplicates included) parse without an exception, also as Headers."""
    check_sane(parse_rate_limit_headers(pairs, now=lambda: NOW))
    ascii_pairs = [
        (k, v) for k, v in pairs if k.isascii() and v.isascii() and k.strip() and "\x00" not in v
    ]
    try:
        headers = httpx2.Headers(ascii_pairs)
    except Exception:  # httpx2 refused a name or value itself: nothing to parse
        return
    check_sane(parse_rate_limit_headers(headers, now=lambda: NOW))


@pytest.mark.parametrize(
    "headers", [None, 42, "x-ratelimit-limit-requests", [("a",)], object(), {1: 2}, {b"\xff": 3}]
)
def test_things_that_are_not_headers_are_all_unknown(headers: Any) -> None:
    """Non-header inputs give an all-unknown result, not an exception."""
    assert parse_rate_limit_headers(headers) == RateLimitHeaders()


def test_garbage_is_unknown() -> None:
    """Negative, NaN, huge and malformed values of every header read give unknown."""
    # One test, not one per pair: the suite collects garbage after each test (conftest).
    wrong = [
        (name, value)
        for name in NAMES
        for value in GARBAGE
        if parse_rate_limit_headers({name: value}, now=lambda: NOW) != RateLimitHeaders()
    ]
    assert wrong == []


durations = st.tuples(
    st.one_of(st.none(), st.integers(0, 23)),
    st.one_of(st.none(), st.integers(0, 59)),
    st.one_of(st.none(), st.integers(0, 59)),
    st.one_of(st.none(), st.integers(0, 999)),
).filter(lambda parts: any(p is not None for p in parts))


@given(durations)
def test_go_duration_from_parts_round_trips_exactly(parts: tuple[int | None, ...]) -> None:
    """``<h>h<m>m<s>s<ms>ms`` (any present parts, in order) parses to the exact seconds."""
    h, m, s, ms = parts
    text = "".join(
        f"{v}{unit}" for v, unit in zip(parts, ("h", "m", "s", "ms"), strict=True) if v is not None
    )
    total_ms = (h or 0) * 3_600_000 + (m or 0) * 60_000 + (s or 0) * 1000 + (ms or 0)
    assert parse_go_duration(text) == total_ms / 1000  # int / int: correctly rounded
    headers = {"x-ratelimit-reset-tokens": text, "x-ratelimit-remaining-tokens": "0"}
    assert parse_rate_limit_headers(headers).tokens == ProviderLimit(None, 0, total_ms / 1000)


@given(st.integers(0, 86_400_000))
def test_go_duration_as_go_prints_it_round_trips_exactly(total_ms: int) -> None:
    """What Go's Duration.String prints (``1h2m3.5s``, ``12ms``, ``0s``) parses exactly."""
    text = go_duration(total_ms / 1000)
    assert parse_go_duration(text) == total_ms / 1000


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("1s", 1.0),
        ("6m0s", 360.0),
        ("12ms", 0.012),
        ("1h2m3.5s", 3723.5),
        ("0s", 0.0),
        ("0", 0.0),
        ("1.5\u00b5s", 1.5e-6),
        ("1.5\u03bcs", 1.5e-6),
        ("250us", 0.00025),
        ("7ns", 7e-9),
        ("14h29m11.04s", 52151.04),
        ("2.5", 2.5),  # a bare number is seconds, as the transport always read it
        ("24h", 86400.0),
        ("24h0m0.001s", None),
    ],
)
def test_go_durations(text: str, seconds: float | None) -> None:
    """Go durations of every unit parse exactly; more than a day is unknown."""
    assert parse_go_duration(text) == seconds


def _rfc3339_text(whole: int, frac_ns: int, digits: int, offset_minutes: int | None) -> str:
    """The instant ``whole + frac_ns / 1e9`` (epoch seconds) written in RFC 3339."""
    shown = timedelta(minutes=offset_minutes or 0)
    local = datetime.fromtimestamp(whole, tz=UTC) + shown
    text = f"{local:%Y-%m-%dT%H:%M:%S}"
    if digits:
        text += "." + f"{frac_ns:09d}"[:digits]
    if offset_minutes is None:
        return text + "Z"
    sign = "-" if offset_minutes < 0 else "+"
    hours, minutes = divmod(abs(offset_minutes), 60)
    return f"{text}{sign}{hours:02d}:{minutes:02d}"


@given(
    st.integers(1_500_000_000, 2_500_000_000),
    st.integers(0, 86_400 * 10**9),
    st.integers(0, 9),
    st.one_of(st.none(), st.integers(-(23 * 60 + 59), 23 * 60 + 59)),
)
def test_rfc3339_resets_round_trip_exactly(
    now: int, delta_ns: int, digits: int, offset: int | None
) -> None:
    """A reset timestamp ``delta`` ahead (any offset, 0-9 fraction digits) is ``delta`` exactly."""
    delta_ns -= delta_ns % 10 ** (9 - digits)  # what the digits can show
    whole, frac_ns = divmod(now * 10**9 + delta_ns, 10**9)
    text = _rfc3339_text(whole, frac_ns, digits, offset)
    expected = float(Fraction(delta_ns, 10**9))
    assert parse_rfc3339(text, float(now)) == expected
    headers = {"anthropic-ratelimit-output-tokens-reset": text}
    parsed = parse_rate_limit_headers(headers, now=lambda: float(now))
    assert parsed.output_tokens == ProviderLimit(None, None, expected)


@pytest.mark.parametrize(
    ("offset", "expected"),
    [
        (-1.0, 0.0),  # just past: whole again
        (-MAX_SECONDS, 0.0),
        (-MAX_SECONDS - 1, None),  # a day in the past: a clock is wrong
        (MAX_SECONDS, MAX_SECONDS),
        (MAX_SECONDS + 1, None),
    ],
)
def test_rfc3339_far_from_now_is_unknown(offset: float, expected: float | None) -> None:
    """A timestamp just past is 0; more than a day away either way is unknown."""
    text = _rfc3339_text(int(NOW + offset), 0, 0, None)
    assert parse_rfc3339(text, NOW) == expected


def test_rfc3339_needs_a_clock() -> None:
    """A clock that fails or answers NaN makes resets and HTTP dates unknown, not an error."""

    def broken() -> float:
        raise OSError("no clock")

    headers = {"anthropic-ratelimit-requests-reset": rfc3339(NOW + 5), "retry-after": "3"}
    for clock in (broken, lambda: math.nan):
        parsed = parse_rate_limit_headers(headers, now=clock)
        assert (parsed.requests.reset, parsed.retry_after) == (None, 3.0)


@given(
    st.sampled_from(["requests", "tokens", "input-tokens", "output-tokens"]),
    st.integers(0, MAX_COUNT),
    st.integers(0, MAX_COUNT),
    st.integers(0, 86_400_000),
)
def test_anthropic_headers_round_trip(kind: str, limit: int, remaining: int, ms: int) -> None:
    """Anthropic's limit, remaining and reset of each kind come back exactly."""
    headers = httpx2.Headers(
        {
            f"anthropic-ratelimit-{kind}-limit": str(limit),
            f"Anthropic-RateLimit-{kind}-Remaining": str(remaining),
            f"anthropic-ratelimit-{kind}-reset": _rfc3339_text(
                int(NOW) + ms // 1000, ms % 1000 * 10**6, 3, None
            ),
        }
    )
    parsed = parse_rate_limit_headers(headers, now=lambda: NOW)
    got = dict(parsed.kinds())[kind.replace("-", "_")]
    assert got == ProviderLimit(limit, remaining, ms / 1000)
    others = [v for k, v in parsed.kinds() if k != kind.replace("-", "_")]
    assert others == [ProviderLimit()] * 3


@given(st.sampled_from(NAMES[:-2]), st.integers(0, 1000), st.integers(0, 1000))
def test_a_header_given_twice_is_unknown(name: str, first: int, second: int) -> None:
    """Two values of one header (any case, any equality) make that field unknown only."""
    pairs = [(name, str(first)), (name.upper(), str(second)), ("retry-after", "7")]
    for headers in (pairs, httpx2.Headers(pairs), httpx.Headers(pairs)):
        parsed = parse_rate_limit_headers(headers, now=lambda: NOW)
        for _, limit in parsed.kinds():
            assert limit == ProviderLimit()
        assert parsed.retry_after == 7.0


def test_the_same_field_from_both_providers_is_unknown() -> None:
    """OpenAI's and Anthropic's header for the same field at once: unknown, not a pick."""
    headers = {
        "x-ratelimit-limit-requests": "10",
        "anthropic-ratelimit-requests-limit": "10",
        "x-ratelimit-reset-requests": "1s",
        "anthropic-ratelimit-requests-reset": rfc3339(NOW + 1),
        "anthropic-ratelimit-requests-remaining": "3",
    }
    parsed = parse_rate_limit_headers(headers, now=lambda: NOW)
    assert parsed.requests == ProviderLimit(None, 3, None)


def test_openai_headers() -> None:
    """A real OpenAI answer's headers: both kinds, limits, remaining and Go durations."""
    headers = httpx2.Headers(
        {
            "x-ratelimit-limit-requests": "10000",
            "x-ratelimit-limit-tokens": "30000000",
            "x-ratelimit-remaining-requests": "9999",
            "x-ratelimit-remaining-tokens": "29999993",
            "x-ratelimit-reset-requests": "6ms",
            "x-ratelimit-reset-tokens": "0s",
        }
    )
    parsed = parse_rate_limit_headers(headers)
    assert parsed.requests == ProviderLimit(10_000, 9999, 0.006)
    assert parsed.tokens == ProviderLimit(30_000_000, 29_999_993, 0.0)
    assert parsed.input_tokens == parsed.output_tokens == ProviderLimit()
    assert parsed.retry_after is None


@given(st.integers(0, 86_400), st.integers(0, 86_400_000))
def test_retry_after_round_trips(seconds: int, ms: int) -> None:
    """retry-after (whole seconds) and retry-after-ms (preferred when valid) come back exactly."""
    assert parse_rate_limit_headers({"retry-after": str(seconds)}).retry_after == seconds
    both = {"retry-after": str(seconds), "retry-after-ms": str(ms)}
    assert parse_rate_limit_headers(both).retry_after == ms / 1000
    bad_ms = {"retry-after": str(seconds), "retry-after-ms": "soon"}
    assert parse_rate_limit_headers(bad_ms).retry_after == seconds


def test_retry_after_as_an_http_date() -> None:
    """An HTTP-date retry-after is the seconds until then (0 once past, unknown past a day)."""
    ahead = email.utils.formatdate(NOW + 30, usegmt=True)
    past = email.utils.formatdate(NOW - 30, usegmt=True)
    far = email.utils.formatdate(NOW + 2 * MAX_SECONDS, usegmt=True)
    for text, expected in ((ahead, 30.0), (past, 0.0), (far, None)):
        parsed = parse_rate_limit_headers({"retry-after": text}, now=lambda: NOW)
        assert parsed.retry_after == expected
