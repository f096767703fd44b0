"""``python -m chatbot cluster``: Redis, both fake providers and N replicas, a bounded load,
live progress, and a report judged by the fake providers' own records.

Everything runs as separate processes on 127.0.0.1 and free ports, started and stopped here.
The demo scales the providers' windows down (a 5 s "minute") so that a run of a minute
or two crosses many windows; the limiter gets exactly the same limits as the fakes.

With ``without_seconds`` (``--without-seconds``, 8 s by default from the command line), as
many more replicas start with the cluster, each with a limiter of its own (its own
``LIMITER_NAMESPACE``: it keeps the limits by itself, as the original per-process
``asyncio.Semaphore`` did, and knows nothing of the others). After the run, the same users
send the same messages to those for that many seconds, to the same fakes (their records
reset first), and the report shows what the providers saw then next to the shared
limiter's 0 excess (:func:`run_without`). ``--keep`` leaves the cluster running after the
report until Ctrl-C (:func:`keep_running`).

``--noisy-user`` runs the scenario twice, each on a cluster of its own: as is, then with a
noisy user and a batch job (``POST /batch``, priority 0) pressing on the same limits, and
compares the ordinary users' waits in the limiter (:func:`run_noisy`).

``--cache`` starts the replicas with ``CACHE_TTL`` (300 s): each asks OpenAI at
temperature 0 through a response cache in the shared Redis (``limiter.http.ResponseCache``),
and every third user opens with one of a few common questions (``chatbot.load.FAQ_TEXTS``),
identical requests across users and replicas. The report then gives the cache's hits,
misses and hit rate from the cluster's own counters (``stats("openai")["cache"]``, a
replica's ``/stats``), and counts the OpenAI requests as messages + tool messages - hits
(:func:`_requests_line`, :func:`_cache_line`). Without it, the replicas have no cache
(``CACHE_TTL`` empty, whatever this process's environment holds) and the report says
nothing of one.

Two OpenAI keys and two models (:func:`demo_config`, what the command line runs unless
``--one-key``): the fake OpenAI limits each key on its own (scope "key": in flight and per
window) and the larger model on each key (``model_limits``); the replicas get both keys
(``OPENAI_API_KEYS``) as the limiter's deployments of ``openai``, with the same limits,
and answer the messages that ask for an answer "in detail" (every 4th) with
``OPENAI_LARGE_MODEL``. The report gives, per key and per model, the fake's own count of
the requests, the most in any window against the limit, and each one's share.

``--tier-change`` lowers the first key's limit at the fake (``POST /admin/config``) once
a sixth of the messages are answered, to a fifth of what the limiter was configured with;
the replicas learn it from the fake's rate-limit headers (``learn_from_headers``, per
deployment). The limiter learns only per-minute limits (``x-ratelimit-limit-requests`` is
per minute), so that run keeps OpenAI's windows a real minute long. The report gives the
limit the limiter learned (a replica's ``/stats``), the fake's 429s on that key against
the requests in flight at the change, and that key's and the other's use after it
(:class:`TierChange`, :meth:`ClusterReport.tier_view`).
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import httpx2
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from limiter import ConfigError
from limiter.http import ResponseCache
from limiter.testing import RedisServer, free_port

from .fakes._common import max_in_window
from .fakes.openai_server import mask_key
from .load import BATCH_JOB, FAQ_TEXTS, LARGE_KEYWORD, NOISY_USER, LoadResult, run_load

__all__ = [
    "ClusterConfig",
    "ClusterReport",
    "NoisyReport",
    "OpenAIKey",
    "TierChange",
    "demo_config",
    "keep_running",
    "run_cluster",
    "run_noisy",
    "run_on",
    "run_without",
]

OPENAI_KEY = "sk-fake-openai-key"
ZAPIER_TOKEN = "fake-zapier-token"
#: The demo's two OpenAI keys: values only the fake accepts. Printed masked, as the real
#: API prints keys (``mask_key``: ``sk-f**********0001``), never whole.
KEY_A = "sk-fake-key-a-0001"
KEY_B = "sk-fake-key-b-0002"
SMALL_MODEL = "gpt-4o-mini"
LARGE_MODEL = "gpt-4o"


@dataclass(frozen=True)
class OpenAIKey:
    """One OpenAI key: its deployment's name in the limiter, the key (never printed) and its
    limits, the same at the fake and in the limiter: in flight, and per OpenAI window."""

    name: str
    key: str = field(repr=False)
    concurrent: int
    per_window: int

    @property
    def masked(self) -> str:
        """The key as the fake's record (and the real API) shows it."""
        return mask_key(self.key)


#: ``make demo``'s keys: 5 + 3 in flight, 50 + 30 per 10 s (the one-key demo's 8 and 80).
DEMO_KEYS = (OpenAIKey("key-a", KEY_A, 5, 50), OpenAIKey("key-b", KEY_B, 3, 30))


@dataclass(frozen=True)
class ClusterConfig:
    """The demo's limits: the same numbers for the fakes (referees) and the limiter."""

    replicas: int = 3
    users: int = 30
    messages: int = 8
    tool_every: int = 4
    openai_concurrent: int = 8
    openai_per_window: int = 80
    openai_window: float = 10.0
    openai_latency: float = 0.25
    zapier_concurrent: int = 3
    zapier_per_minute: int = 30
    zapier_minute: float = 5.0
    zapier_per_hour: int = 75
    zapier_hour: float = 60.0
    zapier_latency: float = 0.3
    #: Seconds added to every window (DESIGN: admission-to-arrival jitter; a replica's
    #: event loop can stall ~0.1 s in a garbage collection after admission).
    window_margin: float = 0.15
    lease_ttl: float = 5.0
    ticket_ttl: float = 2.0
    #: A noisy user meaning to send this many times the others' messages (0: none),
    #: ``noisy_in_flight`` at once, while the others send theirs.
    noisy: int = 0
    noisy_in_flight: int = 4
    #: Items a batch job keeps in flight at POST /batch (priority 0) meanwhile (0: none).
    batch_workers: int = 0
    #: Seconds of the same load, after the run, on as many replicas that each keep the
    #: limits by themselves (no shared limiter); 0: no such phase, and no such replicas.
    without_seconds: float = 0.0
    #: The replicas' ``CACHE_TTL``, seconds: a response cache for OpenAI, and completions at
    #: temperature 0; 0: no cache.
    cache_ttl: float = 0.0
    #: Every ``faq_every``-th user opens with one of ``FAQ_TEXTS`` (``run_load``); 0: none.
    faq_every: int = 0
    #: Several OpenAI keys, the limiter's deployments of ``openai``: the fake limits each
    #: on its own (scope "key") and the limiter each deployment alike, and the API's
    #: in-flight limit is their sum (``openai_concurrent`` and ``openai_per_window`` are
    #: then unused). Empty: one key, ``OPENAI_KEY``, with those two limits.
    openai_keys: tuple[OpenAIKey, ...] = ()
    #: The larger model (``OPENAI_LARGE_MODEL``), for the messages that ask for an answer
    #: "in detail" (``large_every``, see ``run_load``); "": one model for all.
    large_model: str = ""
    large_every: int = 0
    #: The larger model's limit per OpenAI window, on each key (the fake's
    #: ``model_limits``, per key with several keys); None: none of its own.
    large_per_window: int | None = None
    #: ``APILimits.learn_from_headers`` of ``openai``: limits learned per minute only.
    learn_from_headers: bool = False
    #: After this many answers, the first key's limit per window at the fake drops to
    #: ``tier_change_per_window`` (``POST /admin/config``); 0: no change.
    tier_change_after: int = 0
    tier_change_per_window: int = 0

    @property
    def openai_in_flight_limit(self) -> int:
        """OpenAI's requests in flight at most: the keys' sum, or ``openai_concurrent``."""
        if self.openai_keys:
            return sum(k.concurrent for k in self.openai_keys)
        return self.openai_concurrent

    @property
    def openai_window_limit(self) -> int:
        """OpenAI's requests per window at most: the keys' sum, or ``openai_per_window``."""
        if self.openai_keys:
            return sum(k.per_window for k in self.openai_keys)
        return self.openai_per_window

    @property
    def large_window_limit(self) -> int | None:
        """The larger model's requests per window at most, all keys together."""
        if self.large_per_window is None:
            return None
        return self.large_per_window * max(1, len(self.openai_keys))

    def openai_key_limits(
        self, per_window: dict[str, int] | None = None
    ) -> dict[str, dict[str, int | None]]:
        """The fake's ``key_limits`` (by key: sent to the fake only, never printed), with
        ``per_window`` (deployment name -> limit) replacing some keys' limit per window."""
        new = per_window or {}
        return {
            k.key: {"rpm": new.get(k.name, k.per_window), "max_in_flight": k.concurrent}
            for k in self.openai_keys
        }

    def _openai_json(self) -> dict[str, Any]:
        window = self.openai_window
        models: dict[str, Any] = {}
        if self.large_model and self.large_per_window is not None:
            models[self.large_model] = {"rates": [[self.large_per_window, window]]}
        spec: dict[str, Any] = {"max_concurrent": self.openai_in_flight_limit}
        if self.openai_keys:
            spec["deployments"] = {
                k.name: {
                    "max_concurrent": k.concurrent,
                    "rates": [[k.per_window, window]],
                    **({"models": models} if models else {}),
                }
                for k in self.openai_keys
            }
        else:
            spec["rates"] = [[self.openai_per_window, window]]
            if models:
                spec["models"] = models
        if self.learn_from_headers:
            spec["learn_from_headers"] = True
        return {
            **spec,
            "window_margin": self.window_margin,
            "backoff_min": 0.2,
            "backoff_max": 2.0,
            "lease_ttl": self.lease_ttl,
        }

    def limits_json(self) -> str:
        return json.dumps(
            {
                "openai": self._openai_json(),
                "zapier": {
                    "max_concurrent": self.zapier_concurrent,
                    "rates": [
                        [self.zapier_per_minute, self.zapier_minute],
                        [self.zapier_per_hour, self.zapier_hour],
                    ],
                    "window_margin": self.window_margin,
                    "backoff_min": 0.2,
                    "backoff_max": 2.0,
                    "lease_ttl": self.lease_ttl,
                },
            }
        )


