"""The providers' SDKs, limited at the HTTP layer: the public names of :mod:`limiter.http`.

:class:`LimitedTransport` is an async transport for ``httpx2`` (what ``openai`` 3.x and
``mcp`` 2.x speak through) and for plain ``httpx``. Every request it limits holds one slot
from before it is sent until its response body is closed (streaming included), is retried
with the policy of :mod:`limiter._retry` (a 429 pauses the API for every replica), and the
provider's ``x-ratelimit-remaining-*`` (OpenAI) or ``anthropic-ratelimit-*-remaining``
(Anthropic) headers pause the API until the reset when they say no room is left.

:func:`openai_client` and :func:`zapier_mcp` build the SDK clients on it;
:func:`mcp_http_client_factory` builds the HTTP clients of the OpenAI Agents SDK's
``MCPServerStreamableHttp`` on it (its ``httpx_client_factory``); :func:`anthropic_client`
builds ``anthropic.AsyncAnthropic`` on it. Needs the extras ``fleetlimit[openai]`` /
``fleetlimit[mcp]`` / ``fleetlimit[anthropic]``: without any, importing this module raises an
:class:`ImportError` that names them.

This module only re-exports; the parts live in private modules, each importing only what it
needs (``openai``, ``mcp`` and ``anthropic`` are imported when a factory is called, never
here):

- :mod:`._transport`: :class:`LimitedTransport`, its slot-holding stream, header learning;
- :mod:`._headers`: the providers' rate-limit headers, parsed;
- :mod:`._usage`: request bodies as JSON, token estimates, ``usage`` of JSON and SSE bodies;
- :mod:`._cache`: :class:`ResponseCache`, the opt-in cache of deterministic OpenAI answers;
- :mod:`._providers`: :func:`openai_client`, :func:`zapier_mcp`, :func:`mcp_http_client_factory`;
- :mod:`._anthropic`: :func:`anthropic_client`.
"""

try:
    import httpx2  # noqa: F401  (the transport speaks it; the extras install it)
except ModuleNotFoundError as exc:
    if exc.name != "httpx2":
        raise  # httpx2 is there but broken: its own error says more
    raise ImportError(
        "limiter.http needs the 'openai' or 'mcp' extra (httpx2 is not installed): "
        "pip install 'fleetlimit[openai]' (or 'fleetlimit[mcp]')",
        name="httpx2",
    ) from exc

from .._errors import ProviderAuthError
from ._anthropic import anthropic_client
from ._cache import ResponseCache
from ._providers import mcp_http_client_factory, openai_client, zapier_mcp
from ._transport import LimitedTransport, RequestPredicate, TokenEstimator
from ._usage import anthropic_token_estimate, mcp_tools_call_only, openai_token_estimate

__all__ = [
    "LimitedTransport",
    "ProviderAuthError",
    "RequestPredicate",
    "ResponseCache",
    "TokenEstimator",
    "anthropic_client",
    "anthropic_token_estimate",
    "mcp_http_client_factory",
    "mcp_tools_call_only",
    "openai_client",
    "openai_token_estimate",
    "zapier_mcp",
]
