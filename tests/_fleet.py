"""The multi-process referee: worker processes of one test, and the bounds their reports must obey.

Owns :class:`Fleet` (start ``python -m <module>`` workers, synchronise with them through
Redis lists, collect their JSON reports, reap them) and the exact checks on what they
observed (:func:`max_overlap`, :func:`window_violations`, :func:`most_admissions`). Used by
test_multiprocess, test_multiprocess_calls (``CallFleet``), test_cluster (``ClusterFleet``)
and test_fail_open (``max_overlap``).
"""

from __future__ import annotations

import asyncio
import json
import math
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import IO, Any

import redis.asyncio as aioredis

__all__ = [
    "API",
    "START_WITHIN",
    "Fleet",
    "Worker",
    "max_overlap",
    "most_admissions",
    "window_violations",
]

ROOT = Path(__file__).resolve().parent.parent
API = "mp"
#: Seconds a worker may take to start, connect and say ready (a loaded 2-core machine).
START_WITHIN = 30.0


class Worker:
    __slots__ = ("log", "log_path", "name", "out", "proc")

    def __init__(
        self, name: str, proc: subprocess.Popen[bytes], out: Path, log_path: Path, log: IO[bytes]
    ) -> None:
        self.name = name
        self.proc = proc
        self.out = out
        self.log_path = log_path
        self.log = log


class Fleet:
    """Worker processes of one test, and the Redis lists they synchronise through."""

    #: The module the workers run (``python -m <module> ROLE CONFIG_JSON``).
    module = "tests._workers"
    #: Configuration every worker gets unless the test says otherwise.
    defaults: dict[str, Any] = {"api": API}  # noqa: RUF012 - read-only, overridden whole

    def __init__(self, url: str, client: aioredis.Redis, tmp_path: Path) -> None:
        self.url = url
        self.client = client
        self.dir = tmp_path
        self.sync = f"sync:{uuid.uuid4().hex[:8]}"
        self.workers: dict[str, Worker] = {}

    def start(self, role: str, name: str, **cfg: Any) -> Worker:
        out = self.dir / f"{name}.json"
        log_path = self.dir / f"{name}.log"
        config = {"url": self.url, "sync": self.sync, "name": name, "out": str(out)}
        config.update(self.defaults)
        config.update(cfg)
        log = log_path.open("wb")
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", self.module, role, json.dumps(config)],
                cwd=ROOT,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        except BaseException:
            log.close()
            raise
        self.workers[name] = Worker(name, proc, out, log_path, log)
        return self.workers[name]

    def logs(self) -> str:
        parts = []
        for w in self.workers.values():
            w.log.flush()
            text = w.log_path.read_text(errors="replace")[-3000:]
            parts.append(f"--- {w.name} (exit {w.proc.poll()}) ---\n{text}")
        return "\n".join(parts)

    def check_alive(self) -> None:
        """Fail at once, with the logs, when a worker already exited with an error."""
        for w in self.workers.values():
            if w.proc.poll() not in (None, 0, -signal.SIGKILL):
                raise AssertionError(f"worker {w.name} failed\n{self.logs()}")

    async def pop(self, what: str, within: float = START_WITHIN) -> Any:
        """The next JSON payload a worker pushed to ``<sync>:<what>``."""
        key = f"{self.sync}:{what}"
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            got = await self.client.blpop([key], timeout=0.5)
            if got is not None:
                return json.loads(got[1])
            self.check_alive()
        raise AssertionError(f"no {what!r} from the workers within {within}s\n{self.logs()}")

    async def ready(self, n: int) -> None:
        """Return once ``n`` workers are connected and blocked on their go signal."""
        for _ in range(n):
            await self.pop("ready")

    async def push(self, what: str, payload: Any = None) -> None:
        await self.client.rpush(f"{self.sync}:{what}", json.dumps(payload))

    async def go(self, *names: str, **payload: Any) -> None:
        for name in names:
            await self.push(f"go:{name}", payload)

    async def result(self, name: str, within: float = 30.0) -> dict[str, Any]:
        """Wait for worker ``name`` to exit cleanly and return its report."""
        w = self.workers[name]
        try:
            code = await asyncio.to_thread(w.proc.wait, within)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{name} still running after {within}s\n{self.logs()}") from None
        data: dict[str, Any] = json.loads(w.out.read_text()) if w.out.exists() else {}
        assert code == 0, f"{name} exited {code}: {data.get('error')}\n{self.logs()}"
        return data

    def kill(self, name: str) -> None:
        """SIGKILL worker ``name`` and reap it."""
        proc = self.workers[name].proc
        proc.send_signal(signal.SIGKILL)
        proc.wait()

    def close(self) -> None:
        for w in self.workers.values():
            if w.proc.poll() is None:
                w.proc.kill()
            w.proc.wait()
            w.log.close()


# -- observations -> bounds -----------------------------------------------------------


def max_overlap(intervals: Iterable[tuple[int, int]]) -> int:
    """Most closed intervals sharing one instant (an end and a start at the same ns don't)."""
    events = sorted(e for s, t in intervals for e in ((s, 1), (t, -1)))
    peak = current = 0
    for _, step in events:
        current += step
        peak = max(peak, current)
    return peak


def window_violations(times: Sequence[int], limit: int, period_us: int) -> list[tuple[int, int]]:
    """Pairs (t_i, t_{i+limit}) closer than the period: limit + 1 admissions in one window."""
    ts = sorted(times)
    return [
        (ts[i], ts[i + limit]) for i in range(len(ts) - limit) if ts[i + limit] - ts[i] < period_us
    ]


def most_admissions(rates: Sequence[Sequence[float]], span_us: int) -> int:
    """Largest number of admissions the windows allow in a half-open span."""
    return min(int(n) * math.ceil(span_us / round(p * 1e6)) for n, p in rates)
