"""A fake Anthropic Messages API that stands in for the real one offline and referees the tests.

It answers ``POST /v1/messages`` in the real API's shapes (the real ``anthropic`` SDK parses
every answer): one JSON ``message``, or with ``"stream": true`` the server-sent events
``message_start``, ``content_block_start``, ``ping``, ``content_block_delta`` (one per piece
of text), ``content_block_stop``, ``message_delta`` (``usage.output_tokens``, cumulative)
and ``message_stop``. The model echoes the last user message (``"You said: ..."``), cut at
``max_tokens`` (``stop_reason: "max_tokens"``). Auth is the ``x-api-key`` header, or the
``Authorization: Bearer`` token that the ``anthropic`` SDK 2.x sends its ``api_key`` as (a
wrong or missing key is a 401 ``authentication_error``); ``anthropic-version`` is required
(400).

It enforces its own limits like the real API, globally or per API key: requests in flight,
requests per rolling window (``window_seconds``), input tokens and output tokens per rolling
window (``token_window_seconds``; both 60 by default). Exact sliding logs, all limits
checked at once, all or nothing: stricter than Anthropic's continuously refilling token
buckets (whatever a sliding window of N per minute admits, a bucket of N refilling N per
minute admits too), so a client that passes this referee passes the real API's limits.
A request is charged its input tokens when it arrives and ``max_tokens`` of output,
corrected to the output really produced once its response has been sent (as Anthropic
estimates output from ``max_tokens`` and adjusts at the end).
Every answer carries ``anthropic-ratelimit-{requests,input-tokens,output-tokens,tokens}-
{limit,remaining,reset}`` for the configured limits (remaining tokens rounded to the
nearest thousand, resets as RFC 3339 timestamps of when the limit is whole again,
``tokens-*`` being the more restrictive of input and output). Excess answers 429
``rate_limit_error`` with ``retry-after`` (whole seconds, rounded up). ``overload(n)``
(or ``POST /admin/overload``) makes the next ``n`` requests answer 529 ``overloaded_error``.

It is the referee: it imports nothing of ``limiter`` or of the rest of ``chatbot`` (only the
fake OpenAI's wire helpers and token count, shared through its package). With its own clock
(``time.monotonic``) it records every request (arrival, start of processing, end of the
last byte sent, tokens, status), the most requests ever in flight (a response is in flight
until its last byte has been sent), the most requests and tokens admitted in any rolling
window, the 429s by reason, the 529s and the 401s. ``GET /admin/record`` serves that
record, ``POST /admin/reset`` clears it, ``GET``/``POST /admin/config`` read and change the
limits at runtime. It listens on 127.0.0.1 only.

Run it::

    python -m chatbot.fakes.anthropic_server --port 8012 --max-in-flight 5 --rpm 50 \\
        --itpm 30000 --otpm 8000 --latency 0.2 --api-key sk-ant-fake
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import math
import signal
import sys
import time
import uuid
from collections import Counter, deque
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any, Literal

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from ._common import AnnouncingServer, max_in_window
from .openai_server import mask_key
from .openai_server._model import count_tokens, pieces
from .openai_server._wire import HeldJSONResponse, HeldStreamingResponse, sse

__all__ = [
    "DEFAULT_API_KEY",
    "DEFAULT_MODEL",
    "HOST",
    "REJECTION_REASONS",
    "FakeAnthropic",
    "FakeAnthropicConfig",
    "create_app",
    "input_tokens",
    "main",
    "rfc3339",
]

DEFAULT_API_KEY = "sk-ant-fake-anthropic-key"
DEFAULT_MODEL = "claude-sonnet-4-5"
HOST = "127.0.0.1"
REJECTION_REASONS = ("concurrency", "requests", "input_tokens", "output_tokens")
_LIMITS_DOCS = "https://docs.claude.com/en/api/rate-limits"
_SALES = "https://www.anthropic.com/contact-sales"
_INT_FIELDS = frozenset({"max_in_flight", "rpm", "itpm", "otpm", "stream_chunk_chars"})
_RUNTIME_FIELDS = frozenset(
    {
        "api_keys",
        "max_in_flight",
        "rpm",
        "itpm",
        "otpm",
        "window_seconds",
        "token_window_seconds",
        "latency",
        "chunk_latency",
        "concurrency_retry_after",
        "model",
        "stream_chunk_chars",
    }
)


@dataclass(frozen=True)
class FakeAnthropicConfig:
    """What the fake accepts and enforces. ``None`` means "no such limit"."""

    #: Accepted ``x-api-key`` values; empty accepts any non-empty key (none is still a 401).
    api_keys: tuple[str, ...] = (DEFAULT_API_KEY,)
    #: Requests being processed at once (a stream counts until its last event is sent).
    max_in_flight: int | None = None
    #: Requests admitted per rolling window of ``window_seconds``.
    rpm: int | None = None
    #: Input tokens admitted per rolling window of ``token_window_seconds``.
    itpm: int | None = None
    #: Output tokens per rolling window of ``token_window_seconds`` (``max_tokens`` charged
    #: at arrival, corrected to the real output when the answer has been sent).
    otpm: int | None = None
    #: Length of the requests window, in seconds.
    window_seconds: float = 60.0
    #: Length of the input and output token windows, in seconds.
    token_window_seconds: float = 60.0
    #: Seconds of processing per request (before the answer, or before a stream's first event).
    latency: float = 0.0
    #: Seconds between two streamed text deltas.
    chunk_latency: float = 0.0
    #: ``"global"``: one set of limits for all keys; ``"key"``: one set per API key.
    scope: Literal["global", "key"] = "global"
    #: Model named in answers when a request names none (a request must name one).
    model: str = DEFAULT_MODEL
    #: Characters of reply text per streamed delta.
    stream_chunk_chars: int = 8
    #: ``retry-after`` of a 429 for too many requests in flight (nothing says when one ends).
    concurrency_retry_after: float = 1.0
    organization: str = "00000000-0000-4000-8000-0000000fa4e0"

    def __post_init__(self) -> None:
        if self.window_seconds <= 0 or self.token_window_seconds <= 0:
            raise ValueError("window_seconds and token_window_seconds must be positive")
        if self.scope not in ("global", "key"):
            raise ValueError("scope must be 'global' or 'key'")
        for name in ("max_in_flight", "rpm", "itpm", "otpm"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"{name} must be >= 0 or None")
        if self.latency < 0 or self.chunk_latency < 0 or self.concurrency_retry_after < 0:
            raise ValueError("latencies must be >= 0")
        if self.stream_chunk_chars < 1:
            raise ValueError("stream_chunk_chars must be >= 1")

    def to_json(self) -> dict[str, Any]:
        """The configuration as JSON, keys masked."""
        data = dataclasses.asdict(self)
        data["api_keys"] = [mask_key(k) for k in self.api_keys]
        return data


def rfc3339(epoch: float) -> str:
    """An epoch time as RFC 3339 UTC with milliseconds, rounded up (a reset never early)."""
    ms = math.ceil(epoch * 1000 - 1e-6)
    when = datetime.fromtimestamp(ms // 1000, tz=UTC)
    return f"{when:%Y-%m-%dT%H:%M:%S}.{ms % 1000:03d}Z"


def _round_thousand(n: int) -> int:
    """Anthropic rounds remaining tokens to the nearest thousand (half up)."""
    return (n + 500) // 1000 * 1000


def _block_text(block: Any) -> str:
    if isinstance(block, str):
        return block
    if not isinstance(block, dict):
        return json.dumps(block)
    kind = block.get("type")
    if kind == "text" and isinstance(block.get("text"), str):
        return str(block["text"])
    if kind == "tool_use":
        return f"{block.get('name', '')} {json.dumps(block.get('input'))}"
    if kind == "tool_result":
        return _content_text(block.get("content"))
    return json.dumps(block)  # images, documents: their JSON (an over-count)


def _content_text(content: Any) -> str:
    """The text of a message's content or of ``system``: a string or a list of blocks."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(_block_text(b) for b in content)
    return json.dumps(content)


