"""A fake OpenAI API that stands in for the real one offline and referees the demos.

It answers what the SDKs call, in the real API's shapes (the real ``openai`` SDK parses
every answer): ``POST /v1/chat/completions`` (streaming too, with a final usage chunk when
``stream_options.include_usage`` is set, and tool calls), ``POST /v1/responses`` (the Agents
SDK's default, streaming too), ``POST /v1/embeddings`` and ``GET /v1/models``, behind bearer
auth (401 ``invalid_api_key``).

It enforces its own limits like the real API, globally or per API key: requests in flight,
requests and tokens per rolling window (exact sliding logs, ``window_seconds`` long, 60 by
default), and a quota of total requests. A request is charged tokens when it arrives, as the
larger of its output cap and an estimate of its input, and corrected to its real usage when
its response has been sent. Excess answers 429 with the real body and ``retry-after``,
``retry-after-ms`` and ``x-ratelimit-*`` headers.

It is the referee: it imports nothing of ``limiter`` or of the rest of ``chatbot``. With its
own clock (``time.monotonic``) it records every admitted request (a 429 is a rejection, never
an admission), the most requests it ever had in flight (a response is in flight until its
last byte, the last chunk of a stream included, has been sent), the most requests and tokens
admitted in any rolling window, the 429s by reason and the 401s. ``GET /admin/record`` serves
that record, ``POST /admin/reset`` clears it, ``GET``/``POST /admin/config`` read and change
the limits at runtime.

Run it::

    python -m chatbot.fakes.openai_server --port 8011 --max-in-flight 5 --rpm 60 \\
        --tpm 100000 --latency 0.2 --api-key sk-fake-openai
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import dataclasses
import hashlib
import json
import math
import re
import signal
import struct
import sys
import time
import uuid
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, Literal

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send

__all__ = [
    "DEFAULT_API_KEY",
    "FakeOpenAI",
    "FakeOpenAIConfig",
    "create_app",
    "embed",
    "go_duration",
    "main",
    "mask_key",
    "max_in_window",
]

DEFAULT_API_KEY = "sk-fake-openai-key"
DEFAULT_MODEL = "gpt-4o-mini"
EMBEDDING_MODEL = "text-embedding-3-small"
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


# --------------------------------------------------------------------------- helpers


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


def max_in_window(
    times: Sequence[float], window: float, weights: Sequence[int] | None = None
) -> int:
    """The largest count (or weight) of events inside any rolling window of ``window`` seconds.

    A window ending at ``t`` holds the events in ``(t - window, t]``, as the fake's own
    admission check counts them. Exact: sorted times and two pointers, O(n log n).
    """
    order = sorted(range(len(times)), key=times.__getitem__)
    w = [1] * len(times) if weights is None else list(weights)
    best = current = 0
    lo = 0
    for j in order:
        current += w[j]
        while times[order[lo]] <= times[j] - window:
            current -= w[order[lo]]
            lo += 1
        best = max(best, current)
    return best


def embed(text: str, dimensions: int) -> list[float]:
    """A deterministic unit vector for ``text`` (hash-derived; equal texts, equal vectors)."""
    values: list[float] = []
    counter = 0
    while len(values) < dimensions:
        digest = hashlib.sha256(f"{counter}:{text}".encode()).digest()
        values.extend(
            int.from_bytes(digest[k : k + 4], "big") / 2**31 - 1.0 for k in range(0, 32, 4)
        )
        counter += 1
    vector = values[:dimensions]
    norm = math.sqrt(sum(x * x for x in vector)) or 1.0
    return [x / norm for x in vector]


def _count_tokens(text: str) -> int:
    """About four characters a token, at least one for any text."""
    return max(1, (len(text) + 3) // 4) if text else 0


def _text_of(content: Any) -> str:
    """The text of a message's content: a string or a list of parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts: list[str] = []
        for part in content:
            if isinstance(part, str):
                parts.append(part)
            elif isinstance(part, dict):
                for name in ("text", "refusal", "output"):
                    value = part.get(name)
                    if isinstance(value, str):
                        parts.append(value)
                        break
        return " ".join(parts)
    return json.dumps(content)


