"""The fakes and other ASGI apps served by uvicorn in the test's own event loop, on 127.0.0.1.

Owns :func:`serve_fake_openai` (and :class:`Running`, its handle), :func:`serve_fake_zapier`
and :func:`serve_app` (any app, as a :class:`Served`). Used by test_fake_openai,
test_fake_zapier, test_security and ``tests._replica`` (the ``providers`` fixture). Imports
the fakes only, never ``limiter`` or the rest of ``chatbot``: the fakes' own tests stay
independent of what they referee.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx2
import openai
import uvicorn

from chatbot.fakes.openai_server import DEFAULT_API_KEY, FakeOpenAI, FakeOpenAIConfig
from chatbot.fakes.openai_server import create_app as create_fake_openai
from chatbot.fakes.zapier_server import FakeZapierApp, FakeZapierConfig
from chatbot.fakes.zapier_server import create_app as create_fake_zapier

__all__ = [
    "QuietServer",
    "Running",
    "Served",
    "serve_app",
    "serve_fake_openai",
    "serve_fake_zapier",
]


class QuietServer(uvicorn.Server):
    """uvicorn in a background task, leaving pytest's signal handlers alone, that stops as
    soon as ``should_exit`` is set (uvicorn's own loop looks every 0.1 s: 0.1-0.2 s more
    per test that serves a fake, over a suite)."""

    def __init__(self, config: uvicorn.Config) -> None:
        self._exit = asyncio.Event()
        super().__init__(config)

    @property
    def should_exit(self) -> bool:
        return self._exit.is_set()

    @should_exit.setter
    def should_exit(self, value: bool) -> None:
        if value:
            self._exit.set()
        else:
            self._exit.clear()

    def capture_signals(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()

    async def main_loop(self) -> None:
        counter = 0
        while not await self.on_tick(counter):  # on_tick keeps the Date header current
            counter = (counter + 10) % 864000  # one tick a second: the header's every time
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._exit.wait(), 1.0)


@dataclass
class Running:
    """The fake OpenAI that :func:`serve_fake_openai` runs: its state, port and clients."""

    fake: FakeOpenAI
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self, key: str = DEFAULT_API_KEY) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0)

    async def admin(self, method: str, path: str, body: Any = None) -> Any:
        async with httpx2.AsyncClient(base_url=self.url) as http:
            response = await http.request(method, path, json=body)
            return response.status_code, response.json()

    async def record(self) -> dict[str, Any]:
        status, body = await self.admin("GET", "/admin/record")
        assert status == 200
        return body  # type: ignore[no-any-return]


@contextlib.asynccontextmanager
async def serve_fake_openai(config: FakeOpenAIConfig) -> AsyncIterator[Running]:
    """Run the fake with uvicorn in this event loop on a free 127.0.0.1 port."""
    app = create_fake_openai(config)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = QuietServer(
        uvicorn.Config(
            app, log_config=None, log_level="warning", access_log=False, lifespan="off", ws="none"
        )
    )
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        async with asyncio.timeout(5):
            while not server.started:
                if task.done():
                    await task
                await asyncio.sleep(0.005)
        yield Running(app.state.fake, port)
    finally:
        server.should_exit = True
        await task
        sock.close()


@contextlib.asynccontextmanager
async def serve_fake_zapier(config: FakeZapierConfig) -> AsyncIterator[tuple[str, FakeZapierApp]]:
    """Run a fresh fake Zapier app on a free 127.0.0.1 port; yield its base URL and app."""
    app = create_fake_zapier(config)
    server = QuietServer(
        uvicorn.Config(
            app,
            host="127.0.0.1",
            port=0,
            log_level="warning",
            access_log=False,
            lifespan="on",
            ws="none",
            timeout_graceful_shutdown=2,
        )
    )
    task = asyncio.create_task(server.serve())
    try:
        while not server.started:
            if task.done():
                task.result()
            await asyncio.sleep(0.01)
        port = server.servers[0].sockets[0].getsockname()[1]
        yield f"http://127.0.0.1:{port}", app
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, timeout=10)


@dataclass
class Served:
    """A fake provider served in this event loop."""

    url: str
    server: QuietServer
    task: asyncio.Task[None]

    async def stop(self) -> None:
        if not self.task.done():
            self.server.should_exit = True
            await asyncio.wait_for(self.task, timeout=10)


@contextlib.asynccontextmanager
async def serve_app(app: Any, *, lifespan: str) -> AsyncIterator[Served]:
    """Serve ``app`` on a free 127.0.0.1 port until the block ends (or ``Served.stop``)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = QuietServer(
        uvicorn.Config(
            app,
            log_config=None,
            log_level="warning",
            access_log=False,
            lifespan=lifespan,
            ws="none",
            timeout_graceful_shutdown=2,
        )
    )
    task = asyncio.create_task(server.serve(sockets=[sock]))
    served = Served(f"http://127.0.0.1:{port}", server, task)
    try:
        async with asyncio.timeout(10):
            while not server.started:
                if task.done():
                    await task
                await asyncio.sleep(0.005)
        yield served
    finally:
        await served.stop()
        sock.close()
