"""``POST /v1/chat/completions``: one answer or a stream of chunks, in the real API's shapes.

Owns the Chat Completions request parsing (messages, ``tools``), the answer and chunk
bodies and the usage block (a final usage chunk when ``stream_options.include_usage`` is
set). Called by ``_app`` (the route); the reply comes from ``_model``, admission and the
hold on the slot until the last byte from ``_limits``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any

from fastapi import Request
from fastapi.responses import Response

from ._limits import FakeOpenAI, authed_body, bad_request, held
from ._model import Reply, ToolSpec, decide, output_cap, pieces, truncate
from ._wire import HeldJSONResponse, HeldStreamingResponse, new_id, sse, with_request_id

__all__ = ["handle_chat_completions"]


def _chat_specs(tools: Any) -> list[ToolSpec]:
    specs = []
    for tool in tools if isinstance(tools, list) else []:
        if isinstance(tool, dict) and isinstance(tool.get("function"), dict):
            fn = tool["function"]
            params = fn.get("parameters")
            specs.append(
                ToolSpec(str(fn.get("name", "")), params if isinstance(params, dict) else {})
            )
    return specs


def _chat_usage(prompt: int, completion: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 0,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }


def _chat_tool_call(tool: tuple[str, str, str]) -> dict[str, Any]:
    call_id, name, args = tool
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": args}}


async def _chat_stream(
    fake: FakeOpenAI,
    base: Mapping[str, Any],
    reply: Reply,
    text: str | None,
    finish_reason: str,
    usage: Mapping[str, Any],
    include_usage: bool,
) -> AsyncIterator[str]:
    cfg = fake.config
    chunk_latency = cfg.chunk_latency
    size = cfg.stream_chunk_chars

    def chunk(delta: Mapping[str, Any], finish: str | None = None) -> str:
        data: dict[str, Any] = {
            **base,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        }
        if include_usage:
            data["usage"] = None
        return sse(data)

    await asyncio.sleep(cfg.latency)
    if reply.tool is not None:
        call_id, name, args = reply.tool
        first = {"index": 0, "id": call_id, "type": "function"}
        first["function"] = {"name": name, "arguments": ""}
        yield chunk({"role": "assistant", "content": None, "tool_calls": [first]})
        for piece in pieces(args, size):
            await asyncio.sleep(chunk_latency)
            yield chunk({"tool_calls": [{"index": 0, "function": {"arguments": piece}}]})
    else:
        yield chunk({"role": "assistant", "content": "", "refusal": None})
        for piece in pieces(text or "", size):
            await asyncio.sleep(chunk_latency)
            yield chunk({"content": piece})
    await asyncio.sleep(chunk_latency)
    yield chunk({}, finish_reason)
    if include_usage:
        yield sse({**base, "choices": [], "usage": usage})
    yield "data: [DONE]\n\n"


async def handle_chat_completions(fake: FakeOpenAI, request: Request) -> Response:
    endpoint = "/v1/chat/completions"
    parsed = await authed_body(fake, request)
    if not isinstance(parsed, tuple):
        return parsed
    key, body = parsed
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        return bad_request(fake, "'messages' must be a non-empty array.", "messages")
    if not all(isinstance(m, dict) for m in messages):
        return bad_request(fake, "Each message must be an object.", "messages")
    cfg = fake.config
    model = str(body.get("model") or cfg.model)
    reply = decide(
        messages,
        _chat_specs(body.get("tools")),
        body.get("tool_choice"),
        body.get("tools"),
        cfg.tool_keywords,
    )
    cap = output_cap(body, "max_completion_tokens", "max_tokens")
    text, completion, cut = truncate(reply, cap)
    finish_reason = "length" if cut else ("tool_calls" if reply.tool else "stop")
    usage = _chat_usage(reply.prompt_tokens, completion)
    admitted = fake.admit(key, endpoint, model, max(cap or 0, reply.prompt_tokens))
    if not isinstance(admitted, tuple):
        return admitted
    adm, headers = admitted
    headers = with_request_id(headers)
    total = reply.prompt_tokens + completion
    try:
        base = {
            "id": new_id("chatcmpl-"),
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": model,
            "service_tier": "default",
            "system_fingerprint": "fp_fake",
        }
        if body.get("stream"):
            options = body.get("stream_options")
            include_usage = isinstance(options, dict) and bool(options.get("include_usage"))
            stream = _chat_stream(fake, base, reply, text, finish_reason, usage, include_usage)
            return held(
                fake,
                adm,
                total,
                HeldStreamingResponse(stream, media_type="text/event-stream", headers=headers),
            )
        await asyncio.sleep(cfg.latency)
        message: dict[str, Any] = {
            "role": "assistant",
            "content": text,
            "refusal": None,
            "annotations": [],
        }
        if reply.tool is not None:
            message["tool_calls"] = [_chat_tool_call(reply.tool)]
        payload = {
            **base,
            "object": "chat.completion",
            "choices": [
                {"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason}
            ],
            "usage": usage,
        }
        return held(fake, adm, total, HeldJSONResponse(payload, headers=headers))
    except BaseException:
        fake.finish(adm, total)
        raise
