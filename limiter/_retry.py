"""Retry policy: what a failure means, whether to retry, and how long the provider asked to wait.

Pure logic, no I/O, no imports of the SDKs: exceptions are recognised by their class
names and attributes, so one policy serves the ``openai`` SDK's errors, ``httpx2`` and
``httpx`` status and transport errors, built-in timeouts and connection errors, and raw
HTTP responses (status, headers, JSON body) seen by the HTTP transport.

Retried: 429 ``rate_limit_exceeded``, 408, 409, 5xx (Anthropic's 529 ``overloaded_error``
as the kind ``"overloaded"``), timeouts, connection errors.
Never retried: 400, 401, 403, 404, 422, 429 ``insufficient_quota`` /
``credit_balance_exhausted`` (quota gone), 429 "request too large" (it can never pass).
``x-should-retry: true/false`` from the provider overrides. A call with side effects
(``idempotent=False``) is retried only when it surely never ran: 429, or a connection
that was never made.
"""

from __future__ import annotations

import email.utils
import json
import math
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = [
    "Verdict",
    "classify_exception",
    "classify_response",
    "parse_duration",
    "parse_retry_after",
]

#: A hint longer than this is not believed (garbage or a typo): it is capped.
MAX_HINT = 24 * 3600.0

_QUOTA_CODES = frozenset(
    {"insufficient_quota", "credit_balance_exhausted", "billing_hard_limit_reached"}
)
_RETRY = frozenset({408, 409})

_CONNECT_NAMES = frozenset(
    {"ConnectError", "ConnectTimeout", "ConnectionRefusedError", "ProxyError", "PoolTimeout"}
)
_TIMEOUT_NAMES = frozenset(
    {"TimeoutException", "ReadTimeout", "WriteTimeout", "APITimeoutError", "TimeoutError"}
)
_TRANSPORT_NAMES = frozenset(
    {
        "TransportError",
        "NetworkError",
        "ReadError",
        "WriteError",
        "RemoteProtocolError",
        "APIConnectionError",
        "ConnectionError",
        "ConnectionResetError",
        "BrokenPipeError",
    }
)


@dataclass(frozen=True, slots=True)
class Verdict:
    """What one failure means for the retry loop."""

    #: Try again (within the attempts and the time left)?
    retry: bool
    #: A short label: ``"rate_limited"``, ``"quota"``, ``"too_large"``, ``"server_error"``,
    #: ``"overloaded"`` (529), ``"timeout"``, ``"connection"``, ``"client_error"``,
    #: ``"conflict"``, ``"unknown"``.
    kind: str
    #: Seconds the provider asked us to wait (``retry-after-ms`` / ``retry-after``), if any.
    retry_after: float | None = None
    #: HTTP status, when the failure carried one.
    status: int | None = None
    #: The provider's error code from the JSON body (``"insufficient_quota"``, ...).
    code: str | None = None

    @property
    def pauses_api(self) -> bool:
        """Should every replica pause this API (a 429, or the quota gone)?"""
        return self.kind in ("rate_limited", "quota")


def _finite_hint(seconds: float) -> float | None:
    if not math.isfinite(seconds) or seconds < 0:
        return None
    return min(seconds, MAX_HINT)


def _header(headers: Any, name: str) -> str | None:
    """Header ``name`` (case-insensitive) from httpx-style Headers, a dict or pairs, or None."""
    if headers is None:
        return None
    value: Any = None
    try:
        value = headers.get(name)
        if value is None and isinstance(headers, Mapping):
            value = next((v for k, v in headers.items() if str(k).lower() == name), None)
    except Exception:  # a mapping that refuses .get: no hint
        return None
    if value is None:
        return None
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    return str(value).strip()


def parse_retry_after(headers: Any, now: Callable[[], float] = time.time) -> float | None:
    """Seconds to wait from ``retry-after-ms``, then ``retry-after`` (seconds or an HTTP date).

    Garbage, negative and non-finite values give ``None``; huge ones are capped at a day.
    """
    ms = _header(headers, "retry-after-ms")
    if ms:
        try:
            hint = _finite_hint(float(ms) / 1000)
        except ValueError:
            hint = None
        if hint is not None:
            return hint
    value = _header(headers, "retry-after")
    if not value:
        return None
    try:
        return _finite_hint(float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when is None or when.tzinfo is None:
        return None
    return _finite_hint(max(0.0, when.timestamp() - now()))


_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|us|µs|ns|h|m|s)")
_DURATION_UNIT = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}


