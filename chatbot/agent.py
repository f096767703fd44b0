"""The agent: OpenAI chat completions with Zapier's MCP tools, both through the limiter.

With ``CACHE_TTL`` set (:attr:`Settings.cache_ttl`), its OpenAI client has a response cache
(``limiter.http.ResponseCache``) and every chat completion is sent with ``temperature=0``:
the cache answers only deterministic requests, since at the provider's default temperature
(1) the same request may get another answer each time, and serving the first one again
would change what users see. At 0, an exact repeat (same system prompt, history, text and
tools: in practice a conversation's first message, such as a common question) is answered
from Redis by whichever replica gets it. An answer that asks for a tool is never cached,
so every Zapier action runs every time. Without ``CACHE_TTL`` nothing is sent differently.

With several OpenAI keys (``OPENAI_API_KEYS``: the limiter's deployments of ``openai``),
each request goes out with the key of the deployment its slot was admitted to
(``openai_client(deployments=...)``); a 429 or "0 remaining" on one key pauses that key
only. A message containing ``OPENAI_LARGE_MODEL_KEYWORD`` is answered with
``OPENAI_LARGE_MODEL``, the others with ``OPENAI_MODEL`` (:meth:`Settings.model_for`); the
limiter reads the model from each request, for its per-model limits.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import hashlib
import json
import logging
from typing import Any

import httpx2
from mcp import ClientSession

from limiter import Limiter, scope
from limiter.http import ResponseCache, openai_client, zapier_mcp

from .settings import Settings

__all__ = ["Agent", "AgentReply", "tenant_for"]

log = logging.getLogger("chatbot.agent")

SYSTEM = (
    "You are Livia, a helpful assistant on a messaging app. Answer briefly. "
    "Use a tool when the user asks for an action (email, spreadsheet, calendar)."
)


#: The limiter's longest tenant name, in UTF-8 bytes (a user id may be longer).
_MAX_TENANT_BYTES = 256


def tenant_for(user_id: str) -> str:
    """The fair queue's tenant of a user: the user id itself, or, when it is longer than a
    tenant name may be (256 bytes of UTF-8), a digest of it."""
    if len(user_id.encode()) <= _MAX_TENANT_BYTES:
        return user_id
    return "user-sha256:" + hashlib.sha256(user_id.encode()).hexdigest()


class AgentReply:
    __slots__ = ("text", "tool_calls")

    def __init__(self, text: str, tool_calls: list[dict[str, Any]]) -> None:
        self.text = text
        self.tool_calls = tool_calls


class ToolsUnavailable(RuntimeError):
    """The Zapier MCP session could not be opened (Zapier down or unreachable)."""


class _ZapierSession:
    """The MCP session, owned by one background task (anyio scopes must exit where entered)."""

    def __init__(self, lim: Limiter, settings: Settings) -> None:
        self._lim = lim
        self._settings = settings
        self._ready = asyncio.Event()
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.session: ClientSession | None = None
        self.tools: list[dict[str, Any]] = []
        self.error: BaseException | None = None

    async def get(self) -> tuple[ClientSession, list[dict[str, Any]]]:
        if self._task is None or self._task.done():
            self._ready.clear()
            self.error = None
            # A fresh context: the session outlives the message that opened it, so it must
            # not inherit that message's limiter.scope (its tenant and priority).
            self._task = asyncio.create_task(
                self._run(), name="zapier-mcp-session", context=contextvars.Context()
            )
        await self._ready.wait()
        if self.session is None:
            # The type only: a message could carry the server's URL (Zapier's holds a secret).
            raise ToolsUnavailable(f"Zapier MCP unavailable ({type(self.error).__name__})")
        return self.session, self.tools

    async def _run(self) -> None:
        settings = self._settings
        try:
            async with zapier_mcp(self._lim, settings.zapier_mcp_url, settings.zapier_token) as s:
                listed = await s.list_tools()
                self.tools = [
                    {
                        "type": "function",
                        "function": {
                            "name": tool.name,
                            "description": tool.description or tool.name,
                            "parameters": tool.input_schema,
                        },
                    }
                    for tool in listed.tools
                ]
                self.session = s
                self._ready.set()
                await self._stop.wait()
        except Exception as exc:
            self.error = exc
            log.warning("Zapier MCP session ended: %r", exc)
        finally:
            self.session = None
            self._ready.set()

    async def aclose(self) -> None:
        self._stop.set()
        if self._task is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._task, 5)


class Agent:
    """One per replica: an OpenAI client and a Zapier MCP session, opened lazily."""

    def __init__(self, lim: Limiter, settings: Settings) -> None:
        self.settings = settings
        self.limiter = lim
        cache = None if settings.cache_ttl is None else ResponseCache(ttl=settings.cache_ttl)
        deployments = {name: {"api_key": key} for name, key in settings.openai_api_keys.items()}
        self.openai = openai_client(
            lim,
            base_url=settings.openai_base_url,
            api_key=settings.openai_api_key,
            cache=cache,
            deployments=deployments or None,
        )
        #: What every chat completion adds: with a cache, ``temperature=0``, which makes it
        #: deterministic and so cacheable (see the module's docstring); else nothing.
        self.sampling: dict[str, Any] = {} if cache is None else {"temperature": 0}
        self._zapier = _ZapierSession(lim, settings)

    async def reply(
        self,
        history: list[dict[str, Any]],
        text: str,
        images: list[str],
        *,
        tenant: str | None = None,
        priority: int | None = None,
    ) -> AgentReply:
        """Answer ``text`` given ``history``; runs tools through Zapier when asked.

        Every OpenAI request and Zapier tool call it makes waits in the limiter's fair
        queue as ``tenant`` with ``priority`` (``limiter.scope``). The tool calls reach the
        limiter in the MCP session's own tasks, started long before: the mcp client (2.x)
        runs each request it sends in a copy of the sender's context, so the scope set
        here is the one their ``acquire`` sees (tests/test_chatbot_app.py checks it).
        """
        with scope(tenant=tenant, priority=priority):
            return await self._reply(history, text, images)

    async def _reply(
        self, history: list[dict[str, Any]], text: str, images: list[str]
    ) -> AgentReply:
        session, tools = await self._zapier.get()
        content: Any = text
        if images:
            content = [{"type": "text", "text": text}] + [
                {"type": "image_url", "image_url": {"url": url}} for url in images
            ]
        messages: list[Any] = [{"role": "system", "content": SYSTEM}, *history]
        messages.append({"role": "user", "content": content})
        model = self.settings.model_for(text)
        first = await self.openai.chat.completions.create(
            model=model,
            messages=messages,
            tools=tools,
            max_tokens=300,
            **self.sampling,
        )
        choice = first.choices[0].message
        calls: list[dict[str, Any]] = []
        if not choice.tool_calls:
            return AgentReply(choice.content or "", calls)
        messages.append(choice.model_dump(exclude_none=True))
        for call in choice.tool_calls:
            if call.type != "function":
                continue
            try:
                args = json.loads(call.function.arguments or "{}")
            except ValueError:
                args = {}
            result = await session.call_tool(call.function.name, args)
            output = " ".join(
                getattr(part, "text", "") for part in result.content if hasattr(part, "text")
            ) or json.dumps(result.structured_content or {})
            calls.append({"tool": call.function.name, "arguments": args, "ok": not result.is_error})
            messages.append({"role": "tool", "tool_call_id": call.id, "content": output})
        second = await self.openai.chat.completions.create(
            model=model, messages=messages, max_tokens=300, **self.sampling
        )
        return AgentReply(second.choices[0].message.content or "", calls)

    async def check(self) -> dict[str, str]:
        """Reachability of both providers, for /health (outside the limiter: no slot used).
        With several OpenAI keys, each is tried; the first that fails is named by its
        deployment (never by the key)."""
        out: dict[str, str] = {"openai": "ok"}
        keys = dict(self.settings.openai_api_keys) or {"": self.settings.openai_api_key}
        async with httpx2.AsyncClient(timeout=2.0) as client:
            for name, key in keys.items():
                headers = {"Authorization": f"Bearer {key}"}
                try:
                    r = await client.get(f"{self.settings.openai_base_url}/models", headers=headers)
                    status = "ok" if r.status_code == 200 else f"HTTP {r.status_code}"
                except httpx2.HTTPError as exc:
                    status = f"unreachable ({type(exc).__name__})"
                if status != "ok":
                    out["openai"] = f"{status} (deployment {name!r})" if name else status
                    break
        try:
            await asyncio.wait_for(self._zapier.get(), 5)
            out["zapier"] = "ok"
        except Exception as exc:
            out["zapier"] = f"unreachable ({type(exc).__name__})"
        return out

    async def aclose(self) -> None:
        await self._zapier.aclose()
        await self.openai.close()
