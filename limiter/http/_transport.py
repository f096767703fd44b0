"""The limited HTTP transport: one slot per limited request, held until its body closes.

Owns :class:`LimitedTransport` and what only it uses: the slot-holding response stream,
the retryable-response signal carried through tenacity, and learning from the provider's
``x-ratelimit-*`` / ``anthropic-ratelimit-*`` headers (parsed by :mod:`._headers`). Each
transport owns the inner transports it creates (closed by its ``aclose``); the slots belong
to the :class:`~limiter.Limiter` it is handed.

Called by :mod:`limiter.http._providers` and :mod:`limiter.http._anthropic` (the SDK
factories) and by users through :mod:`limiter.http`. Works with ``httpx2`` (what ``openai``
3.x, ``anthropic`` 2.x and ``mcp`` 2.x speak through) and plain ``httpx``; imports none of
the SDKs.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from collections.abc import AsyncIterator, Callable, Mapping
from types import ModuleType, TracebackType
from typing import TYPE_CHECKING, Any

import httpx2

from .._call import Budget, display_name, pause_if_asked, retrying
from .._config import check_model, show, uses_tokens
from .._errors import AcquireTimeout, ConfigError, LimiterError, LimiterUnavailable
from .._retry import Verdict, classify_exception, classify_response
from ._headers import RateLimitHeaders, parse_rate_limit_headers
from ._usage import UsageReader, json_body

if TYPE_CHECKING:  # pragma: no cover
    from .._limiter import Limiter, Slot
    from ._cache import ResponseCache

__all__ = ["LimitedTransport", "RequestPredicate", "TokenEstimator"]

log = logging.getLogger("limiter")

#: Seconds a limit learned from the provider's headers stands unless reported again
#: (``APILimits(learn_from_headers=True)``); each transport reports at most every half.
LEARN_TTL = 600.0

#: Decides whether a request counts (``limit=``) or may be retried (``idempotent=``).
RequestPredicate = Callable[[Any], bool]
#: The tokens a request reserves (``tokens=``): a number, or ``(input, output)``.
TokenEstimator = Callable[[Any], "int | tuple[int, int]"]
#: The model a request names (``model=``), or None.
ModelReader = Callable[[Any], "str | None"]

_DEPLOYMENT_FIELDS = ("api_key", "base_url")


def check_deployments(lim: Limiter, api: str, deployments: object) -> dict[str, dict[str, str]]:
    """``deployments={name: {"api_key": ..., "base_url": ...}}`` checked against the API's
    configured deployments: the same names, only those two fields, strings. Errors name
    the field, never a key's value."""
    configured = tuple(lim.api_limits(api).deployments)
    if not isinstance(deployments, Mapping):
        raise ConfigError(
            f"deployments: must be a mapping of deployment name to "
            f'{{"api_key": ..., "base_url": ...}}, not {type(deployments).__name__}',
            field="deployments",
            value=type(deployments).__name__,
        )
    if set(deployments) != set(configured):
        raise ConfigError(
            f"deployments={sorted(map(str, deployments))}: API {api!r} is configured with "
            f"deployments {sorted(configured)}; give each its api_key and/or base_url",
            field="deployments",
            value=sorted(map(str, deployments)),
        )
    out: dict[str, dict[str, str]] = {}
    for name, target in deployments.items():
        where = f"deployments[{name!r}]"
        if not isinstance(target, Mapping) or not set(target) <= set(_DEPLOYMENT_FIELDS):
            fields = sorted(map(str, target)) if isinstance(target, Mapping) else None
            raise ConfigError(
                f"{where}: must be a mapping with 'api_key' and/or 'base_url' (got "
                f"{show(fields) if fields is not None else type(target).__name__})",
                field=where,
                value=fields,
            )
        for field in _DEPLOYMENT_FIELDS:
            if field in target and (not isinstance(target[field], str) or not target[field]):
                raise ConfigError(
                    f"{where}[{field!r}]: must be a non-empty string",
                    field=f"{where}[{field!r}]",
                    value=type(target[field]).__name__,
                )
        out[name] = dict(target)
    return out