def parse_duration(value: str | None) -> float | None:
    """A Go duration (``"1s"``, ``"6m0s"``, ``"20ms"``, ``"14h29m11.04s"``) in seconds, or None.

    Plain numbers are taken as seconds. Garbage, ``-1`` and negative values give ``None``.
    """
    if value is None:
        return None
    text = value.strip()
    if not text:
        return None
    try:
        return _finite_hint(float(text))
    except ValueError:
        pass
    pos, total = 0, 0.0
    for match in _DURATION_PART.finditer(text):
        if match.start() != pos:
            return None
        total += float(match.group(1)) * _DURATION_UNIT[match.group(2)]
        pos = match.end()
    if pos != len(text) or pos == 0:
        return None
    return _finite_hint(total)


def _error_fields(body: Any) -> tuple[str | None, str]:
    """(code, message) from an OpenAI-style JSON error body, in any of its shapes."""
    if isinstance(body, bytes | bytearray):
        body = body.decode("utf-8", "replace")
    if isinstance(body, str):
        try:
            body = json.loads(body)
        except (ValueError, RecursionError):  # not JSON, or nested too deep to decode
            return None, body[:500]
    if not isinstance(body, Mapping):
        return None, ""
    err = body.get("error", body)
    if not isinstance(err, Mapping):
        return None, str(err)[:500]
    code = err.get("code") or err.get("type")
    message = err.get("message") or ""
    return (str(code) if code is not None else None), str(message)


def classify_response(
    status: int, headers: Any = None, body: Any = None, *, idempotent: bool = True
) -> Verdict:
    """Classify an HTTP response by status, headers and (JSON) body."""
    hint = parse_retry_after(headers)
    code, message = _error_fields(body)
    if 200 <= status < 400:
        return Verdict(False, "ok", hint, status, code)
    if status == 429:
        if code in _QUOTA_CODES or (code is None and "quota" in message.lower()):
            return Verdict(False, "quota", hint, status, code)
        if "request too large" in message.lower():
            return Verdict(False, "too_large", hint, status, code)
        kind, retry = "rate_limited", True
    else:
        kind, retry = _status_kind(status), status in _RETRY or status >= 500
        if not idempotent:
            # A call with side effects may have run: only a 429 proves it did not.
            return Verdict(False, kind, hint, status, code)
    should = (_header(headers, "x-should-retry") or "").lower()
    if should in ("true", "false"):
        retry = should == "true"
    return Verdict(retry, kind, hint, status, code)


def _status_kind(status: int) -> str:
    if status == 529:  # Anthropic: the API is overloaded (not our rate); retried, no pause
        return "overloaded"
    if status >= 500:
        return "server_error"
    if status == 408:
        return "timeout"
    if status == 409:
        return "conflict"
    return "client_error"


def _names(exc: BaseException) -> set[str]:
    """Class names of ``exc`` and of the exceptions it was raised from (SDKs wrap them)."""
    names: set[str] = set()
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen and len(seen) < 8:
        seen.add(id(current))
        names.update(cls.__name__ for cls in type(current).__mro__)
        current = current.__cause__
    return names


def classify_exception(exc: BaseException, *, idempotent: bool = True) -> Verdict:
    """Classify an exception from an SDK, an HTTP client, or the standard library."""
    response = getattr(exc, "response", None)
    status = getattr(response, "status_code", None) or getattr(exc, "status_code", None)
    if isinstance(status, int) and not isinstance(status, bool):
        headers = getattr(response, "headers", None)
        body = getattr(exc, "body", None)
        if body is None and response is not None:
            try:
                body = response.content
            except Exception:  # a streamed body not read: classify without it
                body = None
        return classify_response(status, headers, body, idempotent=idempotent)
    names = _names(exc)
    if names & _CONNECT_NAMES:
        return Verdict(True, "connection")
    if names & _TIMEOUT_NAMES:
        return Verdict(idempotent, "timeout")
    if names & _TRANSPORT_NAMES:
        return Verdict(idempotent, "connection")
    return Verdict(False, "unknown")
