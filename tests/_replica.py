"""The chatbot replica in-process, on both fakes and the session's redis-server.

Owns :class:`Providers` (both fakes served, the flushed Redis, the replica's settings for
them), :func:`serve_providers` (behind the ``providers`` fixture in ``conftest``) and
:func:`running` (the replica with its lifespan running and an ASGI client of it). Used by
test_chatbot_app, test_security and test_fuzz.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from typing import Any

import httpx2
import redis.asyncio as aioredis
from fastapi import FastAPI

from chatbot.app import create_app
from chatbot.fakes.openai_server import FakeOpenAI, FakeOpenAIConfig
from chatbot.fakes.openai_server import create_app as create_fake_openai
from chatbot.fakes.zapier_server import FakeZapierApp, FakeZapierConfig
from chatbot.fakes.zapier_server import create_app as create_fake_zapier
from chatbot.settings import Settings
from limiter import APILimits
from limiter.testing import RedisServer
from tests._servers import Served, serve_app

__all__ = ["KEY", "LIMITS", "NAMESPACE", "TOKEN", "Providers", "running", "serve_providers"]

#: The only key the fake OpenAI of ``providers`` accepts, and the one the replica sends.
KEY = "sk-apptest-SECRET-5f0c9d2e7a41b386"
#: The only token the fake Zapier of ``providers`` accepts.
TOKEN = "zap-apptest-SECRET-token-71d3"
NAMESPACE = "apptest"
LIMITS = {
    "openai": APILimits(
        max_concurrent=4, retry_attempts=1, backoff_min=0.01, backoff_max=0.05, lease_ttl=5.0
    ),
    "zapier": APILimits(
        max_concurrent=2, retry_attempts=1, backoff_min=0.01, backoff_max=0.05, lease_ttl=5.0
    ),
}


@dataclass
class Providers:
    """Both fakes, the real redis-server (flushed) and a client of it."""

    redis: aioredis.Redis
    redis_url: str
    openai: Served
    openai_fake: FakeOpenAI
    zapier: Served
    zapier_app: FakeZapierApp

    def settings(self, **overrides: Any) -> Settings:
        base = Settings(
            redis_url=self.redis_url,
            openai_base_url=f"{self.openai.url}/v1",
            openai_api_key=KEY,
            zapier_mcp_url=f"{self.zapier.url}/mcp",
            zapier_token=TOKEN,
            namespace=NAMESPACE,
            limits=LIMITS,
            message_timeout=10.0,
            replica="replica-test",
        )
        return replace(base, **overrides)

    def openai_record(self) -> dict[str, Any]:
        return self.openai_fake.snapshot()

    def zapier_record(self) -> dict[str, Any]:
        return self.zapier_app.referee.snapshot()


@contextlib.asynccontextmanager
async def serve_providers(
    redis_server: RedisServer, real_redis: aioredis.Redis
) -> AsyncIterator[Providers]:
    """Fake OpenAI (accepting only KEY) and fake Zapier (only TOKEN), on a flushed Redis."""
    fake_openai = create_fake_openai(FakeOpenAIConfig(api_keys=(KEY,)))
    fake_zapier = create_fake_zapier(FakeZapierConfig(token=TOKEN, latency=0.01))
    async with (
        serve_app(fake_openai, lifespan="off") as openai_served,
        serve_app(fake_zapier, lifespan="on") as zapier_served,
    ):
        yield Providers(
            real_redis,
            redis_server.url,
            openai_served,
            fake_openai.state.fake,
            zapier_served,
            fake_zapier,
        )


@contextlib.asynccontextmanager
async def running(settings: Settings) -> AsyncIterator[tuple[FastAPI, httpx2.AsyncClient]]:
    """The replica with its lifespan running, and an ASGI client of it."""
    app = create_app(settings)
    async with (
        app.router.lifespan_context(app),
        httpx2.AsyncClient(
            transport=httpx2.ASGITransport(app=app), base_url="http://chatbot", timeout=30
        ) as client,
    ):
        yield app, client