def input_tokens(body: Mapping[str, Any]) -> int:
    """The input tokens the fake charges and reports: ~len/4 per message (+4 each), the
    system prompt, the tool definitions, and 3 to prime the reply."""
    total = 3 + len(_content_text(body.get("system"))) // 4
    for message in body.get("messages") or []:
        content = message.get("content") if isinstance(message, dict) else message
        total += 4 + len(_content_text(content)) // 4
    tools = body.get("tools")
    if tools:
        total += len(json.dumps(tools, separators=(",", ":"))) // 4
    return total


def _reply(body: Mapping[str, Any]) -> str:
    messages = body.get("messages") or []
    user = next(
        (
            _content_text(m.get("content"))
            for m in reversed(messages)
            if isinstance(m, dict) and m.get("role") == "user"
        ),
        "",
    )
    said = " ".join(user.split())[:200]
    return f"You said: {said}" if said else "Hello from the fake Anthropic API."


# --------------------------------------------------------------------------- state


@dataclass(eq=False)
class _Admission:
    """One admitted request, as the referee saw it."""

    entry: dict[str, Any]  # its line in the record's ``requests``
    key: str  # masked
    t: float  # admission (start of processing)
    input: int
    output: int  # output tokens it counts for: max_tokens, then the real output once done
    charged_output: int
    bucket: _Bucket
    epoch: int
    done_at: float | None = None
    live: bool = True  # still inside its bucket's output window


