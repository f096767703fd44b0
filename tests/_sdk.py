"""What test_agents_sdk and test_langchain share: the fakes they referee with, their fleet.

Owns :class:`Fakes` (a fake OpenAI and a fake Zapier served on 127.0.0.1 in the test's
event loop, with the limits each test gives them, accepting only ``tests._sdk_workers``'
``KEY`` / ``TOKEN``), :func:`serve_fakes`, :class:`SDKFleet` (workers running
``tests._sdk_workers``) and :func:`offline` (an environment in which neither SDK can reach
anything but those fakes: no keys, base URLs or tracing from the machine's environment).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest

from chatbot.fakes.openai_server import FakeOpenAI, FakeOpenAIConfig
from chatbot.fakes.openai_server import create_app as create_fake_openai
from chatbot.fakes.zapier_server import FakeZapierApp, FakeZapierConfig
from chatbot.fakes.zapier_server import create_app as create_fake_zapier
from tests._fleet import Fleet
from tests._sdk_workers import KEY, TOKEN
from tests._servers import serve_app

__all__ = ["Fakes", "SDKFleet", "offline", "serve_fakes"]

#: Variables through which an SDK would pick a key, a base URL or a trace destination.
_UNSET = (
    "OPENAI_API_KEY",
    "OPENAI_BASE_URL",
    "OPENAI_API_BASE",
    "OPENAI_ORG_ID",
    "OPENAI_ORGANIZATION",
    "OPENAI_PROJECT_ID",
    "LANGSMITH_TRACING",
    "LANGSMITH_TRACING_V2",
    "LANGCHAIN_TRACING",
    "LANGCHAIN_TRACING_V2",
    "LANGSMITH_API_KEY",
    "LANGCHAIN_API_KEY",
    "LANGSMITH_ENDPOINT",
    "LANGCHAIN_ENDPOINT",
    "LANGSMITH_GATEWAY",
    "LANGSMITH_GATEWAY_API_KEY",
)


def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Leave the SDKs (here and in the workers, who inherit it) only the fakes to talk to."""
    for name in _UNSET:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("OPENAI_AGENTS_DISABLE_TRACING", "1")


class SDKFleet(Fleet):
    """A :class:`~tests._fleet.Fleet` whose workers run ``tests._sdk_workers``."""

    module = "tests._sdk_workers"
    defaults: dict[str, Any] = {}  # noqa: RUF012


@dataclass
class Fakes:
    """Both fakes, served: their URLs (as the SDKs want them) and their referee state."""

    openai_url: str  # ends in /v1
    openai: FakeOpenAI
    zapier_url: str  # ends in /mcp
    zapier: FakeZapierApp

    def openai_record(self) -> dict[str, Any]:
        return self.openai.snapshot()

    def zapier_record(self) -> dict[str, Any]:
        return self.zapier.referee.snapshot()


@contextlib.asynccontextmanager
async def serve_fakes(
    openai: FakeOpenAIConfig | None = None, zapier: FakeZapierConfig | None = None
) -> AsyncIterator[Fakes]:
    """Both fakes on free 127.0.0.1 ports (default configs: only KEY / TOKEN accepted)."""
    openai_app = create_fake_openai(openai or FakeOpenAIConfig(api_keys=(KEY,)))
    zapier_app = create_fake_zapier(zapier or FakeZapierConfig(token=TOKEN, latency=0.01))
    async with (
        serve_app(openai_app, lifespan="off") as openai_served,
        serve_app(zapier_app, lifespan="on") as zapier_served,
    ):
        yield Fakes(
            f"{openai_served.url}/v1",
            openai_app.state.fake,
            f"{zapier_served.url}/mcp",
            zapier_app,
        )
