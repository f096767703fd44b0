"""The alerting rules, ``deploy/prometheus/alerts.yml``, checked without a server.

``promtool`` (Debian's package ``prometheus``; ``.ci/run`` installs it) checks the rules and
the compose Prometheus' config that loads them, and runs their unit tests,
``deploy/prometheus/alerts_test.yml``. Without promtool on PATH those three tests skip,
saying so. The rest reads the files: every alert has a ``for:``, a severity, a summary
naming the API and a runbook line in the README; it is unit-tested both firing and not;
it queries only metrics the replicas export; docker-compose.yml mounts the file where
prometheus.yml looks for it. Last, the replica's metrics that only the alerts read
(``chatbot/metrics.py``) are checked against a limiter on Redis and one without.

``tests/test_prometheus_e2e.py`` runs the rules in a real Prometheus.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from chatbot.metrics import Metrics
from limiter import APILimits, Limiter, LimiterUnavailable, Rate
from limiter.testing import free_port
from tests.conftest import LimiterFactory
from tests.test_compose import (
    METRIC_LABELS,
    PROMETHEUS_FILE,
    TARGET_LABELS,
    _binds,
    _host_path,
    _load_yaml,
    _promql_names,
)

ROOT = Path(__file__).resolve().parent.parent
RULES_DIR = ROOT / "deploy" / "prometheus"
ALERTS_FILE = RULES_DIR / "alerts.yml"
ALERTS_TEST_FILE = RULES_DIR / "alerts_test.yml"
README = ROOT / "README.md"

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None,
    reason="promtool is not on PATH (Debian's package `prometheus`; .ci/run installs it)",
)
SEVERITIES = {"info", "warning", "critical"}
#: Series Prometheus makes itself, with their labels: `up` is a target's last scrape.
PROMETHEUS_SERIES = {"up": TARGET_LABELS}


def _rules() -> list[dict[str, Any]]:
    data = _load_yaml(ALERTS_FILE)
    rules = [rule for group in data["groups"] for rule in group["rules"]]
    assert rules
    return rules


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run(
        [PROMTOOL, *args],
        cwd=RULES_DIR,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


# --------------------------------------------------------------------------- promtool


@needs_promtool
def test_promtool_checks_the_rules() -> None:
    """``promtool check rules alerts.yml`` passes and finds every rule of the file."""
    result = _promtool("check", "rules", ALERTS_FILE.name)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(_rules())} rules found" in result.stdout, result.stdout


@needs_promtool
def test_promtool_unit_tests_of_the_rules_pass() -> None:
    """``promtool test rules alerts_test.yml``: every case gets exactly its alerts."""
    result = _promtool("test", "rules", ALERTS_TEST_FILE.name)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout, result.stdout


@needs_promtool
def test_promtool_checks_the_compose_prometheus_config() -> None:
    """prometheus.yml is a valid config whose rule_files load alerts.yml (checked too)."""
    result = _promtool("check", "config", PROMETHEUS_FILE.name)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 1 rule files found" in result.stdout, result.stdout
    assert f"SUCCESS: {len(_rules())} rules found" in result.stdout, result.stdout


# --------------------------------------------------------------------------- the files


def test_every_alert_has_a_duration_a_severity_a_summary_and_a_runbook() -> None:
    """Each rule is an alert with a ``for:``, a severity, a summary naming the API, a
    description and a runbook_url pointing at its own anchor in the README."""
    rules = _rules()
    names = [rule.get("alert") for rule in rules]
    assert all(names), "only alerting rules here"
    assert len(set(names)) == len(names)
    readme = README.read_text(encoding="utf-8")
    for rule in rules:
        name = rule["alert"]
        assert re.fullmatch(r"\d+[smh]", str(rule.get("for", ""))), name
        assert rule["labels"]["severity"] in SEVERITIES, name
        annotations = rule["annotations"]
        assert set(annotations) == {"summary", "description", "runbook_url"}, name
        assert "{{ $labels.api }}" in annotations["summary"], name
        assert annotations["runbook_url"] == f"README.md#{name.lower()}", name
        assert readme.count(f'<a id="{name.lower()}"></a>') == 1, name


def test_the_readme_runbook_has_one_line_per_alert() -> None:
    """README.md's "Alerts runbook" has one item per alert, in the file's order, each
    opening with its anchor and name and saying what to do."""
    readme = README.read_text(encoding="utf-8")
    section = readme.split("### Alerts runbook", 1)[1].split("\n#", 1)[0]
    items = re.findall(r'^- <a id="([a-z0-9]+)"></a>\*\*(\w+)\*\*', section, re.MULTILINE)
    names = [rule["alert"] for rule in _rules()]
    assert items == [(name.lower(), name) for name in names]
    for rule in _rules():
        severity, minutes = rule["labels"]["severity"], rule["for"].removesuffix("m")
        assert f"**{rule['alert']}** ({severity}" in re.sub(r"\s+", " ", section), rule["alert"]
        assert f"{minutes} min)" in section.split(f"**{rule['alert']}**", 1)[1][:40]


def test_every_alert_is_unit_tested_firing_and_not_firing() -> None:
    """alerts_test.yml loads alerts.yml and has, for every alert, a time at which it
    fires (with its labels and annotations) and one at which it does not."""
    tests = _load_yaml(ALERTS_TEST_FILE)
    assert tests["rule_files"] == [ALERTS_FILE.name]
    fires: set[str] = set()
    silent: set[str] = set()
    for case in tests["tests"]:
        for check in case["alert_rule_test"]:
            expected = check.get("exp_alerts") or []
            (fires if expected else silent).add(check["alertname"])
            for alert in expected:
                assert alert["exp_labels"]["severity"], check
                assert "api" in alert["exp_labels"], check
                assert set(alert["exp_annotations"]) == {"summary", "description", "runbook_url"}
    names = {rule["alert"] for rule in _rules()}
    assert fires == names
    assert silent == names


def test_alert_rules_query_only_exposed_metrics() -> None:
    """Each rule's expression uses only metrics (and labels) the replicas export, plus
    Prometheus' own ``up``."""
    known = {**METRIC_LABELS, **PROMETHEUS_SERIES}
    problems = []
    for rule in _rules():
        metrics, labels = _promql_names(rule["expr"])
        if not metrics:
            problems.append(f"{rule['alert']}: no metric")
        if unknown := metrics - known.keys():
            problems.append(f"{rule['alert']}: unknown metrics {sorted(unknown)}")
        allowed = TARGET_LABELS.union(*(known.get(m, set()) for m in metrics))
        if unknown := labels - allowed:
            problems.append(f"{rule['alert']}: unknown labels {sorted(unknown)}")
    assert problems == []


