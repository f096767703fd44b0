"""The Anthropic SDK's client built on :class:`~limiter.http.LimitedTransport`.

Owns :func:`anthropic_client` (an ``anthropic.AsyncAnthropic``); the client owns its
transport and its ``httpx2`` client, closed with it. Called by users through
:mod:`limiter.http`. The only module that imports ``anthropic``, inside the factory
(extra ``fleetlimit[anthropic]``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import httpx2

from .._call import display_name
from .._errors import LimiterError, ProviderAuthError
from ._transport import LimitedTransport, check_deployments, request_model
from ._usage import anthropic_token_split

if TYPE_CHECKING:  # pragma: no cover
    import anthropic

    from .._limiter import Limiter

__all__ = ["anthropic_client", "anthropic_messages_only"]


def anthropic_messages_only(request: Any) -> bool:
    """Only ``POST .../v1/messages`` takes a slot: counting tokens, batches and listing
    models have budgets of their own at Anthropic and pass unlimited."""
    return bool(request.method == "POST" and request.url.path.rstrip("/").endswith("/v1/messages"))


def anthropic_client(
    lim: Limiter,
    api: str = "anthropic",
    *,
    base_url: str | None = None,
    api_key: str | None = None,
    inner: Any = None,
    deployments: Mapping[str, Mapping[str, str]] | None = None,
    **kwargs: Any,
) -> anthropic.AsyncAnthropic:
    """An ``anthropic.AsyncAnthropic`` whose every Messages request passes the limiter.

    Each ``POST /v1/messages`` takes one slot of ``api`` and, when the API has a token
    budget (``APILimits(tokens_per_minute=...)``), reserves ``max_tokens`` plus an input
    estimate (:func:`~limiter.http.anthropic_token_estimate`), corrected from the answer's
    ``usage`` (JSON, or the stream's ``message_start`` / ``message_delta``). The SDK's own
    retries are off (``max_retries=0``; any other value raises
    :class:`~limiter.LimiterError`): the transport retries 429 and 529 with the
    provider's ``retry-after``, so every attempt is admitted, and a 429 pauses the API
    for every replica. A refused key (401/403) raises
    :class:`~limiter.http.ProviderAuthError` instead of the SDK's error. ``inner`` is the
    transport that really sends (default: httpx2's). Other keywords go to
    ``AsyncAnthropic`` (``timeout``, ``default_headers``, ``middleware``, ...). The
    request's ``model`` takes that model's limits; ``deployments`` works as in
    :func:`~limiter.http.openai_client` (each attempt sent with its deployment's
    ``x-api-key`` and base URL).
    """
    try:
        import anthropic
    except ModuleNotFoundError as exc:
        if exc.name is not None and (exc.name == "anthropic" or exc.name.startswith("anthropic.")):
            raise ImportError(
                "anthropic_client needs the 'anthropic' extra (anthropic is not installed): "
                "pip install 'fleetlimit[anthropic]'",
                name="anthropic",
            ) from exc
        raise

    kwargs.setdefault("max_retries", 0)
    if kwargs["max_retries"] != 0:
        raise LimiterError("anthropic_client: max_retries must stay 0 (the limiter retries)")
    if deployments is not None:
        first = next(iter(check_deployments(lim, api, deployments).values()), {})
        base_url = base_url or first.get("base_url")
        api_key = api_key or first.get("api_key")
    transport = LimitedTransport(
        lim, api, inner, limit=anthropic_messages_only, tokens=anthropic_token_split,
        deployments=deployments, model=request_model,
    )  # fmt: skip
    # The SDK's own default timeout keeps its behaviour (its guard against long
    # non-streaming requests only applies with it).
    timeout = kwargs.get("timeout", anthropic.DEFAULT_TIMEOUT)
    client = httpx2.AsyncClient(transport=transport, timeout=timeout, follow_redirects=True)
    name = display_name(api)

    async def refused_key(request: Any, call_next: Any) -> Any:
        response = await call_next(request)
        status = response.status_code
        if status in (401, 403):
            await response.http_response.aclose()
            raise ProviderAuthError(api, status, display=name)
        return response

    middleware = [refused_key, *(kwargs.pop("middleware", None) or ())]
    sdk = anthropic.AsyncAnthropic(
        base_url=base_url,
        api_key=api_key,
        http_client=client,
        middleware=middleware,
        **kwargs,
    )
    transport.base_url = str(sdk.base_url)
    return sdk