class _Bucket:
    """The enforcing state of one set of limits (all keys, or one key)."""

    def __init__(self) -> None:
        self.in_flight = 0
        self.requests: deque[float] = deque()
        self.inputs: deque[tuple[float, int]] = deque()
        self.input_sum = 0
        self.outputs: deque[_Admission] = deque()
        self.output_sum = 0

    def prune(self, now: float, window: float, token_window: float) -> None:
        edge = now - window
        while self.requests and self.requests[0] <= edge:
            self.requests.popleft()
        edge = now - token_window
        while self.inputs and self.inputs[0][0] <= edge:
            self.input_sum -= self.inputs.popleft()[1]
        while self.outputs and self.outputs[0].t <= edge:
            gone = self.outputs.popleft()
            gone.live = False
            self.output_sum -= gone.output

    def clear_windows(self) -> None:
        for adm in self.outputs:
            adm.live = False
        self.requests.clear()
        self.inputs.clear()
        self.outputs.clear()
        self.input_sum = self.output_sum = 0


@dataclass
class _KeyStats:
    admitted: int = 0
    completed: int = 0
    max_in_flight: int = 0
    unauthorized: int = 0
    overloaded: int = 0
    rejected: Counter[str] = field(default_factory=Counter)


class _Record:
    def __init__(self, epoch: int, in_flight: int, key_in_flight: Mapping[str, int]) -> None:
        self.epoch = epoch
        self.started_at = time.monotonic()
        self.requests: list[dict[str, Any]] = []
        self.admissions: list[_Admission] = []
        self.completed = 0
        self.unauthorized = 0
        self.overloaded = 0
        self.bad_requests = 0
        self.max_in_flight = in_flight
        self.rejected: Counter[str] = Counter()
        self.by_key: dict[str, _KeyStats] = {
            k: _KeyStats(max_in_flight=n) for k, n in key_in_flight.items() if n
        }

    def key(self, label: str) -> _KeyStats:
        return self.by_key.setdefault(label, _KeyStats())


def _error(
    status: int, type_: str, message: str, headers: Mapping[str, str] | None = None
) -> JSONResponse:
    request_id = f"req_{uuid.uuid4().hex[:24]}"
    body = {"type": "error", "error": {"type": type_, "message": message}, "request_id": request_id}
    return JSONResponse(
        body, status_code=status, headers={**(headers or {}), "request-id": request_id}
    )