def test_compose_prometheus_loads_the_alert_rules() -> None:
    """prometheus.yml's rule_files, read relative to where compose mounts it, is
    alerts.yml, mounted from the repository."""
    compose = _load_yaml(ROOT / "docker-compose.yml")
    prometheus = compose["services"]["prometheus"]
    binds = _binds(prometheus)
    flag = next(arg for arg in prometheus["command"] if arg.startswith("--config.file="))
    config_path = PurePosixPath(flag.split("=", 1)[1])
    assert _host_path(binds, str(config_path)) == PROMETHEUS_FILE
    rule_files = _load_yaml(PROMETHEUS_FILE)["rule_files"]
    assert rule_files == ["alerts.yml"]
    assert _host_path(binds, str(config_path.parent / rule_files[0])) == ALERTS_FILE


# --------------------------------------------------------------------------- the metrics


async def test_metrics_show_the_limits_in_force_and_the_cooldown(
    make_limiter: LimiterFactory,
) -> None:
    """limiter_limit_in_force is the configured limit, then an override's value while one
    is in force (limiter_limit stays the configured one); limiter_cooldown_seconds is the
    cooldown left; limiter_redis_up is 1; the counters the alerts rate exist at 0."""
    lim = make_limiter(
        {"openai": APILimits(max_concurrent=4, rates=[Rate(100, 60)], tokens_per_minute=1000)}
    )
    metrics = Metrics(lim)
    api = (("api", "openai"),)

    def in_force(values: dict[Any, float]) -> dict[str, float]:
        return {
            dict(labels)["limit"]: value
            for (name, labels), value in values.items()
            if name == "limiter_limit_in_force"
        }

    values = _samples((await metrics.render()).decode())
    assert in_force(values) == {"max_concurrent": 4, "rate:60s": 100, "tokens": 1000}
    assert values[("limiter_redis_up", api)] == 1
    assert values[("limiter_cooldown_seconds", api)] == 0
    assert values[("limiter_fail_open", api)] == 0
    for counter in ("admissions", "retries", "provider_429"):
        assert values[(f"limiter_{counter}_total", api)] == 0, counter

    await lim.set_limits("openai", max_concurrent=2, requests_per_minute=50)
    await lim.cooldown("openai", 30)
    values = _samples((await metrics.render()).decode())
    assert in_force(values) == {"max_concurrent": 2, "rate:60s": 50, "tokens": 1000}
    assert values[("limiter_limit", (*api, ("limit", "max_concurrent")))] == 4
    assert 29 < values[("limiter_cooldown_seconds", api)] <= 30

    await lim.clear_limits("openai")
    values = _samples((await metrics.render()).decode())
    assert in_force(values) == {"max_concurrent": 4, "rate:60s": 100, "tokens": 1000}


