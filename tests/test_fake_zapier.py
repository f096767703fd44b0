"""The fake Zapier MCP server: real MCP client, bearer auth, the 429 gate, the referee record."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx2
import mcp
import pytest
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError

from chatbot.fakes.zapier_server import FakeZapierConfig
from tests._servers import serve_fake_zapier as serve

TOKEN = "zap-test-token"
TIMEOUT = httpx2.Timeout(30.0, read=300.0)  # the MCP SDK's own defaults (zapier_mcp's too)
PROTOCOL_VERSION = "2025-11-25"
EMAIL = {"to": "ada@example.com", "subject": "Hi", "body": "Hello"}


def config(**overrides: Any) -> FakeZapierConfig:
    return FakeZapierConfig(**{"token": TOKEN, "latency": 0.05, **overrides})


@contextlib.asynccontextmanager
async def mcp_session(base: str, token: str = TOKEN) -> AsyncIterator[mcp.ClientSession]:
    """An initialized session of the real MCP client, bearer token in its httpx2 client."""
    headers = {"Authorization": f"Bearer {token}"}
    async with (
        httpx2.AsyncClient(headers=headers, timeout=TIMEOUT) as http,
        streamable_http_client(f"{base}/mcp", http_client=http) as (read, write),
        mcp.ClientSession(read, write) as session,
    ):
        await session.initialize()
        yield session


async def record(base: str) -> dict[str, Any]:
    async with httpx2.AsyncClient(timeout=TIMEOUT) as http:
        response = await http.get(f"{base}/admin/record")
        response.raise_for_status()
        return dict(response.json())


def _sse_messages(text: str) -> list[dict[str, Any]]:
    return [
        json.loads(line[5:])
        for line in text.splitlines()
        if line.startswith("data:") and line[5:].strip()
    ]


class RawMCP:
    """Plain JSON-RPC POSTs over one session, to see the HTTP statuses the SDK hides."""

    def __init__(self, http: httpx2.AsyncClient, url: str):
        self.http, self.url = http, url
        self.headers = {
            "Authorization": f"Bearer {TOKEN}",
            "Accept": "application/json, text/event-stream",
            "Content-Type": "application/json",
        }
        self._ids = iter(range(1, 10_000))

    async def initialize(self) -> None:
        init = {
            "protocolVersion": PROTOCOL_VERSION,
            "capabilities": {},
            "clientInfo": {"name": "raw", "version": "0"},
        }
        response = await self.post({"method": "initialize", "params": init})
        assert response.status_code == 200
        self.headers["mcp-session-id"] = response.headers["mcp-session-id"]
        self.headers["mcp-protocol-version"] = PROTOCOL_VERSION
        note = await self.post({"method": "notifications/initialized"}, notification=True)
        assert note.status_code == 202

    async def post(self, message: dict[str, Any], *, notification: bool = False) -> httpx2.Response:
        body = {"jsonrpc": "2.0", **message}
        if not notification:
            body["id"] = next(self._ids)
        return await self.http.post(self.url, json=body, headers=self.headers)

    async def call(self, tool: str, arguments: dict[str, Any]) -> httpx2.Response:
        return await self.post(
            {"method": "tools/call", "params": {"name": tool, "arguments": arguments}}
        )


@contextlib.asynccontextmanager
async def raw_session(base: str) -> AsyncIterator[RawMCP]:
    async with httpx2.AsyncClient(timeout=TIMEOUT) as http:
        raw = RawMCP(http, f"{base}/mcp")
        await raw.initialize()
        yield raw
        await http.delete(raw.url, headers=raw.headers)


async def test_real_client_calls_a_tool_and_the_execution_is_recorded() -> None:
    """The real MCP client initializes, lists the tools, sends an email, and the record has it."""
    async with serve(config(latency=0.2)) as (base, _), mcp_session(base) as session:
        tools = await session.list_tools()
        assert {t.name for t in tools.tools} == {
            "send_email",
            "add_spreadsheet_row",
            "create_calendar_event",
        }
        result = await session.call_tool("send_email", EMAIL)
        assert not result.is_error
        assert result.structured_content is not None
        assert result.structured_content["status"] == "sent"
        seen = await record(base)

    [execution] = seen["executions"]
    assert execution["tool"] == "send_email"
    assert execution["arguments"] == EMAIL
    assert execution["gated"] is True
    assert execution["admitted"] <= execution["start"] < execution["end"]
    assert execution["end"] - execution["start"] >= 0.2
    assert seen["executed"] == seen["admitted"] == 1
    assert seen["max_concurrent"] == 1
    assert seen["max_in_minute_window"] == seen["max_in_hour_window"] == 1
    assert seen["rejected_429"] == seen["unauthorized_401"] == 0
    assert seen["free_requests"]["initialize"] == 1
    assert seen["free_requests"]["tools/list"] == 1


async def test_wrong_token_fails_the_connection_and_counts_a_401() -> None:
    """A wrong bearer token makes the real client fail, and the referee counts the 401."""
    async with serve(config()) as (base, _):
        with pytest.raises((MCPError, BaseExceptionGroup)):
            async with mcp_session(base, token="not-the-token"):
                pass
        async with httpx2.AsyncClient(timeout=TIMEOUT) as http:
            response = await http.post(
                f"{base}/mcp",
                json={"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {}},
                headers={"Accept": "application/json, text/event-stream"},
            )
        assert response.status_code == 401
        assert response.headers["www-authenticate"].startswith("Bearer")
        seen = await record(base)
    assert seen["unauthorized_401"] >= 2
    assert seen["executed"] == seen["admitted"] == seen["rejected_429"] == 0


async def test_concurrent_calls_beyond_the_limit_get_429_before_running() -> None:
    """Five simultaneous tool calls against max_concurrent=3: two get 429, three run, never four."""
    async with serve(config(max_concurrent=3, latency=0.3)) as (base, _), raw_session(base) as raw:
        responses = await asyncio.gather(
            *(
                raw.call("add_spreadsheet_row", {"spreadsheet": "s", "values": [str(i)]})
                for i in range(5)
            )
        )
        statuses = sorted(r.status_code for r in responses)
        assert statuses == [200, 200, 200, 429, 429]
        for response in responses:
            if response.status_code == 429:
                assert int(response.headers["retry-after"]) >= 1
                assert 0 < int(response.headers["retry-after-ms"]) <= 300
                assert response.json()["error"]["data"]["reasons"] == ["concurrency"]
            else:
                [answer] = [m for m in _sse_messages(response.text) if "result" in m]
                assert answer["result"]["structuredContent"]["status"] == "added"
        after = await raw.call("create_calendar_event", {"title": "t", "start": "2030-01-01"})
        assert after.status_code == 200  # the slots came back once the streams closed
        seen = await record(base)

    assert seen["executed"] == 4
    assert seen["max_concurrent"] == 3
    assert seen["max_in_flight"] == 3
    assert seen["rejected_429"] == 2
    assert seen["rejected_429_by_reason"]["concurrency"] == 2
    assert seen["in_flight"] == 0
    assert {e["tool"] for e in seen["executions"]} == {
        "add_spreadsheet_row",
        "create_calendar_event",
    }


async def test_real_client_sees_a_429_as_an_mcp_error() -> None:
    """Through the real client a refused call raises MCPError carrying the 429 message."""
    async with (
        serve(config(max_concurrent=1, latency=0.3)) as (base, _),
        mcp_session(base) as session,
    ):
        results = await asyncio.gather(
            session.call_tool("send_email", EMAIL),
            session.call_tool("send_email", EMAIL),
            return_exceptions=True,
        )
        seen = await record(base)
    errors = [r for r in results if isinstance(r, BaseException)]
    assert len(errors) == 1
    assert isinstance(errors[0], MCPError)
    assert "429" in str(errors[0])
    assert seen["executed"] == 1
    assert seen["rejected_429"] == 1


async def test_rolling_windows_refuse_with_the_exact_wait() -> None:
    """With 1 s / 3 s windows, the per-minute and then the per-hour limit answer 429 in time."""
    cfg = config(max_concurrent=10, per_minute=4, per_hour=6, minute_seconds=1.0, hour_seconds=3.0)
    async with serve(cfg) as (base, _), raw_session(base) as raw:
        first = await asyncio.gather(*(raw.call("send_email", EMAIL) for _ in range(4)))
        assert [r.status_code for r in first] == [200] * 4
        refused = await raw.call("send_email", EMAIL)
        assert refused.status_code == 429
        assert refused.json()["error"]["data"]["reasons"] == ["minute"]
        wait_ms = int(refused.headers["retry-after-ms"])
        assert 0 < wait_ms <= 1000
        assert refused.headers["retry-after"] == "1"

        await asyncio.sleep(wait_ms / 1000 + 0.2)  # all four have left the 1 s window
        second = await asyncio.gather(*(raw.call("send_email", EMAIL) for _ in range(2)))
        assert [r.status_code for r in second] == [200, 200]
        hour_refused = await raw.call("send_email", EMAIL)
        assert hour_refused.status_code == 429
        assert hour_refused.json()["error"]["data"]["reasons"] == ["hour"]
        assert 1000 < int(hour_refused.headers["retry-after-ms"]) <= 3000
        seen = await record(base)

    assert seen["executed"] == 6
    assert seen["max_in_minute_window"] == 4
    assert seen["max_in_hour_window"] == 6
    assert seen["rejected_429_by_reason"] == {"concurrency": 0, "minute": 1, "hour": 1}


async def test_free_requests_and_refused_tools_cost_nothing_and_reset_clears() -> None:
    """tools/list and an unknown tool cost no task, and /admin/reset empties the record."""
    cfg = config(per_minute=1, minute_seconds=5.0, hour_seconds=10.0)
    async with serve(cfg) as (base, _), raw_session(base) as raw:
        for _ in range(3):
            assert (await raw.post({"method": "tools/list"})).status_code == 200
        unknown = await raw.call("no_such_tool", {})
        assert unknown.status_code == 200  # the JSON-RPC error rides the SSE stream
        assert any(
            "error" in m or m.get("result", {}).get("isError") for m in _sse_messages(unknown.text)
        )
        assert (await raw.call("send_email", EMAIL)).status_code == 200  # the refund left room
        assert (await raw.call("send_email", EMAIL)).status_code == 429
        seen = await record(base)
        assert seen["executed"] == seen["admitted"] == 1
        assert seen["free_requests"]["tools/list"] == 3
        async with httpx2.AsyncClient(timeout=TIMEOUT) as http:
            assert (await http.post(f"{base}/admin/reset")).json() == {"reset": True}
        assert (await raw.call("send_email", EMAIL)).status_code == 200  # fresh windows
        after = await record(base)
    assert after["executed"] == 1
    assert after["rejected_429"] == 0


@pytest.fixture
def cli_server() -> Iterator[tuple[subprocess.Popen[str], str]]:
    """The CLI on a free port; yields the process and its base URL."""
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": str(root)}
    command = [sys.executable, "-m", "chatbot.fakes.zapier_server", "--port", "0"]
    command += ["--max-concurrent", "2", "--latency", "0.01", "--token", TOKEN]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env, cwd=root)
    try:
        assert process.stdout is not None
        line = process.stdout.readline().strip()
        assert line.startswith("fake-zapier listening on http://127.0.0.1:"), line
        yield process, line.removeprefix("fake-zapier listening on ").removesuffix("/mcp")
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=10)
        if process.stdout is not None:
            process.stdout.close()


def test_cli_serves_and_exits_cleanly_on_sigterm(
    cli_server: tuple[subprocess.Popen[str], str],
) -> None:
    """The CLI prints its URL, serves the record with its limits, and exits 0 on SIGTERM."""
    process, base = cli_server
    with httpx2.Client(timeout=TIMEOUT) as http:
        seen = http.get(f"{base}/admin/record").json()
    assert seen["config"]["max_concurrent"] == 2
    assert seen["config"]["minute_seconds"] == 60.0
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=10) == 0
