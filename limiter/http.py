"""The providers' SDKs, limited at the HTTP layer.

:class:`LimitedTransport` is an async transport for ``httpx2`` (what ``openai`` 3.x and
``mcp`` 2.x speak through) and for plain ``httpx``. Every request it limits holds one slot
from before it is sent until its response body is closed (streaming included), is retried
with the policy of :mod:`limiter._retry` (a 429 pauses the API for every replica), and the
provider's ``x-ratelimit-remaining-*`` headers pause the API until the reset when they say
no room is left.

:func:`openai_client` and :func:`zapier_mcp` build the SDK clients on it. Needs the extras
``fleetlimit[openai]`` / ``fleetlimit[mcp]``.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from types import ModuleType, TracebackType
from typing import TYPE_CHECKING, Any

import httpx2

from ._call import Budget, display_name, pause_if_asked, retrying
from ._errors import LimiterError
from ._limiter import Limiter, Slot
from ._retry import Verdict, classify_exception, classify_response, parse_duration

if TYPE_CHECKING:  # pragma: no cover
    import openai
    from mcp import ClientSession

__all__ = [
    "LimitedTransport",
    "ProviderAuthError",
    "mcp_tools_call_only",
    "openai_client",
    "openai_token_estimate",
    "zapier_mcp",
]

log = logging.getLogger("limiter")

#: Largest response body kept in memory to read ``usage`` from (bytes).
_USAGE_BUFFER = 1 << 20

RequestPredicate = Callable[[Any], bool]
TokenEstimator = Callable[[Any], int]


class ProviderAuthError(LimiterError):
    """The provider refused our credentials (HTTP 401/403); retrying cannot help.

    The message names the API and the status, never the credentials.
    """

    def __init__(self, api: str, status: int) -> None:
        super().__init__(
            f"{display_name(api)} answered HTTP {status}: the API key or token was refused"
        )
        #: The API concerned.
        self.api = api
        #: The HTTP status.
        self.status = status


def _json_body(request: Any) -> Any:
    try:
        return json.loads(request.content or b"null")
    except (ValueError, RecursionError):  # not JSON (UnicodeDecodeError too), or too deep
        return None


def mcp_tools_call_only(request: Any) -> bool:
    """Only a JSON-RPC ``tools/call`` costs a Zapier task; everything else passes unlimited.

    ``initialize`` carries no method header, so the body is read. The long-lived GET
    stream, the closing DELETE and notification POSTs are not limited.
    """
    if request.method != "POST":
        return False
    body = _json_body(request)
    messages = body if isinstance(body, list) else [body]
    return any(isinstance(m, dict) and m.get("method") == "tools/call" for m in messages)


def openai_token_estimate(request: Any) -> int:
    """Tokens to reserve for an OpenAI request, as OpenAI itself charges at arrival.

    The larger of the output cap (``max_tokens`` / ``max_completion_tokens`` /
    ``max_output_tokens``) and an estimate of the input (a token per 4 bytes of the
    messages, input or prompt). Requests without a JSON body reserve nothing.
    """
    body = _json_body(request)
    if not isinstance(body, dict):
        return 0
    cap = 0
    for field in ("max_completion_tokens", "max_tokens", "max_output_tokens"):
        value = body.get(field)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            cap = max(cap, value)
    parts = [body.get(k) for k in ("messages", "input", "prompt", "instructions")]
    text = json.dumps([p for p in parts if p is not None], separators=(",", ":"))
    estimate = len(text.encode()) // 4 + 1 if text != "[]" else 0
    return max(cap, estimate)


def _usage_tokens(payload: Any) -> int | None:
    """``usage.total_tokens`` from a chat/responses/embeddings body or stream event."""
    if not isinstance(payload, dict):
        return None
    for holder in (payload, payload.get("response")):
        if isinstance(holder, dict) and isinstance(holder.get("usage"), dict):
            total = holder["usage"].get("total_tokens")
            if isinstance(total, int) and not isinstance(total, bool) and total >= 0:
                return total
    return None


class _UsageReader:
    """Reads ``usage.total_tokens`` out of a JSON body or an SSE stream as it passes."""

    __slots__ = ("_buffer", "_sse", "tokens")

    def __init__(self, content_type: str) -> None:
        self._sse = "text/event-stream" in content_type
        self._buffer = bytearray()
        self.tokens: int | None = None

    def feed(self, chunk: bytes) -> None:
        if len(self._buffer) + len(chunk) > _USAGE_BUFFER:
            self._buffer.clear()
            return
        self._buffer += chunk
        if not self._sse:
            return
        while b"\n" in self._buffer:
            line, _, rest = bytes(self._buffer).partition(b"\n")
            self._buffer = bytearray(rest)
            if line.startswith(b"data:") and b'"usage"' in line:
                self._read(line[5:])

    def finish(self) -> int | None:
        if self._buffer:
            self._read(bytes(self._buffer[5:] if self._sse else self._buffer))
        return self.tokens

    def _read(self, data: bytes) -> None:
        try:
            found = _usage_tokens(json.loads(data))
        except (ValueError, RecursionError):  # not JSON (UnicodeDecodeError too), or too deep
            return
        if found is not None:
            self.tokens = found


class _SlotStream(httpx2.AsyncByteStream):
    """A response body that releases its slot when it is closed (idempotent, shielded)."""

    def __init__(
        self,
        transport: LimitedTransport,
        inner: Any,
        slot: Slot,
        usage: _UsageReader | None,
    ) -> None:
        self._transport = transport
        self._inner = inner
        self._slot = slot
        self._usage = usage
        self._failed = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._inner:
                if self._usage is not None:
                    self._usage.feed(chunk)
                yield chunk
        except BaseException:
            self._failed = True
            raise

    async def aclose(self) -> None:
        try:
            await self._inner.aclose()
        finally:
            try:
                if self._usage is not None and not self._slot.released:
                    tokens = self._usage.finish()
                    if tokens is not None:
                        self._slot.report_tokens(tokens)
            finally:  # whatever the body held, the slot goes back
                await self._transport._release(self._slot, success=not self._failed)


_STREAM_CLASSES: dict[str, type[_SlotStream]] = {"httpx2": _SlotStream}


def _stream_class(mod: ModuleType) -> type[_SlotStream]:
    """_SlotStream, also an instance of the client library's own AsyncByteStream."""
    cls = _STREAM_CLASSES.get(mod.__name__)
    if cls is None:
        cls = type(f"_SlotStream_{mod.__name__}", (_SlotStream, mod.AsyncByteStream), {})
        _STREAM_CLASSES[mod.__name__] = cls
    return cls