def request_model(request: Any) -> str | None:
    """The ``model`` of a JSON request body (OpenAI, Anthropic), if it is a valid name."""
    body = json_body(request)
    model = body.get("model") if isinstance(body, dict) else None
    try:
        return check_model(model) if model is not None else None
    except ConfigError:
        return None


class _SlotStream(httpx2.AsyncByteStream):
    """A response body that releases its slot when it is closed (idempotent, shielded)."""

    def __init__(
        self,
        lim: Limiter,
        inner: Any,
        slot: Slot,
        usage: UsageReader | None,
    ) -> None:
        self._limiter = lim
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
                    self._usage.finish()
                    used = self._usage.used()
                    if used is not None:
                        self._slot.report_tokens(used)
            finally:  # whatever the body held, the slot goes back
                # Limiter.release finishes even when the SDK cancels the request's scope.
                await self._limiter.release(self._slot, success=not self._failed)


_STREAM_CLASSES: dict[str, type[_SlotStream]] = {"httpx2": _SlotStream}


def _stream_class(mod: ModuleType) -> type[_SlotStream]:
    """_SlotStream, also an instance of the client library's own AsyncByteStream."""
    cls = _STREAM_CLASSES.get(mod.__name__)
    if cls is None:
        cls = type(f"_SlotStream_{mod.__name__}", (_SlotStream, mod.AsyncByteStream), {})
        _STREAM_CLASSES[mod.__name__] = cls
    return cls


#: The JSON-RPC error code of a request the limiter refused (the range -32000 to -32099 is
#: the implementation's own); ``data.limiter_error`` names the exception.
JSONRPC_REFUSED = -32000


def _jsonrpc_refusal(mod: ModuleType, request: Any, exc: LimiterError) -> Any:
    """An HTTP answer carrying a JSON-RPC error for the refused ``request`` (429 when the
    wait ran out, 503 when Redis failed), or ``None`` when it is no JSON-RPC request."""
    body = json_body(request)
    if not isinstance(body, dict) or "id" not in body or "method" not in body:
        return None
    data: dict[str, Any] = {"limiter_error": type(exc).__name__, "api": getattr(exc, "api", None)}
    if isinstance(exc, AcquireTimeout):
        data.update(reason=exc.reason, waited=round(exc.waited, 3))
    error = {"code": JSONRPC_REFUSED, "message": f"limiter: {exc}", "data": data}
    payload = {"jsonrpc": "2.0", "id": body["id"], "error": error}
    status = 429 if isinstance(exc, AcquireTimeout) else 503
    headers = {"content-type": "application/json"}
    return mod.Response(status, headers=headers, content=json.dumps(payload).encode())


def _paused(
    where: tuple[str | None, str | None], parsed: RateLimitHeaders | None
) -> tuple[str | None, str | None]:
    """Where a provider's refusal through ``where`` (deployment, model) pauses: there, but
    a 429 (``parsed``: its headers) that says the model's own budget still has room (every
    ``remaining`` it reports above 0) hit a limit of the key as a whole: the whole
    deployment pauses."""
    deployment, model = where
    if parsed is None or deployment is None or model is None:
        return where
    left = [k.remaining for _, k in parsed.kinds()]
    known = [n for n in left if n is not None]
    if known and all(n > 0 for n in known):
        return deployment, None
    return where


def _windows_of(stats: dict[str, Any], deployment: str | None, model: str | None) -> Any:
    """The windows an answer through ``deployment`` for ``model`` was admitted by: the
    API's, its model's and its deployment's (with that deployment's model's), by name;
    where two have one name, the fuller counts."""
    views = [stats, stats.get("models", {}).get(model or "", {})]
    dep = stats.get("deployments", {}).get(deployment or "", {})
    views += [dep, dep.get("models", {}).get(model or "", {})]
    out: dict[str, Any] = {}
    for view in views:
        for name, use in view.get("windows", {}).items():
            known = out.get(name)
            if known is None or use["used"] / use["limit"] > known["used"] / known["limit"]:
                out[name] = use
    return out


