"""The fake's own limits and its referee record: configuration, per-key state, admission.

Owns :class:`FakeOpenAIConfig`, :class:`FakeOpenAI` (the enforcing buckets, the live
counters, the record served by ``/admin/record``), the 401 and 429 answers and the request
plumbing every limited endpoint goes through (:func:`authed_body`, :func:`bad_request`,
:func:`held`). Called by ``_chat``, ``_responses`` and ``_app``; the package re-exports its
public names.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections import Counter, deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from .._common import max_in_window
from ._wire import HeldJSONResponse, HeldStreamingResponse, error

__all__ = [
    "DEFAULT_API_KEY",
    "DEFAULT_MODEL",
    "LIMITED_ENDPOINTS",
    "REJECTION_REASONS",
    "FakeOpenAI",
    "FakeOpenAIConfig",
    "authed_body",
    "bad_request",
    "go_duration",
    "held",
    "json_body",
    "mask_key",
]


DEFAULT_API_KEY = "sk-fake-openai-key"
DEFAULT_MODEL = "gpt-4o-mini"


LIMITED_ENDPOINTS = ("/v1/chat/completions", "/v1/responses", "/v1/embeddings")
REJECTION_REASONS = (
    "concurrency",
    "requests",
    "tokens",
    "request_too_large",
    "insufficient_quota",
)
_RATE_LIMITS_URL = "https://platform.openai.com/account/rate-limits"
_KEYS_URL = "https://platform.openai.com/account/api-keys"
_ERRORS_URL = "https://platform.openai.com/docs/guides/error-codes/api-errors"
_INT_FIELDS = frozenset({"max_in_flight", "rpm", "tpm", "quota", "stream_chunk_chars"})
_RUNTIME_FIELDS = frozenset(
    {
        "api_keys",
        "max_in_flight",
        "rpm",
        "tpm",
        "window_seconds",
        "quota",
        "latency",
        "chunk_latency",
        "concurrency_retry_after",
        "model",
        "stream_chunk_chars",
    }
)


@dataclass(frozen=True)
class FakeOpenAIConfig:
    """What the fake accepts and enforces. ``None`` means "no such limit"."""

    #: Accepted bearer keys; empty accepts any non-empty key (a missing key is still a 401).
    api_keys: tuple[str, ...] = (DEFAULT_API_KEY,)
    #: Requests being processed at once (a stream counts until its last chunk is sent).
    max_in_flight: int | None = None
    #: Requests admitted per rolling window of ``window_seconds``.
    rpm: int | None = None
    #: Tokens admitted per rolling window (charged at arrival, corrected on completion).
    tpm: int | None = None
    #: Length of the rolling windows of ``rpm`` and ``tpm``, in seconds.
    window_seconds: float = 60.0
    #: Total requests ever admitted before every request answers 429 ``insufficient_quota``.
    quota: int | None = None
    #: Seconds of processing per request (before the answer, or before a stream's first chunk).
    latency: float = 0.0
    #: Seconds between two streamed chunks.
    chunk_latency: float = 0.0
    #: ``"global"``: one set of limits for all keys; ``"key"``: one set per API key.
    scope: Literal["global", "key"] = "global"
    #: Model named in answers when a request names none.
    model: str = DEFAULT_MODEL
    #: Extra words that make a user message call a tool: tool name -> words.
    tool_keywords: Mapping[str, Sequence[str]] = field(default_factory=dict)
    #: Characters of reply text per streamed chunk.
    stream_chunk_chars: int = 8
    #: ``retry-after`` of a 429 for too many requests in flight (nothing says when one ends).
    concurrency_retry_after: float = 1.0
    #: Dimensions of an embedding when the request names none.
    embedding_dimensions: int = 16
    organization: str = "org-fake"

    def __post_init__(self) -> None:
        if self.window_seconds <= 0:
            raise ValueError("window_seconds must be positive")
        if self.scope not in ("global", "key"):
            raise ValueError("scope must be 'global' or 'key'")
        for name in ("max_in_flight", "rpm", "tpm", "quota"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"{name} must be >= 0 or None")
        if self.latency < 0 or self.chunk_latency < 0 or self.concurrency_retry_after < 0:
            raise ValueError("latencies must be >= 0")
        if self.stream_chunk_chars < 1 or self.embedding_dimensions < 1:
            raise ValueError("stream_chunk_chars and embedding_dimensions must be >= 1")

    def to_json(self) -> dict[str, Any]:
        """The configuration as JSON, keys masked."""
        data = dataclasses.asdict(self)
        data["api_keys"] = [mask_key(k) for k in self.api_keys]
        data["tool_keywords"] = {k: list(v) for k, v in self.tool_keywords.items()}
        return data


def mask_key(key: str) -> str:
    """A key as the real API shows it in errors: a few characters at each end, never all."""
    if len(key) <= 12:
        return "*" * len(key)
    return key[:4] + "*" * (len(key) - 8) + key[-4:]


def go_duration(seconds: float) -> str:
    """A duration as Go prints it (``1s``, ``6m0s``, ``20ms``, ``14h29m11.04s``), ms precision.

    Rounded up, so a wait is never understated.
    """
    if seconds <= 0:
        return "0s"
    ms = max(1, math.ceil(seconds * 1000 - 1e-6))
    if ms < 1000:
        return f"{ms}ms"
    hours, rest = divmod(ms, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    secs = f"{rest / 1000:.3f}".rstrip("0").rstrip(".")
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"


# --------------------------------------------------------------------------- state


@dataclass(eq=False)
class _Admission:
    """One admitted request, as the referee saw it."""

    key: str  # masked
    endpoint: str
    t: float
    charged: int
    weight: int  # tokens it counts for: the charge, then its real usage once done
    bucket: _Bucket
    epoch: int
    done_at: float | None = None
    live: bool = True  # still inside its bucket's token window


class _Bucket:
    """The enforcing state of one set of limits (all keys, or one key)."""

    def __init__(self) -> None:
        self.in_flight = 0
        self.requests: deque[float] = deque()
        self.tokens: deque[_Admission] = deque()
        self.token_sum = 0
        self.admitted = 0

    def prune(self, now: float, window: float) -> None:
        edge = now - window
        while self.requests and self.requests[0] <= edge:
            self.requests.popleft()
        while self.tokens and self.tokens[0].t <= edge:
            gone = self.tokens.popleft()
            gone.live = False
            self.token_sum -= gone.weight

    def clear_windows(self) -> None:
        for adm in self.tokens:
            adm.live = False
        self.requests.clear()
        self.tokens.clear()
        self.token_sum = 0
        self.admitted = 0


@dataclass
class _KeyStats:
    admitted: int = 0
    completed: int = 0
    max_in_flight: int = 0
    unauthorized: int = 0
    rejected: Counter[str] = field(default_factory=Counter)


class _Record:
    def __init__(self, epoch: int, in_flight: int, key_in_flight: Mapping[str, int]) -> None:
        self.epoch = epoch
        self.started_at = time.monotonic()
        self.requests_total = 0
        self.completed = 0
        self.unauthorized = 0
        self.bad_requests = 0
        self.max_in_flight = in_flight
        self.admissions: list[_Admission] = []
        self.rejections: list[dict[str, Any]] = []
        self.rejected: Counter[str] = Counter()
        self.by_endpoint: Counter[str] = Counter()
        self.by_key: dict[str, _KeyStats] = {
            k: _KeyStats(max_in_flight=n) for k, n in key_in_flight.items() if n
        }

    def key(self, label: str) -> _KeyStats:
        return self.by_key.setdefault(label, _KeyStats())


class FakeOpenAI:
    """The fake's state: configuration, enforcing buckets, live counters and the record."""

    def __init__(self, config: FakeOpenAIConfig) -> None:
        self.config = config
        self._buckets: dict[str, _Bucket] = {}
        self._in_flight = 0
        self._key_in_flight: Counter[str] = Counter()
        self._epoch = 0
        self.record = _Record(0, 0, {})

    # ------------------------------------------------------------------ admin

    def reset(self) -> None:
        """Forget the record and the windows; requests still in flight stay in flight."""
        self._epoch += 1
        for bucket in self._buckets.values():
            bucket.clear_windows()
        self.record = _Record(self._epoch, self._in_flight, self._key_in_flight)

    def reconfigure(self, changes: Mapping[str, Any]) -> FakeOpenAIConfig:
        unknown = set(changes) - _RUNTIME_FIELDS
        if unknown:
            raise ValueError(f"cannot change {sorted(unknown)} at runtime")
        values = dict(changes)
        for name, value in values.items():
            if name == "api_keys":
                if not isinstance(value, list) or not all(isinstance(k, str) for k in value):
                    raise ValueError("api_keys must be a list of strings")
                values[name] = tuple(value)
            elif name == "model":
                if not isinstance(value, str) or not value:
                    raise ValueError("model must be a non-empty string")
            elif name in _INT_FIELDS:
                if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                    raise ValueError(f"{name} must be an integer or null")
            elif isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"{name} must be a number")
        self.config = dataclasses.replace(self.config, **values)
        return self.config

    def snapshot(self, *, detail: bool = True) -> dict[str, Any]:
        """The record as JSON; ``detail=False`` leaves out the per-request lists.

        Times are ``time.monotonic()`` seconds (system-wide on Linux, so comparable with
        other processes' monotonic clocks on the same host)::

            {"clock": "time.monotonic", "started_at", "now", "window_seconds",
             "limits": {"scope", "max_in_flight", "rpm", "tpm", "quota"},
             "requests_total",          # every /v1 request, refused ones included
             "admitted", "completed", "in_flight", "max_in_flight",
             "max_requests_in_window",  # over every rolling window of window_seconds
             "max_tokens_in_window",    # same, each request at its corrected usage
             "max_charged_tokens_in_window", "tokens_charged", "tokens_used",
             "rejected": {"concurrency", "requests", "tokens", "request_too_large",
                          "insufficient_quota"},
             "rejected_total", "unauthorized", "bad_requests",
             "by_endpoint": {path: admitted},
             "by_key": {masked key: {"admitted", "completed", "in_flight", "max_in_flight",
                                     "max_requests_in_window", "max_tokens_in_window",
                                     "rejected": {...}, "unauthorized"}},
             # with detail:
             "arrivals": [t, ...],      # admitted arrival times, ascending
             "admissions": [{"t", "done", "key", "endpoint", "charged", "tokens"}],
             "rejections": [{"t", "reason", "key", "endpoint"}]}
        """
        rec = self.record
        window = self.config.window_seconds
        now = time.monotonic()
        admissions = rec.admissions
        times = [a.t for a in admissions]
        used = sum(a.weight for a in admissions if a.done_at is not None)
        by_key: dict[str, Any] = {}
        for label, stats in rec.by_key.items():
            mine = [a for a in admissions if a.key == label]
            by_key[label] = {
                "admitted": stats.admitted,
                "completed": stats.completed,
                "in_flight": self._key_in_flight.get(label, 0),
                "max_in_flight": stats.max_in_flight,
                "max_requests_in_window": max_in_window([a.t for a in mine], window),
                "max_tokens_in_window": max_in_window(
                    [a.t for a in mine], window, [a.weight for a in mine]
                ),
                "rejected": {r: stats.rejected.get(r, 0) for r in REJECTION_REASONS},
                "unauthorized": stats.unauthorized,
            }
        data: dict[str, Any] = {
            "clock": "time.monotonic",
            "started_at": rec.started_at,
            "now": now,
            "window_seconds": window,
            "limits": {
                "scope": self.config.scope,
                "max_in_flight": self.config.max_in_flight,
                "rpm": self.config.rpm,
                "tpm": self.config.tpm,
                "quota": self.config.quota,
            },
            "requests_total": rec.requests_total,
            "admitted": len(admissions),
            "completed": rec.completed,
            "in_flight": self._in_flight,
            "max_in_flight": rec.max_in_flight,
            "max_requests_in_window": max_in_window(times, window),
            "max_tokens_in_window": max_in_window(times, window, [a.weight for a in admissions]),
            "max_charged_tokens_in_window": max_in_window(
                times, window, [a.charged for a in admissions]
            ),
            "tokens_charged": sum(a.charged for a in admissions),
            "tokens_used": used,
            "rejected": {r: rec.rejected.get(r, 0) for r in REJECTION_REASONS},
            "rejected_total": sum(rec.rejected.values()),
            "unauthorized": rec.unauthorized,
            "bad_requests": rec.bad_requests,
            "by_endpoint": {e: rec.by_endpoint.get(e, 0) for e in LIMITED_ENDPOINTS},
            "by_key": by_key,
        }
        if detail:
            data["arrivals"] = times
            data["admissions"] = [
                {
                    "t": a.t,
                    "done": a.done_at,
                    "key": a.key,
                    "endpoint": a.endpoint,
                    "charged": a.charged,
                    "tokens": a.weight,
                }
                for a in admissions
            ]
            data["rejections"] = list(rec.rejections)
        return data

    # ------------------------------------------------------------------ auth

    def authenticate(self, request: Request) -> str | JSONResponse:
        """The caller's key, or the 401 the real API answers."""
        self.record.requests_total += 1
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            message = (
                "You didn't provide an API key. You need to provide your API key in an "
                "Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY). "
                f"You can obtain an API key from {_KEYS_URL}."
            )
        elif self.config.api_keys and token not in self.config.api_keys:
            message = (
                f"Incorrect API key provided: {mask_key(token)}. "
                f"You can find your API key at {_KEYS_URL}."
            )
        else:
            return token
        self.record.unauthorized += 1
        if token:
            self.record.key(mask_key(token)).unauthorized += 1
        return error(401, message, "invalid_request_error", "invalid_api_key")

    # ------------------------------------------------------------------ limits

    def _bucket(self, key: str) -> _Bucket:
        name = key if self.config.scope == "key" else "*"
        bucket = self._buckets.get(name)
        if bucket is None:
            bucket = self._buckets[name] = _Bucket()
        return bucket

    def limit_headers(self, bucket: _Bucket, now: float) -> dict[str, str]:
        """``x-ratelimit-*`` for the configured window limits (none for absent limits)."""
        cfg = self.config
        headers: dict[str, str] = {}
        if cfg.rpm is not None:
            newest = bucket.requests[-1] if bucket.requests else None
            headers["x-ratelimit-limit-requests"] = str(cfg.rpm)
            headers["x-ratelimit-remaining-requests"] = str(max(0, cfg.rpm - len(bucket.requests)))
            headers["x-ratelimit-reset-requests"] = go_duration(
                0.0 if newest is None else newest + cfg.window_seconds - now
            )
        if cfg.tpm is not None:
            last = bucket.tokens[-1].t if bucket.tokens else None
            headers["x-ratelimit-limit-tokens"] = str(cfg.tpm)
            headers["x-ratelimit-remaining-tokens"] = str(max(0, cfg.tpm - bucket.token_sum))
            headers["x-ratelimit-reset-tokens"] = go_duration(
                0.0 if last is None else last + cfg.window_seconds - now
            )
        return headers

    def admit(
        self, key: str, endpoint: str, model: str, charge: int
    ) -> tuple[_Admission, dict[str, str]] | JSONResponse:
        """Admit one request (all limits at once, all or nothing) or answer its 429."""
        cfg = self.config
        now = time.monotonic()
        label = mask_key(key)
        bucket = self._bucket(key)
        window = cfg.window_seconds
        bucket.prune(now, window)
        org = cfg.organization
        wait: float | None = None
        if cfg.quota is not None and bucket.admitted >= cfg.quota:
            reason, type_, code = "insufficient_quota", "insufficient_quota", "insufficient_quota"
            message = (
                "You exceeded your current quota, please check your plan and billing details. "
                f"For more information on this error, read the docs: {_ERRORS_URL}."
            )
        elif cfg.tpm is not None and charge > cfg.tpm:
            reason, type_, code = "request_too_large", "tokens", "rate_limit_exceeded"
            message = (
                f"Request too large for {model} on tokens per min (TPM): Limit {cfg.tpm}, "
                f"Requested {charge}. The input or output tokens must be reduced in order to "
                f"run successfully. Visit {_RATE_LIMITS_URL} to learn more."
            )
        elif cfg.max_in_flight is not None and bucket.in_flight >= cfg.max_in_flight:
            reason, type_, code = "concurrency", "requests", "rate_limit_exceeded"
            wait = cfg.concurrency_retry_after
            message = (
                f"Rate limit reached for {model} in organization {org} on concurrent requests: "
                f"Limit {cfg.max_in_flight}, In flight {bucket.in_flight}. "
                f"Please try again in {go_duration(wait)}."
            )
        elif cfg.rpm is not None and len(bucket.requests) >= cfg.rpm:
            reason, type_, code = "requests", "requests", "rate_limit_exceeded"
            if cfg.rpm:
                wait = bucket.requests[len(bucket.requests) - cfg.rpm] + window - now
            else:
                wait = window
            message = (
                f"Rate limit reached for {model} in organization {org} on requests per min "
                f"(RPM): Limit {cfg.rpm}, Used {len(bucket.requests)}, Requested 1. "
                f"Please try again in {go_duration(wait)}. Visit {_RATE_LIMITS_URL} to learn more."
            )
        elif cfg.tpm is not None and bucket.token_sum + charge > cfg.tpm:
            reason, type_, code = "tokens", "tokens", "rate_limit_exceeded"
            remaining = bucket.token_sum
            wait = window
            for adm in bucket.tokens:
                remaining -= adm.weight
                if remaining + charge <= cfg.tpm:
                    wait = adm.t + window - now
                    break
            message = (
                f"Rate limit reached for {model} in organization {org} on tokens per min (TPM): "
                f"Limit {cfg.tpm}, Used {bucket.token_sum}, Requested {charge}. "
                f"Please try again in {go_duration(wait)}. Visit {_RATE_LIMITS_URL} to learn more."
            )
        else:
            return self._admitted(bucket, label, endpoint, now, charge)
        rec = self.record
        rec.rejected[reason] += 1
        rec.key(label).rejected[reason] += 1
        rec.rejections.append({"t": now, "reason": reason, "key": label, "endpoint": endpoint})
        headers = self.limit_headers(bucket, now)
        if wait is not None:
            wait_ms = max(1, math.ceil(wait * 1000))
            headers["retry-after-ms"] = str(wait_ms)
            headers["retry-after"] = str(max(1, math.ceil(wait_ms / 1000)))
        return error(429, message, type_, code, headers=headers)

    def _admitted(
        self, bucket: _Bucket, label: str, endpoint: str, now: float, charge: int
    ) -> tuple[_Admission, dict[str, str]]:
        adm = _Admission(label, endpoint, now, charge, charge, bucket, self._epoch)
        bucket.in_flight += 1
        bucket.admitted += 1
        bucket.requests.append(now)
        bucket.tokens.append(adm)
        bucket.token_sum += charge
        self._in_flight += 1
        self._key_in_flight[label] += 1
        rec = self.record
        rec.admissions.append(adm)
        rec.by_endpoint[endpoint] += 1
        rec.max_in_flight = max(rec.max_in_flight, self._in_flight)
        stats = rec.key(label)
        stats.admitted += 1
        stats.max_in_flight = max(stats.max_in_flight, self._key_in_flight[label])
        return adm, self.limit_headers(bucket, now)

    def finish(self, adm: _Admission, tokens: int) -> None:
        """The response has been sent (or abandoned): free its slot, correct its tokens."""
        if adm.done_at is not None:
            return
        adm.done_at = time.monotonic()
        adm.bucket.in_flight -= 1
        if adm.live:
            adm.bucket.token_sum += tokens - adm.weight
        adm.weight = tokens
        self._in_flight -= 1
        self._key_in_flight[adm.key] -= 1
        if adm.epoch == self.record.epoch:
            self.record.completed += 1
            self.record.key(adm.key).completed += 1


# --------------------------------------------------------------------------- requests


def bad_request(fake: FakeOpenAI, message: str, param: str | None = None) -> JSONResponse:
    fake.record.bad_requests += 1
    return error(400, message, "invalid_request_error", None, param)


async def json_body(fake: FakeOpenAI, request: Request) -> dict[str, Any] | JSONResponse:
    try:
        body = json.loads(await request.body() or b"null")
    except ValueError:
        return bad_request(fake, "We could not parse the JSON body of your request.")
    if not isinstance(body, dict):
        return bad_request(fake, "The request body must be a JSON object.")
    return body


async def authed_body(fake: FakeOpenAI, request: Request) -> tuple[str, dict[str, Any]] | Response:
    """The caller's key and JSON body, or the 401 / 400 that answers the request."""
    key = fake.authenticate(request)
    if not isinstance(key, str):
        return key
    body = await json_body(fake, request)
    if not isinstance(body, dict):
        return body
    return key, body


def held(
    fake: FakeOpenAI,
    adm: _Admission,
    tokens: int,
    response: HeldJSONResponse | HeldStreamingResponse,
) -> Response:
    response.on_done = lambda: fake.finish(adm, tokens)
    return response
