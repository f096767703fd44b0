"""Prometheus metrics of one replica, fed by the limiter's listener and the app."""

from __future__ import annotations

import contextlib
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from redis.exceptions import RedisError

from limiter import Limiter, LimiterUnavailable

__all__ = ["Metrics", "priority_band"]


def priority_band(priority: int) -> str:
    """The ``priority`` label of ``limiter_wait_seconds``: the band of powers of ten the
    priority (-1000 to 1000) falls in, so that the label takes at most 9 values:
    ``"-1000"``, ``"-999..-100"``, ``"-99..-10"``, ``"-9..-1"``, ``"0"``, ``"1..9"``,
    ``"10..99"``, ``"100..999"``, ``"1000"``."""
    size = min(abs(priority), 1000)
    if size in (0, 1000):
        return str(size if priority >= 0 else -size)
    low = 10 ** (len(str(size)) - 1)
    high = low * 10 - 1
    return f"{low}..{high}" if priority > 0 else f"-{high}..-{low}"


class Metrics:
    """The names here are a contract with deploy/grafana and deploy/prometheus."""

    def __init__(self, lim: Limiter) -> None:
        self.limiter = lim
        self.registry = registry = CollectorRegistry()
        self.admissions = Counter(
            "limiter_admissions", "Admissions by the limiter", ["api"], registry=registry
        )
        self.refusals = Counter(
            "limiter_refusals",
            "Requests held back at least once, by the limit that held them",
            ["api", "reason"],
            registry=registry,
        )
        self.timeouts = Counter(
            "limiter_timeouts", "Waits that ran out", ["api", "reason"], registry=registry
        )
        self.waits = Histogram(
            "limiter_wait_seconds",
            "Time from asking to admission, by the request's priority (in bands: see "
            "priority_band)",
            ["api", "priority"],
            buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
            registry=registry,
        )
        self.in_flight = Gauge(
            "limiter_in_flight", "Slots held by this replica", ["api"], registry=registry
        )
        self.retries = Counter("limiter_retries", "Retried attempts", ["api"], registry=registry)
        self.provider_429 = Counter(
            "limiter_provider_429", "Provider pauses (429 or quota)", ["api"], registry=registry
        )
        self.cache_requests = Counter(
            "limiter_cache_requests",
            "Lookups of the response cache (limiter.http.ResponseCache): hit (answered from "
            "Redis, no slot, no provider call) or miss",
            ["api", "result"],
            registry=registry,
        )
        self.limit = Gauge(
            "limiter_limit", "Configured limits", ["api", "limit"], registry=registry
        )
        self.cluster_in_flight = Gauge(
            "limiter_cluster_in_flight",
            "Slots held in the whole cluster",
            ["api"],
            registry=registry,
        )
        self.window_used = Gauge(
            "limiter_window_used",
            "Use of each rolling window, cluster-wide",
            ["api", "window"],
            registry=registry,
        )
        # Read from Redis at scrape time too (render), for deploy/prometheus/alerts.yml.
        self.limit_in_force = Gauge(
            "limiter_limit_in_force",
            "Limits in force, cluster-wide: a runtime override's value while one is in force, "
            "else the configured one (labels as limiter_limit)",
            ["api", "limit"],
            registry=registry,
        )
        self.cooldown = Gauge(
            "limiter_cooldown_seconds",
            "Seconds left of the API's cooldown (a provider pause), cluster-wide; 0: none",
            ["api"],
            registry=registry,
        )
        self.redis_up = Gauge(
            "limiter_redis_up",
            "1 when this replica's last read of the API's state in Redis (at scrape) worked",
            ["api"],
            registry=registry,
        )
        self.fail_open = Gauge(
            "limiter_fail_open",
            "1 while this replica admits locally, within its share (on_redis_error='fail_open' "
            "and Redis unreachable)",
            ["api"],
            registry=registry,
        )
        # An API's deployments and models (APILimits(deployments=, models=)), read at scrape:
        # deployment "" for the API's own models, model "" for a deployment as a whole.
        where = ["api", "deployment", "model"]
        self.set_in_flight = Gauge(
            "limiter_deployment_in_flight",
            "Slots held in the whole cluster through one deployment (or model) of an API",
            where,
            registry=registry,
        )
        self.set_window_used = Gauge(
            "limiter_deployment_window_used",
            "Use of each rolling window of one deployment (or model), cluster-wide",
            [*where, "window"],
            registry=registry,
        )
        self.set_limit_in_force = Gauge(
            "limiter_deployment_limit_in_force",
            "Limits in force of one deployment (or model): the configured one, or lower when "
            "the provider's headers reported less",
            [*where, "limit"],
            registry=registry,
        )
        self.set_cooldown = Gauge(
            "limiter_deployment_cooldown_seconds",
            "Seconds left of one deployment's (or model's) cooldown (a provider pause); 0: none",
            where,
            registry=registry,
        )
        #: Label sets of the gauges above set per API, to drop when Redis does not answer.
        self._set_series: dict[str, set[tuple[Any, tuple[str, ...]]]] = {}
        self.messages = Counter(
            "chatbot_messages", "Messages answered, by status", ["status"], registry=registry
        )
        self.message_seconds = Histogram(
            "chatbot_message_seconds",
            "Time to answer a message",
            buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120),
            registry=registry,
        )
        for api, limits in lim.limits.items():
            # Series that exist from the start at 0, so that the first increment shows in
            # rate() and increase(), and every alert's metric is in the first scrape.
            for family in (
                self.admissions,
                self.retries,
                self.provider_429,
                self.in_flight,
                self.fail_open,
            ):
                family.labels(api)
            for result in ("hit", "miss"):
                self.cache_requests.labels(api, result)
            if limits.max_concurrent is not None:
                self.limit.labels(api, "max_concurrent").set(limits.max_concurrent)
            for rate in limits.windows:
                self.limit.labels(api, rate.reason).set(rate.limit)
            if limits.tokens_per_minute is not None:
                self.limit.labels(api, "tokens").set(limits.tokens_per_minute)
        lim.add_listener(self.on_event)

    def on_event(self, event: str, api: str, fields: dict[str, Any]) -> None:
        if event == "admitted":
            self.admissions.labels(api).inc()
            # Admissions that carry no priority (fail_open's local ones) count as 0.
            band = priority_band(fields.get("priority", 0))
            self.waits.labels(api, band).observe(fields["waited"])
            self.in_flight.labels(api).inc()
        elif event == "released":
            self.in_flight.labels(api).dec()
        elif event == "refused":
            self.refusals.labels(api, fields["reason"]).inc()
        elif event == "timeout":
            self.timeouts.labels(api, fields["reason"]).inc()
        elif event == "retry":
            self.retries.labels(api).inc()
        elif event == "provider_pause":
            self.provider_429.labels(api).inc()
        elif event == "cache":
            self.cache_requests.labels(api, "hit" if fields["hit"] else "miss").inc()
        elif event == "fail_open":
            self.fail_open.labels(api).set(1)
        elif event == "recovered":
            self.fail_open.labels(api).set(0)

    async def render(self) -> bytes:
        """The exposition text, with the cluster-wide gauges read from Redis now.

        When Redis does not answer for an API, its ``limiter_redis_up`` is 0 and its
        cluster-wide gauges are left out (not kept at stale values); the replica's own
        series are served all the same.
        """
        for api in self.limiter.limits:
            try:
                stats = await self.limiter.stats(api)
            except (LimiterUnavailable, RedisError):
                self.redis_up.labels(api).set(0)
                self._forget_cluster_view(api)
                continue
            self.redis_up.labels(api).set(1)
            self.cluster_in_flight.labels(api).set(stats["concurrent_requests"])
            self.cooldown.labels(api).set(stats["cooldown_remaining"])
            if stats["max_concurrent"] is not None:
                self.limit_in_force.labels(api, "max_concurrent").set(stats["max_concurrent"])
            for window, use in stats["windows"].items():
                self.window_used.labels(api, window).set(use["used"])
                self.limit_in_force.labels(api, window).set(use["limit"])
            self._set_gauges(api, stats)
        return generate_latest(self.registry)

    def _set_gauges(self, api: str, stats: dict[str, Any]) -> None:
        """The gauges of each deployment and model of ``api`` from its stats()."""
        views = [("", model, v) for model, v in stats.get("models", {}).items()]
        for dep, v in stats.get("deployments", {}).items():
            views.append((dep, "", v))
            views += [(dep, model, mv) for model, mv in v.get("models", {}).items()]
        seen = self._set_series.setdefault(api, set())

        def put(gauge: Any, labels: tuple[str, ...], value: float) -> None:
            gauge.labels(*labels).set(value)
            seen.add((gauge, labels))

        for dep, model, v in views:
            where = (api, dep, model)
            put(self.set_cooldown, where, v["cooldown_remaining"])
            if v["max_concurrent"] is not None:
                put(self.set_in_flight, where, v["concurrent_requests"])
                put(self.set_limit_in_force, (*where, "max_concurrent"), v["max_concurrent"])
            for window, use in v["windows"].items():
                put(self.set_window_used, (*where, window), use["used"])
                put(self.set_limit_in_force, (*where, window), use["limit"])

    def _forget_cluster_view(self, api: str) -> None:
        """Drop the gauges read from Redis for ``api`` (until Redis answers again)."""
        limits = self.limiter.limits[api]
        windows = [rate.reason for rate in limits.windows]
        if limits.tokens_per_minute is not None:
            windows.append("tokens")
        series: list[tuple[Any, tuple[str, ...]]] = [
            (self.cluster_in_flight, (api,)),
            (self.cooldown, (api,)),
        ]
        series.append((self.limit_in_force, (api, "max_concurrent")))
        series += [
            (gauge, (api, w)) for w in windows for gauge in (self.window_used, self.limit_in_force)
        ]
        series += list(self._set_series.pop(api, ()))
        for gauge, labels in series:
            with contextlib.suppress(KeyError):  # never set (older clients raise)
                gauge.remove(*labels)