def demo_config(
    replicas: int = 3, users: int = 30, messages: int = 8, *, tier_change: bool = False
) -> ClusterConfig:
    """The demo: two OpenAI keys (:data:`DEMO_KEYS`) and two models, gpt-4o-mini and, for
    every 4th message (it asks for an answer "in detail"), gpt-4o at 10 per 10 s on each
    key.

    ``tier_change``: OpenAI's windows a real minute long (the limiter learns per-minute
    limits only), the keys at 300 a minute each and gpt-4o at 60 a minute on each (room
    for the whole load: the keys' in-flight limits pace it), the limiter learning from
    the headers, and, once a sixth of the messages are answered, key-a lowered to 60 a
    minute at the fake.
    """
    config = ClusterConfig(
        replicas=replicas,
        users=users,
        messages=messages,
        openai_keys=DEMO_KEYS,
        large_model=LARGE_MODEL,
        large_every=4,
        large_per_window=10,
    )
    if not tier_change:
        return config
    return replace(
        config,
        openai_window=60.0,
        openai_keys=tuple(replace(k, per_window=300) for k in DEMO_KEYS),
        large_per_window=60,
        learn_from_headers=True,
        tier_change_after=max(1, users * messages // 6),
        tier_change_per_window=60,
    )


@dataclass(frozen=True)
class TierChange:
    """The first key's limit lowered at the fake mid-run (``--tier-change``), as it stood
    right after the fake took it."""

    #: The key (its deployment's name), and its limit per window before and after.
    key: str
    configured: int
    new_limit: int
    #: Answers when the change was sent.
    after: int
    #: ``time.monotonic()`` when the change was sent and when the fake had taken it (the
    #: fake's record uses the same clock).
    sent: float
    at: float
    #: The key's requests in flight right then: the limiter's slots (a replica's
    #: ``/stats``), and at the fake.
    in_flight: int
    in_flight_at_fake: int
    #: The key's requests in the fake's window right then (its own record).
    in_window: int


@dataclass
class ClusterReport:
    """What the users saw and what the providers recorded."""

    config: ClusterConfig
    load: LoadResult
    openai: dict[str, Any]
    zapier: dict[str, Any]
    killed: str | None = None
    #: Last time (time.monotonic) OpenAI's window held a request back.
    saturated_until: float | None = None
    #: The limiter's cluster-wide ``stats()`` per API at the end of the load (a replica's
    #: ``/stats``); empty when no replica answered.
    stats: dict[str, Any] = field(default_factory=dict)
    #: Seconds the replicas' admissions waited in the limiter, per API, all replicas summed
    #: (the sums of their ``limiter_wait_seconds`` histograms; a killed replica's are lost).
    waited: dict[str, float] = field(default_factory=dict)
    #: The same users on replicas without a shared limiter, for ``without_seconds``.
    without: ClusterReport | None = None
    #: The first key's limit lowered mid-run (``config.tier_change_after``).
    tier: TierChange | None = None

    @property
    def by_key(self) -> dict[str, dict[str, Any]]:
        """Per OpenAI key (by deployment name), from the fake's own record: requests
        admitted and their share of all, the key's share of the capacity (its limit per
        window over all keys'), the most in flight and in any window with the limits, and
        the 429s it got. Empty with one key."""
        c, o = self.config, self.openai
        total = int(o.get("admitted", 0))
        out: dict[str, dict[str, Any]] = {}
        for k in c.openai_keys:
            rec = o.get("by_key", {}).get(k.masked, {})
            admitted = int(rec.get("admitted", 0))
            out[k.name] = {
                "key": k.masked,
                "admitted": admitted,
                "share": admitted / total if total else 0.0,
                "capacity_share": k.per_window / c.openai_window_limit,
                "max_in_flight": int(rec.get("max_in_flight", 0)),
                "in_flight_limit": k.concurrent,
                "max_requests_in_window": int(rec.get("max_requests_in_window", 0)),
                "limit": k.per_window,
                "rejected": sum(int(n) for n in rec.get("rejected", {}).values()),
            }
        return out

    @property
    def by_model(self) -> dict[str, dict[str, Any]]:
        """Per model, from the fake's own record: requests admitted and their share, the
        most in any window with the model's own limit (all keys together; None: it has
        none, its keys' limits apply), the 429s, and with several keys the same per key
        (``"keys"``). Empty with one model."""
        c, o = self.config, self.openai
        if not c.large_model:
            return {}
        total = int(o.get("admitted", 0))
        out: dict[str, dict[str, Any]] = {}
        for model in (SMALL_MODEL, c.large_model):
            rec = o.get("by_model", {}).get(model, {})
            admitted = int(rec.get("admitted", 0))
            own = model == c.large_model
            row: dict[str, Any] = {
                "admitted": admitted,
                "share": admitted / total if total else 0.0,
                "max_requests_in_window": int(rec.get("max_requests_in_window", 0)),
                "limit": c.large_window_limit if own else None,
                "rejected": sum(int(n) for n in rec.get("rejected", {}).values()),
            }
            if c.openai_keys:
                row["keys"] = {}
                for k in c.openai_keys:
                    kr = o.get("by_key_model", {}).get(f"{k.masked}|{model}", {})
                    row["keys"][k.name] = {
                        "admitted": int(kr.get("admitted", 0)),
                        "max_requests_in_window": int(kr.get("max_requests_in_window", 0)),
                        "limit": c.large_per_window if own else None,
                        "rejected": sum(int(n) for n in kr.get("rejected", {}).values()),
                    }
            out[model] = row
        return out

    def tier_view(self) -> dict[str, Any] | None:
        """What followed the tier change, from the fake's own record (admission and 429
        times) and the limiter's stats at the end: the limit the limiter learned for the
        key, the fake's 429s on it since the change was sent, its requests admitted since
        the fake took it and the most in any window that ends at one of those, and each
        other key's requests admitted since. None without a change."""
        t = self.tier
        if t is None:
            return None
        c, o = self.config, self.openai
        label = {k.name: k.masked for k in c.openai_keys}
        window = c.openai_window
        times: dict[str, list[float]] = {name: [] for name in label}
        by_label = {v: k for k, v in label.items()}
        for adm in o.get("admissions", []):
            name = by_label.get(adm["key"])
            if name is not None:
                times[name].append(float(adm["t"]))
        mine = sorted(times[t.key])
        after = [x for x in mine if x >= t.at]
        # For each admission since: the key's admissions in the window that ends there.
        most = max(
            (
                i + 1 - bisect.bisect_right(mine, x - window)
                for i, x in enumerate(mine)
                if x >= t.at
            ),
            default=0,
        )
        rejected = [
            r for r in o.get("rejections", []) if r["key"] == label[t.key] and r["t"] >= t.sent
        ]
        deployment = self.stats.get("openai", {}).get("deployments", {}).get(t.key, {})
        return {
            "key": t.key,
            "masked": label[t.key],
            "after_answers": t.after,
            "configured": t.configured,
            "new_limit": t.new_limit,
            "in_flight_at_change": t.in_flight,
            "in_flight_at_fake": t.in_flight_at_fake,
            "in_window_at_change": t.in_window,
            "learned": deployment.get("learned", {}),
            "window_at_end": deployment.get("windows", {}).get(f"rate:{window:g}s", {}),
            "rejected_after": len(rejected),
            "admitted_after": len(after),
            "max_in_window_after": most,
            "others_admitted_after": {
                name: sum(1 for x in ts if x >= t.at) for name, ts in times.items() if name != t.key
            },
        }

    @property
    def cache(self) -> dict[str, int] | None:
        """The response cache's ``hits`` and ``misses``, every replica's (the cluster's
        counters, ``stats("openai")["cache"]``); None without a cache or without stats."""
        if self.config.cache_ttl <= 0:
            return None
        counts = self.stats.get("openai", {}).get("cache")
        if not isinstance(counts, dict):
            return None
        return {"hits": int(counts["hits"]), "misses": int(counts["misses"])}

    @property
    def openai_sent_in_window(self) -> int:
        """The most requests that reached OpenAI within one of its rolling windows, the
        ones it refused (429) included: by its own record's arrival times."""
        times = [float(t) for t in self.openai.get("arrivals", [])]
        times += [float(r["t"]) for r in self.openai.get("rejections", [])]
        return max_in_window(times, self.config.openai_window)

    @property
    def excess(self) -> dict[str, int]:
        """How far each provider's record went past each limit (0 everywhere is the goal)."""
        c, o, z = self.config, self.openai, self.zapier
        out = {
            "openai in flight": max(0, o["max_in_flight"] - c.openai_in_flight_limit),
            "openai per window": max(0, o["max_requests_in_window"] - c.openai_window_limit),
            "openai 429s": o["rejected_total"],
            "zapier in flight": max(0, z["max_concurrent"] - c.zapier_concurrent),
            "zapier per minute": max(0, z["max_starts_in_minute_window"] - c.zapier_per_minute),
            "zapier per hour": max(0, z["max_starts_in_hour_window"] - c.zapier_per_hour),
            "zapier 429s": z["rejected_429"],
        }
        for name, row in self.by_key.items():
            out[f"openai {name} in flight"] = max(0, row["max_in_flight"] - row["in_flight_limit"])
            out[f"openai {name} per window"] = max(0, row["max_requests_in_window"] - row["limit"])
        for model, row in self.by_model.items():
            if row["limit"] is None:
                continue
            for name, per_key in row.get("keys", {}).items():
                most, limit = per_key["max_requests_in_window"], per_key["limit"]
                out[f"openai {model} on {name} per window"] = max(0, most - limit)
            if "keys" not in row:
                out[f"openai {model} per window"] = max(
                    0, row["max_requests_in_window"] - row["limit"]
                )
        tier = self.tier_view()
        if tier is not None:
            # The requests in flight at the change could not know of it: their 429s are the
            # price of the provider's change, not the limiter's excess.
            out["openai 429s"] -= min(tier["rejected_after"], tier["in_flight_at_change"])
            key = f"openai {tier['key']} per window after the tier change"
            out[key] = max(0, tier["max_in_window_after"] - tier["new_limit"])
        return out

    @property
    def openai_utilisation(self) -> float:
        """Admitted OpenAI requests / the most its window allows, while requests waited.

        Counted from the fake's own arrival times over the whole periods from the first
        arrival to the last moment the window held a request back (after that, demand, not
        the limit, set the pace): the window allows ``limit`` per ``period`` (the window
        margin's cost is part of what this measures).
        """
        arrivals = sorted(float(t) for t in self.openai.get("arrivals", []))
        if len(arrivals) < 2 or self.saturated_until is None:
            return 0.0
        period = self.config.openai_window
        windows = math.floor((self.saturated_until - arrivals[0]) / period)
        if windows < 1:
            return 0.0
        end = arrivals[0] + windows * period
        counted = [t for t in arrivals if t < end]
        return len(counted) / (self.config.openai_window_limit * windows)


class _Proc:
    """A child process logging to a file (a pipe nobody reads would fill and block it)."""

    def __init__(
        self, name: str, logdir: str, argv: list[str], env: dict[str, str] | None = None
    ) -> None:
        self.name = name
        self.log_path = os.path.join(logdir, f"{name}.log")
        self._log = open(self.log_path, "w")  # noqa: SIM115 - closed in stop()
        self.popen = subprocess.Popen(
            argv,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )

    def output(self) -> str:
        with open(self.log_path) as fh:
            return fh.read()

    def wait_for_line(self, pattern: str, timeout: float = 30.0) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = re.search(pattern, self.output())
            if found:
                return found
            if self.popen.poll() is not None:
                break
            time.sleep(0.05)
        raise RuntimeError(f"{self.name} did not start:\n{self.output()[-2000:]}")

    def stop(self) -> None:
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout=8)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait()
        self._log.close()

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        self.popen.wait()


