"""The referee's record: every admission and rejection, counted by key, model and both.

Owns :class:`Admission` (one admitted request, shared with the buckets that hold it),
:class:`Record` (the counters since the last reset) and :func:`record_json` (the JSON that
``FakeOpenAI.snapshot`` returns and ``GET /admin/record`` serves; its shape is documented
there). Called by ``_limits`` only.
"""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .._common import max_in_window
from ._config import FakeOpenAIConfig

if TYPE_CHECKING:
    from ._limits import Bucket

__all__ = ["LIMITED_ENDPOINTS", "REJECTION_REASONS", "Admission", "Record", "record_json"]


LIMITED_ENDPOINTS = ("/v1/chat/completions", "/v1/responses", "/v1/embeddings")
REJECTION_REASONS = (
    "concurrency",
    "requests",
    "tokens",
    "request_too_large",
    "insufficient_quota",
)


@dataclass(eq=False)
class Admission:
    """One admitted request, as the referee saw it."""

    key: str  # masked
    endpoint: str
    model: str
    t: float
    charged: int
    weight: int  # tokens it counts for: the charge, then its real usage once done
    buckets: tuple[Bucket, ...]  # every bucket it was admitted by
    epoch: int
    done_at: float | None = None
    #: The buckets whose token window still holds it (a bucket drops it when it prunes).
    live_in: set[Bucket] = field(default_factory=set)


@dataclass
class _Stats:
    admitted: int = 0
    rejected: Counter[str] = field(default_factory=Counter)

    def rejected_json(self) -> dict[str, int]:
        return {r: self.rejected.get(r, 0) for r in REJECTION_REASONS}


@dataclass
class _KeyStats(_Stats):
    completed: int = 0
    max_in_flight: int = 0
    unauthorized: int = 0


class Record:
    """What the fake saw since it started or was last reset."""

    def __init__(self, epoch: int, in_flight: int, key_in_flight: Mapping[str, int]) -> None:
        self.epoch = epoch
        self.started_at = time.monotonic()
        self.requests_total = 0
        self.completed = 0
        self.unauthorized = 0
        self.bad_requests = 0
        self.max_in_flight = in_flight
        self.admissions: list[Admission] = []
        self.rejections: list[dict[str, Any]] = []
        self.rejected: Counter[str] = Counter()
        self.by_endpoint: Counter[str] = Counter()
        self.by_key: dict[str, _KeyStats] = {
            k: _KeyStats(max_in_flight=n) for k, n in key_in_flight.items() if n
        }
        self.by_model: dict[str, _Stats] = {}
        self.by_key_model: dict[str, _Stats] = {}

    def key(self, label: str) -> _KeyStats:
        return self.by_key.setdefault(label, _KeyStats())

    def _counters(self, label: str, model: str) -> tuple[_Stats, ...]:
        return (
            self.key(label),
            self.by_model.setdefault(model, _Stats()),
            self.by_key_model.setdefault(f"{label}|{model}", _Stats()),
        )

    def admitted(self, adm: Admission, in_flight: int, key_in_flight: int) -> None:
        self.admissions.append(adm)
        self.by_endpoint[adm.endpoint] += 1
        self.max_in_flight = max(self.max_in_flight, in_flight)
        for stats in self._counters(adm.key, adm.model):
            stats.admitted += 1
        key = self.key(adm.key)
        key.max_in_flight = max(key.max_in_flight, key_in_flight)

    def refused(
        self, now: float, reason: str, label: str, endpoint: str, model: str, bucket: str
    ) -> None:
        self.rejected[reason] += 1
        for stats in self._counters(label, model):
            stats.rejected[reason] += 1
        self.rejections.append(
            {
                "t": now,
                "reason": reason,
                "key": label,
                "endpoint": endpoint,
                "model": model,
                "bucket": bucket,
            }
        )


def _window_maxima(admissions: Sequence[Admission], window: float) -> dict[str, int]:
    """The most requests, and the most tokens (at corrected usage), in any rolling window."""
    times = [a.t for a in admissions]
    return {
        "max_requests_in_window": max_in_window(times, window),
        "max_tokens_in_window": max_in_window(times, window, [a.weight for a in admissions]),
    }


def _grouped(
    admissions: Sequence[Admission], name: Callable[[Admission], str]
) -> dict[str, list[Admission]]:
    groups: defaultdict[str, list[Admission]] = defaultdict(list)
    for adm in admissions:
        groups[name(adm)].append(adm)
    return groups


def record_json(
    rec: Record,
    config: FakeOpenAIConfig,
    in_flight: int,
    key_in_flight: Mapping[str, int],
    *,
    detail: bool,
) -> dict[str, Any]:
    """The record as JSON (see ``FakeOpenAI.snapshot`` for its shape)."""
    window = config.window_seconds
    admissions = rec.admissions
    times = [a.t for a in admissions]
    by_key = _grouped(admissions, lambda a: a.key)
    by_model = _grouped(admissions, lambda a: a.model)
    by_key_model = _grouped(admissions, lambda a: f"{a.key}|{a.model}")
    settings = config.to_json()
    limit_names = ("scope", "max_in_flight", "rpm", "tpm", "quota", "model_limits", "key_limits")

    def counted(stats: _Stats, mine: Sequence[Admission]) -> dict[str, Any]:
        return {
            "admitted": stats.admitted,
            **_window_maxima(mine, window),
            "rejected": stats.rejected_json(),
        }

    data: dict[str, Any] = {
        "clock": "time.monotonic",
        "started_at": rec.started_at,
        "now": time.monotonic(),
        "window_seconds": window,
        "limits": {name: settings[name] for name in limit_names},
        "requests_total": rec.requests_total,
        "admitted": len(admissions),
        "completed": rec.completed,
        "in_flight": in_flight,
        "max_in_flight": rec.max_in_flight,
        **_window_maxima(admissions, window),
        "max_charged_tokens_in_window": max_in_window(
            times, window, [a.charged for a in admissions]
        ),
        "tokens_charged": sum(a.charged for a in admissions),
        "tokens_used": sum(a.weight for a in admissions if a.done_at is not None),
        "rejected": {r: rec.rejected.get(r, 0) for r in REJECTION_REASONS},
        "rejected_total": sum(rec.rejected.values()),
        "unauthorized": rec.unauthorized,
        "bad_requests": rec.bad_requests,
        "by_endpoint": {e: rec.by_endpoint.get(e, 0) for e in LIMITED_ENDPOINTS},
        "by_key": {
            label: {
                **counted(stats, by_key.get(label, [])),
                "completed": stats.completed,
                "in_flight": key_in_flight.get(label, 0),
                "max_in_flight": stats.max_in_flight,
                "unauthorized": stats.unauthorized,
            }
            for label, stats in rec.by_key.items()
        },
        "by_model": {
            model: counted(stats, by_model.get(model, [])) for model, stats in rec.by_model.items()
        },
        "by_key_model": {
            name: counted(stats, by_key_model.get(name, []))
            for name, stats in rec.by_key_model.items()
        },
    }
    if detail:
        data["arrivals"] = times
        data["admissions"] = [
            {
                "t": a.t,
                "done": a.done_at,
                "key": a.key,
                "endpoint": a.endpoint,
                "model": a.model,
                "charged": a.charged,
                "tokens": a.weight,
            }
            for a in admissions
        ]
        data["rejections"] = list(rec.rejections)
    return data