class FakeAnthropic:
    """The fake's state: configuration, enforcing buckets, live counters and the record."""

    def __init__(self, config: FakeAnthropicConfig) -> None:
        self.config = config
        self._buckets: dict[str, _Bucket] = {}
        self._in_flight = 0
        self._key_in_flight: Counter[str] = Counter()
        self._epoch = 0
        self._overload = 0
        self._overload_retry_after: float | None = None
        self.record = _Record(0, 0, {})

    # ------------------------------------------------------------------ admin

    def overload(self, count: int, retry_after: float | None = None) -> None:
        """Answer the next ``count`` authenticated, valid requests 529 ``overloaded_error``
        (with ``retry-after`` when given, in seconds)."""
        if count < 0 or (retry_after is not None and not retry_after >= 0):
            raise ValueError("count and retry_after must be >= 0")
        self._overload = count
        self._overload_retry_after = retry_after

    def reset(self) -> None:
        """Forget the record and the windows; requests still in flight stay in flight."""
        self._epoch += 1
        for bucket in self._buckets.values():
            bucket.clear_windows()
        self.record = _Record(self._epoch, self._in_flight, self._key_in_flight)

    def reconfigure(self, changes: Mapping[str, Any]) -> FakeAnthropicConfig:
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
        other processes' monotonic clocks on the same host); windows are counted at each
        request's admission (its ``start``)::

            {"clock": "time.monotonic", "started_at", "now", "window_seconds",
             "token_window_seconds",
             "limits": {"scope", "max_in_flight", "rpm", "itpm", "otpm"},
             "requests_total",          # every /v1/messages request, refused ones included
             "admitted", "completed", "in_flight", "max_in_flight",
             "max_requests_in_window",  # over every rolling window of window_seconds
             "max_input_tokens_in_window", "max_output_tokens_in_window",  # token windows,
             "max_charged_output_tokens_in_window",  # output at its real count / max_tokens
             "input_tokens", "output_tokens",        # of the completed requests
             "rejected": {"concurrency", "requests", "input_tokens", "output_tokens"},
             "rejected_total", "overloaded", "unauthorized", "bad_requests",
             "by_key": {masked key: {"admitted", "completed", "in_flight", "max_in_flight",
                                     "max_requests_in_window", "rejected": {...},
                                     "overloaded", "unauthorized"}},
             # with detail:
             "arrivals": [t, ...],      # admitted requests' admission times, ascending
             "requests": [{"id", "arrival", "start", "end", "key", "status", "reason",
                           "stream", "input_tokens", "output_tokens", "max_tokens"}],
             "rejections": [{"t", "reason", "key"}]}

        In ``requests``, ``start`` is ``None`` for a request never admitted (then ``end`` is
        when its error was answered) and ``end`` is ``None`` while its answer is being sent.
        """
        rec = self.record
        cfg = self.config
        admissions = rec.admissions
        times = [a.t for a in admissions]
        token_window = cfg.token_window_seconds
        done = [a for a in admissions if a.done_at is not None]
        by_key: dict[str, Any] = {}
        for label, stats in rec.by_key.items():
            mine = [a.t for a in admissions if a.key == label]
            by_key[label] = {
                "admitted": stats.admitted,
                "completed": stats.completed,
                "in_flight": self._key_in_flight.get(label, 0),
                "max_in_flight": stats.max_in_flight,
                "max_requests_in_window": max_in_window(mine, cfg.window_seconds),
                "rejected": {r: stats.rejected.get(r, 0) for r in REJECTION_REASONS},
                "overloaded": stats.overloaded,
                "unauthorized": stats.unauthorized,
            }
        data: dict[str, Any] = {
            "clock": "time.monotonic",
            "started_at": rec.started_at,
            "now": time.monotonic(),
            "window_seconds": cfg.window_seconds,
            "token_window_seconds": token_window,
            "limits": {
                "scope": cfg.scope,
                "max_in_flight": cfg.max_in_flight,
                "rpm": cfg.rpm,
                "itpm": cfg.itpm,
                "otpm": cfg.otpm,
            },
            "requests_total": len(rec.requests),
            "admitted": len(admissions),
            "completed": rec.completed,
            "in_flight": self._in_flight,
            "max_in_flight": rec.max_in_flight,
            "max_requests_in_window": max_in_window(times, cfg.window_seconds),
            "max_input_tokens_in_window": max_in_window(
                times, token_window, [a.input for a in admissions]
            ),
            "max_output_tokens_in_window": max_in_window(
                times, token_window, [a.output for a in admissions]
            ),
            "max_charged_output_tokens_in_window": max_in_window(
                times, token_window, [a.charged_output for a in admissions]
            ),
            "input_tokens": sum(a.input for a in done),
            "output_tokens": sum(a.output for a in done),
            "rejected": {r: rec.rejected.get(r, 0) for r in REJECTION_REASONS},
            "rejected_total": sum(rec.rejected.values()),
            "overloaded": rec.overloaded,
            "unauthorized": rec.unauthorized,
            "bad_requests": rec.bad_requests,
            "by_key": by_key,
        }
        if detail:
            data["arrivals"] = times
            data["requests"] = [dict(entry) for entry in rec.requests]
            data["rejections"] = [
                {"t": e["end"], "reason": e["reason"], "key": e["key"]}
                for e in rec.requests
                if e["status"] == 429
            ]
        return data

    # ------------------------------------------------------------------ requests

    def arrive(self) -> dict[str, Any]:
        """A new line in the record for a request that just arrived."""
        entry: dict[str, Any] = {
            "id": f"req_{uuid.uuid4().hex[:24]}",
            "arrival": time.monotonic(),
            "start": None,
            "end": None,
            "key": None,
            "status": None,
            "reason": None,
            "stream": None,
            "input_tokens": None,
            "output_tokens": None,
            "max_tokens": None,
        }
        self.record.requests.append(entry)
        return entry

    @staticmethod
    def answered(entry: dict[str, Any], response: Response, reason: str | None = None) -> Response:
        """Note a request answered at once (an error): its status, reason and end."""
        entry["status"] = response.status_code
        entry["reason"] = reason
        entry["end"] = time.monotonic()
        return response

    def authenticate(self, request: Request, entry: dict[str, Any]) -> str | Response:
        """The caller's key, or the 401 the real API answers."""
        key = request.headers.get("x-api-key", "").strip()
        header = "x-api-key"
        if not key:  # the anthropic SDK 2.x sends its api_key as a bearer token
            scheme, _, token = request.headers.get("authorization", "").partition(" ")
            key = token.strip() if scheme.lower() == "bearer" else ""
            header = "bearer token" if key else header
        if key and (not self.config.api_keys or key in self.config.api_keys):
            entry["key"] = mask_key(key)
            return key
        self.record.unauthorized += 1
        if key:
            entry["key"] = mask_key(key)
            self.record.key(entry["key"]).unauthorized += 1
        message = f"invalid {header}" if key else "x-api-key header is required"
        return self.answered(entry, _error(401, "authentication_error", message))

    def bad_request(self, entry: dict[str, Any], message: str) -> Response:
        self.record.bad_requests += 1
        return self.answered(entry, _error(400, "invalid_request_error", message))

    def overloaded(self, entry: dict[str, Any]) -> Response | None:
        """The injected 529, while some are left to answer."""
        if self._overload <= 0:
            return None
        self._overload -= 1
        self.record.overloaded += 1
        self.record.key(entry["key"]).overloaded += 1
        headers: dict[str, str] = {}
        if self._overload_retry_after is not None:
            headers["retry-after"] = _seconds_header(self._overload_retry_after)
        return self.answered(entry, _error(529, "overloaded_error", "Overloaded", headers))

    def _bucket(self, key: str) -> _Bucket:
        name = key if self.config.scope == "key" else "*"
        bucket = self._buckets.get(name)
        if bucket is None:
            bucket = self._buckets[name] = _Bucket()
        return bucket

    def limit_headers(self, bucket: _Bucket, now: float) -> dict[str, str]:
        """``anthropic-ratelimit-*`` for the configured limits (none for absent limits)."""
        cfg = self.config
        wall = time.time()

        def reset(newest: float | None, window: float) -> str:
            return rfc3339(wall + max(0.0, 0.0 if newest is None else newest + window - now))

        headers: dict[str, str] = {}
        if cfg.rpm is not None:
            newest = bucket.requests[-1] if bucket.requests else None
            headers["anthropic-ratelimit-requests-limit"] = str(cfg.rpm)
            headers["anthropic-ratelimit-requests-remaining"] = str(
                max(0, cfg.rpm - len(bucket.requests))
            )
            headers["anthropic-ratelimit-requests-reset"] = reset(newest, cfg.window_seconds)
        tokens: list[tuple[int, str, str, str]] = []  # (remaining, limit, remaining, reset)
        window = cfg.token_window_seconds
        for name, limit, used, newest in (
            (
                "input-tokens",
                cfg.itpm,
                bucket.input_sum,
                bucket.inputs[-1][0] if bucket.inputs else None,
            ),
            (
                "output-tokens",
                cfg.otpm,
                bucket.output_sum,
                bucket.outputs[-1].t if bucket.outputs else None,
            ),
        ):
            if limit is None:
                continue
            left = max(0, limit - used)
            values = (str(limit), str(_round_thousand(left)), reset(newest, window))
            headers[f"anthropic-ratelimit-{name}-limit"] = values[0]
            headers[f"anthropic-ratelimit-{name}-remaining"] = values[1]
            headers[f"anthropic-ratelimit-{name}-reset"] = values[2]
            tokens.append((left, *values))
        if tokens:
            _, limit_text, remaining_text, reset_text = min(tokens, key=lambda t: t[0])
            headers["anthropic-ratelimit-tokens-limit"] = limit_text
            headers["anthropic-ratelimit-tokens-remaining"] = remaining_text
            headers["anthropic-ratelimit-tokens-reset"] = reset_text
        return headers

    def admit(
        self, key: str, entry: dict[str, Any], charge_in: int, charge_out: int
    ) -> tuple[_Admission, dict[str, str]] | Response:
        """Admit one request (all limits at once, all or nothing) or answer its 429."""
        cfg = self.config
        now = time.monotonic()
        label = mask_key(key)
        bucket = self._bucket(key)
        window, token_window = cfg.window_seconds, cfg.token_window_seconds
        bucket.prune(now, window, token_window)
        org = cfg.organization
        wait: float
        if cfg.max_in_flight is not None and bucket.in_flight >= cfg.max_in_flight:
            reason, wait = "concurrency", cfg.concurrency_retry_after
            message = (
                "Number of concurrent connections has exceeded your rate limit. Please try "
                f"again later or contact sales at {_SALES} to discuss your options for a "
                "rate limit increase."
            )
        elif cfg.rpm is not None and len(bucket.requests) >= cfg.rpm:
            reason, wait = "requests", window
            if cfg.rpm:  # room once the rpm-th newest admission leaves the window
                wait = bucket.requests[len(bucket.requests) - cfg.rpm] + window - now
            message = self._over(org, cfg.rpm, "requests")
        elif cfg.itpm is not None and bucket.input_sum + charge_in > cfg.itpm:
            reason = "input_tokens"
            wait = _wait_for_room(
                [(t, n) for t, n in bucket.inputs], bucket.input_sum, charge_in, cfg.itpm
            )
            wait = token_window if wait is None else max(0.0, wait + token_window - now)
            message = self._over(org, cfg.itpm, "input tokens")
        elif cfg.otpm is not None and bucket.output_sum + charge_out > cfg.otpm:
            reason = "output_tokens"
            wait = _wait_for_room(
                [(a.t, a.output) for a in bucket.outputs], bucket.output_sum, charge_out, cfg.otpm
            )
            wait = token_window if wait is None else max(0.0, wait + token_window - now)
            message = self._over(org, cfg.otpm, "output tokens")
        else:
            return self._admitted(bucket, entry, label, now, charge_in, charge_out)
        rec = self.record
        rec.rejected[reason] += 1
        rec.key(label).rejected[reason] += 1
        headers = self.limit_headers(bucket, now)
        headers["retry-after"] = _seconds_header(wait)
        return self.answered(entry, _error(429, "rate_limit_error", message, headers), reason)

    @staticmethod
    def _over(org: str, limit: int, what: str) -> str:
        return (
            f"This request would exceed the rate limit for your organization ({org}) of "
            f"{limit:,} {what} per minute. For details, refer to: {_LIMITS_DOCS}. You can "
            "see the response headers for current usage. Please reduce the prompt length or "
            "the maximum tokens requested, or try again later. You may also contact sales at "
            f"{_SALES} to discuss your options for a rate limit increase."
        )

    def _admitted(
        self,
        bucket: _Bucket,
        entry: dict[str, Any],
        label: str,
        now: float,
        charge_in: int,
        charge_out: int,
    ) -> tuple[_Admission, dict[str, str]]:
        adm = _Admission(entry, label, now, charge_in, charge_out, charge_out, bucket, self._epoch)
        entry.update(start=now, status=200)
        bucket.in_flight += 1
        bucket.requests.append(now)
        bucket.inputs.append((now, charge_in))
        bucket.input_sum += charge_in
        bucket.outputs.append(adm)
        bucket.output_sum += charge_out
        self._in_flight += 1
        self._key_in_flight[label] += 1
        rec = self.record
        rec.admissions.append(adm)
        rec.max_in_flight = max(rec.max_in_flight, self._in_flight)
        stats = rec.key(label)
        stats.admitted += 1
        stats.max_in_flight = max(stats.max_in_flight, self._key_in_flight[label])
        return adm, self.limit_headers(bucket, now)

    def finish(self, adm: _Admission, output: int) -> None:
        """The answer has been sent (or abandoned): free its slot, correct its output."""
        if adm.done_at is not None:
            return
        adm.done_at = time.monotonic()
        adm.bucket.in_flight -= 1
        if adm.live:
            adm.bucket.output_sum += output - adm.output
        adm.output = output
        adm.entry.update(end=adm.done_at, output_tokens=output)
        self._in_flight -= 1
        self._key_in_flight[adm.key] -= 1
        if adm.epoch == self.record.epoch:
            self.record.completed += 1
            self.record.key(adm.key).completed += 1


