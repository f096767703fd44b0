"""``ConcurrencyManager``: the original chatbot's API, now cluster-wide through Redis."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self, TypeVar

from ._config import DEFAULT_LIMITS, APILimits
from ._limiter import Limiter

__all__ = ["ConcurrencyManager"]

T = TypeVar("T")


@dataclass(slots=True)
class _LocalStats:
    total_requests: int = 0
    successful_requests: int = 0
    failed_requests: int = 0
    response_time_total: float = 0.0
    concurrent_requests: int = 0

    def as_dict(self) -> dict[str, Any]:
        done = self.successful_requests + self.failed_requests
        return {
            "total_requests": self.total_requests,
            "successful_requests": self.successful_requests,
            "failed_requests": self.failed_requests,
            "success_rate": (100.0 * self.successful_requests / done) if done else 0.0,
            "average_response_time": (self.response_time_total / done) if done else 0.0,
            "concurrent_requests": self.concurrent_requests,
        }


class ConcurrencyManager:
    """Drop-in for the original ``ConcurrencyManager``, limits shared by every replica.

    ``api_configs=None`` uses :data:`DEFAULT_LIMITS` (openai 8 concurrent, 500/min,
    10,000/h, 5 attempts, 1-60 s; zapier 3, 60/min, 75/h, 3 attempts, 2-30 s).
    Pass ``redis=`` to use an existing ``redis.asyncio`` client instead of ``redis_url``.
    """

    def __init__(
        self,
        redis_url: str = "redis://127.0.0.1:6379/0",
        api_configs: Mapping[str, APILimits] | None = None,
        *,
        redis: Any = None,
        namespace: str = "limiter",
    ) -> None:
        configs = dict(DEFAULT_LIMITS if api_configs is None else api_configs)
        if redis is not None:
            self.limiter = Limiter(redis, configs, namespace=namespace)
        else:
            self.limiter = Limiter.from_url(redis_url, configs, namespace=namespace)
        #: The limits in force, by API.
        self.api_configs = configs
        self._local = {api: _LocalStats() for api in configs}

    def __repr__(self) -> str:
        return f"<ConcurrencyManager apis={sorted(self.api_configs)}>"

    async def execute_with_concurrency_control(
        self,
        api_name: str,
        operation: Callable[[], Awaitable[T]],
        operation_name: str = "operation",
    ) -> T:
        """Run ``operation()`` under ``api_name``'s cluster-wide limits, with retries."""
        self.limiter.api_limits(api_name)  # unknown API: ConfigError before any counting
        local = self._local[api_name]
        local.total_requests += 1
        local.concurrent_requests += 1
        start = time.monotonic()
        try:
            result = await self.limiter.call(api_name, operation, name=operation_name)
        except BaseException:
            local.failed_requests += 1
            raise
        else:
            local.successful_requests += 1
            return result
        finally:
            local.concurrent_requests -= 1
            local.response_time_total += time.monotonic() - start

    def get_stats(self) -> dict[str, dict[str, Any]]:
        """This process's counters per API (the original keys)."""
        return {api: stats.as_dict() for api, stats in self._local.items()}

    async def get_cluster_stats(self) -> dict[str, dict[str, Any]]:
        """Every replica's counters together, per API, from Redis."""
        return await self.limiter.stats()

    async def aclose(self) -> None:
        """Close the limiter (and its Redis client when it made one)."""
        await self.limiter.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()
