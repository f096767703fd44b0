"""End to end with a real Prometheus: Debian's ``prometheus`` binary, started here on a free
loopback port, scrapes 2 chatbot replicas (``chatbot.cluster.Cluster``: Redis, both fakes
and the replicas as processes) while users saturate OpenAI's concurrency limit, and
evaluates ``deploy/prometheus/alerts.yml``. Everything is read back through Prometheus'
HTTP API (``/api/v1/query``, ``/api/v1/query_range``, ``/api/v1/alerts``,
``/api/v1/label/__name__/values``).

The rules are loaded as they are in the repository except for their ``for:`` durations,
set to :data:`FOR` (the rest of each rule, expressions included, is untouched): the real
ones (1 to 5 minutes) would make the test last that long, and the unit tests of
``alerts_test.yml`` (``tests/test_alerts.py``) already check them as written.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2
import pytest

from chatbot.cluster import Cluster, ClusterConfig, _Proc
from chatbot.load import LoadResult, run_load
from limiter.testing import free_port
from tests.test_compose import DASHBOARD_FILE, _load_yaml, _panels, _promql_names

pytestmark = [pytest.mark.redis, pytest.mark.multiprocess, pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent
ALERTS_FILE = ROOT / "deploy" / "prometheus" / "alerts.yml"
PROMETHEUS = shutil.which("prometheus")

#: Every rule's ``for:`` in the Prometheus of this test (see the module's docstring).
FOR = "2s"
SCRAPE = "500ms"
SATURATED = "FleetlimitConcurrencySaturated"
STALE = "FleetlimitReplicaHeartbeatStale"

#: 2 replicas; OpenAI's limit of 3 in flight (the fake refuses a 4th) with 12 users, each
#: sending 10 messages one after the other: 9 calls queue behind the 3 held all along,
#: for about 10 s (0.25 s per call). No tool calls, and windows far from full: the only
#: alert the load may raise is the saturation one.
CONFIG = ClusterConfig(
    replicas=2,
    users=12,
    messages=10,
    tool_every=0,
    openai_concurrent=3,
    openai_per_window=1000,
    openai_window=10.0,
    openai_latency=0.25,
    zapier_concurrent=2,
    zapier_per_minute=100,
    zapier_minute=5.0,
    zapier_per_hour=1000,
    zapier_hour=60.0,
)


# --------------------------------------------------------------------------- helpers


class PromAPI:
    """Prometheus' HTTP API: each call returns ``data`` of a ``"status": "success"`` answer."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.http = httpx2.Client(base_url=url, timeout=10)

    def get(self, path: str, **params: Any) -> Any:
        response = self.http.get(path, params=params)
        body = response.json()
        assert response.status_code == 200, body
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str, at: float | None = None) -> dict[tuple[tuple[str, str], ...], float]:
        """An instant vector as {sorted labels: value}."""
        params: dict[str, Any] = {"query": expr}
        if at is not None:
            params["time"] = at
        data = self.get("/api/v1/query", **params)
        assert data["resultType"] == "vector", data
        return {
            tuple(sorted(item["metric"].items())): float(item["value"][1])
            for item in data["result"]
        }

    def alerts(self) -> list[dict[str, Any]]:
        alerts: list[dict[str, Any]] = self.get("/api/v1/alerts")["alerts"]
        return alerts

    def close(self) -> None:
        self.http.close()


def _rules_with_short_for(target: Path) -> list[str]:
    """alerts.yml with every ``for:`` set to FOR, written to ``target``; the alert names."""
    rules = _load_yaml(ALERTS_FILE)
    names = []
    for group in rules["groups"]:
        for rule in group["rules"]:
            assert "for" in rule, rule["alert"]
            rule["for"] = FOR
            names.append(rule["alert"])
    target.write_text(json.dumps(rules, indent=2), encoding="utf-8")  # JSON is YAML
    return names


def _metric_names_in_rules_and_dashboard() -> dict[str, set[str]]:
    """Every metric name the alert rules and the Grafana dashboard query, with where."""
    where: dict[str, set[str]] = {}
    exprs = [
        (f"alert {rule['alert']}", rule["expr"])
        for group in _load_yaml(ALERTS_FILE)["groups"]
        for rule in group["rules"]
    ]
    dashboard = json.loads(DASHBOARD_FILE.read_text(encoding="utf-8"))
    exprs += [
        (f"panel {panel['title']}", target["expr"])
        for panel in _panels(dashboard["panels"])
        for target in panel.get("targets", [])
        if target.get("expr")
    ]
    for source, expr in exprs:
        metrics, _ = _promql_names(expr)
        assert metrics, (source, expr)
        for name in metrics:
            where.setdefault(name, set()).add(source)
    return where