def _wait_for_room(
    log: Sequence[tuple[float, int]], used: int, charge: int, limit: int
) -> float | None:
    """When (the admission time of the entry whose leaving) makes room for ``charge``."""
    for t, n in log:
        used -= n
        if used + charge <= limit:
            return t
    return None


def _seconds_header(wait: float) -> str:
    """``retry-after`` as the real API sends it: whole seconds, rounded up, at least 1."""
    return str(max(1, math.ceil(wait - 1e-9)))


# --------------------------------------------------------------------------- messages


def _usage(input_count: int, output: int) -> dict[str, Any]:
    return {
        "input_tokens": input_count,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
        "output_tokens": output,
        "service_tier": "standard",
    }


def _message_problem(i: int, message: Any) -> str | None:
    if not isinstance(message, dict) or message.get("role") not in ("user", "assistant"):
        return f"messages.{i}.role: Input should be 'user' or 'assistant'"
    if not isinstance(message.get("content"), str | list):
        return f"messages.{i}.content: Field required"
    return None


def _validate(body: Any) -> str | None:
    """The real API's complaint about a Messages body, or None when it is acceptable."""
    if not isinstance(body, dict):
        return "The request body must be a JSON object."
    cap = body.get("max_tokens")
    messages = body.get("messages")
    problems = [
        "model: Field required"
        if not isinstance(body.get("model"), str) or not body["model"]
        else None,
        "max_tokens: Field required (an integer >= 1)"
        if not isinstance(cap, int) or isinstance(cap, bool) or cap < 1
        else None,
        "messages: at least one message is required"
        if not isinstance(messages, list) or not messages
        else None,
        *(_message_problem(i, m) for i, m in enumerate(messages or [])),
        "stream: Input should be a valid boolean"
        if "stream" in body and not isinstance(body["stream"], bool)
        else None,
    ]
    return next((p for p in problems if p is not None), None)


