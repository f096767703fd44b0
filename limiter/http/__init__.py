"""The providers' SDKs, limited at the HTTP layer: the public names of :mod:`limiter.http`.

:class:`LimitedTransport` is an async transport for ``httpx2`` (what ``openai`` 3.x and
``mcp`` 2.x speak through) and for plain ``httpx``. Every request it limits holds one slot
from before it is sent until its response body is closed (streaming included), is retried
with the policy of :mod:`limiter._retry` (a 429 pauses the API for every replica), and the
provider's ``x-ratelimit-remaining-*`` headers pause the API until the reset when they say
no room is left.

:func:`openai_client` and :func:`zapier_mcp` build the SDK clients on it. Needs the extras
``fleetlimit[openai]`` / ``fleetlimit[mcp]``: without either, importing this module raises an
:class:`ImportError` that names them.

This module only re-exports; the parts live in private modules, each importing only what it
needs (``openai`` and ``mcp`` are imported when a factory is called, never here):

- :mod:`._transport`: :class:`LimitedTransport`, its slot-holding stream, header learning;
- :mod:`._usage`: request bodies as JSON, token estimates, ``usage`` of JSON and SSE bodies;
- :mod:`._providers`: :func:`openai_client`, :func:`zapier_mcp`.
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
from ._providers import openai_client, zapier_mcp
from ._transport import LimitedTransport, RequestPredicate, TokenEstimator
from ._usage import mcp_tools_call_only, openai_token_estimate

__all__ = [
    "LimitedTransport",
    "ProviderAuthError",
    "RequestPredicate",
    "TokenEstimator",
    "mcp_tools_call_only",
    "openai_client",
    "openai_token_estimate",
    "zapier_mcp",
]
