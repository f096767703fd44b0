"""The fake's configuration: what it accepts and enforces, and what may change at runtime.

Owns :class:`FakeOpenAIConfig` (with its per-model and per-key limit tables),
:func:`runtime_changes` (the checks of a ``POST /admin/config`` body) and the two ways the
real API prints things, :func:`mask_key` and :func:`go_duration`. Called by ``_limits``
(the buckets and the record), ``_app`` (the command line, the admin routes) and the
package, which re-exports its public names.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = [
    "DEFAULT_API_KEY",
    "DEFAULT_MODEL",
    "KEY_LIMIT_FIELDS",
    "MODEL_LIMIT_FIELDS",
    "FakeOpenAIConfig",
    "LimitTable",
    "go_duration",
    "mask_key",
    "runtime_changes",
]


DEFAULT_API_KEY = "sk-fake-openai-key"
DEFAULT_MODEL = "gpt-4o-mini"

#: The fields of one entry of ``model_limits`` and of ``key_limits``.
MODEL_LIMIT_FIELDS = ("rpm", "tpm")
KEY_LIMIT_FIELDS = ("rpm", "tpm", "max_in_flight")

#: A limit table: model name (or API key) -> {field: limit or None}.
LimitTable = Mapping[str, Mapping[str, int | None]]

_INT_FIELDS = frozenset({"max_in_flight", "rpm", "tpm", "quota", "stream_chunk_chars"})
_TABLE_FIELDS = frozenset({"model_limits", "key_limits"})
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
        *_TABLE_FIELDS,
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
    #: Per-model limits, like the real API's: model -> {"rpm", "tpm"} (a field left out or
    #: null is no limit). With scope "key" every (key, model) pair has its own bucket with
    #: these limits, with scope "global" every model has one bucket for all keys; a request
    #: must fit its model's bucket as well as its key's (or the global) one.
    model_limits: LimitTable = field(default_factory=dict)
    #: Per-key limits (scope "key" only: an error with scope "global"): API key ->
    #: {"rpm", "tpm", "max_in_flight"}, each replacing the field of the same name for that
    #: key (a field left out keeps the config's value, null is no limit).
    key_limits: LimitTable = field(default_factory=dict)

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
        tables = {
            "model_limits": _limit_table("model_limits", self.model_limits, MODEL_LIMIT_FIELDS),
            "key_limits": _limit_table("key_limits", self.key_limits, KEY_LIMIT_FIELDS),
        }
        if tables["key_limits"] and self.scope != "key":
            raise ValueError(
                "key_limits needs scope 'key' (with scope 'global' keys share one bucket)"
            )
        for name, table in tables.items():  # plain dicts: checked, copied, JSON-ready
            object.__setattr__(self, name, table)

    def to_json(self) -> dict[str, Any]:
        """The configuration as JSON, keys masked."""
        data = dataclasses.asdict(self)
        data["api_keys"] = [mask_key(k) for k in self.api_keys]
        data["tool_keywords"] = {k: list(v) for k, v in self.tool_keywords.items()}
        data["key_limits"] = {mask_key(k): dict(v) for k, v in self.key_limits.items()}
        return data


def _limit_table(name: str, table: Any, fields: Sequence[str]) -> dict[str, dict[str, int | None]]:
    """``table`` checked and copied, or a ValueError naming the entry and field at fault."""
    what = "an API key" if name == "key_limits" else "a model name"
    shape = f"{name} must be an object of {what} -> {{{', '.join(fields)}}}"
    if not isinstance(table, Mapping):
        raise ValueError(f"{shape}, got {type(table).__name__}")
    checked: dict[str, dict[str, int | None]] = {}
    for entry, limits in table.items():
        if not isinstance(entry, str) or not entry:
            raise ValueError(f"{shape}: {entry!r} is not a non-empty string")
        where = f"{name}[{(mask_key(entry) if name == 'key_limits' else entry)!r}]"
        if not isinstance(limits, Mapping):
            raise ValueError(f"{shape}: {where} is {type(limits).__name__}, not an object")
        unknown = sorted(map(str, set(limits) - set(fields)))
        if unknown:
            raise ValueError(f"{where} has unknown field(s) {unknown}; allowed: {list(fields)}")
        for key, value in limits.items():
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value < 0
            ):
                raise ValueError(f"{where}.{key} must be an integer >= 0 or null, got {value!r}")
        checked[entry] = dict(limits)
    return checked


def runtime_changes(changes: Mapping[str, Any]) -> dict[str, Any]:
    """The body of ``POST /admin/config`` checked, as keyword arguments of ``replace``.

    A limit table (``model_limits``, ``key_limits``) replaces the whole table; the config's
    own checks run when the new config is built.
    """
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
        elif name in _TABLE_FIELDS:
            continue  # checked (and copied) by the new config's __post_init__
        elif name in _INT_FIELDS:
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise ValueError(f"{name} must be an integer or null")
        elif isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"{name} must be a number")
    return values


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