async def test_metrics_show_each_deployment_and_model(make_limiter: LimiterFactory) -> None:
    """Each deployment, each model and each model of a deployment has its slots in flight,
    window use, limits in force (a learned limit lowers one) and cooldown, cluster-wide,
    labelled api/deployment/model ("" where it names none)."""
    each = APILimits(max_concurrent=2, models={"gpt-4o": APILimits(requests_per_minute=9)})
    lim = make_limiter(
        {
            "openai": APILimits(
                deployments={"key-a": each, "key-b": each},
                models={"gpt-4o-mini": APILimits(tokens_per_minute=500)},
            )
        }
    )
    metrics = Metrics(lim)
    await lim.cooldown("openai", 30, deployment="key-b")
    held = await lim.acquire("openai", timeout=0, model="gpt-4o")
    await lim.learn_limits("openai", requests_per_minute=4, deployment="key-a", model="gpt-4o")
    values = _samples((await metrics.render()).decode())

    def at(name: str, dep: str, model: str, **more: str) -> float:
        labels = {"api": "openai", "deployment": dep, "model": model, **more}
        return values[(name, tuple(sorted(labels.items())))]

    assert at("limiter_deployment_in_flight", "key-a", "") == 1
    assert at("limiter_deployment_in_flight", "key-b", "") == 0
    assert at("limiter_deployment_limit_in_force", "key-a", "", limit="max_concurrent") == 2
    assert at("limiter_deployment_window_used", "key-a", "gpt-4o", window="rate:60s") == 1
    assert at("limiter_deployment_limit_in_force", "key-a", "gpt-4o", limit="rate:60s") == 4
    assert at("limiter_deployment_limit_in_force", "key-b", "gpt-4o", limit="rate:60s") == 9
    assert at("limiter_deployment_limit_in_force", "", "gpt-4o-mini", limit="tokens") == 500
    assert 29 < at("limiter_deployment_cooldown_seconds", "key-b", "") <= 30
    assert at("limiter_deployment_cooldown_seconds", "key-a", "") == 0
    await held.release()


async def test_metrics_without_redis_say_so_and_drop_the_cluster_gauges() -> None:
    """With Redis unreachable, /metrics still renders: limiter_redis_up is 0 and the
    gauges read from Redis are left out rather than kept at their last values; a
    fail_open limiter's breaker opening sets limiter_fail_open to 1, and recovery to 0."""
    url = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    lim = Limiter.from_url(
        url,
        {"openai": APILimits(max_concurrent=4, rates=[Rate(10, 1)])},
        on_redis_error="fail_open",
    )
    try:
        metrics = Metrics(lim)
        # As if Redis had answered before: the gauges it feeds hold values.
        metrics.cluster_in_flight.labels("openai").set(3)
        metrics.window_used.labels("openai", "rate:1s").set(5)
        metrics.limit_in_force.labels("openai", "max_concurrent").set(4)
        metrics.cooldown.labels("openai").set(0)
        with pytest.raises(LimiterUnavailable):  # no heartbeat yet: refused, breaker open
            await lim.acquire("openai", timeout=0)
        values = _samples((await metrics.render()).decode())
        names = {name for name, _ in values}
        assert values[("limiter_redis_up", (("api", "openai"),))] == 0
        assert values[("limiter_fail_open", (("api", "openai"),))] == 1
        gone = {
            "limiter_cluster_in_flight",
            "limiter_window_used",
            "limiter_limit_in_force",
            "limiter_cooldown_seconds",
        }
        assert not names & gone
        assert "limiter_limit" in names  # the configured limits are the replica's own
        metrics.on_event("recovered", "openai", {})
        values = _samples((await metrics.render()).decode())
        assert values[("limiter_fail_open", (("api", "openai"),))] == 0
    finally:
        await lim.aclose()