def _summary(text: str, limit: int = 200) -> str:
    return " ".join(text.split())[:limit]


def _stable_id(prefix: str, *parts: Any) -> str:
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()
    return f"{prefix}{digest[:24]}"


def _new_id(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:24]}"


def _cap(body: Mapping[str, Any], *names: str) -> int | None:
    for name in names:
        value = body.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


# --------------------------------------------------------------------------- replies

_STOPWORDS = frozenset(
    {"send", "create", "delete", "update", "find", "list", "make", "tool", "action", "with"}
)
_EMAIL = re.compile(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+")


@dataclass(frozen=True)
class _ToolSpec:
    name: str
    parameters: Mapping[str, Any]


@dataclass(frozen=True)
class _Reply:
    """What the fake model answers: text, or one tool call; token counts before any cap."""

    text: str | None
    tool: tuple[str, str, str] | None  # (call id, name, JSON arguments)
    prompt_tokens: int
    completion_tokens: int


def _message_text(message: Mapping[str, Any]) -> str:
    text = _text_of(message.get("content"))
    for call in message.get("tool_calls") or []:
        if isinstance(call, dict) and isinstance(call.get("function"), dict):
            fn = call["function"]
            text += f" {fn.get('name', '')} {fn.get('arguments', '')}"
    return text


def _prompt_tokens(messages: Sequence[Mapping[str, Any]], tools: Any) -> int:
    """Input tokens: ~len/4 per message, 4 per message of overhead, 3 to prime the reply."""
    total = 3 + sum(4 + len(_message_text(m)) // 4 for m in messages)
    if tools:
        total += len(json.dumps(tools, separators=(",", ":"))) // 4
    return total


def _keywords(spec: _ToolSpec, extra: Mapping[str, Sequence[str]]) -> list[str]:
    name = spec.name.lower()
    words = [name, name.replace("_", " ").replace("-", " ")]
    words += [p for p in re.split(r"[^a-z0-9]+", name) if len(p) >= 4 and p not in _STOPWORDS]
    words += [w.lower() for w in extra.get(spec.name, ())]
    return [w for w in words if w]


def _choose_tool(
    specs: Sequence[_ToolSpec],
    tool_choice: Any,
    text: str,
    extra: Mapping[str, Sequence[str]],
) -> _ToolSpec | None:
    if not specs or tool_choice == "none":
        return None
    if isinstance(tool_choice, dict):
        forced = tool_choice.get("name")
        if isinstance(tool_choice.get("function"), dict):
            forced = tool_choice["function"].get("name")
        for spec in specs:
            if spec.name == forced:
                return spec
    lowered = text.lower()
    for spec in specs:
        if any(word in lowered for word in _keywords(spec, extra)):
            return spec
    return specs[0] if tool_choice == "required" else None


def _value_for(name: str, schema: Mapping[str, Any], text: str) -> Any:
    enum = schema.get("enum")
    if isinstance(enum, list) and enum:
        return enum[0]
    kind = schema.get("type", "string")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "string")
    if kind == "string":
        if "email" in name.lower() or name.lower() in {"to", "recipient"}:
            found = _EMAIL.search(text)
            return found.group(0) if found else "someone@example.com"
        return _summary(text) or name
    return {"integer": 1, "number": 1, "boolean": True, "array": [], "object": {}}.get(kind, text)


def _arguments(parameters: Mapping[str, Any], text: str) -> str:
    """JSON arguments for a tool: every required property (all if none is marked required)."""
    props = parameters.get("properties")
    props = props if isinstance(props, dict) else {}
    required = parameters.get("required")
    names = required if isinstance(required, list) else list(props)
    args: dict[str, Any] = {}
    for name in names:
        schema = props.get(name)
        args[name] = _value_for(name, schema if isinstance(schema, dict) else {}, text)
    return json.dumps(args)


def _decide(
    messages: Sequence[Mapping[str, Any]],
    specs: Sequence[_ToolSpec],
    tool_choice: Any,
    tools_raw: Any,
    extra: Mapping[str, Sequence[str]],
) -> _Reply:
    """The fake model: echo the user, call a tool the user mentions, report a tool's result."""
    prompt = _prompt_tokens(messages, tools_raw)
    last = messages[-1] if messages else {}
    if last.get("role") == "tool":
        call_id = last.get("tool_call_id")
        name = "tool"
        for m in messages:
            for call in m.get("tool_calls") or []:
                if isinstance(call, dict) and call.get("id") == call_id:
                    name = str((call.get("function") or {}).get("name") or name)
        text = f"The {name} tool returned: {_summary(_text_of(last.get('content')))}"
        return _Reply(text, None, prompt, _count_tokens(text))
    user_text = next(
        (_text_of(m.get("content")) for m in reversed(messages) if m.get("role") == "user"), ""
    )
    if last.get("role") == "user":
        spec = _choose_tool(specs, tool_choice, user_text, extra)
        if spec is not None:
            args = _arguments(spec.parameters, user_text)
            call_id = _stable_id("call_", list(messages), spec.name)
            return _Reply(None, (call_id, spec.name, args), prompt, _count_tokens(spec.name + args))
    text = f"You said: {_summary(user_text)}" if user_text else "Hello from the fake OpenAI API."
    return _Reply(text, None, prompt, _count_tokens(text))


def _chat_specs(tools: Any) -> list[_ToolSpec]:
    specs = []
    for tool in tools if isinstance(tools, list) else []:
        if isinstance(tool, dict) and isinstance(tool.get("function"), dict):
            fn = tool["function"]
            params = fn.get("parameters")
            specs.append(
                _ToolSpec(str(fn.get("name", "")), params if isinstance(params, dict) else {})
            )
    return specs


def _responses_specs(tools: Any) -> list[_ToolSpec]:
    specs = []
    for tool in tools if isinstance(tools, list) else []:
        if isinstance(tool, dict) and tool.get("type") == "function" and tool.get("name"):
            params = tool.get("parameters")
            specs.append(_ToolSpec(str(tool["name"]), params if isinstance(params, dict) else {}))
    return specs


def _responses_messages(body: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The Responses API's ``instructions`` and ``input`` items as chat messages."""
    messages: list[dict[str, Any]] = []
    if isinstance(body.get("instructions"), str):
        messages.append({"role": "system", "content": body["instructions"]})
    items = body.get("input")
    if isinstance(items, str):
        return [*messages, {"role": "user", "content": items}]
    for item in items if isinstance(items, list) else []:
        if not isinstance(item, dict):
            continue
        kind = item.get("type")
        if kind in (None, "message") and "role" in item:
            messages.append({"role": item["role"], "content": _text_of(item.get("content"))})
        elif kind == "function_call":
            call = {
                "id": item.get("call_id"),
                "type": "function",
                "function": {"name": item.get("name"), "arguments": item.get("arguments", "")},
            }
            messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output")
            messages.append(
                {
                    "role": "tool",
                    "tool_call_id": item.get("call_id"),
                    "content": output if isinstance(output, str) else _text_of(output),
                }
            )
    return messages


def _truncate(reply: _Reply, cap: int | None) -> tuple[str | None, int, bool]:
    """(text, completion tokens, cut) once the output cap is applied."""
    if cap is None or reply.completion_tokens <= cap:
        return reply.text, reply.completion_tokens, False
    text = reply.text[: cap * 4] if reply.text is not None else None
    return text, cap, True


def _pieces(text: str, size: int) -> list[str]:
    return [text[i : i + size] for i in range(0, len(text), size)] or [""]


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
        return _error(401, message, "invalid_request_error", "invalid_api_key")

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
        return _error(429, message, type_, code, headers=headers)

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


# --------------------------------------------------------------------------- responses


def _error(
    status: int,
    message: str,
    type_: str,
    code: str | None,
    param: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=_with_request_id(headers))


def _with_request_id(headers: Mapping[str, str] | None = None) -> dict[str, str]:
    return {**(headers or {}), "x-request-id": _new_id("req_"), "openai-version": "2020-10-01"}


class _HeldMixin:
    """Calls ``on_done`` once the whole response has been sent, or the sending ended."""

    on_done: Callable[[], None] | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)  # type: ignore[misc]
        finally:
            done, self.on_done = self.on_done, None
            if done is not None:
                done()


class _HeldJSONResponse(_HeldMixin, JSONResponse):
    pass


class _HeldStreamingResponse(_HeldMixin, StreamingResponse):
    pass


def _bad_request(fake: FakeOpenAI, message: str, param: str | None = None) -> JSONResponse:
    fake.record.bad_requests += 1
    return _error(400, message, "invalid_request_error", None, param)


async def _json_body(fake: FakeOpenAI, request: Request) -> dict[str, Any] | JSONResponse:
    try:
        body = json.loads(await request.body() or b"null")
    except ValueError:
        return _bad_request(fake, "We could not parse the JSON body of your request.")
    if not isinstance(body, dict):
        return _bad_request(fake, "The request body must be a JSON object.")
    return body


async def _authed_body(fake: FakeOpenAI, request: Request) -> tuple[str, dict[str, Any]] | Response:
    """The caller's key and JSON body, or the 401 / 400 that answers the request."""
    key = fake.authenticate(request)
    if not isinstance(key, str):
        return key
    body = await _json_body(fake, request)
    if not isinstance(body, dict):
        return body
    return key, body


def _sse(data: Mapping[str, Any], event: str | None = None) -> str:
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(data, separators=(',', ':'))}\n\n"