@contextlib.contextmanager
def _prometheus(tmp_path: Path, targets: list[str]) -> Iterator[tuple[PromAPI, list[str]]]:
    """A prometheus server scraping ``targets`` (job "chatbot") with the shortened rules;
    stopped (its process group) on the way out, whatever happened."""
    names = _rules_with_short_for(tmp_path / "alerts.yml")
    config = {
        "global": {
            "scrape_interval": SCRAPE,
            "scrape_timeout": SCRAPE,
            "evaluation_interval": SCRAPE,
        },
        "rule_files": ["alerts.yml"],
        "scrape_configs": [
            {
                "job_name": "chatbot",
                "metrics_path": "/metrics",
                "static_configs": [{"targets": targets}],
            }
        ],
    }
    (tmp_path / "prometheus.yml").write_text(json.dumps(config, indent=2), encoding="utf-8")
    port = free_port()
    assert PROMETHEUS is not None
    proc = _Proc(
        "prometheus",
        str(tmp_path),
        [
            PROMETHEUS,
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--storage.tsdb.retention.time=1h",
        ],
    )
    api = PromAPI(f"http://127.0.0.1:{port}")
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.popen.poll() is None, proc.output()[-3000:]
            with contextlib.suppress(httpx2.HTTPError):
                if api.http.get("/-/ready").status_code == 200:
                    break
            assert time.monotonic() < deadline, proc.output()[-3000:]
            time.sleep(0.1)
        yield api, names
    finally:
        api.close()
        proc.stop()


