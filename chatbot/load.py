"""Load driver: users sending messages to the replicas, like a messaging app would."""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx2

__all__ = ["LoadResult", "run_load"]

TOOL_TEXTS = (
    "Please send an email to ana@example.com saying the order shipped",
    "Add a spreadsheet row with today's sales to the Sales sheet",
    "Create a calendar event for the team meeting tomorrow",
)


@dataclass
class LoadResult:
    """What the users saw."""

    sent: int = 0
    answered: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    latencies: list[float] = field(default_factory=list)
    tool_calls: int = 0
    #: Messages sent again to another replica after one failed to answer (crashed).
    resent: int = 0
    started: float = 0.0
    finished: float = 0.0
    #: Per user, the order in which its replies came back (message numbers).
    order: dict[str, list[int]] = field(default_factory=dict)

    @property
    def elapsed(self) -> float:
        return max(self.finished - self.started, 1e-9)

    def percentile(self, q: float) -> float:
        if not self.latencies:
            return 0.0
        data = sorted(self.latencies)
        return data[min(len(data) - 1, int(q * len(data)))]


async def run_load(
    targets: Sequence[str],
    users: int,
    messages: int,
    *,
    tool_every: int = 3,
    timeout: float = 180.0,
    progress: Callable[[LoadResult], None] | None = None,
    seed: int = 7,
) -> LoadResult:
    """``users`` users each send ``messages`` messages, one after the other, to replicas
    taken in turn; every ``tool_every``-th message asks for a Zapier action."""
    rng = random.Random(seed)
    result = LoadResult(started=time.monotonic())
    dead: dict[str, float] = {}
    replica = itertools.cycle(targets)
    limits = httpx2.Limits(max_connections=users + 10, max_keepalive_connections=users + 10)
    async with httpx2.AsyncClient(timeout=timeout, limits=limits) as client:

        async def user(u: int) -> None:
            name = f"user-{u:03d}"
            result.order[name] = []
            await asyncio.sleep(rng.random() * 0.2)
            for m in range(messages):
                if tool_every and (u + m) % tool_every == tool_every - 1:
                    text = f"{TOOL_TEXTS[(u + m) % len(TOOL_TEXTS)]} (message {m})"
                else:
                    text = f"Hello, this is {name}, message {m}: what are your opening hours?"
                body: dict[str, Any] = {"user_id": name, "text": text, "images": []}
                result.sent += 1
                began = time.monotonic()
                response = None
                last = "no replica up"
                for _ in range(len(targets) + 1):
                    target = next(replica)
                    if dead.get(target, 0) > time.monotonic():
                        continue
                    try:
                        response = await client.post(f"{target}/messages", json=body)
                        break
                    except httpx2.HTTPError as exc:
                        # Like a load balancer: a replica that is down gets no traffic for
                        # a while, and the message goes to another one.
                        dead[target] = time.monotonic() + 5.0
                        result.resent += 1
                        last = type(exc).__name__
                if response is None:
                    result.errors[last] = result.errors.get(last, 0) + 1
                    continue
                if response.status_code == 200:
                    result.answered += 1
                    result.latencies.append(time.monotonic() - began)
                    result.tool_calls += len(response.json().get("tool_calls", []))
                    result.order[name].append(m)
                else:
                    key = f"HTTP {response.status_code}"
                    result.errors[key] = result.errors.get(key, 0) + 1
                if progress is not None:
                    progress(result)

        await asyncio.gather(*(user(u) for u in range(users)))
    result.finished = time.monotonic()
    return result