async def _stream(
    fake: FakeAnthropic, message: dict[str, Any], text: str, output: int, stop_reason: str
) -> AsyncIterator[str]:
    cfg = fake.config
    start = {**message, "content": [], "stop_reason": None, "stop_sequence": None}
    start["usage"] = {**message["usage"], "output_tokens": min(1, output)}
    await asyncio.sleep(cfg.latency)
    yield sse({"type": "message_start", "message": start}, "message_start")
    block = {"type": "text", "text": ""}
    yield sse(
        {"type": "content_block_start", "index": 0, "content_block": block}, "content_block_start"
    )
    yield sse({"type": "ping"}, "ping")
    for piece in pieces(text, cfg.stream_chunk_chars):
        await asyncio.sleep(cfg.chunk_latency)
        delta = {"type": "text_delta", "text": piece}
        yield sse(
            {"type": "content_block_delta", "index": 0, "delta": delta}, "content_block_delta"
        )
    yield sse({"type": "content_block_stop", "index": 0}, "content_block_stop")
    delta = {"stop_reason": stop_reason, "stop_sequence": None}
    yield sse(
        {"type": "message_delta", "delta": delta, "usage": {"output_tokens": output}},
        "message_delta",
    )
    yield sse({"type": "message_stop"}, "message_stop")