class _RetryableResponse(Exception):
    """A provider answer worth retrying, carried through tenacity as an exception."""

    def __init__(self, response: Any, body: bytes, verdict: Verdict) -> None:
        super().__init__(f"HTTP {response.status_code}")
        #: The response to give the client if no attempt is left (body kept, not sent yet).
        self.response = response
        #: Decoded body, for the retry policy.
        self.body = body
        self.verdict = verdict


class LimitedTransport(httpx2.AsyncBaseTransport):
    """An async HTTP transport whose limited requests each hold a slot of ``api``.

    ``inner`` is the transport that really sends (default: ``httpx2.AsyncHTTPTransport()``,
    or ``httpx``'s when the client is an ``httpx`` one). ``limit`` decides which requests
    count (default: all); ``tokens`` estimates the tokens a request reserves (default: none);
    ``idempotent`` says whether a request may be retried after it may have run (default:
    yes; Zapier actions: no, retried only on a 429 or a connection never made).
    ``timeout`` bounds each request's waits and backoff (default: the API's
    ``acquire_timeout``).
    """

    def __init__(
        self,
        lim: Limiter,
        api: str,
        inner: Any = None,
        *,
        limit: RequestPredicate | None = None,
        tokens: TokenEstimator | None = None,
        idempotent: bool | RequestPredicate = True,
        timeout: float | None = None,
        learn_from_headers: bool = True,
    ) -> None:
        lim.api_limits(api)  # unknown API: ConfigError now, not at the first request
        self.limiter = lim
        self.api = api
        self._inner = inner
        self._inners: dict[str, Any] = {}
        self._limit = limit
        self._tokens = tokens
        self._idempotent = idempotent
        self._timeout = timeout
        self._learn = learn_from_headers
        #: The last authentication failure seen (status), for clients that lose it.
        self.last_auth_failure: int | None = None

    def __repr__(self) -> str:
        return f"<LimitedTransport api={self.api!r}>"

    def _inner_for(self, request: Any) -> Any:
        if self._inner is not None:
            return self._inner
        name = type(request).__module__.split(".")[0]
        inner = self._inners.get(name)
        if inner is None:
            inner = self._inners[name] = self._module(request).AsyncHTTPTransport()
        return inner

    @staticmethod
    def _module(request: Any) -> ModuleType:
        return sys.modules[type(request).__module__.split(".")[0]]

    def _auth_refused(self, status: int) -> None:
        self.last_auth_failure = status
        log.error("%s refused the credentials (HTTP %d)", display_name(self.api), status)

    async def handle_async_request(self, request: Any) -> Any:
        inner = self._inner_for(request)
        await request.aread()  # replayable for retries, and readable by the predicates
        if self._limit is not None and not self._limit(request):
            # Not limited (MCP's initialize, listing tools), but a refused credential
            # here is the same news: remember it, so the caller gets ProviderAuthError.
            response = await inner.handle_async_request(request)
            if response.status_code in (401, 403):
                self._auth_refused(response.status_code)
            return response
        limits = self.limiter.limits[self.api]
        idempotent = self._idempotent(request) if callable(self._idempotent) else self._idempotent
        tokens = self._tokens(request) if self._tokens is not None else 0
        if limits.tokens_per_minute is None:
            tokens = 0
        budget = Budget(limits.acquire_timeout if self._timeout is None else self._timeout)
        label = f"{display_name(self.api)} {request.method} {request.url.path}"
        try:
            retry = retrying(self.limiter, self.api, budget, idempotent=idempotent, label=label)
            async for attempt in retry:
                with attempt:
                    return await self._attempt(inner, request, budget, tokens, idempotent)
        except _RetryableResponse as last:
            return last.response  # no attempt left: the client sees the provider's answer
        raise AssertionError("unreachable: tenacity returns or re-raises")  # pragma: no cover

    async def _attempt(
        self, inner: Any, request: Any, budget: Budget, tokens: int, idempotent: bool
    ) -> Any:
        slot = await self.limiter.acquire(self.api, timeout=budget.remaining(), tokens=tokens)
        try:
            response = await inner.handle_async_request(request)
        except BaseException as exc:
            await self._release(slot, success=False)
            if isinstance(exc, Exception):
                await pause_if_asked(
                    self.limiter, self.api, classify_exception(exc, idempotent=idempotent)
                )
            raise
        status = response.status_code
        if status < 400:
            await self._learn_headers(response.headers)
            usage = None
            if tokens or self.limiter.limits[self.api].tokens_per_minute is not None:
                usage = _UsageReader(response.headers.get("content-type", ""))
            if hasattr(response, "_content"):
                # Already read by the inner transport (a mock, a cache): nothing streams,
                # nothing would close it, so the call is over now.
                if usage is not None:
                    usage.feed(response.content)
                    found = usage.finish()
                    if found is not None:
                        slot.report_tokens(found)
                await self._release(slot, success=True)
                return response
            stream_class = _stream_class(self._module(request))
            response.stream = stream_class(self, response.stream, slot, usage)
            return response
        # An error: read it whole (it is small), free the slot, then decide. The provider
        # processed nothing, so the reserved tokens come back.
        if tokens:
            slot.report_tokens(0)
        try:
            raw = b"".join([chunk async for chunk in response.stream])
        finally:
            await response.aclose()
            await self._release(slot, success=False)
        mod = self._module(request)
        try:
            decoded = mod.Response(status, headers=response.headers, content=raw).content
        except mod.DecodingError:  # a content-encoding that lies: classify the raw bytes
            decoded = raw
        verdict = classify_response(status, response.headers, decoded, idempotent=idempotent)
        if status in (401, 403):
            self._auth_refused(status)
        await pause_if_asked(self.limiter, self.api, verdict)
        fresh = mod.Response(
            status,
            headers=response.headers,
            stream=mod.ByteStream(raw),
            extensions=response.extensions,
        )
        if verdict.retry:
            raise _RetryableResponse(fresh, decoded, verdict)
        return fresh

    async def _release(self, slot: Slot, *, success: bool) -> None:
        # The SDK cancels a request by cancelling its scope: Limiter.release finishes anyway.
        await self.limiter.release(slot, success=success)

    async def _learn_headers(self, headers: Any) -> None:
        """The provider has less room than we think: pause every replica until its reset.

        ``x-ratelimit-remaining-*: 0`` while our own windows of that kind still have room
        means the provider counts more than we do (another client on the same key, a
        smaller limit): the API is paused for every replica until about one request's
        room is back (``reset / limit``). When our windows are full too, both agree and
        our own windows already know when room comes back.
        """
        if not self._learn:
            return
        for kind in ("requests", "tokens"):
            remaining = headers.get(f"x-ratelimit-remaining-{kind}")
            if remaining is None or remaining.strip() != "0":
                continue
            reset = parse_duration(headers.get(f"x-ratelimit-reset-{kind}"))
            if not reset:
                continue
            windows = (await self.limiter.stats(self.api))["windows"]
            ours = [
                use for name, use in windows.items() if (name == "tokens") == (kind == "tokens")
            ]
            if any(use["used"] >= use["limit"] for use in ours):
                continue
            # ``reset`` is the time until the provider's budget is whole again; one
            # request's room comes back after about reset / limit (a bucket refilling
            # evenly, or a sliding window's oldest entry leaving), so pause that long.
            try:
                limit = int(headers.get(f"x-ratelimit-limit-{kind}") or "1")
            except ValueError:
                limit = 1
            reset = reset / max(1, limit)
            if reset > 0:
                log.warning(
                    "%s says no %s are left: pausing it for every replica for %.2fs",
                    display_name(self.api),
                    kind,
                    reset,
                )
                await self.limiter.cooldown(self.api, reset)

    async def aclose(self) -> None:
        inners = [self._inner] if self._inner is not None else list(self._inners.values())
        for inner in inners:
            await inner.aclose()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None = None,
        exc_value: BaseException | None = None,
        traceback: TracebackType | None = None,
    ) -> None:
        await self.aclose()


