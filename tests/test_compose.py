"""The Docker Compose demo stack, checked without Docker.

``docker-compose.yml`` against the Compose Specification's JSON schema (vendored in
``tests/data``), its commands against the project's modules, its mounts against the tree,
Prometheus and Grafana provisioning against the services, the dashboard's PromQL against
the metric names the replicas expose, and the whole file against leaked secrets.

The YAML files need PyYAML; without it those tests skip and say so.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import jsonschema
import pytest

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
SCHEMA_FILE = Path(__file__).resolve().parent / "data" / "compose-spec.json"
PROMETHEUS_FILE = ROOT / "deploy" / "prometheus" / "prometheus.yml"
GRAFANA_PROVISIONING = ROOT / "deploy" / "grafana" / "provisioning"
DASHBOARD_FILE = ROOT / "deploy" / "grafana" / "dashboards" / "fleetlimit.json"

REPLICAS = ("chatbot-1", "chatbot-2", "chatbot-3")
SERVICES = {"redis", "fake-openai", "fake-zapier", *REPLICAS, "load", "prometheus", "grafana"}
SERVE = ["python", "-m", "chatbot", "serve"]

# The metrics the replicas expose (the contract with chatbot/), each with its own labels.
_COUNTERS = {
    "limiter_admissions_total": {"api"},
    "limiter_refusals_total": {"api", "reason"},
    "limiter_timeouts_total": {"api", "reason"},
    "limiter_retries_total": {"api"},
    "limiter_provider_429_total": {"api"},
    "limiter_cache_requests_total": {"api", "result"},
    "chatbot_messages_total": {"status"},
}
_GAUGES = {
    "limiter_in_flight": {"api"},
    "limiter_limit": {"api", "limit"},
    "limiter_cluster_in_flight": {"api"},
    "limiter_window_used": {"api", "window"},
    "limiter_limit_in_force": {"api", "limit"},
    "limiter_cooldown_seconds": {"api"},
    "limiter_redis_up": {"api"},
    "limiter_fail_open": {"api"},
    "limiter_deployment_in_flight": {"api", "deployment", "model"},
    "limiter_deployment_window_used": {"api", "deployment", "model", "window"},
    "limiter_deployment_limit_in_force": {"api", "deployment", "model", "limit"},
    "limiter_deployment_cooldown_seconds": {"api", "deployment", "model"},
}
_HISTOGRAMS = {"limiter_wait_seconds": {"api", "priority"}, "chatbot_message_seconds": set()}
#: Every series name a dashboard may query, with the labels it may use.
METRIC_LABELS: dict[str, set[str]] = {
    **_COUNTERS,
    **_GAUGES,
    **{f"{name}_bucket": labels | {"le"} for name, labels in _HISTOGRAMS.items()},
    **{f"{name}_sum": labels for name, labels in _HISTOGRAMS.items()},
    **{f"{name}_count": labels for name, labels in _HISTOGRAMS.items()},
}
#: Labels Prometheus adds to every scraped series.
TARGET_LABELS = {"instance", "job"}
REQUIRED_PANELS = {
    "In flight vs limit",
    "Window use",
    "Waits",
    "Refusals by reason",
    "Provider 429s",
    "Messages",
}

# ${NAME:-default} and ${NAME-default}, Compose's interpolation with a default.
_INTERPOLATION = re.compile(r"\$\{(?P<name>\w+)(?::?-(?P<default>[^}]*))?\}")
_SECRET_NAME = re.compile(r"KEY|TOKEN|SECRET|PASSWORD|PASSWD", re.IGNORECASE)
_SECRET_FLAGS = {"--api-key", "--token", "--password", "--secret"}
_REAL_LOOKING = [
    re.compile(r"sk-(?:proj-|svcacct-|admin-|ant-)?[A-Za-z0-9_-]{20,}"),  # OpenAI, Anthropic
    re.compile(r"AKIA[0-9A-Z]{16}"),  # AWS access key id
    re.compile(r"gh[pousr]_[A-Za-z0-9]{30,}"),  # GitHub tokens
    re.compile(r"xox[abprs]-[A-Za-z0-9-]{10,}"),  # Slack tokens
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
]
_LONG_TOKEN = re.compile(r"[A-Za-z0-9+/_=-]{32,}")


# --------------------------------------------------------------------------- helpers


def _load_yaml(path: Path) -> Any:
    yaml = pytest.importorskip(
        "yaml", reason="PyYAML is not installed in this environment (add pyyaml to the dev extra)"
    )
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def _interpolate(value: str) -> str:
    """The value Compose would use when none of the variables is set."""
    return _INTERPOLATION.sub(lambda m: m["default"] or "", value)


def _python_commands(compose: dict[str, Any]) -> Iterator[tuple[str, list[str]]]:
    """(where, argv) of every ``python -m ...`` command: each service's and the Dockerfile's."""
    for name, service in compose["services"].items():
        command = service.get("command")
        if isinstance(command, list) and command[:2] == ["python", "-m"]:
            yield f"service {name}", command
    yield "Dockerfile CMD", _dockerfile_cmd()


def _dockerfile_cmd() -> list[str]:
    lines = [line for line in DOCKERFILE.read_text().splitlines() if line.startswith("CMD ")]
    assert len(lines) == 1, "the Dockerfile should have exactly one CMD, in exec (JSON) form"
    cmd = json.loads(lines[0].removeprefix("CMD "))
    assert isinstance(cmd, list)
    return cmd


def _module_path(module: str) -> Path | None:
    """The file ``python -m module`` runs from the project root, or None if there is none."""
    base = ROOT.joinpath(*module.split("."))
    if (base / "__init__.py").is_file():
        return base / "__main__.py"
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    return None


def _split_command(argv: list[str]) -> tuple[str, list[str], list[str]]:
    """``python -m module [subcommand ...] --flags ...`` -> (module, subcommands, flags)."""
    module, rest = argv[2], argv[3:]
    subcommands: list[str] = []
    for arg in rest:
        if arg.startswith("-"):
            break
        subcommands.append(arg)
    flags = [arg.split("=", 1)[0] for arg in rest if arg.startswith("--")]
    return module, subcommands, flags


def _env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {key: str(value) for key, value in env.items()}


def _flag_value(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


def _binds(service: dict[str, Any]) -> dict[PurePosixPath, Path]:
    """Container path -> host path of a service's bind mounts (short or long syntax)."""
    binds = {}
    for volume in service.get("volumes", []):
        if isinstance(volume, dict):
            if volume.get("type") == "bind":
                binds[PurePosixPath(volume["target"])] = ROOT / volume["source"]
        elif volume.startswith((".", "/", "~")):  # not a named volume
            source, target = volume.split(":")[:2]
            binds[PurePosixPath(target)] = ROOT / source
    return binds