def _held(
    fake: FakeOpenAI,
    adm: _Admission,
    tokens: int,
    response: _HeldJSONResponse | _HeldStreamingResponse,
) -> Response:
    response.on_done = lambda: fake.finish(adm, tokens)
    return response


# --------------------------------------------------------------------------- chat


def _chat_usage(prompt: int, completion: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 0,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }


def _chat_tool_call(tool: tuple[str, str, str]) -> dict[str, Any]:
    call_id, name, args = tool
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": args}}


async def _chat_stream(
    fake: FakeOpenAI,
    base: Mapping[str, Any],
    reply: _Reply,
    text: str | None,
    finish_reason: str,
    usage: Mapping[str, Any],
    include_usage: bool,
) -> AsyncIterator[str]:
    cfg = fake.config
    chunk_latency = cfg.chunk_latency
    size = cfg.stream_chunk_chars

    def chunk(delta: Mapping[str, Any], finish: str | None = None) -> str:
        data: dict[str, Any] = {
            **base,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        }
        if include_usage:
            data["usage"] = None
        return _sse(data)

    await asyncio.sleep(cfg.latency)
    if reply.tool is not None:
        call_id, name, args = reply.tool
        first = {"index": 0, "id": call_id, "type": "function"}
        first["function"] = {"name": name, "arguments": ""}
        yield chunk({"role": "assistant", "content": None, "tool_calls": [first]})
        for piece in _pieces(args, size):
            await asyncio.sleep(chunk_latency)
            yield chunk({"tool_calls": [{"index": 0, "function": {"arguments": piece}}]})
    else:
        yield chunk({"role": "assistant", "content": "", "refusal": None})
        for piece in _pieces(text or "", size):
            await asyncio.sleep(chunk_latency)
            yield chunk({"content": piece})
    await asyncio.sleep(chunk_latency)
    yield chunk({}, finish_reason)
    if include_usage:
        yield _sse({**base, "choices": [], "usage": usage})
    yield "data: [DONE]\n\n"


