"""The providers' SDK clients built on :class:`~limiter.http.LimitedTransport`.

Owns :func:`openai_client` (an ``openai.AsyncOpenAI``), :func:`zapier_mcp` (an ``mcp``
client session) and :func:`mcp_http_client_factory` (the HTTP clients of the OpenAI Agents
SDK's ``MCPServerStreamableHttp``); each client owns its transport, closed with it. Called
by users and the chatbot through :mod:`limiter.http`. The only module that imports
``openai`` and ``mcp``, inside the factories (extras ``fleetlimit[openai]`` /
``fleetlimit[mcp]``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import httpx2

from .._call import display_name
from .._config import show
from .._errors import ConfigError, LimiterError, ProviderAuthError
from ._cache import ResponseCache
from ._transport import LimitedTransport, check_deployments, request_model
from ._usage import mcp_tools_call_only, openai_token_estimate

if TYPE_CHECKING:  # pragma: no cover
    import openai
    from mcp import ClientSession

    from .._limiter import Limiter

__all__ = ["mcp_http_client_factory", "openai_client", "zapier_mcp"]


def _missing_extra(exc: ModuleNotFoundError, module: str, caller: str, extra: str) -> None:
    """Raise an ImportError naming the extra that installs ``module``, when it is ``module``
    (or one of its submodules) that is missing; return otherwise."""
    if exc.name is not None and (exc.name == module or exc.name.startswith(module + ".")):
        raise ImportError(
            f"{caller} needs the '{extra}' extra ({module} is not installed): "
            f"pip install 'fleetlimit[{extra}]'",
            name=module,
        ) from exc


def openai_client(
    lim: Limiter,
    api: str = "openai",
    *,
    inner: Any = None,
    cache: ResponseCache | None = None,
    deployments: Mapping[str, Mapping[str, str]] | None = None,
    **kwargs: Any,
) -> openai.AsyncOpenAI:
    """An ``openai.AsyncOpenAI`` whose every request passes the limiter.

    The SDK's own retries are off (``max_retries=0``): the transport retries, so every
    attempt is admitted. Tokens are reserved from the request (output cap or input
    estimate) and corrected from the response's ``usage``. ``inner`` is the transport
    that really sends (default: httpx2's). ``cache`` (a :class:`ResponseCache`, off by
    default) answers exact repeats of deterministic requests from Redis, without a slot.
    Other keywords go to ``AsyncOpenAI`` (``base_url``, ``api_key``, ``timeout``, ...).

    The model a request names (its body's ``model``) takes that model's limits
    (``APILimits.models``). For an API with ``deployments``, give each its credentials,
    ``deployments={"key-a": {"api_key": KA}, "key-b": {"api_key": KB, "base_url": URL}}``:
    each attempt goes out with the key and base URL of the deployment its slot was
    admitted to (the one with the most headroom; a retry may take another). The client's
    own ``api_key``/``base_url`` default to the first deployment's.
    """
    try:
        import openai
    except ModuleNotFoundError as exc:
        _missing_extra(exc, "openai", "openai_client", "openai")
        raise

    if cache is not None and not isinstance(cache, ResponseCache):
        raise ConfigError(
            f"cache={show(cache)}: must be a limiter.http.ResponseCache or None",
            field="cache",
            value=cache,
        )
    if deployments is not None:
        first = next(iter(check_deployments(lim, api, deployments).values()), {})
        for field in ("api_key", "base_url"):
            if field in first:
                kwargs.setdefault(field, first[field])
    transport = LimitedTransport(
        lim, api, inner, tokens=openai_token_estimate, cache=cache,
        deployments=deployments, model=request_model,
    )  # fmt: skip
    kwargs.setdefault("max_retries", 0)
    if kwargs["max_retries"] != 0:
        raise LimiterError("openai_client: max_retries must stay 0 (the limiter retries)")
    client = httpx2.AsyncClient(transport=transport, timeout=kwargs.get("timeout", 600.0))
    sdk = openai.AsyncOpenAI(http_client=client, **kwargs)
    transport.base_url = str(sdk.base_url)
    return sdk


def _mcp_transport(lim: Limiter, api: str) -> LimitedTransport:
    """How an MCP session is limited (``zapier_mcp`` and ``mcp_http_client_factory``):
    only ``tools/call`` takes a slot, a tool call is not retried after it may have run,
    and a call the limiter refuses gets a JSON-RPC error, which ``mcp`` fails alone
    instead of closing the session."""
    return LimitedTransport(
        lim, api, limit=mcp_tools_call_only, idempotent=False, refusals_as_jsonrpc=True
    )


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
    try:
        from mcp import ClientSession
        from mcp.client.streamable_http import streamable_http_client
    except ModuleNotFoundError as exc:
        _missing_extra(exc, "mcp", "zapier_mcp", "mcp")
        raise

    transport = _mcp_transport(lim, api)
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
            status = transport.last_auth_failure
            raise ProviderAuthError(api, status, display=display_name(api)) from None
        raise


def mcp_http_client_factory(
    lim: Limiter,
    api: str = "zapier",
    *,
    timeout: float = 30.0,
    read_timeout: float = 300.0,
) -> Callable[..., httpx2.AsyncClient]:
    """The ``httpx_client_factory`` of the OpenAI Agents SDK's ``MCPServerStreamableHttp``.

    The SDK (like ``mcp``'s own ``McpHttpClientFactory``) calls it as
    ``factory(headers=..., timeout=..., auth=...)``, once per MCP session, and it returns
    a new ``httpx2.AsyncClient`` (what ``mcp`` 2.x requires) with those headers, timeout
    and auth, on its own :class:`LimitedTransport`: only ``tools/call`` takes a slot of
    ``api`` (the handshake, ``initialize`` or ``server/discover``, passes unlimited, like
    ``tools/list``, notifications and the session's GET and DELETE), and tool calls are not
    retried after they may have run. ``timeout`` / ``read_timeout`` apply when the caller
    passes no timeout (``mcp``'s defaults). The client follows no redirect (the ``mcp``
    transport follows those within the server's origin itself). An unknown ``api`` raises
    :class:`~limiter.ConfigError` here, not at the first tool call.

    The SDK's ``client_session_timeout_seconds`` (5 s by default) also counts a tool
    call's wait for a slot: set it to the API's ``acquire_timeout`` plus the slowest
    action (README, "With the OpenAI Agents SDK").
    """
    lim.api_limits(api)  # unknown API: ConfigError now
    default_timeout = httpx2.Timeout(timeout, read=read_timeout)

    def factory(
        headers: dict[str, str] | None = None,
        timeout: httpx2.Timeout | None = None,
        auth: httpx2.Auth | None = None,
    ) -> httpx2.AsyncClient:
        return httpx2.AsyncClient(
            transport=_mcp_transport(lim, api),
            headers=headers,
            timeout=default_timeout if timeout is None else timeout,
            auth=auth,
            follow_redirects=False,
        )

    return factory
