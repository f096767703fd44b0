"""``make demo`` explains itself: ``python -m chatbot cluster``, small, read back.

The report says why OpenAI saw more requests than messages (tool calls take a second
completion), how much of the time to answer was waiting in the limiter, and what the
providers saw when the same users ran for a few seconds on replicas that each keep the
limits alone (no shared limiter); ``--keep`` leaves the cluster running until Ctrl-C, and
then nothing it started is left. With ``--cache``, the replicas have a response cache and
the report gives its hit rate from the cluster's counters; the OpenAI requests still add
up (messages + tool messages - hits). The demo runs with two OpenAI keys and two models:
its JSON gives, per key and per model, the fake's own counts against each limit (0 excess,
0 rejections); ``--tier-change`` lowers a key's limit at the fake mid-run and the limiter
learns it from the headers, and no whole key is ever printed or logged.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from dataclasses import replace
from io import StringIO
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx2
import pytest
import redis
from rich.console import Console

import chatbot.cluster
from chatbot.cluster import (
    KEY_A,
    KEY_B,
    Cluster,
    ClusterConfig,
    ClusterReport,
    OpenAIKey,
    print_report,
    run_cluster,
    run_on,
)
from chatbot.load import FAQ_TEXTS
from chatbot.settings import Settings
from limiter import ConfigError

pytestmark = [pytest.mark.redis, pytest.mark.multiprocess, pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent

#: 12 users x 3 messages, every 3rd asking for a Zapier action: each user has exactly one
#: such message ((user + message) % 3 == 2), so 12 tool messages and 36 + 12 = 48 OpenAI
#: requests, at 16 per 2 s and 4 in flight (two keys: key-a 2 and 10 per 2 s, key-b 2 and
#: 6): the windows hold the load back for seconds. Each user also has one message asking
#: for an answer "in detail" ((user + message) % 3 == 0): 12 gpt-4o requests, at 3 per 2 s
#: on each key, and 36 gpt-4o-mini.
CONFIG = ClusterConfig(
    replicas=3,
    users=12,
    messages=3,
    tool_every=3,
    openai_keys=(OpenAIKey("key-a", KEY_A, 2, 10), OpenAIKey("key-b", KEY_B, 2, 6)),
    large_model="gpt-4o",
    large_every=3,
    large_per_window=3,
    openai_window=2.0,
    openai_latency=0.2,
    zapier_concurrent=2,
    zapier_per_minute=8,
    zapier_minute=1.5,
    zapier_per_hour=24,
    zapier_hour=6.0,
    zapier_latency=0.2,
    # 0.3 s as in tests/test_chatbot_e2e.py (FastConfig): a replica's event loop can stall
    # ~0.1 s in a garbage collection between admission and arrival.
    window_margin=0.3,
    without_seconds=3.0,
)


def _summary(report: ClusterReport) -> dict[str, Any]:
    """The report's JSON (``--json``), as a file would hold it."""
    return dict(json.loads(json.dumps(chatbot.cluster._summary(report))))


def _no_key_in(*texts: str) -> None:
    """No whole OpenAI key of the demo (nor its last 12 characters) in any of ``texts``."""
    for text in texts:
        for key in (KEY_A, KEY_B):
            assert key not in text
            assert key[-12:] not in text


def _line(text: str, start: str) -> str:
    """The report's line that begins (past any table border) with ``start``."""
    for line in text.splitlines():
        if line.lstrip("│┃ ").startswith(start):
            return line
    raise AssertionError(f"no line starting {start!r} in:\n{text}")


