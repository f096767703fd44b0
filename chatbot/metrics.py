"""Prometheus metrics of one replica, fed by the limiter's listener and the app."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from limiter import Limiter

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

    async def render(self) -> bytes:
        """The exposition text, with the cluster-wide gauges read from Redis now."""
        for api, stats in (await self.limiter.stats()).items():
            self.cluster_in_flight.labels(api).set(stats["concurrent_requests"])
            for window, use in stats["windows"].items():
                self.window_used.labels(api, window).set(use["used"])
        return generate_latest(self.registry)
