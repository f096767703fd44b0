"""Admission inside one process while Redis is unreachable (``on_redis_error="fail_open"``).

Each replica admits at most its share of every limit: ``limit // replicas`` concurrent
slots, ``limit // replicas`` per window, ``tokens_per_minute // replicas`` tokens, with
``replicas`` the count of live limiters the heartbeat last read from Redis. Summed over the
fleet that never exceeds a limit, whatever Redis does meanwhile.
"""

from __future__ import annotations

import asyncio
import math
from collections import deque

from ._config import APILimits
from ._contract import KeyPlan

__all__ = ["LocalGate"]


class LocalGate:
    """One API's (or one key's) share of its limits, enforced in this process only."""

    __slots__ = (
        "changed",
        "in_flight",
        "logs",
        "max_concurrent",
        "names",
        "paused_until",
        "windows",
    )

    def __init__(self, plan: KeyPlan, limits: APILimits, replicas: int) -> None:
        share = max(1, replicas)
        self.max_concurrent = (
            None if limits.max_concurrent is None else limits.max_concurrent // share
        )
        #: (limit, period in seconds, kind "r" requests / "t" tokens) per window.
        self.windows = [(w.limit // share, w.period_us / 1_000_000, w.kind) for w in plan.windows]
        self.names = tuple(w.name for w in plan.windows)
        self.logs: list[deque[tuple[float, int]]] = [deque() for _ in self.windows]
        self.in_flight = 0
        self.paused_until = 0.0
        self.changed = asyncio.Event()

    def impossible(self, cost: int, tokens: int) -> str | None:
        """Why a request of this weight can never pass here (a share of 0), else None."""
        if self.max_concurrent == 0:
            return "concurrency"
        for (limit, _, kind), name in zip(self.windows, self.names, strict=True):
            if (tokens if kind == "t" else cost) > limit:
                return name
        return None

    def check(self, now: float, cost: int, tokens: int) -> tuple[str | None, float]:
        """``(None, 0)`` when the request fits now, else the limit and seconds to wait."""
        if now < self.paused_until:
            return "cooldown", self.paused_until - now
        if self.max_concurrent is not None and self.in_flight >= self.max_concurrent:
            return "concurrency", math.inf
        for (limit, period, kind), log, name in zip(
            self.windows, self.logs, self.names, strict=True
        ):
            while log and log[0][0] <= now - period:
                log.popleft()
            weight = tokens if kind == "t" else cost
            used = sum(w for _, w in log)
            if used + weight > limit:
                # Wait until enough of the oldest entries have left the window.
                freed = 0
                for at, w in log:
                    freed += w
                    if used - freed + weight <= limit:
                        return name, at + period - now
                return name, period  # pragma: no cover - weight <= limit always frees
        return None, 0.0

    def take(self, now: float, cost: int, tokens: int) -> None:
        self.in_flight += 1
        for (_, _, kind), log in zip(self.windows, self.logs, strict=True):
            log.append((now, tokens if kind == "t" else cost))

    def give_back(self) -> None:
        self.in_flight -= 1
        self.changed.set()
        self.changed = asyncio.Event()