async def _chat_completions(fake: FakeOpenAI, request: Request) -> Response:
    endpoint = "/v1/chat/completions"
    parsed = await _authed_body(fake, request)
    if not isinstance(parsed, tuple):
        return parsed
    key, body = parsed
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        return _bad_request(fake, "'messages' must be a non-empty array.", "messages")
    if not all(isinstance(m, dict) for m in messages):
        return _bad_request(fake, "Each message must be an object.", "messages")
    cfg = fake.config
    model = str(body.get("model") or cfg.model)
    reply = _decide(
        messages,
        _chat_specs(body.get("tools")),
        body.get("tool_choice"),
        body.get("tools"),
        cfg.tool_keywords,
    )
    cap = _cap(body, "max_completion_tokens", "max_tokens")
    text, completion, cut = _truncate(reply, cap)
    finish_reason = "length" if cut else ("tool_calls" if reply.tool else "stop")
    usage = _chat_usage(reply.prompt_tokens, completion)
    admitted = fake.admit(key, endpoint, model, max(cap or 0, reply.prompt_tokens))
    if not isinstance(admitted, tuple):
        return admitted
    adm, headers = admitted
    headers = _with_request_id(headers)
    total = reply.prompt_tokens + completion
    try:
        base = {
            "id": _new_id("chatcmpl-"),
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": model,
            "service_tier": "default",
            "system_fingerprint": "fp_fake",
        }
        if body.get("stream"):
            options = body.get("stream_options")
            include_usage = isinstance(options, dict) and bool(options.get("include_usage"))
            stream = _chat_stream(fake, base, reply, text, finish_reason, usage, include_usage)
            return _held(
                fake,
                adm,
                total,
                _HeldStreamingResponse(stream, media_type="text/event-stream", headers=headers),
            )
        await asyncio.sleep(cfg.latency)
        message: dict[str, Any] = {
            "role": "assistant",
            "content": text,
            "refusal": None,
            "annotations": [],
        }
        if reply.tool is not None:
            message["tool_calls"] = [_chat_tool_call(reply.tool)]
        payload = {
            **base,
            "object": "chat.completion",
            "choices": [
                {"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason}
            ],
            "usage": usage,
        }
        return _held(fake, adm, total, _HeldJSONResponse(payload, headers=headers))
    except BaseException:
        fake.finish(adm, total)
        raise


# --------------------------------------------------------------------------- responses API


def _responses_usage(prompt: int, completion: int) -> dict[str, Any]:
    return {
        "input_tokens": prompt,
        "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
        "output_tokens": completion,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": prompt + completion,
    }


def _response_object(
    body: Mapping[str, Any],
    resp_id: str,
    model: str,
    created: float,
    status: str,
    output: list[dict[str, Any]],
    usage: Mapping[str, Any] | None,
    incomplete: bool,
) -> dict[str, Any]:
    return {
        "id": resp_id,
        "object": "response",
        "created_at": created,
        "status": status,
        "background": False,
        "error": None,
        "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
        "instructions": body.get("instructions"),
        "max_output_tokens": body.get("max_output_tokens"),
        "metadata": body.get("metadata") or {},
        "model": model,
        "output": output,
        "parallel_tool_calls": body.get("parallel_tool_calls", True),
        "previous_response_id": body.get("previous_response_id"),
        "reasoning": {"effort": None, "summary": None},
        "store": body.get("store", True),
        "temperature": body.get("temperature", 1.0),
        "text": {"format": {"type": "text"}},
        "tool_choice": body.get("tool_choice", "auto"),
        "tools": body.get("tools") or [],
        "top_p": body.get("top_p", 1.0),
        "truncation": body.get("truncation", "disabled"),
        "usage": usage,
        "user": None,
    }


def _output_item(reply: _Reply, text: str | None, item_id: str, status: str) -> dict[str, Any]:
    if reply.tool is not None:
        call_id, name, args = reply.tool
        return {
            "id": item_id,
            "type": "function_call",
            "status": status,
            "call_id": call_id,
            "name": name,
            "arguments": args if status == "completed" else "",
        }
    content = (
        [{"type": "output_text", "text": text or "", "annotations": [], "logprobs": []}]
        if status == "completed"
        else []
    )
    return {
        "id": item_id,
        "type": "message",
        "status": status,
        "role": "assistant",
        "content": content,
    }


async def _responses_stream(
    fake: FakeOpenAI,
    reply: _Reply,
    text: str | None,
    item_id: str,
    shell: Callable[[str, list[dict[str, Any]], Mapping[str, Any] | None], dict[str, Any]],
    final_status: str,
    usage: Mapping[str, Any],
) -> AsyncIterator[str]:
    cfg = fake.config
    seq = iter(range(1_000_000))

    def event(kind: str, **fields: Any) -> str:
        return _sse({"type": kind, "sequence_number": next(seq), **fields}, event=kind)

    await asyncio.sleep(cfg.latency)
    yield event("response.created", response=shell("in_progress", [], None))
    yield event("response.in_progress", response=shell("in_progress", [], None))
    at = {"item_id": item_id, "output_index": 0}
    yield event(
        "response.output_item.added",
        output_index=0,
        item=_output_item(reply, text, item_id, "in_progress"),
    )
    if reply.tool is not None:
        _, name, args = reply.tool
        for piece in _pieces(args, cfg.stream_chunk_chars):
            await asyncio.sleep(cfg.chunk_latency)
            yield event("response.function_call_arguments.delta", delta=piece, **at)
        yield event("response.function_call_arguments.done", arguments=args, name=name, **at)
    else:
        part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        yield event("response.content_part.added", content_index=0, part=part, **at)
        for piece in _pieces(text or "", cfg.stream_chunk_chars):
            await asyncio.sleep(cfg.chunk_latency)
            yield event(
                "response.output_text.delta", content_index=0, delta=piece, logprobs=[], **at
            )
        yield event("response.output_text.done", content_index=0, text=text, logprobs=[], **at)
        part = {**part, "text": text or ""}
        yield event("response.content_part.done", content_index=0, part=part, **at)
    await asyncio.sleep(cfg.chunk_latency)
    item = _output_item(reply, text, item_id, "completed")
    yield event("response.output_item.done", output_index=0, item=item)
    kind = "response.completed" if final_status == "completed" else "response.incomplete"
    yield event(kind, response=shell(final_status, [item], usage))


async def _responses(fake: FakeOpenAI, request: Request) -> Response:
    endpoint = "/v1/responses"
    parsed = await _authed_body(fake, request)
    if not isinstance(parsed, tuple):
        return parsed
    key, body = parsed
    if not isinstance(body.get("input"), str | list):
        return _bad_request(fake, "'input' must be a string or an array of items.", "input")
    cfg = fake.config
    model = str(body.get("model") or cfg.model)
    messages = _responses_messages(body)
    reply = _decide(
        messages,
        _responses_specs(body.get("tools")),
        body.get("tool_choice"),
        body.get("tools"),
        cfg.tool_keywords,
    )
    cap = _cap(body, "max_output_tokens")
    text, completion, cut = _truncate(reply, cap)
    usage = _responses_usage(reply.prompt_tokens, completion)
    admitted = fake.admit(key, endpoint, model, max(cap or 0, reply.prompt_tokens))
    if not isinstance(admitted, tuple):
        return admitted
    adm, headers = admitted
    headers = _with_request_id(headers)
    total = reply.prompt_tokens + completion
    try:
        resp_id = _new_id("resp_")
        created = time.time()
        item_id = _new_id("fc_" if reply.tool else "msg_")
        status = "incomplete" if cut else "completed"

        def shell(
            state: str, output: list[dict[str, Any]], use: Mapping[str, Any] | None
        ) -> dict[str, Any]:
            return _response_object(body, resp_id, model, created, state, output, use, cut)

        if body.get("stream"):
            stream = _responses_stream(fake, reply, text, item_id, shell, status, usage)
            return _held(
                fake,
                adm,
                total,
                _HeldStreamingResponse(stream, media_type="text/event-stream", headers=headers),
            )
        await asyncio.sleep(cfg.latency)
        payload = shell(status, [_output_item(reply, text, item_id, "completed")], usage)
        return _held(fake, adm, total, _HeldJSONResponse(payload, headers=headers))
    except BaseException:
        fake.finish(adm, total)
        raise


# --------------------------------------------------------------------------- embeddings


async def _embeddings(fake: FakeOpenAI, request: Request) -> Response:
    endpoint = "/v1/embeddings"
    parsed = await _authed_body(fake, request)
    if not isinstance(parsed, tuple):
        return parsed
    key, body = parsed
    raw = body.get("input")
    items: list[Any]
    if isinstance(raw, str) or (
        isinstance(raw, list) and raw and all(isinstance(x, int) for x in raw)
    ):
        items = [raw]  # one text, or one array of tokens
    elif isinstance(raw, list) and raw and all(isinstance(x, str | list) for x in raw):
        items = raw
    else:
        return _bad_request(
            fake, "'input' must be a string, an array of strings or tokens.", "input"
        )
    dims = body.get("dimensions")
    dims = dims if isinstance(dims, int) and dims > 0 else fake.config.embedding_dimensions
    model = str(body.get("model") or EMBEDDING_MODEL)
    texts = [x if isinstance(x, str) else " ".join(map(str, x)) for x in items]
    tokens = sum(_count_tokens(x) if isinstance(x, str) else len(x) for x in items)
    admitted = fake.admit(key, endpoint, model, tokens)
    if not isinstance(admitted, tuple):
        return admitted
    adm, headers = admitted
    try:
        await asyncio.sleep(fake.config.latency)
        as_base64 = body.get("encoding_format") == "base64"
        data = []
        for index, text in enumerate(texts):
            vector = embed(text, dims)
            value: Any = vector
            if as_base64:
                value = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
            data.append({"object": "embedding", "index": index, "embedding": value})
        payload = {
            "object": "list",
            "data": data,
            "model": model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }
        response = _HeldJSONResponse(payload, headers=_with_request_id(headers))
        return _held(fake, adm, tokens, response)
    except BaseException:
        fake.finish(adm, tokens)
        raise


# --------------------------------------------------------------------------- app


def _models(config: FakeOpenAIConfig) -> list[dict[str, Any]]:
    names = dict.fromkeys([config.model, "gpt-4o-mini", "gpt-4o", "gpt-4.1-mini", EMBEDDING_MODEL])
    return [
        {"id": name, "object": "model", "created": 1_715_367_049, "owned_by": "system"}
        for name in names
    ]


def create_app(config: FakeOpenAIConfig | None = None) -> FastAPI:
    """The fake OpenAI API as a FastAPI app; its state is ``app.state.fake`` (a FakeOpenAI)."""
    fake = FakeOpenAI(config or FakeOpenAIConfig())
    app = FastAPI(title="fake-openai", openapi_url=None, docs_url=None, redoc_url=None)
    app.state.fake = fake

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await _chat_completions(fake, request)

    @app.post("/v1/responses")
    async def responses(request: Request) -> Response:
        return await _responses(fake, request)

    @app.post("/v1/embeddings")
    async def embeddings(request: Request) -> Response:
        return await _embeddings(fake, request)

    @app.get("/v1/models")
    async def list_models(request: Request) -> Response:
        key = fake.authenticate(request)
        if not isinstance(key, str):
            return key
        body = {"object": "list", "data": _models(fake.config)}
        return JSONResponse(body, headers=_with_request_id())

    @app.get("/v1/models/{model}")
    async def retrieve_model(model: str, request: Request) -> Response:
        key = fake.authenticate(request)
        if not isinstance(key, str):
            return key
        for entry in _models(fake.config):
            if entry["id"] == model:
                return JSONResponse(entry, headers=_with_request_id())
        message = f"The model '{model}' does not exist or you do not have access to it."
        return _error(404, message, "invalid_request_error", "model_not_found")

    @app.api_route("/v1/{path:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"])
    async def unknown(path: str, request: Request) -> Response:
        message = f"Invalid URL ({request.method} /v1/{path})"
        return _error(404, message, "invalid_request_error", None)

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
        body = await _json_body(fake, request)
        if not isinstance(body, dict):
            return body
        try:
            config = fake.reconfigure(body)
        except (TypeError, ValueError) as exc:
            return _error(400, str(exc), "invalid_request_error", None)
        return JSONResponse(config.to_json())

    return app


