"""The providers' SDK clients built on :class:`~limiter.http.LimitedTransport`.

Owns :func:`openai_client` (an ``openai.AsyncOpenAI``) and :func:`zapier_mcp` (an ``mcp``
client session); each client owns its transport, closed with it. Called by users and the
chatbot through :mod:`limiter.http`. The only module that imports ``openai`` and ``mcp``,
inside the factories (extras ``fleetlimit[openai]`` / ``fleetlimit[mcp]``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import httpx2

from .._call import display_name
from .._errors import LimiterError, ProviderAuthError
from ._transport import LimitedTransport
from ._usage import mcp_tools_call_only, openai_token_estimate

if TYPE_CHECKING:  # pragma: no cover
    import openai
    from mcp import ClientSession

    from .._limiter import Limiter

__all__ = ["openai_client", "zapier_mcp"]


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
    lim: Limiter, api: str = "openai", *, inner: Any = None, **kwargs: Any
) -> openai.AsyncOpenAI:
    """An ``openai.AsyncOpenAI`` whose every request passes the limiter.

    The SDK's own retries are off (``max_retries=0``): the transport retries, so every
    attempt is admitted. Tokens are reserved from the request (output cap or input
    estimate) and corrected from the response's ``usage``. ``inner`` is the transport
    that really sends (default: httpx2's). Other keywords go to ``AsyncOpenAI``
    (``base_url``, ``api_key``, ``timeout``, ...).
    """
    try:
        import openai
    except ModuleNotFoundError as exc:
        _missing_extra(exc, "openai", "openai_client", "openai")
        raise

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
    try:
        from mcp import ClientSession
        from mcp.client.streamable_http import streamable_http_client
    except ModuleNotFoundError as exc:
        _missing_extra(exc, "mcp", "zapier_mcp", "mcp")
        raise

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
            status = transport.last_auth_failure
            raise ProviderAuthError(api, status, display=display_name(api)) from None
        raise