def _wait_for(what: str, check: Any, timeout: float, every: float = 0.2) -> Any:
    """``check()``'s first truthy answer, polled; fails naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(every)
    raise AssertionError(f"{what}: not within {timeout}s (last: {last!r})")


#: (seconds into the load, alert name, its api label, state, summary) of an active alert.
Seen = tuple[float, str, str, str, str]


async def _load_watching_alerts(cluster: Cluster, api: PromAPI) -> tuple[LoadResult, list[Seen]]:
    """Drive the load; meanwhile poll /api/v1/alerts every 0.2 s. Returns the load's result
    and every active alert seen, each time it was seen."""
    seen: list[Seen] = []
    started = time.monotonic()

    async def watch() -> None:
        async with httpx2.AsyncClient(base_url=api.url, timeout=5) as http:
            while True:
                body = (await http.get("/api/v1/alerts")).json()
                for alert in body["data"]["alerts"]:
                    labels = alert["labels"]
                    seen.append(
                        (
                            round(time.monotonic() - started, 2),
                            labels["alertname"],
                            labels.get("api", ""),
                            alert["state"],
                            alert["annotations"].get("summary", ""),
                        )
                    )
                await asyncio.sleep(0.2)

    watcher = asyncio.create_task(watch())
    try:
        c = cluster.config
        result = await run_load(
            cluster.urls, c.users, c.messages, tool_every=c.tool_every, timeout=60
        )
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
    return result, seen


# --------------------------------------------------------------------------- the test


@pytest.mark.skipif(
    PROMETHEUS is None,
    reason="no prometheus binary on PATH (Debian's package `prometheus`; .ci/run installs it)",
)
def test_prometheus_sees_saturation_alert_fire_and_resolve_and_every_metric(
    tmp_path: Path,
) -> None:
    """2 replicas under load, scraped every 0.5 s by a real Prometheus evaluating the alert
    rules (``for:`` shortened to 2 s): through its HTTP API,

    - the cluster-wide in-flight gauge of OpenAI (``limiter_cluster_in_flight``, the
      holders counted in Redis at each scrape), at its highest over the whole run, is
      exactly the limit in force (3): reached, never passed; each replica's own gauge
      stays within it too, and the fake OpenAI (the referee) saw no more than 3;
    - FleetlimitConcurrencySaturated{api="openai"} goes pending, then fires during the
      load, and no other alert is raised; after the load it resolves (leaves the active
      alerts, and its ALERTS series ends);
    - every metric name the alert rules and the Grafana dashboard query is in the TSDB,
      scraped from the replicas (``/api/v1/label/__name__/values``);
    - a replica SIGKILLed afterwards raises FleetlimitReplicaHeartbeatStale for its
      instance, once per API it served.

    The sum of the replicas' own gauges (``sum(limiter_in_flight)``) is printed, not
    asserted: the two replicas are scraped at different moments, and a replica's gauge
    drops only once its release has come back from Redis, while the slot may already be
    handed to a waiter of the other replica; so that sum can pass the limit while Redis
    never did. Redis' own count is the cluster's gauge.
    """
    config = CONFIG
    limit = config.openai_concurrent
    with Cluster(config) as cluster:
        targets = [url.removeprefix("http://") for url in cluster.urls]
        with _prometheus(tmp_path, targets) as (api, rule_names):
            # Ready: every rule loaded (with the short `for:`), both replicas scraped and up.
            groups = api.get("/api/v1/rules")["groups"]
            loaded = {rule["name"]: rule["duration"] for g in groups for rule in g["rules"]}
            assert loaded == dict.fromkeys(rule_names, 2)
            _wait_for(
                "both replicas up",
                lambda: len(api.query('up{job="chatbot"} == 1')) == 2,
                timeout=15,
            )
            assert api.alerts() == []

            began = time.time()
            result, seen = asyncio.run(_load_watching_alerts(cluster, api))
            load_seconds = time.time() - began
            total = config.users * config.messages
            assert (result.sent, result.answered, result.errors) == (total, total, {})

            # During the load: pending, then firing, naming the API; no other alert.
            assert {(name, a) for _, name, a, _, _ in seen} == {(SATURATED, "openai")}, seen
            pending = [t for t, _, _, state, _ in seen if state == "pending"]
            firing = [t for t, _, _, state, _ in seen if state == "firing"]
            assert pending, seen
            assert firing, seen
            assert min(pending) < min(firing)
            summaries = {summary for *_, summary in seen}
            assert summaries == {"API openai has been at its concurrency limit for 5 minutes"}

            # After it: resolved, out of the active alerts; its ALERTS series ends.
            _wait_for(
                "the saturation alert resolved",
                lambda: not [a for a in api.alerts() if a["labels"]["alertname"] == SATURATED],
                timeout=10,
            )
            resolved = time.time()
            firing_series = api.get(
                "/api/v1/query_range",
                query=f'ALERTS{{alertname="{SATURATED}", alertstate="firing"}}',
                start=began,
                end=resolved + 2,
                step=0.25,
            )["result"]
            assert [series["metric"]["api"] for series in firing_series] == ["openai"]
            stamps = [float(t) for t, _ in firing_series[0]["values"]]
            assert began < stamps[0] < stamps[-1] <= resolved, (began, stamps, resolved)

            # The cluster's in-flight gauge over the whole run: the limit reached, not passed.
            window = f"{math.ceil(time.time() - began) + 2}s"
            in_force = api.query('max by (api) (limiter_limit_in_force{limit="max_concurrent"})')
            assert in_force == {
                (("api", "openai"),): limit,
                (("api", "zapier"),): config.zapier_concurrent,
            }
            cluster_max = api.query(
                f"max by (api) (max_over_time(limiter_cluster_in_flight[{window}]))"
            )
            assert cluster_max == {(("api", "openai"),): limit, (("api", "zapier"),): 0}
            scrapes = api.query(
                f'count_over_time(limiter_cluster_in_flight{{api="openai"}}[{window}])'
            )
            assert len(scrapes) == 2
            assert all(n >= 1.5 * load_seconds for n in scrapes.values()), scrapes
            per_replica = api.query(f'max_over_time(limiter_in_flight{{api="openai"}}[{window}])')
            assert len(per_replica) == 2
            assert all(0 < n <= limit for n in per_replica.values()), per_replica
            summed = api.query(
                f'max_over_time(sum(limiter_in_flight{{api="openai"}})[{window}:{SCRAPE}])'
            )
            openai_record, _ = cluster.records()
            assert openai_record["max_in_flight"] == limit
            assert openai_record["rejected_total"] == 0, openai_record["rejections"]

            # Every metric the rules and the dashboard name, in a real scrape of the replicas.
            names = set(api.get("/api/v1/label/__name__/values"))
            wanted = _metric_names_in_rules_and_dashboard()
            missing = {name: sorted(where) for name, where in wanted.items() if name not in names}
            assert missing == {}
            from_replicas = api.query(
                'count by (__name__) ({job="chatbot", __name__=~"limiter_.+|chatbot_.+"})'
            )
            assert {dict(labels)["__name__"] for labels in from_replicas} >= wanted.keys() - {"up"}

            # A replica that dies: its heartbeat (its scrape) goes stale, per API it served.
            victim, victim_url = cluster.replicas[1]
            victim.kill()
            instance = victim_url.removeprefix("http://")
            stale = _wait_for(
                "the heartbeat alert",
                lambda: [
                    a["labels"]
                    for a in api.alerts()
                    if a["labels"]["alertname"] == STALE and a["state"] == "firing"
                ],
                timeout=15,
            )
            assert {(a["instance"], a["api"]) for a in stale} == {
                (instance, "openai"),
                (instance, "zapier"),
            }
            print(
                f"load {load_seconds:.1f}s: saturation pending {min(pending)}s, firing "
                f"{min(firing)}-{max(firing)}s into it, resolved {resolved - began:.1f}s; "
                f"cluster in flight max {cluster_max}; per replica {sorted(per_replica.values())};"
                f" sum of the replicas' gauges (not asserted) {summed}; {len(names)} names"
            )
