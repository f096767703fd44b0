"""An OpenAI Agents SDK agent with Zapier's MCP tools, both limited for the whole cluster.

The agent's model calls go through ``limiter.http.openai_client`` (an ``AsyncOpenAI`` on
:class:`~limiter.http.LimitedTransport`); its Zapier tools come through the SDK's
``MCPServerStreamableHttp`` with ``httpx_client_factory=mcp_http_client_factory(lim)``, so
only a ``tools/call`` takes a Zapier slot (the handshake and ``tools/list`` pass free) and
a tool call is never retried after it may have run. Run it in as many processes as you
like: they share the limits through Redis.

Against the repository's fakes (a URL on 127.0.0.1 or localhost gets the fakes' default
key and token, never one from the environment)::

    python -m chatbot.fakes.openai_server --port 8011 &
    python -m chatbot.fakes.zapier_server --port 8766 &
    python examples/agents_sdk.py --openai-url http://127.0.0.1:8011/v1 \\
        --zapier-url http://127.0.0.1:8766/mcp "Send an email to ana@example.com"

Against the real providers, give the keys in the environment (never on the command
line)::

    OPENAI_API_KEY=sk-... ZAPIER_MCP_URL=https://mcp.zapier.com/api/mcp/... \\
    ZAPIER_MCP_TOKEN=... python examples/agents_sdk.py "Email ana@example.com: lunch at 1?"

Environment: ``REDIS_URL`` (default ``redis://127.0.0.1:6379/0``), ``OPENAI_BASE_URL``,
``OPENAI_API_KEY``, ``OPENAI_MODEL``, ``ZAPIER_MCP_URL``, ``ZAPIER_MCP_TOKEN``; the options
win over them. Prints the answer, the tool calls and both APIs' cluster-wide stats.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from urllib.parse import urlsplit

from agents import Agent, OpenAIChatCompletionsModel, Runner, set_tracing_disabled
from agents.items import ToolCallItem
from agents.mcp import MCPServerStreamableHttp

from limiter import APILimits, Limiter, Rate
from limiter.http import mcp_http_client_factory, openai_client

LIMITS = {
    "openai": APILimits(max_concurrent=8, requests_per_minute=500, requests_per_hour=10_000),
    "zapier": APILimits(
        max_concurrent=3, requests_per_minute=60, requests_per_hour=75, rates=[Rate(5, 1.0)]
    ),
}
#: Seconds the slowest Zapier action may run, on top of its wait for a slot.
SLOWEST_ACTION = 60.0
#: What the repository's fakes accept by default (sent only to 127.0.0.1 or localhost).
FAKE_OPENAI_KEY = "sk-fake-openai-key"
FAKE_ZAPIER_TOKEN = "fake-zapier-token"
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


def _key(url: str, env: str, fake: str) -> str:
    """The fake's default key for a local URL, else ``$env``; exit when that is not set."""
    host = urlsplit(url).hostname
    if host in LOCAL_HOSTS:
        return fake
    given = os.environ.get(env)
    if not given:
        raise SystemExit(f"agents_sdk.py: {host} needs a key: set {env}")
    return given


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("message", nargs="?", default="Send an email to ana@example.com saying hi.")
    p.add_argument("--redis-url", default=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"))
    p.add_argument(
        "--openai-url", default=os.environ.get("OPENAI_BASE_URL", "https://api.openai.com/v1")
    )
    p.add_argument("--zapier-url", default=os.environ.get("ZAPIER_MCP_URL"))
    p.add_argument("--model", default=os.environ.get("OPENAI_MODEL", "gpt-4o-mini"))
    return p.parse_args(argv)


async def run(args: argparse.Namespace) -> int:
    if not args.zapier_url:
        raise SystemExit("agents_sdk.py: --zapier-url (or ZAPIER_MCP_URL) is needed")
    openai_key = _key(args.openai_url, "OPENAI_API_KEY", FAKE_OPENAI_KEY)
    token = _key(args.zapier_url, "ZAPIER_MCP_TOKEN", FAKE_ZAPIER_TOKEN)
    set_tracing_disabled(True)  # the SDK would upload traces to OpenAI otherwise
    zapier = LIMITS["zapier"]
    # The SDK's MCP timeout (5 s by default) runs from the moment a tool call is sent, so
    # it also counts the call's wait in the limiter's queue: let it cover the longest wait
    # (the API's acquire_timeout) plus the slowest action.
    wait = zapier.acquire_timeout
    session_timeout = None if wait is None else wait + SLOWEST_ACTION
    async with Limiter.from_url(args.redis_url, LIMITS) as lim:
        client = openai_client(lim, base_url=args.openai_url, api_key=openai_key)
        try:
            async with MCPServerStreamableHttp(
                params={
                    "url": args.zapier_url,
                    "headers": {"Authorization": f"Bearer {token}"},
                    "httpx_client_factory": mcp_http_client_factory(lim, "zapier"),
                },
                name="zapier",
                client_session_timeout_seconds=session_timeout,
            ) as zapier_tools:
                agent = Agent(
                    name="assistant",
                    instructions="Answer briefly. Use a tool when the user asks for an action.",
                    model=OpenAIChatCompletionsModel(model=args.model, openai_client=client),
                    mcp_servers=[zapier_tools],
                )
                result = await Runner.run(agent, args.message)
        finally:
            await client.close()
        print(f"answer: {result.final_output}")
        for item in result.new_items:
            if isinstance(item, ToolCallItem):
                raw = item.raw_item
                print(f"tool call: {getattr(raw, 'name', '?')} {getattr(raw, 'arguments', '')}")
        for api in LIMITS:
            stats = await lim.stats(api)
            print(
                f"{api}: {stats['total_requests']} admitted in the cluster, "
                f"{stats['concurrent_requests']}/{stats['max_concurrent']} in flight, "
                f"windows {stats['windows']}"
            )
    return 0


def main(argv: list[str] | None = None) -> int:
    return asyncio.run(run(_parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
