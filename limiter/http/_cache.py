"""The opt-in response cache of :func:`~limiter.http.openai_client`: exact repeats of
deterministic requests answered from Redis, without a slot or a provider call.

Owns :class:`ResponseCache` (its settings, and whether Redis failed it lately, so that an
outage is logged once and a Redis that is down is not asked at every call) and the
cache's keys in the limiter's Redis (names from :func:`limiter._admin.cache_key`):

- ``<namespace>:cache:{<api>}:<sha256 hex>``: an entry, a hash ``s`` (status), ``t``
  (content type), ``b`` (the body, decoded), living ``ttl`` seconds;
- ``<namespace>:cache:{<api>}:stats``: the hash of ``hits`` and ``misses`` of every
  replica, read by :meth:`limiter.Limiter.stats`, living a day after the last lookup.

The hash is of the method, the URL path and the request body as canonical JSON; no
header (the API key least of all) is hashed or stored.

Tools: a request may offer the model tools (``tools``, ``functions``) and still be looked
up and stored, so an agent that sends its tools with every completion can be cached; but
an answer that calls a tool (a chat choice's ``tool_calls`` / ``function_call``, any
Responses output item other than a message or reasoning) is never stored, so nothing that
asks to run a tool is ever answered from the cache. A request that forces a tool call
(``tool_choice`` ``"required"``, ``"any"``, a named function or tool; ``function_call``
naming a function) is never looked up: its answer is a tool call, never stored. Called by
:class:`~limiter.http.LimitedTransport` only (its ``cache=``): :meth:`ResponseCache.lookup`
before the request takes a slot, :meth:`CacheLookup.keep` with the provider's answer.
Reaches Redis through the limiter's own client (:attr:`limiter.Limiter.redis`) with the
two scripts below (``EVALSHA``; commands the limiter's minimal ACL user already has). A
Redis error never fails a call: a failed lookup is a miss, a failed store is ignored.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Sequence
from importlib.resources import files
from types import ModuleType
from typing import TYPE_CHECKING, Any

from redis.exceptions import NoScriptError

from .._admin import cache_key
from .._checks import check_seconds
from .._config import show
from .._errors import ConfigError
from .._runner import REDIS_ERRORS, redact
from ._usage import json_body

if TYPE_CHECKING:  # pragma: no cover
    from .._limiter import Limiter

__all__ = [
    "CACHE_HEADER",
    "ENDPOINTS",
    "MAX_BODY",
    "CacheLookup",
    "ResponseCache",
    "cache_material",
    "storable_answer",
]

log = logging.getLogger("limiter")

#: The request header that opts a request in (``1``: cached even when not deterministic)
#: or out (``0``: never cached); removed before the request is sent.
CACHE_HEADER = "x-fleetlimit-cache"
#: The endpoints whose POSTs may be cached (the end of the URL path).
ENDPOINTS = ("/chat/completions", "/responses", "/embeddings")
#: The request fields that choose whether the model calls a tool: ``tool_choice`` (chat,
#: Responses), ``function_call`` (chat's older ``functions``). Offering tools is no bar to
#: the cache (an answer that calls one is never stored: :func:`storable_answer`); forcing a
#: call is (:func:`_forces_tool`).
_CHOICE_FIELDS = ("tool_choice", "function_call")
#: The choices that leave the model free to answer without a tool (as a string, or as the
#: ``type`` of an object: ``{"type": "auto"}``).
_FREE_CHOICES = frozenset({"none", "auto"})
#: Output items of a Responses answer that may be cached (every other kind is a tool call).
_PLAIN_ITEMS = frozenset({"message", "reasoning"})
#: The hits and misses live this long after the last lookup, milliseconds (one day, like
#: the limiter's totals by default).
_COUNTERS_MS = 86_400_000
#: After Redis failed the cache, it is left alone this long (seconds): the calls go on
#: uncached rather than each waiting on a Redis that is down.
_REST = 1.0
#: The largest ``max_bytes``: Redis values stop at 512 MiB.
MAX_BODY = 512 * 1024 * 1024


class _Script:
    """A script run with EVALSHA on any client, loaded again after a NOSCRIPT."""

    __slots__ = ("sha", "source")

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode(), usedforsecurity=False).hexdigest()

    async def __call__(self, redis: Any, keys: Sequence[str], args: Sequence[Any]) -> Any:
        try:
            return await redis.evalsha(self.sha, len(keys), *keys, *args)
        except NoScriptError:  # a restart or SCRIPT FLUSH since: load it (all primaries)
            await redis.script_load(self.source)
            return await redis.evalsha(self.sha, len(keys), *keys, *args)


def _lua(name: str) -> str:
    return files("limiter").joinpath("lua", f"{name}.lua").read_text(encoding="utf-8")


#: Look an entry up and count the lookup, in one round trip (``lua/cache_lookup.lua``).
_LOOKUP = _Script(_lua("cache_lookup"))

#: Store an entry with its lifetime, atomically (``lua/cache_store.lua``).
_STORE = _Script(_lua("cache_store"))


def _zero(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value == 0


def _given(body: dict[str, Any], field: str) -> bool:
    return body.get(field) not in (None, [], {})


def _server_state(endpoint: str, body: dict[str, Any]) -> bool:
    """Whether the request keeps or uses state at the provider (its answer is not only a
    function of the body): chat's ``store: true``; Responses' ``previous_response_id``,
    ``conversation``, ``background``, and ``store`` unless ``false`` (OpenAI's default
    is to store)."""
    if endpoint == "/responses":
        return (
            body.get("store", True) is not False
            or bool(body.get("background"))
            or _given(body, "previous_response_id")
            or _given(body, "conversation")
        )
    return endpoint == "/chat/completions" and bool(body.get("store"))


def _forces_tool(body: dict[str, Any]) -> bool:
    """Whether the request makes the model call a tool, so that its answer is one (never
    stored, so not worth a lookup). Free (not forcing): no choice, ``"none"``, ``"auto"``,
    ``{"type": "none" | "auto"}``, and Responses' ``{"type": "allowed_tools", "mode":
    "auto"}``. Anything else forces a call: ``"required"``, ``"any"``, a named function or
    tool (``{"type": "function", ...}``, ``function_call: {"name": ...}``, a hosted tool),
    and any value not known to leave the model free."""
    for name in _CHOICE_FIELDS:
        choice = body.get(name)
        if choice is None or (isinstance(choice, str) and choice in _FREE_CHOICES):
            continue
        if isinstance(choice, dict):
            kind = choice.get("type")
            if isinstance(kind, str) and kind in _FREE_CHOICES:
                continue
            if kind == "allowed_tools" and choice.get("mode") == "auto":
                continue
        return True
    return False


def cache_material(request: Any, *, opted_in: bool = False) -> bytes | None:
    """What a cacheable request's key is the hash of (method, path, canonical JSON body),
    or ``None`` when the cache must not answer it.

    Cacheable: a non-streaming POST without a query string to ``/chat/completions``,
    ``/responses`` or ``/embeddings`` with a JSON object body, deterministic
    (``temperature`` 0, or embeddings) or ``opted_in``, that forces no tool call
    (:func:`_forces_tool`; offering ``tools``/``functions`` is allowed, an answer that
    calls one is not stored) and uses no server state (:func:`_server_state`).
    """
    url = request.url
    path = url.path
    endpoint = next((e for e in ENDPOINTS if path.endswith(e)), None)
    if request.method != "POST" or endpoint is None or url.query:
        return None
    body = json_body(request)
    if (
        not isinstance(body, dict)
        or body.get("stream")
        or _forces_tool(body)
        or _server_state(endpoint, body)
        or (endpoint != "/embeddings" and not opted_in and not _zero(body.get("temperature")))
    ):
        return None
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"))  # ASCII: any text
    return b"\n".join([b"POST", path.encode(), canonical.encode()])


def _tool_call(payload: dict[str, Any]) -> bool:
    """Whether an answer calls a tool (or cannot be told apart from one): a chat choice's
    ``tool_calls`` / ``function_call``, a Responses output item other than a message or
    reasoning (a function call, a hosted or MCP tool's call), ``choices`` or ``output``
    that is not a list. Such an answer is never stored, whatever tools the request
    offered: a hit must never ask the caller to run a tool."""
    choices = payload.get("choices") or []
    output = payload.get("output") or []
    if not isinstance(choices, list) or not isinstance(output, list):
        return True
    for choice in choices:
        message = choice.get("message") if isinstance(choice, dict) else None
        if (
            not isinstance(message, dict)
            or message.get("tool_calls")
            or message.get("function_call")
        ):
            return True
    return any(not isinstance(i, dict) or i.get("type") not in _PLAIN_ITEMS for i in output)


def storable_answer(body: bytes) -> bool:
    """Whether a 2xx JSON answer may be kept: a JSON object that calls no tool
    (:func:`_tool_call`) and, when it is a Responses object, is ``completed`` or
    ``incomplete`` (not queued or in progress)."""
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError):  # not JSON (UnicodeDecodeError too), or too deep
        return False
    if not isinstance(payload, dict) or _tool_call(payload):
        return False
    return payload.get("object") != "response" or payload.get("status") in (
        "completed",
        "incomplete",
    )


def _tell(lim: Limiter, api: str, *, hit: bool) -> None:
    if lim.has_listeners:
        lim.emit("cache", api, hit=hit)


def _bytes(value: Any) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode()  # decode_responses


def _cached_response(module: ModuleType, entry: Sequence[Any]) -> Any:
    """The HTTP response of an entry's status, content type and body; ``None`` when the
    entry is not one this module wrote (a miss: the answer is stored again)."""
    status, content_type, body = entry
    try:
        code = int(_bytes(status))
        headers = {"content-type": _bytes(content_type).decode(), CACHE_HEADER: "hit"}
    except (TypeError, ValueError):  # a field missing or not ours (UnicodeDecodeError too)
        return None
    if not 200 <= code < 300:
        return None
    return module.Response(code, headers=headers, content=_bytes(body))


class ResponseCache:
    """An exact-match cache of deterministic OpenAI answers in the limiter's Redis.

    ``openai_client(lim, ..., cache=ResponseCache(ttl=300.0, max_bytes=1_000_000))``.
    An answer is kept ``ttl`` seconds when its body (decoded) is at most ``max_bytes``.
    A hit returns the same body and content type, takes no slot and calls no provider;
    see :func:`cache_material` and :func:`storable_answer` for what is cached. Requests
    opt in or out with the header ``x-fleetlimit-cache: 1`` / ``0`` (never sent on).
    One instance may serve several clients and limiters.
    """

    __slots__ = ("_down", "_rest_until", "_ttl_ms", "max_bytes", "ttl")

    def __init__(self, ttl: float = 300.0, max_bytes: int = 1_000_000) -> None:
        #: Seconds an answer stays in the cache.
        self.ttl = check_seconds("ResponseCache.ttl", ttl, 0.001)
        if (
            not isinstance(max_bytes, int)
            or isinstance(max_bytes, bool)
            or not (0 < max_bytes <= MAX_BODY)
        ):
            raise ConfigError(
                f"ResponseCache.max_bytes={show(max_bytes)}: must be an integer from 1 to "
                f"{MAX_BODY} (512 MiB)",
                field="ResponseCache.max_bytes",
                value=max_bytes,
            )
        #: The largest body kept, in bytes (decoded); larger answers are not cached.
        self.max_bytes = max_bytes
        self._ttl_ms = max(1, round(self.ttl * 1000))
        self._down = False
        self._rest_until = 0.0

    def __repr__(self) -> str:
        return f"<ResponseCache ttl={self.ttl:g} max_bytes={self.max_bytes}>"

    async def lookup(
        self, lim: Limiter, api: str, request: Any, module: ModuleType
    ) -> CacheLookup | None:
        """Before ``request`` takes a slot of ``api``: ``None`` when the cache has no say
        (not cacheable, opted out, Redis resting), else a :class:`CacheLookup` whose
        ``response`` is the cached answer (a hit) or ``None`` (a miss: :meth:`CacheLookup.keep`
        the answer). Removes the opt-in header; ``module`` is the request's HTTP library."""
        choice = request.headers.get(CACHE_HEADER)
        if choice is not None:
            del request.headers[CACHE_HEADER]
        choice = None if choice is None else choice.strip()
        if choice == "0":
            return None
        material = cache_material(request, opted_in=choice == "1")
        if material is None:
            return None
        if time.monotonic() < self._rest_until:
            _tell(lim, api, hit=False)
            return None
        key = cache_key(lim.namespace, api, hashlib.sha256(material).hexdigest())
        try:
            found = await _LOOKUP(
                lim.redis, [key, cache_key(lim.namespace, api, "stats")], [_COUNTERS_MS]
            )
        except REDIS_ERRORS as exc:
            self._failed("lookup", exc)
            _tell(lim, api, hit=False)
            return None
        self._answered()
        response = None if found is None else _cached_response(module, found)
        _tell(lim, api, hit=response is not None)
        return CacheLookup(self, lim, key, response)

    async def _store(
        self, lim: Limiter, key: str, status: int, content_type: str, body: bytes
    ) -> None:
        if time.monotonic() < self._rest_until:
            return
        try:
            await _STORE(lim.redis, [key], [self._ttl_ms, status, content_type, body])
        except REDIS_ERRORS as exc:
            self._failed("store", exc)
            return
        self._answered()

    def _failed(self, what: str, exc: BaseException) -> None:
        self._rest_until = time.monotonic() + _REST
        if not self._down:
            self._down = True
            log.warning(
                "response cache: Redis failed a %s (%s); calls go to the provider uncached "
                "until it answers again",
                what,
                redact(exc),
            )

    def _answered(self) -> None:
        if self._down:
            self._down = False
            log.info("response cache: Redis answers again")


class CacheLookup:
    """One cacheable request's lookup: the cached answer, or how to keep the provider's."""

    __slots__ = ("_cache", "_key", "_limiter", "response")

    def __init__(self, cache: ResponseCache, lim: Limiter, key: str, response: Any) -> None:
        self._cache = cache
        self._limiter = lim
        self._key = key
        #: The cached answer (a hit), or ``None`` (a miss).
        self.response = response

    async def keep(self, response: Any) -> Any:
        """After a miss: store the provider's answer when it may be kept; return it.

        A 2xx JSON answer is read whole here (which releases its slot, as the SDK's own
        read would), then stored unless it is larger than ``max_bytes`` or holds a tool
        call. Anything else is returned untouched.
        """
        status = response.status_code
        content_type = response.headers.get("content-type", "")
        if not 200 <= status < 300 or "application/json" not in content_type:
            return response
        body = await response.aread()
        if len(body) <= self._cache.max_bytes and storable_answer(body):
            await self._cache._store(self._limiter, self._key, status, content_type, body)
        return response