def openai_client(
    lim: Limiter, api: str = "openai", *, inner: Any = None, **kwargs: Any
) -> openai.AsyncOpenAI:
    """An ``openai.AsyncOpenAI`` whose every request passes the limiter.

    The SDK's own retries are off (``max_retries=0``): the transport retries, so every
    attempt is admitted. Tokens are reserved from the request (output cap or input
    estimate) and corrected from the response's ``usage``. ``inner`` is the transport
    that really sends (default: httpx2's). Other keywords go to ``AsyncOpenAI``
    (``base_url``, ``api_key``, ``timeout``, ...).
    """
    import openai

    transport = LimitedTransport(lim, api, inner, tokens=openai_token_estimate)
    kwargs.setdefault("max_retries", 0)
    if kwargs["max_retries"] != 0:
        raise LimiterError("openai_client: max_retries must stay 0 (the limiter retries)")
    client = httpx2.AsyncClient(transport=transport, timeout=kwargs.get("timeout", 600.0))
    return openai.AsyncOpenAI(http_client=client, **kwargs)


@asynccontextmanager
async def zapier_mcp(
    lim: Limiter,
    url: str,
    token: str,
    api: str = "zapier",
    *,
    timeout: float = 30.0,
    read_timeout: float = 300.0,
) -> AsyncIterator[ClientSession]:
    """An initialized ``mcp.ClientSession`` over streamable HTTP, limited per tool call.

    Only ``tools/call`` takes a slot (a Zapier task); tool calls are not retried after
    they may have run (a read timeout), only on a 429 or a connection never made.
    A refused token raises :class:`ProviderAuthError` instead of the SDK's bare error.
    """
    from mcp import ClientSession
    from mcp.client.streamable_http import streamable_http_client

    transport = LimitedTransport(lim, api, limit=mcp_tools_call_only, idempotent=False)
    headers = {"Authorization": f"Bearer {token}"}
    client = httpx2.AsyncClient(
        transport=transport,
        headers=headers,
        timeout=httpx2.Timeout(timeout, read=read_timeout),
    )
    ready = False
    try:
        async with (
            client,
            streamable_http_client(url, http_client=client) as streams,
            ClientSession(streams[0], streams[1]) as session,
        ):
            await session.initialize()
            ready = True
            yield session
    except Exception:
        # The SDK reports a refused token as a bare error (or an ExceptionGroup) without
        # the status: say what happened instead.
        if not ready and transport.last_auth_failure is not None:
            raise ProviderAuthError(api, transport.last_auth_failure) from None
        raise
