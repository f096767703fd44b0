"""Reading LLM requests and responses: request bodies as JSON, token estimates, ``usage``.

Owns no state beyond one :class:`UsageReader` per response. Called by
:mod:`limiter.http._transport` (:class:`UsageReader` while a response body passes),
:mod:`limiter.http._providers` (:func:`openai_token_estimate`, :func:`mcp_tools_call_only`
as the transport's predicates) and :mod:`limiter.http._anthropic`
(:func:`anthropic_token_estimate`); the public names are re-exported by :mod:`limiter.http`.
Imports no HTTP library: a request is anything with ``.method`` and ``.content``.
"""

from __future__ import annotations

import json
from typing import Any

__all__ = [
    "USAGE_BUFFER",
    "UsageReader",
    "anthropic_token_estimate",
    "anthropic_token_split",
    "json_body",
    "mcp_tools_call_only",
    "openai_token_estimate",
    "usage_tokens",
]

#: Largest response body kept in memory to read ``usage`` from (bytes).
USAGE_BUFFER = 1 << 20


def json_body(request: Any) -> Any:
    """The request's body decoded as JSON; ``None`` when it is empty or not JSON."""
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
    body = json_body(request)
    messages = body if isinstance(body, list) else [body]
    return any(isinstance(m, dict) and m.get("method") == "tools/call" for m in messages)


def openai_token_estimate(request: Any) -> int:
    """Tokens to reserve for an OpenAI request, as OpenAI itself charges at arrival.

    The larger of the output cap (``max_tokens`` / ``max_completion_tokens`` /
    ``max_output_tokens``) and an estimate of the input (a token per 4 bytes of the
    messages, input or prompt). Requests without a JSON body reserve nothing.
    """
    body = json_body(request)
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


def anthropic_token_split(request: Any) -> tuple[int, int]:
    """:func:`anthropic_token_estimate` apart: ``(input estimate, max_tokens)``, for APIs
    with input and output budgets (``tokens=(input, output)``)."""
    body = json_body(request)
    if not isinstance(body, dict):
        return 0, 0
    cap = body.get("max_tokens")
    if not isinstance(cap, int) or isinstance(cap, bool) or cap < 0:
        cap = 0
    parts = [body.get(k) for k in ("system", "messages", "tools")]
    text = json.dumps([p for p in parts if p is not None], separators=(",", ":"))
    estimate = len(text.encode()) // 4 + 1 if text != "[]" else 0
    return estimate, cap


def anthropic_token_estimate(request: Any) -> int:
    """Tokens to reserve for an Anthropic Messages request: ``max_tokens`` plus the input.

    Anthropic charges the input when a request arrives and counts ``max_tokens`` against
    the output budget until the answer is done, so both are reserved: ``max_tokens`` plus
    an estimate of the input (a token per 4 bytes of the system prompt, the messages and
    the tool definitions, as :func:`openai_token_estimate` counts). Requests without a
    JSON body reserve nothing.
    """
    return sum(anthropic_token_split(request))


def usage_tokens(payload: Any) -> int | None:
    """``usage.total_tokens`` from a chat/responses/embeddings body or stream event."""
    if not isinstance(payload, dict):
        return None
    for holder in (payload, payload.get("response")):
        if isinstance(holder, dict) and isinstance(holder.get("usage"), dict):
            total = holder["usage"].get("total_tokens")
            if isinstance(total, int) and not isinstance(total, bool) and total >= 0:
                return total
    return None


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


#: Anthropic's usage fields that its input and output budgets count (cache reads do not).
_ANTHROPIC_FIELDS = ("input_tokens", "cache_creation_input_tokens", "output_tokens")


class UsageReader:
    """Reads the tokens used out of a JSON body or an SSE stream as it passes.

    OpenAI: ``usage.total_tokens`` (chat, responses, embeddings; the last one seen).
    Anthropic (a ``usage`` without ``total_tokens``): ``input_tokens`` +
    ``cache_creation_input_tokens`` + ``output_tokens``; a stream carries the input in
    ``message_start`` and the output so far in each ``message_delta`` (cumulative), so the
    count is known from the first ``message_delta`` on; a stream cut before it leaves the
    count unknown (the reservation stands). Keeps at most :data:`USAGE_BUFFER` bytes (a
    larger JSON body is given up on); an SSE stream is read line by line, so only the
    pending line is kept.
    """

    __slots__ = ("_buffer", "_parts", "_sse", "tokens")

    def __init__(self, content_type: str) -> None:
        self._sse = "text/event-stream" in content_type
        self._buffer = bytearray()
        self._parts: dict[str, int] = {}
        #: The tokens used as last seen, or ``None``.
        self.tokens: int | None = None

    def feed(self, chunk: bytes) -> None:
        """Take the next chunk of the body."""
        if len(self._buffer) + len(chunk) > USAGE_BUFFER:
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
        """The body is over: read what is left; the tokens found, or ``None``."""
        if self._buffer:
            self._read(bytes(self._buffer[5:] if self._sse else self._buffer))
        return self.tokens

    def used(self) -> int | tuple[int, int] | None:
        """What to report after :meth:`finish`: Anthropic's ``(input, output)`` (for the
        input and output budgets; input counts ``cache_creation_input_tokens``), else the
        tokens found, or ``None``."""
        parts = self._parts
        if self.tokens is not None and {"input_tokens", "output_tokens"} <= parts.keys():
            created = parts.get("cache_creation_input_tokens", 0)
            return parts["input_tokens"] + created, parts["output_tokens"]
        return self.tokens

    def _read(self, data: bytes) -> None:
        try:
            payload = json.loads(data)
        except (ValueError, RecursionError):  # not JSON (UnicodeDecodeError too), or too deep
            return
        found = usage_tokens(payload)
        if found is None:
            found = self._anthropic(payload)
        if found is not None:
            self.tokens = found

    def _anthropic(self, payload: Any) -> int | None:
        """Anthropic's count once known: a ``message`` body, or a stream's ``message_delta``."""
        if not isinstance(payload, dict):
            return None
        kind = payload.get("type")
        holder = payload.get("message") if kind == "message_start" else payload
        if kind not in ("message", "message_start", "message_delta") or not isinstance(
            holder, dict
        ):
            return None
        usage = holder.get("usage")
        if not isinstance(usage, dict):
            return None
        for field in _ANTHROPIC_FIELDS:
            if _count(usage.get(field)):
                self._parts[field] = usage[field]
        if kind == "message_start" or not {"input_tokens", "output_tokens"} <= self._parts.keys():
            return None
        return sum(self._parts.values())