# --------------------------------------------------------------------------- CLI


class _AnnouncingServer(uvicorn.Server):
    """A uvicorn server that prints its address once it is listening."""

    async def startup(self, sockets: list[Any] | None = None) -> None:
        await super().startup(sockets=sockets)
        if self.started:
            port = self.servers[0].sockets[0].getsockname()[1]
            print(f"fake-openai listening on http://127.0.0.1:{port}", flush=True)


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m chatbot.fakes.openai_server",
        description="A fake OpenAI API on 127.0.0.1 that enforces limits and records what it saw.",
    )
    p.add_argument("--port", type=int, required=True, help="port on 127.0.0.1 (0: any free)")
    p.add_argument(
        "--host", default="127.0.0.1", help="address to bind (0.0.0.0 only inside a container)"
    )
    p.add_argument("--max-in-flight", type=int, default=None)
    p.add_argument("--rpm", type=int, default=None, help="requests per window")
    p.add_argument("--tpm", type=int, default=None, help="tokens per window")
    p.add_argument("--window-seconds", type=float, default=60.0)
    p.add_argument("--quota", type=int, default=None, help="total requests before 429 quota")
    p.add_argument("--latency", type=float, default=0.0, help="seconds per request")
    p.add_argument("--chunk-latency", type=float, default=0.0, help="seconds per stream chunk")
    p.add_argument("--scope", choices=["global", "key"], default="global")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument(
        "--api-key", action="append", default=None, help=f"repeatable; default {DEFAULT_API_KEY}"
    )
    p.add_argument("--any-key", action="store_true", help="accept any non-empty bearer key")
    p.add_argument(
        "--tool-keyword",
        action="append",
        default=[],
        metavar="TOOL=WORD",
        help="a word that makes a user message call TOOL (repeatable)",
    )
    p.add_argument("--concurrency-retry-after", type=float, default=1.0)
    p.add_argument("--record-file", type=Path, default=None, help="write the record here on exit")
    p.add_argument("--log-level", default="warning")
    return p.parse_args(argv)