def test_report_explains_requests_waits_and_what_the_providers_saw_without_the_limiter(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The small demo: every message answered, 0 excess at the providers; the report's
    numbers add up from the fakes' records (OpenAI requests = messages + messages that used
    a tool, exactly); its time table and p99 line are the messages' own figures; and the
    3 s without a shared limiter got 429s from OpenAI and sent it more requests in one
    window than its limit, while the shared limiter's run got none and stayed within it.
    Without ``--cache`` the replicas have no response cache even when this process's
    environment has a CACHE_TTL, and the report says nothing of one."""
    monkeypatch.setenv("CACHE_TTL", "300")
    out = StringIO()
    console = Console(file=out, width=1000)  # a paragraph per line: no wrap in a sentence
    started = time.monotonic()
    with Cluster(CONFIG) as cluster:
        report = run_on(cluster, console=console)
        logs = [proc.output() for proc in cluster.procs]
    print_report(report, console)
    took = time.monotonic() - started
    text = out.getvalue()
    c, load = CONFIG, report.load

    # The shared limiter's run: everyone answered, the providers' limits kept.
    total, tools = c.users * c.messages, 12
    assert (load.sent, load.answered, load.errors) == (total, total, {})
    assert set(report.excess.values()) == {0}, report.excess
    assert report.openai_sent_in_window == report.openai["max_requests_in_window"]
    assert report.openai_sent_in_window <= c.openai_window_limit == 16

    # Per key and per model, from the report's JSON (the fake's own record): each within
    # its limits, 0 excess, 0 rejections; the keys' shares add up to all requests.
    summary = _summary(report)
    assert set(summary["excess"].values()) == {0}, summary["excess"]
    for name in ("key-a in flight", "key-b per window", "gpt-4o on key-a per window"):
        assert summary["excess"][f"openai {name}"] == 0
    assert set(summary["openai_rejected"].values()) == {0}, summary["openai_rejected"]
    keys = summary["openai_keys"]
    assert set(keys) == {"key-a", "key-b"}
    for name, limits in (("key-a", (2, 10)), ("key-b", (2, 6))):
        row = keys[name]
        assert (row["in_flight_limit"], row["limit"]) == limits
        assert 1 <= row["max_in_flight"] <= row["in_flight_limit"], row
        assert 1 <= row["max_requests_in_window"] <= row["limit"], row
        assert row["rejected"] == 0
        assert row["key"] == f"{row['key'][:4]}**********{row['key'][-4:]}"  # masked
    assert sum(row["admitted"] for row in keys.values()) == total + tools
    assert abs(sum(row["share"] for row in keys.values()) - 1.0) < 1e-9
    models = summary["openai_models"]
    assert summary["large_messages"] == load.large_messages == 12
    assert (models["gpt-4o"]["admitted"], models["gpt-4o-mini"]["admitted"]) == (12, 36)
    assert models["gpt-4o"]["limit"] == 6  # 3 per 2 s on each key
    assert models["gpt-4o-mini"]["limit"] is None  # its keys' limits apply
    assert models["gpt-4o"]["max_requests_in_window"] <= 6
    for model in models.values():
        assert model["rejected"] == 0
    for name, per_key in models["gpt-4o"]["keys"].items():
        assert per_key["limit"] == 3
        assert per_key["max_requests_in_window"] <= 3, (name, per_key)
        assert per_key["rejected"] == 0
    assert sum(k["admitted"] for k in models["gpt-4o"]["keys"].values()) == 12
    row = _line(text, "key-a ").split("│")
    assert [cell.strip() for cell in row[2:8]] == [
        str(keys["key-a"]["admitted"]),
        f"{keys['key-a']['share']:.1%}",
        f"{keys['key-a']['max_in_flight']}/2",
        f"{keys['key-a']['max_requests_in_window']}/10",
        "0",
        "0",
    ], row
    assert 'gpt-4o answers the messages that ask for an answer "in detail" (12 answered)' in text
    _no_key_in(text, json.dumps(summary), *logs)

    # Why OpenAI saw more requests than messages, counted by the fakes themselves.
    assert (load.tool_messages, load.tool_calls, report.zapier["executed"]) == (tools,) * 3
    assert report.openai["admitted"] == total + tools == 48
    assert (
        "48 OpenAI requests for 36 messages: 12 used a Zapier tool (Zapier ran 12 actions), "
        "and each of those needs a second completion" in text
    ), text
    assert "36 + 12 = 48." in text
    # No response cache: nothing looked up, and not a word of one in the report.
    assert report.cache is None
    assert report.stats["openai"]["cache"] == {"hits": 0, "misses": 0}
    assert "cache" not in text.lower()

    # The time per message next to the part of it waiting in the limiter.
    assert all(w <= t for t, w in zip(load.latencies, load.waits, strict=True))
    slow = load.slowest(0.99)
    assert len(slow) == 1  # nearest rank: the slowest of 36
    (slow_t, slow_w) = slow[0]
    answered_row = _line(text, "sent to answered")
    for q in (0.5, 0.99):
        assert f"{load.percentile(q):.2f}s" in answered_row, answered_row
        assert f"{load.wait_percentile(q):.2f}s" in _line(text, "waiting in the limiter")
    assert answered_row.rstrip(" │").endswith(f"{slow_t:.2f}s"), answered_row
    # The replicas' limiter_wait_seconds (every admission's wait, summed) is the sum of
    # the answers' limiter_wait (their messages' admissions' waits), each rounded to 1 ms:
    # every admission belongs to a message (the MCP session's set-up takes no slot).
    assert set(report.waited) == {"openai", "zapier"}
    assert abs(sum(report.waited.values()) - sum(load.waits)) <= 0.0005 * total + 1e-6
    # 48 requests at 16 per 2 s: the slowest message waited for the window, mostly.
    assert report.stats["openai"]["refusals"].get("rate:2s", 0) > 0, report.stats
    assert slow_w / slow_t >= 0.5, (slow_t, slow_w)
    p99 = _line(text, "The p99:")
    assert f"took {slow_t:.2f}s, {slow_w:.2f}s ({slow_w / slow_t:.0%}) of it waiting" in p99
    conclusion = "a long p99 is requests queued for the rolling window, not slow calls."
    assert p99.endswith(conclusion), p99

    # Without a shared limiter, the same users for 3 s: OpenAI's limit exceeded.
    without = report.without
    assert without is not None
    wl = without.load
    assert wl.sent == wl.answered + sum(wl.errors.values()) + wl.cut_off
    # OpenAI admits at most 32 requests in 3 s (16 in any 2 s), not the 48 that the 36
    # messages need: the users cannot finish, so the load ran for its 3 s and was cut
    # there (cancelling what was in flight takes milliseconds).
    assert c.without_seconds <= wl.elapsed < c.without_seconds + 1.0, wl.elapsed
    o429 = without.openai["rejected_total"]
    assert o429 > 0, without.openai["rejected"]
    assert without.openai_sent_in_window > c.openai_window_limit
    assert without.openai["max_in_flight"] <= c.openai_in_flight_limit  # the fake enforces it
    for name, key in (("in flight full", "concurrency"), ("window full", "requests")):
        row = _line(text, f"OpenAI 429s, {name}").split("│")
        limit, shared, alone = (cell.strip() for cell in row[2:5])
        assert (limit, shared, alone) == ("0", "0", str(without.openai["rejected"][key])), row
    sent = without.openai_sent_in_window
    assert sent <= without.openai["admitted"] + o429  # every arrival, at most
    row = _line(text, "OpenAI requests sent in a 2s window").split("│")
    limit, shared, alone = (cell.strip() for cell in row[2:5])
    assert (limit, shared, alone) == ("16", str(report.openai_sent_in_window), str(sent)), row
    assert (
        f"sent OpenAI {sent} requests in one 2s window (limit 16, the refused ones included) "
        f"and got {o429} 429s in 3s" in text
    ), text
    assert f"; {sum(wl.errors.values())} messages failed" in text
    assert "With the shared limiter: " in text
    assert f"{report.openai_sent_in_window} requests, 0 429s." in text
    assert text.rstrip().endswith("0 excess at the providers")
    print(
        f"{took:.1f}s; p99 {slow_t:.2f}s, waiting {slow_w:.2f}s; without: "
        f"{without.openai_sent_in_window} in a window, {o429} 429s, "
        f"answered {wl.answered}, failed {sum(wl.errors.values())}, cut {wl.cut_off}"
    )


# --------------------------------------------------------------------------- --cache

#: ``--cache`` on the small demo, without the phase without a shared limiter: users 0, 3,
#: 6 and 9 open with FAQ_TEXTS[0], [1], [2], [0]: user 9 asks after user 0 had the answer.
CACHE_CONFIG = replace(CONFIG, cache_ttl=300.0, faq_every=3, without_seconds=0.0)


def test_cache_report_gives_the_hit_rate_from_the_cluster_and_the_requests_still_add_up() -> None:
    """``--cache``: the replicas look every completion up in the shared response cache
    (hits + misses = the completions they asked for = what OpenAI admitted + the hits =
    messages + tool messages); the one user who asked a common question after another had
    its answer is the one hit; OpenAI admitted messages + tool messages - hits, exactly;
    the report's lines say so with the cluster's own counters; 0 excess."""
    out = StringIO()
    console = Console(file=out, width=400)
    started = time.monotonic()
    report = run_cluster(CACHE_CONFIG, console=console)
    print_report(report, console)
    took = time.monotonic() - started
    text = out.getvalue()
    c, load = CACHE_CONFIG, report.load

    total = c.users * c.messages
    assert (load.sent, load.answered, load.errors) == (total, total, {})
    assert set(report.excess.values()) == {0}, report.excess
    # Users 0, 3, 6, 9 opened with a common question (none of which needs a tool), user 9
    # after user 0's answer; the tool messages are the 12 of the run without a cache.
    assert (load.faq, load.faq_repeats) == (4, 1)
    assert (load.tool_messages, load.tool_calls, report.zapier["executed"]) == (12,) * 3
    tools = load.tool_messages

    counts = report.stats["openai"]["cache"]  # a replica's /stats: the cluster's counters
    assert report.cache == counts
    hits, misses = counts["hits"], counts["misses"]
    admitted = int(report.openai["admitted"])
    # The repeat is a hit: its lookup came after the first answer was stored. Every other
    # completion differs from all others (a user's name, history, a Zapier action's id) or
    # its answer called a tool (never stored).
    assert hits == load.faq_repeats == 1
    # Every completion the replicas asked for was looked up once: each is a hit or reached
    # OpenAI (the fake's own record), and there are messages + tool messages of them.
    assert hits + misses == admitted + hits == total + tools
    assert admitted == total + tools - hits == 47
    assert report.openai["rejected_total"] == 0

    requests_line = _line(text, "47 OpenAI requests for 36 messages:")
    assert (
        "; 1 completion was answered from the response cache instead of OpenAI: "
        "36 + 12 - 1 = 47." in requests_line
    ), requests_line
    assert "The other" not in requests_line
    cache_line = _line(text, "Response cache (CACHE_TTL=300s")
    rate = f"{hits}/{hits + misses} = {hits / (hits + misses):.1%}"
    assert (
        f'stats("openai")["cache"]): {hits} hit, {misses} misses, hit rate {rate}; '
        f"{hits} OpenAI request saved. Every one of the {total + tools} completions was "
        "looked up" in cache_line
    ), cache_line
    assert rate == "1/48 = 2.1%"
    assert f"4 users opened with one of {len(FAQ_TEXTS)} common questions, 1 of them" in text
    assert text.rstrip().endswith("0 excess at the providers")
    print(f"{took:.1f}s; cache {counts}; OpenAI admitted {admitted}")


def test_the_cache_flag_sets_the_replicas_ttl_and_the_common_questions(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``--cache`` is CACHE_TTL 300 s and every 3rd user opening with a common question;
    ``--cache 60`` another lifetime; without it, no cache; a lifetime the cache would
    refuse is refused here (exit 2), before anything starts."""
    seen: list[ClusterConfig] = []

    class Stub:
        def __init__(self, config: ClusterConfig) -> None:
            seen.append(config)

        def __enter__(self) -> Stub:
            return self

        def __exit__(self, *exc: object) -> None:
            return None

    def run_on(cluster: Any, **kwargs: Any) -> Any:
        return SimpleNamespace(excess={"openai 429s": 0})

    monkeypatch.setattr(chatbot.cluster, "Cluster", Stub)
    monkeypatch.setattr(chatbot.cluster, "run_on", run_on)
    monkeypatch.setattr(chatbot.cluster, "print_report", lambda report, console: None)
    for argv, ttl, every in (
        ([], 0.0, 0),
        (["--cache"], 300.0, 3),
        (["--cache", "60"], 60.0, 3),
    ):
        assert chatbot.cluster.main(argv) == 0
        assert (seen[-1].cache_ttl, seen[-1].faq_every) == (ttl, every)
    for bad in ("0", "-1", "nan", "1e9"):
        with pytest.raises(SystemExit) as info:
            chatbot.cluster.main(["--cache", bad])
        assert info.value.code == 2
    assert len(seen) == 3