class Cluster:
    """Redis, the fakes and N replicas, as processes; a context manager that stops them all."""

    def __init__(self, config: ClusterConfig) -> None:
        self.config = config
        self.procs: list[_Proc] = []
        self.replicas: list[tuple[_Proc, str]] = []
        #: Replicas that each keep the limits alone (``config.without_seconds``).
        self.alone: list[tuple[_Proc, str]] = []
        self.redis: RedisServer | None = None
        self.openai_url = ""
        self.zapier_url = ""
        self.logdir = tempfile.mkdtemp(prefix="fleetlimit-cluster-")

    def __enter__(self) -> Cluster:
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _start(self) -> None:
        c = self.config
        py = sys.executable
        self.redis = RedisServer().start()
        argv = [
            py, "-m", "chatbot.fakes.openai_server", "--port", "0",
            "--window-seconds", str(c.openai_window),
            "--latency", str(c.openai_latency),
        ]  # fmt: skip
        if c.openai_keys:
            # One set of limits per key; each key's own (in flight included) come below.
            argv += ["--scope", "key"]
            for k in c.openai_keys:
                argv += ["--api-key", k.key]
        else:
            argv += [
                "--max-in-flight", str(c.openai_concurrent),
                "--rpm", str(c.openai_per_window),
                "--api-key", OPENAI_KEY,
            ]  # fmt: skip
        if c.large_model and c.large_per_window is not None:
            argv += ["--model-limit", f"{c.large_model}={c.large_per_window}"]
        fake_openai = _Proc("fake-openai", self.logdir, argv)
        self.procs.append(fake_openai)
        port = fake_openai.wait_for_line(r"listening on http://127\.0\.0\.1:(\d+)").group(1)
        self.openai_url = f"http://127.0.0.1:{port}"
        if c.openai_keys:
            self.set_openai_key_limits(c.openai_key_limits())
        fake_zapier = _Proc(
            "fake-zapier",
            self.logdir,
            [
                py, "-m", "chatbot.fakes.zapier_server", "--port", "0",
                "--max-concurrent", str(c.zapier_concurrent),
                "--per-minute", str(c.zapier_per_minute),
                "--minute-seconds", str(c.zapier_minute),
                "--per-hour", str(c.zapier_per_hour),
                "--hour-seconds", str(c.zapier_hour),
                "--latency", str(c.zapier_latency),
                "--token", ZAPIER_TOKEN,
            ],
        )  # fmt: skip
        self.procs.append(fake_zapier)
        port = fake_zapier.wait_for_line(r"listening on http://127\.0\.0\.1:(\d+)").group(1)
        self.zapier_url = f"http://127.0.0.1:{port}"
        for i in range(c.replicas):
            self.add_replica(f"replica-{i + 1}")
        if c.without_seconds > 0:
            for i in range(c.replicas):
                # A namespace of its own: its limiter sees no other replica's calls.
                name = f"alone-{i + 1}"
                self.alone.append(self._spawn_replica(name, namespace=name))
        for proc, url in [*self.replicas, *self.alone]:
            _wait_healthy(proc, url)

    def set_openai_key_limits(self, table: dict[str, dict[str, int | None]]) -> None:
        """The fake OpenAI's limits per key from now on (``POST /admin/config``; the
        command line sets no key's in-flight limit)."""
        with httpx2.Client(timeout=10) as client:
            response = client.post(f"{self.openai_url}/admin/config", json={"key_limits": table})
            response.raise_for_status()

    def add_replica(self, name: str) -> str:
        proc, url = self._spawn_replica(name)
        self.replicas.append((proc, url))
        return url

    def _spawn_replica(self, name: str, namespace: str | None = None) -> tuple[_Proc, str]:
        assert self.redis is not None
        port = free_port()
        keys = self.config.openai_keys
        env = {
            "REDIS_URL": self.redis.url,
            "OPENAI_BASE_URL": f"{self.openai_url}/v1",
            "OPENAI_API_KEY": keys[0].key if keys else OPENAI_KEY,
            # Set either way (empty: none), like CACHE_TTL below.
            "OPENAI_API_KEYS": ",".join(f"{k.name}={k.key}" for k in keys),
            "OPENAI_MODEL": SMALL_MODEL,
            "OPENAI_LARGE_MODEL": self.config.large_model,
            "OPENAI_LARGE_MODEL_KEYWORD": LARGE_KEYWORD,
            "ZAPIER_MCP_URL": f"{self.zapier_url}/mcp",
            "ZAPIER_MCP_TOKEN": ZAPIER_TOKEN,
            "LIMITS_JSON": self.config.limits_json(),
            "TICKET_TTL": str(self.config.ticket_ttl),
            "REPLICA_NAME": name,
            # Set either way: a CACHE_TTL in this process's environment must not give the
            # replicas a cache the report knows nothing of (empty: no cache).
            "CACHE_TTL": str(self.config.cache_ttl) if self.config.cache_ttl > 0 else "",
        }
        if namespace is not None:
            env["LIMITER_NAMESPACE"] = namespace
        argv = [sys.executable, "-m", "chatbot", "serve", "--port", str(port)]
        proc = _Proc(name, self.logdir, argv, env)
        self.procs.append(proc)
        return proc, f"http://127.0.0.1:{port}"

    @property
    def urls(self) -> list[str]:
        return [url for _, url in self.replicas]

    @property
    def pids(self) -> dict[str, int]:
        """The processes this cluster started and has not stopped yet, by name."""
        out = {p.name: p.popen.pid for p in self.procs if p.popen.poll() is None}
        if self.redis is not None and self.redis.process is not None:
            out["redis-server"] = self.redis.process.pid
        return out

    def records(self) -> tuple[dict[str, Any], dict[str, Any]]:
        with httpx2.Client(timeout=10) as client:
            o = client.get(f"{self.openai_url}/admin/record").json()
            z = client.get(f"{self.zapier_url}/admin/record").json()
        return o, z

    def reset_records(self) -> None:
        """Both fakes forget their record and their windows (``POST /admin/reset``)."""
        with httpx2.Client(timeout=10) as client:
            for url in (self.openai_url, self.zapier_url):
                client.post(f"{url}/admin/reset").raise_for_status()

    def limiter_view(self) -> tuple[dict[str, Any], dict[str, float]]:
        """The limiter's cluster-wide stats per API (from the first replica that answers
        ``/stats``) and the seconds its admissions waited per API, summed over the live
        replicas' ``limiter_wait_seconds``."""
        stats: dict[str, Any] = {}
        waited: dict[str, float] = {}
        with httpx2.Client(timeout=10) as client:
            for proc, url in self.replicas:
                if proc.popen.poll() is not None:
                    continue
                try:
                    if not stats:
                        stats = client.get(f"{url}/stats").json()["apis"]
                    text = client.get(f"{url}/metrics").text
                except httpx2.HTTPError:
                    continue
                for family in text_string_to_metric_families(text):
                    for sample in family.samples:
                        if sample.name == "limiter_wait_seconds_sum":
                            api = sample.labels["api"]
                            waited[api] = waited.get(api, 0.0) + sample.value
        return stats, waited

    def stop_alone(self) -> None:
        """SIGKILL the replicas without a shared limiter, all at once: nothing they still
        had under way reaches the providers after their phase."""
        for proc, _ in self.alone:
            if proc.popen.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.popen.pid, signal.SIGKILL)
        for proc, _ in self.alone:
            proc.popen.wait()

    def stop(self) -> None:
        with _uninterrupted():
            for proc in reversed(self.procs):
                proc.stop()
            self.procs.clear()
            if self.redis is not None:
                self.redis.stop()
                self.redis = None
            shutil.rmtree(self.logdir, ignore_errors=True)


