"""The retry policy, table-tested on real openai SDK errors built from real httpx2 responses."""

from __future__ import annotations

import email.utils
import time
from typing import Any

import httpx
import httpx2
import openai
import pytest

from limiter._retry import (
    MAX_HINT,
    classify_exception,
    classify_response,
    parse_duration,
    parse_retry_after,
)
from tests._provider import QUOTA, RATE_LIMITED, TOO_LARGE, URL, _err, _response, _sdk_error


@pytest.mark.parametrize(
    ("status", "headers", "body", "retry", "kind", "hint"),
    [
        (429, {"retry-after": "2"}, RATE_LIMITED, True, "rate_limited", 2.0),
        (
            429,
            {"retry-after-ms": "350", "retry-after": "9"},
            RATE_LIMITED,
            True,
            "rate_limited",
            0.35,
        ),
        (429, {}, QUOTA, False, "quota", None),
        (429, {}, _err("credit_balance_exhausted"), False, "quota", None),
        (429, {"retry-after": "1"}, TOO_LARGE, False, "too_large", 1.0),
        (408, {}, None, True, "timeout", None),
        (409, {}, None, True, "conflict", None),
        (500, {}, _err("server_error"), True, "server_error", None),
        (502, {}, None, True, "server_error", None),
        (503, {"retry-after": "4"}, None, True, "server_error", 4.0),
        (400, {}, _err("invalid_request_error"), False, "client_error", None),
        (401, {}, _err("invalid_api_key"), False, "client_error", None),
        (403, {}, None, False, "client_error", None),
        (404, {}, None, False, "client_error", None),
        (422, {}, None, False, "client_error", None),
        (500, {"x-should-retry": "false"}, None, False, "server_error", None),
        (400, {"x-should-retry": "true"}, None, True, "client_error", None),
        (429, {"x-should-retry": "false"}, RATE_LIMITED, False, "rate_limited", None),
        (429, {"x-should-retry": "true"}, QUOTA, False, "quota", None),
    ],
)
def test_sdk_status_errors(
    status: int,
    headers: dict[str, str],
    body: Any,
    retry: bool,
    kind: str,
    hint: float | None,
) -> None:
    """Each provider answer, as the openai SDK raises it, is retried or not as documented."""
    exc = _sdk_error(status, headers, body)
    assert isinstance(exc, openai.APIStatusError)
    verdict = classify_exception(exc)
    assert (verdict.retry, verdict.kind, verdict.status) == (retry, kind, status)
    assert verdict.retry_after == hint
    # The same response seen raw by the HTTP transport gets the same verdict.
    raw = classify_response(status, _response(status, headers, body).headers, body)
    assert (raw.retry, raw.kind, raw.retry_after) == (retry, kind, hint)


def test_quota_and_rate_limit_pause_the_api() -> None:
    """A 429 and a spent quota both ask for a cluster-wide pause; a 500 does not."""
    assert classify_exception(_sdk_error(429, {}, RATE_LIMITED)).pauses_api
    assert classify_exception(_sdk_error(429, {}, QUOTA)).pauses_api
    assert not classify_exception(_sdk_error(500, {}, None)).pauses_api
    assert classify_exception(_sdk_error(429, {}, QUOTA)).code == "insufficient_quota"