async def _authed_body(
    fake: FakeAnthropic, request: Request, entry: dict[str, Any]
) -> tuple[str, dict[str, Any]] | Response:
    """The caller's key and valid Messages body, or the 401 / 400 that answers the request."""
    key = fake.authenticate(request, entry)
    if not isinstance(key, str):
        return key
    if not request.headers.get("anthropic-version"):
        return fake.bad_request(entry, "anthropic-version: header is required")
    try:
        body = json.loads(await request.body() or b"null")
    except ValueError:
        return fake.bad_request(entry, "There was an error parsing the body of your request.")
    problem = _validate(body)
    if problem is not None:
        return fake.bad_request(entry, problem)
    return key, body


async def handle_messages(fake: FakeAnthropic, request: Request) -> Response:
    """``POST /v1/messages``: auth, validation, an injected 529, admission, the answer."""
    entry = fake.arrive()
    parsed = await _authed_body(fake, request, entry)
    if not isinstance(parsed, tuple):
        return parsed
    key, body = parsed
    stream = bool(body.get("stream"))
    charge_in = input_tokens(body)
    cap = int(body["max_tokens"])
    entry.update(stream=stream, input_tokens=charge_in, max_tokens=cap)
    overloaded = fake.overloaded(entry)
    if overloaded is not None:
        return overloaded
    admitted = fake.admit(key, entry, charge_in, cap)
    if not isinstance(admitted, tuple):
        return admitted
    adm, headers = admitted
    text = _reply(body)
    output = count_tokens(text)
    stop_reason = "end_turn"
    if output > cap:
        text, output, stop_reason = text[: cap * 4], cap, "max_tokens"
    headers = {
        **headers,
        "request-id": entry["id"],
        "anthropic-organization-id": fake.config.organization,
    }
    message = {
        "id": f"msg_{uuid.uuid4().hex[:24]}",
        "type": "message",
        "role": "assistant",
        "model": body["model"],
        "content": [{"type": "text", "text": text}],
        "stop_reason": stop_reason,
        "stop_sequence": None,
        "usage": _usage(charge_in, output),
    }
    response: HeldJSONResponse | HeldStreamingResponse
    try:
        if stream:
            events = _stream(fake, message, text, output, stop_reason)
            response = HeldStreamingResponse(
                events, media_type="text/event-stream", headers=headers
            )
        else:
            await asyncio.sleep(fake.config.latency)
            response = HeldJSONResponse(message, headers=headers)
    except BaseException:
        fake.finish(adm, output)
        raise
    response.on_done = lambda: fake.finish(adm, output)
    return response


# --------------------------------------------------------------------------- app