def _host_path(binds: dict[PurePosixPath, Path], container_path: str) -> Path | None:
    """Where a path inside the container lives on the host, through the bind mounts."""
    path = PurePosixPath(container_path)
    for target, source in binds.items():
        if path == target or target in path.parents:
            return source.joinpath(*path.relative_to(target).parts)
    return None


_PROMQL_STRING = re.compile(r""""(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`""")
_PROMQL_MATCHERS = re.compile(r"\{([^}]*)\}")
_PROMQL_MATCHER_LABEL = re.compile(r"([A-Za-z_]\w*)\s*(?:=~|!~|!=|=)")
_PROMQL_GROUPING = re.compile(
    r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)", re.IGNORECASE
)
_PROMQL_RANGE = re.compile(r"\[[^\]]*\]")
_PROMQL_VARIABLE = re.compile(r"\$\{[^}]*\}|\$\w+|\[\[\w+\]\]")
_PROMQL_IDENT = re.compile(r"(?<![\w.])[A-Za-z_:][\w:]*")
_PROMQL_KEYWORDS = {
    *("and", "or", "unless", "bool", "offset", "atan2", "inf", "nan"),
    *("by", "without", "on", "ignoring", "group_left", "group_right"),
}


def _promql_names(expr: str) -> tuple[set[str], set[str]]:
    """(metric names, label names) that a PromQL expression refers to."""
    text = _PROMQL_STRING.sub('""', expr)
    labels = {
        label
        for matchers in _PROMQL_MATCHERS.findall(text)
        for label in _PROMQL_MATCHER_LABEL.findall(matchers)
    }
    text = _PROMQL_MATCHERS.sub(" ", text)
    labels |= {
        label.strip()
        for group in _PROMQL_GROUPING.findall(text)
        for label in group.split(",")
        if label.strip()
    }
    text = _PROMQL_GROUPING.sub(" ", text)
    text = _PROMQL_VARIABLE.sub(" ", _PROMQL_RANGE.sub(" ", text))
    metrics = set()
    for match in _PROMQL_IDENT.finditer(text):
        if text[match.end() :].lstrip().startswith("("):
            continue  # a function or aggregation
        if match[0].lower() not in _PROMQL_KEYWORDS:
            metrics.add(match[0])
    return metrics, labels


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))  # panels folded into a row


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    """docker-compose.yml as PyYAML reads it (merge keys resolved, nothing interpolated)."""
    data = _load_yaml(COMPOSE_FILE)
    assert isinstance(data, dict)
    return data


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    """The Grafana dashboard model."""
    data = json.loads(DASHBOARD_FILE.read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


# --------------------------------------------------------------------------- (a) schema


def test_compose_file_matches_the_compose_specification(compose: dict[str, Any]) -> None:
    """docker-compose.yml is valid under the Compose Specification's JSON schema."""
    schema = json.loads(SCHEMA_FILE.read_text(encoding="utf-8"))
    jsonschema.Draft7Validator.check_schema(schema)
    errors = [
        f"{'/'.join(map(str, error.absolute_path)) or '<root>'}: {error.message}"
        for error in jsonschema.Draft7Validator(schema).iter_errors(compose)
    ]
    assert errors == []


def test_compose_schema_rejects_an_unknown_service_key(compose: dict[str, Any]) -> None:
    """The vendored schema really constrains services: a misspelt key is an error."""
    schema = json.loads(SCHEMA_FILE.read_text(encoding="utf-8"))
    broken = {**compose, "services": {"redis": {**compose["services"]["redis"], "helthcheck": {}}}}
    assert not jsonschema.Draft7Validator(schema).is_valid(broken)


def test_compose_defines_the_demo_stack(compose: dict[str, Any]) -> None:
    """The stack has nine services; replicas wait for healthy Redis and fakes; load is opt-in."""
    services = compose["services"]
    assert set(services) == SERVICES
    assert services["redis"]["image"].startswith("redis:7")
    assert "healthcheck" in services["redis"]
    for name in REPLICAS:
        assert services[name]["command"][:4] == SERVE
        depends_on = services[name]["depends_on"]
        for dependency in ("redis", "fake-openai", "fake-zapier"):
            assert depends_on[dependency]["condition"] == "service_healthy", (name, dependency)
            assert "healthcheck" in services[dependency], dependency
    assert services["load"]["profiles"] == ["load"]
    assert [name for name, svc in services.items() if "profiles" in svc] == ["load"]


# --------------------------------------------------------------------------- (b) commands


def test_every_command_names_a_project_module(compose: dict[str, Any]) -> None:
    """Every ``python -m`` command (services, Dockerfile) names a module or package of ours."""
    missing = [
        f"{where}: {argv[2]}"
        for where, argv in _python_commands(compose)
        if _module_path(argv[2]) is None
    ]
    assert missing == []


def test_chatbot_subcommands_appear_in_its_main(compose: dict[str, Any]) -> None:
    """The subcommands the stack runs (``serve``, ``load``) appear in chatbot/__main__.py."""
    main = ROOT / "chatbot" / "__main__.py"
    used = {
        _split_command(argv)[1][0]
        for _, argv in _python_commands(compose)
        if argv[2] == "chatbot" and _split_command(argv)[1]
    }
    assert used == {"serve", "load"}
    if not main.is_file():
        pytest.skip("chatbot/__main__.py does not exist yet: cannot check its subcommands")
    source = main.read_text(encoding="utf-8")
    absent = sorted(sub for sub in used if f'"{sub}"' not in source and f"'{sub}'" not in source)
    assert absent == []


def test_every_command_flag_is_accepted(compose: dict[str, Any]) -> None:
    """Each ``--flag`` a command passes is listed by that module's (and subcommand's) ``--help``."""
    commands: dict[tuple[str, ...], set[str]] = {}
    for _, argv in _python_commands(compose):
        module, subcommands, flags = _split_command(argv)
        commands.setdefault((module, *subcommands), set()).update(flags)
    unchecked = []
    problems = []
    for (module, *subcommands), flags in sorted(commands.items()):
        path = _module_path(module)
        if path is None or not path.is_file():
            unchecked.append(module)
            continue
        result = subprocess.run(
            [sys.executable, "-m", module, *subcommands, "--help"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if result.returncode != 0:
            problems.append(f"{module} {' '.join(subcommands)} --help: {result.stderr.strip()}")
            continue
        problems += [
            f"{module} {' '.join(subcommands)}: no {flag}"
            for flag in sorted(flags)
            if not re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", result.stdout)
        ]
    assert problems == []
    if unchecked:
        pytest.skip(f"no __main__.py yet for {', '.join(unchecked)}: its flags are unchecked")


def test_replicas_point_at_the_services_of_the_stack(compose: dict[str, Any]) -> None:
    """Each replica's default URLs name a service of the stack on the port its command serves."""
    services = compose["services"]
    openai_port = _flag_value(services["fake-openai"]["command"], "--port")
    zapier_port = _flag_value(services["fake-zapier"]["command"], "--port")
    for name in REPLICAS:
        env = {key: _interpolate(value) for key, value in _env(services[name]).items()}
        assert env["REDIS_URL"] == "redis://redis:6379/0"
        assert env["OPENAI_BASE_URL"] == f"http://fake-openai:{openai_port}/v1"
        assert env["ZAPIER_MCP_URL"] == f"http://fake-zapier:{zapier_port}/mcp"
        assert env["LIMITER_NAMESPACE"] == "limiter"
        assert _flag_value(services[name]["command"], "--host") == "0.0.0.0"
    for name in ("fake-openai", "fake-zapier"):
        assert _flag_value(services[name]["command"], "--host") == "0.0.0.0", name


def test_replicas_and_fakes_share_the_demo_credentials(compose: dict[str, Any]) -> None:
    """The fakes accept exactly the key and token the replicas send, from the same variables."""
    services = compose["services"]
    api_key = _flag_value(services["fake-openai"]["command"], "--api-key")
    token = _flag_value(services["fake-zapier"]["command"], "--token")
    for name in REPLICAS:
        env = _env(services[name])
        assert env["OPENAI_API_KEY"] == api_key
        assert env["ZAPIER_MCP_TOKEN"] == token


def test_load_driver_targets_every_replica(compose: dict[str, Any]) -> None:
    """The load service sends to every replica, on the port each one serves."""
    services = compose["services"]
    load = services["load"]["command"]
    assert load[:4] == ["python", "-m", "chatbot", "load"]
    expected = {
        f"http://{name}:{_flag_value(services[name]['command'], '--port')}" for name in REPLICAS
    }
    assert set(_flag_value(load, "--targets").split(",")) == expected
    assert set(load[load.index("load") + 1 :]) >= {"--users", "--messages"}
    assert set(services["load"]["depends_on"]) == set(REPLICAS)


# --------------------------------------------------------------------------- (c) files


def test_every_mounted_file_exists(compose: dict[str, Any]) -> None:
    """Every bind-mounted path, build context and Dockerfile the stack names exists."""
    missing = []
    for name, service in compose["services"].items():
        missing += [f"{name}: {src}" for src in _binds(service).values() if not src.exists()]
        build = service.get("build")
        if build is not None:
            context = ROOT / (build if isinstance(build, str) else build.get("context", "."))
            dockerfile = (
                "Dockerfile" if isinstance(build, str) else build.get("dockerfile", "Dockerfile")
            )
            if not (context / dockerfile).is_file():
                missing.append(f"{name}: {context / dockerfile}")
    assert missing == []
    assert [src for service in compose["services"].values() for src in _binds(service).values()]


def test_dockerfile_copies_what_exists_and_is_not_ignored() -> None:
    """The image is python:3.11-slim run as non-root; each COPY source exists and is not ignored."""
    lines = DOCKERFILE.read_text(encoding="utf-8").splitlines()
    assert any(line.startswith("FROM python:3.11-slim") for line in lines)
    users = [line.split()[1] for line in lines if line.startswith("USER ")]
    assert users, "the image should switch to a non-root user"
    assert users[-1] not in {"root", "0"}
    assert any('pip install ".[chatbot]"' in line for line in lines)
    ignored = {
        line.strip().rstrip("/")
        for line in DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    }
    sources = [src for line in lines if line.startswith("COPY ") for src in line.split()[1:-1]]
    assert {"pyproject.toml", "README.md", "limiter", "chatbot"} <= set(sources)
    assert [src for src in sources if not (ROOT / src).exists()] == []
    assert [src for src in sources if src in ignored] == []


# --------------------------------------------------------------------------- (d) Prometheus


def test_prometheus_scrapes_every_replica_every_5s(compose: dict[str, Any]) -> None:
    """prometheus.yml parses and scrapes /metrics of every ``chatbot serve`` service every 5 s."""
    services = compose["services"]
    replicas = {name for name, svc in services.items() if svc.get("command", [])[:4] == SERVE}
    assert replicas == set(REPLICAS)
    config = _load_yaml(PROMETHEUS_FILE)
    targets: set[str] = set()
    for job in config["scrape_configs"]:
        interval = job.get("scrape_interval", config.get("global", {}).get("scrape_interval"))
        assert interval == "5s", job["job_name"]
        assert job.get("metrics_path", "/metrics") == "/metrics", job["job_name"]
        for static in job["static_configs"]:
            targets.update(static["targets"])
    assert targets == {
        f"{name}:{_flag_value(services[name]['command'], '--port')}" for name in replicas
    }
    binds = _binds(services["prometheus"])
    config_flag = next(
        arg for arg in services["prometheus"]["command"] if arg.startswith("--config.file=")
    )
    assert _host_path(binds, config_flag.split("=", 1)[1]) == PROMETHEUS_FILE


def test_grafana_provisions_prometheus_and_the_dashboard(
    compose: dict[str, Any], dashboard: dict[str, Any]
) -> None:
    """Grafana's provisioning mounts, names the Prometheus service and loads fleetlimit.json."""
    grafana = compose["services"]["grafana"]
    env = _env(grafana)
    assert env["GF_AUTH_ANONYMOUS_ENABLED"] == "true"
    assert env["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"
    binds = _binds(grafana)
    assert _host_path(binds, "/etc/grafana/provisioning") == GRAFANA_PROVISIONING
    [datasource] = [
        source
        for path in sorted((GRAFANA_PROVISIONING / "datasources").glob("*.y*ml"))
        for source in _load_yaml(path)["datasources"]
    ]
    assert datasource["type"] == "prometheus"
    assert datasource["url"] == "http://prometheus:9090"
    [provider] = [
        provider
        for path in sorted((GRAFANA_PROVISIONING / "dashboards").glob("*.y*ml"))
        for provider in _load_yaml(path)["providers"]
    ]
    folder = _host_path(binds, provider["options"]["path"])
    assert folder == DASHBOARD_FILE.parent
    home = _host_path(binds, env["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"])
    assert home == DASHBOARD_FILE
    uids = {
        panel["datasource"]["uid"]
        for panel in _panels(dashboard["panels"])
        if "datasource" in panel
    }
    assert uids == {datasource["uid"]}


# --------------------------------------------------------------------------- (e) dashboard


@pytest.mark.parametrize(
    ("expr", "metrics", "labels"),
    [
        (
            'sum by (api) (rate(limiter_refusals_total{reason=~"rate:.*"}[$__rate_interval]))',
            {"limiter_refusals_total"},
            {"api", "reason"},
        ),
        (
            "histogram_quantile(0.99, sum by (le) (rate(x_bucket[5m]))) / on(job) group_left y",
            {"x_bucket", "y"},
            {"le", "job"},
        ),
        ("max without (instance) (up offset 1m) > bool 2e3", {"up"}, {"instance"}),
    ],
)
def test_promql_names_finds_metrics_and_labels(
    expr: str, metrics: set[str], labels: set[str]
) -> None:
    """The checker's PromQL reader finds the metric and label names of an expression."""
    assert _promql_names(expr) == (metrics, labels)


def test_dashboard_has_the_panels_of_the_demo(dashboard: dict[str, Any]) -> None:
    """The dashboard is a Grafana model (uid, schemaVersion ~39) with the six required panels."""
    assert dashboard["uid"] == "fleetlimit"
    assert 36 <= dashboard["schemaVersion"] <= 41
    panels = list(_panels(dashboard["panels"]))
    assert {panel["title"] for panel in panels} >= REQUIRED_PANELS
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids))
    for panel in panels:
        if panel["type"] == "row":
            continue
        assert set(panel["gridPos"]) >= {"h", "w", "x", "y"}, panel["title"]
        assert [target["expr"] for target in panel["targets"] if target.get("expr")], panel["title"]


def test_dashboard_queries_only_exposed_metrics(dashboard: dict[str, Any]) -> None:
    """Every dashboard expression uses only metric names (and labels) that the replicas expose."""
    exprs = [
        (panel["title"], target["expr"])
        for panel in _panels(dashboard["panels"])
        for target in panel.get("targets", [])
        if target.get("expr")
    ]
    exprs += [
        (f"variable {var['name']}", str(var.get("query", "")))
        for var in dashboard.get("templating", {}).get("list", [])
        if var.get("type") == "query"
    ]
    assert exprs
    problems = []
    for title, expr in exprs:
        metrics, labels = _promql_names(expr)
        if not metrics:
            problems.append(f"{title}: no metric in {expr!r}")
        if unknown := metrics - METRIC_LABELS.keys():
            problems.append(f"{title}: unknown metrics {sorted(unknown)} in {expr!r}")
        allowed = TARGET_LABELS.union(*(METRIC_LABELS.get(m, set()) for m in metrics))
        if unknown := labels - allowed:
            problems.append(f"{title}: unknown labels {sorted(unknown)} in {expr!r}")
    assert problems == []


def test_dashboard_panels_cover_their_metrics(dashboard: dict[str, Any]) -> None:
    """Each required panel queries the metrics it is named after."""
    wanted = {
        "In flight vs limit": {"limiter_cluster_in_flight", "limiter_limit"},
        "Window use": {"limiter_window_used", "limiter_limit"},
        "Waits": {"limiter_wait_seconds_bucket"},
        "Refusals by reason": {"limiter_refusals_total"},
        "Provider 429s": {"limiter_provider_429_total"},
        "Messages": {"chatbot_messages_total"},
    }
    panels = {panel["title"]: panel for panel in _panels(dashboard["panels"])}
    for title, metrics in wanted.items():
        exprs = [target["expr"] for target in panels[title]["targets"]]
        used = set().union(*(_promql_names(expr)[0] for expr in exprs))
        assert metrics <= used, title
    waits = " ".join(target["expr"] for target in panels["Waits"]["targets"])
    assert "histogram_quantile(0.5," in waits
    assert "histogram_quantile(0.99," in waits
    limits = " ".join(target["expr"] for target in panels["In flight vs limit"]["targets"])
    assert 'limit="max_concurrent"' in limits
    by_priority = [target["expr"] for target in panels["Waits by priority"]["targets"]]
    assert all("sum by (api, priority, le)" in expr for expr in by_priority), by_priority


# --------------------------------------------------------------------------- (f) secrets


def test_compose_file_holds_no_real_looking_secret() -> None:
    """docker-compose.yml contains nothing shaped like a real key, token or private key."""
    text = COMPOSE_FILE.read_text(encoding="utf-8")
    leaks = [m[0] for pattern in _REAL_LOOKING for m in pattern.finditer(text)]
    leaks += [
        m[0]
        for m in _LONG_TOKEN.finditer(text)
        if re.search(r"\d", m[0]) and re.search(r"[A-Za-z]", m[0])
    ]
    assert leaks == []


def test_secrets_come_from_variables_with_demo_defaults(compose: dict[str, Any]) -> None:
    """Keys, tokens and passwords come from variables whose defaults are visibly fake."""
    secrets = []  # (where, raw value) of every secret-bearing setting
    for name, service in compose["services"].items():
        secrets += [(f"{name} {k}", v) for k, v in _env(service).items() if _SECRET_NAME.search(k)]
        command = service.get("command")
        if isinstance(command, list):
            secrets += [
                (f"{name} {flag}", command[i + 1])
                for i, flag in enumerate(command[:-1])
                if flag in _SECRET_FLAGS
            ]
    expected = {
        "fake-openai --api-key",
        "fake-zapier --token",
        "grafana GF_SECURITY_ADMIN_PASSWORD",
    }
    expected |= {
        f"{name} {var}" for name in REPLICAS for var in ("OPENAI_API_KEY", "ZAPIER_MCP_TOKEN")
    }
    assert expected <= {where for where, _ in secrets}
    problems = []
    for where, value in secrets:
        match = _INTERPOLATION.fullmatch(value)
        if match is None:
            problems.append(f"{where}: not from a ${{VARIABLE:-default}}: {value!r}")
        elif not re.search(r"fake|demo", match["default"] or ""):
            problems.append(f"{where}: default does not look like a demo value: {value!r}")
    assert problems == []


# --------------------------------------------------------------------------- (g) metrics


async def _exported_metrics() -> dict[str, set[str]]:
    """Every metric a replica exports, as a query names it (counters with ``_total``),
    with its labels: read from the exposition text after each metric got a sample
    through the path the replica feeds it by (the listener, the app, a scrape)."""
    import fakeredis

    from chatbot.metrics import Metrics
    from limiter import APILimits, Limiter

    redis = fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer())
    key = APILimits(max_concurrent=2, requests_per_minute=5)  # each deployment's own
    limits = APILimits(max_concurrent=2, requests_per_minute=5, deployments={"key-a": key})
    lim = Limiter(redis, {"openai": limits})
    try:
        metrics = Metrics(lim)
        for event, fields in [
            ("admitted", {"waited": 0.1, "reason": None, "priority": 10}),
            ("released", {"success": True, "lost": False}),
            ("refused", {"reason": "concurrency"}),
            ("timeout", {"reason": "concurrency"}),
            ("retry", {"kind": "rate_limited", "wait": 1.0}),
            ("provider_pause", {"kind": "rate_limited", "seconds": 1.0}),
        ]:
            metrics.on_event(event, "openai", fields)
        metrics.messages.labels("200").inc()  # what chatbot/app.py does per message
        metrics.message_seconds.observe(0.5)
        text = (await metrics.render()).decode()
    finally:
        await lim.aclose()
        await redis.aclose()
    kinds = dict(re.findall(r"^# TYPE (\w+) (\w+)$", text, re.MULTILINE))
    exported: dict[str, set[str]] = {}
    for name, kind in kinds.items():
        base = name.removesuffix("_created")
        if base != name and ({base, f"{base}_total"} & kinds.keys()):
            continue  # prometheus_client's creation time of a counter or histogram
        shown = name
        if kind == "counter" and not name.endswith("_total"):
            shown = f"{name}_total"  # older exposition formats name the family without it
        sample = f"{name}_count" if kind == "histogram" else shown
        found = re.search(rf"^{sample}(?:\{{([^}}]*)\}})? ", text, re.MULTILINE)
        assert found is not None, f"{name}: no sample to read its labels from"
        exported[shown] = set(re.findall(r"(\w+)=", found[1] or ""))
    return exported


async def test_the_contract_lists_every_exported_metric() -> None:
    """METRIC_LABELS (what dashboards may query) is what the replicas export, labels too."""
    exported = await _exported_metrics()
    assert exported == {**_COUNTERS, **_GAUGES, **_HISTOGRAMS}


def _readme_metrics() -> dict[str, set[str]]:
    """The README's "Metrics and listeners" list: each name with the labels it writes in
    braces (``api`` is left out for the limiter's metrics, which all carry it)."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Metrics and listeners", 1)[1].split("\n## ", 1)[0]
    listed: dict[str, set[str]] = {}
    for name, labels in re.findall(r"`((?:limiter|chatbot)_\w+)(?:\{([\w,]+)\})?`", section):
        assert name not in listed, f"{name} is listed twice"
        listed[name] = set(labels.split(",")) if labels else set()
    return listed


async def test_readme_names_every_exported_metric_with_its_labels() -> None:
    """The README's metrics list names exactly the metrics a replica exports, each with its
    labels (besides ``api``, which every ``limiter_*`` metric carries)."""
    exported = await _exported_metrics()
    assert all("api" in labels for name, labels in exported.items() if name.startswith("limiter_"))
    assert _readme_metrics() == {
        name: labels - {"api"} if name.startswith("limiter_") else labels
        for name, labels in exported.items()
    }
