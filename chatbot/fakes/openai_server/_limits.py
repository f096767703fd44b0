"""The fake's own limits: the enforcing buckets, admission, and the 401 and 429 answers.

Owns :class:`FakeOpenAI` (the configuration in force, one bucket per key or for all keys
and one per model on each, the live counters, the record served by ``/admin/record``) and
the request plumbing every limited endpoint goes through (:func:`authed_body`,
:func:`bad_request`, :func:`held`). The configuration is ``_config``'s, the record's
counters and JSON ``_record``'s. Called by ``_chat``, ``_responses`` and ``_app``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections import Counter, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from ._config import FakeOpenAIConfig, go_duration, mask_key, runtime_changes
from ._record import Admission, Record, record_json
from ._wire import HeldJSONResponse, HeldStreamingResponse, error

__all__ = ["Bucket", "FakeOpenAI", "authed_body", "bad_request", "held", "json_body"]


_RATE_LIMITS_URL = "https://platform.openai.com/account/rate-limits"
_KEYS_URL = "https://platform.openai.com/account/api-keys"
_ERRORS_URL = "https://platform.openai.com/docs/guides/error-codes/api-errors"


# --------------------------------------------------------------------------- buckets


class Bucket:
    """The enforcing state of one set of limits: all keys, one key, or one model of either."""

    def __init__(self, kind: str) -> None:
        self.kind = kind  # "global", "key" or "model": what a rejection by it is recorded as
        self.in_flight = 0
        self.requests: deque[float] = deque()
        self.tokens: deque[Admission] = deque()
        self.token_sum = 0
        self.admitted = 0

    def prune(self, now: float, window: float) -> None:
        edge = now - window
        while self.requests and self.requests[0] <= edge:
            self.requests.popleft()
        while self.tokens and self.tokens[0].t <= edge:
            gone = self.tokens.popleft()
            gone.live_in.discard(self)
            self.token_sum -= gone.weight

    def clear_windows(self) -> None:
        for adm in self.tokens:
            adm.live_in.discard(self)
        self.requests.clear()
        self.tokens.clear()
        self.token_sum = 0
        self.admitted = 0


@dataclass(frozen=True)
class _Limits:
    """The limits a bucket enforces on the request at hand (``None``: no such limit)."""

    rpm: int | None = None
    tpm: int | None = None
    max_in_flight: int | None = None
    quota: int | None = None


#: A request's buckets with their limits: its key's (or the global) one, then its model's.
_Limited = tuple[tuple[Bucket, _Limits], tuple[Bucket, _Limits]]


@dataclass(frozen=True)
class _Refusal:
    reason: str
    type_: str
    code: str
    message: str
    wait: float | None = None


# Each check: (bucket, its limits, tokens charged, model, now, config) -> a refusal or None.
_Check = Callable[[Bucket, _Limits, int, str, float, FakeOpenAIConfig], _Refusal | None]


def _over_quota(
    b: Bucket, lim: _Limits, charge: int, model: str, now: float, cfg: FakeOpenAIConfig
) -> _Refusal | None:
    if lim.quota is None or b.admitted < lim.quota:
        return None
    message = (
        "You exceeded your current quota, please check your plan and billing details. "
        f"For more information on this error, read the docs: {_ERRORS_URL}."
    )
    return _Refusal("insufficient_quota", "insufficient_quota", "insufficient_quota", message)


def _too_large(
    b: Bucket, lim: _Limits, charge: int, model: str, now: float, cfg: FakeOpenAIConfig
) -> _Refusal | None:
    if lim.tpm is None or charge <= lim.tpm:
        return None
    message = (
        f"Request too large for {model} on tokens per min (TPM): Limit {lim.tpm}, "
        f"Requested {charge}. The input or output tokens must be reduced in order to "
        f"run successfully. Visit {_RATE_LIMITS_URL} to learn more."
    )
    return _Refusal("request_too_large", "tokens", "rate_limit_exceeded", message)


def _too_many_in_flight(
    b: Bucket, lim: _Limits, charge: int, model: str, now: float, cfg: FakeOpenAIConfig
) -> _Refusal | None:
    if lim.max_in_flight is None or b.in_flight < lim.max_in_flight:
        return None
    wait = cfg.concurrency_retry_after
    message = (
        f"Rate limit reached for {model} in organization {cfg.organization} on concurrent "
        f"requests: Limit {lim.max_in_flight}, In flight {b.in_flight}. "
        f"Please try again in {go_duration(wait)}."
    )
    return _Refusal("concurrency", "requests", "rate_limit_exceeded", message, wait)


def _over_rpm(
    b: Bucket, lim: _Limits, charge: int, model: str, now: float, cfg: FakeOpenAIConfig
) -> _Refusal | None:
    used = len(b.requests)
    if lim.rpm is None or used < lim.rpm:
        return None
    window = cfg.window_seconds
    wait = b.requests[used - lim.rpm] + window - now if lim.rpm else window
    message = (
        f"Rate limit reached for {model} in organization {cfg.organization} on requests per "
        f"min (RPM): Limit {lim.rpm}, Used {used}, Requested 1. "
        f"Please try again in {go_duration(wait)}. Visit {_RATE_LIMITS_URL} to learn more."
    )
    return _Refusal("requests", "requests", "rate_limit_exceeded", message, wait)


def _over_tpm(
    b: Bucket, lim: _Limits, charge: int, model: str, now: float, cfg: FakeOpenAIConfig
) -> _Refusal | None:
    if lim.tpm is None or b.token_sum + charge <= lim.tpm:
        return None
    window = cfg.window_seconds
    remaining = b.token_sum
    wait = window
    for adm in b.tokens:
        remaining -= adm.weight
        if remaining + charge <= lim.tpm:
            wait = adm.t + window - now
            break
    message = (
        f"Rate limit reached for {model} in organization {cfg.organization} on tokens per min "
        f"(TPM): Limit {lim.tpm}, Used {b.token_sum}, Requested {charge}. "
        f"Please try again in {go_duration(wait)}. Visit {_RATE_LIMITS_URL} to learn more."
    )
    return _Refusal("tokens", "tokens", "rate_limit_exceeded", message, wait)


#: In the order a refusal's reason is chosen; each check asks every bucket of the request.
_CHECKS: tuple[_Check, ...] = (_over_quota, _too_large, _too_many_in_flight, _over_rpm, _over_tpm)


# --------------------------------------------------------------------------- state


class FakeOpenAI:
    """The fake's state: configuration, enforcing buckets, live counters and the record."""

    def __init__(self, config: FakeOpenAIConfig) -> None:
        self.config = config
        self._buckets: dict[tuple[str, str | None], Bucket] = {}
        self._in_flight = 0
        self._key_in_flight: Counter[str] = Counter()
        self._epoch = 0
        self.record = Record(0, 0, {})

    # ------------------------------------------------------------------ admin

    def reset(self) -> None:
        """Forget the record and the windows; requests still in flight stay in flight."""
        self._epoch += 1
        for bucket in self._buckets.values():
            bucket.clear_windows()
        self.record = Record(self._epoch, self._in_flight, self._key_in_flight)

    def reconfigure(self, changes: Mapping[str, Any]) -> FakeOpenAIConfig:
        """Apply a ``POST /admin/config`` body; the next request is judged by the new limits.

        Raises ValueError (naming the field) for a field that cannot change or a bad value.
        """
        self.config = dataclasses.replace(self.config, **runtime_changes(changes))
        return self.config

    def snapshot(self, *, detail: bool = True) -> dict[str, Any]:
        """The record as JSON; ``detail=False`` leaves out the per-request lists.

        Times are ``time.monotonic()`` seconds (system-wide on Linux, so comparable with
        other processes' monotonic clocks on the same host)::

            {"clock": "time.monotonic", "started_at", "now", "window_seconds",
             "limits": {"scope", "max_in_flight", "rpm", "tpm", "quota",
                        "model_limits", "key_limits"},  # key_limits' keys masked
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
             # every model a limited request named (the body's "model", else the default),
             # whether or not it has model_limits; a rejection counts for its request's
             # key and model whichever bucket refused it:
             "by_model": {model: {"admitted", "max_requests_in_window",
                                  "max_tokens_in_window", "rejected": {...}}},
             "by_key_model": {"<masked key>|<model>": {same fields as by_model}},
             # with detail:
             "arrivals": [t, ...],      # admitted arrival times, ascending
             "admissions": [{"t", "done", "key", "endpoint", "model", "charged", "tokens"}],
             "rejections": [{"t", "reason", "key", "endpoint", "model",
                             "bucket"}]}  # bucket: "global", "key" or "model", which refused
        """
        return record_json(
            self.record, self.config, self._in_flight, self._key_in_flight, detail=detail
        )

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

    def _bucket(self, owner: str, model: str | None) -> Bucket:
        bucket = self._buckets.get((owner, model))
        if bucket is None:
            kind = self.config.scope if model is None else "model"
            bucket = self._buckets[owner, model] = Bucket(kind)
        return bucket

    def _limited(self, key: str, model: str) -> _Limited:
        """The buckets a request of ``key`` for ``model`` must fit, with their limits now.

        Every model has its bucket (under each key with scope "key") whether or not it has
        ``model_limits``, so that limits set at runtime count what came before them.
        """
        cfg = self.config
        owner: str = "*"
        own: Mapping[str, int | None] = {}
        if cfg.scope == "key":
            owner, own = key, cfg.key_limits.get(key, {})
        main = _Limits(
            rpm=own.get("rpm", cfg.rpm),
            tpm=own.get("tpm", cfg.tpm),
            max_in_flight=own.get("max_in_flight", cfg.max_in_flight),
            quota=cfg.quota,
        )
        per_model = cfg.model_limits.get(model, {})
        model_limits = _Limits(rpm=per_model.get("rpm"), tpm=per_model.get("tpm"))
        return (self._bucket(owner, None), main), (self._bucket(owner, model), model_limits)

    def limit_headers(self, limited: _Limited, now: float) -> dict[str, str]:
        """``x-ratelimit-*`` for a request's window limits (none for absent limits).

        Like the real API's, they describe the request's model: its ``model_limits`` bucket
        for the requests (tokens) headers when the model has an rpm (tpm) limit, else its
        key's (or the global) bucket.
        """
        window = self.config.window_seconds
        (main, main_limits), (per_model, model_limits) = limited
        headers: dict[str, str] = {}
        bucket, rpm = (main, main_limits.rpm)
        if model_limits.rpm is not None:
            bucket, rpm = (per_model, model_limits.rpm)
        if rpm is not None:
            newest = bucket.requests[-1] if bucket.requests else None
            headers["x-ratelimit-limit-requests"] = str(rpm)
            headers["x-ratelimit-remaining-requests"] = str(max(0, rpm - len(bucket.requests)))
            headers["x-ratelimit-reset-requests"] = go_duration(
                0.0 if newest is None else newest + window - now
            )
        bucket, tpm = (main, main_limits.tpm)
        if model_limits.tpm is not None:
            bucket, tpm = (per_model, model_limits.tpm)
        if tpm is not None:
            last = bucket.tokens[-1].t if bucket.tokens else None
            headers["x-ratelimit-limit-tokens"] = str(tpm)
            headers["x-ratelimit-remaining-tokens"] = str(max(0, tpm - bucket.token_sum))
            headers["x-ratelimit-reset-tokens"] = go_duration(
                0.0 if last is None else last + window - now
            )
        return headers

    def admit(
        self, key: str, endpoint: str, model: str, charge: int
    ) -> tuple[Admission, dict[str, str]] | JSONResponse:
        """Admit one request (every limit of every bucket it falls in, all or nothing) or
        answer its 429."""
        now = time.monotonic()
        label = mask_key(key)
        limited = self._limited(key, model)
        for bucket, _ in limited:
            bucket.prune(now, self.config.window_seconds)
        refused = self._refusal(limited, model, now, charge)
        if refused is None:
            return self._admitted(limited, label, endpoint, model, now, charge)
        bucket, why = refused
        self.record.refused(now, why.reason, label, endpoint, model, bucket.kind)
        headers = self.limit_headers(limited, now)
        if why.wait is not None:
            wait_ms = max(1, math.ceil(why.wait * 1000))
            headers["retry-after-ms"] = str(wait_ms)
            headers["retry-after"] = str(max(1, math.ceil(wait_ms / 1000)))
        return error(429, why.message, why.type_, why.code, headers=headers)

    def _refusal(
        self, limited: _Limited, model: str, now: float, charge: int
    ) -> tuple[Bucket, _Refusal] | None:
        for check in _CHECKS:
            for bucket, limits in limited:
                why = check(bucket, limits, charge, model, now, self.config)
                if why is not None:
                    return bucket, why
        return None

    def _admitted(
        self, limited: _Limited, label: str, endpoint: str, model: str, now: float, charge: int
    ) -> tuple[Admission, dict[str, str]]:
        buckets = tuple(bucket for bucket, _ in limited)
        adm = Admission(label, endpoint, model, now, charge, charge, buckets, self._epoch)
        for bucket in buckets:
            bucket.in_flight += 1
            bucket.admitted += 1
            bucket.requests.append(now)
            bucket.tokens.append(adm)
            bucket.token_sum += charge
            adm.live_in.add(bucket)
        self._in_flight += 1
        self._key_in_flight[label] += 1
        self.record.admitted(adm, self._in_flight, self._key_in_flight[label])
        return adm, self.limit_headers(limited, now)

    def finish(self, adm: Admission, tokens: int) -> None:
        """The response has been sent (or abandoned): free its slot, correct its tokens."""
        if adm.done_at is not None:
            return
        adm.done_at = time.monotonic()
        for bucket in adm.buckets:
            bucket.in_flight -= 1
            if bucket in adm.live_in:
                bucket.token_sum += tokens - adm.weight
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
    adm: Admission,
    tokens: int,
    response: HeldJSONResponse | HeldStreamingResponse,
) -> Response:
    response.on_done = lambda: fake.finish(adm, tokens)
    return response