def create_app(config: FakeAnthropicConfig | None = None) -> FastAPI:
    """The fake Anthropic API as a FastAPI app; its state is ``app.state.fake``."""
    fake = FakeAnthropic(config or FakeAnthropicConfig())
    app = FastAPI(title="fake-anthropic", openapi_url=None, docs_url=None, redoc_url=None)
    app.state.fake = fake

    @app.post("/v1/messages")
    async def messages(request: Request) -> Response:
        return await handle_messages(fake, request)

    @app.api_route("/v1/{path:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"])
    async def unknown(path: str) -> Response:
        return _error(404, "not_found_error", f"Not found: /v1/{path}")

    @app.get("/admin/record")
    async def get_record(detail: bool = True) -> dict[str, Any]:
        return fake.snapshot(detail=detail)

    @app.post("/admin/reset")
    async def reset() -> dict[str, Any]:
        fake.reset()
        return {"ok": True, "started_at": fake.record.started_at}

    @app.get("/admin/config")
    async def get_config() -> dict[str, Any]:
        return fake.config.to_json()

    @app.post("/admin/config")
    async def set_config(request: Request) -> Response:
        try:
            body = json.loads(await request.body() or b"null")
            if not isinstance(body, dict):
                raise TypeError("the body must be a JSON object")
            config = fake.reconfigure(body)
        except (TypeError, ValueError) as exc:
            return _error(400, "invalid_request_error", str(exc))
        return JSONResponse(config.to_json())

    @app.post("/admin/overload")
    async def set_overload(request: Request) -> Response:
        try:
            body = json.loads(await request.body() or b"null")
            if not isinstance(body, dict) or not isinstance(body.get("count"), int):
                raise TypeError('the body must be {"count": int, "retry_after": float|null}')
            fake.overload(body["count"], body.get("retry_after"))
        except (TypeError, ValueError) as exc:
            return _error(400, "invalid_request_error", str(exc))
        return JSONResponse({"ok": True, "count": body["count"]})

    return app


# --------------------------------------------------------------------------- CLI


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m chatbot.fakes.anthropic_server",
        description="A fake Anthropic Messages API on 127.0.0.1 that enforces limits and "
        "records what it saw.",
    )
    p.add_argument("--port", type=int, required=True, help="port on 127.0.0.1 (0: any free)")
    p.add_argument("--max-in-flight", type=int, default=None)
    p.add_argument("--rpm", type=int, default=None, help="requests per window")
    p.add_argument("--itpm", type=int, default=None, help="input tokens per token window")
    p.add_argument("--otpm", type=int, default=None, help="output tokens per token window")
    p.add_argument("--window-seconds", type=float, default=60.0)
    p.add_argument("--token-window-seconds", type=float, default=60.0)
    p.add_argument("--latency", type=float, default=0.0, help="seconds per request")
    p.add_argument("--chunk-latency", type=float, default=0.0, help="seconds per text delta")
    p.add_argument("--scope", choices=["global", "key"], default="global")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument(
        "--api-key", action="append", default=None, help=f"repeatable; default {DEFAULT_API_KEY}"
    )
    p.add_argument("--any-key", action="store_true", help="accept any non-empty x-api-key")
    p.add_argument("--concurrency-retry-after", type=float, default=1.0)
    p.add_argument("--record-file", type=Path, default=None, help="write the record here on exit")
    p.add_argument("--log-level", default="warning")
    return p.parse_args(argv)


def _config_from_args(args: argparse.Namespace) -> FakeAnthropicConfig:
    keys: Iterable[str] = () if args.any_key else (args.api_key or [DEFAULT_API_KEY])
    return FakeAnthropicConfig(
        api_keys=tuple(keys),
        max_in_flight=args.max_in_flight,
        rpm=args.rpm,
        itpm=args.itpm,
        otpm=args.otpm,
        window_seconds=args.window_seconds,
        token_window_seconds=args.token_window_seconds,
        latency=args.latency,
        chunk_latency=args.chunk_latency,
        scope=args.scope,
        model=args.model,
        concurrency_retry_after=args.concurrency_retry_after,
    )


def _exit_cleanly(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the fake on 127.0.0.1 until SIGTERM or SIGINT; exit 0."""
    args = _parse_args(argv)
    try:
        config = _config_from_args(args)
    except ValueError as exc:
        print(f"fake-anthropic: {exc}", file=sys.stderr)
        return 2
    app = create_app(config)
    # uvicorn catches SIGTERM/SIGINT to shut down gracefully, then re-raises the signal with
    # the handler it found: this one, so a stop by signal is a clean exit with status 0.
    signal.signal(signal.SIGTERM, _exit_cleanly)
    signal.signal(signal.SIGINT, _exit_cleanly)
    server = AnnouncingServer(
        uvicorn.Config(
            app,
            host=HOST,
            port=args.port,
            log_level=args.log_level,
            access_log=False,
            lifespan="off",
            ws="none",
            timeout_graceful_shutdown=3,
        ),
        lambda port: f"fake-anthropic listening on http://{HOST}:{port}",
    )
    try:
        with contextlib.suppress(SystemExit):
            server.run()
    finally:
        if args.record_file is not None:
            args.record_file.write_text(json.dumps(app.state.fake.snapshot(), indent=2))
        print("fake-anthropic stopped", flush=True)
    return 0 if server.started else 1


if __name__ == "__main__":
    sys.exit(main())