class _RetryableResponse(Exception):
    """A provider answer worth retrying, carried through tenacity as an exception."""

    def __init__(self, response: Any, body: bytes, verdict: Verdict) -> None:
        super().__init__(f"HTTP {response.status_code}")
        #: The response to give the client if no attempt is left (body kept, not sent yet).
        self.response = response
        #: Decoded body, for the retry policy.
        self.body = body
        #: What the retry policy made of it.
        self.verdict = verdict


class LimitedTransport(httpx2.AsyncBaseTransport):
    """An async HTTP transport whose limited requests each hold a slot of ``api``.

    ``inner`` is the transport that really sends (default: ``httpx2.AsyncHTTPTransport()``,
    or ``httpx``'s when the client is an ``httpx`` one). ``limit`` decides which requests
    count (default: all); ``tokens`` estimates the tokens a request reserves (default: none);
    ``idempotent`` says whether a request may be retried after it may have run (default:
    yes; Zapier actions: no, retried only on a 429 or a connection never made).
    ``timeout`` bounds each request's waits and backoff (default: the API's
    ``acquire_timeout``). ``cache`` answers repeated deterministic OpenAI requests
    without a slot (:class:`~limiter.http.ResponseCache`; what ``openai_client(cache=)``
    passes). ``refusals_as_jsonrpc`` (the MCP factories set it) answers a JSON-RPC request
    the limiter refused (:class:`AcquireTimeout`, :class:`LimiterUnavailable`) with an HTTP
    error carrying a JSON-RPC error for its id instead of raising: ``mcp`` fails that one
    call with the limiter's words and keeps the session, where an exception from the
    transport would close it. ``deployments`` (``{name: {"api_key", "base_url"}}``, the
    API's configured deployments) sends each attempt with the key and base URL of the
    deployment its slot was admitted to (``slot.deployment``), in place of the client's;
    ``model`` reads the model a request names, for the API's per-model limits.
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
        cache: ResponseCache | None = None,
        refusals_as_jsonrpc: bool = False,
        deployments: Mapping[str, Mapping[str, str]] | None = None,
        model: ModelReader | None = None,
    ) -> None:
        lim.api_limits(api)  # unknown API: ConfigError now, not at the first request
        self._deployments = (
            None if deployments is None else check_deployments(lim, api, deployments)
        )
        self._model = model
        #: The client's base URL (the SDK factories set it): a request under it is sent
        #: under its deployment's ``base_url`` instead.
        self.base_url: str | None = None
        self.limiter = lim
        self.api = api
        self._inner = inner
        self._inners: dict[str, Any] = {}
        self._limit = limit
        self._tokens = tokens
        self._idempotent = idempotent
        self._timeout = timeout
        self._learn = learn_from_headers
        #: The limits this transport last reported to learn_limits (requests, tokens per
        #: minute) and when (monotonic seconds), per deployment and model: sent again only
        #: when they change or half of LEARN_TTL has passed, not at every response.
        self._reported: dict[tuple[str | None, str | None], Any] = {}
        self._cache = cache
        self._jsonrpc = refusals_as_jsonrpc
        #: The last authentication failure seen (status), for clients that lose it.
        self.last_auth_failure: int | None = None

    def __repr__(self) -> str:
        return f"<LimitedTransport api={self.api!r}>"  # never a deployment's key

    def _route(self, request: Any, deployment: str | None) -> Any:
        """``request`` as sent through ``deployment``: its key in place of the client's
        (``Authorization: Bearer`` or ``x-api-key``, whichever the SDK sent), under its
        base URL. Unchanged without deployments or for a slot of none (fail_open's local
        admissions: the client's own key and URL)."""
        if self._deployments is None or deployment is None:
            return request
        target = self._deployments[deployment]
        url = str(request.url)
        base = target.get("base_url")
        if base is not None and self.base_url is not None and url.startswith(self.base_url):
            url = base.rstrip("/") + "/" + url[len(self.base_url) :].lstrip("/")
        headers = request.headers.copy()
        del headers["host"]  # set again from the URL
        key = target.get("api_key")
        if key is not None:
            if "x-api-key" in headers:
                headers["x-api-key"] = key
            else:
                headers["authorization"] = f"Bearer {key}"
        return self._module(request).Request(
            request.method, url, headers=headers, content=request.content,
            extensions=request.extensions,
        )  # fmt: skip

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
        lookup = None
        if self._cache is not None:
            module = self._module(request)
            lookup = await self._cache.lookup(self.limiter, self.api, request, module)
            if lookup is not None and lookup.response is not None:
                return lookup.response  # a hit: no slot, no provider call
        limits = self.limiter.limits[self.api]
        idempotent = self._idempotent(request) if callable(self._idempotent) else self._idempotent
        tokens = self._tokens(request) if self._tokens is not None else 0
        if not uses_tokens(limits):
            tokens = 0
        budget = Budget(limits.acquire_timeout if self._timeout is None else self._timeout)
        label = f"{display_name(self.api)} {request.method} {request.url.path}"
        try:
            retry = retrying(self.limiter, self.api, budget, idempotent=idempotent, label=label)
            async for attempt in retry:
                with attempt:
                    response = await self._attempt(inner, request, budget, tokens, idempotent)
        except _RetryableResponse as last:
            return last.response  # no attempt left: the client sees the provider's answer
        except (AcquireTimeout, LimiterUnavailable) as exc:
            refusal = (
                _jsonrpc_refusal(self._module(request), request, exc) if self._jsonrpc else None
            )
            if refusal is None:
                raise
            return refusal
        # tenacity ended the loop after the attempt that answered (or re-raised).
        return response if lookup is None else await lookup.keep(response)

    async def _attempt(
        self,
        inner: Any,
        request: Any,
        budget: Budget,
        tokens: int | tuple[int, int],
        idempotent: bool,
    ) -> Any:
        model = self._model(request) if self._model is not None else None
        slot = await self.limiter.acquire(
            self.api, timeout=budget.remaining(), tokens=tokens, model=model
        )
        where = (slot.deployment, model)
        try:
            response = await inner.handle_async_request(self._route(request, slot.deployment))
        except BaseException as exc:
            # Pause first (when asked), then free the slot: a slot freed first may be handed
            # to a waiter at once, which would be sent where the pause was meant to stop it.
            try:
                if isinstance(exc, Exception):
                    verdict = classify_exception(exc, idempotent=idempotent)
                    await pause_if_asked(self.limiter, self.api, verdict, *where)
            finally:
                await self._release(slot, success=False)
            raise
        status = response.status_code
        if status < 400:
            await self._learn_headers(response.headers, where)
            usage = None
            if tokens or uses_tokens(self.limiter.limits[self.api]):
                usage = UsageReader(response.headers.get("content-type", ""))
            if hasattr(response, "_content"):
                # Already read by the inner transport (a mock, a cache): nothing streams,
                # nothing would close it, so the call is over now.
                if usage is not None:
                    usage.feed(response.content)
                    usage.finish()
                    found = usage.used()
                    if found is not None:
                        slot.report_tokens(found)
                await self._release(slot, success=True)
                return response
            stream_class = _stream_class(self._module(request))
            response.stream = stream_class(self.limiter, response.stream, slot, usage)
            return response
        # An error: read it whole (it is small), decide, pause where asked, then free the
        # slot (freed first, it could be handed on to a waiter before the pause: sent where
        # the pause was meant to stop it). The provider processed nothing, so the reserved
        # tokens come back.
        if tokens:
            slot.report_tokens((0, 0) if isinstance(tokens, tuple) else 0)
        mod = self._module(request)
        try:
            try:
                raw = b"".join([chunk async for chunk in response.stream])
            finally:
                await response.aclose()
            try:
                decoded = mod.Response(status, headers=response.headers, content=raw).content
            except mod.DecodingError:  # a content-encoding that lies: classify the raw bytes
                decoded = raw
            verdict = classify_response(status, response.headers, decoded, idempotent=idempotent)
            parsed = parse_rate_limit_headers(response.headers) if status == 429 else None
            if parsed is not None and self._learn:  # a 429 reports the limits too
                await self._learn_limits(parsed, where)
            if status in (401, 403):
                self._auth_refused(status)
            where_paused = _paused(where, parsed)
            await pause_if_asked(self.limiter, self.api, verdict, *where_paused)
        finally:
            await self._release(slot, success=False)
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

    async def _learn_headers(self, headers: Any, where: tuple[str | None, str | None]) -> None:
        """The provider has less room than we think: pause every replica until its reset.

        A ``remaining`` of 0 (OpenAI's ``x-ratelimit-remaining-*``, Anthropic's
        ``anthropic-ratelimit-*-remaining``, read by :mod:`._headers`) while our own
        windows of that kind still have room means the provider counts more than we do
        (another client on the same key, a smaller limit): the API is paused for every
        replica until about one request's room is back (``reset / limit``). When our
        windows are full too, both agree and our own windows already know when room
        comes back. Anthropic's input and output tokens are of the kind "tokens". ``where``
        is the slot's deployment and model: only the limit set they name pauses.
        """
        if not self._learn:
            return
        parsed = parse_rate_limit_headers(headers)
        await self._learn_limits(parsed, where)
        windows: dict[str, Any] | None = None
        for kind, said in parsed.kinds():
            if said.remaining != 0 or not said.reset:
                continue
            if windows is None:
                windows = _windows_of(await self.limiter.stats(self.api), *where)
            tokens = kind != "requests"
            ours = [use for name, use in windows.items() if name.startswith("rate:") != tokens]
            if any(use["used"] >= use["limit"] for use in ours):
                continue
            # ``reset`` is the time until the provider's budget is whole again; one
            # request's room comes back after about reset / limit (a bucket refilling
            # evenly, or a sliding window's oldest entry leaving), so pause that long.
            reset = said.reset / max(1, said.limit or 1)
            if reset > 0:
                who = display_name(self.api)
                if where[0] is not None:
                    who += f" (deployment {where[0]!r})"
                log.warning(
                    "%s says no %s are left: pausing it for every replica for %.2fs",
                    who,
                    kind.replace("_", " "),
                    reset,
                )
                await self.limiter.cooldown(self.api, reset, deployment=where[0], model=where[1])

    async def _learn_limits(
        self, parsed: RateLimitHeaders, where: tuple[str | None, str | None]
    ) -> None:
        """The limits the provider reports, as the API's learned limits for every replica
        (only for ``APILimits(learn_from_headers=True)``): requests per minute, and tokens
        per minute (Anthropic: its most restrictive token limit, else the least of its
        input and output limits, since one budget counts both), with what is left of each.

        Sent when the limits change, every half of :data:`LEARN_TTL`, and whenever at most
        a tenth of a limit is left (when another client on the key may be about to take
        what our windows think is free): not a script call per answer. Never fails the
        call. ``where`` (deployment, model): the limit set that learns (Limiter.learn_limits)."""
        if not self.limiter.limits[self.api].learn_from_headers:
            return
        tokens = parsed.tokens
        if tokens.limit is None:
            split = [k for k in (parsed.input_tokens, parsed.output_tokens) if k.limit]
            tokens = min(split, key=lambda k: k.limit or 0) if split else tokens
        apart = (parsed.input_tokens, parsed.output_tokens)  # the input and output budgets
        kinds = (parsed.requests, tokens, *apart)
        reported = tuple(k.limit for k in kinds)
        if not any(reported):
            return
        now = time.monotonic()
        low = any(
            k.limit and k.remaining is not None and k.remaining * 10 <= k.limit for k in kinds
        )
        last, last_at = self._reported.get(where, (None, -math.inf))
        fresh = now - last_at < LEARN_TTL / 2
        if reported == last and fresh and not low:
            return
        left = [k.remaining if k.limit else None for k in kinds]
        try:
            learned = await self.limiter.learn_limits(
                self.api, requests_per_minute=reported[0], tokens_per_minute=reported[1],
                requests_remaining=left[0], tokens_remaining=left[1],
                input_tokens_per_minute=reported[2], input_tokens_remaining=left[2],
                output_tokens_per_minute=reported[3], output_tokens_remaining=left[3],
                ttl=LEARN_TTL, deployment=where[0], model=where[1],
            )  # fmt: skip
        except (LimiterError, ValueError) as exc:  # the call goes on with what it has
            log.warning("could not apply %s's reported limits: %s", self.api, exc)
            return
        if learned and reported != last:
            log.info("%s reports lower limits: %s", display_name(self.api), learned)
        self._reported[where] = (reported, now)

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