def _config_from_args(args: argparse.Namespace) -> FakeOpenAIConfig:
    keywords: dict[str, list[str]] = {}
    for pair in args.tool_keyword:
        tool, sep, word = pair.partition("=")
        if not sep or not tool or not word:
            raise SystemExit(f"--tool-keyword wants TOOL=WORD, got {pair!r}")
        keywords.setdefault(tool, []).append(word)
    keys: Iterable[str] = () if args.any_key else (args.api_key or [DEFAULT_API_KEY])
    return FakeOpenAIConfig(
        api_keys=tuple(keys),
        max_in_flight=args.max_in_flight,
        rpm=args.rpm,
        tpm=args.tpm,
        window_seconds=args.window_seconds,
        quota=args.quota,
        latency=args.latency,
        chunk_latency=args.chunk_latency,
        scope=args.scope,
        model=args.model,
        tool_keywords={k: tuple(v) for k, v in keywords.items()},
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
        print(f"fake-openai: {exc}", file=sys.stderr)
        return 2
    app = create_app(config)
    # uvicorn catches SIGTERM/SIGINT to shut down gracefully, then re-raises the signal with
    # the handler it found: this one, so a stop by signal is a clean exit with status 0.
    signal.signal(signal.SIGTERM, _exit_cleanly)
    signal.signal(signal.SIGINT, _exit_cleanly)
    server = _AnnouncingServer(
        uvicorn.Config(
            app,
            host=args.host,
            port=args.port,
            log_level=args.log_level,
            access_log=False,
            lifespan="off",
            ws="none",
            timeout_graceful_shutdown=3,
        )
    )
    try:
        with contextlib.suppress(SystemExit):
            server.run()
    finally:
        if args.record_file is not None:
            args.record_file.write_text(json.dumps(app.state.fake.snapshot(), indent=2))
        print("fake-openai stopped", flush=True)
    return 0 if server.started else 1


if __name__ == "__main__":
    sys.exit(main())