def test_the_demo_runs_two_keys_and_two_models_and_tier_change_a_minute_window(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The command line's demo: two OpenAI keys (5 + 3 in flight, 50 + 30 per 10 s) and
    two models (gpt-4o for every 4th message, 10 per 10 s on each key); ``--one-key`` the
    demo of one key and one model; ``--tier-change`` windows of a real minute, the limiter
    learning from the headers, key-a lowered from 300 to 60 a minute after a sixth of the
    answers, and no phase without a shared limiter (which it refuses, as it refuses
    --one-key, --kill-one and --noisy-user: exit 2)."""
    seen: list[ClusterConfig] = []

    class Stub:
        def __init__(self, config: ClusterConfig) -> None:
            seen.append(config)

        def __enter__(self) -> Stub:
            return self

        def __exit__(self, *exc: object) -> None:
            return None

    monkeypatch.setattr(chatbot.cluster, "Cluster", Stub)
    monkeypatch.setattr(
        chatbot.cluster, "run_on", lambda cluster, **kw: SimpleNamespace(excess={"x": 0})
    )
    monkeypatch.setattr(chatbot.cluster, "print_report", lambda report, console: None)
    assert chatbot.cluster.main([]) == 0
    demo = seen[-1]
    assert [(k.name, k.concurrent, k.per_window) for k in demo.openai_keys] == [
        ("key-a", 5, 50),
        ("key-b", 3, 30),
    ]
    assert (demo.openai_in_flight_limit, demo.openai_window_limit, demo.openai_window) == (
        8,
        80,
        10.0,
    )
    assert (demo.large_model, demo.large_every, demo.large_per_window) == ("gpt-4o", 4, 10)
    assert (demo.tier_change_after, demo.learn_from_headers, demo.without_seconds) == (0, False, 8)
    limits = Settings.from_env(
        {
            "LIMITS_JSON": demo.limits_json(),
            "OPENAI_API_KEYS": f"key-a={KEY_A},key-b={KEY_B}",
        }
    ).limits["openai"]
    assert set(limits.deployments) == {"key-a", "key-b"}
    assert limits.deployments["key-b"].max_concurrent == 3
    assert limits.deployments["key-a"].models["gpt-4o"].windows[0].limit == 10
    assert chatbot.cluster.main(["--one-key"]) == 0
    assert (seen[-1].openai_keys, seen[-1].large_model) == ((), "")
    assert chatbot.cluster.main(["--tier-change"]) == 0
    tier = seen[-1]
    assert [k.per_window for k in tier.openai_keys] == [300, 300]
    assert (tier.openai_window, tier.learn_from_headers, tier.without_seconds) == (60, True, 0)
    assert (tier.tier_change_after, tier.tier_change_per_window) == (40, 60)
    for bad in (["--one-key"], ["--kill-one"], ["--noisy-user"], ["--without-seconds", "3"]):
        with pytest.raises(SystemExit) as info:
            chatbot.cluster.main(["--tier-change", *bad])
        assert info.value.code == 2
    assert len(seen) == 3


def test_openai_keys_are_named_never_shown() -> None:
    """``OPENAI_API_KEYS`` (``name=key,...``) must name exactly LIMITS_JSON's deployments
    of openai; every error names the entry or the configured deployments, never a key, and
    neither repr(Settings) nor str shows one."""
    env = {"LIMITS_JSON": CONFIG.limits_json(), "OPENAI_API_KEYS": f"key-a={KEY_A},key-b={KEY_B}"}
    settings = Settings.from_env(env)
    assert dict(settings.openai_api_keys) == {"key-a": KEY_A, "key-b": KEY_B}
    assert settings.openai_api_key == KEY_A  # the client's own: the first deployment's
    _no_key_in(repr(settings), str(settings))
    for bad in (KEY_A, f"key-a={KEY_A}", f"key-a={KEY_A},key-b=", f"key-a={KEY_A},{KEY_B}=key-b"):
        with pytest.raises(ConfigError) as info:
            Settings.from_env({**env, "OPENAI_API_KEYS": bad})
        _no_key_in(str(info.value), repr(info.value.value))
        assert info.value.field == "OPENAI_API_KEYS"


#: ``--tier-change`` on the small demo: windows of a real minute (the limiter learns only
#: per-minute limits), 60 a minute on each key (room for all 48 requests on either), and
#: after 6 answers key-a lowered to 12 a minute at the fake.
TIER_CONFIG = replace(
    CONFIG,
    openai_window=60.0,
    openai_keys=(OpenAIKey("key-a", KEY_A, 2, 60), OpenAIKey("key-b", KEY_B, 2, 60)),
    large_per_window=30,
    learn_from_headers=True,
    tier_change_after=6,
    tier_change_per_window=12,
    without_seconds=0.0,
)


def test_tier_change_the_limiter_learns_the_lower_limit_and_the_other_key_serves() -> None:
    """Mid-run, the fake lowers key-a from 60 to 12 requests a minute: the limiter learns
    12 for key-a from the headers (its stats), the fake refuses at most the key-a requests
    in flight at the change, every key-a request admitted after it fits the new limit,
    key-b serves the rest, every message is answered, and the report says so."""
    out = StringIO()
    console = Console(file=out, width=400)
    started = time.monotonic()
    with Cluster(TIER_CONFIG) as cluster:
        report = run_on(cluster, console=console)
        logs = [proc.output() for proc in cluster.procs]
    print_report(report, console)
    took = time.monotonic() - started
    text = out.getvalue()
    c, load = TIER_CONFIG, report.load
    total = c.users * c.messages
    assert (load.sent, load.answered, load.errors) == (total, total, {})
    summary = _summary(report)
    tier = summary["tier_change"]
    assert (tier["key"], tier["configured"], tier["new_limit"]) == ("key-a", 60, 12)
    assert tier["after_answers"] >= 6
    assert tier["learned"]["rate:60s"] == 12, tier["learned"]
    assert tier["learned"]["source"] == "provider"
    assert tier["window_at_end"]["limit"] == 12
    assert 0 <= tier["rejected_after"] <= tier["in_flight_at_change"] <= 2, tier
    assert tier["max_in_window_after"] <= 12, tier
    assert tier["others_admitted_after"]["key-b"] > 0, tier
    assert set(summary["excess"].values()) == {0}, summary["excess"]
    keys = summary["openai_keys"]
    assert keys["key-a"]["admitted"] + keys["key-b"]["admitted"] == total + 12
    assert keys["key-a"]["rejected"] == tier["rejected_after"]
    assert keys["key-b"]["rejected"] == 0
    assert (
        f"Tier change after {tier['after_answers']} answers: OpenAI lowered key-a "
        "(sk-f**********0001) from 60 to 12 requests per 60s" in text
    ), text
    assert "The limiter learned 12 per 60s for key-a from OpenAI's rate-limit headers" in text
    assert f"OpenAI refused {tier['rejected_after']} key-a requests after the change" in text
    assert text.rstrip().endswith("0 excess at the providers")
    _no_key_in(text, json.dumps(summary), *logs)
    print(
        f"{took:.1f}s; at the change key-a had {tier['in_window_at_change']} in its window, "
        f"{tier['in_flight_at_change']} in flight; 429s {tier['rejected_after']}; after: "
        f"key-a {tier['admitted_after']} (max {tier['max_in_window_after']} in a window), "
        f"key-b {tier['others_admitted_after']['key-b']}"
    )


# --------------------------------------------------------------------------- --keep


def _children(pid: int) -> set[int]:
    """The live child processes of ``pid`` (Linux: /proc/<pid>/task/<tid>/children)."""
    found: set[int] = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        found.update(int(p) for p in (task / "children").read_text().split())
    return found


def _alive(pid: int) -> bool:
    """Whether ``pid`` is a process that has not exited (a zombie has)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _wait_for(path: Path, pattern: str, proc: subprocess.Popen[bytes], timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = path.read_text()
        if re.search(pattern, text, re.MULTILINE):
            return text
        assert proc.poll() is None, f"exited {proc.returncode}:\n{text}"
        time.sleep(0.05)
    raise AssertionError(f"no {pattern!r} in {timeout}s:\n{path.read_text()}")


@pytest.mark.skipif(
    not Path("/proc/self/task").is_dir(), reason="reads the cluster's children from /proc (Linux)"
)
def test_keep_leaves_the_cluster_running_until_ctrl_c_then_nothing_is_left(
    tmp_path: Path,
) -> None:
    """``--keep``: after the report, Redis, both fakes and the replicas run on (exactly the
    processes it prints, its only children: the replicas without a shared limiter are
    gone), Redis answers, the printed ``limiter ... stats --watch`` command works against
    it and a replica answers a message; on SIGINT (Ctrl-C) it exits 0 and every one of
    those processes is gone, Redis's port closed."""
    log = tmp_path / "cluster.log"
    argv = [
        sys.executable, "-m", "chatbot", "cluster", "--replicas", "2", "--users", "4",
        "--messages", "2", "--without-seconds", "1", "--keep",
    ]  # fmt: skip
    with log.open("wb") as fh:
        proc = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT)
    pids: dict[str, int] = {}
    try:
        text = _wait_for(log, r"^stop it: ", proc, timeout=60)
        assert "0 excess at the providers" in text
        watch = re.search(r"^watch it: +(.+ stats --watch)$", text, re.MULTILINE)
        assert watch is not None, text
        port = int(re.findall(r"--url redis://127\.0\.0\.1:(\d+)/0 stats --watch", text)[0])
        listed = re.search(r"^processes: +(.+)$", text, re.MULTILINE)
        assert listed is not None, text
        pids = {name: int(pid) for name, pid in re.findall(r"(\S+) (\d+)", listed.group(1))}
        assert set(pids) == {"redis-server", "fake-openai", "fake-zapier", "replica-1", "replica-2"}
        assert _children(proc.pid) == set(pids.values())
        with redis.Redis(port=port, socket_timeout=5) as client:
            assert client.ping() is True
        shown = subprocess.run(
            [*shlex.split(watch.group(1)), "--count", "1"],
            capture_output=True,
            text=True,
            check=False,
            cwd=ROOT,
            timeout=30,
        )
        assert shown.returncode == 0, shown.stderr
        assert f"redis://127.0.0.1:{port}/0" in shown.stdout
        assert re.search(r"^openai +\d+/8 ", shown.stdout, re.MULTILINE), shown.stdout
        replica = re.search(r"^replicas: +(http://127\.0\.0\.1:\d+) ", text, re.MULTILINE)
        assert replica is not None, text
        body = {"user_id": "keep-test", "text": "hello"}
        answer = httpx2.post(f"{replica.group(1)}/messages", json=body, timeout=30)
        assert answer.status_code == 200, answer.text
        assert answer.json()["reply"] == "You said: hello"

        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0, log.read_text()
        # Each one was stopped and reaped by the cluster before it exited: none is left
        # even as a zombie (nothing to wait for).
        assert {name for name, pid in pids.items() if _alive(pid)} == set()
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(timeout=30)
        for pid in pids.values():  # only if the test failed before they were stopped
            if _alive(pid) and re.search(rb"chatbot|redis-server", _cmdline(pid)):
                os.kill(pid, signal.SIGKILL)


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except FileNotFoundError:
        return b""