_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@contextlib.contextmanager
def _uninterrupted() -> Iterator[None]:
    """Ctrl-C (and SIGTERM, SIGHUP) ignored meanwhile, in the main thread: a second one
    while the cluster stops must not cut the stopping short and leave processes behind."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in _STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _wait_healthy(proc: _Proc, url: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    last = ""
    with httpx2.Client(timeout=5) as client:
        while time.monotonic() < deadline:
            if proc.popen.poll() is not None:
                raise RuntimeError(f"{proc.name} exited: {proc.output()[-2000:]}")
            try:
                response = client.get(f"{url}/health")
                if response.status_code == 200:
                    return
                last = response.text
            except httpx2.HTTPError as exc:
                last = repr(exc)
            time.sleep(0.1)
    raise RuntimeError(f"{proc.name} not healthy after {timeout}s: {last}")


@contextlib.contextmanager
def _progress(console: Console, total: int) -> Iterator[Progress]:
    progress = Progress(
        TextColumn("[bold]messages"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    )
    with progress:
        yield progress


async def _drive(
    cluster: Cluster, console: Console, kill_one: bool
) -> tuple[LoadResult, str | None, float | None, TierChange | None]:
    c = cluster.config
    total = c.users * c.messages
    killed: str | None = None
    saturated: list[float | None] = [None]
    held_back = [0]
    window_reason = f"rate:{c.openai_window:g}s"
    tier_task: list[asyncio.Future[TierChange]] = []
    with _progress(console, total) as progress:
        task = progress.add_task("load", total=total, status="")

        def on_progress(result: LoadResult) -> None:
            done = result.answered + sum(result.errors.values())
            progress.update(task, completed=done)
            if c.tier_change_after and not tier_task and result.answered >= c.tier_change_after:
                changing = _change_tier(cluster, console, result.answered)
                tier_task.append(asyncio.ensure_future(changing))

        def openai_status(o: dict[str, Any]) -> str:
            if not c.openai_keys:
                return f"openai {o['concurrent_requests']}/{c.openai_concurrent}"
            deployments = o.get("deployments", {})
            return "openai " + " ".join(
                f"{k.name} {deployments.get(k.name, {}).get('concurrent_requests', 0)}"
                f"/{k.concurrent}"
                for k in c.openai_keys
            )

        async def poll() -> None:
            async with httpx2.AsyncClient(timeout=5) as client:
                while True:
                    await asyncio.sleep(0.25)
                    with contextlib.suppress(httpx2.HTTPError, ValueError):
                        url = cluster.urls[-1]
                        apis = (await client.get(f"{url}/stats")).json()["apis"]
                        o, z = apis["openai"], apis["zapier"]
                        held = o["refusals"].get(window_reason, 0)
                        if held > held_back[0]:  # the window held someone back since last poll
                            held_back[0] = held
                            saturated[0] = time.monotonic()
                        status = (
                            f"{openai_status(o)} (waiting {o['waiting']})  zapier "
                            f"{z['concurrent_requests']}/{c.zapier_concurrent} "
                            f"(waiting {z['waiting']})"
                        )
                        progress.update(task, status=status)

        async def killer() -> None:
            nonlocal killed
            await asyncio.sleep(5.0)
            proc, _ = cluster.replicas[0]
            proc.kill()
            killed = proc.name
            console.print(f"[yellow]SIGKILLed {proc.name} mid-run; the others carry on")

        poller = asyncio.create_task(poll())
        chaos = asyncio.create_task(killer()) if kill_one else None
        try:
            result = await run_load(
                cluster.urls,
                c.users,
                c.messages,
                tool_every=c.tool_every,
                progress=on_progress,
                noisy=c.noisy,
                noisy_in_flight=c.noisy_in_flight,
                batch_workers=c.batch_workers,
                faq_every=c.faq_every,
                large_every=c.large_every,
            )
            tier = await tier_task[0] if tier_task else None
        finally:
            poller.cancel()
            if chaos is not None:
                chaos.cancel()
            for pending in tier_task:
                pending.cancel()
    return result, killed, saturated[0], tier


async def _change_tier(cluster: Cluster, console: Console, answered: int) -> TierChange:
    """Lower the first key's limit per window at the fake to ``tier_change_per_window``
    (``POST /admin/config``: the whole table, the other keys' limits as they were), then
    read what that key had in flight (the limiter's count, a replica's ``/stats``, and the
    fake's) and in the fake's window."""
    c = cluster.config
    key, new = c.openai_keys[0], c.tier_change_per_window
    table = c.openai_key_limits({key.name: new})
    async with httpx2.AsyncClient(timeout=10) as client:
        sent = time.monotonic()
        changed = await client.post(
            f"{cluster.openai_url}/admin/config", json={"key_limits": table}
        )
        changed.raise_for_status()
        at = time.monotonic()
        stats = (await client.get(f"{cluster.urls[-1]}/stats")).json()["apis"]["openai"]
        record = (await client.get(f"{cluster.openai_url}/admin/record")).json()
    in_flight = stats.get("deployments", {}).get(key.name, {}).get("concurrent_requests")
    at_fake = record.get("by_key", {}).get(key.masked, {}).get("in_flight", 0)
    in_window = sum(
        1
        for adm in record.get("admissions", [])
        if adm["key"] == key.masked and adm["t"] > at - c.openai_window
    )
    console.print(
        f"[yellow]tier change after {answered} answers: OpenAI now allows {key.name} "
        f"({key.masked}) {new} requests per {c.openai_window:g}s, down from {key.per_window}; "
        f"{in_flight or 0} of its requests were in flight"
    )
    return TierChange(
        key=key.name,
        configured=key.per_window,
        new_limit=new,
        after=answered,
        sent=sent,
        at=at,
        in_flight=int(in_flight or 0),
        in_flight_at_fake=int(at_fake),
        in_window=in_window,
    )


def run_cluster(
    config: ClusterConfig, *, console: Console | None = None, kill_one: bool = False
) -> ClusterReport:
    """Start everything, drive the load (then, with ``config.without_seconds``, the same
    load without a shared limiter), stop everything, and return the report."""
    with Cluster(config) as cluster:
        return run_on(cluster, console=console, kill_one=kill_one)


def run_on(
    cluster: Cluster, *, console: Console | None = None, kill_one: bool = False
) -> ClusterReport:
    """Drive the load on a started ``cluster`` and return the report (the cluster runs on).

    With ``without_seconds``, then runs :func:`run_without` (which stops the replicas
    without a shared limiter and leaves both fakes' records reset)."""
    console = console or Console()
    config = cluster.config
    alone = f" (+{len(cluster.alone)} without a shared limiter)" if cluster.alone else ""
    console.print(
        f"[bold]cluster up:[/] redis {cluster.redis.url if cluster.redis else '?'}, "
        f"fake OpenAI {cluster.openai_url}, fake Zapier {cluster.zapier_url}, "
        f"{config.replicas} replicas{alone}"
    )
    if cluster.alone:
        console.rule(f"1/2: {config.replicas} replicas sharing the limiter")
    load, killed, saturated_until, tier = asyncio.run(_drive(cluster, console, kill_one))
    openai_record, zapier_record = cluster.records()
    stats, waited = cluster.limiter_view()
    report = ClusterReport(
        config, load, openai_record, zapier_record, killed, saturated_until, stats, waited
    )
    report.tier = tier
    if cluster.alone:
        report.without = run_without(cluster, console)
    return report


def run_without(cluster: Cluster, console: Console) -> ClusterReport:
    """The same users and messages for ``without_seconds``, on the replicas that each keep
    the limits alone (``Cluster.alone``), against the same fakes, their records reset
    first; then those replicas are SIGKILLed (nothing of theirs reaches the providers after
    the phase), the fakes' records read and reset again."""
    config = cluster.config
    seconds = config.without_seconds
    console.rule(f"2/2: the same users for {seconds:g}s, each replica limiting itself")
    cluster.reset_records()
    urls = [url for _, url in cluster.alone]
    try:
        load = asyncio.run(_drive_without(urls, config, console))
    finally:
        cluster.stop_alone()
    openai_record, zapier_record = cluster.records()
    cluster.reset_records()
    return ClusterReport(config, load, openai_record, zapier_record)


async def _drive_without(urls: list[str], config: ClusterConfig, console: Console) -> LoadResult:
    seconds = config.without_seconds
    progress = Progress(
        TextColumn("[bold]without"),
        BarColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    )
    with progress:
        task = progress.add_task("without", total=seconds, status="")

        def on_progress(result: LoadResult) -> None:
            errors = sum(result.errors.values())
            progress.update(
                task,
                completed=min(seconds, time.monotonic() - result.started),
                status=f"answered {result.answered}, errors {errors}",
            )

        result = await run_load(
            urls,
            config.users,
            config.messages,
            tool_every=config.tool_every,
            progress=on_progress,
            duration=seconds,
            faq_every=config.faq_every,
            large_every=config.large_every,
        )
        progress.update(task, completed=seconds)
    return result


@dataclass
class NoisyReport:
    """The same scenario without and with a noisy user and a batch job (two clusters)."""

    quiet: ClusterReport
    noisy: ClusterReport

    @property
    def excess(self) -> dict[str, int]:
        """Both runs' excess at the providers, summed by limit (0 everywhere is the goal)."""
        return {k: v + self.noisy.excess[k] for k, v in self.quiet.excess.items()}

    @property
    def p99_ratio(self) -> float:
        """The ordinary users' p99 wait in the limiter with the noisy user and the batch
        job, over the same without them (inf when that was 0)."""
        before = self.quiet.load.wait_percentile(0.99)
        after = self.noisy.load.wait_percentile(0.99)
        return after / before if before > 0 else math.inf


def run_noisy(
    config: ClusterConfig,
    *,
    console: Console | None = None,
    noisy: int = 20,
    batch_workers: int | None = None,
) -> NoisyReport:
    """Run ``config`` twice, on a fresh cluster each time (no window, record or fair-queue
    state carried over): as is, then with a noisy user meaning to send ``noisy`` times the
    messages of the others and a batch job keeping ``batch_workers`` items in flight at
    priority 0 (default: twice OpenAI's concurrency)."""
    console = console or Console()
    workers = 2 * config.openai_in_flight_limit if batch_workers is None else batch_workers
    console.rule("1/2: the users alone")
    quiet = run_cluster(replace(config, noisy=0, batch_workers=0), console=console)
    console.rule(f"2/2: the same users, with a noisy user (x{noisy}) and a batch job")
    loud = run_cluster(replace(config, noisy=noisy, batch_workers=workers), console=console)
    return NoisyReport(quiet, loud)


def print_noisy_report(report: NoisyReport, console: Console) -> None:
    """Both runs' reports, then the ordinary users' waits side by side."""
    console.print()
    console.rule("1/2: the users alone")
    print_report(report.quiet, console)
    console.print()
    console.rule("2/2: with the noisy user and the batch job")
    print_report(report.noisy, console)
    c = report.quiet.config
    console.print()
    table = Table(
        title=f"The {c.users} ordinary users: per message, the wait in the limiter "
        "(OpenAI + Zapier) and the time to answer"
    )
    table.add_column(f"{c.users} users x {c.messages}", no_wrap=True)
    for col in ("wait p50", "wait p99", "answer p50", "answer p99", "excess"):
        table.add_column(col, justify="right")
    runs = (("without the noisy user", report.quiet), ("with the noisy user", report.noisy))
    for name, run in runs:
        load, excess = run.load, sum(run.excess.values())
        style = "green" if excess == 0 else "red"
        table.add_row(
            name,
            f"{load.wait_percentile(0.5):.2f}s",
            f"{load.wait_percentile(0.99):.2f}s",
            f"{load.percentile(0.5):.2f}s",
            f"{load.percentile(0.99):.2f}s",
            f"[{style}]{excess}[/]",
        )
    console.print(table)
    noisy, batch, n = report.noisy.load.noisy, report.noisy.load.batch, report.noisy.config
    if noisy is not None:
        console.print(
            f"{NOISY_USER} meant to send {noisy.planned} messages ({n.noisy} x {c.messages}), "
            f"{n.noisy_in_flight} at a time, while the others ran: sent {noisy.sent}, "
            f"answered {noisy.answered}, errors {json.dumps(noisy.errors) if noisy.errors else 0}"
            f" (wait p50 {noisy.wait_percentile(0.5):.2f}s, answer p50 "
            f"{noisy.percentile(0.5):.2f}s). Its turn answers one of its messages at a time, "
            f"so it has one call at most in the limiter's queue, one tenant among "
            f"{c.users + 1} at priority 10."
        )
    if batch is not None:
        console.print(
            f"Batch job ({BATCH_JOB}, priority 0, {n.batch_workers} items in flight): "
            f"answered {batch.answered}, errors "
            f"{json.dumps(batch.errors) if batch.errors else 0} (wait p50 "
            f"{batch.wait_percentile(0.5):.2f}s, p99 {batch.wait_percentile(0.99):.2f}s): "
            "it gets what no waiting message wants."
        )
    console.print(
        f"The ordinary users' p99 wait with the noisy user is {report.p99_ratio:.2f}x the "
        "one without."
    )
    total = sum(report.excess.values())
    verdict = (
        "[green]0 excess at the providers in both runs" if total == 0 else "[red]LIMITS EXCEEDED"
    )
    console.print(f"[bold]{verdict}[/]")


def _summary(report: ClusterReport) -> dict[str, Any]:
    load = report.load
    out: dict[str, Any] = {
        "excess": report.excess,
        "openai_utilisation": report.openai_utilisation,
        "answered": load.answered,
        "errors": load.errors,
        "elapsed": load.elapsed,
        "p50": load.percentile(0.5),
        "p99": load.percentile(0.99),
        "wait_p50": load.wait_percentile(0.5),
        "wait_p99": load.wait_percentile(0.99),
        "openai_requests": report.openai["admitted"],
        "tool_messages": sum(x.tool_messages for x in _loads(load)),
        "zapier_actions": report.zapier["executed"],
        "limiter_waited": report.waited,
        "openai_sent_in_window": report.openai_sent_in_window,
        "openai_rejected": report.openai["rejected"],
        "openai_keys": report.by_key,
        "openai_models": report.by_model,
        "large_messages": sum(x.large_messages for x in _loads(load)),
    }
    tier = report.tier_view()
    if tier is not None:
        out["tier_change"] = tier
    cache = report.cache
    if cache is not None:
        lookups = cache["hits"] + cache["misses"]
        out["cache"] = {
            **cache,
            "hit_rate": cache["hits"] / lookups if lookups else 0.0,
            "ttl": report.config.cache_ttl,
            "faq": sum(x.faq for x in _loads(load)),
            "faq_repeats": sum(x.faq_repeats for x in _loads(load)),
        }
    without = report.without
    if without is not None:
        out["without"] = {
            "seconds": report.config.without_seconds,
            "answered": without.load.answered,
            "errors": without.load.errors,
            "cut_off": without.load.cut_off,
            "openai_sent_in_window": without.openai_sent_in_window,
            "openai_429s": without.openai["rejected"],
            "zapier_429s": without.zapier["rejected_429_by_reason"],
            "excess": without.excess,
        }
    return out


def _noisy_summary(report: NoisyReport) -> dict[str, Any]:
    out: dict[str, Any] = {"without": _summary(report.quiet), "with": _summary(report.noisy)}
    loud = report.noisy.load
    for name, extra in (("noisy_user", loud.noisy), ("batch", loud.batch)):
        if extra is not None:
            out[name] = {
                "planned": extra.planned,
                "sent": extra.sent,
                "answered": extra.answered,
                "errors": extra.errors,
                "wait_p50": extra.wait_percentile(0.5),
                "wait_p99": extra.wait_percentile(0.99),
            }
    out["p99_ratio"] = report.p99_ratio
    return out


def _loads(load: LoadResult) -> list[LoadResult]:
    """The ordinary users' result and, when there were any, the noisy user's and the batch
    job's: everything that made OpenAI requests."""
    return [x for x in (load, load.noisy, load.batch) if x is not None]


def _requests_line(report: ClusterReport) -> str:
    """Why OpenAI saw more requests than messages, from the fakes' records and the answers."""
    loads = _loads(report.load)
    answered = sum(x.answered for x in loads)
    tools = sum(x.tool_messages for x in loads)
    requests = int(report.openai["admitted"])
    what = "messages" if len(loads) == 1 else "messages and batch items"
    cache = report.cache
    hits = 0 if cache is None else cache["hits"]
    line = (
        f"[bold]{requests} OpenAI requests for {answered} {what}:[/] {tools} used a Zapier "
        f"tool (Zapier ran {report.zapier['executed']} actions), and each of those needs a "
        "second completion (the model asks for the tool, the replica runs it, the model "
        "answers with its result)"
    )
    if cache is None:
        line += f": {answered} + {tools} = {answered + tools}."
    else:
        were = "completion was" if hits == 1 else "completions were"
        line += (
            f"; {hits} {were} answered from the response cache instead of OpenAI: "
            f"{answered} + {tools} - {hits} = {answered + tools - hits}."
        )
    other = requests - (answered + tools - hits)
    if other > 0:
        line += (
            f" The other {other} were made for messages the replica that made them did not "
            "answer (an error, or a replica killed mid-run)."
        )
    elif other < 0:
        line += f" ({-other} fewer than that reached OpenAI: the records disagree.)"
    return line


def _count(n: int, what: str) -> str:
    """``1 hit``, ``2 hits``, ``0 misses``."""
    return f"{n} {what}" if n == 1 else f"{n} {what}{'es' if what.endswith('s') else 's'}"


def _cache_line(report: ClusterReport) -> str | None:
    """The response cache's hits, misses and hit rate from the cluster's own counters, and
    where its hits came from; None when the replicas had no cache."""
    c = report.config
    if c.cache_ttl <= 0:
        return None
    cache = report.cache
    if cache is None:
        return "[bold]Response cache:[/] on, but no replica answered /stats: no counts."
    hits, misses = cache["hits"], cache["misses"]
    lookups = hits + misses
    rate = f"{hits}/{lookups} = {hits / lookups:.1%}" if lookups else "0/0 (no lookup)"
    loads = _loads(report.load)
    faq, repeats = sum(x.faq for x in loads), sum(x.faq_repeats for x in loads)
    # The completions the replicas asked for: those OpenAI admitted, and the hits.
    completions = int(report.openai["admitted"]) + hits
    if lookups == completions:
        looked_up = f"Every one of the {completions} completions was looked up"
    else:
        looked_up = f"{lookups} of the {completions} completions were looked up"
    line = (
        f"[bold]Response cache[/] (CACHE_TTL={c.cache_ttl:g}s, the cluster's counters, "
        f'stats("openai")["cache"]): {_count(hits, "hit")}, {_count(misses, "miss")}, hit '
        f"rate {rate}; {_count(hits, 'OpenAI request')} saved. {looked_up} (temperature 0, "
        "tools offered but not forced); an answer that asks for a tool is never stored, so "
        "no hit runs a tool."
    )
    if faq:
        line += (
            f" {faq} users opened with one of {len(FAQ_TEXTS)} common questions, {repeats} "
            "of them after another user's identical first message had its answer; only a "
            "first message can repeat exactly (later ones carry the user's history), and "
            "identical requests sent at the same moment all miss (an answer is stored when "
            "it comes back)."
        )
    return line


def _openai_limits(c: ClusterConfig) -> tuple[str, str]:
    """OpenAI's window and slots as the report names them: ``("the 80 per 10s window",
    "one of the 8 slots")``, or with several keys ``("a key's 10s window (key-a 50, key-b
    30)", "a slot of a key (key-a 5, key-b 3)")``."""
    if not c.openai_keys:
        return (
            f"the {c.openai_per_window} per {c.openai_window:g}s window",
            f"one of the {c.openai_concurrent} slots",
        )
    windows = ", ".join(f"{k.name} {k.per_window}" for k in c.openai_keys)
    slots = ", ".join(f"{k.name} {k.concurrent}" for k in c.openai_keys)
    return f"a key's {c.openai_window:g}s window ({windows})", f"a slot of a key ({slots})"


def _print_time(report: ClusterReport, console: Console) -> None:
    """Time to answer next to the part of it spent waiting in the limiter, and why."""
    c, load = report.config, report.load
    slow = load.slowest(0.99)
    if not slow:
        return
    slow_t = sum(t for t, _ in slow) / len(slow)
    slow_w = sum(w for _, w in slow) / len(slow)
    table = Table(title="Time per message, and the part of it waiting in the limiter")
    table.add_column("per message", no_wrap=True)
    for col in ("p50", "p99", f"slowest 1% ({len(slow)}), mean"):
        table.add_column(col, justify="right")
    table.add_row(
        "sent to answered",
        f"{load.percentile(0.5):.2f}s",
        f"{load.percentile(0.99):.2f}s",
        f"{slow_t:.2f}s",
    )
    table.add_row(
        "waiting in the limiter",
        f"{load.wait_percentile(0.5):.2f}s",
        f"{load.wait_percentile(0.99):.2f}s",
        f"{slow_w:.2f}s",
    )
    console.print(table)
    window = f"rate:{c.openai_window:g}s"
    o = report.stats.get("openai", {})
    z = report.stats.get("zapier", {})
    held = o.get("refusals", {})
    if report.waited:
        waited = ", ".join(f"{api} {s:.1f}s" for api, s in sorted(report.waited.items()))
        in_window, in_slot = _openai_limits(c)
        console.print(
            f"Waiting in the limiter, all replicas summed (limiter_wait_seconds): {waited}. "
            f"Of the {o.get('total_requests', 0)} OpenAI requests, {held.get(window, 0)} "
            f"first waited for room in {in_window}, {held.get('concurrency', 0)} for "
            f"{in_slot}."
        )
    share = slow_w / slow_t if slow_t > 0 else 0.0
    calls = (
        f"an OpenAI call takes {o.get('average_response_time', 0.0):.2f}s on average, a "
        f"Zapier action {z.get('average_response_time', 0.0):.2f}s"
    )
    if share >= 0.5 and held.get(window, 0) > 0:
        why = "a long p99 is requests queued for the rolling window, not slow calls"
    elif share >= 0.5:
        why = "a long p99 is requests queued for a free slot, not slow calls"
    elif report.killed:
        why = (
            "the slowest messages spent most of their time outside the limiter's queue (in "
            "the calls, or lost with the replica killed mid-run)"
        )
    else:
        why = "the slowest messages spent most of their time in the calls, not in the queue"
    console.print(
        f"[bold]The p99:[/] the slowest 1% of messages took {slow_t:.2f}s, {slow_w:.2f}s "
        f"({share:.0%}) of it waiting in the limiter; {calls}: {why}."
    )


def _print_without(report: ClusterReport, without: ClusterReport, console: Console) -> None:
    """The shared limiter's run next to the same users on replicas that each keep the
    limits alone, as the fakes recorded both."""
    c = report.config
    ow = f"{c.openai_window:g}s"
    table = Table(title="With and without a shared limiter (the providers' records)")
    table.add_column("", no_wrap=True)
    table.add_column("limit", justify="right")
    table.add_column(f"shared, {report.load.elapsed:.0f}s", justify="right")
    table.add_column(f"per replica, {c.without_seconds:g}s", justify="right")

    def cell(value: int, limit: int = 0) -> str:
        return f"[red]{value}[/]" if value > limit else f"[green]{value}[/]"

    runs = (report, without)
    rows: list[tuple[str, str, list[str]]] = [
        ("messages answered", "", [str(r.load.answered) for r in runs]),
        ("messages failed", "", [str(sum(r.load.errors.values())) for r in runs]),
        (
            f"OpenAI requests sent in a {ow} window",
            str(c.openai_window_limit),
            [cell(r.openai_sent_in_window, c.openai_window_limit) for r in runs],
        ),
        (
            "OpenAI 429s, in flight full",
            "0",
            [cell(int(r.openai["rejected"]["concurrency"])) for r in runs],
        ),
        (
            "OpenAI 429s, window full",
            "0",
            [cell(int(r.openai["rejected"]["requests"])) for r in runs],
        ),
        ("Zapier 429s", "0", [cell(int(r.zapier["rejected_429"])) for r in runs]),
    ]
    for name, limit, values in rows:
        table.add_row(name, limit, *values)
    console.print(table)
    sent, o429 = without.openai_sent_in_window, int(without.openai["rejected_total"])
    errors = without.load.errors
    failed = f"{sum(errors.values())} messages failed"
    if errors:
        failed += f" ({', '.join(f'{k}: {v}' for k, v in sorted(errors.items()))})"
    if without.load.cut_off:
        failed += f", {without.load.cut_off} unanswered at the end"
    own = f"{c.openai_concurrent} in flight and {c.openai_per_window} per {ow}"
    if c.openai_keys:
        own = "the keys' limits"
    console.print(
        f"[bold]Without a shared limiter[/] (each replica with a limiter of its own, like the "
        f"original per-process asyncio.Semaphore: {own} each), the {c.replicas} replicas "
        f"together sent OpenAI {sent} requests in one {ow} window (limit "
        f"{c.openai_window_limit}, the refused ones included) and got "
        f"{o429} 429s in {c.without_seconds:g}s (Zapier: {without.zapier['rejected_429']}); "
        f"{failed}. With the shared limiter: "
        f"{report.openai_sent_in_window} requests, "
        f"{report.openai['rejected_total'] + report.zapier['rejected_429']} 429s."
    )


def _print_keys_and_models(report: ClusterReport, console: Console) -> None:
    """Per OpenAI key and per model, the fake's own count against each limit, and shares."""
    c, keys, models = report.config, report.by_key, report.by_model
    if not keys and not models:
        return
    ow = f"{c.openai_window:g}s"
    table = Table(title="OpenAI by key and by model (its own record): most seen/limit")
    table.add_column("", no_wrap=True)
    for col in ("admitted", "share", "in flight", f"per {ow}", "excess", "429s"):
        table.add_column(col, justify="right")

    def excess(*seen_and_limits: tuple[int, int | None]) -> str:
        """The sum of how far each value went past its limit, green when 0."""
        over = sum(max(0, seen - limit) for seen, limit in seen_and_limits if limit is not None)
        return f"[{'green' if over == 0 else 'red'}]{over}[/]"

    for name, row in keys.items():
        most, limit = row["max_requests_in_window"], row["limit"]
        flight, slots = row["max_in_flight"], row["in_flight_limit"]
        table.add_row(
            name,
            str(row["admitted"]),
            f"{row['share']:.1%}",
            f"{flight}/{slots}",
            f"{most}/{limit}",
            excess((most, limit), (flight, slots)),
            str(row["rejected"]),
        )
    for model, row in models.items():
        most, limit = row["max_requests_in_window"], row["limit"]
        table.add_row(
            model,
            str(row["admitted"]),
            f"{row['share']:.1%}",
            "",
            f"{most}/{'-' if limit is None else limit}",
            excess((most, limit)),
            str(row["rejected"]),
        )
        if limit is None:
            continue
        for name, per_key in row.get("keys", {}).items():
            most, limit = per_key["max_requests_in_window"], per_key["limit"]
            table.add_row(
                f"  on {name}",
                str(per_key["admitted"]),
                "",
                "",
                f"{most}/{limit}",
                excess((most, limit)),
                str(per_key["rejected"]),
            )
    console.print(table)
    if keys:
        shares = "; ".join(
            f"{name} ({row['key']}) has {row['capacity_share']:.1%} of the capacity "
            f"({row['limit']} of {c.openai_window_limit} per {ow}) and carried "
            f"{row['share']:.1%} of the requests"
            for name, row in keys.items()
        )
        lowered = ""
        if report.tier is not None:
            lowered = f" ({report.tier.key}'s limit was lowered mid-run: below)"
        console.print(
            f"Each request goes out with the key of the deployment the limiter admitted it "
            f"to, the one with the most headroom: {shares}{lowered}."
        )
    if models:
        large = models[c.large_model]
        console.print(
            f"{c.large_model} answers the messages that ask for an answer "
            f'"{LARGE_KEYWORD}" ({report.load.large_messages} answered), {SMALL_MODEL} '
            f"the others (no limit of its own); {c.large_model} has its own, "
            f"{c.large_per_window} per {ow}{' on each key' if keys else ''}, and carried "
            f"{large['share']:.1%} of the requests."
        )


def _print_tier_change(report: ClusterReport, console: Console) -> None:
    """The first key's limit lowered at the fake mid-run, and what followed."""
    tier = report.tier_view()
    if tier is None:
        return
    c = report.config
    ow = f"{c.openai_window:g}s"
    key, new = tier["key"], tier["new_limit"]
    learned = tier["learned"]
    if learned.get(f"rate:{ow}") is not None:
        expires = learned.get("expires_in")
        seen = (
            f"learned {learned[f'rate:{ow}']} per {ow} for {key} from OpenAI's rate-limit "
            f"headers (source: {learned.get('source', '?')}"
            + (f", {expires:.0f}s to live" if isinstance(expires, int | float) else "")
            + ")"
        )
    else:
        seen = f"[red]learned no limit for {key}[/] ({learned or 'nothing'})"
    window = tier["window_at_end"]
    in_force = f"; its {ow} window at the end: {window.get('used')}/{window.get('limit')}"
    others = ", ".join(f"{n} {v}" for n, v in tier["others_admitted_after"].items())
    rejected, in_flight = tier["rejected_after"], tier["in_flight_at_change"]
    style = "green" if rejected <= in_flight else "red"
    if tier["admitted_after"]:
        since = (
            f"OpenAI admitted {tier['admitted_after']} more {key} requests, at most "
            f"{tier['max_in_window_after']} in any {ow} window ending after the change "
            f"(new limit {new})"
        )
    else:
        since = (
            f"OpenAI admitted no more {key} request (its window still held "
            f"{tier['in_window_at_change']} of them, more than the new limit {new})"
        )
    console.print(
        f"[bold]Tier change[/] after {tier['after_answers']} answers: OpenAI lowered {key} "
        f"({tier['masked']}) from {tier['configured']} to {new} requests per {ow}, when it "
        f"had {tier['in_window_at_change']} in its window and {in_flight} in flight (the "
        f"limiter's count; {tier['in_flight_at_fake']} at OpenAI). The limiter {seen}"
        f"{in_force}. OpenAI refused [{style}]{rejected}[/] {key} requests after the change "
        f"(at most the {in_flight} in flight then). Since the change, {since}, while the "
        f"other key{'s' if len(tier['others_admitted_after']) > 1 else ''} kept serving: "
        f"{others} requests."
    )


def print_report(report: ClusterReport, console: Console) -> None:
    c, load = report.config, report.load
    console.print()
    table = Table(title="Users' view")
    for col in (
        "replicas",
        "users x messages",
        "answered",
        "errors",
        "time",
        "msg/s",
        "p50",
        "p99",
    ):
        table.add_column(col, justify="right")
    table.add_row(
        str(c.replicas),
        f"{c.users} x {c.messages}",
        str(load.answered),
        json.dumps(load.errors) if load.errors else "0",
        f"{load.elapsed:.1f}s",
        f"{load.answered / load.elapsed:.2f}",
        f"{load.percentile(0.5):.2f}s",
        f"{load.percentile(0.99):.2f}s",
    )
    console.print(table)
    console.print(_requests_line(report))
    cache_line = _cache_line(report)
    if cache_line is not None:
        console.print(cache_line)
    _print_time(report, console)
    o, z = report.openai, report.zapier
    referee = Table(title="Providers' own records (the referee)")
    for col in ("limit", "allowed", "max seen", "excess"):
        referee.add_column(col, justify="right")
    ow, zm, zh = f"{c.openai_window:g}s", f"{c.zapier_minute:g}s", f"{c.zapier_hour:g}s"
    every = ", all keys" if c.openai_keys else ""
    rows = [
        (f"OpenAI in flight{every}", c.openai_in_flight_limit, o["max_in_flight"]),
        (f"OpenAI per {ow} window{every}", c.openai_window_limit, o["max_requests_in_window"]),
        ("Zapier in flight", c.zapier_concurrent, z["max_concurrent"]),
        (f"Zapier per {zm} window", c.zapier_per_minute, z["max_starts_in_minute_window"]),
        (f"Zapier per {zh} window", c.zapier_per_hour, z["max_starts_in_hour_window"]),
    ]
    for name, allowed, seen in rows:
        excess = max(0, seen - allowed)
        style = "green" if excess == 0 else "red"
        referee.add_row(name, str(allowed), str(seen), f"[{style}]{excess}[/]")
    referee.add_row("OpenAI 429s", "0", str(o["rejected_total"]), str(o["rejected_total"]))
    referee.add_row("Zapier 429s", "0", str(z["rejected_429"]), str(z["rejected_429"]))
    console.print(referee)
    whose = "its keys' windows allow" if c.openai_keys else "its window allows"
    if report.saturated_until is not None:
        used = (
            f"while its window held requests back, that was {report.openai_utilisation:.1%} "
            f"of what {whose} ({c.openai_window_limit} per {c.openai_window:g}s)"
        )
    else:
        used = "its windows never held one back"
    console.print(
        f"OpenAI admitted {o['admitted']} requests; {used}. Zapier executed "
        f"{z['executed']} actions."
    )
    _print_keys_and_models(report, console)
    _print_tier_change(report, console)
    if report.killed:
        console.print(
            f"{report.killed} was SIGKILLed mid-run; its slots came back by lease; "
            f"{load.resent} messages were sent again to another replica."
        )
    if report.without is not None:
        _print_without(report, report.without, console)
    total_excess = sum(report.excess.values())
    verdict = "[green]0 excess at the providers" if total_excess == 0 else "[red]LIMITS EXCEEDED"
    console.print(f"[bold]{verdict}[/]")


def _watch_command(redis_url: str) -> str:
    """The ``limiter stats --watch`` command line for this cluster's Redis: the
    ``limiter`` script beside this Python when the shell's ``limiter`` is another one."""
    script = os.path.join(os.path.dirname(sys.executable), "limiter")
    if not os.path.exists(script):
        return f"{sys.executable} -m limiter --url {redis_url} stats --watch"
    found = shutil.which("limiter")
    if found is None or os.path.realpath(found) != os.path.realpath(script):
        relative = os.path.relpath(script)
        limiter = relative if not relative.startswith("..") else script
    else:
        limiter = "limiter"
    return f"{limiter} --url {redis_url} stats --watch"


def keep_running(cluster: Cluster, console: Console) -> None:
    """Say how to watch, use and stop the still running ``cluster``, then wait for Ctrl-C
    (or SIGTERM or SIGHUP, which :func:`main` turns into the same). Returns then: the
    caller's ``with Cluster(...)`` stops everything."""
    assert cluster.redis is not None
    pids = cluster.pids
    url = cluster.urls[0]
    console.print()
    console.rule("--keep: the cluster runs on")
    console.print(f"watch it:        {_watch_command(cluster.redis.url)}", soft_wrap=True)
    console.print(
        f"send a message:  curl -s {url}/messages -H 'content-type: application/json' "
        """-d '{"user_id": "you", "text": "Please send an email to ana@example.com"}'""",
        soft_wrap=True,
    )
    console.print(
        f"replicas:        {' '.join(cluster.urls)}; the fakes' records: "
        f"{cluster.openai_url}/admin/record, {cluster.zapier_url}/admin/record",
        soft_wrap=True,
    )
    running = ", ".join(f"{name} {pid}" for name, pid in sorted(pids.items()))
    console.print(f"processes:       {running}", soft_wrap=True)
    console.print(
        f"stop it:         Ctrl-C, or kill {os.getpid()}: Redis, both fakes and the "
        "replicas stop with it",
        soft_wrap=True,
    )
    try:
        while True:
            signal.pause()
    except KeyboardInterrupt:
        console.print(f"stopping {len(pids)} processes ...")


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m chatbot cluster")
    parser.add_argument("--replicas", type=int, default=3)
    parser.add_argument("--users", type=int, default=30)
    parser.add_argument("--messages", type=int, default=8)
    parser.add_argument("--kill-one", action="store_true", help="SIGKILL a replica mid-run")
    parser.add_argument(
        "--without-seconds",
        type=float,
        default=None,
        help="after the run, the same users for this long on as many replicas that each "
        "keep the limits alone (no shared limiter), to compare what the providers saw; "
        "0: skip (default: 8; 0 with --tier-change)",
    )
    parser.add_argument(
        "--one-key",
        action="store_true",
        help="one OpenAI key and one model (8 in flight, 80 per 10s), as before deployments",
    )
    parser.add_argument(
        "--tier-change",
        action="store_true",
        help="OpenAI windows of a real minute, and once a sixth of the messages are answered, "
        "key-a's limit at the fake lowered from 300 to 60 a minute: the limiter learns it "
        "from the headers; the report shows what followed",
    )
    parser.add_argument(
        "--keep",
        action="store_true",
        help="leave Redis, the fakes and the replicas running after the report, until Ctrl-C",
    )
    parser.add_argument(
        "--noisy-user",
        action="store_true",
        help="run twice: as is, then with a user sending 20x the others' messages and a "
        "batch job at priority 0; compare the others' waits",
    )
    parser.add_argument(
        "--noisy-factor", type=int, default=20, help="the noisy user's messages, x the others'"
    )
    parser.add_argument(
        "--batch-workers",
        type=int,
        default=None,
        help="batch items in flight (default: twice OpenAI's concurrency)",
    )
    parser.add_argument(
        "--cache",
        nargs="?",
        type=float,
        const=300.0,
        default=None,
        metavar="SECONDS",
        help="replicas with a response cache for OpenAI (CACHE_TTL, 300 s unless given; "
        "completions at temperature 0), and every 3rd user opening with a common question; "
        "the report gives the cache's hit rate",
    )
    parser.add_argument("--json", help="also write the report as JSON to this file")
    args = parser.parse_args(argv)
    if args.noisy_user and args.kill_one:
        parser.error("--noisy-user and --kill-one do not go together")
    if args.tier_change and (args.noisy_user or args.kill_one or args.one_key):
        parser.error("--tier-change goes with neither --noisy-user, --kill-one nor --one-key")
    if args.tier_change and args.without_seconds:
        parser.error("--tier-change runs no phase without a shared limiter (--without-seconds)")
    if args.without_seconds is None:
        args.without_seconds = 0.0 if args.tier_change else 8.0
    if args.noisy_user and args.keep:
        parser.error("--noisy-user runs two clusters: --keep does not go with it")
    if not (math.isfinite(args.without_seconds) and args.without_seconds >= 0):
        parser.error("--without-seconds must be a number of seconds >= 0")
    if args.cache is not None:
        try:
            ResponseCache(ttl=args.cache)  # the replicas' CACHE_TTL: the same bounds
        except ConfigError:
            parser.error("--cache must be a number of seconds from 0.001 to 366 days")
    if args.one_key:
        config = ClusterConfig(replicas=args.replicas, users=args.users, messages=args.messages)
    else:
        config = demo_config(args.replicas, args.users, args.messages, tier_change=args.tier_change)
    if args.cache is not None:
        config = replace(config, cache_ttl=args.cache, faq_every=3)
    console = Console()
    # SIGTERM and SIGHUP (a closed terminal) stop everything as Ctrl-C does: the children
    # run in sessions of their own, so nothing else would stop them. A signal this process
    # was started ignoring (nohup, a background job) stays ignored.
    previous = {
        sig: signal.signal(sig, _interrupt)
        for sig in (signal.SIGTERM, signal.SIGHUP)
        if signal.getsignal(sig) is not signal.SIG_IGN
    }
    try:
        if args.noisy_user:
            noisy = run_noisy(
                config, console=console, noisy=args.noisy_factor, batch_workers=args.batch_workers
            )
            print_noisy_report(noisy, console)
            if args.json:
                with open(args.json, "w") as fh:
                    json.dump(_noisy_summary(noisy), fh, indent=2)
            return 0 if sum(noisy.excess.values()) == 0 else 1
        config = replace(config, without_seconds=args.without_seconds)
        with Cluster(config) as cluster:
            report = run_on(cluster, console=console, kill_one=args.kill_one)
            print_report(report, console)
            if args.json:
                with open(args.json, "w") as fh:
                    json.dump(_summary(report), fh, indent=2)
            if args.keep:
                keep_running(cluster, console)
        return 0 if sum(report.excess.values()) == 0 else 1
    except KeyboardInterrupt:
        console.print("[yellow]interrupted: everything it started is stopped")
        return 130
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