def test_retry_after_as_http_date() -> None:
    """Retry-After given as an HTTP date is read as the seconds until then."""
    when = email.utils.formatdate(time.time() + 30, usegmt=True)
    verdict = classify_exception(_sdk_error(429, {"retry-after": when}, RATE_LIMITED))
    assert verdict.retry_after is not None
    assert 28.0 <= verdict.retry_after <= 30.0
    past = email.utils.formatdate(time.time() - 30, usegmt=True)
    assert parse_retry_after({"retry-after": past}) == 0.0


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({}, None),
        ({"retry-after": ""}, None),
        ({"retry-after": "soon"}, None),
        ({"retry-after": "-5"}, None),
        ({"retry-after": "nan"}, None),
        ({"retry-after": "inf"}, None),
        ({"retry-after": "1e400"}, None),
        ({"retry-after": "99999999999"}, MAX_HINT),
        ({"retry-after-ms": "garbage", "retry-after": "3"}, 3.0),
        ({"Retry-After": "7"}, 7.0),
        ({"retry-after": "Mon, 99 Foo 2026 99:99:99 GMT"}, None),
    ],
)
def test_retry_after_garbage(headers: dict[str, str], expected: float | None) -> None:
    """Malformed, negative, non-finite or huge hints give no hint or a capped one, never a crash."""
    assert parse_retry_after(headers) == expected


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("1s", 1.0),
        ("6m0s", 360.0),
        ("20ms", 0.02),
        ("14h29m11.04s", 14 * 3600 + 29 * 60 + 11.04),
        ("0", 0.0),
        ("2.5", 2.5),
        ("-1", None),
        ("", None),
        ("abc", None),
        ("1s junk", None),
        (None, None),
    ],
)
def test_go_durations(text: str | None, seconds: float | None) -> None:
    """x-ratelimit-reset-* durations parse like Go's, and garbage gives None."""
    got = parse_duration(text)
    if seconds is None:
        assert got is None
    else:
        assert got == pytest.approx(seconds)


def test_transport_errors() -> None:
    """Timeouts and connection errors from httpx2, httpx, openai and the stdlib are retried."""
    request = httpx2.Request("POST", URL)
    cases: list[tuple[BaseException, str]] = [
        (httpx2.ConnectError("refused", request=request), "connection"),
        (httpx2.ReadTimeout("slow", request=request), "timeout"),
        (httpx2.RemoteProtocolError("closed", request=request), "connection"),
        (httpx.ConnectError("refused"), "connection"),
        (httpx.ReadTimeout("slow"), "timeout"),
        (openai.APITimeoutError(request=request), "timeout"),
        (openai.APIConnectionError(request=request), "connection"),
        (TimeoutError(), "timeout"),
        (ConnectionRefusedError(), "connection"),
        (ConnectionResetError(), "connection"),
    ]
    for exc, kind in cases:
        verdict = classify_exception(exc)
        assert (verdict.retry, verdict.kind) == (True, kind), exc


def test_status_error_from_raise_for_status() -> None:
    """httpx2's own HTTPStatusError is classified by its response."""
    response = _response(503, {"retry-after": "1"})
    with pytest.raises(httpx2.HTTPStatusError) as info:
        response.raise_for_status()
    verdict = classify_exception(info.value)
    assert (verdict.retry, verdict.status, verdict.retry_after) == (True, 503, 1.0)


def test_unknown_exceptions_are_not_retried() -> None:
    """A bug in the caller's code (KeyError, ValueError) is not retried."""
    assert not classify_exception(KeyError("x")).retry
    assert not classify_exception(ValueError("x")).retry


def test_side_effects_retried_only_when_surely_not_run() -> None:
    """With idempotent=False: 429 and refused connections retry; timeouts and 5xx do not."""
    request = httpx2.Request("POST", URL)
    cause = httpx2.ConnectError("refused", request=request)
    wrapped = openai.APIConnectionError(request=request)
    wrapped.__cause__ = cause
    assert classify_exception(_sdk_error(429, {}, RATE_LIMITED), idempotent=False).retry
    assert classify_exception(cause, idempotent=False).retry
    assert classify_exception(wrapped, idempotent=False).retry
    assert not classify_exception(httpx2.ReadTimeout("x", request=request), idempotent=False).retry
    assert not classify_exception(openai.APITimeoutError(request=request), idempotent=False).retry
    assert not classify_exception(_sdk_error(502, {}, None), idempotent=False).retry
    assert not classify_exception(
        _sdk_error(500, {"x-should-retry": "true"}), idempotent=False
    ).retry
